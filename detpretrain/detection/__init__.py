"""Fine-tuning on detection: torchvision detectors on timm backbones, protocols as named presets, schedules.

- ``detectors``: ``build_detector(arch, backbone=..., num_classes=..., protocol=...)`` for Faster R-CNN FPN,
  Mask R-CNN FPN, RetinaNet (torchvision's classes) and Faster R-CNN C4 (res5 as the ROI head, from torchvision's
  parts); returns the model and a record of the settings in effect and of which pre-trained parts loaded.
- ``protocols``: ``Protocol`` and ``PROTOCOLS`` (``predet``, ``predet_r50``, ``jigsaw``, ``standard``),
  ``override_protocol`` / ``parse_settings`` to change single settings, ``param_groups`` for the optimizer.
- ``schedules``: ``SCHEDULES`` (1x .. 9x, voc, jigsaw) and ``schedule_for`` at a run's global batch.

finetune.py is the recipe that puts them together; every choice the papers leave open is documented where it is
made (../shared/PAPER_NOTES.md, "Fine-tuning protocols", "Schedules", "Faster R-CNN C4").
"""

from detpretrain.detection.detectors import ARCHS, C4Backbone, ProtocolTransform, build_detector
from detpretrain.detection.protocols import (
    BOX_HEADS,
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
    "HEAD_NORMS",
    "PROTOCOLS",
    "SCHEDULES",
    "C4Backbone",
    "Protocol",
    "ProtocolTransform",
    "ResolvedSchedule",
    "Schedule",
    "build_detector",
    "get_protocol",
    "override_protocol",
    "param_groups",
    "parse_settings",
    "schedule_for",
]
