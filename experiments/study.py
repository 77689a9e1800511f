"""Does detection pre-training help? The papers' central comparison, run on one dataset at an equal compute budget.

Both papers claim that pre-training for detection beats the alternatives at the same cost: Jigsaw pre-trains on
the detection data itself (montage_jigsaw.txt Tab. 3, Tab. 5: against ImageNet and against training from scratch),
PreDet adds a detection pretext task to classification pre-training (predet.txt Tab. 1: L_cls alone against all
four losses). This command runs those arms on the dataset you give it, with the same detector and fine-tuning
protocol for every arm, several seeds each:

- ``scratch``: finetune.py from a random backbone (``--no-pretrained``), trained BN (the ``predet`` protocol:
  nothing frozen, BN trained and recomputed by precise BN before each evaluation, the setting He et al.'s
  "Rethinking ImageNet Pre-training" found scratch needs besides GN), and the longer schedule: the whole budget.
- ``jigsaw``: train_jigsaw.py on the training split only (the premise of montage_jigsaw.txt: no data beyond the
  detection set), then finetune.py from its export.
- ``predet_cls``: train_predet.py on the training split's image-level labels with L_cls alone (predet.txt Tab. 1,
  first row), then finetune.py from its export (backbone and FPN).
- ``predet``: train_predet.py with all four losses (Tab. 1, last row), then finetune.py from its export (backbone,
  FPN and the heads fine-tuning starts from).

The compute budget. Its unit is floating-point operations of training steps, counted by
``torch.utils.flop_counter`` (``--count-flops`` of each script: convolutions and matrix products, forward and
backward; what a machine spends them at differs, so wall seconds are recorded beside them). Every arm gets the FLOPs
of ``scratch_iters`` fine-tuning steps. A pre-trained arm fine-tunes for ``finetune_iters`` and spends the rest on
pre-training: its pre-training steps are that remainder over its measured FLOPs per step. Those per-step FLOPs come
from a short probe run of each script before the study (``OUTPUT_DIR/probes/``), and every run counts its own
FLOPs, so the table gives the measured total of each arm beside the plan. Evaluation and precise BN are not in the
budget (they do not train the weights). The ``quickstart`` preset compares by steps instead: both arms fine-tune for
the same steps, and the Jigsaw arm's pre-training is extra (its FLOPs are in the table).

    # the README's first command: Jigsaw vs scratch on the embedded default dataset, one seed, about 5 minutes
    python experiments/study.py --preset quickstart
    # the study on a labelImg-style VOC dataset, 4 arms x 3 seeds on a 2-core CPU (the README's "Does it work?")
    python experiments/study.py --preset cpu --format voc --train-images ../shared/data/raccoon/images \\
        --train-ann ../shared/data/raccoon/annotations --train-split ../shared/data/raccoon/train.txt \\
        --val-split ../shared/data/raccoon/test.txt --output-dir runs/study_raccoon
    # one GPU, a larger scale (ResNet-50, larger images, longer schedules)
    python experiments/study.py --preset gpu --train-images coco/train2017 --train-ann ... --val-images ... \\
        --val-ann ... --output-dir runs/study_gpu

Outputs in --output-dir: ``plan.json`` (settings, probes, the iterations of every run), ``<arm>/seed_<k>/`` (each
script's own output folder: ``pretrain/``, ``finetune/``, and their logs), ``study.json`` (every seed's AP and AP50,
FLOPs and wall seconds, the mean and sample standard deviation per arm, and the pairwise verdicts), ``study.md``
(the table) and ``study.png`` (AP against fine-tuning iterations, every arm, mean and seed range; and AP against
the FLOPs spent). A killed study, relaunched with the same command, keeps every finished run and resumes the
interrupted one where its checkpoint left it (each script's ``--resume auto``); a relaunch with other settings is
refused. A comparison is called decided when every seed of one arm is above every seed of the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the checkout: the three scripts live at its root
ARMS = ("scratch", "jigsaw", "predet_cls", "predet")
ARM_LABELS = {
    "scratch": "from scratch",
    "jigsaw": "Jigsaw",
    "predet_cls": "PreDet, L_cls only",
    "predet": "PreDet, all four losses",
}
PRETRAIN_SCRIPT = {"jigsaw": "train_jigsaw.py", "predet_cls": "train_predet.py", "predet": "train_predet.py"}
# The data flags each script takes: pre-training reads the training split only (J's premise), fine-tuning both.
TRAIN_DATA_FLAGS = ("format", "train_images", "train_ann", "train_split", "class_names")
VAL_DATA_FLAGS = ("val_images", "val_ann", "val_split")
DATA_NAMES = TRAIN_DATA_FLAGS + VAL_DATA_FLAGS
PLAN_NAME, RESULTS_NAME, TABLE_NAME, PLOT_NAME = "plan.json", "study.json", "study.md", "study.png"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One scale of the study. ``budget`` is ``"flops"`` (equal compute, the study) or ``"steps"`` (equal fine-tuning
    steps, pre-training extra: the quickstart)."""

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    budget: str
    model: str
    finetune_iters: int  # fine-tuning steps of the pre-trained arms
    scratch_iters: int  # fine-tuning steps of scratch = every arm's budget, in fine-tuning steps
    eval_every: int
    finetune_flags: tuple[str, ...]  # the detector and its protocol, the same for every arm
    jigsaw_flags: tuple[str, ...]
    jigsaw_iters: int = 0  # pre-training steps under budget "steps"; under "flops" the budget sets them
    predet_flags: tuple[str, ...] = ()
    probe_iters: int = 3
    warmup_fraction: float = 0.05  # of the pre-training steps (the papers' warmups are 1-2% of far longer runs)


