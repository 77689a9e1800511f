"""Jigsaw (Montage) pre-training from the detection dataset itself (Zhou et al., ECCV 2020; papers/montage_jigsaw.txt).

Samples are cut out of the detection images once (§3.1: ground-truth boxes enlarged with context, and background
boxes), four at a time are stitched into one image by aspect ratio (§3.2), and every position of the last feature
map is classified against a soft label weighted by its effective receptive field (§3.3). The backbone is then
exported for timm and fine-tuning (finetune.py).

The defaults are the paper's recipe (§4.1): 64k iterations of 512 assembled images (2048 samples), lr warmed up
from 0.2 to 0.8 over 1250 iterations then cosine to 0, weight decay 1e-4, ERF weights refreshed every 5k
iterations with threshold 0.7. The paper does not name its optimizer: SGD with momentum 0.9 is our choice. The
network starts with torchvision's residual init, not timm's zero-initialized residual branches, which would make the
step-0 ERF, and so the labels of the first 5k steps, a patch at each cell's corner (--zero-init-last restores timm's;
PAPER_NOTES.md "ERF").

Sample extraction is shared by every rank of every node and by --extract-workers processes in each, shard by shard
(detpretrain.sharding): a killed run continues where it stopped, an image that cannot be decoded is skipped and
named in SAMPLES/skipped.jsonl, and the samples are the same whatever the world size. A finished sample directory
is reused by any later run with the same data and settings.

    # the paper's setting: 8 GPUs x 64 assembled images
    torchrun --nproc_per_node=8 train_jigsaw.py --model resnet50 \\
        --train-images coco/train2017 --train-ann coco/annotations/instances_train2017.json --output-dir out/r50
    # one GPU, the same global batch of 512 by gradient accumulation
    python train_jigsaw.py --model resnet50 --batch-size 64 --accum-steps 8 --train-images ... --output-dir ...
    # a smaller global batch instead: the lr is scaled linearly (lr x global batch / 512), say so in your report
    python train_jigsaw.py --model resnet50 --batch-size 128 --train-images ... --output-dir ...
    # extract the samples beforehand on a CPU cluster (N nodes, one rank each, 32 processes per node), on a
    # filesystem every node and the training job share; then train with --samples /shared/samples.jigsaw
    torchrun --nnodes N --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29400 train_jigsaw.py \\
        --extract-only --device cpu --extract-workers 32 --train-images coco/train2017 \\
        --train-ann coco/annotations/instances_train2017.json --samples /shared/samples.jigsaw
    # CPU smoke run on the embedded default dataset (no data flags)
    python train_jigsaw.py --model resnet18 --template tiny96 --iters 30 --warmup-iters 5 --batch-size 8 --device cpu
    # your own VOC or YOLO data (detpretrain.data.sources), the training split only; a small dataset may have no
    # tall or wide sample: --empty-group borrow draws that region from the nearest group (not the paper's, recorded)
    python train_jigsaw.py --format voc --train-images raccoon/images --train-ann raccoon/annotations \\
        --train-split raccoon/train.txt --empty-group borrow --model resnet18 --output-dir ...
    # the ablations: Tab. 1's warp / resize / pad_crop (--table1 sets --fit and block-wise labels, as Tab. 1 was run:
    # PAPER_NOTES.md), Tab. 2's block-wise / global classification
    torchrun --nproc_per_node=8 train_jigsaw.py --table1 warp --model resnet50 --train-images ... --output-dir ...
    torchrun --nproc_per_node=8 train_jigsaw.py --classification global --model resnet50 --train-images ... ...

Outputs in --output-dir: samples.jigsaw/ (the extracted samples, unless --samples puts them elsewhere: shards,
manifest.json, skipped.jsonl), args.json, log.jsonl, checkpoint.pth (resume with --resume auto), export/
(model.safetensors, config.json, README.md: load it with timm.create_model(ARCH, pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file=".../model.safetensors")) or finetune.py --backbone-weights OUT/export), and with
--visualize N, visualize/*.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

import detpretrain
from detpretrain import engine
from detpretrain.data.detection import DatasetError
from detpretrain.data.sources import DataFlags, add_data_arguments, load_detection_data
from detpretrain.data.synthetic import synthetic_coco
from detpretrain.jigsaw import (
    DEFAULT_SHARD_SIZE,
    FIT_MODES,
    JIGSAW_TEMPLATES,
    REGION_NAMES,
    SKIPPED_NAME,
    JigsawClassifier,
    JigsawSamples,
    JigsawTemplate,
    SampleDirError,
    coco_image_records,
    compute_erf,
    create_backbone,
    dataset_records,
    erf_label_weights,
    extract_samples,
    feature_region_index,
    get_template,
    has_zero_init_last,
    normalize_jigsaw_image,
    render_erf,
    render_jigsaw,
    sample_jigsaw,
    seeded_generator,
    voc_image_records,
)
from detpretrain.losses import erf_adaptive_dense_loss, jigsaw_blockwise_loss, jigsaw_global_loss
from detpretrain.zoo import JIGSAW_PAPER

CLASSIFICATIONS = ("erf_dense", "blockwise", "global")
# Which run of the paper a (fit, classification) pair is. Tab. 1 was run with block-wise labels (PAPER_NOTES.md):
# its Pad&Crop row is Tab. 2's Block-wise row (35.2 AP in both).
PAPER_RUNS = {
    ("pad_crop", "erf_dense"): "the paper's method (§3; Tab. 2 'ERF-adaptive Dense Cls.', Tab. 3)",
    ("pad_crop", "blockwise"): "Tab. 1 'Pad&Crop' = Tab. 2 'Block-wise Cls.' (one run: 35.2 AP in both)",
    ("warp", "blockwise"): "Tab. 1 'Warp' (block-wise labels, as Tab. 1 was run)",
    ("resize", "blockwise"): "Tab. 1 'Resize' (block-wise labels, as Tab. 1 was run)",
    ("pad_crop", "global"): "Tab. 2 'Global Cls.'",
}
PAPER_GLOBAL_BATCH = 512  # assembled images per step in §4.1; the lr values below are for this batch
ERF_STREAM = 0xE5F  # seeds the fixed batch of assembled images the ERF is measured on (our choice)
# How the samples are extracted, not what they are (the sample directory's manifest checks that): free on resume.
RESUME_IGNORE = engine.DEFAULT_RESUME_IGNORE | {"extract_workers", "extract_only"}
# The shared data flags this script reads (detpretrain.data.sources): the training images only, no val set.
DATA_TRAIN_FLAGS = ("--train-images", "--train-ann", "--voc-root", "--train-sets", "--train-split", "--class-names")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Jigsaw (Montage) pre-training", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (no data flags: the embedded default dataset)")
    # --format, images, annotations, VOCdevkit sets, a split file, class names: detpretrain.data.sources
    add_data_arguments(data, flags=DATA_TRAIN_FLAGS, formats=("coco", "voc", "yolo"))
    data.add_argument(
        "--samples", type=Path, help="sample directory to write, continue or reuse; default OUTPUT_DIR/samples.jigsaw"
    )
    data.add_argument("--max-enlarge", type=float, default=2.0, help="positives grow up to this x (§3.1: 2)")
    data.add_argument("--pos-neg-ratio", type=float, default=10.0, help="positives per negative (§3.1: 10)")
    data.add_argument("--min-sample-size", type=int, default=8, help="drop samples with a side below this (px)")
    data.add_argument(
        "--extract-workers",
        type=int,
        default=engine.cores_per_local_rank(),
        help="processes per rank that cut the samples out (default: this rank's share of the node's cores)",
    )
    data.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per sample shard (the unit of resume)"
    )
    data.add_argument("--extract-only", action="store_true", help="extract the samples (under torchrun too), then exit")

    jigsaw = parser.add_argument_group("Jigsaw assembly (§3.2) and classification (§3.3)")
    jigsaw.add_argument("--template", default="split96", choices=sorted(JIGSAW_TEMPLATES), help="region sizes")
    jigsaw.add_argument(
        "--fit", default="pad_crop", choices=FIT_MODES, help="pad & crop (paper), or Tab. 1's warp/resize"
    )
    jigsaw.add_argument(
        "--table1",
        choices=FIT_MODES,
        help="Tab. 1's run: --fit FIT with --classification blockwise (Tab. 1 was run with block-wise labels)",
    )
    jigsaw.add_argument(
        "--empty-group",
        default="refuse",
        choices=["refuse", "borrow"],
        help="a shape group (S, T, W) with no sample: stop (the paper fills each region from its own group), or "
        "draw it from the nearest group (small datasets; recorded)",
    )
    jigsaw.add_argument("--scale-range", type=float, nargs=2, default=(0.8, 1.5), help="per-sample scale (§4.1)")
    jigsaw.add_argument("--flip-prob", type=float, default=0.5, help="per-sample horizontal flip (§4.1)")
    jigsaw.add_argument(
        "--classification", default="erf_dense", choices=CLASSIFICATIONS, help="§3.3, or Tab. 2's block-wise/global"
    )
    jigsaw.add_argument("--erf-threshold", type=float, default=0.7, help="tau of Eq. 2 (§4.1: 0.7)")
    jigsaw.add_argument("--erf-every", type=int, default=5000, help="refresh the ERF weights every N steps (§4.1)")
    jigsaw.add_argument("--erf-images", type=int, default=16, help="assembled images the ERF is averaged over")

    model = parser.add_argument_group("model and optimization (§4.1)")
    model.add_argument("--model", default="resnet50", help="timm architecture (any CNN with forward_features)")
    model.add_argument(
        "--zero-init-last",
        action="store_true",
        help="timm's init: every residual branch's last BN starts at 0 (default: torchvision's, at 1; PAPER_NOTES)",
    )
    model.add_argument("--iters", type=int, default=64000, help="optimizer steps (§4.1: 64k)")
    model.add_argument("--batch-size", type=int, default=64, help="assembled images per process per micro-step")
    model.add_argument("--accum-steps", type=int, default=1, help="micro-steps per optimizer step")
    model.add_argument("--lr", type=float, default=0.8, help="peak lr at global batch 512 (§4.1: 0.8)")
    model.add_argument("--warmup-lr", type=float, default=0.2, help="lr at step 0, at global batch 512 (§4.1: 0.2)")
    model.add_argument("--warmup-iters", type=int, default=1250, help="linear warmup steps (§4.1: 1250)")
    model.add_argument("--weight-decay", type=float, default=1e-4, help="§4.1: 1e-4")
    model.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (not in the paper: our choice)")
    model.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (off, as in the paper)")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, default=Path("runs/jigsaw"))
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
    run.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    run.add_argument("--log-every", type=int, default=20, help="log.jsonl row every N steps")
    run.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    run.add_argument(
        "--max-bad-image-fraction",
        type=float,
        default=engine.DEFAULT_MAX_BAD_IMAGE_FRACTION,
        help="extraction skips an image that cannot be used (undecodable, truncated, empty, of another size than its "
        "annotation) and names it in SAMPLES/skipped.jsonl; more than this share of the images stops the run",
    )
    run.add_argument(
        "--count-flops",
        action="store_true",
        help="count each step's FLOPs (torch.utils.flop_counter) into log.jsonl's flops: the study's compute unit",
    )
    run.add_argument("--visualize", type=int, default=0, help="save N assembled images and the top-left ERF (Fig. 6)")
    run.add_argument("--tag", default="jigsaw", help="the timm pretrained tag the export is for")
    run.add_argument("--license", default="apache-2.0", help="license of the exported weights (model card)")
    return parser


def with_table1(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with --table1 FIT spelled out as --fit FIT --classification blockwise (a copy); a --fit or
    --classification changed beside it is refused rather than overridden."""
    if args.table1 is None:
        return args
    setting = {"fit": args.table1, "classification": "blockwise"}
    parser = get_args_parser()
    for name, value in setting.items():
        given = getattr(args, name)
        if given not in (parser.get_default(name), value):
            raise SystemExit(f"--table1 {args.table1} means --{name} {value}: drop --{name} {given}")
    return argparse.Namespace(**{**vars(args), **setting})


