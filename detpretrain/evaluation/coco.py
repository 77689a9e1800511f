"""COCO evaluation with pycocotools, and the evaluator interface that the LVIS and VOC evaluators share.

Every evaluator follows the evaluator of torchvision's detection references. It is built from the ground truth;
``update(predictions)`` takes the per-image outputs of a torchvision detector, ``{image_id: {"boxes": (N, 4) xyxy,
"scores": (N,), "labels": (N,), "masks": (N, 1, H, W) (Mask R-CNN only)}}``, maps the model's contiguous labels back
to the dataset's categories and keeps them in the dataset's results format. Label 0 is torchvision's background:
RetinaNet's sigmoid head scores it like any class and can return it above the score threshold, so such detections
are dropped and counted (``background_detections``), never mapped to a category; ``synchronize()`` gathers every rank's
results when torch.distributed is initialized; ``summarize()`` returns the numbers in the shape of ``eval.json``
(DESIGN.md, "Evaluation output"). The numbers are computed on the images given to ``update`` (after
``synchronize``, on every rank's images), as torchvision's evaluator does, so a run on part of a validation set
reports that part.

COCO numbers are pycocotools' own: ``COCOeval`` with its default parameters (IoU 0.50:0.05:0.95, 100 detections
per image and category, COCO's area ranges), values as fractions in 0..1, -1 where there is no ground truth to
measure. The keys follow ``COCOeval.stats``: ``AP AP50 AP75 APs APm APl AR@1 AR@10 AR@100 ARs@100 ARm@100
ARl@100``. pycocotools' table of numbers goes to stderr (its progress lines nowhere), so that stdout can carry the
JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "COCO_STAT_NAMES",
    "IOU_TYPES",
    "CocoEvaluator",
    "DetectionEvaluator",
    "EvaluationInputError",
    "category_names",
    "category_lookup",
    "check_coco_results",
    "drop_background",
    "evaluate_coco",
    "evaluate_coco_file",
    "is_finite_number",
    "load_coco_ground_truth",
    "predictions_to_coco_results",
    "read_json",
    "read_results_file",
    "unpack_prediction",
]

IOU_TYPES = ("bbox", "segm")
# The order of COCOeval.stats.
COCO_STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR@1",
    "AR@10",
    "AR@100",
    "ARs@100",
    "ARm@100",
    "ARl@100",
)

ImageId = int | str


class EvaluationInputError(ValueError):
    """Ground truth, results or predictions that cannot be evaluated; the message names the input and the reason."""


def read_json(path: str | Path, *, what: str) -> Any:
    """The parsed contents of a JSON file; a missing or malformed file raises EvaluationInputError naming it."""
    path = Path(path)
    try:
        with path.open() as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvaluationInputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise EvaluationInputError(f"{what} {path} is a directory, not a JSON file") from None
    except json.JSONDecodeError as e:
        raise EvaluationInputError(f"{what} {path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationInputError(f"{what} {path} cannot be read: {e}") from None


def category_names(categories: Iterable[Mapping[str, Any]]) -> dict[Any, str]:
    """``{category id: name}``, for per-category results; a name that several categories share gets its id appended."""
    names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
    counts = Counter(names.values())
    return {i: name if counts[name] == 1 else f"{name} (id {i})" for i, name in names.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The shared interface: update / synchronize / summarize
# ---------------------------------------------------------------------------------------------------------------------


class DetectionEvaluator:
    """Collects per-image detections in the dataset's results format; subclasses turn them into numbers.

    Subclasses implement ``_image_key`` (check an image id against the ground truth), ``_to_results`` (one image's
    torchvision output as ``{iou_type: [result, ...]}``) and ``summarize``.
    """

    supported_iou_types: tuple[str, ...] = IOU_TYPES

    def __init__(self, *, iou_types: Sequence[str]):
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        for iou_type in iou_types:
            if iou_type not in self.supported_iou_types:
                raise ValueError(f"iou type {iou_type!r} is not one of {self.supported_iou_types}")
        if not iou_types:
            raise ValueError("give at least one iou type")
        self.iou_types = tuple(dict.fromkeys(iou_types))
        # image id -> iou type -> results; one entry per image, so a padded duplicate (DistributedSampler) counts once.
        self._results: dict[ImageId, dict[str, list[dict[str, Any]]]] = {}
        self._background: dict[ImageId, int] = {}  # image id -> detections of label 0 dropped

    def _image_key(self, image_id: Any) -> ImageId:
        raise NotImplementedError

    def _to_results(self, image_id: ImageId, output: Mapping[str, torch.Tensor]) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def update(self, predictions: Mapping[Any, Mapping[str, torch.Tensor]]) -> None:
        """Add ``{image_id: torchvision output}``; an image already added keeps its first predictions. Detections of
        label 0 (background) are dropped and counted in ``background_detections``."""
        for image_id, output in predictions.items():
            key = self._image_key(image_id)
            output, dropped = drop_background(output)
            results = self._to_results(key, output)  # checked even for an image already added
            if key not in self._results:
                self._results[key], self._background[key] = results, dropped

    @property
    def background_detections(self) -> int:
        """Detections of label 0 dropped so far (after ``synchronize``, on every rank's images)."""
        return sum(self._background.values())

    def synchronize(self) -> None:
        """Gather every rank's results on every rank (a no-op unless torch.distributed is initialized).

        All ranks must call it (with NCCL, after ``torch.cuda.set_device``, as ``all_gather_object`` requires). An
        image that several ranks evaluated (DistributedSampler pads the last batch with repeated images) keeps the
        predictions of the lowest rank.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[tuple | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self._results, self._background))
        merged: dict[ImageId, dict[str, list[dict[str, Any]]]] = {}
        background: dict[ImageId, int] = {}
        for per_rank, per_rank_background in gathered:
            for image_id, results in per_rank.items():
                if image_id not in merged:
                    merged[image_id], background[image_id] = results, per_rank_background[image_id]
        self._results, self._background = merged, background

    @property
    def image_ids(self) -> list[ImageId]:
        """The images evaluated so far, sorted."""
        return sorted(self._results)

    def results(self, iou_type: str) -> list[dict[str, Any]]:
        """The detections collected for ``iou_type``, in the results-file format (image by image, sorted)."""
        if iou_type not in self.iou_types:
            raise ValueError(f"this evaluator collects {self.iou_types}, not {iou_type!r}")
        return [r for image_id in self.image_ids for r in self._results[image_id][iou_type]]

    def _check_not_empty(self) -> None:
        if not self._results:
            raise RuntimeError("no predictions to summarize: call update() (and synchronize()) first")

    def summarize(self, *, per_category: bool = False) -> dict[str, Any]:
        """The numbers in the eval.json shape; ``per_category`` adds ``{"per_category": {iou_type: {name: AP}}}``."""
        raise NotImplementedError


def category_lookup(label_to_category: Mapping[int, Any] | None, known: Collection[Any]):
    """A function from a model label to a dataset category, checked against the ground truth's categories."""

    def category_of(label: int) -> Any:
        if label_to_category is None:
            category = label
        elif label in label_to_category:
            category = label_to_category[label]
        else:
            raise EvaluationInputError(f"model label {label} has no entry in label_to_category")
        if category not in known:
            raise EvaluationInputError(
                f"model label {label} maps to category {category!r}, which is not in the ground truth"
            )
        return category

    return category_of


def drop_background(output: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], int]:
    """``output`` without its detections of label 0 (every per-detection field indexed alike), and how many there
    were. An output without ``labels`` passes unchanged, for ``unpack_prediction`` to name what is missing."""
    if "labels" not in output:
        return dict(output), 0
    labels = torch.as_tensor(output["labels"]).reshape(-1)
    background = labels == 0
    dropped = int(background.sum())
    if not dropped:
        return dict(output), 0
    keep = ~background
    kept = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(labels):
            kept[key] = value[keep.to(value.device)]
        else:
            kept[key] = value
    return kept, dropped


