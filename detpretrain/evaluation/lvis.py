"""LVIS evaluation with the semantics of the official lvis-api (``LVISEval``), on current numpy.

The newest lvis release on PyPI (0.5.3) calls ``np.float``, which numpy 1.24 removed. This module implements
lvis-api's evaluation again, step for step, and reproduces its numbers (the tests check lvis-api's own output on
LVIS v1 val images to 1e-6). What lvis-api does, and this module with it:

- Results are COCO's (``image_id``, ``category_id``, ``bbox`` xywh or ``segmentation`` RLE, ``score``), at most
  **300 detections per image** (lvis-api's ``max_dets`` default, the LVIS protocol): the best-scoring 300 of each
  image are kept, with no limit per category. torchvision detectors keep 100 per image above a score of 0.05
  unless told otherwise: the LVIS setting of detectron2's and mmdetection's LVIS configs is 300 per image
  (``box_detections_per_img=300``) above 0.0001 (``box_score_thresh=LVIS_SCORE_THRESH``); 0.05 drops the
  low-scoring detections that rare categories mostly get, and lowers AP (APr most).
- Federated evaluation: in each image, detections of a category count only if the category is annotated there
  (it has ground truth) or is in the image's ``neg_category_ids``; the others are dropped. An unmatched detection of
  a category in the image's ``not_exhaustive_category_ids`` is ignored rather than counted as a false positive.
- Annotations and detections of zero area are left out (lvis-api's index keeps areas in (0, inf)).
- Matching and precision are COCO's: greedy matching at IoU 0.50:0.05:0.95, 101 recall points, COCO's area ranges
  (on the annotation's ``area``; a detection's area is w*h for bbox, its mask's for segm); LVIS has no crowds.
- ``AP``/``APr``/``APc``/``APf`` average the precision of all / rare / common / frequent categories (the category's
  ``frequency``), over categories with ground truth in the evaluated images; -1 where there is none. ``AR@300``
  and ``ARs@300``/``ARm@300``/``ARl@300`` are the recall with 300 detections per image, named as lvis-api names them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch

from detpretrain.evaluation.coco import (
    DetectionEvaluator,
    EvaluationInputError,
    category_lookup,
    category_names,
    check_coco_results,
    predictions_to_coco_results,
    read_json,
    read_results_file,
)

__all__ = [
    "LVIS_MAX_DETS_PER_IMAGE",
    "LVIS_SCORE_THRESH",
    "LvisEvaluator",
    "LvisGroundTruth",
    "evaluate_lvis",
    "evaluate_lvis_file",
    "load_lvis_ground_truth",
]

LVIS_MAX_DETS_PER_IMAGE = 300
LVIS_SCORE_THRESH = 0.0001  # detectron2's LVISv1 configs (ROI_HEADS.SCORE_THRESH_TEST), mmdetection's (score_thr)
# lvis-api's parameters. linspace, not arange, whose points drift above the round values.
_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
_AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
_FREQUENCIES = {"r": "APr", "c": "APc", "f": "APf"}


class LvisGroundTruth:
    """An LVIS annotation file (v0.5 or v1), indexed for evaluation.

    ``images`` and ``categories`` map ids to the file's entries; ``annotations_by_image`` keeps the file's order.
    """

    def __init__(self, dataset: Mapping[str, Any], *, source: str = "LVIS ground truth"):
        if not isinstance(dataset, Mapping) or not all(
            isinstance(dataset.get(k), list) for k in ("images", "annotations", "categories")
        ):
            raise EvaluationInputError(f"{source} is not an LVIS file: it needs images, annotations, categories")
        self.dataset = dataset
        self.images = {image["id"]: image for image in dataset["images"]}
        self.categories = {category["id"]: category for category in dataset["categories"]}
        for category in dataset["categories"]:
            if category.get("frequency") not in _FREQUENCIES:
                raise EvaluationInputError(
                    f"{source}: category {category['id']} has frequency {category.get('frequency')!r}, "
                    f"not one of {tuple(_FREQUENCIES)}: not an LVIS file"
                )
        for image in dataset["images"]:
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                if key not in image:
                    raise EvaluationInputError(f"{source}: image {image['id']} has no {key!r}: not an LVIS file")
        self.annotations_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in dataset["annotations"]:
            if ann["image_id"] not in self.images or ann["category_id"] not in self.categories:
                raise EvaluationInputError(
                    f"{source}: annotation {ann.get('id')} names image {ann['image_id']} / category "
                    f"{ann['category_id']}, which the file does not list"
                )
            self.annotations_by_image[ann["image_id"]].append(ann)

    @classmethod
    def from_file(cls, path: str | Path) -> LvisGroundTruth:
        return cls(read_json(path, what="LVIS ground truth"), source=f"LVIS ground truth {path}")


def load_lvis_ground_truth(gt: LvisGroundTruth | Mapping[str, Any] | str | Path) -> LvisGroundTruth:
    """An ``LvisGroundTruth`` from an LVIS annotation file, its parsed dict, or one already built."""
    if isinstance(gt, LvisGroundTruth):
        return gt
    return LvisGroundTruth(gt) if isinstance(gt, Mapping) else LvisGroundTruth.from_file(gt)


def _limit_per_image(results: Sequence[Mapping[str, Any]], max_dets: int) -> list[Mapping[str, Any]]:
    """The ``max_dets`` best-scoring detections of each image; ties keep the file's order (a stable sort)."""
    by_image: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    kept = []
    for dets in by_image.values():
        kept.extend(dets if len(dets) <= max_dets else sorted(dets, key=lambda r: -r["score"])[:max_dets])
    return kept


