"""Fine-tune a torchvision detector on a pre-trained timm backbone and evaluate it with the dataset's official metric.

This is how the zoo's weights are validated (predet.txt §4.2, montage_jigsaw.txt §4.1): Faster R-CNN (FPN or C4),
Mask R-CNN or RetinaNet on COCO, LVIS or PASCAL VOC, fine-tuned under a named protocol (``--protocol``: which layers
train, BN frozen or not, heads, image sizes; ../shared/PAPER_NOTES.md, "Fine-tuning protocols") and a schedule
(``--schedule``: 1x .. 9x, voc, jigsaw, scaled linearly to the global batch), then scored with pycocotools (COCO),
lvis-api's rules (LVIS: 300 detections per image above a score of 0.0001, as detectron2's LVIS configs) or
detectron2's VOC metric (VOC). Everything that moves AP between papers is recorded in eval.json (../shared/USERS.md,
item 3).

Defaults reproduce PreDet's setting: protocol ``predet`` (detectron2's detector defaults, BN trained and recomputed
before each evaluation by precise BN); Mask R-CNN on COCO and LVIS, Faster R-CNN on VOC (Tabs. 2, 5, 6); schedule 1x
on COCO and LVIS, ``voc`` (24k iterations, short side 480..800) on VOC, ``jigsaw`` (13 epochs) with ``--protocol
jigsaw``; 2 images per process, so 8 processes make the papers' batch of 16 (any other global batch scales the lr);
training without the images that have no annotation, in batches of one orientation (both references' defaults);
a PreDet export's FPN and heads (fpn.safetensors, heads.safetensors) loaded with its backbone.

    # PreDet's COCO row (Tab. 2): Mask R-CNN X101-32x8d, 1x, 8 GPUs x 2 images
    torchrun --nproc_per_node=8 finetune.py --backbone resnext101_32x8d.predet \\
        --train-images coco/train2017 --train-ann coco/annotations/instances_train2017.json \\
        --val-images coco/val2017 --val-ann coco/annotations/instances_val2017.json --output-dir out/x101_coco_1x
    # one GPU, the same global batch of 16 by gradient accumulation, bf16 autocast. Not PreDet's protocol: its BN is
    # trained, and here it normalizes over the 4 images of a micro-batch instead of SyncBN's 16 (eval.json records
    # train.batch_norm); frozen-BN protocols (jigsaw, standard) are the same protocol on one GPU
    python finetune.py --backbone resnext101_32x8d.predet --batch-size 4 --accum-steps 4 --amp bf16 ...
    # LVIS v1 (Tab. 5) and VOC (Tab. 6), each averaged over 3 seeds (OUTPUT_DIR/seed_K/, OUTPUT_DIR/eval_seeds.json)
    torchrun --nproc_per_node=8 finetune.py --format lvis --train-images coco --train-ann lvis_v1_train.json \\
        --val-images coco --val-ann lvis_v1_val.json --backbone resnext101_32x8d.predet --seeds 0,1,2 --output-dir ...
    torchrun --nproc_per_node=8 finetune.py --format voc --voc-root VOCdevkit --backbone ... --seeds 0,1,2 ...
    # your own data (detpretrain.data.sources): VOC XML beside the images with split lists, or YOLO's data yaml
    python finetune.py --format voc --train-images raccoon/images --train-ann raccoon/annotations \\
        --train-split raccoon/train.txt --val-split raccoon/test.txt --backbone resnet50.jigsaw --output-dir ...
    python finetune.py --format yolo --train-ann data.yaml --backbone convnext_tiny --output-dir ...
    # the Jigsaw paper's main table (Tab. 3): Faster R-CNN C4 on a train_jigsaw.py export, frozen BN, 13 epochs
    torchrun --nproc_per_node=8 finetune.py --arch fasterrcnn_c4 --protocol jigsaw --backbone resnet50 \\
        --backbone-weights out/r50_jigsaw/export --train-images ... --output-dir out/r50_jigsaw_c4
    # CPU smoke run on the embedded default dataset (no data flags), on the export of a train_jigsaw.py smoke run;
    # precise BN over 20 steps instead of detectron2's 200 before each of the 3 evaluations
    python finetune.py --backbone resnet18 --backbone-weights runs/quickstart/export --arch fasterrcnn \\
        --min-size 192 --max-size 256 --iters 300 --batch-size 4 --lr 0.02 --device cpu --num-workers 2 \\
        --eval-every 100 --protocol-set precise_bn_iters=20 --output-dir runs/quickstart/finetune

Any timm backbone whose features_only maps reach strides 4 to 32 works (detpretrain.backbone: ResNet, RegNet,
ConvNeXt, EfficientNet, MobileNet, PVT v2); the others are refused in one line. A training image that cannot be used
(undecodable, truncated, empty, of another size than its annotation) is replaced by a deterministically chosen one and
reported; past --max-bad-image-fraction the run stops. Input errors are one line on stderr, exit status 1.

Outputs in --output-dir: args.json; log.jsonl (one row per --log-every steps: lr, loss, each loss_<term>, the bad
images met so far, and the step's FLOPs with --count-flops);
checkpoint.pth (every --save-every steps and at the end; --resume auto continues it exactly); eval_history.jsonl (one
row per evaluation: every --eval-every steps and at the end) and ap_curve.png (AP against iterations; needs
matplotlib, the ``plots`` extra); eval.json (DESIGN.md's metrics, fractions 0..1, plus what produced them: detector,
protocol, loaded weights and heads, schedule, data, sampler, BN batch, seed, test settings, precise BN). With --seeds
A,B,C: one such folder per seed in seed_K/, and eval_seeds.json with the mean and sample standard deviation of every
metric. --eval-only --resume PATH|auto scores a checkpoint without training (precise BN recomputed as training did).
The AP table (points) is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

import detpretrain
from detpretrain import engine
from detpretrain.backbone import NORMS, BackboneError
from detpretrain.data.coco import CocoDataset
from detpretrain.data.detection import (
    ASPECT_RATIO_GROUPS,
    DatasetError,
    DetectionDataset,
    GroupedBatchSampler,
    check_has_boxes,
    collate_detection,
    uniform_epoch_order,
)
from detpretrain.data.lvis import (
    LVIS_REPEAT_THRESHOLD,
    LvisDataset,
    RepeatFactorBatchSampler,
    repeat_factor_epoch_order,
)
from detpretrain.data.sources import DATA_FLAGS, DataFlags, add_data_arguments, load_detection_data
from detpretrain.data.sources import evaluation_ground_truth as load_evaluation_ground_truth
from detpretrain.data.synthetic import synthetic_coco
from detpretrain.data.transforms import (
    LOW_SHOT_SHORT_RANGE,
    MULTISCALE_SHORT_SIDES,
    VOC_SHORT_SIDES,
    Compose,
    SampleTransform,
    train_transforms,
)
from detpretrain.data.voc import parse_image_sets
from detpretrain.detection import (
    ARCHS,
    PROTOCOLS,
    SCHEDULES,
    Protocol,
    ResolvedSchedule,
    build_detector,
    get_protocol,
    override_protocol,
    param_groups,
    parse_settings,
    schedule_for,
)
from detpretrain.detection.precise_bn import batch_norm_record, precise_batch_norm, trained_batch_norms
from detpretrain.evaluation import (
    LVIS_MAX_DETS_PER_IMAGE,
    LVIS_SCORE_THRESH,
    CocoEvaluator,
    EvaluationInputError,
    LvisEvaluator,
    VocEvaluator,
    load_coco_ground_truth,
    load_lvis_ground_truth,
)
from detpretrain.hub import HubWeightsError

DETECTOR_CLASSES = {"fasterrcnn": FasterRCNN, "fasterrcnn_c4": FasterRCNN, "maskrcnn": MaskRCNN, "retinanet": RetinaNet}
COCO_DETECTIONS_PER_IMAGE = 100  # COCOeval's maxDets; also VOC (detectron2's TEST.DETECTIONS_PER_IMAGE)
COCO_SCORE_THRESH = 0.05  # detectron2's ROI_HEADS.SCORE_THRESH_TEST and torchvision's box_score_thresh; also VOC
# The model-side draws of the precise-BN passes (proposal sampling) take a stream of their own per (seed, step,
# rank), apart from the samples' augmentation streams (engine.sample_seed of dataset indices, far below 2**40).
PRECISE_BN_STREAM = 1 << 40
EVAL_NAME, HISTORY_NAME, CURVE_NAME, SEEDS_NAME = "eval.json", "eval_history.jsonl", "ap_curve.png", "eval_seeds.json"
# Flags that only change what is evaluated or how the run is driven, never the weights a step produces: a resumed run
# may change them (the engine's own list covers devices, workers, logging and how the global batch is split).
RESUME_IGNORE = engine.DEFAULT_RESUME_IGNORE | {
    "val_images",
    "val_ann",
    "val_sets",
    "val_split",
    "val_subset",
    "eval_every",
    "eval_only",
    "seeds",
    "detections_per_img",
    "score_thresh",
}
# Columns of the printed AP table, in the order papers print them; eval.json also holds the AR values.
TABLE_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "mAP")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Detection fine-tuning and evaluation", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (no data flags: the embedded default dataset, its train and val splits)")
    # --format, images, annotations, VOCdevkit sets, splits, class names: detpretrain.data.sources (shared flags)
    add_data_arguments(data, flags=DATA_FLAGS, format_help="dataset format and metric (YOLO: COCO's metric)")
    data.add_argument(
        "--train-subset",
        type=int,
        help="train on N random images (low-shot, §5.3); also switches the train short side to [512, 800] (§5.3)",
    )
    data.add_argument("--subset-seed", type=int, default=0, help="which N images (nested: smaller N is a subset)")
    data.add_argument("--val-subset", type=int, help="evaluate on the first N images only (smoke runs; recorded)")
    data.add_argument(
        "--filter-empty-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train without the images that have no annotation, as detectron2 and torchvision's references do "
        "(before --train-subset draws; recorded)",
    )
    data.add_argument(
        "--group-by-aspect-ratio",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fill each global batch with images of one orientation (w > h, or not), as detectron2's "
        "AspectRatioGroupedDataset; with repeat-factor sampling too (recorded)",
    )

    model = parser.add_argument_group("detector and fine-tuning protocol")
    model.add_argument("--arch", choices=ARCHS, help="default: maskrcnn on COCO and LVIS, fasterrcnn on VOC (PreDet)")
    model.add_argument(
        "--backbone",
        required=True,
        help="timm name: a zoo tag (resnet50.jigsaw), a timm tag (resnet50.tv_in1k), hf-hub:org/repo, or the "
        "architecture of --backbone-weights",
    )
    model.add_argument(
        "--backbone-weights",
        type=Path,
        help="local export folder (its fpn.safetensors loads too) or .safetensors/.pth, instead of timm's weights",
    )
    model.add_argument("--no-pretrained", action="store_true", help="backbone from scratch (use with --norm gn)")
    model.add_argument("--no-fpn-weights", action="store_true", help="ignore an export's fpn.safetensors")
    model.add_argument(
        "--init-heads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the RPN conv and the 2fc box head from an export's heads.safetensors (PreDet's CRPN conv and "
        "CROI box head, where shapes match: our reading of predet.txt §1, §4.2) when it has one (recorded)",
    )
    model.add_argument("--protocol", default="predet", choices=sorted(PROTOCOLS), help="fine-tuning preset (§4.2)")
    model.add_argument(
        "--protocol-set",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=VALUE",
        help="override single protocol settings, e.g. box_head=4conv1fc random_crop=none (recorded)",
    )
    model.add_argument("--norm", choices=NORMS, help="backbone norm, overriding the protocol's")
    model.add_argument(
        "--min-size", type=int, nargs="+", help="train short sides (one drawn per image); the test size is the largest"
    )
    model.add_argument("--max-size", type=int, help="cap on the long side, train and test")
    model.add_argument("--detections-per-img", type=int, help="kept at test time (default 100; 300 for LVIS)")
    model.add_argument(
        "--score-thresh",
        type=float,
        help="test-time score threshold (default 0.05; LVIS 0.0001, as detectron2's and mmdetection's LVIS configs)",
    )
    model.add_argument(
        "--detector-set",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=VALUE",
        help="torchvision detector settings (default: torchvision's, and detectron2's where the protocol's "
        "detector_defaults say so, see detpretrain/detection/detectors.py), e.g. box_batch_size_per_image=128 "
        "rpn_post_nms_top_n_test=300 to make small CPU runs cheaper (recorded)",
    )

    optim = parser.add_argument_group("schedule and optimization ([P19] via predet.txt §4.2)")
    optim.add_argument(
        "--schedule", choices=sorted(SCHEDULES), help="default: 1x (COCO, LVIS), voc (VOC), jigsaw (--protocol jigsaw)"
    )
    optim.add_argument(
        "--iters",
        type=int,
        help="run N optimizer steps instead of the schedule's total; its milestones and warmup scale by the same "
        "factor, so the lr curve keeps its shape (short runs)",
    )
    optim.add_argument("--lr", type=float, help="base lr at the schedule's batch of 16 (default 0.02), scaled linearly")
    optim.add_argument("--batch-size", type=int, default=2, help="images per process per micro-step (papers: 2 x 8)")
    optim.add_argument("--accum-steps", type=int, default=1, help="micro-steps per optimizer step")
    optim.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (off, as detectron2)")
    optim.add_argument(
        "--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast on CUDA (off: fp32, detectron2's)"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, default=Path("runs/finetune"))
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
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
        help="minutes a rank waits for the others at a collective, e.g. while rank 0 evaluates (torchrun)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--seeds", help="comma-separated seeds run one after another into OUTPUT_DIR/seed_K/, e.g. 0,1,2 (§4.2)"
    )
    run.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    run.add_argument("--resume", default=None, help="'auto' continues OUTPUT_DIR/checkpoint.pth if present, or a path")
    run.add_argument("--eval-only", action="store_true", help="score the checkpoint of --resume, no training")
    run.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps too (0: only at the end)")
    run.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    run.add_argument("--log-every", type=int, default=20, help="log.jsonl row every N steps")
    run.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    run.add_argument(
        "--max-bad-image-fraction",
        type=float,
        default=engine.DEFAULT_MAX_BAD_IMAGE_FRACTION,
        help="training skips an image that cannot be used (undecodable, truncated, empty, of another size than its "
        "annotation), replaces it and reports it in log.jsonl and eval.json; more than this share of the training "
        "images stops the run (0: the first one does)",
    )
    run.add_argument(
        "--count-flops",
        action="store_true",
        help="count each step's FLOPs (torch.utils.flop_counter) into log.jsonl's flops: the study's compute unit",
    )
    return parser


# ------------------------------------------------------------------------------------------------------ arguments
def check_args(args: argparse.Namespace) -> list[int]:
    """One-line errors for flag combinations that cannot work, before anything starts; returns the --seeds list."""
    coco_like = ("--train-images", "--train-ann", "--val-images", "--val-ann")
    given = {flag for flag in coco_like if getattr(args, flag[2:].replace("-", "_")) is not None}
    for a, b in (("--train-images", "--train-ann"), ("--val-images", "--val-ann")):
        if (a in given) != (b in given) and args.format in ("coco", "lvis"):
            missing = b if a in given else a
            raise SystemExit(f"{a} and {b} go together: pass {missing} too (or neither pair for the embedded default)")
    if args.format in ("voc", "yolo"):
        if args.arch == "maskrcnn":
            raise SystemExit(
                f"{args.format.upper()} has no instance masks: use --arch fasterrcnn, fasterrcnn_c4 or retinanet"
            )
        if args.voc_root is not None and args.format == "voc":
            if given:
                raise SystemExit(f"--voc-root reads its image sets, not {', '.join(sorted(given))}: drop them")
            parse_voc_sets(args.train_sets)
            if len(parse_voc_sets(args.val_sets)) != 1:
                raise SystemExit(f"--val-sets {args.val_sets}: evaluate one VOC image set at a time, e.g. 2007-test")
        elif args.train_images is None and not (args.format == "yolo" and args.train_ann is not None):
            raise SystemExit(
                "--format voc needs --voc-root VOCdevkit, or --train-images DIR (XML files beside the images or in "
                "--train-ann XML_DIR)"
                if args.format == "voc"
                else "--format yolo needs --train-ann data.yaml, or --train-images DIR with --class-names"
            )
    else:
        if args.voc_root is not None:
            raise SystemExit(f"--voc-root needs --format voc (this run reads --format {args.format})")
        for flag in ("train_split", "val_split", "val_fraction", "class_names"):
            if getattr(args, flag) is not None:
                name = "--" + flag.replace("_", "-")
                raise SystemExit(f"{name} is for --format voc / yolo folders: a {args.format} json lists its images")
        if "--val-images" in given and "--train-images" not in given:
            raise SystemExit("--val-images/--val-ann need --train-images/--train-ann: the embedded default has its own")
        if "--train-images" in given and "--val-images" not in given:
            raise SystemExit("pass --val-images DIR --val-ann FILE too: the set the fine-tuned detector is scored on")
        if args.format == "lvis" and not given:
            raise SystemExit("--format lvis needs --train-images/--train-ann and --val-images/--val-ann")
    for flag in ("batch_size", "accum_steps", "iters", "train_subset", "val_subset", "save_every", "log_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {value}: pass a positive number")
    if args.eval_every < 0:
        raise SystemExit(f"--eval-every {args.eval_every}: pass 0 (only at the end) or a positive number of steps")
    if args.score_thresh is not None and not 0 <= args.score_thresh < 1:
        raise SystemExit(f"--score-thresh {args.score_thresh}: pass a score in [0, 1), e.g. 0.05 (LVIS: 0.0001)")
    if args.eval_only and not args.resume:
        raise SystemExit("--eval-only scores a checkpoint: pass --resume PATH (or --resume auto for OUTPUT_DIR's)")
    if args.backbone_weights is not None and not args.backbone_weights.exists():
        raise SystemExit(f"--backbone-weights {args.backbone_weights} does not exist: pass an export folder or file")
    resolve_protocol(args)  # --protocol-set / --norm / sizes: fail now, not after the data has loaded
    detector_settings(args)
    if args.seeds is None:
        return []
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: pass comma-separated integers, e.g. 0,1,2") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"--seeds {args.seeds!r}: pass two or more distinct seeds >= 0 (one run: --seed)")
    return seeds


def parse_voc_sets(text: str) -> list[tuple[int, str]]:
    try:
        return parse_image_sets(text)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def resolve_protocol(args: argparse.Namespace) -> Protocol:
    """The preset of --protocol with, in increasing precedence: the VOC scales, the low-shot scales (§5.3),
    --protocol-set, --norm, --min-size / --max-size. Every change shows in eval.json's ``protocol.overrides``."""
    settings: dict[str, Any] = {}
    if args.format == "voc" and get_protocol(args.protocol).train_min_sizes == MULTISCALE_SHORT_SIDES:
        # Our reading: PreDet's VOC recipe (§4.2) is MoCo's VOC config, which trains at 480..800; §4.2's 640..800
        # is said of COCO and LVIS. Single-scale protocols keep their size.
        settings["train_min_sizes"] = VOC_SHORT_SIDES
    if args.train_subset is not None:
        low, high = LOW_SHOT_SHORT_RANGE  # predet.txt §5.3: "a scale range of [512, 800]", every size in it
        settings["train_min_sizes"] = tuple(range(low, high + 1))
    try:
        settings.update(parse_settings(args.protocol_set))
        if args.norm is not None:
            settings["norm"] = args.norm
        if args.min_size is not None:
            settings.update(train_min_sizes=tuple(args.min_size), test_min_size=max(args.min_size))
        if args.max_size is not None:
            settings.update(train_max_size=args.max_size, test_max_size=args.max_size)
        return override_protocol(get_protocol(args.protocol), **settings)
    except ValueError as err:
        raise SystemExit(f"--protocol {args.protocol} --protocol-set {' '.join(args.protocol_set)}: {err}") from None


