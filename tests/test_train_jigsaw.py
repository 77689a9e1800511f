"""train_jigsaw.py end to end: real photos, the loss falls, the export loads into timm, resume is exact, DDP keeps the
ranks in step; the §4.1 recipe, its ERF refreshes and lr scaling, what setup leaves, and the Tab. 1 / Tab. 2 runs."""

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


def log_rows(output_dir):
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def losses(output_dir):
    return [row["loss"] for row in log_rows(output_dir)]


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


def test_parser_defaults_are_the_papers_recipe():
    args = train_jigsaw.get_args_parser().parse_args([])
    paper = {
        "iters": 64000,  # §4.1: "pre-trained for 64k iterations"
        "warmup_lr": 0.2,  # §4.1: "the learning rate starts from 0.2 and then linearly increases to 0.8"
        "lr": 0.8,
        "warmup_iters": 1250,  # §4.1: "during the first 1250 iterations", then cosine to 0
        "weight_decay": 1e-4,  # §4.1
        "erf_every": 5000,  # §4.1: "We update weights w of soft labels in Eq. 2 for every 5k iterations"
        "erf_threshold": 0.7,  # §4.1: tau = 0.7
        "scale_range": (0.8, 1.5),  # §4.1 "Pre-training Augmentation": ratio from [0.8, 1.5], aspect kept
        "flip_prob": 0.5,  # §4.1
        "fit": "pad_crop",  # §3.2: padding or random cropping, never warp or resize
        "table1": None,
        "classification": "erf_dense",  # §3.3
        "max_enlarge": 2.0,  # §3.1: "up to 2x of the original width/height"
        "pos_neg_ratio": 10.0,  # §3.1: "10:1"
        "clip_grad": None,  # the paper clips nothing
        "model": "resnet50",  # §4.2: "The backbone is ResNet-50"
    }
    assert {key: getattr(args, key) for key in paper} == paper
    # §4.1: "8 Tesla V100 GPUs with the total batch size of 512" assembled images: 64 per GPU, the lrs are for 512.
    assert args.batch_size * 8 * args.accum_steps == train_jigsaw.PAPER_GLOBAL_BATCH == 512
    ours = {"momentum": 0.9, "template": "split96", "zero_init_last": False, "erf_images": 16, "min_sample_size": 8}
    assert {key: getattr(args, key) for key in ours} == ours  # readings where the paper is silent (PAPER_NOTES.md)


