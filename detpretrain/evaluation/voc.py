"""PASCAL VOC evaluation as detectron2 evaluates it (the numbers of PreDet's Tab. 6), and its VOC ground truth.

The metric is detectron2's ``PascalVOCDetectionEvaluator`` (py-faster-rcnn's ``voc_eval``, a port of the VOC devkit):

- Per class, the detections of all images go down in order of score. Each looks only at the ground truth of its
  image and class that it overlaps most. It is a true positive if that IoU is above the threshold (strictly) and
  that object is not taken yet, a false positive if it is taken or the IoU is too low, and neither if that object
  is ``difficult``. Unlike COCO's matching, a detection whose best object is taken does not fall back to another.
- ``difficult`` objects are ignored: they count in no recall, and a detection on one is neither right nor wrong.
- IoU follows VOC's +1 pixel convention: corners are inclusive pixel indices, a box is ``x2 - x1 + 1`` wide.
- The AP of a class is the 11-point interpolated AP for VOC2007 (recall points ``np.arange(0, 1.1, 0.1)``, as
  detectron2 computes them) and the area under the interpolated precision-recall curve for the other years.
- ``bbox.AP`` is the mean over IoU 0.50:0.05:0.95 of the mean over classes; ``AP50`` and ``AP75`` are the class
  means at 0.5 and 0.75; ``voc07.mAP`` is the classic VOC07 mAP (11-point AP at IoU 0.5, over classes), equal to
  ``AP50`` for VOC2007. Values are fractions (detectron2 prints percentages).
- Two departures. A class without any non-difficult object in the evaluated images is left out of the means
  (detectron2 would average in 0 or nan; this cannot happen on a full VOC test set), as COCO leaves out categories
  without ground truth. Scores and boxes keep their full precision, where detectron2 writes them to text with 3 and
  1 decimals and sorts with an unstable sort: only detections whose scores agree to 3 decimals can come out in
  another order (here, ties keep the order of the results).

Coordinates. VOC's XML gives ``xmin ymin xmax ymax`` as 1-based inclusive pixel indices (``VocObject.bndbox``).
Models train and predict in 0-based continuous coordinates, ``[xmin - 1, ymin - 1, xmax, ymax]`` (``VocObject.box``,
what detectron2's VOC loader does too); the evaluator adds the 1 back before the IoU, as detectron2's does.

Ground truth: a VOCdevkit folder, a year and an image set: ``VOC<year>/ImageSets/Main/<image set>.txt`` lists the
images, ``VOC<year>/Annotations/<image>.xml`` holds their objects. Outside VOCdevkit (``voc_folder_ground_truth``):
the XML files of a folder, over the dataset's own classes, scored with the area-under-curve AP (no year, so not 2007's
11 points). ``parse_voc_xml`` reads one such file. The XML
reader itself, ``VOC_CLASSES``, ``VocObject`` and ``VocImage`` live in ``detpretrain.data.voc`` (re-exported here), so
that the evaluator and ``VocDataset`` read a file the same way. ``parse_voc_xml`` adds the evaluator's own rule on top:
an inverted box (``xmax < xmin`` or ``ymax < ymin``) is an error, where the dataset drops it and counts it, since
ground truth that silently lost an object would change the recall measured. Its errors are ``VocAnnotationError``, an
``EvaluationInputError``, as the evaluator's callers expect. Results: a JSON list of ``{"image_id": "000001",
"category": "dog", "box": [x1, y1, x2, y2], "score": 0.9}``, ``image_id`` the image's name in the image set, ``box``
xyxy in the 0-based frame above.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detpretrain.data.detection import DatasetError
from detpretrain.data.voc import VOC_CLASSES, VocImage, VocObject, read_voc_annotation
from detpretrain.evaluation.coco import (
    DetectionEvaluator,
    EvaluationInputError,
    category_lookup,
    is_finite_number,
    read_json,
    unpack_prediction,
)

__all__ = [
    "VOC_CLASSES",
    "VOC_IOU_THRESHOLDS",
    "VocAnnotationError",
    "VocEvaluator",
    "VocGroundTruth",
    "VocImage",
    "VocObject",
    "check_voc_results",
    "evaluate_voc",
    "evaluate_voc_file",
    "load_voc_ground_truth",
    "parse_voc_xml",
    "voc_ap",
    "voc_folder_ground_truth",
]

# detectron2 evaluates at thresh / 100 for thresh in range(50, 100, 5).
VOC_IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))
# The VOC2007 recall points as detectron2 computes them: np.arange puts 0.3, 0.6 and 0.7 a hair above the round
# values (0.30000000000000004), so a recall of exactly 3/10 does not reach the fourth point. Kept for exactness.
_ELEVEN_POINTS = np.arange(0.0, 1.1, 0.1)


class VocAnnotationError(EvaluationInputError):
    """A VOC annotation file or image set that cannot be read; the message names the file."""


def parse_voc_xml(path: str | Path) -> VocImage:
    """Read a VOC annotation file as ground truth: ``read_voc_annotation``, then no inverted box (module docstring).

    A missing ``difficult``/``truncated`` means 0; coordinates may be integers or decimals. Raises
    VocAnnotationError, naming the file, for a missing file, malformed XML, or an object without a name or a complete
    box, with non-numeric coordinates, or with ``xmax < xmin`` or ``ymax < ymin``.
    """
    path = Path(path)
    try:
        image = read_voc_annotation(path)
    except DatasetError as error:
        # The same message, as the error type the evaluator's callers catch (python -m detpretrain.evaluate).
        raise VocAnnotationError(str(error)) from None
    for i, obj in enumerate(image.objects):
        xmin, ymin, xmax, ymax = obj.bndbox
        if xmax < xmin or ymax < ymin:
            raise VocAnnotationError(
                f"VOC annotation {path}: object {i} ({obj.name}) has an inverted box {list(obj.bndbox)}; fix the file"
            )
    return image


@dataclass(frozen=True)
class VocGroundTruth:
    """The annotations of one VOC image set: ``images`` maps image names to their annotations, in image-set order."""

    year: int | None  # None for a dataset outside VOCdevkit: scored with the area under the curve, not VOC07's
    image_set: str
    class_names: tuple[str, ...]
    images: dict[str, VocImage]

    @property
    def image_names(self) -> list[str]:
        return list(self.images)


def load_voc_ground_truth(
    root: str | Path, *, year: int = 2007, image_set: str = "test", class_names: Sequence[str] = VOC_CLASSES
) -> VocGroundTruth:
    """Read ``root/VOC<year>/ImageSets/Main/<image_set>.txt`` and the annotation of every image it names.

    ``root`` is the VOCdevkit folder, or the ``VOC<year>`` folder itself. An object whose class is not in
    ``class_names`` is an error (a dataset with other classes passes its own).
    """
    root = Path(root)
    year_dir = root / f"VOC{year}"
    if not year_dir.is_dir():
        if not (root / "Annotations").is_dir():
            raise VocAnnotationError(f"{root} is neither a VOCdevkit folder holding VOC{year}/ nor a VOC{year} folder")
        year_dir = root
    set_file = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
    try:
        lines = set_file.read_text().splitlines()
    except FileNotFoundError:
        raise VocAnnotationError(f"VOC image set {set_file} does not exist") from None
    # An image set line is "<name>", or "<name> <label>" in the per-class sets.
    names = [line.split()[0] for line in lines if line.strip()]
    if not names:
        raise VocAnnotationError(f"VOC image set {set_file} lists no images")
    known = set(class_names)
    images = {}
    for name in names:
        image = parse_voc_xml(year_dir / "Annotations" / f"{name}.xml")
        for obj in image.objects:
            if obj.name not in known:
                raise VocAnnotationError(
                    f"VOC annotation {year_dir / 'Annotations' / f'{name}.xml'}: class {obj.name!r} is not one of "
                    f"the {len(known)} classes evaluated; pass --class-names listing every class of the dataset"
                )
        images[name] = image
    return VocGroundTruth(year=year, image_set=image_set, class_names=tuple(class_names), images=images)


def voc_folder_ground_truth(
    xml_files: Mapping[str, Path], *, class_names: Sequence[str], source: Any = "VOC folder"
) -> VocGroundTruth:
    """The ground truth of VOC XML files outside VOCdevkit (``detpretrain.data.voc.VocFolderDataset``): image name ->
    its XML file, read by ``parse_voc_xml``; an image whose file does not exist has no objects (as the dataset reads
    it). ``year`` is None: the area under the interpolated precision-recall curve (detectron2's metric for every
    year but 2007), over the dataset's own ``class_names``."""
    known = set(class_names)
    images = {}
    for name, xml_path in xml_files.items():
        xml_path = Path(xml_path)
        image = parse_voc_xml(xml_path) if xml_path.is_file() else VocImage(name, None, None, None, ())
        for obj in image.objects:
            if obj.name not in known:
                raise VocAnnotationError(
                    f"VOC annotation {xml_path}: class {obj.name!r} is not one of the {len(known)} classes evaluated; "
                    "pass --class-names listing every class of the dataset"
                )
        images[name] = image
    if not images:
        raise VocAnnotationError(f"{source}: no images to evaluate")
    return VocGroundTruth(year=None, image_set=str(source), class_names=tuple(class_names), images=images)


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, use_07_metric: bool) -> float:
    """The AP of one class from its cumulative recall and precision (detections by decreasing score).

    ``use_07_metric``: the mean of the best precision at recall >= t for the 11 points t = 0, 0.1, ..., 1 (VOC2007).
    Otherwise: the area under the precision envelope, summed where recall changes (VOC2010 and later).
    """
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        points = [np.max(precision[recall >= t]) if (recall >= t).any() else 0.0 for t in _ELEVEN_POINTS]
        return float(np.sum(points) / 11.0)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: the best precision at this recall or a higher one
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def check_voc_results(results: Any, *, gt: VocGroundTruth, source: str) -> None:
    """Raise EvaluationInputError, naming ``source`` and the entry, unless ``results`` is a valid VOC results list."""
    if not isinstance(results, list):
        raise EvaluationInputError(f"{source}: results must be a JSON list of detections, not {type(results).__name__}")
    classes = set(gt.class_names)
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise EvaluationInputError(f"{source}: entry {i} is not an object")
        for key in ("image_id", "category", "box", "score"):
            if key not in r:
                raise EvaluationInputError(
                    f"{source}: entry {i} has no {key!r} (VOC results are {{image_id, category, box, score}})"
                )
        if not isinstance(r["image_id"], str) or r["image_id"] not in gt.images:
            raise EvaluationInputError(
                f"{source}: entry {i}: image_id {r['image_id']!r} is not in the image set {gt.image_set!r}"
            )
        if not isinstance(r["category"], str) or r["category"] not in classes:
            raise EvaluationInputError(f"{source}: entry {i}: category {r['category']!r} is not in the ground truth")
        box = r["box"]
        if not (isinstance(box, list) and len(box) == 4 and all(is_finite_number(v) for v in box)):
            raise EvaluationInputError(f"{source}: entry {i}: 'box' must be [x1, y1, x2, y2], got {box!r}")
        if not is_finite_number(r["score"]):
            raise EvaluationInputError(f"{source}: entry {i}: score {r['score']!r} is not a finite number")


