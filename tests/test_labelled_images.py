"""Image-level multi-label data for PreDet (predet.txt §3.1, §4.1): the three readers, the array-backed index, the
bad-row policy, the image file checks (one process and two gloo ranks), decoding."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detpretrain.data import labelled_images
from detpretrain.data.labelled_images import (
    EMPTY_LABELS,
    MALFORMED_ROW,
    MISSING_FILE,
    STATUS_MISSING_FILE,
    STATUS_OK,
    STATUS_UNDECODABLE_IMAGE,
    UNDECODABLE_IMAGE,
    UNKNOWN_LABEL,
    BadRowError,
    ImageDecodeError,
    LabelledImageDataset,
    LabelledImages,
    drop_bad_rows,
    from_class_folders,
    from_coco,
    from_label_file,
    image_status,
    read_labelled_images,
    read_rgb,
    verify_images,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def rows_of(images: LabelledImages) -> list[tuple[str, list[int]]]:
    """Every row as (relative path, label list): what the index holds, in plain Python for comparisons."""
    return [(images.relative_path(i), images.labels(i).tolist()) for i in range(len(images))]


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
    assert images.class_names == ("cat", "dog", "zebra")  # sorted, though "dog" came first
    assert images.root == str(images_dir)
    assert rows_of(images) == [("a.jpg", [0, 1]), ("sub/c.jpg", [2])]
    assert images.path(1) == str(images_dir / "sub/c.jpg")
    assert images.labels(0).dtype == np.int64
    assert images.label_names(0) == ["cat", "dog"]
    assert images.skipped == {}
    with pytest.raises(IndexError, match=r"row 2 is outside \[0, 2\)"):
        images.path(2)
    with pytest.raises(IndexError):
        images.labels(-1)


def test_csv_reads_the_documented_format(images_dir, tmp_path):
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text('file,labels\na.jpg, dog ;cat\n"with,comma.jpg",cat\n\nb.png,bird\n')
    images = from_label_file(images_dir, labels_file, class_names=["bird", "cat", "dog", "unused"])
    assert images.class_names == ("bird", "cat", "dog", "unused")
    assert rows_of(images) == [("a.jpg", [1, 2]), ("with,comma.jpg", [1]), ("b.png", [0])]
    assert images.path(1) == str(images_dir / "with,comma.jpg")


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
    assert images.class_names == ("dog", "cat") and images.labels(0).tolist() == [1]


def test_absolute_paths_have_no_root_and_a_label_file_is_not_checked_against_the_files(images_dir, tmp_path):
    labels_file = _jsonl(
        tmp_path / "labels.jsonl",
        [{"file": str(images_dir / "a.jpg"), "labels": ["dog"]}, {"file": "/elsewhere/x.jpg", "labels": ["dog"]}],
    )
    images = from_label_file(images_dir, labels_file)
    assert images.root == ""
    assert [images.path(i) for i in range(2)] == [str(images_dir / "a.jpg"), "/elsewhere/x.jpg"]


@pytest.mark.parametrize(
    ("row", "reason", "message"),
    [
        ({"file": "a.jpg", "labels": []}, EMPTY_LABELS, "has no labels"),
        ({"file": "a.jpg", "labels": ["wolf"]}, UNKNOWN_LABEL, r"\['wolf'\] are not in the class list"),
        ("{not json", MALFORMED_ROW, "not JSON"),
        ({"file": "a.jpg", "labels": "dog"}, MALFORMED_ROW, "must be a list of class names"),
        ({"file": "a.jpg", "labels": ["dog", 3]}, MALFORMED_ROW, "must be a list of class names"),
        ({"file": "", "labels": ["dog"]}, MALFORMED_ROW, '"file" must be a non-empty string'),
        ([1, 2], MALFORMED_ROW, "expected an object"),
    ],
)
def test_bad_row_is_an_error_or_skipped_and_counted(images_dir, tmp_path, row, reason, message):
    labels_file = _jsonl(tmp_path / "labels.jsonl", [{"file": "b.png", "labels": ["dog"]}, row])
    with pytest.raises(BadRowError, match=message) as error:
        from_label_file(images_dir, labels_file, class_names=["dog"])
    assert "labels.jsonl:2" in str(error.value) and "on_bad_row='skip'" in str(error.value)
    images = from_label_file(images_dir, labels_file, class_names=["dog"], on_bad_row="skip")
    assert images.skipped == {reason: 1}
    assert rows_of(images) == [("b.png", [0])]
    assert "skipped 1 rows" in images.summary()


def test_chunked_parsing_keeps_line_numbers_and_rows(images_dir, tmp_path, monkeypatch):
    # Chunks of 3 lines: blank lines, a bad line and a line holding two JSON values force the line-by-line
    # fallback in some chunks and not in others; rows and reported line numbers must not depend on the chunking.
    lines = [
        {"file": "r1.jpg", "labels": ["b"]},
        "",
        {"file": "r3.jpg", "labels": ["a", "b"]},
        {"file": "r4.jpg", "labels": ["c"]},
        '{"file": "r5.jpg", "labels": ["a"]}, {"file": "r5b.jpg", "labels": ["a"]}',
        {"file": "r6.jpg", "labels": ["c", "a"]},
        {"file": "r7.jpg", "labels": ["b"]},
        "   ",
        "{broken",
        {"file": "r10.jpg", "labels": ["a"]},
    ]
    labels_file = _jsonl(tmp_path / "labels.jsonl", lines)
    whole = from_label_file(images_dir, labels_file, on_bad_row="skip")
    monkeypatch.setattr(labelled_images, "_PARSE_CHUNK_ROWS", 3)
    monkeypatch.setattr(labelled_images, "_RELABEL_BLOCK_ROWS", 2)  # classes b, a, c in order of appearance
    chunked = from_label_file(images_dir, labels_file, on_bad_row="skip")
    expected = [("r1.jpg", [1]), ("r3.jpg", [0, 1]), ("r4.jpg", [2]), ("r6.jpg", [0, 2]), ("r7.jpg", [1])]
    expected.append(("r10.jpg", [0]))
    assert rows_of(whole) == rows_of(chunked) == expected
    assert whole.skipped == chunked.skipped == {MALFORMED_ROW: 2}
    with pytest.raises(BadRowError, match=r"labels\.jsonl:5: not JSON"):
        from_label_file(images_dir, labels_file)
    _jsonl(labels_file, lines[:4] + lines[5:])  # without the two-value line, the broken one is line 8
    with pytest.raises(BadRowError, match=r"labels\.jsonl:8: not JSON"):
        from_label_file(images_dir, labels_file)

    csv_file = tmp_path / "labels.csv"
    csv_file.write_text('file,labels\nr2.jpg,a\n\n\n\nr6.jpg\n"r7\nnewline.jpg",b;a\nr8.jpg,a\n')
    images = from_label_file(images_dir, csv_file, on_bad_row="skip")
    assert rows_of(images) == [("r2.jpg", [0]), ("r7\nnewline.jpg", [0, 1]), ("r8.jpg", [0])]
    with pytest.raises(BadRowError, match=r"labels\.csv:6: expected 2 columns"):
        from_label_file(images_dir, csv_file)


def test_no_usable_row_is_always_an_error(images_dir, tmp_path):
    labels_file = _jsonl(tmp_path / "labels.jsonl", [{"file": "a.jpg", "labels": []}])
    with pytest.raises(ValueError, match=r"no usable images \(skipped rows by reason: \{'empty label set': 1\}"):
        from_label_file(images_dir, labels_file, on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row='ignore' is not one of"):
        from_label_file(images_dir, labels_file, on_bad_row="ignore")


def test_a_label_file_that_is_not_utf8_is_a_clear_error(images_dir, tmp_path):
    labels_file = tmp_path / "labels.jsonl"
    labels_file.write_bytes(b'{"file": "a.jpg", "labels": ["caf\xe9"]}\n')
    with pytest.raises(ValueError, match=r"labels\.jsonl: not UTF-8 text .*save the label file as UTF-8"):
        from_label_file(images_dir, labels_file)


# ------------------------------------------------------------------------------------------------- the index


def imagenet_like_rows(num_rows: int, *, seed: int = 0) -> tuple[list[str], list[str], list[list[str]]]:
    """(class names, relative paths, label names per row) like ImageNet's: "n01440764/n01440764_10026.JPEG",
    1000 synsets, the folder's class first and up to two more labels."""
    rng = np.random.default_rng(seed)
    synsets = sorted({f"n{n:08d}" for n in rng.integers(1_000_000, 16_000_000, 1000)})
    folder = rng.integers(0, len(synsets), num_rows)
    extra = rng.integers(0, len(synsets), (num_rows, 2))
    count = rng.integers(1, 4, num_rows)
    number = rng.integers(1, 100_000, num_rows)
    paths = [f"{synsets[c]}/{synsets[c]}_{n}.JPEG" for c, n in zip(folder.tolist(), number.tolist(), strict=True)]
    labels = [
        [synsets[c], *(synsets[e] for e in more[: k - 1])] for c, more, k in zip(folder, extra, count, strict=True)
    ]
    return synsets, paths, labels