def unpack_prediction(image_id: Any, output: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, list, list]:
    """``boxes`` (N, 4), ``scores`` and ``labels`` of one image's output, on the CPU, checked for consistent sizes."""
    for key in ("boxes", "scores", "labels"):
        if key not in output:
            raise EvaluationInputError(f"the prediction for image {image_id!r} has no {key!r}")
    boxes = torch.as_tensor(output["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
    scores = torch.as_tensor(output["scores"]).detach().cpu().reshape(-1).tolist()
    labels = torch.as_tensor(output["labels"]).detach().cpu().reshape(-1).tolist()
    if not len(boxes) == len(scores) == len(labels):
        raise EvaluationInputError(
            f"the prediction for image {image_id!r} has {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
        )
    return boxes, scores, labels


def predictions_to_coco_results(
    image_id: int,
    output: Mapping[str, torch.Tensor],
    *,
    category_of: Any,
    iou_types: Sequence[str],
    mask_threshold: float = 0.5,
) -> dict[str, list[dict[str, Any]]]:
    """One image's torchvision output as COCO results, ``{iou_type: [{"image_id", "category_id", ...}, ...]}``.

    ``bbox`` results carry ``bbox`` (xywh); ``segm`` results carry ``segmentation`` (RLE of ``masks > mask_threshold``,
    as torchvision's references binarize Mask R-CNN's soft masks) and no ``bbox``: pycocotools takes the area of a
    result from its bbox when one is there, and a segm result's area must be its mask's.
    """
    boxes, scores, labels = unpack_prediction(image_id, output)
    categories = [category_of(int(label)) for label in labels]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results: dict[str, list[dict[str, Any]]] = {}
    if "bbox" in iou_types:
        results["bbox"] = [
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for c, b, s in zip(categories, xywh, scores, strict=True)
        ]
    if "segm" in iou_types:
        if "masks" not in output:
            raise EvaluationInputError(f"segm evaluation needs 'masks' in the prediction for image {image_id!r}")
        masks = torch.as_tensor(output["masks"]).detach().cpu()
        if masks.dim() == 4:  # (N, 1, H, W), Mask R-CNN's output
            masks = masks[:, 0]
        if len(masks) != len(scores):
            raise EvaluationInputError(f"image {image_id!r}: {len(masks)} masks for {len(scores)} detections")
        binary = (masks > mask_threshold).numpy().astype(np.uint8)
        rles = [mask_util.encode(np.asfortranarray(m)) for m in binary]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-ready, and what results files hold
        results["segm"] = [
            {"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
            for c, r, s in zip(categories, rles, scores, strict=True)
        ]
    return results


def is_finite_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_coco_results(
    results: Any,
    *,
    image_ids: Collection[int],
    category_ids: Collection[int],
    iou_type: str,
    source: str,
) -> None:
    """Raise EvaluationInputError, naming ``source`` and the entry, unless ``results`` is a valid COCO results list.

    An entry needs ``image_id`` and ``category_id`` of the ground truth, a finite ``score``, and ``bbox`` (x, y, w,
    h) for bbox or ``segmentation`` (RLE, ``{"size": [h, w], "counts": ...}``) for segm.
    """
    if not isinstance(results, list):
        raise EvaluationInputError(f"{source}: results must be a JSON list of detections, not {type(results).__name__}")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise EvaluationInputError(f"{source}: entry {i} is not an object")
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise EvaluationInputError(f"{source}: entry {i} has no {key!r}")
        if not isinstance(r["image_id"], int) or r["image_id"] not in image_ids:
            raise EvaluationInputError(f"{source}: entry {i}: image_id {r['image_id']!r} is not in the ground truth")
        if not isinstance(r["category_id"], int) or r["category_id"] not in category_ids:
            raise EvaluationInputError(
                f"{source}: entry {i}: category_id {r['category_id']!r} is not in the ground truth"
            )
        if not is_finite_number(r["score"]):
            raise EvaluationInputError(f"{source}: entry {i}: score {r['score']!r} is not a finite number")
        if iou_type == "bbox":
            box = r.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(is_finite_number(v) for v in box)):
                raise EvaluationInputError(f"{source}: entry {i}: 'bbox' must be [x, y, w, h], got {box!r}")
        else:
            rle = r.get("segmentation")
            if not (isinstance(rle, dict) and "size" in rle and isinstance(rle.get("counts"), str | bytes)):
                raise EvaluationInputError(
                    f"{source}: entry {i}: 'segmentation' must be a compressed RLE {{'size': [h, w], 'counts': str}}"
                )


# ---------------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------------


def read_results_file(path: str | Path, *, iou_types: Sequence[str]) -> dict[str, list[Any]]:
    """A COCO-style results file as ``{iou_type: detections}``; for segm without ``bbox`` (see evaluate_coco_file)."""
    detections = read_json(path, what="results file")
    if not isinstance(detections, list):
        raise EvaluationInputError(f"results file {path}: must be a JSON list of detections")
    by_type = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            by_type[iou_type] = [
                {k: v for k, v in r.items() if k != "bbox"} if isinstance(r, dict) else r for r in detections
            ]
        else:
            by_type[iou_type] = detections
    return by_type


def load_coco_ground_truth(gt: COCO | Mapping[str, Any] | str | Path) -> COCO:
    """A pycocotools ``COCO`` from a COCO instances file, its parsed dict, or a ``COCO`` (returned as is)."""
    if isinstance(gt, COCO):
        return gt
    source = "COCO ground truth" if isinstance(gt, Mapping) else f"COCO ground truth {gt}"
    dataset = gt if isinstance(gt, Mapping) else read_json(gt, what="COCO ground truth")
    if not isinstance(dataset, Mapping) or not all(
        isinstance(dataset.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise EvaluationInputError(f"{source} is not a COCO instances file: it needs images, annotations, categories")
    coco = COCO()
    coco.dataset = dict(dataset)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
        coco.createIndex()
    return coco


def _coco_results_api(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    # loadRes cannot take an empty list; no detections is a valid result that scores 0 wherever there is ground truth.
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": coco_gt.dataset["categories"]}
    coco_dt.dataset["annotations"] = []
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def evaluate_coco(
    coco_gt: COCO,
    results: Mapping[str, list[dict[str, Any]]],
    *,
    image_ids: Iterable[int] | None = None,
    per_category: bool = False,
    source: str = "results",
) -> dict[str, Any]:
    """pycocotools' COCOeval of ``{iou_type: COCO results list}`` on ``image_ids`` (default: every ground-truth image).

    Returns ``{iou_type: {AP, AP50, ...}}`` (COCO_STAT_NAMES), plus ``per_category: {iou_type: {name: AP}}`` when
    asked (AP at IoU 0.50:0.95, all areas, 100 detections, for each category with ground truth).
    """
    summary: dict[str, Any] = {}
    per_category_ap: dict[str, dict[str, float]] = {}
    names = category_names(coco_gt.dataset["categories"])
    for iou_type, type_results in results.items():
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type {iou_type!r} is not one of {IOU_TYPES}")
        check_coco_results(
            type_results,
            image_ids=coco_gt.imgs,
            category_ids=coco_gt.cats,
            iou_type=iou_type,
            source=source,
        )
        # loadRes writes into the dicts it is given (area, id, iscrowd): evaluate copies, leave the caller's alone.
        coco_dt = _coco_results_api(coco_gt, [dict(r) for r in type_results])
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        print(f"pycocotools COCOeval, {iou_type}:", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):
            coco_eval.summarize()
        summary[iou_type] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, coco_eval.stats, strict=True)}
        if per_category:
            # precision: (iou thresholds, recall thresholds, categories, area ranges, max dets); area "all", 100 dets.
            precision = coco_eval.eval["precision"][:, :, :, 0, -1]
            per_category_ap[iou_type] = {}
            for k, category_id in enumerate(coco_eval.params.catIds):
                p = precision[:, :, k]
                if (p > -1).any():
                    per_category_ap[iou_type][names[category_id]] = float(np.mean(p[p > -1]))
    if per_category:
        summary["per_category"] = per_category_ap
    return summary


def evaluate_coco_file(
    gt: COCO | Mapping[str, Any] | str | Path,
    results: str | Path,
    *,
    iou_types: Sequence[str] = ("bbox",),
    per_category: bool = False,
) -> dict[str, Any]:
    """Evaluate a COCO results file (a JSON list of detections) on every image of the ground truth, as cocoapi does.

    A results file may carry both ``bbox`` and ``segmentation`` for each detection (detectron2 writes such files):
    for segm, ``bbox`` is dropped, as detectron2 does, so that the area of a detection is its mask's.
    """
    coco_gt = load_coco_ground_truth(gt)
    by_type = read_results_file(results, iou_types=iou_types)
    return evaluate_coco(coco_gt, by_type, per_category=per_category, source=f"results file {results}")


class CocoEvaluator(DetectionEvaluator):
    """COCO bbox / segm evaluation of torchvision outputs with pycocotools.

    ``label_to_category`` maps the model's labels to COCO category ids (``None``: the labels are the category ids,
    as in torchvision's COCO models). ``mask_threshold`` binarizes Mask R-CNN's soft masks.
    """

    def __init__(
        self,
        gt: COCO | Mapping[str, Any] | str | Path,
        *,
        iou_types: Sequence[str] = ("bbox",),
        label_to_category: Mapping[int, int] | None = None,
        mask_threshold: float = 0.5,
    ):
        super().__init__(iou_types=iou_types)
        self.coco_gt = load_coco_ground_truth(gt)
        self.mask_threshold = mask_threshold
        self._category_of = category_lookup(label_to_category, self.coco_gt.cats)

    def _image_key(self, image_id: Any) -> int:
        if isinstance(image_id, torch.Tensor):
            image_id = image_id.item()
        if image_id not in self.coco_gt.imgs:
            raise EvaluationInputError(f"image id {image_id!r} is not in the COCO ground truth")
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
        results = {iou_type: self.results(iou_type) for iou_type in self.iou_types}
        return evaluate_coco(self.coco_gt, results, image_ids=self.image_ids, per_category=per_category)