def flags(text: str) -> tuple[str, ...]:
    """A command line's flags, written as one string."""
    return tuple(shlex.split(text))


PRESETS = {
    # Jigsaw vs scratch on the embedded default dataset, the same fine-tuning steps: the README's first picture.
    "quickstart": Preset(
        arms=("scratch", "jigsaw"),
        seeds=(0,),
        budget="steps",
        model="resnet18",
        finetune_iters=60,
        scratch_iters=60,
        eval_every=20,
        finetune_flags=flags(
            "--arch fasterrcnn --min-size 192 --max-size 256 --batch-size 2 --detector-set "
            "box_batch_size_per_image=128 rpn_post_nms_top_n_train=300 --protocol-set precise_bn_iters=10"
        ),
        jigsaw_flags=flags("--template tiny96 --batch-size 16"),
        jigsaw_iters=100,
    ),
    # Four arms x three seeds on a small dataset on a 2-core CPU, within 90 minutes (README "Does it work?"): every
    # arm gets the FLOPs of 150 fine-tuning steps; the pre-trained arms spend 60% of them pre-training.
    "cpu": Preset(
        arms=ARMS,
        seeds=(0, 1, 2),
        budget="flops",
        model="resnet18",
        finetune_iters=60,
        scratch_iters=150,
        eval_every=30,
        finetune_flags=flags(
            "--arch fasterrcnn --min-size 128 --max-size 192 --batch-size 4 --detector-set "
            "box_batch_size_per_image=128 rpn_post_nms_top_n_train=300 --protocol-set precise_bn_iters=10"
        ),
        # a small dataset may have no tall (or wide) sample: raccoon's training split has none (train_jigsaw.py)
        jigsaw_flags=flags("--template tiny96 --batch-size 16 --empty-group borrow"),
        predet_flags=flags("--view-size 128 --batch-size 8"),
    ),
    # The same on one GPU at a larger scale: ResNet-50, detectron2's image sizes, 3k/9k fine-tuning steps.
    "gpu": Preset(
        arms=ARMS,
        seeds=(0, 1, 2),
        budget="flops",
        model="resnet50",
        finetune_iters=3000,
        scratch_iters=9000,
        eval_every=500,
        finetune_flags=flags("--arch fasterrcnn --batch-size 8 --amp bf16"),
        jigsaw_flags=flags("--template split96 --batch-size 64 --amp bf16"),
        predet_flags=flags("--view-size 480 --batch-size 16 --amp bf16"),
    ),
}


