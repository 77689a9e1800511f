"""finetune.py's training step against torchvision's reference recipe step: same model, data and settings.

The target from the fine-tuning issue: on a CPU, finetune.py's step is not slower (time ratio <= 1.0) and takes no
more peak memory than what torchvision's ``references/detection`` ``train_one_epoch`` does per iteration; on a GPU,
finetune.py with bf16 autocast and channels_last is at least 1.3x faster than that fp32 reference.

Both sides train the same torchvision ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` (91 classes,
trained BatchNorm, every layer trainable; initialized from the same seed), so the recipes are compared, not the
backbones, with SGD (momentum 0.9, weight decay 1e-4), batch --batch-size, short side --size (long side <= 1333),
horizontal flip 0.5, on the same images in the same order (COCO-format photos, ../shared/data/coco128 by default):

- reference: the dataset's uint8 image -> ``ConvertImageDtype(float)`` -> ``RandomHorizontalFlip(0.5)`` (the
  references' ``get_transform(train=True)`` after ``PILToTensor``; both sides decode with the same reader), batched
  by a DataLoader; per iteration, as ``train_one_epoch``: images and targets to the device, ``model(images,
  targets)``, sum the losses, ``loss.item()`` and its finiteness check, ``zero_grad``, ``backward``, ``step``; the
  model's own GeneralizedRCNNTransform resizes each float image to --size.
- finetune.py: its own pieces, imported from the script: the dataset transform ``train_transform(protocol)`` (resize
  the uint8 image to --size, then flip, drawn from the sample's generator) through ``engine.StepSeededDataset`` /
  ``StepBatchSampler`` / ``make_loader``; per step ``engine.set_lr`` and ``engine.train_step`` over the script's
  ``images_to_device`` / ``targets_to_device`` (uint8 to the device, float there), with the model's transform
  swapped for ``ProtocolTransform(train_resize="dataset")`` as ``build_detector`` wires it (the dataset resized).
  With ``--device cuda --amp bf16`` also bf16 autocast and channels_last, as finetune.py uses them on a GPU.

Time: one process holds both sides and alternates them step by step (a machine whose load changes, as a shared
CI box does, slows both alike): --warmup untimed steps, then --steps timed ones, each fetching its batch and
stepping; the median per side, then the median over --repeats processes. Memory: each side alone in its own
process (1 + 2 steps): peak RSS (VmHWM) on the CPU, peak allocated memory on CUDA.
It prints a markdown block (machine, versions, command, figures) for benchmarks/RESULTS.md.

    python benchmarks/bench_finetune.py                                   # CPU: batch 2, 512 px, 2 + 10 steps
    python benchmarks/bench_finetune.py --repeats 3 --threads 2
    python benchmarks/bench_finetune.py --device cuda --amp bf16 --steps 50 --warmup 10   # the GPU target
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from torchvision.models.detection import fasterrcnn_resnet50_fpn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from machine_info import machine_lines  # noqa: E402  (benchmarks/machine_info.py, beside this script)

import finetune  # noqa: E402  (the script under test, from the repository root)
from detpretrain import engine  # noqa: E402
from detpretrain.data.coco import CocoDataset  # noqa: E402
from detpretrain.data.detection import collate_detection  # noqa: E402
from detpretrain.data.transforms import SampleTransform  # noqa: E402
from detpretrain.detection import ProtocolTransform, get_protocol, override_protocol  # noqa: E402

COCO128 = REPO_ROOT.parent / "shared" / "data" / "coco128"
SEED = 0
LR, MOMENTUM, WEIGHT_DECAY = 0.02 * 2 / 16, 0.9, 1e-4  # the references' lr 0.02 at batch 16, scaled to batch 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=Path, default=COCO128 / "images")
    parser.add_argument("--train-ann", type=Path, default=COCO128 / "annotations" / "instances_train2017.json")
    parser.add_argument("--size", type=int, default=512, help="training short side, both sides")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--repeats", type=int, default=1, help="timing processes (each times both sides)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="off", choices=["off", "bf16"], help="finetune.py side only (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-channels-last", action="store_true", help="finetune side in NCHW (an experiment)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers, both sides")
    # the measuring processes: "both" times the two sides alternating; one side alone measures its memory
    parser.add_argument("--side", choices=["both", "reference", "finetune"], help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------ one process
def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM: this benchmark measures memory on Linux only")


def build_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(SEED)  # the same initial weights on both sides
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).to(device)


class ReferenceTransform:
    """references/detection get_transform(train=True): PILToTensor (done by the reader), ConvertImageDtype(float),
    RandomHorizontalFlip(0.5), on (image, target) with tv_tensors, as the references' v2 path applies them."""

    def __init__(self) -> None:
        self.transform = T.Compose([T.ToDtype(torch.float32, scale=True), T.RandomHorizontalFlip(0.5)])

    def __call__(self, sample):
        return self.transform(*sample)


