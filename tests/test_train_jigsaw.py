"""train_jigsaw.py end to end: real photos, the loss falls, the export loads into timm, resume is exact, DDP runs."""

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch

import train_jigsaw
from detpretrain import engine
from detpretrain.data.synthetic import synthetic_coco
from detpretrain.jigsaw import JigsawSamples, coco_image_records, extract_samples
from tests.conftest import REPO_ROOT

TINY = ["--model", "test_resnet", "--template", "tiny96", "--device", "cpu", "--num-workers", "0", "--quiet"]


def run(tmp_path, *extra: str, name: str = "run"):
    args = train_jigsaw.get_args_parser().parse_args([*TINY, "--output-dir", str(tmp_path / name), *extra])
    return train_jigsaw.main(args)


def coco128_flags(coco128):
    return [
        "--train-images",
        str(coco128 / "images"),
        "--train-ann",
        str(coco128 / "annotations/instances_train2017.json"),
    ]


def losses(output_dir):
    return [json.loads(line)["loss"] for line in (output_dir / "log.jsonl").read_text().splitlines()]


def test_coco128_loss_falls_and_export_loads_strictly_into_timm(tmp_path, coco128):
    export = run(
        tmp_path,
        *coco128_flags(coco128),
        *["--iters", "60", "--warmup-iters", "5", "--batch-size", "16", "--lr", "12.8", "--warmup-lr", "3.2"],
        *["--erf-every", "20", "--erf-images", "2", "--log-every", "1", "--visualize", "2"],
    )
    curve = losses(export.parent)
    assert len(curve) == 60 and all(torch.isfinite(torch.tensor(curve)))
    first, last = sum(curve[:10]) / 10, sum(curve[-10:]) / 10
    assert last < 0.85 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"

    model = timm.create_model(
        "test_resnet",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(export / "model.safetensors")),
    )
    exported = safetensors.torch.load_file(export / "model.safetensors")
    assert set(exported) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())

    card = (export / "README.md").read_text()
    assert "tiny96" in card and "SGD momentum 0.9" in card and "arxiv.org/abs/2004.12178" in card
    visualize = export.parent / "visualize"
    names = {p.name for p in visualize.iterdir()}
    assert {"assembled_00.png", "assembled_01.png", "erf_top_left_step0.png", "erf_top_left_final.png"} <= names
    header = json.loads((export.parent / "args.json").read_text())
    assert header["template"] == "tiny96" and header["dist_timeout"] == engine.DEFAULT_DIST_TIMEOUT_MINUTES
    cleaning = JigsawSamples(export.parent / "samples.jigsaw").header["cleaning_report"]
    assert cleaning["images"] == 128 and cleaning["kept"] == 939  # CocoDataset's report, crowd regions kept


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    """Killed right after the step-4 checkpoint, resumed with --resume auto: the same export as an unbroken run."""
    common = ["--iters", "7", "--warmup-iters", "2", "--batch-size", "4", "--erf-every", "3", "--erf-images", "2"]
    common += ["--save-every", "2", "--log-every", "1"]
    reference = run(tmp_path, *common, name="reference")

    real_train_step = engine.train_step

    def crash_at_step_5(**kwargs):
        if kwargs["step"] == 5:
            raise Crash("simulated kill")
        return real_train_step(**kwargs)

    monkeypatch.setattr(engine, "train_step", crash_at_step_5)
    with pytest.raises(Crash):
        run(tmp_path, *common, name="resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["step"] == 4
    monkeypatch.setattr(engine, "train_step", real_train_step)
    resumed = run(tmp_path, *common, "--resume", "auto", name="resumed")

    a = safetensors.torch.load_file(reference / "model.safetensors")
    b = safetensors.torch.load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The step-3 ERF refresh happened before the crash; the resumed run reuses the checkpoint's weights, and
    # each step appears once in the log with the same loss as the unbroken run.
    assert losses(reference.parent) == losses(resumed.parent)


def test_resume_with_other_settings_is_refused(tmp_path):
    run(tmp_path, "--iters", "2", "--warmup-iters", "1", "--batch-size", "2", "--erf-images", "1", name="a")
    with pytest.raises(ValueError, match="erf_threshold"):
        run(
            tmp_path,
            "--iters",
            "2",
            "--warmup-iters",
            "1",
            "--batch-size",
            "2",
            "--erf-images",
            "1",
            "--erf-threshold",
            "0.9",
            "--resume",
            "auto",
            name="a",
        )


@pytest.mark.parametrize("classification", ["blockwise", "global"])
def test_table2_ablations_train(tmp_path, classification):
    export = run(
        tmp_path,
        "--iters",
        "2",
        "--warmup-iters",
        "1",
        "--batch-size",
        "2",
        "--erf-images",
        "1",
        "--classification",
        classification,
        "--fit",
        "warp",
        "--log-every",
        "1",
    )
    assert all(torch.isfinite(torch.tensor(losses(export.parent))))


def directory_files(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_two_gloo_processes_extract_what_one_process_does_and_train(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(REPO_ROOT / "train_jigsaw.py"),
        *TINY,
        "--output-dir",
        str(out),
        "--iters",
        "3",
        "--warmup-iters",
        "1",
        "--batch-size",
        "2",
        "--erf-every",
        "2",
        "--erf-images",
        "2",
        "--log-every",
        "1",
        "--shard-size",
        "8",  # 64 images: 8 shards, 4 per rank
        "--extract-workers",
        "1",
        "--dist-timeout",
        "5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["samples_per_s"] > 0 for r in rows)
    args = json.loads((out / "args.json").read_text())
    assert args["batch_size"] == 2 and args["dist_timeout"] == 5
    timm.create_model(
        "test_resnet",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(out / "export" / "model.safetensors")),
    )
    # Both ranks cut samples; the directory is byte for byte what one process extracts.
    default = synthetic_coco()
    records = coco_image_records(default.train_ann, default.train_images)
    extract_samples(
        records.records,
        class_names=records.class_names,
        category_ids=records.category_ids,
        cleaning_report=records.cleaning_report,
        output_dir=tmp_path / "one_process",
        shard_size=8,
    )
    assert directory_files(out / "samples.jigsaw") == directory_files(tmp_path / "one_process")


def test_extract_only_then_train_on_the_samples(tmp_path, coco128):
    data = [*coco128_flags(coco128), "--shard-size", "32"]
    samples = run(tmp_path, *data, "--extract-only", "--extract-workers", "2", name="extract")
    assert samples == tmp_path / "extract" / "samples.jigsaw"
    assert sorted(p.name for p in (tmp_path / "extract").iterdir()) == ["samples.jigsaw"]  # no model, no run files
    shards = {p.name: p.stat().st_mtime_ns for p in samples.glob("shard-*")}
    assert len(shards) == 4 and len(JigsawSamples(samples)) == 1008

    short = ["--iters", "1", "--warmup-iters", "0", "--batch-size", "2", "--erf-images", "1"]
    export = run(tmp_path, *data, *short, "--samples", str(samples), name="train")
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("shard-*")} == shards  # reused, not written again
    assert not (export.parent / "samples.jigsaw").exists()
    with pytest.raises(
        SystemExit, match=r"holds samples .*\(max_enlarge: 2\.0 there, 1\.5 now\); delete it.*--samples"
    ):
        run(tmp_path, *data, *short, "--samples", str(samples), "--max-enlarge", "1.5", name="other")


def test_half_given_data_flags_are_refused(tmp_path, coco128):
    with pytest.raises(SystemExit, match="--train-ann"):
        run(tmp_path, "--train-images", str(coco128 / "images"), "--iters", "2", "--warmup-iters", "1")