def detector_settings(args: argparse.Namespace) -> dict[str, int | float]:
    """--detector-set NAME=VALUE as keyword arguments of the torchvision class, typed like the class's defaults.

    Only numeric settings (sampling sizes, thresholds, top-k), and not min_size/max_size: the protocol's
    transform replaces torchvision's, so those would be silently ignored (--min-size/--max-size set the sizes).
    """
    arch = default_arch(args)
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(DETECTOR_CLASSES[arch]).parameters.items()
        if isinstance(parameter.default, int | float) and name not in ("min_size", "max_size")
    }
    settings: dict[str, int | float] = {}
    for item in args.detector_set:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            raise SystemExit(
                f"--detector-set {item}: {arch} has no numeric setting {key!r}; use one of {sorted(defaults)}"
            )
        try:
            settings[key] = type(defaults[key])(text.strip())
        except ValueError:
            raise SystemExit(f"--detector-set {item}: {key} takes a {type(defaults[key]).__name__}") from None
    return settings


def default_arch(args: argparse.Namespace) -> str:
    return args.arch or ("fasterrcnn" if args.format in ("voc", "yolo") else "maskrcnn")


def default_score_thresh(args: argparse.Namespace) -> float:
    return LVIS_SCORE_THRESH if args.format == "lvis" else COCO_SCORE_THRESH


