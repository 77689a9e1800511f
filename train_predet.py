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
in the model card with where it comes from. The paper trains on IG-50M hashtags (1.5k classes) or ImageNet-1k.

    # the paper's setting: 1024 views per step, e.g. 64 GPUs x 16 views
    torchrun --nnodes 8 --nproc_per_node 8 ... train_predet.py --model resnext101_32x8d --batch-size 16 \\
        --train-images imagenet/train --output-dir out/x101   # an ImageNet-style class-folder tree
    # one 8-GPU machine, the same global batch by gradient accumulation
    torchrun --nproc_per_node 8 train_predet.py --model resnet50 --batch-size 32 --accum-steps 4 \\
        --train-images photos/ --train-ann labels.jsonl --output-dir out/r50
    # a smaller global batch instead: the lr is scaled linearly (lr x global batch / 1024), say so in your report
    # image-level labels from a COCO / LVIS json (boxes ignored); --skip-bad-rows skips images without labels
    python train_predet.py --train-images coco/train2017 --train-ann instances_train2017.json --skip-bad-rows ...
    # CPU smoke run on the embedded default dataset (no data flags)
    python train_predet.py --model resnet18 --view-size 160 --iters 30 --warmup-iters 5 --batch-size 8 --device cpu

Query boxes (EdgeBoxes, through OpenCV's contrib module: ``pip install "detpretrain[proposals]"``) are computed
once per dataset, in --proposal-workers processes, into OUTPUT_DIR/proposals.edgeboxes (or --proposals FILE,
which ``python -m detpretrain.proposals`` can also make beforehand). A run with ``--losses cls`` needs none.

Outputs in --output-dir: proposals.edgeboxes, args.json, log.jsonl (every loss term), checkpoint.pth (resume with
--resume auto), export/ (model.safetensors, config.json, README.md, and fpn.safetensors unless --no-export-fpn;
heads.safetensors with --export-heads): load it with timm.create_model(ARCH, pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file=".../model.safetensors")) or finetune.py --backbone-weights OUT/export, which also
initializes the detector's FPN from fpn.safetensors.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import detpretrain
from detpretrain import engine
from detpretrain.data import labelled_images
from detpretrain.data.labelled_images import ImageDecodeError, LabelledImageDataset, LabelledImages, LabelledSample
from detpretrain.data.synthetic import synthetic_coco
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
from detpretrain.proposals import EdgeBoxesSettings, ProposalCache, compute_proposal_cache
from detpretrain.zoo import PREDET_PAPER