def test_erf_is_refreshed_at_step_0_and_every_erf_every_steps(tmp_path, monkeypatch):
    events = []
    real_train_step, real_refresh = engine.train_step, train_jigsaw.refresh_label_weights

    def train_step(**kwargs):
        events.append(("step", kwargs["step"]))
        return real_train_step(**kwargs)

    def refresh_label_weights(*args, **kwargs):
        events.append(("erf", None))
        return real_refresh(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", train_step)
    monkeypatch.setattr(train_jigsaw, "refresh_label_weights", refresh_label_weights)
    flags = ["--iters", "8", "--warmup-iters", "1", "--batch-size", "2", "--erf-every", "3", "--erf-images", "1"]
    export = run(tmp_path, *flags, "--log-every", "1")
    refreshed_before = [events[i + 1][1] for i, (kind, _) in enumerate(events) if kind == "erf"]
    assert refreshed_before == [0, 3, 6]  # §4.1's 0, 5k, 10k, ... with --erf-every 3
    assert [row["step"] for row in log_rows(export.parent) if row.get("erf_refreshed")] == [0, 3, 6]


def test_lr_scales_with_the_global_batch_of_accumulated_micro_batches(tmp_path):
    flags = ["--iters", "3", "--warmup-iters", "1", "--batch-size", "2", "--accum-steps", "3", "--erf-images", "1"]
    export = run(tmp_path, *flags, "--log-every", "1", "--lr", "0.64", "--warmup-lr", "0.128")
    global_batch = 2 * 3  # per process x accumulation, one process
    lrs = [row["lr"] for row in log_rows(export.parent)]
    assert lrs[:2] == pytest.approx([0.128 * global_batch / 512, 0.64 * global_batch / 512])  # warmup start, peak
    assert f"global batch {global_batch} assembled images" in (export / "README.md").read_text()


def model_at_step_0(tmp_path, monkeypatch, *flags):
    """The model's state as the first train step finds it: what setup left behind. Returns it and the export."""
    seen = {}
    real_train_step = engine.train_step

    def train_step(**kwargs):
        if kwargs["step"] == 0:
            seen.update({k: v.clone() for k, v in engine.unwrap_model(kwargs["model"]).state_dict().items()})
        return real_train_step(**kwargs)

    monkeypatch.setattr(engine, "train_step", train_step)
    short = ["--iters", "1", "--warmup-iters", "0", "--batch-size", "2", "--erf-images", "2"]
    return seen, run(tmp_path, *short, *flags)


@pytest.mark.parametrize("zero_init_last", [False, True])
def test_setup_leaves_bn_statistics_untouched_and_the_residual_init_is_recorded(tmp_path, monkeypatch, zero_init_last):
    # Setup: the feature-size probe, the step-0 ERF and --visualize's ERF picture all run before the first step.
    flags = ["--visualize", "1", *(["--zero-init-last"] if zero_init_last else [])]
    state, export = model_at_step_0(tmp_path, monkeypatch, *flags)
    norms = [key.removesuffix(".running_mean") for key in state if key.endswith(".running_mean")]
    assert len(norms) > 10
    for norm in norms:  # as nn.BatchNorm2d starts: no batch has been seen
        assert (state[f"{norm}.running_mean"] == 0).all() and (state[f"{norm}.running_var"] == 1).all(), norm
        assert state[f"{norm}.num_batches_tracked"] == 0, norm
    # The residual init: every BN weight 1 (torchvision's), or the last BN of each of test_resnet's 4 blocks at 0.
    weights = [state[f"{norm}.weight"] for norm in norms]
    assert all(bool(((w == 0) | (w == 1)).all()) for w in weights)
    assert sum(bool((w == 0).all()) for w in weights) == (4 if zero_init_last else 0)
    assert json.loads((export.parent / "args.json").read_text())["zero_init_last"] is zero_init_last
    card = (export / "README.md").read_text()
    assert ("timm's zero_init_last: every residual branch's last BN starts at weight 0" in card) is zero_init_last
    assert ("torchvision's: every residual branch's last BN starts at weight 1" in card) is not zero_init_last


@pytest.mark.parametrize("classification", ["blockwise", "global"])
def test_table2_ablations_train(tmp_path, classification):
    flags = ["--iters", "2", "--warmup-iters", "1", "--batch-size", "2", "--erf-images", "1", "--log-every", "1"]
    export = run(tmp_path, *flags, "--classification", classification)
    rows = log_rows(export.parent)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    assert not any(r.get("erf_refreshed") for r in rows)  # only the ERF-adaptive loss needs the ERF
    name = {"blockwise": "Tab. 1 'Pad&Crop' = Tab. 2 'Block-wise Cls.'", "global": "Tab. 2 'Global Cls.'"}
    assert name[classification] in (export / "README.md").read_text()


def test_table1_is_one_flag_with_blockwise_labels_and_is_recorded(tmp_path):
    flags = ["--iters", "2", "--warmup-iters", "1", "--batch-size", "2", "--erf-images", "1", "--log-every", "1"]
    export = run(tmp_path, *flags, "--table1", "warp")
    args = json.loads((export.parent / "args.json").read_text())
    assert (args["table1"], args["fit"], args["classification"]) == ("warp", "warp", "blockwise")
    assert "Tab. 1 'Warp' (block-wise labels, as Tab. 1 was run)" in (export / "README.md").read_text()
    assert all(torch.isfinite(torch.tensor(losses(export.parent))))
    with pytest.raises(
        SystemExit, match="--table1 warp means --classification blockwise: drop --classification global"
    ):
        run(tmp_path, *flags, "--table1", "warp", "--classification", "global", name="conflict")
    with pytest.raises(SystemExit, match="--table1 resize means --fit resize: drop --fit warp"):
        run(tmp_path, *flags, "--table1", "resize", "--fit", "warp", name="conflict")


def directory_files(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# train_jigsaw.main under torchrun, keeping each rank's parameters whenever a checkpoint is made (training_state is
# collective: every rank calls it, with its own model).
EACH_RANK = """
import sys

import torch
import torch.distributed as dist

import train_jigsaw
from detpretrain import engine

real_training_state = engine.training_state


def keep_each_rank(**kwargs):
    parameters = {k: v.detach().clone() for k, v in engine.unwrap_model(kwargs["model"]).named_parameters()}
    torch.save(parameters, f"rank{dist.get_rank()}_step{kwargs['step']}.pt")
    return real_training_state(**kwargs)


engine.training_state = keep_each_rank
train_jigsaw.main(train_jigsaw.get_args_parser().parse_args(sys.argv[1:]))
"""


def test_two_gloo_processes_extract_what_one_process_does_and_train_in_step(tmp_path):
    out = tmp_path / "ddp"
    (tmp_path / "each_rank.py").write_text(EACH_RANK)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(tmp_path / "each_rank.py"),
        *TINY,
        "--output-dir",
        str(out),
        "--iters",
        "3",
        "--warmup-iters",
        "1",
        "--batch-size",
        "2",
        "--accum-steps",
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
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["samples_per_s"] > 0 for r in rows)
    # The lr follows the global batch: 2 per process x 2 processes x 2 accumulated micro-batches.
    assert [r["lr"] for r in rows[:2]] == pytest.approx([0.2 * 8 / 512, 0.8 * 8 / 512])
    # DDP keeps the ranks in step: both end with the same weights. (BN running statistics are each rank's own after
    # its last batch: DDP hands rank 0's to every rank before each forward; the export is rank 0's.)
    ranks = [torch.load(tmp_path / f"rank{r}_step3.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
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