# ------------------------------------------------------------------------------------------------------------ data
def load_records(args: argparse.Namespace):
    """The detection dataset as jigsaw ImageRecords, and a description of it for the model card.

    The files are read by the datasets finetune.py uses (``detpretrain.data``: one validation and cleaning policy);
    a file they cannot use stops the run with their message, as in finetune.py.
    """
    try:
        if args.format == "voc" and args.voc_root is not None:
            records = voc_image_records(args.voc_root, args.train_sets)
            return records, f"PASCAL VOC {args.train_sets} ({args.voc_root})"
        if args.format in ("voc", "yolo"):  # VOC XML folders and YOLO (detpretrain.data.sources): every listed image
            train, _ = load_detection_data(DataFlags.from_namespace(args))
            source = {k: v for k, v in train.source.items() if k != "class_names"}
            ids = [c.id for c in train.categories]  # YOLO's class indices; VOC's categories are names: no ids
            records = dataset_records(train, category_ids=ids if all(isinstance(i, int) for i in ids) else None)
            return records, f"{args.format} {json.dumps(source)}, classes {train.class_names[1:]}"
        if args.train_split is not None or args.class_names is not None:
            raise SystemExit("--train-split and --class-names are for --format voc / yolo: a COCO json names both")
        if (args.train_images is None) != (args.train_ann is None):
            raise SystemExit("pass both --train-images DIR and --train-ann FILE, or neither for the embedded default")
        if args.train_ann is None:
            default = synthetic_coco()
            records = coco_image_records(default.train_ann, default.train_images)
            return records, "the embedded default (synthetic COCO)"
        return coco_image_records(args.train_ann, args.train_images), f"COCO-format {args.train_ann}"
    except DatasetError as err:
        raise SystemExit(str(err)) from None