def _gt_region(ann: Mapping[str, Any], image: Mapping[str, Any], iou_type: str) -> Any:
    if iou_type == "bbox":
        return ann["bbox"]
    segm = ann["segmentation"]
    height, width = image["height"], image["width"]
    if isinstance(segm, list):  # polygons, one object in several parts: one mask
        return mask_util.merge(mask_util.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):  # uncompressed RLE
        return mask_util.frPyObjects(segm, height, width)
    return segm


def _greedy_match(ious: list[list[float]], gt_ignore: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """COCO's matching at every IoU threshold: ``(matched, matched_to_ignored)``, each (thresholds, detections).

    ``ious`` is (detections, ground truths) with detections by decreasing score and ignored ground truths last.
    Each detection takes the available ground truth of highest IoU (at least the threshold; on a tie the later
    one, as lvis-api and pycocotools do); a regular ground truth is preferred to any ignored one.
    """
    num_dets, num_gts = len(ious), len(gt_ignore)
    matched = np.zeros((len(_IOU_THRESHOLDS), num_dets), dtype=bool)
    matched_to_ignored = np.zeros_like(matched)
    for t, threshold in enumerate(_IOU_THRESHOLDS):
        taken = [False] * num_gts
        for d in range(num_dets):
            best_iou, best = min(threshold, 1 - 1e-10), -1
            for g in range(num_gts):
                if taken[g]:
                    continue
                if best > -1 and not gt_ignore[best] and gt_ignore[g]:
                    break  # matched a regular ground truth; only ignored ones are left
                if ious[d][g] < best_iou:
                    continue
                best_iou, best = ious[d][g], g
            if best > -1:
                taken[best] = True
                matched[t, d] = True
                matched_to_ignored[t, d] = gt_ignore[best]
    return matched, matched_to_ignored


def _evaluate_one_type(
    gt: LvisGroundTruth, results: Sequence[Mapping[str, Any]], iou_type: str, image_ids: list[int], max_dets: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """lvis-api's evaluate() then accumulate(): precision (T, R, K, A), recall (T, K, A), the category ids of K."""
    image_set = set(image_ids)
    category_ids = sorted(gt.categories)
    category_index = {c: k for k, c in enumerate(category_ids)}
    area_ranges = list(_AREA_RANGES.values())

    # Detections: the per-image limit first (lvis-api's LVISResults), then the evaluated images and nonzero areas.
    dets = _limit_per_image(results, max_dets)
    if iou_type == "bbox":
        regions = [r["bbox"] for r in dets]
        areas = [r["bbox"][2] * r["bbox"][3] for r in dets]
    else:
        regions = [r["segmentation"] for r in dets]
        # One call per mask: pycocotools' area() of a list fails under numpy 2 beyond 255 masks (a uint8 it builds).
        areas = [float(mask_util.area(rle)) for rle in regions]
    dets_by_pair: dict[tuple[int, int], list[tuple[float, Any, float]]] = defaultdict(list)
    for r, region, area in zip(dets, regions, areas, strict=True):
        if r["image_id"] in image_set and 0 < area < math.inf:
            dets_by_pair[r["image_id"], r["category_id"]].append((r["score"], region, area))

    gts_by_pair: dict[tuple[int, int], list[tuple[Any, float, bool]]] = defaultdict(list)
    for image_id in image_ids:
        image = gt.images[image_id]
        for ann in gt.annotations_by_image.get(image_id, ()):
            if 0 < ann["area"] < math.inf:
                region = _gt_region(ann, image, iou_type)
                gts_by_pair[image_id, ann["category_id"]].append((region, ann["area"], bool(ann.get("ignore", 0))))

    # Federated evaluation: keep the detections of categories that are annotated in the image (positive) or known to
    # be absent from it (negative); nothing is known about the others, so they can be neither right nor wrong.
    for image_id, category_id in list(dets_by_pair):
        if (image_id, category_id) not in gts_by_pair and category_id not in gt.images[image_id]["neg_category_ids"]:
            del dets_by_pair[image_id, category_id]

    # Per (category, area range): each image's scores, matches and ignore flags, in image order.
    per_cell: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]] = defaultdict(list)
    for image_id, category_id in sorted(set(dets_by_pair) | set(gts_by_pair)):
        pair_dets = sorted(dets_by_pair.get((image_id, category_id), []), key=lambda d: -d[0])
        pair_gts = gts_by_pair.get((image_id, category_id), [])
        if pair_dets and pair_gts:
            iou_matrix = mask_util.iou([d[1] for d in pair_dets], [g[0] for g in pair_gts], [0] * len(pair_gts))
            iou_matrix = np.asarray(iou_matrix, dtype=np.float64).reshape(len(pair_dets), len(pair_gts))
        else:
            iou_matrix = np.zeros((len(pair_dets), len(pair_gts)))
        scores = np.array([d[0] for d in pair_dets], dtype=np.float64)
        det_areas = np.array([d[2] for d in pair_dets], dtype=np.float64)
        not_exhaustive = category_id in gt.images[image_id]["not_exhaustive_category_ids"]
        k = category_index[category_id]
        for a, (low, high) in enumerate(area_ranges):
            gt_ignore = [ignore or area < low or area > high for _, area, ignore in pair_gts]
            gt_order = np.argsort(gt_ignore, kind="mergesort")  # ignored ground truth last
            gt_ignore = [gt_ignore[i] for i in gt_order]
            ious = iou_matrix[:, gt_order].tolist()
            if pair_gts:
                matched, ignored = _greedy_match(ious, gt_ignore)
            else:
                matched = ignored = np.zeros((len(_IOU_THRESHOLDS), len(pair_dets)), dtype=bool)
            # An unmatched detection outside the area range, or of a category not exhaustively annotated in this
            # image, is ignored rather than a false positive.
            ignorable = (det_areas < low) | (det_areas > high) | not_exhaustive
            ignored = ignored | (~matched & ignorable[None, :])
            per_cell[k, a].append((scores, matched, ignored, len(gt_ignore) - sum(gt_ignore)))
    precision, recall = _accumulate(per_cell, num_categories=len(category_ids))
    return precision, recall, category_ids


