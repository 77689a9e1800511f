"""finetune.py end to end on real photos (coco128, and VOC and LVIS layouts built from them): every arch trains and is
scored with its official metric, resume is exact, --eval-only reproduces the numbers, two gloo processes run, a
train_jigsaw.py export fine-tunes on the embedded default over two seeds, and bad input stops with one line.

Runs are tiny (timm's test_resnet, 96-128 px, 1-3 steps, 2-3 evaluation images, few ROIs via --detector-set):
they check the wiring, not the AP.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import finetune
import train_jigsaw
from detpretrain import engine
from detpretrain.evaluation import COCO_STAT_NAMES
from tests.conftest import REPO_ROOT
from tests.test_detection_data import _voc_xml

TINY = ["--backbone", "test_resnet", "--device", "cpu", "--num-workers", "0", "--quiet", "--log-every", "1"]
TINY += ["--protocol-set", "precise_bn_iters=1"]  # detectron2's 200 passes before each evaluation: 1 here
TINY += ["--min-size", "96", "--max-size", "128", "--batch-size", "2", "--detections-per-img", "10"]
# torchvision's defaults sample 512 ROIs per image and keep 1000 proposals at test time: most of a step at 96 px.
CHEAP_RCNN = ["--detector-set", "box_batch_size_per_image=32", "rpn_pre_nms_top_n_train=200"]
CHEAP_RCNN += ["rpn_post_nms_top_n_train=50", "rpn_pre_nms_top_n_test=100", "rpn_post_nms_top_n_test=50"]
CHEAP = {"retinanet": ["--detector-set", "topk_candidates=100"]}
SCRATCH = ["--no-pretrained"]


def run(output_dir, *extra: str):
    args = finetune.get_args_parser().parse_args([*TINY, "--output-dir", str(output_dir), *extra])
    return finetune.main(args)


def coco128_flags(coco128, *, train_subset: int = 8, val_subset: int = 2) -> list[str]:
    images, ann = str(coco128 / "images"), str(coco128 / "annotations/instances_train2017.json")
    return ["--train-images", images, "--train-ann", ann, "--val-images", images, "--val-ann", ann] + [
        *("--train-subset", str(train_subset), "--val-subset", str(val_subset))
    ]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_eval_json(path, *, iou_types=("bbox",), keys=COCO_STAT_NAMES) -> dict:
    """eval.json has DESIGN.md's shape (fractions in [0, 1], -1 without ground truth) and the run's record."""
    result = json.loads(path.read_text())
    for iou_type in iou_types:
        assert set(keys) <= set(result[iou_type]), result[iou_type]
        assert all(v == -1 or 0 <= v <= 1 for v in result[iou_type].values())
    assert ("segm" in result) == ("segm" in iou_types)
    assert {"model", "schedule", "train", "eval", "seed", "iter", "versions"} <= set(result)
    assert (
        result["model"]["protocol"]["train_min_sizes"] == [96] and result["model"]["protocol"]["test_max_size"] == 128
    )
    return result


# ------------------------------------------------------------------------------------- COCO: every arch, resume


@pytest.fixture(scope="module")
def reference(tmp_path_factory, coco128):
    """Faster R-CNN, 3 steps, a checkpoint every 2, evaluated at step 2 and at the end: the run others compare to."""
    flags = [*coco128_flags(coco128), *SCRATCH, *CHEAP_RCNN, "--arch", "fasterrcnn", "--iters", "3"]
    flags += ["--save-every", "2", "--eval-every", "2"]
    output_dir = tmp_path_factory.mktemp("reference")
    return flags, run(output_dir, *flags)


def test_reference_run_writes_eval_json_history_curve_and_log(reference):
    _, eval_path = reference
    result = check_eval_json(eval_path)
    output_dir = eval_path.parent
    assert result["iter"] == 3 and result["model"]["arch"] == "fasterrcnn" and result["eval"]["images_evaluated"] == 2
    assert result["eval"]["score_thresh"] == 0.05  # COCO: detectron2's and torchvision's test threshold
    assert result["model"]["loaded"]["backbone"]["from"] == "none"
    assert result["model"]["detector"]["torchvision_kwargs"]["box_batch_size_per_image"] == 32
    # The 1x schedule at batch 2 (720k steps, drops at 480k and 640k) compressed into 3 steps: drops at 2 and 3.
    assert result["schedule"]["name"] == "1x" and result["schedule"]["milestones"] == [2, 3]
    assert result["schedule"]["compressed_from"]["total_iters"] == 720_000
    assert result["train"]["data"]["subset"]["size"] == 8 and result["train"]["global_batch_size"] == 2
    assert result["train"]["transform"][0]["name"] == "RandomCrop"  # predet: crop, resize, flip

    history = read_jsonl(output_dir / finetune.HISTORY_NAME)
    assert [row["iter"] for row in history] == [2, 3]
    assert history[-1]["bbox"] == result["bbox"]
    with Image.open(output_dir / finetune.CURVE_NAME) as curve:
        assert curve.size == (600, 400)
    rows = read_jsonl(output_dir / "log.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and "loss_classifier" in r and "loss_objectness" in r for r in rows)
    assert json.loads((output_dir / "args.json").read_text())["eval_every"] == 2


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_gives_the_same_weights_log_and_numbers(reference, tmp_path, monkeypatch):
    """Killed during step 2 (after the step-2 checkpoint and evaluation), resumed with --resume auto."""
    flags, reference_eval = reference
    real_train_step = engine.train_step

    def crash_at_step_2(**kwargs):
        if kwargs["step"] == 2:
            raise Crash("simulated kill")
        return real_train_step(**kwargs)

    monkeypatch.setattr(engine, "train_step", crash_at_step_2)
    with pytest.raises(Crash):
        run(tmp_path, *flags)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 2
    monkeypatch.setattr(engine, "train_step", real_train_step)
    resumed_eval = run(tmp_path, *flags, "--resume", "auto")

    a = torch.load(reference_eval.parent / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(reference_eval.parent / "log.jsonl") != []
    losses = [[r["loss"] for r in read_jsonl(d / "log.jsonl")] for d in (reference_eval.parent, tmp_path)]
    assert losses[0] == losses[1]
    assert [r["iter"] for r in read_jsonl(tmp_path / finetune.HISTORY_NAME)] == [2, 3]
    assert json.loads(resumed_eval.read_text())["bbox"] == json.loads(reference_eval.read_text())["bbox"]


def test_eval_only_scores_a_checkpoint_as_training_did(reference, tmp_path):
    flags, reference_eval = reference
    checkpoint = reference_eval.parent / "checkpoint.pth"
    result = json.loads(run(tmp_path, *flags, "--eval-only", "--resume", str(checkpoint)).read_text())
    assert result["bbox"] == json.loads(reference_eval.read_text())["bbox"]
    assert result["iter"] == 3 and result["model"]["loaded"]["checkpoint"] == str(checkpoint)
    assert result["model"]["loaded"]["trained_from"]["loaded"]["backbone"]["from"] == "none"
    assert not (tmp_path / finetune.HISTORY_NAME).exists() and not (tmp_path / "checkpoint.pth").exists()
    with pytest.raises(SystemExit, match="holds another detector"):  # a 4conv1fc box head has other weights
        run(tmp_path, *flags, "--protocol-set", "box_head=4conv1fc", "--eval-only", "--resume", str(checkpoint))


@pytest.mark.parametrize("arch", ["fasterrcnn_c4", "maskrcnn", "retinanet"])
def test_every_other_arch_trains_and_is_scored(tmp_path, coco128, arch):
    cheap = CHEAP.get(arch, CHEAP_RCNN)
    eval_path = run(tmp_path, *coco128_flags(coco128), *SCRATCH, *cheap, "--arch", arch, "--iters", "1")
    result = check_eval_json(eval_path, iou_types=("bbox", "segm") if arch == "maskrcnn" else ("bbox",))
    assert result["model"]["arch"] == arch
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(tmp_path / "log.jsonl"))
    if arch == "maskrcnn":
        rows = read_jsonl(tmp_path / "log.jsonl")
        assert "loss_mask" in rows[0] and result["train"]["data"]["with_masks"]


# ------------------------------------------------------------------------------------------ two gloo processes


def test_two_gloo_processes_train_and_evaluate_every_image(tmp_path, coco128):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += [str(REPO_ROOT / "finetune.py"), *TINY, *coco128_flags(coco128, val_subset=3), *SCRATCH, *CHEAP_RCNN]
    cmd += ["--arch", "fasterrcnn", "--iters", "2", "--batch-size", "1", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = check_eval_json(out / "eval.json")
    # 3 images over 2 ranks (2 + 1), gathered before scoring
    assert evaluation["eval"]["images_evaluated"] == 3
    assert evaluation["train"]["world_size"] == 2 and evaluation["train"]["global_batch_size"] == 2
    assert "each of 2 processes" in evaluation["model"]["batch_norm"]  # no SyncBN on CPU, and the record says so
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [0, 1]


# -------------------------------------------------------------------------------------------------- VOC, LVIS

VOC_NAMES = {"airplane": "aeroplane", "motorcycle": "motorbike", "dining table": "diningtable"}
VOC_NAMES |= {"potted plant": "pottedplant", "couch": "sofa", "tv": "tvmonitor"}


@pytest.fixture
def voc_root(tmp_path, coco128):
    """A VOCdevkit/VOC2007 of 6 coco128 photos (4 trainval, 2 test) with their COCO boxes of the 20 VOC classes."""
    from detpretrain.data.voc import VOC_CLASSES

    data = json.loads((coco128 / "annotations/instances_train2017.json").read_text())
    names = {c["id"]: VOC_NAMES.get(c["name"], c["name"]) for c in data["categories"]}
    objects = {}
    for ann in data["annotations"]:
        if names[ann["category_id"]] in VOC_CLASSES and not ann["iscrowd"]:
            x, y, w, h = ann["bbox"]
            box = (int(x) + 1, int(y) + 1, max(int(x) + 1, round(x + w)), max(int(y) + 1, round(y + h)))
            objects.setdefault(ann["image_id"], []).append((names[ann["category_id"]], box, 0))
    images = [image for image in data["images"] if image["id"] in objects][:6]
    year_dir = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (year_dir / folder).mkdir(parents=True)
    for k, image in enumerate(images):
        name = f"{k + 1:06d}"
        shutil.copy(coco128 / "images" / image["file_name"], year_dir / "JPEGImages" / f"{name}.jpg")
        xml = _voc_xml(name, (image["width"], image["height"]), objects[image["id"]])
        (year_dir / "Annotations" / f"{name}.xml").write_text(xml)
    (year_dir / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n000003\n000004\n")
    (year_dir / "ImageSets/Main/test.txt").write_text("000005\n000006\n")
    return tmp_path / "VOCdevkit"


def test_voc_layout_trains_and_reports_the_voc_metric(tmp_path, voc_root):
    eval_path = run(
        tmp_path / "out",
        *["--format", "voc", "--voc-root", str(voc_root), "--train-sets", "2007-trainval", "--val-sets", "2007-test"],
        *SCRATCH,
        *CHEAP_RCNN,
        *("--iters", "1", "--no-filter-empty-images", "--no-group-by-aspect-ratio"),
    )
    result = check_eval_json(eval_path, keys=("AP", "AP50", "AP75"))
    # Both references' data defaults, switched off: every image kept, the engine's ungrouped order.
    assert result["train"]["sampler"]["aspect_ratio_grouping"] is None
    assert result["train"]["data"]["images_without_annotations"]["dropped"] == 0
    assert set(result["voc07"]) == {"mAP"} and -1 <= result["voc07"]["mAP"] <= 1
    assert result["model"]["arch"] == "fasterrcnn" and result["schedule"]["name"] == "voc"  # PreDet's VOC defaults
    assert result["eval"]["metric"] == "detectron2 PASCAL VOC" and result["eval"]["images_evaluated"] == 2
    assert result["train"]["data"]["image_sets"] == ["2007-trainval"] and result["model"]["num_classes"] == 21


def test_lvis_layout_trains_with_repeat_factors_and_300_detections(tmp_path, coco128):
    data = json.loads((coco128 / "annotations/instances_train2017.json").read_text())
    counts = {}
    for ann in data["annotations"]:
        counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    for category in data["categories"]:
        category["frequency"] = "f" if counts.get(category["id"], 0) > 20 else "c" if category["id"] in counts else "r"
    for image in data["images"]:
        image.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    data["annotations"] = [a for a in data["annotations"] if not a["iscrowd"]]  # LVIS has no crowd regions
    ann_file = tmp_path / "lvis_coco128.json"
    ann_file.write_text(json.dumps(data))
    images = str(coco128 / "images")
    flags = ["--format", "lvis", "--train-images", images, "--train-ann", str(ann_file), "--val-images", images]
    flags += [
        "--val-ann",
        str(ann_file),
        "--train-subset",
        "8",
        "--val-subset",
        "2",
        "--iters",
        "1",
        "--arch",
        "fasterrcnn",
    ]
    # LVIS's default of 300 detections per image: TINY without its --detections-per-img
    args = finetune.get_args_parser().parse_args(
        [*TINY[: TINY.index("--detections-per-img")], *flags, *SCRATCH, *CHEAP_RCNN, "--output-dir", str(tmp_path)]
    )
    result = check_eval_json(finetune.main(args), keys=("AP", "AP50", "AP75", "APr", "APc", "APf"))
    # detectron2's LVISv1 configs: 300 detections per image above a score of 0.0001 (TEST.DETECTIONS_PER_IMAGE,
    # ROI_HEADS.SCORE_THRESH_TEST)
    tv_kwargs = result["model"]["detector"]["torchvision_kwargs"]
    assert tv_kwargs["box_detections_per_img"] == result["eval"]["detections_per_img"] == 300
    assert tv_kwargs["box_score_thresh"] == result["eval"]["score_thresh"] == 0.0001
    assert result["eval"]["metric"] == "lvis-api"
    sampler = result["train"]["sampler"]
    assert (sampler["kind"], sampler["threshold"]) == ("repeat_factor", 0.001)
    assert sampler["aspect_ratio_grouping"]["unit"] == "global batch"  # grouped over the repeat-factor stream


# ---------------------------------------------------- the embedded default, a train_jigsaw.py export, two seeds


def test_jigsaw_export_fine_tunes_on_the_embedded_default_over_two_seeds(tmp_path):
    jigsaw = ["--model", "test_resnet", "--template", "tiny96", "--device", "cpu", "--num-workers", "0", "--quiet"]
    jigsaw += ["--iters", "1", "--warmup-iters", "0", "--batch-size", "2", "--erf-images", "1"]
    jigsaw += ["--extract-workers", "1"]
    export = train_jigsaw.main(
        train_jigsaw.get_args_parser().parse_args([*jigsaw, "--output-dir", str(tmp_path / "jigsaw")])
    )
    flags = ["--backbone-weights", str(export), "--arch", "fasterrcnn", *CHEAP_RCNN, "--val-subset", "2"]
    seeds_path = run(tmp_path / "ft", *flags, "--iters", "1", "--seeds", "0,1")

    summary = json.loads(seeds_path.read_text())
    assert summary["seeds"] == [0, 1] and set(summary["runs"]) == {"0", "1"}
    for key, values in summary["values"]["bbox"].items():
        assert len(values) == 2
        if min(values) >= 0:
            assert summary["mean"]["bbox"][key] == pytest.approx(sum(values) / 2)
            assert summary["std"]["bbox"][key] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    for seed in (0, 1):
        result = check_eval_json(tmp_path / "ft" / f"seed_{seed}" / "eval.json")
        assert result["seed"] == seed
        assert result["model"]["loaded"]["backbone"] == {
            "from": "export",
            "weights": str(export),
            "architecture": "test_resnet",
        }
        assert result["model"]["loaded"]["fpn"]["from"] == "none"  # a Jigsaw export holds no FPN
        assert result["train"]["data"]["ann_file"].endswith("instances_train.json")  # synthetic_coco's train split


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train-images", "photos"], "--train-images and --train-ann go together: pass --train-ann"),
        (["--protocol-set", "box_heads=4conv1fc"], "unknown protocol setting 'box_heads'"),
        (["--protocol-set", "flip_prob=2"], "flip_prob=2.0: use a probability"),
        (["--detector-set", "box_batch_size=64"], "fasterrcnn has no numeric setting 'box_batch_size'"),
        (["--seeds", "0"], "two or more distinct seeds"),
        (["--eval-only"], "pass --resume PATH"),
        (["--format", "voc"], "--format voc needs --voc-root"),
        (["--arch", "maskrcnn", "--format", "voc", "--voc-root", "."], "VOC has no instance masks"),
    ],
)
def test_bad_flags_stop_with_one_line(tmp_path, extra, message):
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--arch", "fasterrcnn", *extra)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_annotation_file_names_the_file(tmp_path, coco128):
    images, missing = str(coco128 / "images"), str(tmp_path / "missing.json")
    flags = ["--train-images", images, "--train-ann", missing, "--val-images", images, "--val-ann", missing]
    with pytest.raises(SystemExit, match=r"missing\.json does not exist") as info:
        run(tmp_path, *flags, *SCRATCH)
    assert "\n" not in str(info.value)


def test_ap_table_and_the_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    table = finetune.ap_table({"bbox": {"AP": 0.1234, "AP50": 0.5, "APl": -1.0}, "voc07": {"mAP": 0.25}})
    assert table.splitlines() == [
        "         AP  AP50  APl   mAP",
        " bbox  12.3  50.0    -     -",
        "voc07     -     -    -  25.0",
    ]
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as when matplotlib is absent
    result = {"bbox": {"AP": 0.1}, "images": 2}
    finetune.record_evaluation(result, step=5, output_dir=tmp_path, dist_info=engine.setup_distributed("cpu"))
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / finetune.CURVE_NAME).exists()
    assert read_jsonl(tmp_path / finetune.HISTORY_NAME) == [{"iter": 5, **result}]