class StudyError(RuntimeError):
    """A run of the study failed, or its folder belongs to another study: the message says which and what to do."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Pre-training vs scratch at an equal compute budget", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", default="quickstart", choices=sorted(PRESETS), help="the scale of the study")
    parser.add_argument("--output-dir", type=Path, help="default: runs/<preset>")
    parser.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)} (default: the preset's)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's, e.g. 0,1,2)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--num-workers", type=int, help="loader workers of every run (default: each script's)")
    data = parser.add_argument_group("data (no data flags: the embedded default dataset); passed to the scripts")
    data.add_argument("--format", help="coco, lvis, voc or yolo (each script's --format)")
    data.add_argument("--train-images", type=Path)
    data.add_argument("--train-ann", type=Path)
    data.add_argument("--train-split", type=Path, help="list of training image names (VOC, YOLO)")
    data.add_argument("--class-names", help="class names, comma-separated or a file (VOC, YOLO)")
    data.add_argument("--val-images", type=Path)
    data.add_argument("--val-ann", type=Path)
    data.add_argument("--val-split", type=Path, help="list of evaluation image names (VOC, YOLO)")
    return parser


# ----------------------------------------------------------------------------------------------------- commands
def data_flags(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    flags = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def run_flags(args: argparse.Namespace, *, seed: int, output_dir: Path) -> list[str]:
    """What every run shares: the seed, the device, FLOP counting on every logged step, resuming."""
    flags = ["--seed", str(seed), "--output-dir", str(output_dir), "--count-flops", "--log-every", "1", "--quiet"]
    flags += ["--resume", "auto", "--device", args.device]
    if args.num_workers is not None:
        flags += ["--num-workers", str(args.num_workers)]
    return flags


def pretrain_command(
    args: argparse.Namespace, preset: Preset, arm: str, *, iters: int, seed: int, output_dir: Path
) -> list[str]:
    warmup = max(1, round(preset.warmup_fraction * iters))
    command = [sys.executable, str(ROOT / PRETRAIN_SCRIPT[arm]), "--model", preset.model]
    command += ["--iters", str(iters), "--warmup-iters", str(min(warmup, iters - 1))]
    command += list(preset.jigsaw_flags if arm == "jigsaw" else preset.predet_flags)
    if arm == "predet_cls":
        # L_cls trains no detection head: fine-tuning starts its heads as it would from any classifier
        command += ["--losses", "cls", "--export-heads", "none"]
    if arm in ("predet", "predet_cls"):
        # The EdgeBoxes queries depend on the data alone: one cache for every PreDet run of the study.
        command += ["--proposals", str(args.output_dir / "proposals.edgeboxes")]
    return command + data_flags(args, TRAIN_DATA_FLAGS) + run_flags(args, seed=seed, output_dir=output_dir)


def finetune_command(
    args: argparse.Namespace,
    preset: Preset,
    *,
    iters: int,
    seed: int,
    output_dir: Path,
    weights: Path | None,
    eval_every: int,
    val_subset: int | None = None,
) -> list[str]:
    command = [sys.executable, str(ROOT / "finetune.py"), "--backbone", preset.model, *preset.finetune_flags]
    command += ["--iters", str(iters), "--eval-every", str(eval_every)]
    command += ["--no-pretrained"] if weights is None else ["--backbone-weights", str(weights)]
    if val_subset is not None:
        command += ["--val-subset", str(val_subset)]
    command += data_flags(args, TRAIN_DATA_FLAGS + VAL_DATA_FLAGS)
    return command + run_flags(args, seed=seed, output_dir=output_dir)


def run(command: list[str], *, log_path: Path) -> float:
    """Run one script to the end, its output in ``log_path``; the wall seconds. A failure stops the study."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if returncode != 0:
        lines = log_path.read_text().strip().splitlines()
        raise StudyError(
            f"{Path(command[1]).name} failed (exit {returncode}): {lines[-1] if lines else ''} (full output in "
            f"{log_path}); fix it and run the same study command again to resume"
        )
    return time.monotonic() - start


def logged_flops(log_jsonl: Path) -> tuple[float, int]:
    """(FLOPs summed over the logged steps, number of steps) of a run with --count-flops --log-every 1."""
    rows = [json.loads(line) for line in log_jsonl.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "flops" in row]
    return float(sum(row["flops"] for row in rows)), len(rows)


