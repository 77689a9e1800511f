"""Evaluation with each dataset's official metric: COCO (pycocotools), LVIS (lvis-api's), PASCAL VOC (detectron2's).

One interface for the three, after torchvision's detection references: build an evaluator from the ground truth,
``update({image_id: torchvision output})`` for every batch, ``synchronize()`` on every rank, then ``summarize()``
for the numbers in the shape of ``eval.json`` (DESIGN.md). ``evaluate_*_file`` evaluate a results file, as
``python -m detpretrain.evaluate`` does.

```python
evaluator = CocoEvaluator("instances_val2017.json", iou_types=("bbox", "segm"), label_to_category=label_to_id)
for images, targets in loader:
    outputs = model(images)
    evaluator.update({t["image_id"]: o for t, o in zip(targets, outputs)})
evaluator.synchronize()
print(evaluator.summarize())   # {"bbox": {"AP": .., "AP50": .., ...}, "segm": {...}}
```
"""

from detpretrain.evaluation.coco import (
    COCO_STAT_NAMES,
    CocoEvaluator,
    DetectionEvaluator,
    EvaluationInputError,
    evaluate_coco,
    evaluate_coco_file,
    load_coco_ground_truth,
)
from detpretrain.evaluation.lvis import (
    LVIS_MAX_DETS_PER_IMAGE,
    LVIS_SCORE_THRESH,
    LvisEvaluator,
    LvisGroundTruth,
    evaluate_lvis,
    evaluate_lvis_file,
    load_lvis_ground_truth,
)
from detpretrain.evaluation.voc import (
    VOC_CLASSES,
    VocAnnotationError,
    VocEvaluator,
    VocGroundTruth,
    VocImage,
    VocObject,
    evaluate_voc,
    evaluate_voc_file,
    load_voc_ground_truth,
    parse_voc_xml,
    voc_ap,
    voc_folder_ground_truth,
)

__all__ = [
    "COCO_STAT_NAMES",
    "LVIS_MAX_DETS_PER_IMAGE",
    "LVIS_SCORE_THRESH",
    "VOC_CLASSES",
    "CocoEvaluator",
    "DetectionEvaluator",
    "EvaluationInputError",
    "LvisEvaluator",
    "LvisGroundTruth",
    "VocAnnotationError",
    "VocEvaluator",
    "VocGroundTruth",
    "VocImage",
    "VocObject",
    "evaluate_coco",
    "evaluate_coco_file",
    "evaluate_lvis",
    "evaluate_lvis_file",
    "evaluate_voc",
    "evaluate_voc_file",
    "load_coco_ground_truth",
    "load_lvis_ground_truth",
    "load_voc_ground_truth",
    "parse_voc_xml",
    "voc_ap",
    "voc_folder_ground_truth",
]
