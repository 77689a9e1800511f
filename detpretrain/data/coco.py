"""COCO instances datasets (``--format coco --train-images DIR --train-ann FILE``) and the COCO-json validation that
the LVIS reader shares.

``CocoDataset(ann_file, image_dir)`` follows the contract of ``detpretrain.data.detection``. Labels are 1..C in the
order of the sorted category ids; ``label_to_category`` maps them back to the json's ids for the evaluator. Jigsaw
pre-training reads COCO through this dataset too (``detpretrain.jigsaw.coco_image_records``, with
``include_crowd=True``), so pre-training and fine-tuning agree on labels and clean boxes the same way.

What loading checks and fixes (once, cheaply), and what it counts in ``cleaning_report``:

- The file parses and has ``images``, ``annotations`` and ``categories`` lists; ids are unique; every annotation
  names a listed image and a listed category (an unknown category id is an error naming the file, the annotation
  and the id: a label cannot be guessed); a ``bbox`` is four finite numbers; every image file exists.
- Crowd annotations (``iscrowd: 1``) are left out of the training targets, as torchvision's detection reference
  does (``crowd_excluded``). The evaluator reads them from the json itself, where they mark ignore regions.
- Boxes sticking out of the image are clipped to it (``clipped_to_image``); boxes of non-positive width or height
  (``dropped_nonpositive_size``) and boxes with nothing inside the image (``dropped_outside_image``) are dropped.
- With ``with_masks=True``: polygons of fewer than 3 points or of an odd number of coordinates are dropped
  (``invalid_polygons_dropped``), and an instance left with no valid polygon is dropped
  (``dropped_without_valid_mask``), as detectron2's COCO loader does; an RLE whose ``size`` is not the image's is an
  error (the annotation belongs to another image).
- Images left with no annotation are kept as negatives (``images_without_annotations``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detpretrain.data.detection import Category, DatasetError, DetectionDataset, ImageEntry, clean_boxes, read_json
from detpretrain.data.image_lists import add_detail, count_cleaning

__all__ = ["CocoDataset", "parse_coco_json"]

# The counts of ``cleaning_report``, always all present (zeros included) so that logs of different runs line up.
CLEANING_KEYS = (
    "images",
    "annotations",
    "kept",
    "crowd_excluded",
    "clipped_to_image",
    "dropped_nonpositive_size",
    "dropped_outside_image",
    "invalid_polygons_dropped",
    "dropped_without_valid_mask",
    "images_without_annotations",
)


class CocoDataset(DetectionDataset):
    """A COCO instances json and its image folder: ``image_dir / image["file_name"]``.

    Args:
        ann_file: the instances json (``--train-ann``).
        image_dir: the folder of its images (``--train-images``).
        with_masks: decode instance masks into ``target["masks"]`` (Mask R-CNN).
        include_crowd: keep crowd annotations in the targets, flagged in ``target["iscrowd"]`` (training leaves
            them out: torchvision's detectors have no notion of an ignore region).
    """

    format = "coco"
    flag_key = "iscrowd"

    def __init__(
        self, ann_file: str | Path, image_dir: str | Path, *, with_masks: bool = False, include_crowd: bool = False
    ) -> None:
        ann_file, image_dir = Path(ann_file), Path(image_dir)
        if not image_dir.is_dir():
            raise DatasetError(f"image folder {image_dir} does not exist; pass the folder that holds the images")

        def candidates(image: dict[str, Any]) -> list[Path]:
            file_name = image.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise DatasetError(f"{ann_file}: image {image['id']} has no 'file_name'; add it")
            return [image_dir / file_name]

        details: dict[str, list[str]] = {}
        entries, categories, report = parse_coco_json(
            read_json(ann_file, what="annotation file"),
            ann_file=ann_file,
            image_dir=image_dir,
            image_paths=candidates,
            with_masks=with_masks,
            include_crowd=include_crowd,
            details=details,
        )
        self.ann_file, self.image_dir = ann_file, image_dir
        super().__init__(
            entries,
            categories=categories,
            with_masks=with_masks,
            cleaning_report=report,
            source={"ann_file": str(ann_file), "image_dir": str(image_dir)},
        )
        self.cleaning_details = details


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DatasetError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_coco_json(
    data: Any,
    *,
    ann_file: Path,
    image_dir: Path,
    image_paths: Callable[[dict[str, Any]], Sequence[Path]],
    with_masks: bool,
    include_crowd: bool,
    image_extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    details: dict[str, list[str]] | None = None,
) -> tuple[list[ImageEntry], list[Category], dict[str, int]]:
    """Validate a parsed COCO-format json (COCO or LVIS) and build the dataset's entries.

    ``image_paths(image)`` gives the candidate files of an image entry, the first existing one is used;
    ``image_extra(image)`` the per-image metadata to keep (LVIS's federated lists). Returns the entries, the
    categories (labels 1..C by sorted id) and the cleaning report (module docstring); ``details`` (when given)
    receives the first annotations of each box-cleaning count, by file (``python -m detpretrain.data inspect``).
    """
    where = str(ann_file)
    _require(isinstance(data, dict), f"{where} is not a COCO-format file: the top level is not a json object")
    for key in ("images", "annotations", "categories"):
        _require(
            isinstance(data.get(key), list),
            f"{where} has no '{key}' list; a COCO-format instances file needs images, annotations and categories",
        )

    # Categories: labels 1..C in the order of sorted ids.
    for category in data["categories"]:
        _require(
            isinstance(category, dict)
            and isinstance(category.get("id"), int)
            and isinstance(category.get("name"), str),
            f"{where}: category {_short(category)} needs an integer 'id' and a 'name'",
        )
    ids = [c["id"] for c in data["categories"]]
    _require(len(ids) == len(set(ids)), f"{where}: category ids are not unique; fix 'categories'")
    _require(bool(ids), f"{where} lists no categories")
    categories = [
        Category(label=i + 1, id=c["id"], name=c["name"]) for i, c in enumerate(sorted(data["categories"], key=_id))
    ]
    label_of = {c.id: c.label for c in categories}

    # Images: ids, sizes, files.
    images: dict[int, dict[str, Any]] = {}
    paths: dict[int, Path] = {}
    missing: list[Path] = []
    position: dict[int, int] = {}
    for i, image in enumerate(data["images"]):
        _require(
            isinstance(image, dict) and isinstance(image.get("id"), int) and image["id"] >= 0,
            f"{where}: image entry {_short(image)} needs a non-negative integer 'id'",
        )
        image_id = image["id"]
        _require(
            image_id not in images,
            f"image id {image_id} is listed twice (images[{position.get(image_id)}] and images[{i}]) in {where}; "
            "give each image its own id, or remove the duplicate",
        )
        position[image_id] = i
        for key in ("width", "height"):
            _require(
                isinstance(image.get(key), int) and image[key] > 0,
                f"{where}: image {image_id} has {key} {image.get(key)!r}; it must be a positive integer",
            )
        found = [p for p in image_paths(image) if p.is_file()]
        if found:
            paths[image_id] = found[0]
        else:
            missing.append(image_paths(image)[0])
        images[image_id] = image
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(images)} images listed in {where} are missing from {image_dir}, e.g. "
            f"{missing[0]}; pass the folder that holds them, or remove them from the json"
        )

    # Annotations, grouped by image.
    per_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    for index, ann in enumerate(data["annotations"]):
        _require(isinstance(ann, dict), f"{where}: annotation #{index} is not a json object")
        name = f"annotation {ann.get('id', f'#{index}')}"
        for key in ("image_id", "category_id", "bbox"):
            _require(key in ann, f"{where}: {name} has no '{key}'; fix or remove it")
        _require(
            ann["category_id"] in label_of,
            f"{where}: {name} has category_id {ann['category_id']!r}, which 'categories' does not list; add the "
            "category or remove the annotation",
        )
        _require(
            ann["image_id"] in per_image,
            f"{where}: {name} has image_id {ann['image_id']!r}, which 'images' does not list; add the image or "
            "remove the annotation",
        )
        bbox = ann["bbox"]
        _require(
            isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox),
            f"{where}: {name} has bbox {bbox!r}; it must be [x, y, width, height], four finite numbers",
        )
        if with_masks and (include_crowd or not ann.get("iscrowd", 0)):
            _require("segmentation" in ann, f"{where}: {name} has no 'segmentation'; masks need one on every object")
        per_image[ann["image_id"]].append(ann)

    report = dict.fromkeys(CLEANING_KEYS, 0)
    report["images"], report["annotations"] = len(images), len(data["annotations"])
    entries = []
    for image_id, image in images.items():
        width, height = image["width"], image["height"]
        anns = per_image[image_id]
        crowd = [bool(a.get("iscrowd", 0)) for a in anns]
        if not include_crowd:
            report["crowd_excluded"] += sum(crowd)
            anns = [a for a, c in zip(anns, crowd, strict=True) if not c]
            crowd = [False] * len(anns)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes, outcome = clean_boxes(xyxy, width=width, height=height)
        count_cleaning(
            outcome,
            report=report,
            details=details,
            describe=lambda k, anns=anns, path=paths[image_id]: (
                f"{where}: annotation {anns[k].get('id')} of {path}, bbox {anns[k]['bbox']}"
            ),
        )
        keep = outcome["keep"]
        segmentations = None
        if with_masks:
            segmentations = []
            for k, ann in enumerate(anns):
                if keep[k]:
                    segmentation = _clean_segmentation(ann, image, where=where, report=report)
                    keep[k] = segmentation is not None
                    if keep[k]:
                        segmentations.append(segmentation)
            segmentations = tuple(segmentations)
        kept = [a for a, k in zip(anns, keep, strict=True) if k]
        report["kept"] += len(kept)
        report["images_without_annotations"] += not kept
        if not kept:
            add_detail(details, "images_without_annotations", str(paths[image_id]))
        entries.append(
            ImageEntry(
                image_id=image_id,
                path=str(paths[image_id]),
                name=str(image.get("file_name", paths[image_id].name)),
                width=width,
                height=height,
                boxes=boxes[keep].astype(np.float32),
                labels=np.array([label_of[a["category_id"]] for a in kept], dtype=np.int64),
                flags=np.array(crowd, dtype=bool)[keep],
                segmentations=segmentations,
                extra=image_extra(image) if image_extra is not None else {},
            )
        )
    return entries, categories, report


def _id(category: dict[str, Any]) -> int:
    return category["id"]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean_segmentation(ann: dict[str, Any], image: dict[str, Any], *, where: str, report: dict[str, int]) -> Any:
    """The annotation's segmentation with invalid polygons removed; None when nothing valid is left."""
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        # pycocotools needs >= 3 points per polygon; detectron2's COCO loader drops the others the same way.
        valid = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        report["invalid_polygons_dropped"] += len(segmentation) - len(valid)
        if not valid:
            report["dropped_without_valid_mask"] += 1
            return None
        return valid
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [image["height"], image["width"]]:
            raise DatasetError(
                f"{where}: annotation {ann.get('id')} has an RLE mask of size {segmentation['size']} (h, w) on image "
                f"{image['id']} of size [{image['height']}, {image['width']}]; fix the annotation or the image entry"
            )
        return segmentation
    raise DatasetError(
        f"{where}: annotation {ann.get('id')} has segmentation {_short(segmentation)}; it must be a list of "
        "polygons or an RLE dict with 'counts' and 'size'"
    )
