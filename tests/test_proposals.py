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
    ProposalShard,
    compute_proposal_cache,
    edge_boxes,
    import_ximgproc,
    resolve_settings,
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
    run = compute_proposal_cache(shape_images, tmp_path / "cache", settings=settings, shard_size=2)
    cache = run.cache
    assert len(cache) == len(shape_images) and cache.num_shards == 3 and (run.kept, run.computed) == (0, 3)
    total = 0
    for i, path in enumerate(shape_images):
        image = read_rgb(path)
        boxes, scores = edge_boxes(image, settings)
        assert len(boxes) > 0
        assert torch.equal(cache.boxes(i), boxes)
        torch.testing.assert_close(cache.scores(i), scores, rtol=1e-3, atol=1e-4)  # stored as float16
        assert cache.image_size(i) == (image.shape[1], image.shape[0]) and cache.status(i) == "ok"
        _check_proposals(cache.boxes(i), cache.scores(i), width=160, height=120, settings=settings)
        total += len(boxes)
    shards = [cache.shard(k) for k in range(cache.num_shards)]
    assert sum(shard.header["num_boxes"] for shard in shards) == total
    assert cache.settings == settings.record() and all(shard.header["settings"] == cache.settings for shard in shards)
    assert [name for shard in shards for name in shard.names()] == [p.name for p in shape_images]
    # Compact: 10 bytes per box, 17 per image, plus the names and one JSON header per shard.
    size = sum(shard.path.stat().st_size for shard in shards)
    assert size < 10 * total + 40 * len(cache) + 2000 * len(shards)
    restored = pickle.loads(pickle.dumps(cache))  # DataLoader workers receive a pickled cache
    assert torch.equal(restored.boxes(3), cache.boxes(3))


def test_cache_is_identical_for_any_worker_count(shape_images, tmp_path):
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=20)
    serial = compute_proposal_cache(shape_images, tmp_path / "serial", settings=settings, num_workers=0, shard_size=2)
    parallel = compute_proposal_cache(
        shape_images, tmp_path / "parallel", settings=settings, num_workers=2, shard_size=2
    )
    assert folder_bytes(serial.cache.path) == folder_bytes(parallel.cache.path)
    assert [p.name for p in tmp_path.rglob(".*")] == [], "no temporary file left behind"


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_bad_images_are_skipped_counted_and_reported(shape_images, tmp_path):
    truncated = tmp_path / "data" / "truncated.png"
    truncated.write_bytes(shape_images[0].read_bytes()[:200])
    (tmp_path / "data" / "text.png").write_text("not an image")
    (tmp_path / "data" / "empty.png").write_bytes(b"")
    paths = [shape_images[0], truncated, tmp_path / "data" / "text.png", tmp_path / "data" / "missing.png"]
    paths += [tmp_path / "data" / "empty.png", shape_images[1]]
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=5)
    run = compute_proposal_cache(paths, tmp_path / "cache", settings=settings, shard_size=4)
    expected = [
        {"shard": 0, "row": 1, "image": "truncated.png", "reason": "undecodable image"},
        {"shard": 0, "row": 2, "image": "text.png", "reason": "undecodable image"},
        {"shard": 0, "row": 3, "image": "missing.png", "reason": "missing file"},
        {"shard": 1, "row": 4, "image": "empty.png", "reason": "undecodable image"},
    ]
    assert run.skipped == expected and run.cache.skipped_images() == expected
    cache = run.cache
    assert [cache.status(i) for i in range(6)] == ["ok", *[e["reason"] for e in expected], "ok"]
    assert [len(cache.boxes(i)) > 0 for i in range(6)] == [True, False, False, False, False, True]
    assert cache.image_size(3) == (0, 0)


