"""PreDet's costs: the detection losses' share of a training step, and EdgeBoxes' speed per core.

``step``: train_predet.py's training step (all four losses, Eq. 2) against a classification-only step of the same
model: the same backbone, FPN and classification head with the same initial weights, the same batch of two views per
image, the same optimizer and ``engine.train_step``; only L_crpn, L_info and L_croi-reg (their heads, sampling,
proposals and ROI pooling) are left out. The issue's target: the detection losses cost at most 35% extra. The batch
is real: coco128 photos through train_predet.py's views and queries (PreDetViews, the EdgeBoxes cache), made once
before timing, so data loading is not measured. The two sides alternate step by step in one process (a machine
whose load changes slows both alike); the median per side is reported. On CUDA with bf16 autocast and channels_last,
as train_predet.py runs there.

``flops``: the floating-point operations of the same two steps (forward + backward; convolutions and matrix products,
counted by ``torch.utils.flop_counter``) for several backbones: the floor under the step-time ratio that any
implementation of the model pays. The detection losses add a fixed amount per image (the CRPN's convolutions on
view-1's pyramid, the query-anchor products, the 2-FC box head over 16 + 512 boxes), so the ratio falls as the
backbone grows.

``edgeboxes``: EdgeBoxes images per CPU-second at 480 px (the default ``EdgeBoxesSettings``), decoding included, in
this process alone (``num_workers=0``), so process CPU time is the time of one core whatever the machine's load.
Target: at least 10 images/s per core.

    python benchmarks/bench_predet.py step --device cuda --model resnet50 --batch-size 64 --steps 20
    python benchmarks/bench_predet.py step --device cpu --model resnet18 --view-size 224 --batch-size 8 --steps 5
    python benchmarks/bench_predet.py flops --models resnet50 resnet101 resnext101_32x8d
    python benchmarks/bench_predet.py edgeboxes --images 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from machine_info import machine_lines  # noqa: E402  (benchmarks/machine_info.py, beside this script)

from detpretrain import engine  # noqa: E402
from detpretrain.data.labelled_images import LabelledImageDataset, from_coco  # noqa: E402
from detpretrain.predet.model import LOSS_NAMES, create_predet  # noqa: E402
from detpretrain.predet.views import PreDetViews, ViewSettings, collate_two_views  # noqa: E402
from detpretrain.proposals import EdgeBoxesSettings, ProposalCache, compute_proposal_cache  # noqa: E402

COCO128 = REPO_ROOT.parent / "shared" / "data" / "coco128"
SEED = 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["step", "flops", "edgeboxes"])
    parser.add_argument("--train-images", type=Path, default=COCO128 / "images")
    parser.add_argument("--train-ann", type=Path, default=COCO128 / "annotations" / "instances_train2017.json")
    parser.add_argument("--proposals", type=Path, help="EdgeBoxes cache of those images (default: computed here)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--view-size", type=int, default=480, help="§4.1: 480")
    parser.add_argument("--batch-size", type=int, default=64, help="views per step (two per image)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="bf16", choices=["off", "bf16"], help="autocast on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--images", type=int, default=64, help="edgeboxes: images to time")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["resnet50", "resnet101", "resnext101_32x8d"],
        help="flops: the backbones to count (run with --batch-size 2: one image, the counts are per image)",
    )
    return parser


# -------------------------------------------------------------------------------------------------------- step
def proposals_of(args: argparse.Namespace, tmp: Path) -> Path:
    """The EdgeBoxes cache of the training images: --proposals, or computed into ``tmp`` (untimed)."""
    if args.proposals is not None:
        return args.proposals
    path = tmp / "proposals.edgeboxes"
    images = from_coco(args.train_ann, args.train_images, on_bad_row="skip")
    compute_proposal_cache(images, path, num_workers=os.cpu_count() or 1)
    return path


def fixed_batch(args: argparse.Namespace, proposals_path: Path):
    """One batch of train_predet.py's two views with their queries, from real photos (made once, untimed)."""
    images = from_coco(args.train_ann, args.train_images, on_bad_row="skip")
    proposals = ProposalCache(proposals_path)
    views = PreDetViews(proposals, settings=ViewSettings(output_size=args.view_size))
    dataset = LabelledImageDataset(images)
    num_images = args.batch_size // 2
    samples = [
        views(dataset[i % len(dataset)], generator=engine.sample_generator(SEED, 0, i)) for i in range(num_images)
    ]
    return collate_two_views(samples), images.num_classes


def make_step(losses: tuple[str, ...], args, batch, num_classes: int, device: torch.device, init_state=None):
    """A function running one train_predet.py step of a PreDet with these ``losses`` on the fixed batch."""
    torch.manual_seed(SEED)
    model = create_predet(args.model, num_classes=num_classes, losses=losses)
    if init_state is not None:  # the classification-only model starts from the full model's weights
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        assert not missing, missing
    memory_format = engine.memory_format(device)
    model = model.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = engine.make_grad_scaler(device, amp=args.amp)
    dist_info = engine.DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True, distributed=False)
    on_device = (
        batch.images.to(device).contiguous(memory_format=memory_format),
        batch.queries_view1.to(device),
        batch.queries_view2.to(device),
        batch.query_valid.to(device),
        batch.labels,  # on the CPU, as train_predet.py passes them
    )

    def compute_losses(_):
        return {name: value.float() for name, value in model(*on_device).items()}

    def step(i: int) -> dict[str, float]:
        return engine.train_step(
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            batches=iter([None]),
            compute_losses=compute_losses,
            accum_steps=1,
            step=i,
            dist_info=dist_info,
            amp=args.amp,
        )

    return model, step