PAPER_GLOBAL_BATCH = 1024  # views per step in §4.1 (512 images x 2); --lr is for this batch
QUERY_LOSSES = frozenset({"crpn", "info", "croi_reg"})  # the terms that need query boxes
PROPOSALS_NAME = "proposals.edgeboxes"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("PreDet pre-training", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (no data flags: the embedded default dataset)")
    data.add_argument(
        "--train-images", type=Path, help="image folder (with --train-ann), or an ImageNet-style class-folder tree"
    )
    data.add_argument("--train-ann", type=Path, help="COCO/LVIS json (image-level labels), or a .jsonl/.csv label file")
    data.add_argument("--class-names", type=Path, help="class list, one per line (.jsonl/.csv labels; default: sorted)")
    data.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    data.add_argument("--verify-images", action="store_true", help="decode every image once before training")

    queries = parser.add_argument_group("queries (§3.2, §4.1): EdgeBoxes, computed once per dataset")
    queries.add_argument(
        "--proposals", type=Path, help=f"proposal cache to write or reuse; default OUTPUT_DIR/{PROPOSALS_NAME}"
    )
    queries.add_argument("--proposal-workers", type=int, default=os.cpu_count() or 1, help="EdgeBoxes processes")
    queries.add_argument("--edge-model", help="structured-edge model.yml.gz (as [69]); default: image-gradient edges")
    queries.add_argument("--num-queries", type=int, default=16, help="queries sampled per image per step (§4.1: 16)")

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
        "--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loader processes per process"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    run.add_argument("--resume", default=None, help="'auto' continues OUTPUT_DIR/checkpoint.pth if present, or a path")
    run.add_argument("--save-every", type=int, default=2000, help="checkpoint every N steps (and at the end)")
    run.add_argument("--log-every", type=int, default=20, help="log.jsonl row every N steps")
    run.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    run.add_argument("--no-export-fpn", action="store_true", help="export the backbone only, not fpn.safetensors")
    run.add_argument("--export-heads", action="store_true", help="also export the PreDet heads (heads.safetensors)")
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
    if args.train_ann is not None and args.train_images is None:
        raise SystemExit("--train-ann needs --train-images (the folder its file names are relative to)")


# ------------------------------------------------------------------------------------------------------------ data
def read_labelled_images(args: argparse.Namespace) -> LabelledImages:
    """The image-level labels of the data flags (a COCO/LVIS json, a .jsonl/.csv file, a class-folder tree), or of
    the embedded default dataset; bad rows stop the run, or are skipped and counted with --skip-bad-rows."""
    policy = "skip" if args.skip_bad_rows else "error"
    try:
        if args.train_images is None:
            default = synthetic_coco()
            return labelled_images.from_coco(default.train_ann, default.train_images, on_bad_row=policy)
        if args.train_ann is None:
            return labelled_images.from_class_folders(args.train_images)
        if args.train_ann.suffix.lower() == ".json":
            return labelled_images.from_coco(args.train_ann, args.train_images, on_bad_row=policy)
        return labelled_images.from_label_file(
            args.train_images, args.train_ann, class_names=args.class_names, on_bad_row=policy
        )
    except labelled_images.BadRowError as error:
        raise SystemExit(f"{error}; pass --skip-bad-rows to skip such rows and count them") from None
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as error:
        raise SystemExit(str(error)) from None


def prepare_images(args: argparse.Namespace, dist_info: engine.DistInfo) -> LabelledImages:
    """Read (and with --verify-images, decode once) on rank 0; every rank gets the same list."""
    images = None
    if dist_info.is_main:
        images = read_labelled_images(args)
        if args.verify_images:
            policy = "skip" if args.skip_bad_rows else "error"
            try:
                images = labelled_images.verify_images(
                    images, on_bad_row=policy, num_workers=args.proposal_workers, progress=not args.quiet
                )
            except labelled_images.BadRowError as error:
                raise SystemExit(str(error).replace("on_bad_row='skip'", "--skip-bad-rows")) from None
        print(images.summary())
    if dist_info.distributed:
        holder = [images]
        dist.broadcast_object_list(holder, src=0)
        images = holder[0]
    return images


def prepare_proposals(args, images: LabelledImages, dist_info: engine.DistInfo) -> ProposalCache:
    """The dataset's EdgeBoxes cache: computed once on rank 0 (in parallel workers), or reused when it was made
    for the same images with the same settings."""
    path = args.proposals or args.output_dir / PROPOSALS_NAME
    settings = EdgeBoxesSettings(edge_model=args.edge_model)
    if dist_info.is_main:
        if path.is_file():
            cache = ProposalCache(path)
            if cache.settings != settings.record():
                raise SystemExit(
                    f"{path} was computed with other EdgeBoxes settings ({cache.settings}); delete it, or pass "
                    "--proposals NEW_FILE to compute them again"
                )
        else:
            try:
                compute_proposal_cache(
                    images.image_paths,
                    path,
                    settings=settings,
                    num_workers=args.proposal_workers,
                    progress=not args.quiet,
                )
            except ImportError as error:
                needs = f"train_predet.py needs it for the query boxes of --losses {args.losses}"
                raise SystemExit(f"{error} ({needs})") from None
            except ImageDecodeError as error:
                raise SystemExit(f"{error}; pass --verify-images --skip-bad-rows to skip undecodable images") from None
    if dist_info.distributed:
        dist.barrier()
    try:
        return ProposalCache(path, image_paths=images.image_paths)
    except ValueError as error:
        raise SystemExit(f"{error}; or pass --proposals NEW_FILE") from None


class ClearErrors(torch.utils.data.Dataset):
    """``LabelledImageDataset`` whose decode errors say which flags skip such files (they name the file already)."""

    def __init__(self, images: LabelledImages) -> None:
        self.base = LabelledImageDataset(images)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> LabelledSample:
        try:
            return self.base[index]
        except (ImageDecodeError, FileNotFoundError) as error:
            raise ImageDecodeError(
                f"{error}. Restart with --verify-images --skip-bad-rows (and --resume auto) to drop such files"
            ) from None


class ViewsWithoutQueries:
    """Two views and no query (``--losses cls``): no proposal cache, hence no OpenCV, is needed."""

    def __init__(self, settings: ViewSettings) -> None:
        self.settings = settings

    def __call__(self, sample: LabelledSample, *, generator: torch.Generator) -> PreDetSample:
        views = two_views(sample.image, torch.zeros(0, 4), generator=generator, settings=self.settings)
        return PreDetSample(views=views, labels=sample.labels, index=sample.index)


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
    dist_info = engine.setup_distributed(args.device)
    engine.seed_everything(args.seed, rank=dist_info.rank, deterministic=args.deterministic)
    device = dist_info.device
    args.output_dir.mkdir(parents=True, exist_ok=True)
    global_batch = args.batch_size * dist_info.world_size * args.accum_steps  # views
    # Linear scaling (Goyal et al.) when the global batch is not the paper's 1024 views.
    peak_lr = engine.scale_lr(args.lr, global_batch_size=global_batch, reference_batch_size=PAPER_GLOBAL_BATCH)
    milestones = lr_milestones(args)

    # ----------------------------------------------------------------------------------------------------- data
    images = prepare_images(args, dist_info)
    view_settings = ViewSettings(output_size=args.view_size, num_queries=args.num_queries)
    proposals = None
    if QUERY_LOSSES & set(losses):
        proposals = prepare_proposals(args, images, dist_info)
        make_views = PreDetViews(proposals, settings=view_settings)
    else:
        make_views = ViewsWithoutQueries(view_settings)

    # ---------------------------------------------------------------------------------------------------- model
    model = create_predet(
        args.model, num_classes=images.num_classes, losses=losses, config=config, fpn_channels=args.fpn_channels
    )
    memory_format = engine.memory_format(device)
    model = model.to(device, memory_format=memory_format)
    groups = param_groups(model, weight_decay=args.weight_decay, norm_weight_decay=args.norm_weight_decay)
    optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=args.momentum)
    scaler = engine.make_grad_scaler(device, amp=args.amp)

    # --------------------------------------------------------------------------------------------------- resume
    start_step = 0
    checkpoint_path = args.output_dir / engine.CHECKPOINT_NAME
    resume_from = engine.resolve_resume(args.resume, output_dir=args.output_dir)
    if resume_from is not None:
        start_step = engine.restore_training_state(
            engine.load_checkpoint(resume_from),
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            args=vars(args),
            global_batch_size=global_batch,
            dist_info=dist_info,
        )
    if dist_info.is_main:
        engine.save_args(args.output_dir, vars(args))
    ddp_model = engine.wrap_ddp(model, dist_info)

    # Both views of an image come from one sample, so they always stay on one rank (§3.3, PAPER_NOTES "Views").
    sampler = engine.StepBatchSampler(
        dataset_size=len(images),
        batch_size=images_per_batch(args.batch_size),
        seed=args.seed,
        start_step=start_step,
        total_steps=args.iters,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        accum_steps=args.accum_steps,
    )
    loader = engine.make_loader(
        engine.StepSeededDataset(ClearErrors(images), transform=make_views, seed=args.seed),
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
            )
            logger.log(step, lr=lr, stats=stats)
            if (step + 1) % args.save_every == 0 or step + 1 == args.iters:
                state = engine.training_state(
                    model=ddp_model,
                    optimizer=optimizer,
                    scaler=scaler,
                    step=step + 1,
                    args=vars(args),
                    global_batch_size=global_batch,
                    dist_info=dist_info,
                )
                if dist_info.is_main:
                    engine.save_checkpoint(checkpoint_path, state)

    # --------------------------------------------------------------------------------------------------- export
    export_dir = args.output_dir / "export"
    if dist_info.is_main:
        # Written by save_pretrained beside the backbone, atomically like it: fpn.safetensors, heads.safetensors.
        extra = {} if args.no_export_fpn else {"fpn": model.fpn.fpn.state_dict()}
        if args.export_heads:
            extra["heads"] = {k: v for k, v in model.state_dict().items() if not k.startswith("fpn.")}
        card = model_card_fields(
            args, model, images, proposals, losses=losses, global_batch=global_batch, peak_lr=peak_lr
        )
        detpretrain.save_pretrained(
            model.body,
            export_dir,
            arch=args.model,
            tag=args.tag,
            license=args.license,
            data=images.summary(),
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


def model_card_fields(args, model: PreDet, images, proposals, *, losses, global_batch: int, peak_lr: float) -> dict:
    """Every choice of this run for the model card: what the paper fixes, what detectron2 defaults, what we chose."""
    milestones = lr_milestones(args)
    no_crpn = "crpn" not in losses and bool({"info", "croi_reg"} & set(losses))
    clipping = f", gradient norm clipped at {args.clip_grad}" if args.clip_grad else ""
    fields = {
        "method": "PreDet pre-training (predet.txt §3): " + " + ".join(f"L_{name}" for name in losses),
        "losses": f"{','.join(losses)} (all four is the paper's; subsets are Tab. 1 ablations"
        + ("; without crpn the CROI head trains on random boxes around the queries, §5.1)" if no_crpn else ")"),
        "classes": f"{images.num_classes} image-level classes; L_cls is the softmax cross-entropy against the k-hot "
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
        "normalization": "BatchNorm trained (pre-training from scratch, §4.1), statistics over both views",
        "fpn": f"torchvision FeaturePyramidNetwork, {args.fpn_channels} channels, P2-P6 (P6 max-pooled)"
        + ("" if args.no_export_fpn else "; exported as fpn.safetensors for finetune.py"),
    }
    if proposals is not None:
        settings = proposals.settings
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
    main(get_args_parser().parse_args())