def test_a_100k_row_index_is_compact_and_round_trips(tmp_path):
    synsets, paths, labels = imagenet_like_rows(100_000)
    labels_file = tmp_path / "labels.jsonl"
    rows = zip(paths, labels, strict=True)
    labels_file.write_text("".join(json.dumps({"file": path, "labels": names}) + "\n" for path, names in rows))
    images = from_label_file(tmp_path, labels_file)

    n = len(images)
    assert n == 100_000 and images.class_names == tuple(synsets)
    assert images.path_bytes.dtype == np.uint8 and images.path_offsets.dtype == np.int64
    assert images.label_values.dtype == np.int16  # 1000 classes fit
    assert images.label_offsets.dtype == np.int64
    assert images.path_offsets.shape == images.label_offsets.shape == (n + 1,)
    # ~30 path bytes + 16 offset bytes + ~2 labels x 2 bytes: under the 64 bytes per row.
    per_row = images.nbytes / n
    assert per_row < 64, per_row
    assert images.nbytes == sum(a.nbytes for a in (images.path_bytes, images.path_offsets)) + sum(
        a.nbytes for a in (images.label_values, images.label_offsets)
    )

    index = {name: i for i, name in enumerate(synsets)}
    expected = [(p, sorted({index[name] for name in ls})) for p, ls in zip(paths, labels, strict=True)]
    assert rows_of(images) == expected
    assert images.path(7) == os.path.join(str(tmp_path), paths[7])

    keep = np.arange(n) % 3 != 1
    kept = images.select(keep, reasons={MISSING_FILE: int((~keep).sum())})
    assert rows_of(kept) == [row for row, k in zip(expected, keep, strict=True) if k]
    assert kept.skipped == {MISSING_FILE: 33_333}
    assert kept.select(np.ones(len(kept), bool), reasons={MISSING_FILE: 2, EMPTY_LABELS: 0}).skipped == {
        MISSING_FILE: 33_335
    }
    with pytest.raises(ValueError, match=r"keep must be a \(100000,\) bool array"):
        images.select(np.ones(n, np.uint8), reasons={})

    # Pickled (a broadcast, a spawned worker): the arrays and a few hundred bytes, no per-row objects.
    blob = pickle.dumps(kept)
    assert len(blob) < kept.nbytes + 20_000
    again = pickle.loads(blob)
    assert rows_of(again) == rows_of(kept) and again.class_names == kept.class_names
    assert (again.root, again.skipped, again.source) == (kept.root, kept.skipped, kept.source)