def default_schedule(args: argparse.Namespace) -> str:
    if args.schedule is not None:
        return args.schedule
    return "voc" if args.format == "voc" else "jigsaw" if args.protocol == "jigsaw" else "1x"


# ----------------------------------------------------------------------------------------------------------- data
def load_datasets(args: argparse.Namespace, *, with_masks: bool) -> tuple[DetectionDataset, DetectionDataset, Any]:
    """(training set, evaluation set, the evaluation ground truth loaded once for every evaluation)."""
    try:
        if args.format in ("voc", "yolo"):  # VOCdevkit, VOC XML folders, YOLO: detpretrain.data.sources
            train, val = load_detection_data(DataFlags.from_namespace(args), need_val=True)
            ground_truth = load_evaluation_ground_truth(val)
        elif args.format == "lvis":
            train = LvisDataset(args.train_ann, args.train_images, with_masks=with_masks)
            val = LvisDataset(args.val_ann, args.val_images)
            ground_truth = load_lvis_ground_truth(args.val_ann)
        else:
            if args.train_ann is None:
                default = synthetic_coco()
                train_ann, train_images, val_ann, val_images = (
                    default.train_ann,
                    default.train_images,
                    default.val_ann,
                    default.val_images,
                )
            else:
                train_ann, train_images, val_ann, val_images = (
                    args.train_ann,
                    args.train_images,
                    args.val_ann,
                    args.val_images,
                )
            train = CocoDataset(train_ann, train_images, with_masks=with_masks)
            val = CocoDataset(val_ann, val_images)
            ground_truth = load_coco_ground_truth(val_ann)
    except (DatasetError, EvaluationInputError) as err:
        raise SystemExit(str(err)) from None
    if train.label_to_category != val.label_to_category:
        raise SystemExit(
            f"the training and evaluation annotations list different categories ({train.num_classes - 1} vs "
            f"{val.num_classes - 1}): pass files of the same dataset"
        )
    if args.filter_empty_images:  # before the low-shot draw: --train-subset N trains on N annotated images
        try:
            train = train.drop_images_without_annotations()
        except DatasetError as err:
            raise SystemExit(str(err)) from None
    if args.train_subset is not None:
        if args.train_subset > len(train):
            raise SystemExit(f"--train-subset {args.train_subset}: the training set has only {len(train)} images")
        train = train.random_subset(args.train_subset, seed=args.subset_seed)
    if args.val_subset is not None and args.val_subset < len(val):
        val = val.subset(range(args.val_subset), record={"first": args.val_subset, "from_num_images": len(val)})
    return train, val, ground_truth