def _class_aps(
    gt: VocGroundTruth,
    image_names: list[str],
    detections: list[Mapping[str, Any]],
    class_name: str,
    use_07_metric: bool,
) -> tuple[list[float], float] | None:
    """The AP of one class at each of VOC_IOU_THRESHOLDS, and its 11-point AP at 0.5; None without ground truth."""
    # Ground truth of this class: XML boxes, difficult flags, and for each image the range of its objects.
    gt_boxes, gt_difficult, image_range = [], [], {}
    for name in image_names:
        start = len(gt_boxes)
        for obj in gt.images[name].objects:
            if obj.name == class_name:
                gt_boxes.append(obj.bndbox)
                gt_difficult.append(obj.difficult)
        image_range[name] = (start, len(gt_boxes))
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_difficult = np.asarray(gt_difficult, dtype=bool)
    num_positives = int((~gt_difficult).sum())
    if num_positives == 0:
        return None

    detections = sorted(detections, key=lambda r: -r["score"])  # stable: ties keep their order
    # The best-overlapping ground truth of each detection; it does not depend on the threshold.
    best_iou = np.full(len(detections), -np.inf)
    best_gt = np.full(len(detections), -1)
    for d, r in enumerate(detections):
        start, stop = image_range[r["image_id"]]
        if start == stop:
            continue
        x1, y1, x2, y2 = r["box"]
        x1, y1 = x1 + 1.0, y1 + 1.0  # back to VOC's 1-based pixel indices (VocObject.box took the 1 off)
        g = gt_boxes[start:stop]
        iw = np.maximum(np.minimum(g[:, 2], x2) - np.maximum(g[:, 0], x1) + 1.0, 0.0)
        ih = np.maximum(np.minimum(g[:, 3], y2) - np.maximum(g[:, 1], y1) + 1.0, 0.0)
        inter = iw * ih
        union = (x2 - x1 + 1.0) * (y2 - y1 + 1.0) + (g[:, 2] - g[:, 0] + 1.0) * (g[:, 3] - g[:, 1] + 1.0) - inter
        overlaps = inter / union
        best_gt[d] = start + int(np.argmax(overlaps))
        best_iou[d] = overlaps[best_gt[d] - start]
    best_is_difficult = np.zeros(len(detections), dtype=bool)
    has_best = best_gt >= 0
    best_is_difficult[has_best] = gt_difficult[best_gt[has_best]]

    aps, ap07_at_50 = [], 0.0
    for threshold in VOC_IOU_THRESHOLDS:
        above = best_iou > threshold
        candidates = np.flatnonzero(above & ~best_is_difficult)
        # The first detection (by score) to reach an object takes it; later ones on it are duplicates.
        _, first = np.unique(best_gt[candidates], return_index=True)
        tp = np.zeros(len(detections))
        tp[candidates[first]] = 1.0
        fp = (~above).astype(np.float64)
        fp[candidates] = 1.0 - tp[candidates]
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / float(num_positives)
        # eps: the first detections may all be on difficult objects, with tp + fp = 0.
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps.append(voc_ap(recall, precision, use_07_metric=use_07_metric))
        if threshold == 0.5:
            ap07_at_50 = voc_ap(recall, precision, use_07_metric=True)
    return aps, ap07_at_50