def test_label_dtype_widens_for_many_classes(images_dir, tmp_path):
    names = [f"c{i}" for i in range(40_000)]
    labels_file = _jsonl(tmp_path / "labels.jsonl", [{"file": "a.jpg", "labels": ["c39999", "c0"]}])
    images = from_label_file(images_dir, labels_file, class_names=names)
    assert images.label_values.dtype == np.int32 and images.labels(0).tolist() == [0, 39_999]


def test_inconsistent_arrays_are_rejected():
    good = dict(
        root="",
        path_bytes=np.frombuffer(b"ab", np.uint8),
        path_offsets=np.array([0, 1, 2]),
        label_values=np.array([0, 1], np.int16),
        label_offsets=np.array([0, 1, 2]),
        class_names=("x", "y"),
    )
    assert len(LabelledImages(**good)) == 2
    with pytest.raises(ValueError, match=r"path_offsets must run from 0 to 2, got 0\.\.3"):
        LabelledImages(**{**good, "path_offsets": np.array([0, 1, 3])})
    with pytest.raises(ValueError, match="2 paths but 1 label rows"):
        LabelledImages(**{**good, "label_values": np.array([0], np.int16), "label_offsets": np.array([0, 1])})
    with pytest.raises(ValueError, match="label values must be a 1-d int16 or int32 array, got int64"):
        LabelledImages(**{**good, "label_values": np.array([0, 1], np.int64)})


# -------------------------------------------------------------------------------------------------- class folders


