"""Fine-tuning on detection: torchvision detectors on timm backbones, protocols as named presets, schedules.

- ``detectors``: ``build_detector(arch, backbone=..., num_classes=..., protocol=...)`` for Faster R-CNN FPN,
  Mask R-CNN FPN, RetinaNet (torchvision's classes) and Faster R-CNN C4 (res5 as the ROI head, from torchvision's
  parts); returns the model and a record of the settings in effect and of which pre-trained parts loaded.
- ``protocols``: ``Protocol`` and ``PROTOCOLS`` (``predet``, ``predet_r50``, ``jigsaw``, ``standard``),
  ``override_protocol`` / ``parse_settings`` to change single settings, ``param_groups`` for the optimizer.
- ``schedules``: ``SCHEDULES`` (1x .. 9x, voc, jigsaw) and ``schedule_for`` at a run's global batch.
- ``parts``: what replaces torchvision's own parts: float32 box decoding, detectron2's anchors and ROIAlignV2.
- ``predet_heads``: PreDet's pre-trained CRPN conv and CROI box head into the RPN conv and the 2fc box head.
- ``precise_bn``: ``precise_batch_norm`` (BN statistics recomputed before an evaluation, as detectron2's
  PreciseBN) and ``batch_norm_record`` (the images trained BN normalizes over, for eval.json).

finetune.py is the recipe that puts them together; every choice the papers leave open is documented where it is
made (../shared/PAPER_NOTES.md, "Fine-tuning protocols", "Schedules", "Faster R-CNN C4").
"""

from detpretrain.detection.detectors import ARCHS, C4Backbone, ProtocolTransform, build_detector
from detpretrain.detection.precise_bn import batch_norm_record, precise_batch_norm
from detpretrain.detection.predet_heads import load_predet_heads
from detpretrain.detection.protocols import (
    BOX_HEADS,
    DETECTOR_DEFAULTS,
    HEAD_NORMS,
    PROTOCOLS,
    Protocol,
    get_protocol,
    override_protocol,
    param_groups,
    parse_settings,
)
from detpretrain.detection.schedules import SCHEDULES, ResolvedSchedule, Schedule, schedule_for

__all__ = [
    "ARCHS",
    "BOX_HEADS",
    "DETECTOR_DEFAULTS",
    "HEAD_NORMS",
    "PROTOCOLS",
    "SCHEDULES",
    "C4Backbone",
    "Protocol",
    "ProtocolTransform",
    "ResolvedSchedule",
    "Schedule",
    "batch_norm_record",
    "build_detector",
    "get_protocol",
    "load_predet_heads",
    "override_protocol",
    "param_groups",
    "parse_settings",
    "precise_batch_norm",
    "schedule_for",
]
