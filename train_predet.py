"""PreDet pre-training: multi-label classification plus contrastive query-box lookup (Ramanathan et al., ICCV 2021;
papers/predet.txt).

Every image gives two MoCo-v2 views at 480 x 480 and 16 query boxes sampled from its EdgeBoxes proposals, carried
into both views (§3.2, §4.1). A timm backbone with an FPN learns four losses at once (Eq. 1, 2): the image-level
multi-label classification on every pyramid level (L_cls, §3.1), the contrastive RPN that finds each query's
region in view-1 (L_crpn, §3.2.1), and the contrastive ROI head that picks the query's box among the proposals
(L_info, InfoNCE at temperature 0.07) and regresses it (L_croi-reg, §3.2.2). The backbone (and, optionally, the
FPN and heads) is then exported for timm and fine-tuning (finetune.py).

The defaults are the paper's recipe (§4.1): 540k iterations of 1024 views (512 images x 2), lr 0.2 dropped by 0.1
at 108k, 216k, 324k and 432k ("four uniform steps"), SGD; detectron2's Faster R-CNN defaults where the paper defers
to them: momentum 0.9, weight decay 1e-4 (none on norm layers), a linear warmup over 1000 iterations from 0.001 x
the lr, and the anchor, NMS, pooling and sampling settings of ``detpretrain.predet.PreDetConfig``, each recorded
in the model card with where it comes from. The paper trains on IG-50M (49.93M Instagram images whose hashtags map to
1209 LVIS classes) or ImageNet-1k. BatchNorm is trained, its statistics per process unless --sync-bn (the paper does
not say; 1024 views on 128 GPUs is 8 views per GPU).

    # the paper's setting: 1024 views per step, e.g. 64 GPUs x 16 views
    torchrun --nnodes 8 --nproc_per_node 8 ... train_predet.py --model resnext101_32x8d --batch-size 16 \\
        --train-images imagenet/train --output-dir out/x101   # an ImageNet-style class-folder tree
    # weakly-labelled web data as WebDataset tar shards (image + .json/.cls label per sample), streamed
    torchrun --nnodes 8 --nproc_per_node 8 ... train_predet.py --model resnext101_32x8d --batch-size 16 \\
        --train-shards 'ig/shard-{000000..049999}.tar' --class-names ig/classes.txt --output-dir out/x101_ig
    # one 8-GPU machine, the same global batch by gradient accumulation
    torchrun --nproc_per_node 8 train_predet.py --model resnet50 --batch-size 32 --accum-steps 4 \\
        --train-images photos/ --train-ann labels.jsonl --output-dir out/r50
    # a smaller global batch instead: the lr is scaled linearly (lr x global batch / 1024), say so in your report
    # image-level labels from a COCO / LVIS json (boxes ignored; images without labels are left out and counted)
    python train_predet.py --train-images coco/train2017 --train-ann instances_train2017.json ...
    # ... or from your own detection data: Pascal-VOC XML (any layout) or YOLO (labels = the classes in each image)
    python train_predet.py --format voc --train-images photos/ --train-ann xml/ --train-split train.txt ...
    python train_predet.py --format yolo --train-ann data.yaml ...
    # CPU smoke run on the embedded default dataset (no data flags)
    python train_predet.py --model resnet18 --view-size 160 --iters 30 --warmup-iters 5 --batch-size 8 --device cpu

Query boxes (EdgeBoxes, through OpenCV's contrib module: ``pip install "detpretrain[proposals]"``) are computed
once per dataset into a cache folder, OUTPUT_DIR/proposals.edgeboxes (or --proposals DIR), by every rank of the job
(each its share of the shards, in --proposal-workers processes); a killed run continues it, a bad image is left out
and named in its skipped.jsonl, and the settings it records are used (an --edge-* flag that contradicts them stops
the run). ``torchrun ... -m detpretrain.proposals`` makes it beforehand, e.g. on a CPU cluster. Every rank reads
the labels itself into a compact array index (no broadcast, no rank waiting on another); ``--dist-timeout`` bounds
any wait at a collective. A run with ``--losses cls`` needs no cache.

Outputs in --output-dir: proposals.edgeboxes/, args.json, log.jsonl (every loss term), checkpoint.pth (resume with
--resume auto), export/ (model.safetensors, config.json, README.md, fpn.safetensors unless --no-export-fpn, and
heads.safetensors, the heads fine-tuning starts from, see --export-heads): load it with timm.create_model(ARCH,
pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=".../model.safetensors")) or finetune.py
--backbone-weights OUT/export, which also initializes the detector's FPN, RPN conv and box head from it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import detpretrain
from detpretrain import engine
from detpretrain.data import labelled_images, tar_shards
from detpretrain.data.labelled_images import LabelledImageDataset, LabelledImages, LabelledSample
from detpretrain.data.sources import DataFlags, add_data_arguments, load_detection_data
from detpretrain.data.synthetic import synthetic_coco
from detpretrain.data.tar_shards import DEFAULT_SHUFFLE_BUFFER
from detpretrain.detection.predet_heads import HEAD_INIT
from detpretrain.detection.protocols import NORM_MODULES
from detpretrain.predet.model import LOSS_NAMES, PreDet, PreDetConfig, create_predet
from detpretrain.predet.views import (
    PreDetSample,
    PreDetViews,
    ViewSettings,
    collate_two_views,
    images_per_batch,
    two_views,
)
from detpretrain.proposals import (
    DEFAULT_SHARD_SIZE,
    ProposalCache,
    add_settings_flags,
    compute_proposal_cache,
    compute_tar_proposal_cache,
    resolve_settings,
    settings_overrides,
)
from detpretrain.zoo import PREDET_PAPER

PAPER_GLOBAL_BATCH = 1024  # views per step in §4.1 (512 images x 2); --lr is for this batch
QUERY_LOSSES = frozenset({"crpn", "info", "croi_reg"})  # the terms that need query boxes
PROPOSALS_NAME = "proposals.edgeboxes"
# How the images are checked and the proposals computed, not what is trained (the cache checks its own content):
# free on resume, like the worker counts.
RESUME_IGNORE = engine.DEFAULT_RESUME_IGNORE | {"proposal_workers", "proposal_shard_size", "proposals", "verify_images"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("PreDet pre-training", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (no data flags: the embedded default dataset)")
    data.add_argument(
        "--train-images", type=Path, help="image folder (with --train-ann), or an ImageNet-style class-folder tree"
    )
    data.add_argument("--train-ann", type=Path, help="COCO/LVIS json (image-level labels), or a .jsonl/.csv label file")
    data.add_argument(
        "--train-shards",
        help="WebDataset tar shards instead (a brace pattern, a folder of .tar, or a list file; image + .json or "
        ".cls label per sample), streamed with the shards split per rank and per worker; needs --class-names",
    )
    data.add_argument(
        "--class-names",
        type=Path,
        help="class list, one per line (required with --train-shards; .jsonl/.csv labels: default sorted); also "
        "a,b,c for --format voc / yolo (default: the data yaml's names, or the sorted classes of the XML files)",
    )
    # --format voc / yolo (detection annotations; labels = the classes present in each image), VOCdevkit sets and a
    # split file: the shared flags of detpretrain.data.sources. Without --format, --train-ann's extension decides.
    add_data_arguments(
        data,
        flags=("--voc-root", "--train-sets", "--train-split"),
        default_format=None,
        format_help="read detection annotations as image-level labels (voc: XML in any layout, yolo: labels/*.txt "
        "or a data yaml); default: by --train-ann (.json COCO/LVIS, .jsonl/.csv label file, none: class folders)",
    )
    data.add_argument(
        "--shuffle-buffer",
        type=int,
        default=DEFAULT_SHUFFLE_BUFFER,
        help="--train-shards: samples shuffled together inside a shard",
    )
    data.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip and count bad rows (unknown labels, missing or undecodable images) instead of stopping",
    )
    data.add_argument(
        "--verify-images",
        action="store_true",
        help="decode every image once before training (with --losses cls; the EdgeBoxes pass of the other losses "
        "decodes every image anyway)",
    )

    queries = parser.add_argument_group("queries (§3.2, §4.1): EdgeBoxes, computed once per dataset by every rank")
    queries.add_argument(
        "--proposals",
        type=Path,
        help=f"proposal cache folder to write, continue or reuse; default OUTPUT_DIR/{PROPOSALS_NAME}",
    )
    queries.add_argument(
        "--proposal-workers",
        type=int,
        default=engine.cores_per_local_rank(),
        help="EdgeBoxes (and image check) processes per rank (default: this rank's share of the node's cores)",
    )
    queries.add_argument(
        "--proposal-shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per cache shard (unit of resume)"
    )
    queries.add_argument("--num-queries", type=int, default=16, help="queries sampled per image per step (§4.1: 16)")
    add_settings_flags(queries)

    views = parser.add_argument_group("views (§3.3, §4.1)")
    views.add_argument("--view-size", type=int, default=480, help="both views are S x S (§4.1: 480)")

    model = parser.add_argument_group("model and losses (§3)")
    model.add_argument("--model", default="resnet50", help="timm architecture (a features_only CNN)")
    model.add_argument(
        "--losses",
        default=",".join(LOSS_NAMES),
        help=f"comma-separated subset of {','.join(LOSS_NAMES)} (Tab. 1 ablation; without crpn the CROI head trains "
        "on random boxes)",
    )
    model.add_argument("--fpn-channels", type=int, default=256, help="FPN width (detectron2 default: 256)")
    model.add_argument(
        "--sync-bn",
        action="store_true",
        help="SyncBatchNorm: BN statistics over every process's views (CUDA only); default: each process normalizes "
        "its own views (the paper does not say; 8 views per GPU in its setting)",
    )
    model.add_argument(
        "--predet-config",
        nargs="+",
        action="extend",  # repeated flags add up
        default=[],
        metavar="KEY=VALUE",
        help="override PreDetConfig fields, e.g. temperature=0.1 crpn_post_nms_topk=500 (values as JSON)",
    )

    optim = parser.add_argument_group("optimization (§4.1)")
    optim.add_argument("--iters", type=int, default=540_000, help="optimizer steps (§4.1: 540k)")
    optim.add_argument("--batch-size", type=int, default=16, help="views per process per micro-step (even)")
    optim.add_argument("--accum-steps", type=int, default=1, help="micro-steps per optimizer step")
    optim.add_argument("--lr", type=float, default=0.2, help="lr at a global batch of 1024 views (§4.1: 0.2)")
    optim.add_argument(
        "--lr-steps",
        type=int,
        nargs="*",
        help="steps where the lr drops by 0.1; default: at 1/5 .. 4/5 of --iters (§4.1: 108k, 216k, 324k, 432k)",
    )
    optim.add_argument("--warmup-iters", type=int, default=1000, help="linear warmup (detectron2 default: 1000)")
    optim.add_argument("--warmup-factor", type=float, default=0.001, help="warmup starts at this x lr (detectron2)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (detectron2 default)")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="detectron2 default")
    optim.add_argument("--norm-weight-decay", type=float, default=0.0, help="on norm layers (detectron2 default: 0)")
    optim.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (off, as in detectron2)")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, default=Path("runs/predet"))
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    run.add_argument("--amp", default="bf16", choices=["off", "bf16"], help="autocast on CUDA (ignored on CPU)")
    run.add_argument(
        "--num-workers",
        type=int,
        default=engine.default_num_workers(),
        help="data-loader processes per process (default: this rank's share of the node's cores, less one)",
    )
    run.add_argument(
        "--dist-timeout",
        type=float,
        default=engine.DEFAULT_DIST_TIMEOUT_MINUTES,
        help="minutes a rank waits for the others at a collective (torchrun)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    run.add_argument("--resume", default=None, help="'auto' continues OUTPUT_DIR/checkpoint.pth if present, or a path")
    run.add_argument("--save-every", type=int, default=2000, help="checkpoint every N steps (and at the end)")
    run.add_argument("--log-every", type=int, default=20, help="log.jsonl row every N steps")
    run.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    run.add_argument(
        "--max-bad-image-fraction",
        type=float,
        default=engine.DEFAULT_MAX_BAD_IMAGE_FRACTION,
        help="training skips an image that went bad after the checks (undecodable, truncated, empty, of another size "
        "than the proposal cache recorded), replaces it and reports it in log.jsonl and the model card; more than this "
        "share of the training images stops the run",
    )
    run.add_argument(
        "--count-flops",
        action="store_true",
        help="count each step's FLOPs (torch.utils.flop_counter) into log.jsonl's flops: the study's compute unit",
    )
    run.add_argument("--no-export-fpn", action="store_true", help="export the backbone only, not fpn.safetensors")
    run.add_argument(
        "--export-heads",
        nargs="?",
        const="all",
        default="transfer",
        choices=["transfer", "all", "none"],
        help="heads.safetensors: the heads finetune.py starts from (transfer: the CRPN conv and the CROI box head, "
        "default), every PreDet head (all; the flag alone), or none",
    )
    run.add_argument("--tag", default="predet", help="the timm pretrained tag the export is for")
    run.add_argument("--license", default="apache-2.0", help="license of the exported weights (model card)")
    return parser


# ------------------------------------------------------------------------------------------------------ settings
def parse_losses(text: str) -> tuple[str, ...]:
    losses = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(losses) - set(LOSS_NAMES))
    if unknown or not losses:
        raise SystemExit(f"--losses {text!r}: use a comma-separated subset of {','.join(LOSS_NAMES)}")
    return tuple(name for name in LOSS_NAMES if name in losses)


def predet_config(overrides: list[str]) -> PreDetConfig:
    """PreDetConfig with the --predet-config KEY=VALUE overrides (JSON values; lists become tuples)."""
    fields = {f.name for f in dataclasses.fields(PreDetConfig)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--predet-config {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string
        changes[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return dataclasses.replace(PreDetConfig(), **changes)


def lr_milestones(args: argparse.Namespace) -> list[int]:
    """The lr drops: --lr-steps, or "four uniform steps" (§4.1) at 1/5 .. 4/5 of --iters."""
    if args.lr_steps is not None:
        return sorted(args.lr_steps)
    return [args.iters * k // 5 for k in range(1, 5)]


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.warmup_iters < args.iters:
        raise SystemExit(f"--warmup-iters {args.warmup_iters} must be below --iters {args.iters}: pass a shorter one")
    try:
        images_per_batch(args.batch_size)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    yolo_yaml = args.format == "yolo" and args.train_ann is not None and args.train_ann.suffix in (".yaml", ".yml")
    if args.train_ann is not None and args.train_images is None and not yolo_yaml:
        raise SystemExit("--train-ann needs --train-images (the folder its file names are relative to)")
    if args.format not in ("voc", "yolo") and (args.train_split is not None or args.voc_root is not None):
        raise SystemExit("--train-split and --voc-root are for --format voc / yolo")
    if args.train_shards is not None and args.train_images is not None:
        raise SystemExit("pass --train-shards (tar shards) or --train-images (files), not both")
    if args.train_shards is not None and args.class_names is None:
        raise SystemExit(
            "--train-shards needs --class-names FILE (one class per line): the classes of a stream cannot be known "
            "before every shard is read"
        )


# ------------------------------------------------------------------------------------------------------------ data
def read_labelled_images(args: argparse.Namespace) -> LabelledImages:
    """The image-level labels of the data flags (a COCO/LVIS json, a .jsonl/.csv file, a class-folder tree), or of
    the embedded default dataset. Every rank reads them itself (the same arrays everywhere: no broadcast, and no rank
    waits for another); bad label rows stop the run, or are skipped and counted with --skip-bad-rows."""
    policy = "skip" if args.skip_bad_rows else "error"
    if args.format in ("voc", "yolo"):  # detection annotations: labels = the classes of each image's boxes
        try:
            train, _ = load_detection_data(DataFlags.from_namespace(args))
            return labelled_images.from_detection_dataset(train)
        except ValueError as error:  # DatasetError included
            raise SystemExit(str(error)) from None
    train_images, train_ann = args.train_images, args.train_ann
    if train_images is None:
        default = synthetic_coco()
        train_images, train_ann = default.train_images, default.train_ann
    try:
        # A COCO/LVIS image without labels is left out and counted (in the summary the log and model card show).
        return labelled_images.read_labelled_images(
            train_images,
            train_ann,
            class_names=args.class_names,
            on_bad_row=policy,
            skip_unlabelled=True,
            skip_hint="--skip-bad-rows",
        )
    except labelled_images.BadRowError as error:
        raise SystemExit(str(error)) from None
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as error:
        raise SystemExit(str(error)) from None


def prepare_proposals(args, source, dist_info: engine.DistInfo) -> tuple[ProposalCache, list[dict]]:
    """The dataset's EdgeBoxes cache (``source``: a LabelledImages, or a list of tar shards), computed by every rank
    (each its share of the shards, in parallel workers), continued after a kill, or reused; its settings are the
    cache's own unless a flag says otherwise (a conflict stops the run, naming the field). Returns the cache and
    every image it skipped (``{"shard", "row", "image", "reason"}``)."""
    path = args.proposals or args.output_dir / PROPOSALS_NAME
    work = dict(num_workers=args.proposal_workers, dist_info=dist_info, progress=not args.quiet)
    try:
        settings = resolve_settings(path, settings_overrides(args))
        if isinstance(source, LabelledImages):
            run = compute_proposal_cache(source, path, settings=settings, shard_size=args.proposal_shard_size, **work)
        else:
            run = compute_tar_proposal_cache(source, path, settings=settings, **work)
    except ImportError as error:
        needs = f"train_predet.py needs it for the query boxes of --losses {args.losses}"
        raise SystemExit(f"{error} ({needs})") from None
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from None
    return run.cache, run.skipped


def check_image_files(args, images: LabelledImages, dist_info: engine.DistInfo) -> dict:
    """Without queries there is no EdgeBoxes pass to look at every image: check that each file exists (decode it
    with --verify-images), the rows shared by every rank. Returns the bad rows (row -> reason)."""
    status = labelled_images.image_status(
        images,
        decode=args.verify_images,
        num_workers=args.proposal_workers,
        dist_info=dist_info,
        progress=not args.quiet,
    )
    return {int(i): labelled_images.STATUS_REASONS[status[i]] for i in np.flatnonzero(status)}


def usable_rows(args, images: LabelledImages, bad: dict) -> np.ndarray | None:
    """The rows training draws from: all (None) when no image is bad, else the good ones with --skip-bad-rows; without
    it the first bad image stops the run, named with its reason and the flag."""
    if not bad:
        return None
    if not args.skip_bad_rows:
        row = min(bad)
        raise SystemExit(
            f"{images.path(row)}: {bad[row]} (row {row}; {len(bad)} bad images in all); replace or remove it, or pass "
            "--skip-bad-rows to skip such images and count them"
        )
    keep = np.ones(len(images), dtype=bool)
    keep[list(bad)] = False
    if not keep.any():
        raise SystemExit(f"{images.source}: no image is usable ({len(bad)} bad: {dict(Counter(bad.values()))})")
    rows = np.flatnonzero(keep)
    return rows.astype(np.uint32) if len(images) <= np.iinfo(np.uint32).max else rows  # 4 bytes per row


class TrainImages(torch.utils.data.Dataset):
    """The usable rows of a LabelledImages as a dataset of ``LabelledSample``; a sample's ``index`` stays its row
    in the LabelledImages, the proposal cache's row. A file that is gone or fails to decode here (one that broke
    after the checks) raises ``engine.BadSampleError``: training replaces it and reports it (--max-bad-image-fraction).
    """

    def __init__(self, images: LabelledImages, rows: np.ndarray | None) -> None:
        self.base, self.rows = LabelledImageDataset(images), rows

    def __len__(self) -> int:
        return len(self.base) if self.rows is None else len(self.rows)

    def __getitem__(self, index: int) -> LabelledSample:
        row = index if self.rows is None else int(self.rows[index])
        try:
            return self.base[row]  # an undecodable file raises ImageDecodeError, an engine.BadSampleError
        except FileNotFoundError as error:
            path = self.base.images.path(row)
            raise engine.BadSampleError(str(error), name=path, reason="missing: no such file") from None


class ViewsWithoutQueries:
    """Two views and no query (``--losses cls``): no proposal cache, hence no OpenCV, is needed."""

    def __init__(self, settings: ViewSettings) -> None:
        self.settings = settings

    def __call__(self, sample: LabelledSample, *, generator: torch.Generator) -> PreDetSample:
        views = two_views(sample.image, torch.zeros(0, 4), generator=generator, settings=self.settings)
        return PreDetSample(views=views, labels=sample.labels, index=sample.index)


class TrainData(NamedTuple):
    """What the data section hands to the rest of ``main``, whichever the source."""

    num_classes: int
    summary: str  # for the log and the model card
    proposals: ProposalCache | None
    make_views: PreDetViews | ViewsWithoutQueries
    images: TrainImages | None  # files: the usable rows
    shards: list[str] | None  # tar shards: their URLs
    class_names: tuple[str, ...]


def image_file_data(args, losses, view_settings: ViewSettings, dist_info: engine.DistInfo) -> TrainData:
    """A label file, a COCO/LVIS json, class folders or the embedded default: every image is looked at once before
    training, the work shared by every rank (the EdgeBoxes pass, or a file check for --losses cls), and the bad
    ones stop the run or, with --skip-bad-rows, are left out and counted."""
    images = read_labelled_images(args)
    if QUERY_LOSSES & set(losses):
        proposals, skipped = prepare_proposals(args, images, dist_info)
        bad = {entry["row"]: entry["reason"] for entry in skipped}
        make_views = PreDetViews(proposals, settings=view_settings)
    else:
        proposals, bad = None, check_image_files(args, images, dist_info)
        make_views = ViewsWithoutQueries(view_settings)
    summary = images.summary()
    if bad:
        summary += f"; skipped {len(bad)} bad images: {dict(sorted(Counter(bad.values()).items()))}"
    return TrainData(
        num_classes=images.num_classes,
        summary=summary,
        proposals=proposals,
        make_views=make_views,
        images=TrainImages(images, usable_rows(args, images, bad)),
        shards=None,
        class_names=images.class_names,
    )


def tar_shard_data(args, losses, view_settings: ViewSettings, dist_info: engine.DistInfo) -> TrainData:
    """WebDataset tar shards: the EdgeBoxes cache holds one shard per tar (computed by every rank, a tar at a time);
    bad samples are skipped and reported by the stream itself (``detpretrain.data.tar_shards``)."""
    try:
        shards = tar_shards.expand_shard_urls(args.train_shards)
        class_names = tar_shards.load_class_names(args.class_names)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise SystemExit(str(error)) from None
    proposals, skipped = None, []
    make_views: PreDetViews | ViewsWithoutQueries = ViewsWithoutQueries(view_settings)
    if QUERY_LOSSES & set(losses):
        proposals, skipped = prepare_proposals(args, shards, dist_info)
        make_views = PreDetViews(proposals, settings=view_settings)
    summary = f"{len(shards)} tar shards from {args.train_shards}, {len(class_names)} classes from {args.class_names}"
    if skipped:
        summary += f"; {len(skipped)} samples without a usable image (listed in {proposals.path / 'skipped.jsonl'})"
    return TrainData(
        num_classes=len(class_names),
        summary=summary,
        proposals=proposals,
        make_views=make_views,
        images=None,
        shards=shards,
        class_names=class_names,
    )


# ----------------------------------------------------------------------------------------------------- optimizer
def param_groups(model: torch.nn.Module, *, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Norm-layer parameters get ``norm_weight_decay`` (detectron2's WEIGHT_DECAY_NORM, 0 by default); the rest,
    biases included (WEIGHT_DECAY_BIAS defaults to WEIGHT_DECAY), get ``weight_decay``."""
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_MODULES) for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    return [
        {"name": "norm", "params": [p for p in params if id(p) in norm], "weight_decay": norm_weight_decay},
        {"name": "other", "params": [p for p in params if id(p) not in norm], "weight_decay": weight_decay},
    ]


