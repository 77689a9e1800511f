"""Evaluate a detection results file with the official metric of its dataset, and print the eval.json numbers.

```bash
python -m detpretrain.evaluate --format coco --gt instances_val2017.json --results results.json --iou-type bbox segm
python -m detpretrain.evaluate --format lvis --gt lvis_v1_val.json --results results.json --iou-type bbox
python -m detpretrain.evaluate --format voc --gt VOCdevkit --year 2007 --image-set test --results results.json
# your own data (the data flags of the scripts, detpretrain.data.sources): VOC XML in any layout, YOLO
python -m detpretrain.evaluate --format voc --val-images photos --val-ann xml --val-split test.txt --results r.json
python -m detpretrain.evaluate --format yolo --val-ann data.yaml --results results.json
python -m detpretrain.evaluate --format yolo --val-images images/val --class-names classes.txt --results r.json
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

Your own data. **VOC XML outside VOCdevkit** (``--val-images DIR [--val-ann XML_DIR] [--val-split FILE]``): the same
VOC results, ``image_id`` the image's path relative to DIR without extension (``"raccoon-1"``), ``category`` a class
name; scored as above over the dataset's own classes (``--class-names``, default the sorted classes of the XML files)
with the area-under-curve AP (no VOC year: not 2007's 11 points; ``voc07.mAP`` is still the 11-point AP at 0.5).
**YOLO** (``--val-ann data.yaml``: its ``val`` set and ``names``; or ``--val-images DIR --class-names FILE``): COCO
results, ``image_id`` the image's index in the sorted list of images under the dataset root (the yaml's ``path``, or
DIR; ``detpretrain.data.image_lists``), ``category_id`` the YOLO class index, ``bbox`` [x, y, w, h] in pixels;
scored by pycocotools on the cleaned ground-truth boxes (``detpretrain.data.sources.coco_ground_truth``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detpretrain.data.detection import DatasetError
from detpretrain.data.sources import DATA_FLAGS, DATA_FORMATS, DataFlags, evaluation_ground_truth, load_detection_data
from detpretrain.evaluation import (
    EvaluationInputError,
    evaluate_coco_file,
    evaluate_lvis_file,
    evaluate_voc,
    evaluate_voc_file,
)
from detpretrain.evaluation.coco import read_json


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detpretrain.evaluate",
        description="Evaluate a detection results file with COCO's, LVIS's or VOC's official metric; print JSON.",
    )
    parser.add_argument("--format", required=True, choices=DATA_FORMATS, help="the dataset's format and metric")
    parser.add_argument(
        "--gt",
        help="COCO or LVIS annotation file; for VOC the VOCdevkit folder (or its VOC<year>); other VOC layouts "
        "and YOLO: the data flags below",
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
    data = parser.add_argument_group("VOC XML outside VOCdevkit, YOLO (detpretrain.data.sources)")
    for flag in ("--val-images", "--val-ann", "--val-split", "--class-names"):
        data.add_argument(flag, **DATA_FLAGS[flag])
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


def evaluate_own_data(*, format: str, results: str | Path, flags: DataFlags, per_category: bool = False) -> dict:
    """The eval.json numbers of a results file on a VOC folder (VOC's metric) or a YOLO val set (COCO's metric)."""
    (_, dataset) = load_detection_data(flags, need_train=False)
    ground_truth = evaluation_ground_truth(dataset)
    if format == "voc":
        detections = read_json(results, what="results file")
        return evaluate_voc(ground_truth, detections, per_category=per_category, source=f"results file {results}")
    return evaluate_coco_file(ground_truth, results, iou_types=("bbox",), per_category=per_category)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.format == "voc" and args.iou_type != ["bbox"]:
        parser.error("VOC has boxes only: --iou-type bbox")
    if args.format != "voc" and (args.year is not None or args.image_set is not None):
        parser.error("--year and --image-set are for --format voc")
    own_data = [f for f in ("val_images", "val_ann", "val_split", "class_names") if getattr(args, f) is not None]
    if args.format in ("coco", "lvis") or (args.format == "voc" and args.gt is not None):
        if args.gt is None:
            parser.error(f"--format {args.format} needs --gt")
        if own_data:
            parser.error(
                f"--gt and --{own_data[0].replace('_', '-')} do not go together: pass one kind of ground truth"
            )
    elif args.gt is not None:
        parser.error("--format yolo reads --val-ann data.yaml or --val-images DIR --class-names FILE, not --gt")
    else:
        if args.format == "yolo" and args.iou_type != ["bbox"]:
            parser.error("YOLO has boxes only: --iou-type bbox")
        try:
            summary = evaluate_own_data(
                format=args.format,
                results=args.results,
                flags=DataFlags(
                    format=args.format,
                    val_images=args.val_images,
                    val_ann=args.val_ann,
                    val_split=args.val_split,
                    class_names=args.class_names,
                ),
                per_category=args.per_category,
            )
        except (EvaluationInputError, DatasetError) as e:
            print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
        print(json.dumps(summary, indent=2))
        return 0
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
