"""``python -m detpretrain.analysis``: analyses of pre-trained backbone features.

```bash
# PreDet §5.5 / Fig. 5(b): Pearson r between box-pair IoU and ROI-feature cosine similarity, per COCO size bucket,
# on the FPN levels P2-P5 PreDet's ROI losses train (the export folder of train_predet.py, with fpn.safetensors)
python -m detpretrain.analysis iou-similarity --backbone resnet50 --backbone-weights out/r50_predet/export \\
    --images coco/val2017 --max-images 200 --output runs/iou_similarity/r50_predet.json
# the classification baseline of Fig. 5(b) (cls-IG50M): train_predet.py --losses cls, which trains the FPN too
python -m detpretrain.analysis iou-similarity --backbone resnet50 --backbone-weights out/r50_cls/export \\
    --images coco/val2017 --max-images 200 --output runs/iou_similarity/r50_cls.json
# weights without an FPN (timm's, the zoo's, Jigsaw exports): one backbone map, the last (stride 32) by default;
# compare two backbones on the same kind of features
python -m detpretrain.analysis iou-similarity --backbone resnet50.tv_in1k --features backbone \\
    --images coco/val2017 --max-images 200 --output runs/iou_similarity/resnet50.tv_in1k.json
# CPU smoke run: a tiny random model, small images
python -m detpretrain.analysis iou-similarity --backbone test_resnet --no-pretrained --features backbone \\
    --images DIR --max-images 4 --image-size 128 --output /tmp/iou_similarity.json
```

It prints the correlation table and what was pooled (e.g. ``FPN P2-P5 (256 channels), each box at level ...`` or
``layer4 (feature level 4, stride 32, 2048 channels)``), writes the JSON record to ``--output`` and the plot beside
it (same name, ``.png``; needs matplotlib, the ``plots`` extra). A folder without images, an undecodable image (unless
``--skip-bad-images``), an unknown backbone, weights that do not fit or ``--features fpn`` without an export's
fpn.safetensors end it with a one-line message and exit code 1. The sampler, the features, the pooling and the
buckets are described in ``detpretrain.analysis``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from detpretrain.analysis import (
    FEATURES,
    MIN_BOX_SIZE,
    ROI_OUTPUT_SIZE,
    AnalysisInputError,
    format_table,
    iou_similarity,
    plot_iou_similarity,
)
from detpretrain.data.labelled_images import ImageDecodeError
from detpretrain.data.transforms import MAX_SIZE, TEST_SHORT_SIDE
from detpretrain.hub import HubWeightsError

PROG = "python -m detpretrain.analysis"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Analyses of pre-trained backbone features.")
    commands = parser.add_subparsers(dest="command", required=True)
    iou = commands.add_parser(
        "iou-similarity",
        help="PreDet §5.5 / Fig. 5(b): correlation of box-pair IoU and ROI-feature cosine similarity",
        description="Sample box pairs with IoU uniform in 0.05-0.95 in each image, take the cosine similarity of "
        "their ROIAlign features on one backbone feature map, and report Pearson's r between IoU and similarity "
        "per COCO size bucket (PreDet §5.5, Fig. 5(b)).",
    )
    iou.add_argument(
        "--backbone", required=True, help="timm model name: arch, zoo tag (resnet50.predet), hf-hub:org/repo"
    )
    iou.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    iou.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the backbone's pretrained weights (default); --no-pretrained: random init drawn from --seed",
    )
    iou.add_argument(
        "--backbone-weights",
        type=Path,
        default=None,
        help="local export folder (save_pretrained) or .safetensors / .pth file to load instead of pretrained weights",
    )
    iou.add_argument(
        "--features",
        choices=FEATURES,
        default="fpn",
        help="fpn (default): the FPN levels P2-P5 PreDet's ROI losses train, from --backbone-weights' fpn.safetensors, "
        "each box at its level floor(4 + log2(sqrt(wh) / 224)) in [2, 5]; backbone: one backbone map "
        "(--feature-level), for weights without an FPN",
    )
    iou.add_argument(
        "--feature-level",
        type=int,
        default=None,
        help="with --features backbone: index into the backbone's feature maps (timm feature_info; negative counts "
        "from the end); default -1, the last stage (stride 32, where a box under 32 px covers less than one cell)",
    )
    iou.add_argument("--pairs-per-image", type=int, default=64, help="box pairs sampled per image (default 64)")
    iou.add_argument(
        "--image-size",
        type=int,
        default=TEST_SHORT_SIDE,
        help=f"resize the short side to this many pixels (default {TEST_SHORT_SIDE}, the detection test size)",
    )
    iou.add_argument(
        "--max-size", type=int, default=MAX_SIZE, help=f"cap on the resized long side (default {MAX_SIZE})"
    )
    iou.add_argument("--max-images", type=int, default=None, help="measure at most this many images (sorted by path)")
    iou.add_argument(
        "--min-box-size",
        type=float,
        default=MIN_BOX_SIZE,
        help=f"smallest box scale sqrt(w*h) in pixels of the resized image (default {MIN_BOX_SIZE:g})",
    )
    iou.add_argument(
        "--roi-output-size",
        type=int,
        default=ROI_OUTPUT_SIZE,
        help=f"ROIAlign bins per side (default {ROI_OUTPUT_SIZE}, Faster R-CNN's; 1 compares box-averaged features)",
    )
    iou.add_argument("--seed", type=int, default=0, help="seed of the box pairs (and of a random init)")
    iou.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    iou.add_argument(
        "--skip-bad-images", action="store_true", help="skip undecodable images and count them, instead of stopping"
    )
    iou.add_argument(
        "--output", type=Path, default=Path("iou_similarity.json"), help="the JSON record; the plot goes beside it"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = iou_similarity(
            backbone=args.backbone,
            images=args.images,
            pretrained=args.pretrained,
            weights=args.backbone_weights,
            features=args.features,
            feature_level=args.feature_level,
            pairs_per_image=args.pairs_per_image,
            image_size=args.image_size,
            max_size=args.max_size,
            max_images=args.max_images,
            min_box_size=args.min_box_size,
            roi_output_size=args.roi_output_size,
            seed=args.seed,
            device=args.device,
            on_bad_image="skip" if args.skip_bad_images else "error",
            progress=sys.stderr.isatty(),
        )
    except (AnalysisInputError, ImageDecodeError, FileNotFoundError, HubWeightsError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        if isinstance(err, ImageDecodeError):
            message += "; or pass --skip-bad-images to skip undecodable images and count them"
        print(f"{PROG} iou-similarity: error: {message}", file=sys.stderr)
        return 1

    print(format_table(result))
    if result["images"]["skipped"]:
        print(f"skipped {result['images']['skipped']} undecodable images (listed in the JSON)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    plot_path = args.output.with_suffix(".png")
    if plot_iou_similarity(result, plot_path):
        print(f"wrote {plot_path}")
    else:
        missing = f"no {plot_path.name}; the numbers are in {args.output}"
        print(f"matplotlib is not installed (pip install 'detpretrain[plots]'): {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