def train_transform(protocol: Protocol) -> Compose:
    """The protocol's training augmentation in the dataset: crop, resize, flip (detpretrain.data.transforms)."""
    sizes = protocol.train_min_sizes
    # Every integer of a range (the low-shot [512, 800]) is the same draw as short_range, with a shorter recipe.
    is_range = len(sizes) > 2 and sizes == tuple(range(sizes[0], sizes[-1] + 1))
    return train_transforms(
        short_sides=None if is_range else sizes,
        short_range=(sizes[0], sizes[-1]) if is_range else None,
        max_size=protocol.train_max_size,
        crop_relative_range=protocol.random_crop,
        flip_p=protocol.flip_prob,
    )


def make_evaluator(args: argparse.Namespace, ground_truth: Any, *, val: DetectionDataset, iou_types: tuple[str, ...]):
    if args.format == "voc":  # VOCdevkit and VOC XML folders; YOLO is scored with COCO's metric (data.yolo)
        return VocEvaluator(ground_truth, label_to_category=val.label_to_category)
    if args.format == "lvis":
        return LvisEvaluator(ground_truth, iou_types=iou_types, label_to_category=val.label_to_category)
    return CocoEvaluator(ground_truth, iou_types=iou_types, label_to_category=val.label_to_category)


def images_to_device(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 (3, H, W) images from the loader -> float [0, 1] on the device (the copy moves 4x fewer bytes)."""
    return [image.as_subclass(torch.Tensor).to(device, non_blocking=True).float().div_(255) for image in images]


def targets_to_device(targets: list[dict], device: torch.device, *, with_masks: bool) -> list[dict[str, torch.Tensor]]:
    """What torchvision's detectors read in training: boxes (N, 4) xyxy float, labels (N,), masks (N, H, W)."""
    keys = ("boxes", "labels", "masks") if with_masks else ("boxes", "labels")
    return [{k: t[k].as_subclass(torch.Tensor).to(device, non_blocking=True) for k in keys} for t in targets]


# ------------------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    val: DetectionDataset,
    evaluator,
    *,
    image_key: str,
    batch_size: int,
    num_workers: int,
    dist_info: engine.DistInfo,
) -> dict[str, Any] | None:
    """Score ``model`` on ``val``: each rank predicts every world_size-th image, the evaluator gathers them all;
    on the main rank the evaluator's summary plus ``images`` (how many were scored) and
    ``background_detections_dropped``, None on the others. float32, as torchvision's reference evaluates."""
    shard = torch.utils.data.Subset(val, range(dist_info.rank, len(val), dist_info.world_size))
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=dist_info.device.type == "cuda",
        # Its own generator: creating the iterator must not draw from the global RNG the checkpoint restores.
        generator=torch.Generator().manual_seed(0),
    )
    was_training = model.training
    model.eval()  # the model's transform resizes to the test size and maps predictions back to the image's pixels
    for images, targets in loader:
        outputs = model(images_to_device(images, dist_info.device))
        evaluator.update(
            {t[image_key]: {k: v.cpu() for k, v in o.items()} for t, o in zip(targets, outputs, strict=True)}
        )
    model.train(was_training)
    evaluator.synchronize()
    if not dist_info.is_main:
        return None
    # Label-0 (background) detections, which RetinaNet can return, are dropped by the evaluator and counted here.
    return {
        **evaluator.summarize(),
        "images": len(evaluator.image_ids),
        "background_detections_dropped": evaluator.background_detections,
    }


