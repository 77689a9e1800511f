"""A user's own detection data (issue 12): VOC XML in any layout and YOLO, read by detpretrain.data.sources, in the
three scripts and in python -m detpretrain.evaluate; raccoon (../shared/data/raccoon, labelImg's layout) end to end,
and small layouts built in tmp_path from its real photos. Runs are tiny: they check the wiring, not the AP."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

import finetune
import train_jigsaw
import train_predet
from detpretrain.data.detection import DatasetError
from detpretrain.data.image_lists import holdout_split
from detpretrain.data.labelled_images import UNLABELLED
from detpretrain.data.sources import DataFlags, load_detection_data, parse_class_names
from detpretrain.data.voc import read_voc_annotation
from detpretrain.data.yolo import label_path
from tests.conftest import REPO_ROOT, shared_path
from tests.test_detection_data import _voc_xml

NAMES = ["raccoon-1", "raccoon-10", "raccoon-100", "raccoon-101", "raccoon-102", "raccoon-103"]
FINETUNE_TINY = ["--backbone", "test_resnet", "--no-pretrained", "--device", "cpu", "--num-workers", "0", "--quiet"]
FINETUNE_TINY += ["--protocol-set", "precise_bn_iters=1", "--min-size", "96", "--max-size", "128", "--batch-size", "2"]
FINETUNE_TINY += ["--detector-set", "box_batch_size_per_image=32", "rpn_pre_nms_top_n_train=200"]
FINETUNE_TINY += ["rpn_post_nms_top_n_train=50", "rpn_pre_nms_top_n_test=100", "rpn_post_nms_top_n_test=50"]


@pytest.fixture(scope="session")
def raccoon():
    return shared_path("data", "raccoon")


def raccoon_flags(raccoon):
    return ["--train-images", str(raccoon / "images"), "--train-ann", str(raccoon / "annotations")]


@pytest.fixture
def flat_voc(tmp_path, raccoon):
    """Six raccoon photos with their XML files beside them (labelImg's default)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in NAMES:
        shutil.copy(raccoon / "images" / f"{name}.jpg", folder)
        shutil.copy(raccoon / "annotations" / f"{name}.xml", folder)
    return folder


def write_xml(folder, name, objects, size=(100, 80)):
    (folder / f"{name}.xml").write_text(_voc_xml(name, size, objects))


# ------------------------------------------------------------------------------------------------ flat VOC layouts
def test_flat_voc_split_files_ids_and_classes(flat_voc, tmp_path):
    (tmp_path / "train.txt").write_text("raccoon-1\nraccoon-10.jpg\n\nraccoon-100\n")
    (tmp_path / "val.txt").write_text("raccoon-101\nraccoon-103.jpg\n")
    flags = DataFlags(format="voc", train_images=flat_voc, train_split=tmp_path / "train.txt")
    train, val = load_detection_data(DataFlags(**{**vars(flags), "val_split": tmp_path / "val.txt"}), need_val=True)
    assert len(train) == 3 and len(val) == 2 and train.class_names == ["background", "raccoon"]
    # ids: the index in the sorted list of the folder's images, shared by train and val, the same on every load
    ordered = sorted(f"{n}.jpg" for n in NAMES)
    assert train.image_ids == [ordered.index(f"{n}.jpg") for n in NAMES[:3]]
    assert val.image_ids == [ordered.index("raccoon-101.jpg"), ordered.index("raccoon-103.jpg")]
    again, _ = load_detection_data(flags)
    assert again.image_ids == train.image_ids
    image, target = train[0]
    xml = read_voc_annotation(flat_voc / "raccoon-1.xml")
    assert target["image_name"] == "raccoon-1" and image.shape[1:] == (xml.height, xml.width)
    assert target["boxes"].tolist() == [list(xml.objects[0].box)]
    assert val.describe()["images_chosen"] == {"split_file": str(tmp_path / "val.txt")}


def test_val_fraction_is_a_seeded_disjoint_recorded_hold_out(flat_voc):
    flags = DataFlags(format="voc", train_images=flat_voc, val_fraction=0.34, split_seed=7)
    train, val = load_detection_data(flags, need_val=True)
    train2, val2 = load_detection_data(flags, need_val=True)
    assert val.image_ids == val2.image_ids and train.image_ids == train2.image_ids  # deterministic
    assert len(val) == 2 and len(train) == 4 and not set(train.image_ids) & set(val.image_ids)  # disjoint
    assert val.describe()["images_chosen"]["split_seed"] == 7 and len(val.describe()["images_chosen"]["held_out"]) == 2
    for n in (2, 10, 1000):
        for seed in (0, 1):
            a, b = holdout_split(n, fraction=0.2, seed=seed)
            assert (a, b) == holdout_split(n, fraction=0.2, seed=seed) and sorted(a + b) == list(range(n))
    assert holdout_split(1000, fraction=0.2, seed=0)[1] != holdout_split(1000, fraction=0.2, seed=1)[1]


def test_class_names_collected_sorted_or_given(flat_voc):
    write_xml(flat_voc, "raccoon-1", [("zebra", (1, 1, 50, 40), 0), ("aardvark", (5, 5, 20, 20), 1)])
    train, _ = load_detection_data(DataFlags(format="voc", train_images=flat_voc))
    assert train.class_names == ["background", "aardvark", "raccoon", "zebra"]
    given = DataFlags(format="voc", train_images=flat_voc, class_names="zebra,raccoon,aardvark")
    assert load_detection_data(given).train.class_names == ["background", "zebra", "raccoon", "aardvark"]
    with pytest.raises(DatasetError, match=r"raccoon-1\.xml: class 'zebra' is not one of the 1 classes.*--class-names"):
        load_detection_data(DataFlags(format="voc", train_images=flat_voc, class_names="raccoon"))
    assert parse_class_names("a, b,c") == ["a", "b", "c"]


def test_bad_voc_boxes_are_clipped_or_dropped_and_counted(flat_voc):
    write_xml(flat_voc, "raccoon-1", [("raccoon", (50, 40, 500, 30), 0), ("raccoon", (-20, 10, 60, 50), 0)])
    write_xml(flat_voc, "raccoon-10", [("raccoon", (200, 10, 300, 50), 0)])  # entirely right of a 100-px image
    train, _ = load_detection_data(DataFlags(format="voc", train_images=flat_voc))
    report = train.cleaning_report
    assert report["dropped_nonpositive_size"] == 1 and report["clipped_to_image"] == 1
    assert report["dropped_outside_image"] == 1 and report["images_without_annotations"] == 1
    assert "raccoon-1.xml" in train.cleaning_details["clipped_to_image"][0]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("xml", r"raccoon-1\.xml is malformed XML"),
        ("image", r"val\.txt:2: image 'raccoon-999' is not in .*photos"),
    ],
)
def test_unreadable_xml_and_missing_image_are_one_line_errors(flat_voc, tmp_path, damage, message):
    (flat_voc / "raccoon-1.xml").write_text("<annotation><object>" if damage == "xml" else _voc_xml("x", (9, 9), []))
    (tmp_path / "val.txt").write_text("raccoon-1\nraccoon-999\n" if damage == "image" else "raccoon-1\n")
    with pytest.raises(DatasetError, match=message) as error:
        load_detection_data(DataFlags(format="voc", train_images=flat_voc, val_split=tmp_path / "val.txt"))
    assert "\n" not in str(error.value)