# ------------------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> Path:
    # ---------------------------------------------------------------------------------------------------- setup
    check_args(args)
    losses = parse_losses(args.losses)
    config = predet_config(args.predet_config)
    dist_info = engine.setup_distributed(args.device, timeout_minutes=args.dist_timeout)
    engine.seed_everything(args.seed, rank=dist_info.rank, deterministic=args.deterministic)
    device = dist_info.device
    args.output_dir.mkdir(parents=True, exist_ok=True)
    global_batch = args.batch_size * dist_info.world_size * args.accum_steps  # views
    normalization = batch_norm_record(args, dist_info)  # --sync-bn where SyncBatchNorm cannot train stops here
    # Linear scaling (Goyal et al.) when the global batch is not the paper's 1024 views.
    peak_lr = engine.scale_lr(args.lr, global_batch_size=global_batch, reference_batch_size=PAPER_GLOBAL_BATCH)
    milestones = lr_milestones(args)

    # ----------------------------------------------------------------------------------------------------- data
    view_settings = ViewSettings(output_size=args.view_size, num_queries=args.num_queries)
    read_data = tar_shard_data if args.train_shards is not None else image_file_data
    data = read_data(args, losses, view_settings, dist_info)
    if dist_info.is_main:
        print(data.summary)

    # ---------------------------------------------------------------------------------------------------- model
    model = create_predet(
        args.model,
        num_classes=data.num_classes,
        losses=losses,
        config=config,
        fpn_channels=args.fpn_channels,
        sync_bn=args.sync_bn,
    )
    memory_format = engine.memory_format(device)
    model = model.to(device, memory_format=memory_format)
    groups = param_groups(model, weight_decay=args.weight_decay, norm_weight_decay=args.norm_weight_decay)
    optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=args.momentum)
    scaler = engine.make_grad_scaler(device, amp=args.amp)

    # --------------------------------------------------------------------------------------------------- resume
    start_step, checkpoint = 0, {}
    checkpoint_path = args.output_dir / engine.CHECKPOINT_NAME
    resume_from = engine.resolve_resume(args.resume, output_dir=args.output_dir)
    if resume_from is not None:
        checkpoint = engine.load_checkpoint(resume_from)
        start_step = engine.restore_training_state(
            checkpoint,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            args=vars(args),
            global_batch_size=global_batch,
            dist_info=dist_info,
            ignore_args=RESUME_IGNORE,
        )
    # Image files: a file that goes bad during training is replaced and counted (a tar stream skips its own).
    bad_images = None
    if data.images is not None:
        bad_images = engine.BadSampleTracker(
            dataset_size=len(data.images),
            max_fraction=args.max_bad_image_fraction,
            dist_info=dist_info,
            source=str(data.images.base.images.source),
        )
        bad_images.load_state_dict(checkpoint.get("bad_images"))
    if dist_info.is_main:
        engine.save_args(args.output_dir, vars(args))
    ddp_model = engine.wrap_ddp(model, dist_info)

    # Both views of an image come from one sample, so they always stay on one rank (§3.3, PAPER_NOTES "Views").
    stream = None
    if data.shards is not None:
        # A stream resumes from the position its checkpoint recorded (every rank's), exactly.
        try:
            stream = tar_shards.TarShardStream(
                data.shards,
                class_names=data.class_names,
                transform=data.make_views,
                collate_fn=collate_two_views,
                images_per_batch=images_per_batch(args.batch_size),
                seed=args.seed,
                num_workers=args.num_workers,
                rank=dist_info.rank,
                world_size=dist_info.world_size,
                accum_steps=args.accum_steps,
                shuffle_buffer=args.shuffle_buffer,
                start_step=start_step,
                resume_state=checkpoint.get("tar_shards"),
                pin_memory=device.type == "cuda",
            )
        except ValueError as error:
            raise SystemExit(str(error)) from None
        batches = iter(stream)
    else:
        sampler = engine.StepBatchSampler(
            dataset_size=len(data.images),
            batch_size=images_per_batch(args.batch_size),
            seed=args.seed,
            start_step=start_step,
            total_steps=args.iters,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            accum_steps=args.accum_steps,
        )
        loader = engine.make_loader(
            engine.StepSeededDataset(data.images, transform=data.make_views, seed=args.seed),
            batch_sampler=sampler,
            num_workers=args.num_workers,
            seed=args.seed,
            collate_fn=collate_two_views,
            pin_memory=device.type == "cuda",
        )
        batches = iter(loader)

    def compute_losses(batch) -> dict[str, torch.Tensor]:
        images = batch.images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with engine.autocast(device, amp=args.amp):
            terms = ddp_model(
                images,
                batch.queries_view1.to(device, non_blocking=True),
                batch.queries_view2.to(device, non_blocking=True),
                batch.query_valid.to(device, non_blocking=True),
                batch.labels,  # on the CPU: the loss builds its (N, C) target there and copies it once
            )
        return {name: value.float() for name, value in terms.items()}

    # ---------------------------------------------------------------------------------------------------- train
    with engine.TrainLogger(
        output_dir=args.output_dir,
        total_steps=args.iters,
        start_step=start_step,
        samples_per_step=global_batch,
        log_every=args.log_every,
        is_main=dist_info.is_main,
        quiet=args.quiet,
        bad_samples=bad_images,
    ) as logger:
        for step in range(start_step, args.iters):
            lr_at = engine.warmup_multistep_lr(
                step,
                base_lr=peak_lr,
                warmup_iters=args.warmup_iters,
                warmup_start_lr=args.warmup_factor * peak_lr,
                milestones=milestones,
            )
            lr = engine.set_lr(optimizer, lr_at)
            stats = engine.train_step(
                model=ddp_model,
                optimizer=optimizer,
                scaler=scaler,
                batches=batches,
                compute_losses=compute_losses,
                accum_steps=args.accum_steps,
                step=step,
                dist_info=dist_info,
                amp=args.amp,
                max_grad_norm=args.clip_grad,
                checkpoint_path=checkpoint_path,
                count_flops=args.count_flops,
            )
            extra = {}
            if bad_images is not None:
                bad_images.update(loader.take_skipped(), step=step)  # every rank; stops past the limit
            if stream is not None:
                for record in stream.take_skipped():  # each bad sample is named once, by the rank that met it
                    print(f"rank {dist_info.rank}: skipped {record.describe()}", file=sys.stderr)
                extra["skipped_samples"] = sum(stream.skipped.values())  # this rank's, so far
            logger.log(step, lr=lr, stats=stats, **extra)
            if (step + 1) % args.save_every == 0 or step + 1 == args.iters:
                state = engine.training_state(
                    model=ddp_model,
                    optimizer=optimizer,
                    scaler=scaler,
                    step=step + 1,
                    args=vars(args),
                    global_batch_size=global_batch,
                    dist_info=dist_info,
                    # Every rank's stream position (a collective): the resumed stream yields the same batches.
                    extra={"tar_shards": stream.all_ranks_state_dict()}
                    if stream is not None
                    else {"bad_images": bad_images.state_dict()},
                )
                if dist_info.is_main:
                    engine.save_checkpoint(checkpoint_path, state)

    # --------------------------------------------------------------------------------------------------- export
    export_dir = args.output_dir / "export"
    if dist_info.is_main:
        # Written by save_pretrained beside the backbone, atomically like it: fpn.safetensors, heads.safetensors.
        extra = {} if args.no_export_fpn else {"fpn": model.fpn.fpn.state_dict()}
        if heads := exported_heads(model, args.export_heads):
            extra["heads"] = heads
        card = model_card_fields(
            args,
            model,
            data,
            losses=losses,
            global_batch=global_batch,
            peak_lr=peak_lr,
            normalization=normalization,
        )
        if bad_images is not None:
            card["bad_images"] = json.dumps(bad_images.summary())
        detpretrain.save_pretrained(
            model.body,
            export_dir,
            arch=args.model,
            tag=args.tag,
            license=args.license,
            data=data.summary,
            paper=PREDET_PAPER,
            datasets=[],  # a Hub dataset id is only known for the zoo's own rows
            extra_state_dicts=extra,
            **card,
        )
        print(f"exported the backbone{'' if args.no_export_fpn else ' and FPN'} to {export_dir}")
    if dist_info.distributed:
        dist.barrier()
    engine.cleanup_distributed()
    return export_dir


