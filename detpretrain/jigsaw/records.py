"""A detection dataset as Jigsaw's sample extraction reads it: one ``ImageRecord`` per image (§3.1's input).

Zhou et al., "Cheaper Pre-training Lunch" (``papers/montage_jigsaw.txt``) §3.1 cuts its samples out of the detection
dataset the detector is later fine-tuned on. The records come from the fine-tuning datasets of ``detpretrain.data``
(``CocoDataset``, ``VocDataset``), so pre-training and fine-tuning share one parser, one cleaning policy and one
label order.

Glossary:

    N              boxes of one image
    gt_boxes       (N, 4) float32 xyxy, pixels, inside the image
    labels         class indices: 0 = background (negative samples), 1..C = the dataset's categories
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from detpretrain.data.coco import CocoDataset
from detpretrain.data.detection import DetectionDataset, check_has_boxes
from detpretrain.data.voc import VocDataset

__all__ = [
    "BACKGROUND_LABEL",
    "DetectionRecords",
    "ImageRecord",
    "coco_image_records",
    "dataset_records",
    "voc_image_records",
]

BACKGROUND_LABEL = 0
"""Class index of negative samples; the classifier has C + 1 outputs (§3.3 says C: background is our addition)."""


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image of a detection dataset, as sample extraction sees it (COCO and VOC readers both produce these).

    Invariants (checked on creation): gt_boxes is (N, 4) float32 xyxy with 0 <= x1 <= x2 <= width and
    0 <= y1 <= y2 <= height; gt_labels is (N,) int64 >= 1; gt_crowd is (N,) bool. image_id is a non-negative int
    (it seeds the image's random stream).
    """

    image_id: int
    file_name: str
    width: int
    height: int
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_crowd: Tensor

    def __post_init__(self) -> None:
        n = self.gt_boxes.shape[0] if self.gt_boxes.ndim == 2 else -1
        if self.gt_boxes.shape != (n, 4) or self.gt_labels.shape != (n,) or self.gt_crowd.shape != (n,):
            raise ValueError(
                f"{self.file_name}: gt_boxes must be (N, 4), gt_labels and gt_crowd (N,); got "
                f"{tuple(self.gt_boxes.shape)}, {tuple(self.gt_labels.shape)}, {tuple(self.gt_crowd.shape)}"
            )
        if self.width <= 0 or self.height <= 0 or self.image_id < 0:
            raise ValueError(f"{self.file_name}: bad image size {self.width}x{self.height} or id {self.image_id}")
        limits = torch.tensor([self.width, self.height, self.width, self.height], dtype=self.gt_boxes.dtype)
        outside = (self.gt_boxes < 0).any(1) | (self.gt_boxes > limits).any(1)
        inverted = (self.gt_boxes[:, 2:] < self.gt_boxes[:, :2]).any(1)
        bad = (outside | inverted).nonzero().flatten()
        if len(bad):
            box = [round(v, 2) for v in self.gt_boxes[bad[0]].tolist()]
            raise ValueError(
                f"{self.file_name}: box {box} (xyxy) is not inside the {self.width}x{self.height} image; "
                "fix or remove that annotation"
            )
        if len(self.gt_labels) and int(self.gt_labels.min()) < 1:
            raise ValueError(f"{self.file_name}: label {int(self.gt_labels.min())} < 1; labels 1..C are categories")


class DetectionRecords(NamedTuple):
    """A dataset as records: class_names[0] is "background"; label i >= 1 is class_names[i].

    ``cleaning_report`` is the reader's count of what loading clipped, dropped or kept (the ``cleaning_report`` of
    ``detpretrain.data.detection``, keys of ``detpretrain.data.coco.CLEANING_KEYS`` for COCO); None when the reader
    gives none.
    """

    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int] | None  # the source's id of label i is category_ids[i - 1] (COCO); None for VOC
    cleaning_report: dict[str, int] | None = None


def coco_image_records(ann_file: str | Path, image_dir: str | Path) -> DetectionRecords:
    """A COCO-format instances json and its image folder as ImageRecords: ``CocoDataset`` read as records.

    One parser and one validation policy for pre-training and fine-tuning (``detpretrain.data.coco``): labels are
    1..C in the order of the sorted category ids; boxes sticking out of the image are clipped to it, boxes of
    non-positive size or with nothing inside the image are dropped, each counted in ``cleaning_report``; an unknown
    category id, a malformed file or a missing image file is a ``DatasetError`` (a ValueError) naming the file and
    what to do. Crowd annotations are kept, flagged in ``gt_crowd``: no positive sample is cut from them and
    negatives stay off them (``plan_positive_samples``, ``plan_negative_samples``).
    """
    dataset = CocoDataset(ann_file, image_dir, include_crowd=True)
    return dataset_records(dataset, category_ids=[int(c.id) for c in dataset.categories])


def voc_image_records(
    voc_root: str | Path, image_sets: str | Sequence[str | tuple[int, str]] = "2007-trainval,2012-trainval"
) -> DetectionRecords:
    """PASCAL VOC image sets of a VOCdevkit folder as ImageRecords (``--format voc``): ``VocDataset`` read as records.

    ``difficult`` objects become crowd-like records (``gt_crowd`` true): Jigsaw never cuts a positive sample from
    them, and its negatives stay off them, as they do off COCO's crowd regions. Ids follow
    ``detpretrain.data.voc.voc_image_id``.
    """
    return dataset_records(VocDataset(voc_root, image_sets, include_difficult=True), category_ids=None)


def dataset_records(dataset: DetectionDataset, *, category_ids: list[int] | None) -> DetectionRecords:
    """A fine-tuning dataset's entries as Jigsaw's records, with its labels, ``flags`` as ``gt_crowd`` (COCO's crowd,
    VOC's difficult) and its cleaning report. A dataset without a single box that is neither crowd nor difficult has
    nothing to cut a positive sample from: ``check_has_boxes`` refuses it (a ``DatasetError`` naming the file and the
    counts), before any extraction."""
    check_has_boxes(dataset, role="training")
    records = [
        ImageRecord(
            image_id=entry.image_id,
            file_name=entry.path,
            width=entry.width,
            height=entry.height,
            gt_boxes=torch.from_numpy(entry.boxes).reshape(-1, 4),
            gt_labels=torch.from_numpy(entry.labels),
            gt_crowd=torch.from_numpy(entry.flags),
        )
        for entry in dataset.entries()
    ]
    return DetectionRecords(
        records=records,
        class_names=dataset.class_names,
        category_ids=category_ids,
        cleaning_report=dict(dataset.cleaning_report),
    )
