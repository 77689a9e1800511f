"""Evaluate a detection results file with the official metric of its dataset, and print the eval.json numbers.

```bash
python -m detpretrain.evaluate --format coco --gt instances_val2017.json --results results.json --iou-type bbox segm
python -m detpretrain.evaluate --format lvis --gt lvis_v1_val.json --results results.json --iou-type bbox
python -m detpretrain.evaluate --format voc --gt VOCdevkit --year 2007 --image-set test --results results.json
```

It prints the JSON that ``finetune.py`` writes to ``eval.json``: ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm",
"APl", ...}, "segm": {...}}``, values as fractions (0..1), -1 where there is no ground truth to measure;
``--per-category`` adds ``"per_category": {iou_type: {category name: AP}}``. A missing or malformed file, or a
detection of an image or a category that is not in the ground truth, ends it with a one-line message and exit code 1.

Results formats. **COCO**: the standard COCO results file, a JSON list of ``{"image_id": int, "category_id": int,
"bbox": [x, y, w, h], "score": float}``, plus ``"segmentation"`` (compressed RLE, ``{"size": [h, w], "counts":
str}``) for segm; scored by pycocotools' ``COCOeval`` (IoU 0.50:0.95, 100 detections per image and category) on
every image of the ground truth; the keys also include ``AR@1``, ``AR@10``, ``AR@100`` and ``ARs/ARm/ARl@100``.
When a file has both, segm ignores ``bbox``, as detectron2 does, so that a detection's area is its mask's.
**LVIS**: the same format; at most 300 detections per image are scored (the best-scoring ones; lvis-api's
``max_dets`` default, the LVIS protocol; set ``box_detections_per_img=300`` in a torchvision detector), with
lvis-api's federated rules (``neg_category_ids``, ``not_exhaustive_category_ids``); the keys add ``APr``, ``APc``,
``APf`` and lvis-api's ``AR@300``, ``ARs@300``, ``ARm@300``, ``ARl@300``. **VOC**: a JSON list of ``{"image_id":
"000001", "category": "dog", "box": [x1, y1, x2, y2], "score": float}``, where ``image_id`` is the image's name in
the image set and ``box`` is xyxy in 0-based continuous pixel coordinates, the VOC XML's ``[xmin - 1, ymin - 1, xmax,
ymax]`` (the frame torchvision models predict in; the metric adds the 1 back and uses VOC's +1 pixel convention);
the ground truth is a VOCdevkit folder with ``--year`` and ``--image-set``. It is scored as detectron2 scores VOC,
which is what PreDet reports: ``"bbox": {"AP", "AP50", "AP75"}`` with AP the mean over IoU 0.50:0.05:0.95 of the
per-class VOC AP (11-point for 2007, area under the curve for other years; ``difficult`` objects ignored), and
``"voc07": {"mAP"}`` the classic VOC07 mAP (11-point at IoU 0.5).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detpretrain.evaluation import (
    EvaluationInputError,
    evaluate_coco_file,
    evaluate_lvis_file,
    evaluate_voc_file,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detpretrain.evaluate",
        description="Evaluate a detection results file with COCO's, LVIS's or VOC's official metric; print JSON.",
    )
    parser.add_argument("--format", required=True, choices=("coco", "lvis", "voc"), help="the dataset's metric")
    parser.add_argument(
        "--gt", required=True, help="COCO or LVIS annotation file; for VOC the VOCdevkit folder (or its VOC<year>)"
    )
    parser.add_argument("--results", required=True, help="results file (JSON list; the formats are in the README)")
    parser.add_argument(
        "--iou-type",
        nargs="+",
        default=["bbox"],
        choices=("bbox", "segm"),
        help="what to score: boxes, masks, or both (VOC: bbox only)",
    )
    parser.add_argument("--year", type=int, default=None, help="VOC only: the VOC year (default 2007: 11-point AP)")
    parser.add_argument("--image-set", default=None, help="VOC only: the image set in ImageSets/Main (default test)")
    parser.add_argument("--per-category", action="store_true", help="add the AP of each category")
    return parser


def evaluate_results_file(
    *,
    format: str,
    gt: str | Path,
    results: str | Path,
    iou_types: Sequence[str] = ("bbox",),
    year: int = 2007,
    image_set: str = "test",
    per_category: bool = False,
) -> dict[str, Any]:
    """The eval.json numbers of a results file; ``year`` and ``image_set`` are VOC's (``gt`` its VOCdevkit folder)."""
    if format == "voc":
        if list(iou_types) != ["bbox"]:
            raise ValueError("VOC has boxes only: iou_types=('bbox',)")
        return evaluate_voc_file(gt, results, year=year, image_set=image_set, per_category=per_category)
    if format not in ("coco", "lvis"):
        raise ValueError(f"format {format!r} is not one of coco, lvis, voc")
    evaluate_file = evaluate_coco_file if format == "coco" else evaluate_lvis_file
    return evaluate_file(gt, results, iou_types=iou_types, per_category=per_category)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.format == "voc" and args.iou_type != ["bbox"]:
        parser.error("VOC has boxes only: --iou-type bbox")
    if args.format != "voc" and (args.year is not None or args.image_set is not None):
        parser.error("--year and --image-set are for --format voc")
    try:
        summary = evaluate_results_file(
            format=args.format,
            gt=args.gt,
            results=args.results,
            iou_types=args.iou_type,
            year=2007 if args.year is None else args.year,
            image_set="test" if args.image_set is None else args.image_set,
            per_category=args.per_category,
        )
    except EvaluationInputError as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
