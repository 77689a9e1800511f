"""python -m detpretrain.data inspect on real data (raccoon's flat VOC layout, coco128) and on bad annotations: the
counts, the classes, the COCO size buckets, the files cleaning touched, and a refusal as one line with exit code 1."""

import json
import shutil
import subprocess
import sys

from detpretrain.data.__main__ import main
from tests.conftest import REPO_ROOT, shared_path
from tests.test_detection_data import _voc_xml


def test_raccoon_train_and_test_splits(capsys):
    raccoon = shared_path("data", "raccoon")
    flags = ["--format", "voc", "--train-images", str(raccoon / "images"), "--train-ann", str(raccoon / "annotations")]
    flags += ["--train-split", str(raccoon / "train.txt"), "--val-split", str(raccoon / "test.txt"), "--json"]
    assert main(["inspect", *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    train, val = report["train"], report["val"]
    # SOURCE.txt: 200 images, 217 objects, 160 train / 40 test, all boxes inside their images.
    assert (train["num_images"], val["num_images"]) == (160, 40) and train["num_boxes"] + val["num_boxes"] == 217
    assert train["classes"] == {"raccoon": train["num_boxes"]} and sum(train["box_sizes"].values()) == 173
    assert all(entry["count"] == 0 for entry in train["cleaning"].values())


def test_coco128_text_report_names_the_images_without_boxes():
    coco128 = shared_path("data", "coco128")
    done = subprocess.run(
        [sys.executable, "-m", "detpretrain.data", "inspect", "--train-images", str(coco128 / "images")]
        + ["--train-ann", str(coco128 / "annotations/instances_train2017.json")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "train: 128 images, 929 boxes, 80 classes" in done.stdout
    assert "images without boxes: 2" in done.stdout and "000000000250.jpg" in done.stdout
    assert "crowd_excluded: 10" in done.stdout


def test_cleaning_is_listed_by_file_and_a_refusal_is_one_line(tmp_path, capsys):
    raccoon = shared_path("data", "raccoon")
    for k in range(3):
        shutil.copy(raccoon / "images" / f"raccoon-{k + 1}.jpg", tmp_path)
        boxes = [("raccoon", (-10, 5, 50, 40), 0), ("raccoon", (30, 5, 10, 40), 0)]  # clipped, inverted
        (tmp_path / f"raccoon-{k + 1}.xml").write_text(_voc_xml(f"raccoon-{k + 1}", (100, 80), boxes))
    flags = ["--format", "voc", "--train-images", str(tmp_path), "--max-listed", "2", "--json"]
    assert main(["inspect", *flags]) == 0
    cleaning = json.loads(capsys.readouterr().out)["train"]["cleaning"]
    assert cleaning["clipped_to_image"]["count"] == 3 and cleaning["clipped_to_image"]["more"] == 1
    assert "raccoon-1.xml: object 0" in cleaning["clipped_to_image"]["files"][0]
    assert cleaning["dropped_nonpositive_size"]["count"] == 3
    assert main(["inspect", *flags[:-1], "--class-names", "dog"]) == 1
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("refused (loading stops here): VOC annotation ")
    assert "class 'raccoon' is not one of the 1 classes" in out