def _accumulate(
    per_cell: Mapping[tuple[int, int], list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]], *, num_categories: int
) -> tuple[np.ndarray, np.ndarray]:
    """lvis-api's accumulate(): precision (T, R, K, A) at the 101 recall points and final recall (T, K, A).

    ``per_cell[k, a]`` holds, image by image, the scores, matches, ignore flags and regular ground-truth count of
    category k in area range a. Cells without regular ground truth stay -1 (left out of every mean).
    """
    num_t, num_r = len(_IOU_THRESHOLDS), len(_RECALL_THRESHOLDS)
    precision = -np.ones((num_t, num_r, num_categories, len(_AREA_RANGES)))
    recall = -np.ones((num_t, num_categories, len(_AREA_RANGES)))
    for (k, a), cell in per_cell.items():
        num_gt = sum(c[3] for c in cell)
        if num_gt == 0:
            continue
        scores = np.concatenate([c[0] for c in cell])
        order = np.argsort(-scores, kind="mergesort")
        matched = np.concatenate([c[1] for c in cell], axis=1)[:, order]
        ignored = np.concatenate([c[2] for c in cell], axis=1)[:, order]
        tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
        fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
        for t in range(num_t):
            tp, fp = tp_sum[t], fp_sum[t]
            rc = tp / num_gt
            recall[t, k, a] = rc[-1] if len(tp) else 0
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope: the best precision at any higher recall
            at = np.searchsorted(rc, _RECALL_THRESHOLDS, side="left")
            reached = at < len(pr)  # recall levels never reached have precision 0
            precision[t, :, k, a] = 0.0
            precision[t, reached, k, a] = pr[at[reached]]
    return precision, recall


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def evaluate_lvis(
    gt: LvisGroundTruth | Mapping[str, Any] | str | Path,
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    image_ids: Iterable[int] | None = None,
    max_dets_per_image: int = LVIS_MAX_DETS_PER_IMAGE,
    per_category: bool = False,
    source: str = "results",
) -> dict[str, Any]:
    """lvis-api's numbers for ``{iou_type: COCO-style results list}`` on ``image_ids`` (default: every image).

    Returns ``{iou_type: {AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs@300, ARm@300, ARl@300}}`` (the
    300 is ``max_dets_per_image``), plus ``per_category: {iou_type: {name: AP}}`` when asked.
    """
    gt = load_lvis_ground_truth(gt)
    if max_dets_per_image < 1:
        raise ValueError(f"max_dets_per_image must be at least 1, got {max_dets_per_image}")
    image_ids = sorted(set(image_ids)) if image_ids is not None else sorted(gt.images)
    names = category_names(gt.dataset["categories"])
    summary: dict[str, Any] = {}
    per_category_ap: dict[str, dict[str, float]] = {}
    for iou_type, type_results in results.items():
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou type {iou_type!r} is not one of ('bbox', 'segm')")
        check_coco_results(
            type_results, image_ids=gt.images, category_ids=gt.categories, iou_type=iou_type, source=source
        )
        precision, recall, category_ids = _evaluate_one_type(gt, type_results, iou_type, image_ids, max_dets_per_image)
        stats = {
            "AP": _mean_valid(precision[:, :, :, 0]),
            "AP50": _mean_valid(precision[0, :, :, 0]),
            "AP75": _mean_valid(precision[5, :, :, 0]),
            "APs": _mean_valid(precision[:, :, :, 1]),
            "APm": _mean_valid(precision[:, :, :, 2]),
            "APl": _mean_valid(precision[:, :, :, 3]),
        }
        for frequency, key in _FREQUENCIES.items():
            group = [k for k, c in enumerate(category_ids) if gt.categories[c]["frequency"] == frequency]
            stats[key] = _mean_valid(precision[:, :, group, 0])
        for a, area in enumerate(("", "s", "m", "l")):
            stats[f"AR{area}@{max_dets_per_image}"] = _mean_valid(recall[:, :, a])
        summary[iou_type] = stats
        if per_category:
            per_category_ap[iou_type] = {}
            for k, category_id in enumerate(category_ids):
                ap = _mean_valid(precision[:, :, k, 0])
                if ap > -1:
                    per_category_ap[iou_type][names[category_id]] = ap
    if per_category:
        summary["per_category"] = per_category_ap
    return summary


