"""The embedded default dataset: a valid COCO dataset with what the consumers need, deterministic, cached safely."""

import hashlib
import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detpretrain.data import SyntheticCoco, synthetic
from detpretrain.data.synthetic import MANIFEST_NAME, default_cache_dir, main, synthetic_coco

# pycocotools 2.0.11 decodes masks through a call that numpy 2 deprecates: its warning, not ours.

SMALL = {"num_train": 4, "num_val": 2}  # for tests of the machinery, not of the content


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory) -> SyntheticCoco:
    """The dataset every script uses with no data flags (default parameters), in a temporary cache."""
    return synthetic_coco(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def splits(default_dataset) -> dict[str, tuple[COCO, Path]]:
    return {
        "train": (COCO(str(default_dataset.train_ann)), default_dataset.train_images),
        "val": (COCO(str(default_dataset.val_ann)), default_dataset.val_images),
    }


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _non_crowd(coco: COCO) -> list[dict]:
    return [a for a in coco.dataset["annotations"] if not a["iscrowd"]]


def test_json_has_the_coco_fields(splits):
    for coco, _ in splits.values():
        assert set(coco.dataset) >= {"info", "licenses", "images", "annotations", "categories"}
        for image in coco.dataset["images"]:
            assert {"id", "file_name", "width", "height"} <= set(image)
        for ann in coco.dataset["annotations"]:
            assert {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"} <= set(ann)
        for category in coco.dataset["categories"]:
            assert {"id", "name", "supercategory"} <= set(category)
    train_ids, val_ids = (set(coco.getImgIds()) for coco, _ in splits.values())
    assert not train_ids & val_ids, "image ids are unique across splits, as in COCO"
    train_anns, val_anns = (set(coco.getAnnIds()) for coco, _ in splits.values())
    assert not train_anns & val_anns


def test_default_sizes_and_images_decode_at_the_size_the_json_says(splits):
    assert [len(coco.dataset["images"]) for coco, _ in splits.values()] == [64, 16]
    for coco, image_dir in splits.values():
        shapes = set()
        for image in coco.dataset["images"]:
            with Image.open(image_dir / image["file_name"]) as decoded:
                assert decoded.format == "JPEG" and decoded.mode == "RGB"
                assert decoded.size == (image["width"], image["height"])
            assert 256 <= max(decoded.size) <= 320
            shapes.add(decoded.size)
        sizes = np.array(sorted(shapes))
        assert (sizes[:, 0] > sizes[:, 1]).any() and (sizes[:, 0] < sizes[:, 1]).any(), "landscape and portrait"
        assert len(shapes) > len(coco.dataset["images"]) // 2, "image sizes vary"


def test_boxes_and_areas_are_those_of_the_decoded_visible_masks(splits):
    for coco, _ in splits.values():
        for image in coco.dataset["images"]:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            coverage = np.zeros((image["height"], image["width"]), dtype=np.int32)
            for ann in anns:
                mask = coco.annToMask(ann)
                assert mask.shape == (image["height"], image["width"])
                x, y, w, h = ann["bbox"]
                assert w > 0 and h > 0 and x >= 0 and y >= 0
                assert x + w <= image["width"] and y + h <= image["height"]
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                tight_box = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
                assert ann["bbox"] == [float(v) for v in tight_box]
                assert ann["area"] == float(mask.sum()) >= 40, "no sliver survives occlusion"
                coverage += mask
            # Visible masks: a pixel belongs to at most one instance, the one painted last.
            assert coverage.max() <= 1


def test_both_segmentation_formats_and_crowd_regions(splits):
    for coco, _ in splits.values():
        non_crowd = _non_crowd(coco)
        assert any(isinstance(a["segmentation"], list) for a in non_crowd), "uncovered objects keep their polygon"
        assert any(isinstance(a["segmentation"], dict) for a in non_crowd), "occluded or cut objects are RLE"
        crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
        assert crowd, "real COCO has crowd regions, and they must never become positives"
        for ann in crowd:
            assert isinstance(ann["segmentation"]["counts"], str)
        image_ids_with_anns = {a["image_id"] for a in coco.dataset["annotations"]}
        assert set(coco.getImgIds()) - image_ids_with_anns, "some images have no object at all"


def test_all_three_jigsaw_aspect_groups_and_varied_sizes(splits):
    coco, _ = splits["train"]
    boxes = np.array([a["bbox"] for a in _non_crowd(coco)])
    aspect = boxes[:, 2] / boxes[:, 3]
    tall, wide = (aspect < 0.5).sum(), (aspect > 1.5).sum()
    square = len(aspect) - tall - wide
    assert tall >= 30 and wide >= 30 and square >= 100, (tall, square, wide)
    scale = np.sqrt(boxes[:, 2] * boxes[:, 3])
    assert scale.min() <= 20 and scale.max() >= 100


def test_categories_are_named_sparse_and_all_used(default_dataset, splits):
    coco, _ = splits["train"]
    categories = [(c["id"], c["name"]) for c in coco.dataset["categories"]]
    assert tuple(categories) == default_dataset.categories
    ids = [cat_id for cat_id, _ in categories]
    assert default_dataset.num_categories == len(ids) >= 6
    assert ids != list(range(1, len(ids) + 1)) and max(ids) > len(ids), "ids are sparse, as in COCO"
    assert ids != list(range(1, 2 * len(ids), 2)), "not a regular pattern either"
    names = [name for _, name in categories]
    assert len(set(names)) == len(names) and all(names)
    assert {a["category_id"] for a in _non_crowd(coco)} == set(ids)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first = synthetic_coco(tmp_path / "a", **SMALL)
    again = synthetic_coco(tmp_path / "b", **SMALL)
    other = synthetic_coco(tmp_path / "c", **SMALL, seed=1)
    assert first.root.name == again.root.name != other.root.name
    hashes = _file_hashes(first.root)
    assert len(hashes) == 4 + 2 + 2 + 1  # images, two annotation files, manifest
    assert hashes == _file_hashes(again.root)
    other_hashes = _file_hashes(other.root)
    common = hashes.keys() & other_hashes.keys()
    assert {MANIFEST_NAME, "annotations/instances_train.json", "annotations/instances_val.json"} <= common
    assert all(hashes[name] != other_hashes[name] for name in common)


# The annotations of the SMALL dataset, pinned: they depend only on numpy's Generator, Python's math and pycocotools,
# so they are the same on every machine. When a change to the generator changes them, bump GENERATOR_VERSION (or
# caches made by the old code are reused under the same name) and update these hashes.
PINNED_ANNOTATION_SHA256 = {
    "annotations/instances_train.json": "a5ede144a2d01dbfa3fc2eb725edd020456a9f0c9805a6acacbb6a719558f392",
    "annotations/instances_val.json": "56355a1b40584226635f6459c81fad04996d7948fdec32bb63d343f772180aab",
}


def test_annotations_are_pinned(tmp_path):
    hashes = _file_hashes(synthetic_coco(tmp_path, **SMALL).root)
    assert {name: hashes[name] for name in PINNED_ANNOTATION_SHA256} == PINNED_ANNOTATION_SHA256


def test_cache_is_reused(tmp_path, monkeypatch):
    first = synthetic_coco(tmp_path, **SMALL)
    manifest_mtime = (first.root / MANIFEST_NAME).stat().st_mtime_ns

    def must_not_generate(*args, **kwargs):
        raise AssertionError("the cached dataset should have been reused")

    monkeypatch.setattr(synthetic, "_write_dataset", must_not_generate)
    assert synthetic_coco(tmp_path, **SMALL) == first
    assert (first.root / MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime
    with pytest.raises(AssertionError, match="reused"):
        synthetic_coco(tmp_path, **SMALL, seed=5)  # other parameters: another folder, generated


def test_damaged_or_foreign_cache_fails_loudly(tmp_path):
    dataset = synthetic_coco(tmp_path, **SMALL)
    next(dataset.train_images.glob("*.jpg")).unlink()
    with pytest.raises(RuntimeError, match="Delete"):
        synthetic_coco(tmp_path, **SMALL)
    (dataset.root / MANIFEST_NAME).unlink()
    with pytest.raises(RuntimeError, match="no MANIFEST.json"):
        synthetic_coco(tmp_path, **SMALL)


def _generate_after_barrier(root: Path, barrier, results) -> None:
    barrier.wait()  # both processes start generating at the same moment
    results.put(str(synthetic_coco(root, **SMALL).root))


def test_concurrent_generation_yields_one_valid_dataset(tmp_path):
    # fork: the children inherit the imported modules instead of importing torch and timm again.
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_generate_after_barrier, args=(tmp_path, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    roots = {results.get(timeout=1) for _ in workers}
    assert len(roots) == 1
    assert [p.name for p in tmp_path.iterdir()] == [Path(roots.pop()).name], "no temporary folder is left behind"
    dataset = synthetic_coco(tmp_path, **SMALL)
    assert len(COCO(str(dataset.train_ann)).dataset["images"]) == 4


def test_a_process_that_loses_the_race_uses_the_winners_copy(tmp_path, monkeypatch):
    write_dataset = synthetic._write_dataset
    expected = synthetic_coco(tmp_path / "reference", **SMALL)

    def write_while_another_process_finishes_first(out_dir, params):
        write_dataset(out_dir, params)
        shutil.copytree(expected.root, tmp_path / "cache" / expected.root.name)

    monkeypatch.setattr(synthetic, "_write_dataset", write_while_another_process_finishes_first)
    dataset = synthetic_coco(tmp_path / "cache", **SMALL)
    assert dataset.root.name == expected.root.name
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [expected.root.name], "our copy was discarded"
    assert _file_hashes(dataset.root) == _file_hashes(expected.root)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="num_train"):
        synthetic_coco(num_train=0)
    with pytest.raises(ValueError, match="long_side"):
        synthetic_coco(long_side=(320, 256))
    with pytest.raises(ValueError, match="max_objects"):
        synthetic_coco(max_objects=0)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DETPRETRAIN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DETPRETRAIN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "detpretrain"


def test_command_line_prints_the_paths(tmp_path, capsys):
    main(["--root", str(tmp_path), "--num-train", "2", "--num-val", "1"])
    printed = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert Path(printed["train_ann"]).is_file() and Path(printed["val_images"]).is_dir()
    assert json.loads(Path(printed["val_ann"]).read_text())["images"]