def test_a_killed_cache_continues_and_keeps_whole_shards(shape_images, tmp_path):
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=5)
    reference = compute_proposal_cache(shape_images, tmp_path / "reference", settings=settings, shard_size=2)
    folder = tmp_path / "cache"
    compute_proposal_cache(shape_images, folder, settings=settings, shard_size=2)
    # A kill between shards leaves some shards missing; one mid-write leaves a temporary file, and a damaged shard
    # (a disk error, a copy cut short) fails its check: each is computed again, the whole shard is kept.
    (folder / "shard-000001.edgeboxes").unlink()
    (folder / ".shard-000001.edgeboxes.0123abcd.tmp").write_bytes(b"partial")
    data = (folder / "shard-000002.edgeboxes").read_bytes()
    (folder / "shard-000002.edgeboxes").write_bytes(data[:-30])
    kept = (folder / "shard-000000.edgeboxes").stat()
    run = compute_proposal_cache(shape_images, folder, settings=settings, shard_size=2)
    assert (run.kept, run.computed) == (1, 2)
    assert (folder / "shard-000000.edgeboxes").stat().st_mtime_ns == kept.st_mtime_ns
    assert {k: v for k, v in folder_bytes(folder).items() if not k.startswith(".")} == folder_bytes(
        reference.cache.path
    )


def test_another_image_list_or_setting_is_refused(shape_images, tmp_path):
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=5)
    compute_proposal_cache(shape_images, tmp_path / "cache", settings=settings, shard_size=2)
    with pytest.raises(ValueError, match=r"other layout \(num_images: 5 there, 4 here\)"):
        compute_proposal_cache(shape_images[:4], tmp_path / "cache", settings=settings, shard_size=2)
    other = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=6)
    with pytest.raises(ValueError, match="other settings .*max_boxes: 5 there, 6 here"):
        compute_proposal_cache(shape_images, tmp_path / "cache", settings=other, shard_size=2)
    # Images 1 and 2 swapped: shards 0 and 1 no longer hold their images and are computed again; shard 2 is kept.
    swapped = [shape_images[0], shape_images[2], shape_images[1], *shape_images[3:]]
    run = compute_proposal_cache(swapped, tmp_path / "cache", settings=settings, shard_size=2)
    assert (run.kept, run.computed) == (1, 2) and run.cache.shard(0).names() == ["img0.png", "img2.png"]
    # The same files elsewhere (a dataset moved to another disk) still match: every shard is kept.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for path in swapped:
        (moved / path.name).write_bytes(path.read_bytes())
    run = compute_proposal_cache([moved / p.name for p in swapped], tmp_path / "cache", settings=settings, shard_size=2)
    assert (run.kept, run.computed) == (3, 0)


def test_settings_travel_with_the_cache(shape_images, tmp_path):
    folder = tmp_path / "cache"
    assert resolve_settings(folder, {"max_boxes": 7}) == EdgeBoxesSettings(max_boxes=7)  # a new cache: the flags
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=7, alpha=0.6)
    compute_proposal_cache(shape_images, folder, settings=settings, shard_size=2)
    assert resolve_settings(folder, {}) == settings  # no flag: the cache's own settings
    assert resolve_settings(folder, {"max_boxes": 7, "alpha": 0.6}) == settings  # flags that agree
    with pytest.raises(ValueError, match=r"computed with max_boxes=7, but --edge-max-boxes 50 was passed"):
        resolve_settings(folder, {"max_boxes": 50})
    model = tmp_path / "model.yml.gz"
    model.write_bytes(b"forest")
    with pytest.raises(ValueError, match="computed with edge_model='image-gradient edges"):
        resolve_settings(folder, {"edge_model": str(model)})


