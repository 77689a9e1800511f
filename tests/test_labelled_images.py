"""Image-level multi-label data for PreDet (predet.txt §3.1, §4.1): the three readers, the bad-row policy, decoding."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from detpretrain.data.labelled_images import (
    EMPTY_LABELS,
    MALFORMED_ROW,
    MISSING_FILE,
    UNDECODABLE_IMAGE,
    UNKNOWN_LABEL,
    BadRowError,
    ImageDecodeError,
    LabelledImageDataset,
    from_class_folders,
    from_coco,
    from_label_file,
    read_rgb,
    verify_images,
)


def _write_image(path, size=(12, 8), color=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture()
def images_dir(tmp_path):
    root = tmp_path / "images"
    for name in ("a.jpg", "b.png", "sub/c.jpg", "with,comma.jpg"):
        _write_image(root / name)
    return root


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------- label files


def test_jsonl_reads_labels_as_sorted_unique_indices(images_dir, tmp_path):
    labels_file = _jsonl(
        tmp_path / "labels.jsonl",
        [
            {"file": "a.jpg", "labels": ["dog", "cat", "dog"], "extra": 1},
            "",
            {"file": "sub/c.jpg", "labels": ["zebra"]},
        ],
    )
    images = from_label_file(images_dir, labels_file)
    assert images.class_names == ("cat", "dog", "zebra")
    assert images.samples == ((str(images_dir / "a.jpg"), (0, 1)), (str(images_dir / "sub/c.jpg"), (2,)))
    assert images.label_names(0) == ["cat", "dog"]
    assert images.skipped == {}


def test_csv_reads_the_documented_format(images_dir, tmp_path):
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text('file,labels\na.jpg, dog ;cat\n"with,comma.jpg",cat\n\nb.png,bird\n')
    images = from_label_file(images_dir, labels_file, class_names=["bird", "cat", "dog", "unused"])
    assert images.class_names == ("bird", "cat", "dog", "unused")
    assert [labels for _, labels in images.samples] == [(1, 2), (1,), (0,)]
    assert images.image_paths[1] == str(images_dir / "with,comma.jpg")


def test_csv_without_header_is_an_error(images_dir, tmp_path):
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text("a.jpg,dog\n")
    with pytest.raises(ValueError, match="header 'file,labels'"):
        from_label_file(images_dir, labels_file)


def test_class_names_from_a_text_file(images_dir, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("dog\ncat\n\n")
    labels_file = _jsonl(tmp_path / "labels.jsonl", [{"file": "a.jpg", "labels": ["cat"]}])
    images = from_label_file(images_dir, labels_file, class_names=names)
    assert images.class_names == ("dog", "cat") and images.samples[0][1] == (1,)


@pytest.mark.parametrize(
    ("row", "reason", "message"),
    [
        ({"file": "a.jpg", "labels": []}, EMPTY_LABELS, "has no labels"),
        ({"file": "missing.jpg", "labels": ["dog"]}, MISSING_FILE, "missing.jpg not found"),
        ({"file": "a.jpg", "labels": ["wolf"]}, UNKNOWN_LABEL, r"\['wolf'\] are not in the class list"),
        ("{not json", MALFORMED_ROW, "not JSON"),
        ({"file": "a.jpg", "labels": "dog"}, MALFORMED_ROW, "must be a list of class names"),
    ],
)
def test_bad_row_is_an_error_or_skipped_and_counted(images_dir, tmp_path, row, reason, message):
    labels_file = _jsonl(tmp_path / "labels.jsonl", [{"file": "b.png", "labels": ["dog"]}, row])
    with pytest.raises(BadRowError, match=message) as error:
        from_label_file(images_dir, labels_file, class_names=["dog"])
    assert "labels.jsonl:2" in str(error.value) and "on_bad_row='skip'" in str(error.value)
    images = from_label_file(images_dir, labels_file, class_names=["dog"], on_bad_row="skip")
    assert images.skipped == {reason: 1}
    assert images.samples == ((str(images_dir / "b.png"), (0,)),)
    assert "skipped 1 rows" in images.summary()


def test_no_usable_row_is_always_an_error(images_dir, tmp_path):
    labels_file = _jsonl(tmp_path / "labels.jsonl", [{"file": "nope.jpg", "labels": ["dog"]}])
    with pytest.raises(ValueError, match="no usable images"):
        from_label_file(images_dir, labels_file, on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row='ignore' is not one of"):
        from_label_file(images_dir, labels_file, on_bad_row="ignore")


# -------------------------------------------------------------------------------------------------- class folders


def test_class_folders_give_one_label_per_image(tmp_path):
    root = tmp_path / "tree"
    _write_image(root / "n02" / "x.JPEG")
    _write_image(root / "n01" / "nested" / "y.png")
    _write_image(root / "n01" / "z.jpg")
    (root / "n01" / "README.txt").write_text("not an image")
    (root / "n03").mkdir()  # a class without images is still a class
    images = from_class_folders(root)
    assert images.class_names == ("n01", "n02", "n03")
    assert [(path.split("tree/")[1], labels) for path, labels in images.samples] == [
        ("n01/nested/y.png", (0,)),
        ("n01/z.jpg", (0,)),
        ("n02/x.JPEG", (1,)),
    ]


# ----------------------------------------------------------------------------------------------------- COCO / LVIS


def test_coco128_image_labels_are_the_set_of_non_crowd_categories(coco128):
    ann_file = coco128 / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    expected = defaultdict(set)
    names = {c["id"]: c["name"] for c in data["categories"]}
    for ann in data["annotations"]:
        if not ann["iscrowd"]:
            expected[ann["image_id"]].add(names[ann["category_id"]])
    unlabelled = [image for image in data["images"] if not expected[image["id"]]]
    assert len(unlabelled) == 2  # coco128 holds two images without annotations

    with pytest.raises(BadRowError, match=f"image {unlabelled[0]['id']}: .* has no labels"):
        from_coco(ann_file, coco128 / "images")
    images = from_coco(ann_file, coco128 / "images", on_bad_row="skip")
    assert images.skipped == {EMPTY_LABELS: 2} and len(images) == len(data["images"]) - 2
    assert images.class_names == tuple(names[i] for i in sorted(names))
    by_file = {image["file_name"]: image["id"] for image in data["images"]}
    for i, (path, _) in enumerate(images.samples):
        assert set(images.label_names(i)) == expected[by_file[path.rsplit("/", 1)[1]]]


def test_crowd_annotations_give_no_label(tmp_path):
    _write_image(tmp_path / "a.jpg")
    ann_file = tmp_path / "coco.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.jpg"}],
                "annotations": [
                    {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 1},
                    {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 0},
                ],
                "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
            }
        )
    )
    assert from_coco(ann_file, tmp_path).label_names(0) == ["dog"]


def test_lvis_style_json_resolves_images_from_coco_url(tmp_path):
    # LVIS v1 lists images by coco_url (no usable file_name) and has no iscrowd.
    _write_image(tmp_path / "coco" / "val2017" / "000000000001.jpg")
    _write_image(tmp_path / "coco" / "000000000002.jpg")
    ann_file = tmp_path / "lvis.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "coco_url": "http://images.cocodataset.org/val2017/000000000001.jpg"},
                    {"id": 2, "coco_url": "http://images.cocodataset.org/train2017/000000000002.jpg"},
                ],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 30},
                    {"id": 2, "image_id": 2, "category_id": 10},
                    {"id": 3, "image_id": 2, "category_id": 30},
                ],
                "categories": [{"id": 30, "name": "zebra"}, {"id": 10, "name": "aardvark"}],
            }
        )
    )
    images = from_coco(ann_file, tmp_path / "coco")
    assert images.class_names == ("aardvark", "zebra")
    assert images.samples == (
        (str(tmp_path / "coco" / "val2017" / "000000000001.jpg"), (1,)),
        (str(tmp_path / "coco" / "000000000002.jpg"), (0, 1)),
    )


# --------------------------------------------------------------------------------------------- decoding, dataset


@pytest.fixture()
def corrupt_set(images_dir, tmp_path):
    (images_dir / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    _write_image(images_dir / "big.jpg", size=(64, 64))
    (images_dir / "truncated.jpg").write_bytes((images_dir / "big.jpg").read_bytes()[:300])
    rows = [{"file": name, "labels": ["dog"]} for name in ("a.jpg", "garbage.jpg", "b.png", "truncated.jpg")]
    return from_label_file(images_dir, _jsonl(tmp_path / "labels.jsonl", rows))


def test_corrupt_image_raises_naming_the_file(corrupt_set):
    dataset = LabelledImageDataset(corrupt_set)
    sample = dataset[0]
    assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, 8, 12)
    assert sample.image[:, 0, 0].tolist() == pytest.approx([200, 30, 60], abs=3)
    assert sample.labels.tolist() == [0] and sample.index == 0
    with pytest.raises(ImageDecodeError, match=r"garbage\.jpg: cannot decode the image"):
        dataset[1]
    with pytest.raises(ImageDecodeError, match=r"truncated\.jpg: cannot decode"):
        dataset[3]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_verify_images_errors_or_skips_and_counts(corrupt_set, num_workers):
    with pytest.raises(BadRowError, match=r"garbage\.jpg: cannot decode"):
        verify_images(corrupt_set, num_workers=num_workers)
    verified = verify_images(corrupt_set, on_bad_row="skip", num_workers=num_workers)
    assert verified.skipped == {UNDECODABLE_IMAGE: 2}
    assert [path.rsplit("/", 1)[1] for path in verified.image_paths] == ["a.jpg", "b.png"]


def test_read_rgb_converts_modes_and_reports_missing_files(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 90, np.uint8), mode="L").save(grey)
    pixels = read_rgb(grey)
    assert pixels.shape == (5, 7, 3) and pixels.dtype == np.uint8 and (pixels == 90).all()
    assert pixels.flags.writeable
    with pytest.raises(FileNotFoundError, match="nothere.jpg: image file not found"):
        read_rgb(tmp_path / "nothere.jpg")