def prepare_samples(args: argparse.Namespace, dist_info: engine.DistInfo) -> tuple[JigsawSamples, str]:
    """Extract the samples (§3.1) with every rank and its --extract-workers, continue a killed extraction, or reuse a
    finished one made from the same images with the same settings; every rank reads the records itself (seconds)."""
    records, description = load_records(args)
    directory = args.samples or args.output_dir / "samples.jigsaw"
    if dist_info.is_main and records.cleaning_report is not None:
        # What loading clipped, dropped and kept, as finetune.py's datasets count it (also in the manifest).
        print(
            f"loaded {len(records.records)} images from {description}; cleaning: {json.dumps(records.cleaning_report)}",
            flush=True,
        )
    try:
        stats = extract_samples(
            records.records,
            class_names=records.class_names,
            category_ids=records.category_ids,
            cleaning_report=records.cleaning_report,
            output_dir=directory,
            seed=args.seed,
            max_enlarge=args.max_enlarge,
            positives_per_negative=args.pos_neg_ratio,
            min_sample_size=args.min_sample_size,
            shard_size=args.shard_size,
            num_workers=args.extract_workers,
            dist_info=dist_info,
            progress=dist_info.is_main and not args.quiet,
            max_bad_image_fraction=args.max_bad_image_fraction,
        )
        samples = JigsawSamples(directory)
    except SampleDirError as err:
        raise SystemExit(f"{err} (--samples DIR)") from None
    if dist_info.is_main:
        skipped = f", listed in {directory / SKIPPED_NAME}" if stats["skipped_images"] else ""
        print(f"samples in {directory}: {json.dumps(stats)}{skipped}", flush=True)
    return samples, description