def test_damaged_or_old_caches_are_rejected(shape_images, tmp_path):
    settings = EdgeBoxesSettings(image_size=160, min_box_area=200, max_boxes=5)
    folder = compute_proposal_cache(shape_images, tmp_path / "cache", settings=settings, shard_size=2).cache.path
    data = (folder / "shard-000000.edgeboxes").read_bytes()
    (tmp_path / "truncated.edgeboxes").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="truncated"):
        ProposalShard(tmp_path / "truncated.edgeboxes")
    (tmp_path / "other.edgeboxes").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a proposal shard"):
        ProposalShard(tmp_path / "other.edgeboxes")
    with pytest.raises(FileNotFoundError, match="no proposal cache here"):
        ProposalCache(tmp_path / "absent")
    (tmp_path / "old.bin").write_bytes(data)  # version 1 was a single file
    with pytest.raises(ValueError, match="single-file proposal cache of an older detpretrain"):
        ProposalCache(tmp_path / "old.bin")


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
    cache = compute_proposal_cache(shape_images[:2], tmp_path / "cache", settings=settings).cache
    assert calls and calls[0][0] == np.float32 and calls[0][1] == (120, 160, 3) and calls[0][2] <= 1.0
    assert cache.settings["edge_source"] == "structured"
    assert cache.settings["edge_model_file"] == "model.yml.gz"
    assert cache.settings["edge_model_sha256"] == hashlib.sha256(b"fake forest").hexdigest()
    assert "blur_sigma" not in cache.settings


def test_command_line_on_coco128(coco128, tmp_path, capsys):
    proposals.main(
        [
            *["--train-images", str(coco128 / "images")],
            *["--train-ann", str(coco128 / "annotations" / "instances_train2017.json")],
            *["--skip-bad-rows", "--output", str(tmp_path / "coco128"), "--num-workers", "0", "--limit", "3"],
            *["--shard-size", "2", "--edge-max-boxes", "50"],
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["shards"] == 2 and report["settings"]["edge_source"] == "image-gradient"
    assert report["settings"]["max_boxes"] == 50 and report["boxes_per_image"] <= 50
    assert 0 < report["bytes_per_image"] < 2000 and report["images_per_cpu_s"] > 0
    assert len(ProposalCache(tmp_path / "coco128")) == 3


def test_command_line_on_tar_shards(shape_images, tmp_path, capsys):
    """One cache shard per tar, its rows the tar's samples in stored order and named by key; a sample without an
    image, or whose image does not decode, keeps its row with a status and is reported."""
    webdataset = pytest.importorskip("webdataset")
    folder = tmp_path / "tars"
    folder.mkdir()
    with webdataset.TarWriter(str(folder / "part-0.tar")) as writer:
        for i in range(3):
            writer.write({"__key__": f"a{i}", "png": shape_images[i].read_bytes(), "cls": 0})
    with webdataset.TarWriter(str(folder / "part-1.tar")) as writer:
        writer.write({"__key__": "b0", "cls": 1})  # no image
        writer.write({"__key__": "b1", "png": b"not a png", "cls": 1})
        writer.write({"__key__": "b2", "png": shape_images[3].read_bytes(), "cls": 1})
    output = tmp_path / "cache"
    argv = ["--train-shards", str(folder), "--output", str(output), "--num-workers", "0", "--edge-image-size", "160"]
    proposals.main(argv)
    report = json.loads(capsys.readouterr().out)
    assert (report["images"], report["shards"], report["skipped_images"]) == (6, 2, 2)
    cache = ProposalCache(output)
    assert cache.layout == {"kind": "tars", "tars": ["part-0.tar", "part-1.tar"]}
    assert cache.shard(1).names() == ["b0", "b1", "b2"]
    assert [cache.shard(1).status(j) for j in range(3)] == ["no image in the sample", "undecodable image", "ok"]
    settings = EdgeBoxesSettings(image_size=160)
    assert torch.equal(cache.shard(1).boxes(2), edge_boxes(read_rgb(shape_images[3]), settings)[0])
    assert [(e["shard"], e["row"], e["image"]) for e in cache.skipped_images()] == [(1, 0, "b0"), (1, 1, "b1")]
    sample = types.SimpleNamespace(shard=1, position=2, key="b2")
    assert cache.locate(sample)[1] == 2
    with pytest.raises(ValueError, match="row 2 is sample 'b2', but tar part-1.tar holds 'b9' there"):
        cache.locate(types.SimpleNamespace(shard=1, position=2, key="b9"))
    proposals.main(argv)  # a second run keeps both shards
    assert json.loads(capsys.readouterr().out)["shards_kept"] == 2
