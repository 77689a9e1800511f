"""``python -m detpretrain.data inspect``: what a detection dataset holds, before anyone trains on it.

```bash
python -m detpretrain.data inspect --format voc --train-images raccoon/images --train-ann raccoon/annotations \\
    --train-split raccoon/train.txt --val-split raccoon/test.txt
python -m detpretrain.data inspect --format yolo --train-ann data.yaml --json
python -m detpretrain.data inspect --format coco --train-images coco128/images \\
    --train-ann coco128/annotations/instances_train2017.json
```

The data flags are the scripts' (``detpretrain.data.sources``: coco, lvis, VOCdevkit, VOC XML in any layout, YOLO),
read by the same readers. For the training set, and the val set when the flags give one, it prints: the number of
images and boxes, each class with its box count (in label order), box sizes by COCO's area buckets (small < 32²,
medium < 96², large; the box's area in the image's original pixels), the images without a box, the crowd / difficult
boxes, and the cleaning report: each count of what loading clipped or dropped, with the first files it happened in
(``--max-listed``, then how many more). What loading refuses (an unknown class, a malformed file, a missing image)
stops it: the report then ends with that one-line message, and the exit code is 1. ``--json`` prints the same as
JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from detpretrain.data.detection import DatasetError, DetectionDataset
from detpretrain.data.sources import DATA_FLAGS, DataFlags, add_data_arguments, load_detection_data

# COCO's area ranges (pycocotools' areaRng): small < 32², medium < 96², large the rest.
SIZE_BUCKETS = (("small", 32**2), ("medium", 96**2), ("large", float("inf")))
# describe() keys the report gives in its own sections.
_NOT_SOURCE = ("subset", "with_masks", "cleaning_report", "images_without_annotations", "num_images", "num_classes")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m detpretrain.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print what a dataset holds and what loading cleans or refuses")
    add_data_arguments(inspect, flags=DATA_FLAGS)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--max-listed", type=int, default=10, help="files listed per cleaning count")
    return parser


def dataset_report(dataset: DetectionDataset, *, max_listed: int = 10) -> dict[str, Any]:
    """What ``dataset`` holds (module docstring), as plain JSON types."""
    box_counts = np.zeros(dataset.num_classes, dtype=np.int64)
    buckets = dict.fromkeys((name for name, _ in SIZE_BUCKETS), 0)
    flagged, num_boxes, without = 0, 0, []
    num_without = 0
    for entry in dataset.entries():
        num_boxes += len(entry.boxes)
        flagged += int(entry.flags.sum())
        box_counts += np.bincount(entry.labels, minlength=dataset.num_classes)
        areas = (entry.boxes[:, 2] - entry.boxes[:, 0]) * (entry.boxes[:, 3] - entry.boxes[:, 1])
        lower = 0.0
        for name, upper in SIZE_BUCKETS:
            buckets[name] += int(((areas >= lower) & (areas < upper)).sum())
            lower = upper
        if len(entry.boxes) == 0:
            num_without += 1
            if len(without) < max_listed:
                without.append(entry.path)
    details = getattr(dataset, "cleaning_details", {})
    cleaning = {}
    for key, count in dataset.cleaning_report.items():
        if key in ("images", "annotations", "kept"):
            continue
        listed = details.get(key, [])[:max_listed]
        cleaning[key] = {"count": int(count), "files": listed, "more": max(int(count) - len(listed), 0)}
    describe = dataset.describe()
    return {
        "source": {k: v for k, v in describe.items() if k not in _NOT_SOURCE},
        "num_images": len(dataset),
        "num_boxes": num_boxes,
        "classes": {name: int(box_counts[label]) for label, name in enumerate(dataset.class_names) if label},
        "box_sizes": buckets,
        f"{dataset.flag_key}_boxes": flagged,
        "images_without_boxes": {"count": num_without, "files": without, "more": num_without - len(without)},
        "cleaning": cleaning,
    }


def _text(name: str, report: dict[str, Any]) -> str:
    lines = [f"{name}: {report['num_images']} images, {report['num_boxes']} boxes, {len(report['classes'])} classes"]
    lines.append(f"  source: {json.dumps(report['source'])}")
    lines.append("  boxes per class: " + ", ".join(f"{c} {n}" for c, n in report["classes"].items()))
    sizes = report["box_sizes"]
    lines.append(
        f"  box sizes (COCO buckets, original pixels): small (< 32²) {sizes['small']}, medium (< 96²) "
        f"{sizes['medium']}, large {sizes['large']}"
    )
    flag = next(key for key in report if key.endswith("_boxes") and key not in ("num_boxes", "images_without_boxes"))
    lines.append(f"  {flag.removesuffix('_boxes')} boxes: {report[flag]}")
    lines += _listed("images without boxes", report["images_without_boxes"])
    lines.append("  cleaning report:")
    for key, entry in report["cleaning"].items():
        lines += _listed(f"  {key}", entry)
    return "\n".join(lines)


def _listed(title: str, entry: dict[str, Any]) -> list[str]:
    lines = [f"  {title}: {entry['count']}"]
    lines += [f"      {text}" for text in entry["files"]]
    if entry["files"] and entry["more"]:
        lines.append(f"      ... and {entry['more']} more")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    flags = DataFlags.from_namespace(args)
    has_val = any(v is not None for v in (flags.val_ann, flags.val_split, flags.val_fraction)) or (
        flags.voc_root is not None
    )
    reports: dict[str, Any] = {}
    try:
        data = load_detection_data(flags, need_val=has_val)
        for name, dataset in (("train", data.train), ("val", data.val)):
            if dataset is not None:
                reports[name] = dataset_report(dataset, max_listed=args.max_listed)
    except DatasetError as error:
        reports["refused"] = " ".join(str(error).split())
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        texts = [_text(name, report) for name, report in reports.items() if name != "refused"]
        if "refused" in reports:
            texts.append(f"refused (loading stops here): {reports['refused']}")
        print("\n".join(texts))
    return 1 if "refused" in reports else 0


if __name__ == "__main__":
    sys.exit(main())