def metrics_of(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The metric sections of an evaluator summary or eval.json: bbox, segm, voc07."""
    return {k: v for k, v in summary.items() if k in ("bbox", "segm", "voc07")}


def ap_table(metrics: dict[str, dict[str, Any]], *, spread: dict[str, dict[str, float]] | None = None) -> str:
    """An aligned text table of AP values in points (100 x eval.json's fractions); ``-`` where there is no ground
    truth (-1) or no such metric; with ``spread``, ``mean ± std``."""
    columns = [c for c in TABLE_COLUMNS if any(c in section for section in metrics.values())]

    def cell(section: str, column: str) -> str:
        value = metrics[section].get(column)
        if value is None or value < 0:
            return "-"
        text = f"{100 * value:.1f}"
        if spread is not None and spread.get(section, {}).get(column) is not None:
            text += f" ± {100 * spread[section][column]:.1f}"
        return text

    rows = [["", *columns]] + [[section, *(cell(section, c) for c in columns)] for section in metrics]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    return "\n".join("  ".join(text.rjust(w) for text, w in zip(row, widths, strict=True)) for row in rows)


def read_history(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` through a temp file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def plot_ap_curve(rows: list[dict[str, Any]], path: Path) -> bool:
    """AP (points) against iterations, one line per metric section; False when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    for section, key in (("bbox", "AP"), ("segm", "AP"), ("voc07", "mAP")):
        points = [(r["iter"], 100 * r[section][key]) for r in rows if section in r and r[section][key] >= 0]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=f"{section} {key}")
    axes.set_xlabel("iterations")
    axes.set_ylabel("AP (points)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


# ----------------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> Path:
    """Fine-tune and evaluate (or only evaluate); with --seeds, once per seed and a summary. Returns the path of
    eval.json (eval_seeds.json with --seeds)."""
    seeds = check_args(args)
    dist_info = engine.setup_distributed(args.device, timeout_minutes=args.dist_timeout)
    try:
        if not seeds:
            return finetune(args, dist_info)
        runs = {}
        for seed in seeds:
            seed_args = argparse.Namespace(
                **{**vars(args), "seed": seed, "seeds": None, "output_dir": args.output_dir / f"seed_{seed}"}
            )
            runs[seed] = finetune(seed_args, dist_info)
        return summarize_seeds(runs, output_dir=args.output_dir, dist_info=dist_info)
    finally:
        engine.cleanup_distributed()


def finetune(args: argparse.Namespace, dist_info: engine.DistInfo) -> Path:
    """One run: setup, data, model, optimizer, resume, train, evaluate. Returns OUTPUT_DIR/eval.json."""
    # ---------------------------------------------------------------------------------------------------- setup
    engine.seed_everything(args.seed, rank=dist_info.rank, deterministic=args.deterministic)
    device = dist_info.device
    args.output_dir.mkdir(parents=True, exist_ok=True)
    arch, protocol = default_arch(args), resolve_protocol(args)
    with_masks = arch == "maskrcnn"
    iou_types = ("bbox", "segm") if with_masks else ("bbox",)
    global_batch = args.batch_size * dist_info.world_size * args.accum_steps

    # ----------------------------------------------------------------------------------------------------- data
    train, val, ground_truth = load_datasets(args, with_masks=with_masks)
    check_has_boxes(train, role="training")  # no box to learn from, or to score against: stop before any work
    check_has_boxes(val, role="evaluation")
    transform = train_transform(protocol)
    # LVIS: repeat-factor sampling (LVIS appendix B.2, t = 0.001, as detectron2's LVIS configs): our recorded choice
    sampler_record: dict[str, Any] = (
        {"kind": "repeat_factor", "threshold": LVIS_REPEAT_THRESHOLD}
        if args.format == "lvis"
        else {"kind": "uniform", "order": "seeded permutation per epoch"}
    )
    repeat_factors = train.repeat_factors() if args.format == "lvis" else None
    groups = train.aspect_ratio_groups()
    sampler_record["aspect_ratio_grouping"] = (
        {
            "groups": list(ASPECT_RATIO_GROUPS),
            "images_per_group": [int((groups == g).sum()) for g in range(len(ASPECT_RATIO_GROUPS))],
            "unit": "global batch",
            "as": "detectron2 AspectRatioGroupedDataset",
        }
        if args.group_by_aspect_ratio
        else None
    )
    image_key = "image_name" if args.format == "voc" else "image_id"  # what each evaluator keys images by

    def make_sampler(start_step: int, total_steps: int) -> engine.StepBatchSampler:
        """This rank's batches of steps [start_step, total_steps): training, and the precise-BN passes."""
        common = dict(
            batch_size=args.batch_size,
            seed=args.seed,
            start_step=start_step,
            total_steps=total_steps,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            accum_steps=args.accum_steps,
        )
        if not args.group_by_aspect_ratio:
            if repeat_factors is not None:
                return RepeatFactorBatchSampler(repeat_factors=repeat_factors, **common)
            return engine.StepBatchSampler(dataset_size=len(train), **common)
        if repeat_factors is not None:
            epoch_order = functools.partial(repeat_factor_epoch_order, repeat_factors, seed=args.seed)
        else:
            epoch_order = functools.partial(uniform_epoch_order, len(train), seed=args.seed)
        return GroupedBatchSampler(epoch_order=epoch_order, groups=groups, **common)

    def make_train_loader(start_step: int, total_steps: int) -> torch.utils.data.DataLoader:
        return engine.make_loader(
            engine.StepSeededDataset(train, transform=SampleTransform(transform), seed=args.seed),
            batch_sampler=make_sampler(start_step, total_steps),
            num_workers=args.num_workers,
            seed=args.seed,
            collate_fn=collate_detection,
            pin_memory=device.type == "cuda",
        )

    # ---------------------------------------------------------------------------------------------------- model
    detections_per_img = args.detections_per_img or (
        LVIS_MAX_DETS_PER_IMAGE if args.format == "lvis" else COCO_DETECTIONS_PER_IMAGE
    )
    score_thresh = args.score_thresh if args.score_thresh is not None else default_score_thresh(args)
    try:
        model, record = build_detector(
            arch,
            backbone=args.backbone,
            num_classes=train.num_classes,
            protocol=protocol,
            # --eval-only takes every weight from the checkpoint: no download, no export needed
            pretrained=not (args.no_pretrained or args.eval_only),
            backbone_weights=None if args.eval_only else args.backbone_weights,
            load_fpn_weights=not args.no_fpn_weights,
            load_head_weights=args.init_heads,
            world_size=dist_info.world_size,
            device_type=device.type,
            detections_per_img=detections_per_img,
            score_thresh=score_thresh,
            detector_kwargs=detector_settings(args),
        )
    except BackboneError as err:  # a model without the levels, stages or norm the detector needs: its own one line
        raise SystemExit(f"--backbone {err}") from None
    except (ValueError, HubWeightsError) as err:
        raise SystemExit(f"--backbone {args.backbone}: {err}") from None
    memory_format = engine.memory_format(device)
    model.to(device, memory_format=memory_format)
    batch_norm = batch_norm_record(
        model, batch_size=args.batch_size, world_size=dist_info.world_size, global_batch=global_batch
    )

    # ------------------------------------------------------------------------------------------------ optimizer
    schedule, schedule_record = resolve_schedule(
        args, name=default_schedule(args), global_batch=global_batch, train=train
    )
    optimizer = torch.optim.SGD(
        param_groups(model, base_lr=schedule.base_lr, weight_decay=schedule.weight_decay, protocol=protocol),
        lr=schedule.base_lr,
        momentum=schedule.momentum,
    )
    scaler = engine.make_grad_scaler(device, amp=args.amp)

    def run_record(step: int, result: dict[str, Any]) -> dict[str, Any]:
        """Everything eval.json says besides the metrics (../shared/USERS.md item 3: the protocol is recorded)."""
        return {
            "iter": step,
            "seed": args.seed,
            "model": record,
            "schedule": schedule_record,
            "train": {
                "data": train.describe(),
                "transform": transform.recipe(),
                "sampler": sampler_record,
                "batch_size": args.batch_size,
                "world_size": dist_info.world_size,
                "accum_steps": args.accum_steps,
                "global_batch_size": global_batch,
                "batch_norm": batch_norm,
                "amp": args.amp if device.type == "cuda" else "off (CPU)",
                "device": device.type,
                "bad_images": bad_images.summary(),
            },
            "eval": {
                "data": val.describe(),
                "metric": {
                    "coco": "pycocotools COCOeval",
                    "lvis": "lvis-api",
                    "voc": "detectron2 PASCAL VOC",
                    "yolo": "pycocotools COCOeval",
                }[args.format],
                "test_size": {"min_size": protocol.test_min_size, "max_size": protocol.test_max_size},
                "detections_per_img": detections_per_img,
                "score_thresh": score_thresh,
                "precise_bn": result["precise_bn"],
                "background_detections_dropped": result["background_detections_dropped"],
                "images_evaluated": result["images"],
            },
            "versions": {
                "detpretrain": detpretrain.__version__,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "timm": timm.__version__,
            },
        }

    def precise_bn_forward(batch) -> None:
        images, targets = batch
        with engine.autocast(device, amp=args.amp):  # the statistics of the forward that training runs
            model(images_to_device(images, device), targets_to_device(targets, device, with_masks=with_masks))

    def run_evaluation(step: int) -> dict[str, Any] | None:
        """Score ``model`` at ``step``; where BN is trained, with its statistics recomputed first (precise BN, over
        the training batches of steps ``step`` .. ``step + precise_bn_iters - 1``) and put back afterwards."""
        if dist_info.distributed:
            # Trained BN's running statistics drift apart per rank after the last step (DDP broadcasts rank 0's
            # before each forward): evaluate every shard with rank 0's, the ones the checkpoint holds.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        iters = protocol.precise_bn_iters if trained_batch_norms(model) else 0
        batches = iter(make_train_loader(step, step + iters)) if iters else iter(())
        with precise_batch_norm(
            model,
            batches,
            forward=precise_bn_forward,
            num_batches=iters * args.accum_steps,
            seed=engine.sample_seed(args.seed, step, PRECISE_BN_STREAM + dist_info.rank),
            device=device,
        ) as layers:
            result = evaluate(
                model,
                val,
                make_evaluator(args, ground_truth, val=val, iou_types=iou_types),
                image_key=image_key,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                dist_info=dist_info,
            )
        if result is None:
            return None
        precise_bn = (
            {"layers": layers, "steps": [step, step + iters], "images_per_forward": batch_norm["images_per_forward"]}
            if layers
            else {"layers": 0, "why": "no trained BatchNorm" if protocol.precise_bn_iters else "precise_bn_iters=0"}
        )
        return {**result, "precise_bn": precise_bn}

    # --------------------------------------------------------------------------------------------------- resume
    bad_images = engine.BadSampleTracker(
        dataset_size=len(train),
        max_fraction=args.max_bad_image_fraction,
        dist_info=dist_info,
        source=", ".join(map(str, train.source.values())),
    )
    start_step = 0
    checkpoint_path = args.output_dir / engine.CHECKPOINT_NAME
    resume_from = engine.resolve_resume(args.resume, output_dir=args.output_dir)
    if args.eval_only:  # score the checkpoint's weights in the detector the flags describe, and stop
        if resume_from is None:
            raise SystemExit(f"--eval-only --resume auto: {checkpoint_path} does not exist; pass a checkpoint path")
        checkpoint = engine.load_checkpoint(resume_from)
        load_for_evaluation(model, checkpoint, path=resume_from)
        result = run_evaluation(int(checkpoint["step"]))
        eval_path = args.output_dir / EVAL_NAME
        if dist_info.is_main:
            metrics = metrics_of(result)
            summary = {**metrics, **run_record(int(checkpoint["step"]), result)}
            # This run trained nothing: the weights, and how they were trained, are the checkpoint's.
            del summary["train"], summary["schedule"], summary["seed"]
            summary["model"]["loaded"] = {
                "checkpoint": str(resume_from),
                "trained_from": checkpoint.get("detector_record"),
            }
            summary["checkpoint_args"] = checkpoint.get("args")
            write_json(eval_path, summary)
            print(f"{eval_path} ({resume_from}, step {checkpoint['step']}; AP in points):\n{ap_table(metrics)}")
        if dist_info.distributed:
            dist.barrier()
        return eval_path
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
        bad_images.load_state_dict(checkpoint.get("bad_images"))  # the images skipped before the checkpoint
    history_path = args.output_dir / HISTORY_NAME
    if dist_info.is_main:
        engine.save_args(args.output_dir, vars(args))
        # Evaluations after the checkpoint are redone by this run: keep each iteration once.
        history = [row for row in read_history(history_path) if row["iter"] <= start_step]
        history_path.write_text("".join(json.dumps(row) + "\n" for row in history))
        print(
            f"fine-tuning {arch} on {args.backbone} ({record['loaded']['backbone']['from']} weights), protocol "
            f"{protocol.name} {json.dumps(record['protocol']['overrides'])}: {len(train)} training images, "
            f"{len(val)} evaluation images, {train.num_classes - 1} classes; schedule {schedule.name}: "
            f"{schedule.total_iters} steps of {global_batch} images, lr {schedule.base_lr:g}, drops at "
            f"{list(schedule.milestones)}, warmup {schedule.warmup_iters}; starting at step {start_step}",
            flush=True,
        )
        if batch_norm.get("note"):
            print(f"note: {batch_norm['note']}", flush=True)
    ddp_model = engine.wrap_ddp(model, dist_info)
    train_loader = make_train_loader(start_step, schedule.total_iters)
    batches = iter(train_loader)

    def compute_losses(batch) -> dict[str, torch.Tensor]:
        images, targets = batch  # lists: uint8 (3, H_i, W_i) at the train size; targets with boxes in those pixels
        # torchvision's detectors in train mode return their named losses (loss_classifier, loss_box_reg, ...)
        return ddp_model(images_to_device(images, device), targets_to_device(targets, device, with_masks=with_masks))

    # ---------------------------------------------------------------------------------------------------- train
    with engine.TrainLogger(
        output_dir=args.output_dir,
        total_steps=schedule.total_iters,
        start_step=start_step,
        samples_per_step=global_batch,
        log_every=args.log_every,
        is_main=dist_info.is_main,
        quiet=args.quiet,
        bad_samples=bad_images,
    ) as logger:
        for step in range(start_step, schedule.total_iters):
            lr = engine.set_lr(optimizer, schedule.lr_at(step))  # each group times its lr_scale (mask head x4)
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
            bad_images.update(train_loader.take_skipped(), step=step)  # every rank; stops past the limit
            logger.log(step, lr=lr, stats=stats)
            done = step + 1
            if done % args.save_every == 0 or done == schedule.total_iters:
                state = engine.training_state(
                    model=ddp_model,
                    optimizer=optimizer,
                    scaler=scaler,
                    step=done,
                    args=vars(args),
                    global_batch_size=global_batch,
                    dist_info=dist_info,
                    extra={"detector_record": record, "bad_images": bad_images.state_dict()},
                )
                if dist_info.is_main:
                    engine.save_checkpoint(checkpoint_path, state)
            if args.eval_every and done % args.eval_every == 0 and done != schedule.total_iters:
                record_evaluation(run_evaluation(done), step=done, output_dir=args.output_dir, dist_info=dist_info)

    # ------------------------------------------------------------------------------------------------- evaluate
    # A resumed run that had already finished keeps its last evaluation (rank 0's file decides for every rank).
    final = [row for row in read_history(history_path) if row["iter"] == schedule.total_iters][:1]
    if dist_info.distributed:
        decision = [final if dist_info.is_main else None]
        dist.broadcast_object_list(decision, src=0)
        final = decision[0]
    if final:
        result = final[0]
    else:
        result = run_evaluation(schedule.total_iters)
        record_evaluation(result, step=schedule.total_iters, output_dir=args.output_dir, dist_info=dist_info)
    eval_path = args.output_dir / EVAL_NAME
    if dist_info.is_main:
        metrics = metrics_of(result)
        write_json(eval_path, {**metrics, **run_record(schedule.total_iters, result)})
        print(f"{eval_path} (AP in points):\n{ap_table(metrics)}", flush=True)
    if dist_info.distributed:
        dist.barrier()
    return eval_path


def resolve_schedule(
    args: argparse.Namespace, *, name: str, global_batch: int, train: DetectionDataset
) -> tuple[ResolvedSchedule, dict[str, Any]]:
    """The schedule at this global batch (lr x batch / 16, iterations x 16 / batch), compressed to --iters when
    given: milestones and warmup scale with the total, so a short run sees the same lr curve in fewer steps."""
    iters_per_epoch = math.ceil(len(train) / global_batch) if SCHEDULES[name].unit == "epoch" else None
    try:
        schedule = schedule_for(name, global_batch_size=global_batch, iters_per_epoch=iters_per_epoch, base_lr=args.lr)
    except ValueError as err:
        raise SystemExit(f"--schedule {name}: {err}") from None
    full = schedule.as_dict()
    if args.iters is not None and args.iters != schedule.total_iters:
        ratio = args.iters / schedule.total_iters
        schedule = dataclasses.replace(
            schedule,
            total_iters=args.iters,
            milestones=tuple(round(m * ratio) for m in schedule.milestones),
            warmup_iters=round(schedule.warmup_iters * ratio),
        )
    record = schedule.as_dict()
    if schedule.total_iters != full["total_iters"]:
        record["compressed_from"] = {k: full[k] for k in ("total_iters", "milestones", "warmup_iters")}
    return schedule, record


def record_evaluation(result, *, step: int, output_dir: Path, dist_info: engine.DistInfo) -> None:
    """Append one evaluation to eval_history.jsonl and redraw ap_curve.png (main rank)."""
    if not dist_info.is_main:
        return
    history_path = output_dir / HISTORY_NAME
    with open(history_path, "a") as f:
        f.write(json.dumps({"iter": step, **result}) + "\n")
    if not plot_ap_curve(read_history(history_path), output_dir / CURVE_NAME):
        print(
            f"matplotlib is not installed (pip install 'detpretrain[plots]'): no {CURVE_NAME}; the numbers are in "
            f"{history_path}",
            flush=True,
        )
    headline = {section: values.get("AP", values.get("mAP")) for section, values in metrics_of(result).items()}
    print(f"step {step}: {json.dumps(headline)} on {result['images']} images", flush=True)


def load_for_evaluation(model: torch.nn.Module, checkpoint: dict[str, Any], *, path: Path) -> None:
    """--eval-only: the checkpoint's weights into ``model``, or one line saying which flags differ."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        trained = checkpoint.get("args", {})
        settings = {k: trained.get(k) for k in ("arch", "backbone", "protocol", "protocol_set", "norm", "format")}
        raise SystemExit(
            f"--eval-only: {path} holds another detector ({json.dumps(settings)}; {str(err).splitlines()[0]}): "
            "pass the flags it was trained with (its args.json)"
        ) from None


def summarize_seeds(runs: dict[int, Path], *, output_dir: Path, dist_info: engine.DistInfo) -> Path:
    """eval_seeds.json: per metric, the mean and sample standard deviation over the seeds (predet.txt §4.2 reports
    LVIS and VOC as the average of 3 runs), and each seed's value."""
    path = output_dir / SEEDS_NAME
    if not dist_info.is_main:
        return path
    results = {seed: metrics_of(json.loads(p.read_text())) for seed, p in runs.items()}
    first = next(iter(results.values()))
    values = {s: {k: [results[seed][s][k] for seed in runs] for k in first[s]} for s in first}
    # -1 means "no ground truth to measure" (e.g. no small objects): it stays -1, it is not a number to average.
    mean = {s: {k: statistics.fmean(v) if min(v) >= 0 else -1.0 for k, v in keys.items()} for s, keys in values.items()}
    std = {s: {k: statistics.stdev(v) if min(v) >= 0 else None for k, v in keys.items()} for s, keys in values.items()}
    summary = {
        "seeds": list(runs),
        "runs": {str(seed): str(p) for seed, p in runs.items()},
        "mean": mean,
        "std": std,
        "std_kind": "sample standard deviation (n - 1)",
        "values": values,
    }
    write_json(path, summary)
    print(f"{path} (AP in points, mean ± std over seeds {list(runs)}):\n{ap_table(mean, spread=std)}", flush=True)
    return path


if __name__ == "__main__":
    engine.run_main(main, get_args_parser().parse_args())
