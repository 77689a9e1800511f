"""Detection datasets (COCO, LVIS, VOC), their validation messages, repeat-factor sampling, subsets and transforms.

Real data: coco128 photos and annotations, the LVIS v1 val100 json (../shared/data; skipped when absent). Broken
inputs (bad json, truncated JPEG, VOC layouts, malformed XML) are built in tmp_path, never in the repository.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from detpretrain import engine
from detpretrain.data.coco import CocoDataset
from detpretrain.data.detection import DatasetError, collate_detection, subset_indices
from detpretrain.data.lvis import (
    LvisDataset,
    RepeatFactorBatchSampler,
    repeat_factor_epoch_indices,
    repeat_factors_from_category_frequency,
)
from detpretrain.data.synthetic import synthetic_coco
from detpretrain.data.transforms import (
    LOW_SHOT_SHORT_RANGE,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    SampleTransform,
    crop_detection,
    eval_transforms,
    hflip_detection,
    resize_detection,
    shortest_edge_size,
    train_transforms,
)
from detpretrain.data.voc import VOC_CLASSES, VocDataset, parse_image_sets, voc_image_id
from detpretrain.jigsaw import voc_image_records
from tests.conftest import shared_path

# pycocotools 2.0.11 decodes masks through a call that numpy 2 deprecates: its warning, not ours.


# ------------------------------------------------------------------------------------------------- helpers


def _write_jpeg(path: Path, width: int, height: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (value, 64, 32)).save(path, format="JPEG", quality=90)


def _tiny_coco(root: Path, annotations: list[dict], *, images=None, categories=None) -> tuple[Path, Path]:
    """A COCO json with two 64x48 images (ids 1, 2; files written) and the given annotations."""
    images = images or [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
    ]
    for image in images:
        _write_jpeg(root / "images" / image["file_name"], image["width"], image["height"])
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    for k, ann in enumerate(annotations):
        ann.setdefault("id", k + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("category_id", 3)
        ann.setdefault("image_id", 1)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, root / "images"


def _target(boxes, canvas, *, labels=None, masks=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas),
        "labels": torch.arange(1, len(boxes) + 1) if labels is None else torch.tensor(labels),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.bool),
    }
    if masks is not None:
        target["masks"] = tv_tensors.Mask(masks)
    return target


def _box_masks(boxes, canvas) -> torch.Tensor:
    masks = torch.zeros((len(boxes), *canvas), dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, y1:y2, x1:x2] = 1
    return masks


# ------------------------------------------------------------------------------------------------- COCO


@pytest.fixture(scope="module")
def coco128_dataset(coco128) -> CocoDataset:
    return CocoDataset(coco128 / "annotations" / "instances_train2017.json", coco128 / "images", with_masks=True)


def test_coco128_loads_with_counts_and_contiguous_labels(coco128, coco128_dataset):
    dataset = coco128_dataset
    data = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    assert len(dataset) == 128
    assert dataset.num_classes == 81
    assert [c.label for c in dataset.categories] == list(range(1, 81))
    assert [c.id for c in dataset.categories] == sorted(c["id"] for c in data["categories"])
    report = dataset.cleaning_report
    assert report["annotations"] == 939
    assert report["crowd_excluded"] == 10
    assert report["kept"] == 929
    # Images 250 and 508 have no (non-crowd) annotation: kept as negatives.
    assert report["images_without_annotations"] == 2
    assert json.loads(json.dumps(dataset.describe()))["cleaning_report"] == report

    # Every target maps back to the json's non-crowd annotations of its image, in the json's order.
    by_image = {}
    for ann in data["annotations"]:
        if not ann["iscrowd"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
    to_category = dataset.label_to_category
    for index in (0, 5, dataset.image_ids.index(250)):
        image, target = dataset[index]
        anns = by_image.get(target["image_id"], [])
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert [to_category[int(label)] for label in target["labels"]] == [a["category_id"] for a in anns]
        expected = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        expected[:, 2:] += expected[:, :2]
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected)
        assert target["masks"].shape == (len(anns), *image.shape[1:])
        assert not target["iscrowd"].any()
    assert len(dataset[dataset.image_ids.index(250)][1]["boxes"]) == 0


def test_coco128_masks_match_pycocotools_for_polygons_and_rle(coco128):
    ann_file = coco128 / "annotations" / "instances_train2017.json"
    coco = COCO(str(ann_file))
    dataset = CocoDataset(ann_file, coco128 / "images", with_masks=True, include_crowd=True)
    # Image 315 holds two crowd regions stored as (uncompressed) RLE, besides polygon objects.
    _, target = dataset[dataset.image_ids.index(315)]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=315))
    assert sorted(target["iscrowd"].tolist()) == sorted(bool(a["iscrowd"]) for a in anns)
    assert target["iscrowd"].sum() == 2
    for mask, ann in zip(target["masks"], anns, strict=True):
        assert np.array_equal(mask.numpy(), coco.annToMask(ann))


def test_synthetic_dataset_loads_with_rle_masks_of_non_crowd_objects(tmp_path):
    synthetic = synthetic_coco(tmp_path)
    dataset = CocoDataset(synthetic.train_ann, synthetic.train_images, with_masks=True)
    coco = COCO(str(synthetic.train_ann))
    assert len(dataset) == 64
    assert [c.id for c in dataset.categories] == [c for c, _ in synthetic.categories]
    rle_anns = [a for a in coco.dataset["annotations"] if isinstance(a["segmentation"], dict) and not a["iscrowd"]]
    assert rle_anns, "the synthetic dataset has occluded (RLE) non-crowd objects"
    image_id = rle_anns[0]["image_id"]
    _, target = dataset[dataset.image_ids.index(image_id)]
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
    for mask, ann in zip(target["masks"], anns, strict=True):
        assert np.array_equal(mask.numpy(), coco.annToMask(ann))
    assert dataset.cleaning_report["images_without_annotations"] >= 1


def test_image_without_annotations_is_kept_as_a_negative(tmp_path):
    ann_file, image_dir = _tiny_coco(tmp_path, [{"bbox": [1, 2, 10, 20], "segmentation": [[1, 2, 11, 2, 11, 22]]}])
    dataset = CocoDataset(ann_file, image_dir, with_masks=True)
    assert len(dataset) == 2
    image, target = dataset[1]
    assert target["image_id"] == 2
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 48, 64)
    assert dataset.cleaning_report["images_without_annotations"] == 1


def test_boxes_outside_the_image_are_clipped_or_dropped_and_counted(tmp_path):
    annotations = [
        {"bbox": [-5, 10, 20, 10]},  # sticks out on the left: clipped to [0, 10, 15, 20]
        {"bbox": [50, 40, 30, 30]},  # sticks out right and bottom: clipped to [50, 40, 64, 48]
        {"bbox": [10, 10, 0, 5]},  # zero width: dropped
        {"bbox": [10, 10, 5, -1]},  # negative height: dropped
        {"bbox": [100, 10, 5, 5]},  # entirely right of the 64 px wide image: dropped
        {"bbox": [5, 5, 10, 10]},  # fine
    ]
    ann_file, image_dir = _tiny_coco(tmp_path, annotations)
    dataset = CocoDataset(ann_file, image_dir)
    report = dataset.cleaning_report
    assert report["clipped_to_image"] == 2
    assert report["dropped_nonpositive_size"] == 2
    assert report["dropped_outside_image"] == 1
    assert report["kept"] == 3
    _, target = dataset[0]
    expected = torch.tensor([[0, 10, 15, 20], [50, 40, 64, 48], [5, 5, 15, 15]], dtype=torch.float32)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected)


def test_unknown_category_id_fails_naming_the_file_and_the_id(tmp_path):
    ann_file, image_dir = _tiny_coco(tmp_path, [{"bbox": [1, 1, 5, 5], "category_id": 99}])
    with pytest.raises(DatasetError, match=r"ann\.json.*category_id 99"):
        CocoDataset(ann_file, image_dir)


def test_annotation_of_an_unlisted_image_fails(tmp_path):
    ann_file, image_dir = _tiny_coco(tmp_path, [{"bbox": [1, 1, 5, 5], "image_id": 42}])
    with pytest.raises(DatasetError, match=r"ann\.json.*image_id 42"):
        CocoDataset(ann_file, image_dir)


def test_malformed_bbox_fails_naming_the_annotation(tmp_path):
    ann_file, image_dir = _tiny_coco(tmp_path, [{"bbox": [1, 1, 5], "id": 17}])
    with pytest.raises(DatasetError, match=r"ann\.json: annotation 17 has bbox \[1, 1, 5\]"):
        CocoDataset(ann_file, image_dir)


def test_malformed_json_fails_naming_the_file_and_position(tmp_path):
    ann_file, image_dir = _tiny_coco(tmp_path, [])
    ann_file.write_text(ann_file.read_text()[:-10])
    with pytest.raises(DatasetError, match=r"ann\.json is not valid JSON .*line 1, column"):
        CocoDataset(ann_file, image_dir)
    with pytest.raises(DatasetError, match=r"nope\.json does not exist"):
        CocoDataset(tmp_path / "nope.json", image_dir)


def test_missing_image_file_fails_naming_the_file_and_the_folder(tmp_path):
    ann_file, image_dir = _tiny_coco(tmp_path, [])
    (image_dir / "b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images .* missing from .*images, e\.g\. .*b\.jpg"):
        CocoDataset(ann_file, image_dir)


def test_truncated_jpeg_fails_at_getitem_naming_the_file(tmp_path, coco128):
    ann_file, image_dir = _tiny_coco(tmp_path, [])
    photo = (coco128 / "images" / "000000000009.jpg").read_bytes()
    with Image.open(coco128 / "images" / "000000000009.jpg") as image:
        width, height = image.size
    data = json.loads(ann_file.read_text())
    data["images"][0].update(width=width, height=height)
    ann_file.write_text(json.dumps(data))
    (image_dir / "a.jpg").write_bytes(photo[: len(photo) // 2])
    dataset = CocoDataset(ann_file, image_dir)  # loading reads no pixels
    with pytest.raises(DatasetError, match=r"image .*a\.jpg is unreadable or truncated.*re-download it or remove it"):
        dataset[0]
    assert dataset[1][0].shape == (3, 48, 64)
    with pytest.raises(DatasetError, match=r"1 of 2 images cannot be used: image .*a\.jpg is unreadable"):
        dataset.verify_images()


def test_image_of_another_size_than_the_json_fails(tmp_path):
    ann_file, image_dir = _tiny_coco(tmp_path, [])
    _write_jpeg(image_dir / "a.jpg", 30, 20)
    with pytest.raises(DatasetError, match=r"a\.jpg is 30x20 but the annotations say 64x48"):
        CocoDataset(ann_file, image_dir)[0]


# ------------------------------------------------------------------------------------------------- subsets


def test_subsets_are_deterministic_nested_and_recorded(coco128_dataset):
    first = subset_indices(128, 10, seed=0)
    assert first == subset_indices(128, 10, seed=0)
    assert first != subset_indices(128, 10, seed=1)
    assert len(set(first)) == 10 and first == sorted(first)
    assert set(first) <= set(subset_indices(128, 50, seed=0))
    with pytest.raises(ValueError, match="subset size 200 must be in 1..128"):
        subset_indices(128, 200, seed=0)

    subset = coco128_dataset.random_subset(10, seed=0)
    assert len(subset) == 10 and len(coco128_dataset) == 128
    assert subset.image_ids == [coco128_dataset.image_ids[i] for i in first]
    assert subset.subset_info == {
        "size": 10,
        "seed": 0,
        "from_num_images": 128,
        "num_images": 10,
        "image_ids": subset.image_ids,
    }
    assert subset.num_classes == coco128_dataset.num_classes
    assert subset[3][1]["image_id"] == coco128_dataset.image_ids[first[3]]


# ------------------------------------------------------------------------------------------------- VOC


def _voc_xml(name: str, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    parts = [f"<annotation><filename>{name}.jpg</filename><size><width>{size[0]}</width>"]
    parts.append(f"<height>{size[1]}</height><depth>3</depth></size>")
    for cls, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{difficult}"
            f"</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


@pytest.fixture
def voc_root(tmp_path, coco128) -> Path:
    """A VOCdevkit with 3 VOC2007 trainval images and 2 VOC2012 trainval images, copies of coco128 photos."""
    photos = sorted((coco128 / "images").glob("*.jpg"))[:5]
    layout = {2007: ["000005", "000012", "000017"], 2012: ["2008_000008", "2011_003276"]}
    root = tmp_path / "VOCdevkit"
    photo_iter = iter(photos)
    for year, names in layout.items():
        year_dir = root / f"VOC{year}"
        (year_dir / "ImageSets" / "Main").mkdir(parents=True)
        (year_dir / "Annotations").mkdir()
        (year_dir / "JPEGImages").mkdir()
        (year_dir / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(names) + "\n")
        for name in names:
            photo = next(photo_iter)
            shutil.copy(photo, year_dir / "JPEGImages" / f"{name}.jpg")
            with Image.open(photo) as image:
                width, height = image.size
            objects = [("dog", (1, 1, width, height), 0), ("person", (10, 20, 50, 80), 1)] if name != "000012" else []
            (year_dir / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, (width, height), objects))
    return root


def test_voc_layout_of_coco128_photos_loads(voc_root):
    dataset = VocDataset(voc_root, "2007-trainval,2012-trainval")
    assert len(dataset) == 5
    assert dataset.num_classes == 21 and dataset.class_names[1:] == list(VOC_CLASSES)
    assert dataset.image_ids == [2007000005, 2007000012, 2007000017, 2008000008, 2011003276]
    image, target = dataset[0]
    height, width = image.shape[1:]
    # 1-based inclusive (1, 1, W, H) is the whole image: (0, 0, W, H); (10, 20, 50, 80) -> (9, 19, 50, 80).
    expected = torch.tensor([[0, 0, width, height], [9, 19, 50, 80]], dtype=torch.float32)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected)
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert target["difficult"].tolist() == [False, True]
    assert target["image_name"] == "000005" and target["image_id"] == 2007000005
    assert len(dataset[1][1]["boxes"]) == 0  # an image without objects is kept
    report = dataset.cleaning_report
    assert report["images"] == 5 and report["annotations"] == 8 and report["difficult"] == 4
    assert report["kept"] == 8 and report["images_without_annotations"] == 1
    assert dataset.label_to_category[12] == "dog"

    strict = VocDataset(voc_root, [(2007, "trainval")], include_difficult=False)
    assert strict.cleaning_report["difficult_excluded"] == 2 and strict.cleaning_report["kept"] == 2
    assert strict[0][1]["difficult"].tolist() == [False]

    records = voc_image_records(voc_root, "2007-trainval,2012-trainval")
    assert [r.image_id for r in records.records] == dataset.image_ids
    assert records.records[0].gt_crowd.tolist() == [False, True]  # difficult: crowd-like for Jigsaw
    assert records.class_names == dataset.class_names and records.category_ids is None


def test_voc_malformed_xml_unknown_class_and_missing_image_fail_naming_the_file(voc_root):
    xml = voc_root / "VOC2007" / "Annotations" / "000017.xml"
    text = xml.read_text()
    xml.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"VOC annotation .*000017\.xml is malformed XML \(.*line 1"):
        VocDataset(voc_root, "2007-trainval")
    xml.write_text(text.replace("<name>dog</name>", "<name>unicorn</name>"))
    with pytest.raises(DatasetError, match=r"000017\.xml: class 'unicorn' is not one of the 20 classes"):
        VocDataset(voc_root, "2007-trainval")
    xml.write_text(text.replace("<xmin>10</xmin>", "<xmin>ten</xmin>"))
    with pytest.raises(DatasetError, match=r"000017\.xml: object 1 \(person\) <xmin> is 'ten', not a number"):
        VocDataset(voc_root, "2007-trainval")
    xml.write_text(text)
    (voc_root / "VOC2012" / "JPEGImages" / "2008_000008.jpg").unlink()
    with pytest.raises(DatasetError, match=r"missing from their JPEGImages folders, e\.g\. .*2008_000008\.jpg"):
        VocDataset(voc_root, "2007-trainval,2012-trainval")
    with pytest.raises(DatasetError, match=r"VOC image set .*VOC2007/ImageSets/Main/test\.txt does not exist"):
        VocDataset(voc_root, "2007-test")


def test_voc_image_sets_and_ids():
    assert parse_image_sets("2007-trainval,2012-trainval") == [(2007, "trainval"), (2012, "trainval")]
    assert parse_image_sets(" 2007-test ") == [(2007, "test")]
    for bad in ("2007-trainvall", "2013-trainval", "trainval", "2007"):
        with pytest.raises(ValueError, match=rf"VOC image set '{bad}' is not YEAR-SPLIT"):
            parse_image_sets(bad)
    assert voc_image_id("2008_000123", year=2012) == 2008000123
    assert voc_image_id("000123", year=2007) == 2007000123
    with pytest.raises(DatasetError, match="'img_7' .* has no int id"):
        voc_image_id("img_7", year=2007)


# ------------------------------------------------------------------------------------------------- LVIS


def test_lvis_val100_parses_with_federated_lists(tmp_path):
    ann_file = shared_path("data", "lvis_val100", "lvis_val_100.json")
    data = json.loads(ann_file.read_text())
    # Annotations only: zero-byte stand-ins let loading find every file; decoding one fails, naming it.
    for image in data["images"]:
        split, name = image["coco_url"].split("/")[-2:]
        (tmp_path / split).mkdir(exist_ok=True)
        (tmp_path / split / name).touch()
    dataset = LvisDataset(ann_file, tmp_path, with_masks=True)
    assert len(dataset) == 100
    assert dataset.num_classes == len(data["categories"]) + 1
    assert dataset.cleaning_report["annotations"] == 977
    assert dataset.cleaning_report["kept"] == 977
    assert dataset.cleaning_report["images_without_annotations"] == 7
    first = data["images"][0]
    assert dataset.image_ids[0] == first["id"]
    assert dataset.neg_category_ids(0) == first["neg_category_ids"]
    assert dataset.not_exhaustive_category_ids(0) == first["not_exhaustive_category_ids"]
    assert set(dataset.category_frequency.values()) == {"r", "c", "f"}
    assert dataset.entry(0).path == str(tmp_path / "val2017" / first["coco_url"].split("/")[-1])
    with pytest.raises(DatasetError, match=r"image .*val2017/.*\.jpg is unreadable or truncated"):
        dataset[0]

    flat = tmp_path / "flat"
    flat.mkdir()
    for file in (tmp_path / "val2017").iterdir():
        shutil.move(file, flat / file.name)
    assert LvisDataset(ann_file, flat).entry(0).path == str(flat / first["coco_url"].split("/")[-1])
    with pytest.raises(DatasetError, match="images listed in .*lvis_val_100.json are missing"):
        LvisDataset(ann_file, tmp_path / "val2017")


def _tiny_lvis(root: Path) -> Path:
    """Five images; category 1 in images 0, 1, 2; category 2 in image 1; category 3 in image 3; image 4 empty."""
    images, annotations = [], []
    for k in range(5):
        images.append(
            {
                "id": 100 + k,
                "coco_url": f"http://images.cocodataset.org/train2017/{100 + k:012d}.jpg",
                "width": 40,
                "height": 30,
                "neg_category_ids": [3] if k == 0 else [],
                "not_exhaustive_category_ids": [],
            }
        )
        (root / "train2017").mkdir(exist_ok=True)
        (root / "train2017" / f"{100 + k:012d}.jpg").touch()
    for image_index, category in [(0, 1), (1, 1), (2, 1), (1, 2), (1, 2), (3, 3)]:
        annotations.append(
            {"id": len(annotations) + 1, "image_id": 100 + image_index, "category_id": category, "bbox": [1, 1, 5, 5]}
        )
    categories = [{"id": c, "name": f"c{c}", "frequency": "rcf"[c - 1]} for c in (1, 2, 3)]
    ann_file = root / "lvis.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


def test_repeat_factors_match_a_hand_computation(tmp_path):
    dataset = LvisDataset(_tiny_lvis(tmp_path), tmp_path)
    # t = 0.5: f(1) = 3/5 -> r = 1; f(2) = 1/5 -> sqrt(2.5); f(3) = 1/5 -> sqrt(2.5); an empty image: 1.
    factors = dataset.repeat_factors(threshold=0.5)
    expected = torch.tensor([1.0, 2.5**0.5, 1.0, 2.5**0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(factors, expected)
    # LVIS's t = 0.001 is far below every frequency here.
    torch.testing.assert_close(dataset.repeat_factors(), torch.ones(5, dtype=torch.float64))
    assert dataset.neg_category_ids(0) == [3]
    assert repeat_factors_from_category_frequency([{"a"}, set(), {"a", "b"}, {"c"}], threshold=1.0).tolist() == [
        2**0.5,
        1.0,
        2.0,
        2.0,
    ]


def test_lvis_specific_errors_name_the_file(tmp_path):
    ann_file = _tiny_lvis(tmp_path)
    data = json.loads(ann_file.read_text())
    data["images"][2]["neg_category_ids"] = [3, 999]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(
        DatasetError, match=r"lvis\.json: image 102 has neg_category_ids \[999\] that 'categories' does"
    ):
        LvisDataset(ann_file, tmp_path)
    del data["categories"][0]["frequency"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"lvis\.json: category 1 has no frequency r/c/f: not an LVIS file"):
        LvisDataset(ann_file, tmp_path)


def test_repeat_factor_epochs_are_deterministic_and_right_on_average():
    factors = torch.tensor([1.0, 2.5, 1.25, 3.0], dtype=torch.float64)
    epoch = repeat_factor_epoch_indices(factors, seed=0, epoch=3)
    assert torch.equal(epoch, repeat_factor_epoch_indices(factors, seed=0, epoch=3))
    counts = torch.stack(
        [torch.bincount(repeat_factor_epoch_indices(factors, seed=0, epoch=e), minlength=4) for e in range(400)]
    )
    assert (counts[:, 0] == 1).all() and (counts[:, 3] == 3).all()
    assert set(counts[:, 1].tolist()) == {2, 3} and set(counts[:, 2].tolist()) == {1, 2}
    torch.testing.assert_close(counts.double().mean(0), factors, atol=0.08, rtol=0)
    with pytest.raises(ValueError, match="repeat factors must be finite and >= 1"):
        repeat_factor_epoch_indices(torch.tensor([0.5, 1.0]), seed=0, epoch=0)


def test_repeat_factor_sampler_resumes_and_splits_over_ranks_like_the_engine():
    factors = torch.tensor([1.0, 2.5, 1.25, 3.0, 1.0], dtype=torch.float64)

    def batches(**kwargs):
        sampler = RepeatFactorBatchSampler(repeat_factors=factors, seed=7, total_steps=12, **kwargs)
        return list(sampler)

    full = batches(batch_size=4, start_step=0)
    assert all(len(batch) == 4 for batch in full) and len(full) == 12
    assert batches(batch_size=4, start_step=5) == full[5:]
    rank0, rank1 = (batches(batch_size=2, start_step=0, rank=r, world_size=2) for r in (0, 1))
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == full
    # The stream is the concatenation of shuffled epochs, each holding every image floor(r) or ceil(r) times.
    sampler = RepeatFactorBatchSampler(repeat_factors=factors, seed=7, batch_size=4, start_step=0, total_steps=12)
    stream = [key.index for batch in full for key in batch]
    first_epoch = sampler.epoch_order(0).tolist()
    assert stream[: len(first_epoch)] == first_epoch
    assert sorted(first_epoch) == repeat_factor_epoch_indices(factors, seed=7, epoch=0).tolist()
    # All-ones factors: every epoch is a permutation of the dataset.
    ones = RepeatFactorBatchSampler(repeat_factors=torch.ones(6), seed=1, batch_size=3, start_step=0, total_steps=4)
    indices = [key.index for batch in ones for key in batch]
    assert sorted(indices[:6]) == list(range(6)) and sorted(indices[6:]) == list(range(6))


# ------------------------------------------------------------------------------------------------- transforms


def test_flip_maps_boxes_and_masks_exactly():
    image = torch.zeros((3, 50, 100), dtype=torch.uint8)
    image[:, :, :10] = 255
    masks = _box_masks([(10, 20, 30, 40)], (50, 100))
    flipped_image, target = hflip_detection(image, _target([[10, 20, 30, 40]], (50, 100), masks=masks))
    assert target["boxes"].tolist() == [[70.0, 20.0, 90.0, 40.0]]
    assert torch.equal(target["masks"], _box_masks([(70, 20, 90, 40)], (50, 100)))
    assert (flipped_image[:, :, 90:] == 255).all() and (flipped_image[:, :, :90] == 0).all()


def test_resize_scales_boxes_and_masks():
    masks = _box_masks([(10, 20, 30, 40)], (50, 100))
    image, target = resize_detection(
        torch.zeros((3, 50, 100), dtype=torch.uint8),
        _target([[10, 20, 30, 40]], (50, 100), masks=masks),
        size=(100, 300),
    )
    assert image.shape == (3, 100, 300)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[30.0, 40.0, 90.0, 80.0]]))
    assert target["boxes"].canvas_size == (100, 300)
    assert torch.equal(target["masks"], _box_masks([(30, 40, 90, 80)], (100, 300)))
    # detectron2's rounding: short side to 800, long side capped at 1333.
    assert shortest_edge_size(480, 640, short_side=800, max_size=1333) == (800, 1067)
    assert shortest_edge_size(400, 1600, short_side=800, max_size=1333) == (333, 1333)
    image, target = ResizeShortestEdge((800,))(
        torch.zeros((3, 480, 640), dtype=torch.uint8), _target([[0, 0, 64, 48]], (480, 640))
    )
    assert image.shape == (3, 800, 1067)


def test_crop_removes_boxes_outside_and_tightens_cut_boxes_to_their_masks():
    boxes = [(10, 10, 30, 30), (70, 40, 90, 48), (40, 5, 60, 25)]
    masks = _box_masks(boxes, (50, 100))
    masks[2, 5:25, 40:45] = 0  # the third object does not fill its box on the left
    target = _target(boxes, (50, 100), labels=[1, 2, 3], masks=masks)
    target["iscrowd"] = torch.tensor([False, True, False])
    image, cropped = crop_detection(
        torch.zeros((3, 50, 100), dtype=torch.uint8), target, top=0, left=0, height=40, width=50
    )
    assert image.shape == (3, 40, 50)
    # Box 2 lies outside the window: removed with its label, mask and flag. Box 3 is cut at x = 50: its new box is
    # the tight box of its visible mask, x from 45 (not 40) to 50.
    assert cropped["boxes"].tolist() == [[10.0, 10.0, 30.0, 30.0], [45.0, 5.0, 50.0, 25.0]]
    assert cropped["labels"].tolist() == [1, 3] and cropped["iscrowd"].tolist() == [False, False]
    assert cropped["masks"].shape == (2, 40, 50) and isinstance(cropped["masks"], tv_tensors.Mask)
    assert cropped["boxes"].canvas_size == (40, 50)
    # Without masks a cut box is clipped to the window.
    no_masks = {k: v for k, v in target.items() if k != "masks"}
    _, cropped = crop_detection(torch.zeros((3, 50, 100)), no_masks, top=10, left=45, height=40, width=55)
    assert cropped["boxes"].tolist() == [[25.0, 30.0, 45.0, 38.0], [0.0, 0.0, 15.0, 15.0]]
    assert cropped["labels"].tolist() == [2, 3]


def test_random_transforms_are_deterministic_in_the_generator_and_need_one():
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    masks = _box_masks([(5, 5, 40, 30), (50, 30, 75, 55)], (60, 80))
    target = _target([[5, 5, 40, 30], [50, 30, 75, 55]], (60, 80), masks=masks)
    augment = train_transforms(short_sides=(40, 50, 60))

    def run(seed):
        return augment(image, target, generator=torch.Generator().manual_seed(seed))

    (image_a, target_a), (image_b, target_b) = run(3), run(3)
    assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    assert torch.equal(target_a["masks"], target_b["masks"])
    shapes = {tuple(run(seed)[0].shape) for seed in range(20)}
    assert len(shapes) > 1 and all(min(shape[1:]) in (40, 50, 60) for shape in shapes)
    for transform in (RandomCrop(), RandomHorizontalFlip(), ResizeShortestEdge((40, 60)), augment):
        with pytest.raises(TypeError, match="explicit generator"):
            transform(image, target)
    plain = {**target, "boxes": target["boxes"].as_subclass(torch.Tensor)}
    with pytest.raises(TypeError, match=r"target\['boxes'\] must be a tv_tensors.BoundingBoxes"):
        hflip_detection(image, plain)
    assert torch.equal(ResizeShortestEdge((40,))(image, target)[0], eval_transforms(short_side=40)(image, target)[0])
    low_shot = ResizeShortestEdge(short_range=LOW_SHOT_SHORT_RANGE)
    drawn = {low_shot.draw_short_side(torch.Generator().manual_seed(seed)) for seed in range(200)}
    assert min(drawn) >= 512 and max(drawn) <= 800 and len(drawn) > 100


def test_flip_probability_and_recipe():
    image = torch.zeros((3, 10, 20), dtype=torch.uint8)
    target = _target([[0, 0, 5, 5]], (10, 20))
    flips = [
        RandomHorizontalFlip(0.5)(image, target, generator=torch.Generator().manual_seed(s))[1]["boxes"][0, 0].item()
        for s in range(100)
    ]
    assert 30 < flips.count(15.0) < 70 and flips.count(15.0) + flips.count(0.0) == 100
    recipe = train_transforms().recipe()
    assert json.loads(json.dumps(recipe)) == [
        {"name": "RandomCrop", "type": "relative_range", "relative_range": [0.9, 0.9]},
        {
            "name": "ResizeShortestEdge",
            "short_sides": [640, 672, 704, 736, 768, 800],
            "max_size": 1333,
            "interpolation": "bilinear+antialias",
        },
        {"name": "RandomHorizontalFlip", "p": 0.5},
    ]
    assert train_transforms(short_sides=None, short_range=(512, 800)).recipe()[1]["short_range"] == [512, 800]
    assert eval_transforms().recipe() == [] and isinstance(eval_transforms(), Compose)


def test_dataset_through_the_engine_step_seeded_dataset(coco128_dataset):
    augment = SampleTransform(train_transforms(short_sides=(128, 160), max_size=256))
    seeded = engine.StepSeededDataset(coco128_dataset, transform=augment, seed=0)
    key = engine.SampleKey(step=3, index=4)
    (image_a, target_a), (image_b, target_b) = seeded[key], seeded[key]
    assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    assert min(image_a.shape[1:]) in (128, 160) or max(image_a.shape[1:]) == 256
    assert target_a["masks"].shape[1:] == image_a.shape[1:]
    boxes = target_a["boxes"]
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes[:, 2] <= image_a.shape[2]).all() and (boxes[:, 3] <= image_a.shape[1]).all()
    images, targets = collate_detection([seeded[key], seeded[engine.SampleKey(3, 5)]])
    assert len(images) == 2 and targets[1]["image_id"] == coco128_dataset.image_ids[5]