def test_class_folders_give_one_label_per_image(tmp_path):
    root = tmp_path / "tree"
    _write_image(root / "n02" / "x.JPEG")
    _write_image(root / "n01" / "nested" / "y.png")
    _write_image(root / "n01" / "z.jpg")
    _write_image(root / "n01" / "café.jpg")  # UTF-8 names: byte offsets differ from character counts
    os.close(os.open(os.fsencode(root / "n02") + b"/\xff-latin1.jpg", os.O_CREAT | os.O_WRONLY))  # not UTF-8
    (root / "n01" / "README.txt").write_text("not an image")
    (root / "n03").mkdir()  # a class without images is still a class
    (root / ".cache").mkdir()  # hidden: not a class
    images = from_class_folders(root)
    assert images.class_names == ("n01", "n02", "n03")
    assert images.root == str(root)
    assert rows_of(images) == [
        ("n01/café.jpg", [0]),
        ("n01/nested/y.png", [0]),
        ("n01/z.jpg", [0]),
        ("n02/x.JPEG", [1]),
        ("n02/\udcff-latin1.jpg", [1]),
    ]
    assert all(os.path.isfile(images.path(i)) for i in range(len(images)))  # each name opens the file it came from


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
    for i in range(len(images)):
        assert set(images.label_names(i)) == expected[by_file[images.relative_path(i)]]
        assert images.path(i) == str(coco128 / "images" / images.relative_path(i))


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
    # LVIS v1 lists images by coco_url (no usable file_name) and has no iscrowd. The split folder is used when the
    # images folder has it (val2017 here), else the bare name.
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
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
    assert rows_of(images) == [("val2017/000000000001.jpg", [1]), ("000000000002.jpg", [0, 1])]
    assert images.path(0) == str(tmp_path / "coco" / "val2017" / "000000000001.jpg")


def test_read_labelled_images_picks_the_reader_by_the_annotation_file(images_dir, tmp_path):
    labels_file = _jsonl(tmp_path / "labels.jsonl", [{"file": "a.jpg", "labels": ["dog"]}, "{bad"])
    images = read_labelled_images(images_dir, labels_file, class_names=["cat", "dog"], on_bad_row="skip")
    assert rows_of(images) == [("a.jpg", [1])] and images.skipped == {MALFORMED_ROW: 1}
    ann_file = tmp_path / "coco.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "b.png"}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 5}],
                "categories": [{"id": 5, "name": "bird"}],
            }
        )
    )
    assert rows_of(read_labelled_images(images_dir, ann_file)) == [("b.png", [0])]
    assert read_labelled_images(images_dir).class_names == ("sub",)  # a class-folder tree: one folder, one class
    with pytest.raises(ValueError, match="a class list applies to .jsonl/.csv label files only"):
        read_labelled_images(images_dir, ann_file, class_names=["bird"])
    with pytest.raises(ValueError, match=r"labels\.txt: a label file ends in .jsonl or .csv"):
        read_labelled_images(images_dir, tmp_path / "labels.txt")


# ------------------------------------------------------------------------------------------- image file checks