# --------------------------------------------------------------------------------------------------------- plan
def probe_flops(args: argparse.Namespace, preset: Preset, arms: tuple[str, ...]) -> dict[str, float]:
    """FLOPs per training step of fine-tuning and of each arm's pre-training, from ``probe_iters``-step runs."""
    probes: dict[str, float] = {}
    needed = ["finetune"] + [arm for arm in arms if arm in PRETRAIN_SCRIPT]
    for name in needed:
        output_dir = args.output_dir / "probes" / name
        if name == "finetune":
            # a few evaluation images (with some box to score): the probe measures training steps, its AP is not read
            command = finetune_command(
                args, preset, iters=preset.probe_iters, seed=0, output_dir=output_dir, weights=None, eval_every=0,
                val_subset=8,
            )  # fmt: skip
        else:
            command = pretrain_command(args, preset, name, iters=preset.probe_iters, seed=0, output_dir=output_dir)
        print(f"probe: {name} ({preset.probe_iters} steps)", flush=True)
        run(command, log_path=output_dir.parent / f"{name}.log")
        flops, steps = logged_flops(output_dir / "log.jsonl")
        probes[name] = flops / steps
    return probes


def plan_settings(args: argparse.Namespace, preset: Preset, arms: tuple[str, ...], seeds: tuple[int, ...]) -> dict:
    """What a study is: a saved plan is reused only for the same settings (JSON round trip: tuples become lists)."""
    settings = {
        "preset": args.preset,
        "preset_values": dataclasses.asdict(preset),
        "arms": list(arms),
        "seeds": list(seeds),
        "device": args.device,
        "data": {name: None if getattr(args, name) is None else str(getattr(args, name)) for name in DATA_NAMES},
    }
    return json.loads(json.dumps(settings))


def make_plan(args: argparse.Namespace, preset: Preset, arms: tuple[str, ...], seeds: tuple[int, ...]) -> dict:
    """The iterations of every run and what they come from: the budget, the probes' FLOPs per step."""
    plan: dict[str, Any] = {"settings": plan_settings(args, preset, arms, seeds), "budget_unit": preset.budget}
    if preset.budget == "steps":
        plan["finetune_iters"] = {arm: preset.finetune_iters for arm in arms}
        plan["pretrain_iters"] = {arm: preset.jigsaw_iters for arm in arms if arm in PRETRAIN_SCRIPT}
        return plan
    probes = probe_flops(args, preset, arms)
    budget = preset.scratch_iters * probes["finetune"]
    pretrain_budget = budget - preset.finetune_iters * probes["finetune"]
    plan["flops_per_step"] = probes
    plan["budget_flops"] = budget
    plan["finetune_iters"] = {arm: preset.scratch_iters if arm == "scratch" else preset.finetune_iters for arm in arms}
    plan["pretrain_iters"] = {
        arm: max(2, math.floor(pretrain_budget / probes[arm])) for arm in arms if arm in PRETRAIN_SCRIPT
    }
    return plan


def load_or_make_plan(args: argparse.Namespace, preset: Preset, arms: tuple[str, ...], seeds: tuple[int, ...]) -> dict:
    """The saved plan of this --output-dir when its settings are these; a new one (probes first) otherwise."""
    path = args.output_dir / PLAN_NAME
    if path.exists():
        plan = json.loads(path.read_text())
        wanted = plan_settings(args, preset, arms, seeds)
        if plan["settings"] != wanted:
            changed = sorted(key for key in wanted if plan["settings"].get(key) != wanted[key])
            raise StudyError(
                f"{path} is a study with other settings ({', '.join(changed)} differ): pass another --output-dir, "
                "or the same flags to resume it"
            )
        return plan
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args, preset, arms, seeds)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return plan