def evaluate_voc(
    gt: VocGroundTruth,
    results: Sequence[Mapping[str, Any]],
    *,
    image_names: Iterable[str] | None = None,
    use_07_metric: bool | None = None,
    per_category: bool = False,
    source: str = "results",
) -> dict[str, Any]:
    """detectron2's VOC numbers for a VOC results list on ``image_names`` (default: the whole image set).

    ``use_07_metric`` defaults to ``gt.year == 2007``. Returns ``{"bbox": {"AP", "AP50", "AP75"}, "voc07": {"mAP"}}``
    (-1 where no class has ground truth), plus ``per_category: {"bbox": {class: AP}}`` when asked. Detections on
    images outside ``image_names`` are left out.
    """
    check_voc_results(results, gt=gt, source=source)
    image_names = list(dict.fromkeys(image_names)) if image_names is not None else gt.image_names
    for name in image_names:
        if name not in gt.images:
            raise EvaluationInputError(f"image {name!r} is not in the image set {gt.image_set!r}")
    if use_07_metric is None:
        use_07_metric = gt.year == 2007
    evaluated = set(image_names)
    by_class: dict[str, list[Mapping[str, Any]]] = {c: [] for c in gt.class_names}
    for r in results:
        if r["image_id"] in evaluated:
            by_class[r["category"]].append(r)

    class_aps: dict[str, list[float]] = {}
    class_ap07: dict[str, float] = {}
    for class_name in gt.class_names:
        evaluation = _class_aps(gt, image_names, by_class[class_name], class_name, use_07_metric)
        if evaluation is not None:
            class_aps[class_name], class_ap07[class_name] = evaluation

    if class_aps:
        # rows: classes, columns: IoU thresholds; detectron2 averages over classes, then over thresholds.
        table = np.array(list(class_aps.values()))
        map_per_threshold = table.mean(axis=0)
        bbox = {
            "AP": float(np.mean(map_per_threshold)),
            "AP50": float(map_per_threshold[VOC_IOU_THRESHOLDS.index(0.5)]),
            "AP75": float(map_per_threshold[VOC_IOU_THRESHOLDS.index(0.75)]),
        }
        voc07 = {"mAP": float(np.mean(list(class_ap07.values())))}
    else:
        bbox = {"AP": -1.0, "AP50": -1.0, "AP75": -1.0}
        voc07 = {"mAP": -1.0}
    summary: dict[str, Any] = {"bbox": bbox, "voc07": voc07}
    if per_category:
        summary["per_category"] = {"bbox": {c: float(np.mean(aps)) for c, aps in class_aps.items()}}
    return summary