@pytest.fixture()
def damaged_coco128(tmp_path, coco128):
    """Six rows over copies of coco128 photos: good, missing, truncated JPEG, good, a text file, good."""
    photos = sorted((coco128 / "images").glob("*.jpg"))[:4]
    root = tmp_path / "photos"
    root.mkdir()
    for photo in photos[:3]:
        shutil.copy(photo, root / photo.name)
    (root / "truncated.jpg").write_bytes(photos[3].read_bytes()[: photos[3].stat().st_size // 2])
    (root / "notes.jpg").write_text("this is not an image")
    files = [photos[0].name, "gone.jpg", "truncated.jpg", photos[1].name, "notes.jpg", photos[2].name]
    labels_file = _jsonl(tmp_path / "labels.jsonl", [{"file": f, "labels": ["dog"]} for f in files])
    return from_label_file(root, labels_file)


GOOD, MISSING, BROKEN = STATUS_OK, STATUS_MISSING_FILE, STATUS_UNDECODABLE_IMAGE


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_status_finds_missing_truncated_and_non_image_files(damaged_coco128, num_workers):
    exists = image_status(damaged_coco128, decode=False, num_workers=num_workers)
    assert exists.dtype == np.uint8 and exists.tolist() == [GOOD, MISSING, GOOD, GOOD, GOOD, GOOD]
    decoded = image_status(damaged_coco128, decode=True, num_workers=num_workers, chunk_rows=4)
    assert decoded.tolist() == [GOOD, MISSING, BROKEN, GOOD, BROKEN, GOOD]


def test_drop_bad_rows_errors_on_the_first_bad_row_or_skips_and_counts(damaged_coco128):
    status = image_status(damaged_coco128, decode=True)
    with pytest.raises(BadRowError, match=r"row 1: .*gone\.jpg: image file not found \(missing file\); check"):
        drop_bad_rows(damaged_coco128, status, on_bad_row="error")
    broken_first = status.copy()
    broken_first[1] = STATUS_OK
    with pytest.raises(BadRowError, match=r"row 2: .*truncated\.jpg: cannot decode the image \(OSError: image file"):
        drop_bad_rows(damaged_coco128, broken_first, on_bad_row="error")

    kept = drop_bad_rows(damaged_coco128, status, on_bad_row="skip")
    assert kept.skipped == {MISSING_FILE: 1, UNDECODABLE_IMAGE: 2}
    assert [kept.relative_path(i) for i in range(len(kept))] == [damaged_coco128.relative_path(i) for i in (0, 3, 5)]
    assert drop_bad_rows(damaged_coco128, np.zeros(6, np.uint8), on_bad_row="error") is damaged_coco128

    with pytest.raises(ValueError, match=r"no usable images, every image file is bad"):
        drop_bad_rows(damaged_coco128, np.full(6, STATUS_MISSING_FILE, np.uint8), on_bad_row="skip")
    with pytest.raises(ValueError, match=r"status holds unknown codes \[7\]"):
        drop_bad_rows(damaged_coco128, np.array([0, 7, 0, 0, 0, 0], np.uint8), on_bad_row="skip")
    with pytest.raises(ValueError, match=r"status must be image_status's \(6,\) uint8 array"):
        drop_bad_rows(damaged_coco128, status[:5], on_bad_row="skip")


TWO_RANKS = """
import json, sys
import numpy as np
from detpretrain import engine
from detpretrain.data import labelled_images

dist_info = engine.setup_distributed("cpu")
images = labelled_images.from_label_file(sys.argv[1], sys.argv[2])
checked = []
check_file = labelled_images._file_status


def recording(path, *, decode):
    checked.append(path)
    return check_file(path, decode=decode)


labelled_images._file_status = recording  # num_workers=0: every check runs in this process, where we record it
status = labelled_images.image_status(images, decode=True, dist_info=dist_info, chunk_rows=2)
out = sys.argv[3]
np.save(f"{out}/status-{dist_info.rank}.npy", status)
with open(f"{out}/checked-{dist_info.rank}.json", "w") as f:
    json.dump(checked, f)
engine.cleanup_distributed()
"""


def test_image_status_on_two_gloo_ranks_splits_the_work_and_equals_one_process(tmp_path, damaged_coco128):
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    command += [damaged_coco128.root, str(tmp_path / "labels.jsonl"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]

    one_process = image_status(damaged_coco128, decode=True)
    for rank in (0, 1):
        assert np.load(tmp_path / f"status-{rank}.npy").tolist() == one_process.tolist()
    paths = [damaged_coco128.path(i) for i in range(6)]
    # Chunks of 2 rows dealt round-robin: rank 0 checks rows 0, 1, 4, 5 and rank 1 rows 2, 3, each once.
    assert json.loads((tmp_path / "checked-0.json").read_text()) == [paths[i] for i in (0, 1, 4, 5)]
    assert json.loads((tmp_path / "checked-1.json").read_text()) == [paths[i] for i in (2, 3)]


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
    assert sample.labels.dtype == torch.int64 and sample.labels.tolist() == [0] and sample.index == 0
    with pytest.raises(ImageDecodeError, match=r"garbage\.jpg: cannot decode the image"):
        dataset[1]
    with pytest.raises(ImageDecodeError, match=r"truncated\.jpg: cannot decode"):
        dataset[3]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_verify_images_errors_or_skips_and_counts(corrupt_set, num_workers):
    with pytest.raises(BadRowError, match=r"row 1: .*garbage\.jpg: cannot decode"):
        verify_images(corrupt_set, num_workers=num_workers)
    verified = verify_images(corrupt_set, on_bad_row="skip", num_workers=num_workers)
    assert verified.skipped == {UNDECODABLE_IMAGE: 2}
    assert rows_of(verified) == [("a.jpg", [0]), ("b.png", [0])]


def test_read_rgb_converts_modes_and_reports_missing_files(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 90, np.uint8), mode="L").save(grey)
    pixels = read_rgb(grey)
    assert pixels.shape == (5, 7, 3) and pixels.dtype == np.uint8 and (pixels == 90).all()
    assert pixels.flags.writeable
    with pytest.raises(FileNotFoundError, match="nothere.jpg: image file not found"):
        read_rgb(tmp_path / "nothere.jpg")