def test_an_xml_without_its_image_names_the_file(flat_voc):
    (flat_voc / "raccoon-1.jpg").unlink()
    with pytest.raises(DatasetError, match=r"VOC annotation .*raccoon-1\.xml: image 'raccoon-1' is not in"):
        load_detection_data(DataFlags(format="voc", train_images=flat_voc))


# ------------------------------------------------------------------------------------------------------------ YOLO
@pytest.fixture
def yolo_root(tmp_path, raccoon):
    """ultralytics' layout: images/{train,val}, labels/{train,val}, from six raccoon photos; raccoon-103 has no
    label file (a background image)."""
    root = tmp_path / "yolo"
    for split, names in (("train", NAMES[:4]), ("val", NAMES[4:])):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for name in names:
            image = root / "images" / split / f"{name}.jpg"
            shutil.copy(raccoon / "images" / f"{name}.jpg", image)
            xml = read_voc_annotation(raccoon / "annotations" / f"{name}.xml")
            lines = []
            for obj in xml.objects:
                x1, y1, x2, y2 = obj.box
                w, h = xml.width, xml.height
                lines.append(f"0 {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}")
            if name != "raccoon-103":
                label_path(image).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("names", [["raccoon", "dog"], {0: "raccoon", 1: "dog"}])
def test_yolo_data_yaml_reads_as_ultralytics_writes_it(yolo_root, raccoon, names):
    (yolo_root / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": names})
    )
    train, val = load_detection_data(DataFlags(format="yolo", train_ann=yolo_root / "data.yaml"), need_val=True)
    assert train.class_names == ["background", "raccoon", "dog"] and len(train) == 4 and len(val) == 2
    _, target = train[0]
    expected = read_voc_annotation(raccoon / "annotations" / "raccoon-1.xml").objects[0].box
    assert target["boxes"][0].tolist() == pytest.approx(list(expected), abs=1e-3)
    assert target["labels"].tolist() == [1]
    assert val.cleaning_report["images_without_label_file"] == 1 and len(val.entry(1).boxes) == 0
    assert set(train.image_ids).isdisjoint(val.image_ids)  # one id space: the images under the dataset root