class Mapped(torch.utils.data.Dataset):
    def __init__(self, base, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        return self.transform(self.base[index])


def make_step(side: str, args: argparse.Namespace, dataset: CocoDataset, device: torch.device):
    """A function running one training step of ``side`` (fetching its batch included) on its own model."""
    total = args.warmup + args.steps
    model = build_model(device)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    if side == "reference":
        model.transform.min_size, model.transform.max_size = (args.size,), 1333
        # The same images in the same order as the finetune side: the engine's step order.
        order = [
            engine.global_batch_indices(step, dataset_size=len(dataset), global_batch_size=args.batch_size, seed=SEED)
            for step in range(total)
        ]
        loader = torch.utils.data.DataLoader(
            Mapped(dataset, ReferenceTransform()),
            batch_sampler=order,
            num_workers=args.num_workers,
            collate_fn=collate_detection,
            pin_memory=device.type == "cuda",
        )
        batches = iter(loader)

        def reference_step(step: int) -> None:
            images, targets = next(batches)
            # references/detection/engine.py train_one_epoch, one iteration (one process, no AMP: its default)
            images = [image.to(device) for image in images]
            targets = [
                {k: v.as_subclass(torch.Tensor).to(device) for k, v in t.items() if isinstance(v, torch.Tensor)}
                for t in targets
            ]
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
            loss_value = losses.item()
            if not torch.isfinite(torch.tensor(loss_value)):
                raise RuntimeError(f"loss is {loss_value}, stopping training")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()

        model.train()
        return reference_step

    protocol = override_protocol(
        get_protocol("standard"), train_min_sizes=(args.size,), test_min_size=args.size, random_crop=None
    )
    model.transform = ProtocolTransform(
        train_min_sizes=protocol.train_min_sizes,
        train_max_size=protocol.train_max_size,
        test_min_size=protocol.test_min_size,
        test_max_size=protocol.test_max_size,
        image_mean=model.transform.image_mean,
        image_std=model.transform.image_std,
        train_resize="dataset",
    )
    model.to(memory_format=engine.memory_format(device, channels_last=not args.no_channels_last))
    model.train()
    sampler = engine.StepBatchSampler(
        dataset_size=len(dataset), batch_size=args.batch_size, seed=SEED, start_step=0, total_steps=total
    )
    loader = engine.make_loader(
        engine.StepSeededDataset(dataset, transform=SampleTransform(finetune.train_transform(protocol)), seed=SEED),
        batch_sampler=sampler,
        num_workers=args.num_workers,
        seed=SEED,
        collate_fn=collate_detection,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    scaler = engine.make_grad_scaler(device, amp=args.amp)
    dist_info = engine.setup_distributed(args.device)

    def compute_losses(batch):
        images, targets = batch
        images = finetune.images_to_device(images, device)
        return model(images, finetune.targets_to_device(targets, device, with_masks=False))

    def finetune_step(step: int) -> None:
        engine.set_lr(optimizer, LR)
        engine.train_step(
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            batches=batches,
            compute_losses=compute_losses,
            accum_steps=1,
            step=step,
            dist_info=dist_info,
            amp=args.amp,
        )

    return finetune_step


def measure(args: argparse.Namespace) -> dict:
    """``--side both``: step times, the two sides alternating step by step in this process (so that a machine whose
    load changes slows both alike). ``--side reference|finetune``: that side alone, for its peak memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = CocoDataset(args.train_ann, args.train_images)
    sides = ("reference", "finetune") if args.side == "both" else (args.side,)
    steps = {side: make_step(side, args, dataset, device) for side in sides}
    times: dict[str, list[float]] = {side: [] for side in sides}
    for step in range(args.warmup + args.steps):
        for side in sides if step % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            steps[side](step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - start)
    result = {"threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    for side in sides:
        timed = times[side][args.warmup :]
        result[side] = {
            "median_s": statistics.median(timed),
            "mean_s": statistics.fmean(timed),
            "min_s": min(timed),
            "steps_s": [round(t, 4) for t in timed],
        }
    return result


# ---------------------------------------------------------------------------------------------------- driver
def run_side(side: str, extra: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], *extra, "--side", side]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {side} process failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"{side}: {result}", file=sys.stderr, flush=True)
    return result


def main(args: argparse.Namespace) -> None:
    if args.side is not None:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    if args.amp != "off" and args.device != "cuda":
        raise SystemExit("--amp bf16 is the GPU comparison: pass --device cuda (autocast is off on the CPU)")
    header = [
        *machine_lines(args.device),
        f"- load average when it started: {os.getloadavg()[0]:.1f} (figures are wall-clock)",
    ]
    timing = [run_side("both", []) for _ in range(args.repeats)]
    # Peak memory: each side alone in its own process; the peak comes in the first steps.
    memory = {side: run_side(side, ["--warmup", "1", "--steps", "2"]) for side in ("reference", "finetune")}

    def time_of(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in timing)

    memory_key = "cuda_peak_mib" if args.device == "cuda" else "peak_rss_mib"
    label = "peak CUDA allocated" if args.device == "cuda" else "peak RSS of the process"
    amp = f", {args.amp} autocast + channels_last" if args.device == "cuda" and args.amp != "off" else ""
    rows = [
        f"| side | median step (s) | mean step (s) | fastest step (s) | {label} (MiB) |",
        "|---|---|---|---|---|",
    ]
    for side, name in (("reference", "torchvision references/detection step, fp32"), ("finetune", f"finetune.py{amp}")):
        rows.append(
            f"| {name} | {time_of(side, 'median_s'):.2f} | {time_of(side, 'mean_s'):.2f} | "
            f"{time_of(side, 'min_s'):.2f} | {memory[side][memory_key]:.0f} |"
        )
    ratio = time_of("finetune", "median_s") / time_of("reference", "median_s")
    memory_ratio = memory["finetune"][memory_key] / memory["reference"][memory_key]
    print(
        "\n".join(
            [
                f"### finetune.py step vs torchvision's reference step ({args.device})",
                "",
                *header,
                f"- setup: torchvision fasterrcnn_resnet50_fpn(weights=None), batch {args.batch_size}, short side "
                f"{args.size}, flip 0.5, SGD; both sides alternating step by step in one process, {args.warmup} "
                f"warmup + {args.steps} timed steps each, x{args.repeats} process(es); memory from one process per "
                f"side; {timing[0]['threads']} torch threads, {args.num_workers} loader workers; data {args.train_ann}",
                "",
                *rows,
                "",
                f"- time ratio finetune.py / reference (medians): {ratio:.3f} (target <= 1.0 on a CPU; on a GPU with "
                f"bf16 the speed-up is {1 / ratio:.2f}x, target >= 1.3x)",
                f"- peak memory ratio finetune.py / reference: {memory_ratio:.3f} (target <= 1.0)",
            ]
        )
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