def evaluate_voc_file(
    gt: VocGroundTruth | str | Path,
    results: str | Path,
    *,
    year: int = 2007,
    image_set: str = "test",
    per_category: bool = False,
) -> dict[str, Any]:
    """Evaluate a VOC results file on a whole image set (``gt`` a VOCdevkit folder with ``year`` and ``image_set``)."""
    if not isinstance(gt, VocGroundTruth):
        gt = load_voc_ground_truth(gt, year=year, image_set=image_set)
    detections = read_json(results, what="results file")
    return evaluate_voc(gt, detections, per_category=per_category, source=f"results file {results}")


class VocEvaluator(DetectionEvaluator):
    """VOC box evaluation of torchvision outputs, as detectron2 evaluates VOC.

    Images are named by their name in the image set (``"000001"``) or by their position in it (an int).
    ``label_to_category`` maps the model's labels to class names; by default label ``i`` is ``class_names[i - 1]``
    (label 0 is torchvision's background). Boxes are xyxy in 0-based continuous coordinates (``VocObject.box``).
    """

    supported_iou_types = ("bbox",)

    def __init__(
        self,
        gt: VocGroundTruth,
        *,
        label_to_category: Mapping[int, str] | None = None,
        use_07_metric: bool | None = None,
    ):
        super().__init__(iou_types=("bbox",))
        self.gt = gt
        self.use_07_metric = use_07_metric
        self._names = gt.image_names
        if label_to_category is None:
            label_to_category = {i + 1: name for i, name in enumerate(gt.class_names)}
        self._category_of = category_lookup(label_to_category, set(gt.class_names))

    def _image_key(self, image_id: Any) -> str:
        if isinstance(image_id, torch.Tensor):
            image_id = image_id.item()
        if isinstance(image_id, str):
            if image_id not in self.gt.images:
                raise EvaluationInputError(f"image {image_id!r} is not in the VOC image set {self.gt.image_set!r}")
            return image_id
        if isinstance(image_id, int) and 0 <= image_id < len(self._names):
            return self._names[image_id]
        raise EvaluationInputError(
            f"image id {image_id!r} is neither an image name of the VOC image set {self.gt.image_set!r} "
            f"nor a position in it (0..{len(self._names) - 1})"
        )

    def _to_results(self, image_id: str, output: Mapping[str, torch.Tensor]) -> dict[str, list[dict[str, Any]]]:
        boxes, scores, labels = unpack_prediction(image_id, output)
        return {
            "bbox": [
                {"image_id": image_id, "category": self._category_of(int(label)), "box": box, "score": score}
                for box, score, label in zip(boxes.tolist(), scores, labels, strict=True)
            ]
        }

    def summarize(self, *, per_category: bool = False) -> dict[str, Any]:
        self._check_not_empty()
        return evaluate_voc(
            self.gt,
            self.results("bbox"),
            image_names=self.image_ids,
            use_07_metric=self.use_07_metric,
            per_category=per_category,
        )