def test_yolo_image_folder_with_class_file_and_bad_lines(yolo_root, tmp_path):
    (tmp_path / "classes.txt").write_text("raccoon\n")
    flags = DataFlags(format="yolo", train_images=yolo_root / "images/train", class_names=tmp_path / "classes.txt")
    assert len(load_detection_data(flags).train) == 4
    labels = yolo_root / "labels/train/raccoon-1.txt"
    labels.write_text("0 0.5 0.5 0.2 0.2\n0 1.1 0.5 0.4 0.4\n0 0.5 0.5 -0.1 0.2\n")
    train, _ = load_detection_data(flags)
    assert train.cleaning_report["clipped_to_image"] == 1 and train.cleaning_report["dropped_nonpositive_size"] == 1
    labels.write_text("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"raccoon-1\.txt:2: class 3 is not one of the 1 classes.*--class-names"):
        load_detection_data(flags)
    labels.write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DatasetError, match=r"raccoon-1\.txt:1: '0 0\.5 0\.5 0\.2' is not 'class cx cy w h'"):
        load_detection_data(flags)


# ------------------------------------------------------------------------------------------------- scripts on raccoon
def test_finetune_on_raccoon_writes_eval_json_with_its_class(tmp_path, raccoon):
    flags = [*raccoon_flags(raccoon), "--train-split", str(raccoon / "train.txt")]
    flags += ["--val-split", str(raccoon / "test.txt")]
    args = finetune.get_args_parser().parse_args(
        [*FINETUNE_TINY, "--format", "voc", *flags, "--iters", "2", "--val-subset", "3", "--output-dir", str(tmp_path)]
    )
    result = json.loads(finetune.main(args).read_text())
    assert result["train"]["data"]["class_names"] == ["raccoon"] and result["model"]["num_classes"] == 2
    assert result["eval"]["metric"] == "detectron2 PASCAL VOC" and result["eval"]["images_evaluated"] == 3
    assert set(result["bbox"]) == {"AP", "AP50", "AP75"} and result["train"]["data"]["num_images"] == 160


def test_finetune_without_a_val_set_says_what_to_pass(tmp_path, raccoon):
    args = finetune.get_args_parser().parse_args(
        [*FINETUNE_TINY, "--format", "voc", *raccoon_flags(raccoon), "--output-dir", str(tmp_path)]
    )
    with pytest.raises(SystemExit, match=r"--val-split FILE .* or --val-fraction F"):
        finetune.main(args)