def evaluate_lvis_file(
    gt: LvisGroundTruth | Mapping[str, Any] | str | Path,
    results: str | Path,
    *,
    iou_types: Sequence[str] = ("bbox",),
    max_dets_per_image: int = LVIS_MAX_DETS_PER_IMAGE,
    per_category: bool = False,
) -> dict[str, Any]:
    """Evaluate an LVIS results file (COCO's results format) on every image of the ground truth.

    For segm, a ``bbox`` in the results is dropped, as detectron2 does: lvis-api would otherwise take the box's area
    for the detection's, and sort it into the wrong area range.
    """
    by_type = read_results_file(results, iou_types=iou_types)
    return evaluate_lvis(
        gt, by_type, max_dets_per_image=max_dets_per_image, per_category=per_category, source=f"results file {results}"
    )


class LvisEvaluator(DetectionEvaluator):
    """LVIS bbox / segm evaluation of torchvision outputs with lvis-api's semantics.

    ``label_to_category`` maps the model's labels to LVIS category ids (``None``: the labels are the category ids).
    Keep 300 detections per image above ``LVIS_SCORE_THRESH`` in the detector (``box_detections_per_img=300``,
    ``box_score_thresh=0.0001``): LVIS evaluates up to 300.
    """

    def __init__(
        self,
        gt: LvisGroundTruth | Mapping[str, Any] | str | Path,
        *,
        iou_types: Sequence[str] = ("bbox",),
        label_to_category: Mapping[int, int] | None = None,
        max_dets_per_image: int = LVIS_MAX_DETS_PER_IMAGE,
        mask_threshold: float = 0.5,
    ):
        super().__init__(iou_types=iou_types)
        self.gt = load_lvis_ground_truth(gt)
        self.max_dets_per_image = max_dets_per_image
        self.mask_threshold = mask_threshold
        self._category_of = category_lookup(label_to_category, self.gt.categories)

    def _image_key(self, image_id: Any) -> int:
        if isinstance(image_id, torch.Tensor):
            image_id = image_id.item()
        if image_id not in self.gt.images:
            raise EvaluationInputError(f"image id {image_id!r} is not in the LVIS ground truth")
        return int(image_id)

    def _to_results(self, image_id: int, output: Mapping[str, torch.Tensor]) -> dict[str, list[dict[str, Any]]]:
        return predictions_to_coco_results(
            image_id,
            output,
            category_of=self._category_of,
            iou_types=self.iou_types,
            mask_threshold=self.mask_threshold,
        )

    def summarize(self, *, per_category: bool = False) -> dict[str, Any]:
        self._check_not_empty()
        return evaluate_lvis(
            self.gt,
            {iou_type: self.results(iou_type) for iou_type in self.iou_types},
            image_ids=self.image_ids,
            max_dets_per_image=self.max_dets_per_image,
            per_category=per_category,
        )