def exported_heads(model: PreDet, which: str) -> dict[str, torch.Tensor]:
    """The PreDet heads written beside the backbone: "transfer" keeps the modules fine-tuning starts from
    (``detpretrain.detection.predet_heads.HEAD_INIT``: the CRPN's shared conv and the CROI's 2 x 1024 box head, a
    quarter of the heads' size), "all" every head (everything but the FPN), "none" nothing."""
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("fpn.")}
    if which == "transfer":
        prefixes = tuple(f"{source}." for source, _ in HEAD_INIT.values())
        heads = {k: v for k, v in heads.items() if k.startswith(prefixes)}
    return heads if which != "none" else {}


# ------------------------------------------------------------------------------------------------------ the card
def config_provenance() -> dict[str, str]:
    """Each PreDetConfig field's docstring (it says whether the value is the paper's, detectron2's, or ours)."""
    tree = ast.parse(inspect.getsource(PreDetConfig))
    body = tree.body[0].body
    notes = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            notes[node.target.id] = " ".join(str(after.value.value).split())
    return notes


def batch_norm_record(args: argparse.Namespace, dist_info: engine.DistInfo) -> str:
    """What BatchNorm normalizes over in this run, for the model card (PreDet trains BN over both views of each
    image, §4.1 and PAPER_NOTES "Views and batch", but does not say whether its 128 GPUs synchronized it).
    --sync-bn with several processes off CUDA, where torch's SyncBatchNorm cannot train, stops the run."""
    views, world = args.batch_size, dist_info.world_size
    per_step = f" per micro-step (--accum-steps {args.accum_steps} does not enlarge it)" if args.accum_steps > 1 else ""
    processes = "one process" if world == 1 else f"{world} processes"
    if not args.sync_bn:
        who = "the one process" if world == 1 else f"each of {world} processes"
        return (
            f"BatchNorm trained (pre-training from scratch, §4.1), per process: {who} normalizes its own {views} views "
            f"(both views of {views // 2} images){per_step}, not synchronized (the paper does not say; its 1024 views "
            "on 128 GPUs are 8 per GPU; --sync-bn synchronizes)"
        )
    if world > 1 and dist_info.device.type != "cuda":
        raise SystemExit(
            f"--sync-bn with {processes} on {dist_info.device.type}: torch's SyncBatchNorm trains only on GPUs; "
            "drop --sync-bn (each process normalizes its own views) or use --device cuda"
        )
    over = f"its own {views} views{per_step}, as BatchNorm" if world == 1 else f"the {views * world} views{per_step}"
    return f"SyncBatchNorm (--sync-bn), trained (pre-training from scratch, §4.1): {processes}, statistics over {over}"


