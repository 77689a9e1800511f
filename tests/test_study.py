"""experiments/study.py: the compute-budget arithmetic, the verdicts, and a tiny study of all four arms run end to end,
killed between two runs and resumed, on the embedded default dataset."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("cv2.ximgproc", reason="PreDet's EdgeBoxes need opencv-contrib (the dev extra)")

ROOT = Path(__file__).resolve().parent.parent


def load_study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module
    spec.loader.exec_module(module)
    return module


study = load_study()

# Every arm, one seed, a few steps of each script on small images: the whole mechanism in about a minute.
TINY = study.Preset(
    arms=study.ARMS,
    seeds=(0,),
    budget="flops",
    model="resnet18",
    finetune_iters=2,
    scratch_iters=4,
    eval_every=2,
    finetune_flags=(
        "--arch", "fasterrcnn", "--min-size", "96", "--max-size", "128", "--batch-size", "2", "--val-subset", "4",
        "--detector-set", "box_batch_size_per_image=32", "rpn_post_nms_top_n_train=64", "rpn_post_nms_top_n_test=64",
        "--protocol-set", "precise_bn_iters=1", "--num-workers", "0",
    ),
    jigsaw_flags=("--template", "tiny96", "--batch-size", "4", "--num-workers", "0"),
    predet_flags=("--view-size", "96", "--batch-size", "2", "--num-workers", "0"),
    probe_iters=1,
)  # fmt: skip


def record(arm: str, seed: int, ap: float, ap50: float) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "AP": ap,
        "AP50": ap50,
        "curve": [{"iter": 2, "AP": ap, "AP50": ap50}],
        "pretrain_iters": 0,
        "finetune_iters": 2,
        "flops": {"finetune": 2e12, "total": 2e12},
        "wall_s": {"finetune": 60.0, "total": 60.0},
    }


def test_verdicts_call_a_comparison_decided_only_when_every_seed_is_above():
    plan = {"settings": {"arms": ["scratch", "jigsaw"], "seeds": [0, 1, 2]}, "budget_unit": "flops"}
    records = [record("scratch", s, ap, 0.5) for s, ap in enumerate((0.10, 0.12, 0.14))]
    records += [record("jigsaw", s, ap, 0.5 + 0.01 * s) for s, ap in enumerate((0.15, 0.16, 0.20))]
    summary = study.summarize(plan, records)
    assert summary["arms"]["scratch"]["AP"] == {"mean": pytest.approx(0.12), "std": pytest.approx(0.02)}
    assert summary["arms"]["jigsaw"]["AP"]["mean"] == pytest.approx(0.17)
    ap, ap50 = summary["verdicts"]
    assert ap == {"arms": ["scratch", "jigsaw"], "metric": "AP", "difference": pytest.approx(-0.05), "decided": True}
    # AP50: scratch 0.50 x 3 against 0.50, 0.51, 0.52: the ranges touch, so not decided
    assert ap50["decided"] is False and ap50["difference"] == pytest.approx(-0.01)
    table = study.markdown_table(summary)
    assert "| from scratch | - | 2 | 12.0 ± 2.0 | 50.0 ± 0.0 | 2.0 | 1.0 |" in table
    assert "| from scratch - Jigsaw | AP | -5.0 | yes |" in table


def test_one_seed_never_decides():
    plan = {"settings": {"arms": ["scratch", "jigsaw"], "seeds": [0]}, "budget_unit": "steps"}
    summary = study.summarize(plan, [record("scratch", 0, 0.1, 0.3), record("jigsaw", 0, 0.3, 0.6)])
    assert [verdict["decided"] for verdict in summary["verdicts"]] == [False, False]
    assert "equal fine-tuning steps" in study.markdown_table(summary)


def test_tiny_study_end_to_end_killed_and_resumed(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PRESETS, "tiny", TINY)
    args = study.get_args_parser().parse_args(["--preset", "tiny", "--output-dir", str(tmp_path), "--device", "cpu"])
    calls = []
    real_run = study.run

    def run_then_kill(command, *, log_path):
        if len(calls) == 6:  # 4 probes, scratch's fine-tuning, jigsaw's pre-training: killed before its fine-tuning
            calls.append("killed")
            raise KeyboardInterrupt
        calls.append(log_path.name)
        return real_run(command, log_path=log_path)

    monkeypatch.setattr(study, "run", run_then_kill)
    with pytest.raises(KeyboardInterrupt):
        study.main(args)
    probes = ["finetune.log", "jigsaw.log", "predet_cls.log", "predet.log"]
    assert calls == [*probes, "finetune.log", "pretrain.log", "killed"]

    # The plan: every arm has the FLOPs of 4 fine-tuning steps; a pre-trained arm spends 2 of them pre-training.
    plan = json.loads((tmp_path / "plan.json").read_text())
    per_step = plan["flops_per_step"]
    assert plan["budget_flops"] == pytest.approx(4 * per_step["finetune"])
    assert plan["finetune_iters"] == {"scratch": 4, "jigsaw": 2, "predet_cls": 2, "predet": 2}
    for arm in ("jigsaw", "predet_cls", "predet"):
        assert plan["pretrain_iters"][arm] == max(2, math.floor(2 * per_step["finetune"] / per_step[arm]))
    assert per_step["predet"] > per_step["predet_cls"] > 0  # the detection pretext task costs FLOPs

    # Relaunched: the finished runs are kept, the study goes on from the jigsaw arm's fine-tuning.
    calls.clear()
    args = study.get_args_parser().parse_args(["--preset", "tiny", "--output-dir", str(tmp_path), "--device", "cpu"])
    study.main(args)
    assert calls == ["finetune.log", "pretrain.log", "finetune.log", "pretrain.log", "finetune.log"]

    results = json.loads((tmp_path / "study.json").read_text())
    assert list(results["arms"]) == list(study.ARMS)
    for run in results["runs"]:
        assert 0 <= run["AP"] <= 1 and [point["iter"] for point in run["curve"]] == list(
            range(2, run["finetune_iters"] + 1, 2)
        )
        # every step counted its FLOPs: the measured fine-tuning FLOPs are near the plan's (image sizes vary)
        per_step_measured = run["flops"]["finetune"] / run["finetune_iters"]
        assert per_step_measured == pytest.approx(per_step["finetune"], rel=0.5)
        if run["arm"] != "scratch":
            assert run["flops"]["pretrain"] == pytest.approx(run["pretrain_iters"] * per_step[run["arm"]], rel=0.05)
    assert len(results["verdicts"]) == 12  # 6 pairs x (AP, AP50)
    assert (tmp_path / "study.md").read_text().startswith("Budget: equal compute (FLOPs).")
    assert (tmp_path / "study.png").stat().st_size > 0

    # Another setting in the same folder is refused, naming it.
    args = study.get_args_parser().parse_args(
        ["--preset", "tiny", "--output-dir", str(tmp_path), "--device", "cpu", "--seeds", "0,1"]
    )
    with pytest.raises(study.StudyError, match=r"\(seeds differ\)"):
        study.main(args)