def fill_shape_groups(samples: JigsawSamples, args: argparse.Namespace, dist_info: engine.DistInfo) -> None:
    """Refuse samples without an S, T or W sample before training, or (--empty-group borrow) fill the empty group."""
    if not (empty := samples.empty_groups()):
        return
    if args.empty_group == "refuse":
        raise SystemExit(
            f"{samples.path}: no samples in shape group {', '.join(empty)} (§3.2 fills each of the four regions from "
            "its own group); extract from more images, or pass --empty-group borrow to draw from the nearest group"
        )
    borrowed = samples.borrow_empty_groups()
    if dist_info.is_main:
        print(f"no samples in shape group(s) {borrowed}: drawn from the nearest group (--empty-group borrow)")


class AssembledImages(torch.utils.data.Dataset):
    """Assembled Jigsaw images as (uint8 (3, H, W), labels (4,)); ``transform``-style: randomness from a generator.

    Assembly draws its four samples at random within their groups (§3.2: with replacement), so the index only
    tells the engine which seed to use; the dataset's length is the number of samples.
    """

    def __init__(self, samples: JigsawSamples, *, template: JigsawTemplate, args: argparse.Namespace):
        self.samples, self.template = samples, template
        self.options = dict(scale_range=tuple(args.scale_range), flip_prob=args.flip_prob, fit=args.fit)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> int:
        return index

    def assemble(self, index: int, *, generator: torch.Generator):
        jigsaw, _ = sample_jigsaw(self.samples, template=self.template, generator=generator, **self.options)
        return jigsaw

    def __call__(self, index: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        jigsaw = self.assemble(index, generator=generator)
        return jigsaw.image, jigsaw.labels


def fixed_erf_batch(dataset: AssembledImages, *, num_images: int, seed: int):
    """The fixed batch of assembled images on which every ERF refresh is measured (PAPER_NOTES.md, "ERF")."""
    return [dataset.assemble(i, generator=seeded_generator(seed, ERF_STREAM, i)) for i in range(num_images)]


# ------------------------------------------------------------------------------------------------------------- ERF
@torch.no_grad()
def refresh_label_weights(model, erf_images: torch.Tensor, *, template, args, dist_info) -> torch.Tensor:
    """Eq. 2's weights (h, w, 4) from the current model's ERF, computed on rank 0 and broadcast (§3.3)."""
    device = dist_info.device
    shape = None
    if dist_info.is_main:
        erf = compute_erf(engine.unwrap_model(model), erf_images.to(device))
        weights = erf_label_weights(erf, template=template, erf_threshold=args.erf_threshold).float()
        shape = torch.tensor(weights.shape, device=device)
    if dist_info.distributed:
        shape = shape if shape is not None else torch.zeros(3, dtype=torch.long, device=device)
        dist.broadcast(shape, 0)
        if not dist_info.is_main:
            weights = torch.empty(tuple(shape.tolist()), device=device)
        dist.broadcast(weights, 0)
    return weights


def save_top_left_erf(model, erf_images_uint8, erf_images, *, template, path: Path) -> None:
    """Fig. 6: the ERF of the top-left region (the sum over its feature cells) over the first assembled image."""
    erf = compute_erf(engine.unwrap_model(model), erf_images)
    region_index = feature_region_index(template, feature_height=erf.shape[0], feature_width=erf.shape[1])
    top_left = erf[region_index.to(erf.device) == REGION_NAMES.index("top_left")].sum(dim=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_erf(top_left.cpu(), image=erf_images_uint8[0]).resize((448, 448)).save(path)


# ------------------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> Path:
    """Train and export; returns the export folder (with --extract-only: the sample directory)."""
    # ---------------------------------------------------------------------------------------------------- setup
    args = with_table1(args)
    if not 0 <= args.warmup_iters < args.iters:
        raise SystemExit(f"--warmup-iters {args.warmup_iters} must be below --iters {args.iters}: pass a shorter one")
    dist_info = engine.setup_distributed(args.device, timeout_minutes=args.dist_timeout)
    if args.extract_only:  # before any model: a CPU cluster can precompute the samples for a GPU job
        samples, _ = prepare_samples(args, dist_info)
        engine.cleanup_distributed()
        return samples.path
    engine.seed_everything(args.seed, rank=dist_info.rank, deterministic=args.deterministic)
    device = dist_info.device
    args.output_dir.mkdir(parents=True, exist_ok=True)
    global_batch = args.batch_size * dist_info.world_size * args.accum_steps
    # Linear scaling (Goyal et al.) when the global batch is not the paper's 512 (warmup start and peak alike).
    peak_lr = engine.scale_lr(args.lr, global_batch_size=global_batch, reference_batch_size=PAPER_GLOBAL_BATCH)
    warmup_lr = engine.scale_lr(args.warmup_lr, global_batch_size=global_batch, reference_batch_size=PAPER_GLOBAL_BATCH)

    # ----------------------------------------------------------------------------------------------------- data
    samples, dataset_description = prepare_samples(args, dist_info)
    fill_shape_groups(samples, args, dist_info)
    template = get_template(args.template)
    assembled = AssembledImages(samples, template=template, args=args)
    num_classes = len(samples.class_names)  # categories + background (label 0, the negatives)

    # ---------------------------------------------------------------------------------------------------- model
    # forward_features keeps the stride-32 map; the 1x1 conv is the FC (§3.3). The residual init sets the step-0 ERF.
    backbone = create_backbone(args.model, zero_init_last=args.zero_init_last)
    memory_format = engine.memory_format(device)
    model = JigsawClassifier(backbone, num_classes=num_classes).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=warmup_lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    scaler = engine.make_grad_scaler(device, amp=args.amp)

    erf_batch = fixed_erf_batch(assembled, num_images=args.erf_images, seed=args.seed)
    erf_images_uint8 = torch.stack([j.image for j in erf_batch])
    erf_images = normalize_jigsaw_image(erf_images_uint8).to(device, memory_format=memory_format)
    # In eval mode: a probe in train mode would move every BN running statistic before the step-0 ERF reads them.
    feature_height, feature_width = model.feature_map_size(template.canvas_height, template.canvas_width)
    region_index = feature_region_index(template, feature_height=feature_height, feature_width=feature_width)
    region_index = region_index.to(device)

    # --------------------------------------------------------------------------------------------------- resume
    start_step, label_weights = 0, None
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
        # The weights of the last refresh: a resume between refreshes must not recompute them from a later model.
        label_weights = checkpoint["erf_label_weights"].to(device)
    if dist_info.is_main:
        engine.save_args(args.output_dir, vars(args))
        for i, jigsaw in enumerate(erf_batch[: args.visualize]):
            picture = render_jigsaw(
                jigsaw.image,
                jigsaw.labels,
                template=template,
                class_names=samples.class_names,
                content_boxes=jigsaw.content_boxes,
            )
            (args.output_dir / "visualize").mkdir(exist_ok=True)
            picture.save(args.output_dir / "visualize" / f"assembled_{i:02d}.png")
    ddp_model = engine.wrap_ddp(model, dist_info)

    sampler = engine.StepBatchSampler(
        dataset_size=len(assembled),
        batch_size=args.batch_size,
        seed=args.seed,
        start_step=start_step,
        total_steps=args.iters,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        accum_steps=args.accum_steps,
    )
    loader = engine.make_loader(
        engine.StepSeededDataset(assembled, transform=assembled, seed=args.seed),
        batch_sampler=sampler,
        num_workers=args.num_workers,
        seed=args.seed,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)

    def compute_losses(batch) -> dict[str, torch.Tensor]:
        images, labels = batch  # (B, 3, H, W) uint8, (B, 4) int64 in REGION_NAMES order
        images = normalize_jigsaw_image(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with engine.autocast(device, amp=args.amp):
            logits = ddp_model(images)  # (B, C + 1, h, w)
        # The losses switch autocast off and compute in float32 (engine.train_step runs this inside autocast).
        if args.classification == "erf_dense":
            loss = erf_adaptive_dense_loss(logits, labels, label_weights=label_weights, region_index=region_index)
        elif args.classification == "blockwise":
            loss = jigsaw_blockwise_loss(logits, labels, region_index=region_index)
        else:
            loss = jigsaw_global_loss(logits, labels, region_area_fractions=template.region_area_fractions())
        return {"jigsaw": loss}

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
            refreshed = args.classification == "erf_dense" and step % args.erf_every == 0
            if refreshed:
                label_weights = refresh_label_weights(
                    ddp_model, erf_images, template=template, args=args, dist_info=dist_info
                )
                if step == 0 and args.visualize and dist_info.is_main:
                    path = args.output_dir / "visualize" / "erf_top_left_step0.png"
                    save_top_left_erf(model, erf_images_uint8, erf_images, template=template, path=path)
            lr_at = engine.warmup_cosine_lr(
                step, base_lr=peak_lr, total_iters=args.iters, warmup_iters=args.warmup_iters, warmup_start_lr=warmup_lr
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
            extra = {"erf_refreshed": True} if refreshed else {}
            if refreshed:
                own = label_weights.gather(-1, region_index[..., None].long()).squeeze(-1)
                extra["erf_own_weight_mean"] = float(own.mean())
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
                    extra={"erf_label_weights": label_weights.cpu() if label_weights is not None else torch.zeros(0)},
                )
                if dist_info.is_main:
                    engine.save_checkpoint(checkpoint_path, state)

    # --------------------------------------------------------------------------------------------------- export
    export_dir = args.output_dir / "export"
    if dist_info.is_main:
        if args.visualize:
            path = args.output_dir / "visualize" / "erf_top_left_final.png"
            save_top_left_erf(model, erf_images_uint8, erf_images, template=template, path=path)
        detpretrain.save_pretrained(
            model.backbone,
            export_dir,
            arch=args.model,
            tag=args.tag,
            license=args.license,
            data=dataset_description,
            paper=JIGSAW_PAPER,
            datasets=[],  # a Hub dataset id is only known for the zoo's own rows
            **model_card_fields(
                args, samples, template, global_batch=global_batch, peak_lr=peak_lr, warmup_lr=warmup_lr
            ),
        )
        print(f"exported the backbone to {export_dir}")
    if dist_info.distributed:
        dist.barrier()
    engine.cleanup_distributed()
    return export_dir


def model_card_fields(args, samples: JigsawSamples, template: JigsawTemplate, *, global_batch, peak_lr, warmup_lr):
    """Every choice of this run, for the model card: what the paper fixes and what we chose (PAPER_NOTES.md)."""
    regions = {
        name: f"{int(b[2] - b[0])}x{int(b[3] - b[1])} (w x h)"
        for name, b in zip(REGION_NAMES, template.region_boxes().tolist(), strict=True)
    }
    if not has_zero_init_last(args.model):
        residual_init = f"{args.model}'s own (timm's {args.model} takes no zero_init_last)"
    elif args.zero_init_last:
        residual_init = "timm's zero_init_last: every residual branch's last BN starts at weight 0 (--zero-init-last)"
    else:
        residual_init = "torchvision's: every residual branch's last BN starts at weight 1 (timm's zero_init_last off)"
    extraction = samples.header["extraction"]
    return {
        "method": "Jigsaw (Montage) pre-training (montage_jigsaw.txt §3)",
        "paper_run": PAPER_RUNS.get(
            (args.fit, args.classification),
            f"none of the paper's (--fit {args.fit} with --classification {args.classification})",
        ),
        "jigsaw_template": f"{args.template}: canvas {template.canvas_width}x{template.canvas_height}, {regions} "
        "(the paper's sizes were lost with Fig. 4; ours, PAPER_NOTES.md)",
        "jigsaw_fit": f"{args.fit} (pad & crop is the paper's; warp/resize are Tab. 1 ablations, the scale ratio "
        "applied after the fit)",
        "jigsaw_augmentation": f"per sample: scale U{tuple(args.scale_range)} keeping aspect, flip p={args.flip_prob}; "
        "ImageNet mean/std after stitching",
        "classification": f"{args.classification} (ERF-adaptive dense is the paper's; others are Tab. 2 ablations)",
        "erf": f"threshold {args.erf_threshold}, refreshed every {args.erf_every} steps on {args.erf_images} fixed "
        "assembled images; gradient ERF (Luo et al.): |d feature(j,k) / d input| summed over RGB, BN in eval mode",
        "residual_init": f"{residual_init}; the step-0 ERF, which labels the first {args.erf_every} steps, depends on "
        "it (PAPER_NOTES.md 'ERF')",
        "classes": f"{len(samples.class_names) - 1} categories + background for negatives (the paper says C)",
        "samples": f"{len(samples)} ({json.dumps(samples.header['stats'])}); positives enlarged up to "
        f"{args.max_enlarge}x, positives:negatives {args.pos_neg_ratio}:1, crowd never positive, "
        f"samples under {args.min_sample_size}px dropped",
        "bad_images": _bad_images_note(samples, max_fraction=args.max_bad_image_fraction),
        "shape_groups": ", ".join(
            f"{g}: none, drawn from {samples.borrowed_groups[g]} (--empty-group borrow, not the paper's)"
            if g in samples.borrowed_groups
            else f"{g}: {len(samples.group_indices[g])} samples"
            for g in "STW"
        ),
        "sample_storage": f"cut once at native resolution, stored as JPEG quality {extraction['jpeg_quality']} with "
        f"{extraction['jpeg_subsampling']} chroma (our choice: PSNR 41 dB against lossless on coco128, "
        "benchmarks/RESULTS.md)",
        "schedule": f"{args.iters} steps, global batch {global_batch} assembled images, lr {warmup_lr:g} -> "
        f"{peak_lr:g} over {args.warmup_iters} steps then cosine to 0 (paper: 0.2 -> 0.8 at batch 512, linear "
        "scaling otherwise)",
        "optimizer": f"SGD momentum {args.momentum} (the paper names no optimizer: our choice), weight decay "
        f"{args.weight_decay}",
    }


def _bad_images_note(samples: JigsawSamples, *, max_fraction: float) -> str:
    """The model card's line on the source images extraction skipped (SAMPLES/skipped.jsonl), each with its reason."""
    skipped = samples.skipped_images()
    listed = "; ".join(f"{entry['file_name']}: {entry['reason']}" for entry in skipped[:20])
    listed += f"; ... (all in {samples.path / SKIPPED_NAME})" if len(skipped) > 20 else ""
    return (
        f"{len(skipped)} of {samples.header['num_images']} source images skipped (limit --max-bad-image-fraction "
        f"{max_fraction:g})" + (f": {listed}" if listed else "")
    )


if __name__ == "__main__":
    engine.run_main(main, get_args_parser().parse_args())