def model_card_fields(
    args, model: PreDet, data: TrainData, *, losses, global_batch: int, peak_lr: float, normalization: str
) -> dict:
    """Every choice of this run for the model card: what the paper fixes, what detectron2 defaults, what we chose."""
    milestones = lr_milestones(args)
    no_crpn = "crpn" not in losses and bool({"info", "croi_reg"} & set(losses))
    clipping = f", gradient norm clipped at {args.clip_grad}" if args.clip_grad else ""
    fields = {
        "method": "PreDet pre-training (predet.txt §3): " + " + ".join(f"L_{name}" for name in losses),
        "losses": f"{','.join(losses)} (all four is the paper's; subsets are Tab. 1 ablations"
        + ("; without crpn the CROI head trains on random boxes around the queries, §5.1)" if no_crpn else ")"),
        "classes": f"{data.num_classes} image-level classes; L_cls is the softmax cross-entropy against the k-hot "
        "target normalized to 1/k (Mahajan et al., the paper's [34]), on every FPN level (a shared GAP + linear head), "
        "averaged over levels and over both views",
        "views": f"two MoCo-v2 views at {args.view_size}x{args.view_size} (§4.1: 480) in one backbone batch; "
        + (
            "symmetric (our option, not the paper's): queries pooled from each view, anchors, proposals and targets "
            "in the other, the detection losses averaged over both directions"
            if model.config.symmetric_views
            else "queries pooled from view-2, anchors, proposals and every target in view-1"
        )
        + "; no momentum encoder, no queue",
        "queries": f"{args.num_queries} per image per step (§4.1: 16) drawn from the EdgeBoxes cache, kept when at "
        "least half is visible in both views, NMS 0.5 in view-1",
        "schedule": f"{args.iters} steps, global batch {global_batch} views, lr {peak_lr:g} (0.2 at 1024 views, "
        f"scaled linearly) dropped by 0.1 at {milestones} (§4.1: four uniform steps of 540k), linear warmup over "
        f"{args.warmup_iters} steps from {args.warmup_factor} x lr (detectron2 default)",
        "optimizer": f"SGD momentum {args.momentum}, weight decay {args.weight_decay}, {args.norm_weight_decay} on "
        "norm layers (detectron2 defaults)" + clipping,
        "normalization": normalization,
        "fpn": f"torchvision FeaturePyramidNetwork, {args.fpn_channels} channels, P2-P6 (P6 max-pooled)"
        + ("" if args.no_export_fpn else "; exported as fpn.safetensors for finetune.py"),
    }
    if data.proposals is not None:
        settings = data.proposals.settings
        edge_note = (
            "structured edges (Dollár & Zitnick), as EdgeBoxes [69]"
            if settings["edge_source"] == "structured"
            else "image-gradient edges instead of structured edges (the model file is not in OpenCV; this changes the "
            "query distribution, PAPER_NOTES.md)"
        )
        fields["edge_boxes"] = f"{edge_note}; {json.dumps(settings)}"
    for name, note in config_provenance().items():
        if _config_field_used(name, losses):
            fields[f"config.{name}"] = f"{getattr(model.config, name)!r}: {note}"
    return fields


def _config_field_used(name: str, losses: tuple[str, ...]) -> bool:
    """Whether a PreDetConfig field matters for these losses (the card lists only those)."""
    if name.startswith("cls_"):
        return "cls" in losses
    if name.startswith(("anchor_", "crpn_")):
        return "crpn" in losses
    if name.startswith("random_"):
        return "crpn" not in losses and bool({"info", "croi_reg"} & set(losses))
    if name in ("temperature",):
        return "info" in losses
    if name.startswith(("croi_", "box_head", "pooler_")) or name in ("scale_dot_products", "symmetric_views"):
        return bool(QUERY_LOSSES & set(losses))
    return True


if __name__ == "__main__":
    engine.run_main(main, get_args_parser().parse_args())