def bench_step(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        args.amp = "off"
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        batch, num_classes = fixed_batch(args, proposals_of(args, Path(tmp)))
    full_model, full_step = make_step(LOSS_NAMES, args, batch, num_classes, device)
    init = {k: v for k, v in full_model.state_dict().items() if k.startswith(("fpn.", "cls_head."))}
    _, cls_step = make_step(("cls",), args, batch, num_classes, device, init_state=init)
    sides = {"all four losses": full_step, "classification only": cls_step}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.warmup + args.steps):
        for name in list(sides) if i % 2 == 0 else list(sides)[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sides[name](i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t[args.warmup :]) for name, t in times.items()}
    ratio = median["all four losses"] / median["classification only"]
    queries = int(batch.query_valid.sum())
    amp = f", {args.amp} autocast + channels_last" if device.type == "cuda" and args.amp != "off" else ", fp32"
    print(
        "\n".join(
            [
                f"### PreDet step: all losses vs classification only ({args.device})",
                "",
                *machine_lines(args.device),
                f"- load average at the end: {os.getloadavg()[0]:.1f}",
                f"- setup: {args.model} + FPN (256), {args.batch_size} views of {args.view_size} px "
                f"({batch.num_images} coco128 images, {queries} queries), SGD{amp}; {args.warmup} warmup + "
                f"{args.steps} timed steps per side, alternating; {torch.get_num_threads()} torch threads",
                "",
                "| step | median (s) | fastest (s) |",
                "|---|---|---|",
                *(f"| {name} | {median[name]:.4f} | {min(times[name][args.warmup :]):.4f} |" for name in sides),
                "",
                f"- all losses / classification only: {ratio:.3f} (target <= 1.35)",
            ]
        )
    )


# ------------------------------------------------------------------------------------------------------- flops
def bench_flops(args: argparse.Namespace) -> None:
    """Counted FLOPs of one training step per side and backbone, on the same real batch (run on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    if args.threads:
        torch.set_num_threads(args.threads)
    args.amp, device = "off", torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proposals = proposals_of(args, Path(tmp))
        for name in args.models:
            args.model = name
            batch, num_classes = fixed_batch(args, proposals)
            flops = {}
            for side, losses in (("all", LOSS_NAMES), ("cls", ("cls",))):
                _, step = make_step(losses, args, batch, num_classes, device)
                with FlopCounterMode(display=False) as counter:
                    step(0)
                flops[side] = counter.get_total_flops() / 1e9 / batch.num_images
            rows.append(
                f"| {name} | {flops['cls']:.1f} | {flops['all']:.1f} | {flops['all'] - flops['cls']:.1f} | "
                f"{flops['all'] / flops['cls']:.3f} |"
            )
    print(
        "\n".join(
            [
                "### PreDet step FLOPs: all losses vs classification only",
                "",
                *machine_lines("cpu"),
                f"- setup: {args.batch_size} views of {args.view_size} px per step, FPN 256, the real coco128 batch "
                "of `step`; forward + backward, convolutions and matrix products (torch.utils.flop_counter)",
                "",
                "| backbone | classification only (GFLOPs per image) | all four losses | extra | ratio |",
                "|---|---|---|---|---|",
                *rows,
            ]
        )
    )


# --------------------------------------------------------------------------------------------------- edgeboxes
def bench_edgeboxes(args: argparse.Namespace) -> None:
    images = from_coco(args.train_ann, args.train_images, on_bad_row="skip")
    images = images.select(np.arange(len(images)) < args.images, reasons={})
    settings = EdgeBoxesSettings()
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        cache = compute_proposal_cache(images, Path(tmp) / "p.edgeboxes", settings=settings, num_workers=0).cache
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        boxes = sum(cache.shard(k).header["num_boxes"] for k in range(cache.num_shards)) / len(cache)
    print(
        "\n".join(
            [
                "### EdgeBoxes images per core (480 px, decoding included)",
                "",
                *machine_lines("cpu"),
                f"- load average at the end: {os.getloadavg()[0]:.1f}",
                f"- setup: {len(images)} coco128 photos, one process (num_workers=0), settings {settings.record()}",
                "",
                f"- images per CPU-second: {len(images) / cpu:.1f} (target >= 10); wall: {len(images) / wall:.1f} "
                f"images/s; {boxes:.1f} boxes per image",
            ]
        )
    )


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    {"step": bench_step, "flops": bench_flops, "edgeboxes": bench_edgeboxes}[arguments.what](arguments)