# ---------------------------------------------------------------------------------------------------------- run
def run_arm(args: argparse.Namespace, preset: Preset, plan: dict, arm: str, seed: int) -> dict[str, Any]:
    """Pre-train (pre-trained arms) and fine-tune one arm for one seed; its record (saved as run.json).

    Each stage is done when its wall seconds are in wall.json; an interrupted stage is run again with the same
    command, which resumes from its checkpoint (the seconds before the kill are not counted)."""
    folder = args.output_dir / arm / f"seed_{seed}"
    record_path = folder / "run.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    wall_path = folder / "wall.json"
    wall = json.loads(wall_path.read_text()) if wall_path.exists() else {}
    weights = None
    if arm in PRETRAIN_SCRIPT:
        pretrain_dir = folder / "pretrain"
        if "pretrain" not in wall:
            iters = plan["pretrain_iters"][arm]
            print(f"{arm} seed {seed}: pre-training, {iters} steps", flush=True)
            command = pretrain_command(args, preset, arm, iters=iters, seed=seed, output_dir=pretrain_dir)
            wall["pretrain"] = run(command, log_path=folder / "pretrain.log")
            wall_path.write_text(json.dumps(wall) + "\n")
        weights = pretrain_dir / "export"
    finetune_dir = folder / "finetune"
    iters = plan["finetune_iters"][arm]
    if "finetune" not in wall:
        print(f"{arm} seed {seed}: fine-tuning, {iters} steps", flush=True)
        command = finetune_command(
            args, preset, iters=iters, seed=seed, output_dir=finetune_dir, weights=weights, eval_every=preset.eval_every
        )
        wall["finetune"] = run(command, log_path=folder / "finetune.log")
        wall_path.write_text(json.dumps(wall) + "\n")

    final = json.loads((finetune_dir / "eval.json").read_text())["bbox"]
    history = [json.loads(line) for line in (finetune_dir / "eval_history.jsonl").read_text().splitlines() if line]
    flops = {"finetune": logged_flops(finetune_dir / "log.jsonl")[0]}
    if weights is not None:
        flops["pretrain"] = logged_flops(folder / "pretrain" / "log.jsonl")[0]
    record = {
        "arm": arm,
        "seed": seed,
        "AP": final["AP"],
        "AP50": final["AP50"],
        "curve": [{"iter": row["iter"], "AP": row["bbox"]["AP"], "AP50": row["bbox"]["AP50"]} for row in history],
        "pretrain_iters": plan["pretrain_iters"].get(arm, 0),
        "finetune_iters": iters,
        "flops": {**flops, "total": sum(flops.values())},
        "wall_s": {**wall, "total": sum(wall.values())},
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ------------------------------------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(plan: dict, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean and std of AP and AP50 (fractions), FLOPs and seconds; pairwise verdicts on AP and AP50."""
    arms: dict[str, Any] = {}
    for arm in plan["settings"]["arms"]:
        runs = [record for record in records if record["arm"] == arm]
        if not runs:
            continue
        summary: dict[str, Any] = {"seeds": [record["seed"] for record in runs]}
        for metric in ("AP", "AP50"):
            summary[metric] = dict(zip(("mean", "std"), mean_std([record[metric] for record in runs]), strict=True))
        summary["flops_total_mean"] = statistics.fmean(record["flops"]["total"] for record in runs)
        summary["wall_s_total_mean"] = statistics.fmean(record["wall_s"]["total"] for record in runs)
        summary["pretrain_iters"] = runs[0]["pretrain_iters"]
        summary["finetune_iters"] = runs[0]["finetune_iters"]
        arms[arm] = summary
    verdicts = []
    names = list(arms)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            for metric in ("AP", "AP50"):
                a = [r[metric] for r in records if r["arm"] == first]
                b = [r[metric] for r in records if r["arm"] == second]
                difference = statistics.fmean(a) - statistics.fmean(b)
                # Decided: every seed of one arm above every seed of the other (with one seed, never decided).
                decided = len(a) > 1 and len(b) > 1 and (min(a) > max(b) or min(b) > max(a))
                verdicts.append(
                    {"arms": [first, second], "metric": metric, "difference": difference, "decided": decided}
                )
    return {"plan": plan, "arms": arms, "verdicts": verdicts, "runs": records}


def points(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_table(summary: dict[str, Any]) -> str:
    plan = summary["plan"]
    unit = "equal compute (FLOPs)" if plan["budget_unit"] == "flops" else "equal fine-tuning steps"
    lines = [
        f"Budget: {unit}. AP and AP50 in points, mean ± sample std over seeds {plan['settings']['seeds']}.",
        "",
        "| arm | pre-training steps | fine-tuning steps | AP | AP50 | training TFLOPs | wall min |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, row in summary["arms"].items():
        ap, ap50 = row["AP"], row["AP50"]
        lines.append(
            f"| {ARM_LABELS[arm]} | {row['pretrain_iters'] or '-'} | {row['finetune_iters']} | "
            f"{points(ap['mean'])} ± {points(ap['std'])} | {points(ap50['mean'])} ± {points(ap50['std'])} | "
            f"{row['flops_total_mean'] / 1e12:.1f} | {row['wall_s_total_mean'] / 60:.1f} |"
        )
    lines += ["", "| comparison | metric | difference (points) | decided (every seed above every seed) |"]
    lines += ["| --- | --- | --- | --- |"]
    for verdict in summary["verdicts"]:
        first, second = verdict["arms"]
        lines.append(
            f"| {ARM_LABELS[first]} - {ARM_LABELS[second]} | {verdict['metric']} | "
            f"{100 * verdict['difference']:+.1f} | {'yes' if verdict['decided'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> bool:
    """AP against fine-tuning iterations and against the FLOPs spent (pre-training included), one line per arm:
    the mean over seeds, the seeds' range shaded. False when matplotlib is not installed (the ``plots`` extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(11, 4.2), dpi=100)
    by_iter, by_flops = figure.subplots(1, 2)
    for arm in summary["arms"]:
        runs = [record for record in summary["runs"] if record["arm"] == arm]
        iters = sorted({row["iter"] for record in runs for row in record["curve"]})
        # every seed evaluates at the same iterations: the mean and range at each
        values = [[100 * row["AP"] for record in runs for row in record["curve"] if row["iter"] == i] for i in iters]
        mean = [statistics.fmean(v) for v in values]
        label = f"{ARM_LABELS[arm]} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        line = by_iter.plot(iters, mean, marker="o", label=label)[0]
        low, high = [min(v) for v in values], [max(v) for v in values]
        by_iter.fill_between(iters, low, high, color=line.get_color(), alpha=0.2)
        # FLOPs at an evaluation: the pre-training's, plus the fine-tuning's share so far (steps x mean per step)
        pretrain = statistics.fmean(record["flops"].get("pretrain", 0.0) for record in runs)
        per_step = statistics.fmean(record["flops"]["finetune"] / record["finetune_iters"] for record in runs)
        by_flops.plot([(pretrain + i * per_step) / 1e12 for i in iters], mean, marker="o", color=line.get_color())
    by_iter.set_xlabel("fine-tuning iterations")
    by_flops.set_xlabel("training TFLOPs spent (pre-training + fine-tuning)")
    for axes in (by_iter, by_flops):
        axes.set_ylabel("box AP (points)")
        axes.grid(alpha=0.3)
    by_iter.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


# --------------------------------------------------------------------------------------------------------- main
def parse_list(text: str | None, *, default: tuple, kind: type, what: str, allowed: tuple = ()) -> tuple:
    if text is None:
        return default
    values = tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    unknown = [value for value in values if allowed and value not in allowed]
    if not values or unknown:
        choices = ",".join(map(str, allowed or default))
        raise StudyError(f"--{what} {text!r}: pass a comma-separated list like {choices}")
    return values


def main(args: argparse.Namespace) -> Path:
    preset = PRESETS[args.preset]
    arms = parse_list(args.arms, default=preset.arms, kind=str, what="arms", allowed=ARMS)
    seeds = parse_list(args.seeds, default=preset.seeds, kind=int, what="seeds")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.output_dir is None:
        args.output_dir = Path("runs") / args.preset
    plan = load_or_make_plan(args, preset, arms, seeds)
    records = [run_arm(args, preset, plan, arm, seed) for seed in seeds for arm in arms]
    summary = summarize(plan, records)
    (args.output_dir / RESULTS_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_table(summary)
    (args.output_dir / TABLE_NAME).write_text(table)
    plotted = plot(summary, args.output_dir / PLOT_NAME)
    print(table, end="")
    print(f"{args.output_dir / TABLE_NAME}, {args.output_dir / RESULTS_NAME}", end="")
    print(f", {args.output_dir / PLOT_NAME}" if plotted else " (pip install matplotlib for the plot)")
    return args.output_dir


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except StudyError as error:
        raise SystemExit(f"study: {error}") from None
