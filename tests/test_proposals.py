"""EdgeBoxes proposals and their cache (predet.txt §3.2, §4.1; USERS.md item 4): boxes, NMS, the file, staleness."""

import hashlib
import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from detpretrain import proposals
from detpretrain.data.labelled_images import read_rgb
from detpretrain.proposals import (
    EdgeBoxesSettings,
    ProposalCache,
    compute_proposal_cache,
    edge_boxes,
    import_ximgproc,
)


def _shapes_image(path, *, seed, size=(160, 120)):
    """A small photo-like image: a noisy background with a few filled rectangles (strong, closed contours)."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, width - 40), rng.integers(0, height - 40)
        w, h = rng.integers(16, 40, 2)
        pixels[y : y + h, x : x + w] = rng.integers(0, 256, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def shape_images(tmp_path):
    return [_shapes_image(tmp_path / "data" / f"img{i}.png", seed=i) for i in range(5)]


def _check_proposals(boxes, scores, *, width, height, settings):
    assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and scores.shape == (len(boxes),)
    assert (boxes == boxes.round()).all(), "boxes are whole pixels of the original image"
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert (scores[1:] <= scores[:-1]).all(), "sorted by decreasing score"
    assert len(boxes) <= settings.max_boxes
    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    assert iou.max() <= settings.nms_iou + 1e-6, "NMS holds in the stored frame"


# -------------------------------------------------------------------------------------------------------- OpenCV


def test_missing_opencv_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "detpretrain\[proposals\]"') as error:
        import_ximgproc()
    assert "opencv-python" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ImportError, match="detpretrain\\[proposals\\]"):
        compute_proposal_cache([tmp_path / "a.jpg"], tmp_path / "cache.bin")
    assert not (tmp_path / "cache.bin").exists()


def test_opencv_without_contrib_says_what_hides_it(monkeypatch):
    fake = types.ModuleType("cv2")
    fake.__version__ = "4.10.0"
    monkeypatch.setitem(sys.modules, "cv2", fake)
    with pytest.raises(ImportError, match="has no ximgproc.*pip uninstall opencv-python opencv-python-headless"):
        import_ximgproc()


# ---------------------------------------------------------------------------------------------------- edge_boxes


def test_edge_boxes_on_a_coco128_photo(coco128):
    path = sorted((coco128 / "images").glob("*.jpg"))[0]
    image = read_rgb(path)
    settings = EdgeBoxesSettings()
    boxes, scores = edge_boxes(image, settings)
    assert len(boxes) >= 20, "a real photo gives many proposals"
    _check_proposals(boxes, scores, width=image.shape[1], height=image.shape[0], settings=settings)
    # Boxes are in the original image's pixels, not the 480-px working image's.
    assert boxes[:, 2].max() > 480 * 0.9 * image.shape[1] / max(image.shape[:2])


def test_edge_boxes_finds_a_square_in_original_coordinates():
    # The same scene at 320x240 (upscaled to 480 internally) and 640x480 (downscaled): the best box encloses the
    # square in the coordinates of the image passed in.
    for scale in (1, 2):
        image = np.full((240 * scale, 320 * scale, 3), 235, np.uint8)
        image[60 * scale : 180 * scale, 100 * scale : 220 * scale] = 30
        boxes, _ = edge_boxes(image)
        square = torch.tensor([[100.0, 60.0, 220.0, 180.0]]) * scale
        assert box_iou(square, boxes[:1]).item() > 0.85


def test_edge_boxes_do_not_depend_on_history_or_opencv_threads(coco128):
    # A cache must not depend on how its images were split among workers nor on the machine. Three traps found:
    # OpenCV's EdgeBoxes object keeps state between images, its parallel Canny varies with the thread count, and
    # cv2.magnitude's last bit varies with the array's memory address.
    images = [read_rgb(p) for p in sorted((coco128 / "images").glob("*.jpg"))[:16]]
    first = [edge_boxes(image) for image in images]
    cv2 = import_ximgproc()
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1 if threads != 1 else 2)
        again = [edge_boxes(image) for image in reversed(images)][::-1]
    finally:
        cv2.setNumThreads(threads)
    for i, ((boxes, scores), (boxes_again, scores_again)) in enumerate(zip(first, again, strict=True)):
        assert torch.equal(boxes, boxes_again) and torch.equal(scores, scores_again), f"image {i}"


def test_thin_edges_keep_one_pixel_across_an_edge():
    # A smooth vertical step and a smooth diagonal step: along every line across the edge (a row; a line of
    # constant x - y) exactly one pixel survives, on the step.
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float32)
    for diagonal in (False, True):
        position = (xx + yy) / 2 if diagonal else xx
        ramp = 1 / (1 + np.exp(-(position - 20.3)))
        gy, gx = np.gradient(ramp)
        strength = np.hypot(gx, gy)
        strength /= strength.max()
        thin = proposals._thin_edges(strength, gx, gy, threshold=0.25)
        lines = (xx - yy).astype(int) if diagonal else yy.astype(int)
        inner = (np.minimum(xx, yy) >= 5) & (np.maximum(xx, yy) < 35)
        for line in np.unique(lines[inner & (np.abs(position - 20.3) < 3)]):
            survivors = np.nonzero((thin > 0) & (lines == line))
            assert len(survivors[0]) == 1, (diagonal, line)
            assert abs(position[survivors][0] - 20.3) <= 1


def test_edge_boxes_on_a_flat_image_is_empty():
    boxes, scores = edge_boxes(np.full((64, 80, 3), 128, np.uint8))
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB"):
        edge_boxes(np.zeros((3, 64, 80), np.uint8))


def test_settings_validate_and_name_the_edge_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.yml.gz: structured-edge model not found"):
        EdgeBoxesSettings(edge_model=str(tmp_path / "model.yml.gz"))
    with pytest.raises(ValueError, match="nms_iou"):
        EdgeBoxesSettings(nms_iou=0)
    record = EdgeBoxesSettings().record()
    assert record["edge_source"] == "image-gradient" and record["beta"] == record["nms_iou"] == 0.5
    assert "edge_model" not in record


# --------------------------------------------------------------------------------------------------------- cache


def test_cache_round_trip_matches_edge_boxes(shape_images, tmp_path):
    # image_size 200 (the images are 160 x 120): boxes found at 200 px come back to 160 px and are rounded.
    settings = EdgeBoxesSettings(image_size=200, min_box_area=200, max_boxes=20)
    cache = compute_proposal_cache(shape_images, tmp_path / "cache.bin", settings=settings)
    assert len(cache) == len(shape_images)
    total = 0
    for i, path in enumerate(shape_images):
        image = read_rgb(path)
        boxes, scores = edge_boxes(image, settings)
        assert len(boxes) > 0
        assert torch.equal(cache.boxes(i), boxes)
        torch.testing.assert_close(cache.scores(i), scores, rtol=1e-3, atol=1e-4)  # stored as float16
        assert cache.image_size(i) == (image.shape[1], image.shape[0])
        _check_proposals(cache.boxes(i), cache.scores(i), width=160, height=120, settings=settings)
        total += len(boxes)
    assert cache.header["num_boxes"] == total
    assert cache.settings == {**settings.record()}
    assert cache.names() == [p.name for p in shape_images]
    # Compact: 10 bytes per box, 16 per image, plus the names and one JSON header.
    assert cache.path.stat().st_size < 10 * total + 40 * len(cache) + 2000
    restored = pickle.loads(pickle.dumps(cache))  # DataLoader workers receive a pickled cache
    assert torch.equal(restored.boxes(3), cache.boxes(3))


def test_cache_is_identical_for_any_worker_count(shape_images, tmp_path):
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=20)
    serial = compute_proposal_cache(shape_images, tmp_path / "serial.bin", settings=settings, num_workers=0)
    parallel = compute_proposal_cache(shape_images, tmp_path / "parallel.bin", settings=settings, num_workers=2)
    assert serial.path.read_bytes() == parallel.path.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary file left behind"


def test_stale_cache_is_rejected_with_a_clear_error(shape_images, tmp_path):
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=5)
    compute_proposal_cache(shape_images, tmp_path / "cache.bin", settings=settings)
    ProposalCache(tmp_path / "cache.bin", image_paths=shape_images)
    with pytest.raises(ValueError, match="stale proposal cache: 5 images there, 4 here; compute it again"):
        ProposalCache(tmp_path / "cache.bin", image_paths=shape_images[:4])
    swapped = [shape_images[0], shape_images[2], shape_images[1], *shape_images[3:]]
    with pytest.raises(ValueError, match="image 1 is 'img1.png' there, 'img2.png' here"):
        ProposalCache(tmp_path / "cache.bin", image_paths=swapped)
    # The same files elsewhere (a dataset moved to another disk) still match.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for path in shape_images:
        (moved / path.name).write_bytes(path.read_bytes())
    ProposalCache(tmp_path / "cache.bin", image_paths=[moved / p.name for p in shape_images])


def test_damaged_files_are_rejected(shape_images, tmp_path):
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=5)
    data = compute_proposal_cache(shape_images, tmp_path / "cache.bin", settings=settings).path.read_bytes()
    (tmp_path / "truncated.bin").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="truncated"):
        ProposalCache(tmp_path / "truncated.bin")
    (tmp_path / "other.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a proposal cache"):
        ProposalCache(tmp_path / "other.bin")
    with pytest.raises(FileNotFoundError, match="create it with compute_proposal_cache"):
        ProposalCache(tmp_path / "absent.bin")


def test_structured_edges_are_used_and_recorded(shape_images, tmp_path, monkeypatch):
    # The forest's model file does not ship with OpenCV: a stand-in detector checks the plumbing and the record.
    cv2 = import_ximgproc()
    model = tmp_path / "model.yml.gz"
    model.write_bytes(b"fake forest")
    calls = []

    class FakeForest:
        def detectEdges(self, rgb):  # noqa: N802 (OpenCV's names)
            calls.append((rgb.dtype, rgb.shape, float(rgb.max())))
            grey = cv2.cvtColor((rgb * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
            edges = cv2.Canny(grey, 50, 150).astype(np.float32) / 255
            return edges

        def computeOrientation(self, edges):  # noqa: N802
            return np.zeros_like(edges)

        def edgesNms(self, edges, orientation):  # noqa: N802
            return edges

    monkeypatch.setattr(cv2.ximgproc, "createStructuredEdgeDetection", lambda path: FakeForest())
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=5, edge_model=str(model))
    cache = compute_proposal_cache(shape_images[:2], tmp_path / "cache.bin", settings=settings)
    assert calls and calls[0][0] == np.float32 and calls[0][1] == (120, 160, 3) and calls[0][2] <= 1.0
    assert cache.settings["edge_source"] == "structured"
    assert cache.settings["edge_model_file"] == "model.yml.gz"
    assert cache.settings["edge_model_sha256"] == hashlib.sha256(b"fake forest").hexdigest()
    assert "blur_sigma" not in cache.settings


def test_command_line_on_coco128(coco128, tmp_path, capsys):
    proposals.main(
        [
            "--train-images",
            str(coco128 / "images"),
            "--train-ann",
            str(coco128 / "annotations" / "instances_train2017.json"),
            "--skip-bad-rows",
            "--output",
            str(tmp_path / "coco128.bin"),
            "--num-workers",
            "0",
            "--limit",
            "2",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 2 and report["settings"]["edge_source"] == "image-gradient"
    assert 0 < report["bytes_per_image"] < 2000
    assert len(ProposalCache(tmp_path / "coco128.bin")) == 2