def test_finetune_on_yolo_is_scored_with_cocos_metric(tmp_path, yolo_root):
    (yolo_root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": ["r"]}))
    args = finetune.get_args_parser().parse_args(
        [*FINETUNE_TINY, "--format", "yolo", "--train-ann", str(yolo_root / "data.yaml"), "--iters", "1"]
        + ["--output-dir", str(tmp_path / "out")]
    )
    result = json.loads(finetune.main(args).read_text())
    assert result["eval"]["metric"] == "pycocotools COCOeval" and "APs" in result["bbox"]
    assert result["model"]["arch"] == "fasterrcnn" and result["train"]["data"]["format"] == "yolo"


def test_train_jigsaw_extracts_samples_from_raccoon(tmp_path, raccoon):
    (tmp_path / "few.txt").write_text("\n".join(NAMES) + "\n")
    args = train_jigsaw.get_args_parser().parse_args(
        ["--model", "test_resnet", "--device", "cpu", "--quiet", "--extract-only", "--extract-workers", "1"]
        + ["--format", "voc", *raccoon_flags(raccoon), "--train-split", str(tmp_path / "few.txt")]
        + ["--output-dir", str(tmp_path / "out")]
    )
    samples = train_jigsaw.main(args)
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["class_names"] == ["background", "raccoon"] and manifest["num_images"] == len(NAMES)
    assert manifest["cleaning_report"]["kept"] >= len(NAMES)


def test_train_jigsaw_on_raccoon_refuses_or_borrows_the_empty_tall_group(tmp_path, raccoon, capsys):
    """raccoon's training split gives no tall sample (width / height < 0.5): the paper's assembly cannot run, and
    --empty-group borrow draws the tall region from the square group, recorded in the card."""
    flags = ["--model", "test_resnet", "--device", "cpu", "--quiet", "--template", "tiny96", "--batch-size", "2"]
    flags += ["--iters", "2", "--warmup-iters", "1", "--num-workers", "0", "--format", "voc", *raccoon_flags(raccoon)]
    flags += ["--train-split", str(raccoon / "train.txt"), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"no samples in shape group T .*--empty-group borrow"):
        train_jigsaw.main(train_jigsaw.get_args_parser().parse_args(flags))
    export = train_jigsaw.main(train_jigsaw.get_args_parser().parse_args([*flags, "--empty-group", "borrow"]))
    card = (export / "README.md").read_text()
    assert "T: none, drawn from S (--empty-group borrow, not the paper's)" in card
    assert json.loads((tmp_path / "out" / "args.json").read_text())["empty_group"] == "borrow"


def test_train_predet_trains_two_steps_on_raccoon(tmp_path, raccoon):
    cv2 = pytest.importorskip("cv2")
    losses = [] if hasattr(cv2, "ximgproc") else ["--losses", "cls"]  # EdgeBoxes needs opencv-contrib
    (tmp_path / "few.txt").write_text("\n".join(NAMES) + "\n")
    args = train_predet.get_args_parser().parse_args(
        ["--model", "test_resnet", "--view-size", "96", "--device", "cpu", "--num-workers", "0", "--quiet"]
        + ["--proposal-workers", "1", "--fpn-channels", "32", "--predet-config", "box_head_dim=128"]
        + ["croi_negatives_per_image=64", "crpn_pre_nms_topk=300", "crpn_post_nms_topk=200", *losses]
        + ["--format", "voc", *raccoon_flags(raccoon), "--train-split", str(tmp_path / "few.txt")]
        + ["--iters", "2", "--warmup-iters", "1", "--batch-size", "4", "--output-dir", str(tmp_path / "out")]
    )
    export = train_predet.main(args)
    assert (export / "model.safetensors").is_file()
    assert "6 images, 1 classes from voc" in (export / "README.md").read_text()


def test_train_predet_skips_and_counts_coco_images_without_labels(coco128):
    args = train_predet.get_args_parser().parse_args(
        [
            "--train-images",
            str(coco128 / "images"),
            "--train-ann",
            str(coco128 / "annotations/instances_train2017.json"),
        ]
    )
    images = train_predet.read_labelled_images(args)
    assert images.skipped == {UNLABELLED: 2} and len(images) == 126
    assert "skipped 2 rows" in images.summary()


def test_bad_row_messages_name_the_flag_not_the_argument(tmp_path, coco128):
    shutil.copy(next((coco128 / "images").glob("*.jpg")), tmp_path / "a.jpg")
    (tmp_path / "labels.jsonl").write_text('{"file": "a.jpg", "labels": ["unicorn"]}\n')
    (tmp_path / "classes.txt").write_text("dog\n")
    args = train_predet.get_args_parser().parse_args(
        ["--train-images", str(tmp_path), "--train-ann", str(tmp_path / "labels.jsonl")]
        + ["--class-names", str(tmp_path / "classes.txt")]
    )
    with pytest.raises(SystemExit) as error:
        train_predet.read_labelled_images(args)
    assert "--skip-bad-rows" in str(error.value) and "on_bad_row" not in str(error.value)


# ------------------------------------------------------------------------------------------------------ evaluation
def evaluate(*argv):
    return subprocess.run(
        [sys.executable, "-m", "detpretrain.evaluate", *argv], capture_output=True, text=True, cwd=REPO_ROOT
    )


def test_evaluate_voc_results_on_raccoons_test_split(tmp_path, raccoon):
    names = (raccoon / "test.txt").read_text().split()
    results = []
    for k, name in enumerate(names):
        for obj in read_voc_annotation(raccoon / "annotations" / f"{name}.xml").objects:
            results.append({"image_id": name, "category": "raccoon", "box": list(obj.box), "score": 1.0 - k / 100})
    (tmp_path / "results.json").write_text(json.dumps(results))
    data = ["--val-images", str(raccoon / "images"), "--val-ann", str(raccoon / "annotations")]
    done = evaluate(
        "--format", "voc", *data, "--val-split", str(raccoon / "test.txt"), "--results", str(tmp_path / "results.json")
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["bbox"]["AP"] == pytest.approx(1.0) and summary["voc07"]["mAP"] == pytest.approx(1.0)
    results[0]["category"] = "dog"
    (tmp_path / "results.json").write_text(json.dumps(results))
    done = evaluate(
        "--format", "voc", *data, "--val-split", str(raccoon / "test.txt"), "--results", str(tmp_path / "results.json")
    )
    assert done.returncode == 1 and "category 'dog' is not in the ground truth" in done.stderr


def test_evaluate_yolo_results_with_cocos_metric(tmp_path, yolo_root):
    (yolo_root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": ["r"]}))
    _, val = load_detection_data(DataFlags(format="yolo", train_ann=yolo_root / "data.yaml"), need_val=True)
    results = [
        {"image_id": e.image_id, "category_id": 0, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.9}
        for e in val.entries()
        for x1, y1, x2, y2 in e.boxes.tolist()
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    done = evaluate(
        "--format", "yolo", "--val-ann", str(yolo_root / "data.yaml"), "--results", str(tmp_path / "results.json")
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bbox"]["AP"] == pytest.approx(1.0)
