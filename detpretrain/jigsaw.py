"""Jigsaw (Montage) pre-training mechanisms: sample extraction, Jigsaw assembly and ERF-adaptive label weights.

Zhou et al., "Cheaper Pre-training Lunch: An Efficient Paradigm for Object Detection" (``papers/montage_jigsaw.txt``).

- §3.1 sample extraction: ``ImageRecord`` and ``DetectionRecords``, ``coco_image_records`` and
  ``voc_image_records`` (read by the fine-tuning datasets of ``detpretrain.data``, so pre-training and fine-tuning
  share one parser, one cleaning policy and one label order), ``plan_positive_samples``,
  ``plan_negative_samples``, ``plan_samples``, ``extract_samples`` (every rank and worker writes shards of one
  sample directory; a kill or a bad image costs nothing), ``JigsawSamples`` (reads it back, one sample per index).
- §3.2 Jigsaw assembly: ``sample_group``, ``JigsawTemplate`` and its presets ``JIGSAW_TEMPLATES``,
  ``assemble_jigsaw``, ``sample_jigsaw``, ``normalize_jigsaw_image``.
- §3.3 ERF-adaptive dense classification: ``JigsawClassifier`` (the final FC as a 1x1 convolution),
  ``compute_erf`` (gradient ERF as in Luo et al. [17]), ``feature_region_index``, ``erf_region_shares`` and
  ``erf_label_weights`` (Eq. 2). The losses (Eq. 1 and the three strategies of Tab. 2) are in ``detpretrain.losses``.
- ``--visualize`` and Fig. 6: ``render_jigsaw``, ``render_erf``.

Where the paper is silent the reading is ours; each is marked "(our choice)" in a comment and is listed in
``PAPER_NOTES.md`` ("Jigsaw / Montage"), which also reconstructs Eq. 2 and the lost template of Fig. 4.

Glossary (names and shapes used throughout):

    N              boxes of one image
    S              samples in a sample directory (or planned for one)
    R = 4          template regions, always in the order REGION_NAMES: top_left (smaller S-sample),
                   top_right (W-sample), bottom_left (T-sample), bottom_right (larger S-sample)
    H, W           canvas (assembled image) height and width, 224 x 224 by default
    h, w           the last feature map (stride 32 before pooling: 7 x 7 on a 224 canvas)
    B              assembled images in a batch
    gt_boxes       (N, 4) float32 xyxy, pixels, inside the image
    labels         class indices: 0 = background (negative samples), 1..C = the dataset's categories
    sample boxes   (S, 4) int64 xyxy: the crop window of each sample in its source image (integer pixel edges)
    erf            (h, w, H, W) float >= 0: mean |d feature(j, k) / d input| summed over RGB
    shares         (h, w, R) float: rho_i of Eq. 2, the share of the ERF mass of position (j, k) inside region i
    label_weights  (h, w, R) float: w_i of Eq. 2; each position's weights sum to 1
    region_index   (h, w) int64 in [0, R): the region that holds the centre of each feature cell
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import box_iou

from detpretrain.data.coco import CocoDataset
from detpretrain.data.detection import DetectionDataset
from detpretrain.data.labelled_images import relative_to_common_folder
from detpretrain.data.voc import VocDataset
from detpretrain.engine import DistInfo, atomic_write
from detpretrain.sharding import (
    SINGLE_PROCESS,
    WorkerPool,
    gather_by_shard,
    progress_bar,
    rank_shards,
    run_shards,
    shard_ranges,
)

__all__ = [
    "BACKGROUND_LABEL",
    "DEFAULT_SHARD_SIZE",
    "FIT_MODES",
    "GROUPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JIGSAW_TEMPLATES",
    "MANIFEST_NAME",
    "REGION_COLORS",
    "REGION_GROUPS",
    "REGION_NAMES",
    "SAMPLE_FORMAT_VERSION",
    "SKIPPED_NAME",
    "DetectionRecords",
    "ImageRecord",
    "JigsawClassifier",
    "JigsawImage",
    "JigsawSample",
    "JigsawSamples",
    "JigsawTemplate",
    "SampleDirError",
    "SamplePlan",
    "assemble_jigsaw",
    "coco_image_records",
    "dataset_records",
    "compute_erf",
    "erf_label_weights",
    "erf_region_shares",
    "extract_samples",
    "feature_region_index",
    "get_template",
    "label_weights_from_shares",
    "normalize_jigsaw_image",
    "plan_negative_samples",
    "plan_positive_samples",
    "plan_samples",
    "render_erf",
    "render_jigsaw",
    "sample_group",
    "sample_jigsaw",
    "seeded_generator",
    "voc_image_records",
]

BACKGROUND_LABEL = 0
"""Class index of negative samples; the classifier has C + 1 outputs (§3.3 says C: background is our addition)."""

REGION_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right")
# §3.2: the smaller S-sample top-left, the W-sample top-right, the T-sample bottom-left, the larger S bottom-right.
REGION_GROUPS = ("S", "W", "T", "S")
GROUPS = ("S", "T", "W")

# §4.1 "Pre-training Augmentation": normalization after stitching (the ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FIT_MODES = ("pad_crop", "warp", "resize")


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from a tuple of non-negative ints, e.g. (seed, image_id, stream).

    numpy's SeedSequence mixes the keys, so nearby tuples give unrelated streams; the same keys always give the
    same stream, whatever process computes it (this is what makes extraction independent of the worker count).
    """
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seeded_generator needs non-negative integer keys, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


# ---------------------------------------------------------------------------------------------------------------
# §3.1 Sample extraction: per-image records
# ---------------------------------------------------------------------------------------------------------------


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
    VOC's difficult) and its cleaning report."""
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


# ---------------------------------------------------------------------------------------------------------------
# §3.1 Sample extraction: planning the crop windows (box math only, no pixels)
# ---------------------------------------------------------------------------------------------------------------


def plan_positive_samples(
    record: ImageRecord, *, generator: torch.Generator, max_enlarge: float = 2.0, min_sample_size: int = 8
) -> tuple[Tensor, Tensor, int]:
    """Positive crop windows of one image (§3.1, Fig. 2): each non-crowd ground-truth box, enlarged at random.

    Each corner moves outwards by U(0, (max_enlarge - 1) / 2) times the box width (horizontally) and height
    (vertically), so width and height grow by up to ``max_enlarge`` x (PAPER_NOTES.md: U(0, w/2) per corner for
    the paper's 2x). The window is rounded outwards to whole pixels and clipped at the image edges, so it always
    contains its box and lies inside the image. Crowd boxes never become positives. Windows with a side below
    ``min_sample_size`` pixels are dropped and counted (our choice: the paper drops nothing explicitly; 8 px).

    Returns (boxes (P, 4) int64 xyxy, gt_index (P,) int64 into the record's boxes, number dropped as too small).
    Draws exactly 4 uniforms per annotation (crowd included), so one box's draw never shifts another's.
    """
    gt = record.gt_boxes.double()
    u = torch.rand((len(gt), 4), generator=generator, dtype=torch.float64)
    size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)  # (N, 4): w, h, w, h
    outwards = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    enlarged = gt + outwards * u * (max_enlarge - 1.0) / 2.0 * size
    boxes = torch.cat([enlarged[:, :2].floor(), enlarged[:, 2:].ceil()], dim=1)
    limits = torch.tensor([record.width, record.height, record.width, record.height], dtype=torch.float64)
    boxes = torch.minimum(boxes.clamp_min(0), limits).long()
    large_enough = ((boxes[:, 2:] - boxes[:, :2]) >= min_sample_size).all(dim=1)
    keep = ~record.gt_crowd & large_enough
    num_dropped = int((~record.gt_crowd & ~large_enough).sum())
    return boxes[keep], keep.nonzero().flatten(), num_dropped


def plan_negative_samples(
    record: ImageRecord,
    *,
    num_negatives: int,
    positive_boxes: Tensor,
    size_pool: Tensor,
    generator: torch.Generator,
    min_sample_size: int = 8,
    num_tries: int = 64,
) -> Tensor:
    """Up to ``num_negatives`` background crop windows of one image (§3.1 "Negative samples").

    Candidates are random boxes whose (width, height) is drawn from ``size_pool`` ((M, 2) int64, the positives'
    sizes, so sizes and aspect ratios follow the positives' and all three groups get background: our reading,
    PAPER_NOTES.md), shrunk keeping the aspect ratio when larger than the image, placed uniformly. A candidate is
    kept only if its IoU is 0 with every positive sample of the image ("IoU(pos, neg) = 0") and with every ground
    truth box, crowd regions included (our addition: crowd regions and too-small objects are not background).
    Each negative gets ``num_tries`` candidates; the search stops at the first negative that finds none.

    Returns (K, 4) int64 xyxy with K <= num_negatives.
    """
    if len(size_pool) == 0:
        raise ValueError("plan_negative_samples needs a non-empty size_pool (the positives' sizes)")
    blockers = torch.cat([positive_boxes.double(), record.gt_boxes.double()])
    image_size = torch.tensor([record.width, record.height], dtype=torch.float64)
    placed = []
    for _ in range(num_negatives):
        wh = size_pool[torch.randint(len(size_pool), (num_tries,), generator=generator)].double()
        shrink = (image_size / wh).amin(dim=1).clamp(max=1.0)
        wh = (wh * shrink[:, None]).floor().clamp(min=1)
        wh = torch.minimum(wh, image_size)
        xy = (torch.rand((num_tries, 2), generator=generator, dtype=torch.float64) * (image_size - wh + 1)).floor()
        xy = torch.minimum(xy, image_size - wh)
        candidates = torch.cat([xy, xy + wh], dim=1)
        ok = (wh >= min_sample_size).all(dim=1)
        if len(blockers):
            ok &= (box_iou(candidates, blockers) == 0).all(dim=1)
        if not ok.any():
            break
        placed.append(candidates[ok.nonzero()[0, 0]])
    return torch.stack(placed).long() if placed else torch.zeros((0, 4), dtype=torch.int64)


class SamplePlan(NamedTuple):
    """Every sample of a dataset, as crop windows; positives of an image first, then its negatives, image by image."""

    image_index: Tensor  # (S,) int64 into the records
    boxes: Tensor  # (S, 4) int64 xyxy crop window in the source image
    labels: Tensor  # (S,) int64, BACKGROUND_LABEL for negatives
    gt_boxes: Tensor  # (S, 4) float32 xyxy ground truth of a positive, NaN for negatives
    stats: dict[str, int]


def plan_samples(
    records: Sequence[ImageRecord],
    *,
    seed: int = 0,
    max_enlarge: float = 2.0,
    positives_per_negative: float = 10.0,
    min_sample_size: int = 8,
    negative_tries: int = 64,
) -> SamplePlan:
    """Plan every positive and negative sample of a dataset (§3.1); deterministic for a seed.

    Positives of image i come from seeded_generator(seed, image_id, 0). The number of negatives is
    round(positives / positives_per_negative) over the whole dataset (the paper's 10:1 is a dataset-level count,
    PAPER_NOTES.md). They are spread evenly over images (our choice): images are visited in a random order drawn
    from seeded_generator(seed), one negative per image per pass, pass c drawing from
    seeded_generator(seed, image_id, 1 + c), until the count is reached; an image where a negative finds no free
    place is not visited again. ``stats["negative_shortfall"]`` counts negatives no image could host.

    Box math only, no pixels: 0.5 ms of CPU per image on coco128 (7.3 boxes per image, as COCO's average), so about
    a minute for COCO train2017, which every rank of a sharded extraction spends on the whole dataset.
    """
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("image_id values must be unique: they seed each image's random stream")
    positives = [
        plan_positive_samples(
            record,
            generator=seeded_generator(seed, record.image_id, 0),
            max_enlarge=max_enlarge,
            min_sample_size=min_sample_size,
        )
        for record in records
    ]
    num_positives = sum(len(boxes) for boxes, _, _ in positives)
    if num_positives == 0:
        raise ValueError("no positive samples: every box is a crowd region or smaller than min_sample_size")
    size_pool = torch.cat([boxes[:, 2:] - boxes[:, :2] for boxes, _, _ in positives])
    num_negatives = round(num_positives / positives_per_negative)

    negatives: list[list[Tensor]] = [[] for _ in records]
    exhausted = torch.zeros(len(records), dtype=torch.bool)
    order = torch.randperm(len(records), generator=seeded_generator(seed)).tolist()
    remaining, rounds = num_negatives, 0
    while remaining > 0 and not bool(exhausted.all()):
        for i in order:
            if remaining == 0:
                break
            if exhausted[i]:
                continue
            found = plan_negative_samples(
                records[i],
                num_negatives=1,
                positive_boxes=positives[i][0],
                size_pool=size_pool,
                generator=seeded_generator(seed, records[i].image_id, 1 + rounds),
                min_sample_size=min_sample_size,
                num_tries=negative_tries,
            )
            if len(found) == 0:
                exhausted[i] = True
                continue
            negatives[i].append(found)
            remaining -= 1
        rounds += 1

    image_index, boxes, labels, gt_boxes = [], [], [], []
    nan_box = torch.full((1, 4), float("nan"))
    for i, (record, (pos_boxes, gt_index, _), negs) in enumerate(zip(records, positives, negatives, strict=True)):
        neg_boxes = torch.cat(negs) if negs else torch.zeros((0, 4), dtype=torch.int64)
        image_index.append(torch.full((len(pos_boxes) + len(neg_boxes),), i, dtype=torch.int64))
        boxes += [pos_boxes, neg_boxes]
        labels += [record.gt_labels[gt_index], torch.full((len(neg_boxes),), BACKGROUND_LABEL, dtype=torch.int64)]
        gt_boxes += [record.gt_boxes[gt_index].float(), nan_box.expand(len(neg_boxes), 4)]
    stats = {
        "num_images": len(records),
        "num_gt_boxes": sum(len(r.gt_boxes) for r in records),
        "num_crowd_boxes": sum(int(r.gt_crowd.sum()) for r in records),
        "num_positives": num_positives,
        "num_negatives": num_negatives - remaining,
        "num_dropped_too_small": sum(dropped for _, _, dropped in positives),
        "negative_shortfall": remaining,
    }
    return SamplePlan(torch.cat(image_index), torch.cat(boxes), torch.cat(labels), torch.cat(gt_boxes), stats)


# ---------------------------------------------------------------------------------------------------------------
# §3.1 Sample extraction: the sample directory (written shard by shard by every rank, read by index)
# ---------------------------------------------------------------------------------------------------------------
#
# A sample directory (train_jigsaw.py: OUTPUT_DIR/samples.jigsaw/) holds
#   shard-KKKKK.jigsaw  the samples of images [K * shard_size, (K + 1) * shard_size) of the records, in plan order
#   skipped.jsonl       one JSON object per line for each image that could not be used: path, id and reason
#   manifest.json       written last, so its presence marks a finished extraction: the extraction parameters, class
#                       names, category ids, the reader's cleaning report, statistics and the table of shards
# A shard (little-endian):
#   MAGIC (8 bytes) | header length (uint64) | header (UTF-8 JSON) | index (n records of _INDEX_DTYPE) | JPEG bytes
# The header names what the shard is (its images, the extraction parameters, a digest of its part of the plan), what
# it holds (samples, JPEG bytes) and which of its images were skipped and why. Index offsets count from the first
# JPEG byte. Crops are JPEG-encoded at native resolution. Nothing in a shard depends on who wrote it or when, so a
# shard is byte-identical whatever the world size, worker count or number of relaunches.

SAMPLE_FORMAT_VERSION = 2
DEFAULT_SHARD_SIZE = 256
"""Images per shard (our choice). On COCO photos (~8 samples and ~140 kB of JPEG per image, coco128) a shard holds
~2,000 samples in ~35 MB and takes ~2 core-seconds to cut; train2017 makes 463 shards. A kill loses at most one shard
per rank, and a rank that helps others (``detpretrain.sharding``) finishes its last shard soon after them."""
MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"
_MAGIC = b"DPJIGSW\n"
_INDEX_DTYPE = np.dtype(
    [
        ("offset", "<u8"),
        ("length", "<u4"),
        ("label", "<i4"),
        ("image_index", "<u4"),  # into the records of the whole dataset
        ("box", "<i4", (4,)),
        ("gt_box", "<f4", (4,)),
    ]
)


class SampleDirError(ValueError):
    """A sample directory that cannot be used as it is: unfinished, damaged, or made from other images or settings.
    The message names the directory, what is wrong and what to do."""


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.jigsaw"


def _digest(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _records_digest(records: Sequence[ImageRecord], names: Sequence[str]) -> str:
    """What the plan and the pixels depend on: ids, names, sizes and every box, label and crowd flag, in order."""
    digest = hashlib.sha256()
    for record, name in zip(records, names, strict=True):
        digest.update(json.dumps([record.image_id, name, record.width, record.height]).encode())
        for tensor in (record.gt_boxes, record.gt_labels, record.gt_crowd):
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class _Skip(Exception):
    """An image that cannot be used; ``reason`` is the line the skip report gives (never a path: shards must be
    byte-identical on every node, wherever the dataset is mounted)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow decodes (CMYK, grayscale, palette, alpha) as 8-bit RGB. Pillow's convert("RGB") clips 16-bit
    grayscale at 255, which turns a 16-bit PNG white: integer grayscale ("I;16*", "I") is taken as 16-bit and scaled
    to 8 bits first."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _read_source_image(file_name: str, *, width: int, height: int) -> Image.Image:
    """Decode one source image to RGB at its annotated size; raise ``_Skip`` when it cannot be used."""
    try:
        if os.path.getsize(file_name) == 0:
            raise _Skip("empty file (0 bytes)")
        with Image.open(file_name) as image:
            image.load()  # Image.open reads only the header: a truncated file fails here
            rgb = _to_rgb(image)
    except FileNotFoundError:
        raise _Skip("missing: no such file") from None
    except UnidentifiedImageError:
        raise _Skip("undecodable: not an image format Pillow can identify") from None
    except OSError as error:
        # An errno means the file could not be read; otherwise Pillow's decoder failed ("image file is truncated").
        reason = f"unreadable: {error.strerror}" if error.errno else f"undecodable: {error}"
        raise _Skip(reason) from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as error:  # some plugins' malformed-header errors
        raise _Skip(f"undecodable: {type(error).__name__}: {error}") from None
    if rgb.size != (width, height):
        raise _Skip(f"size mismatch: the file is {rgb.size[0]}x{rgb.size[1]}, the annotations say {width}x{height}")
    return rgb


def _cut_samples(task: tuple[str, int, int, list[list[int]], int]) -> tuple[list[bytes] | None, str | None]:
    """Decode one source image and JPEG-encode its crops (runs in extraction workers: Pillow only, fork-safe).

    Returns (crops, None), or (None, reason) for an image that cannot be used: a bad image is skipped, never fatal.
    """
    file_name, width, height, boxes, quality = task
    try:
        rgb = _read_source_image(file_name, width=width, height=height)
    except _Skip as skip:
        return None, skip.reason
    crops = []
    for box in boxes:
        buffer = io.BytesIO()
        # Optimized Huffman tables: the same pixels in 5.5% fewer bytes, 3.5% faster to decode (coco128). Encoding
        # costs 0.25 ms more per sample, once; training at the paper's scale decodes each sample ~150 times.
        rgb.crop(tuple(box)).save(buffer, format="JPEG", quality=quality, optimize=True)
        crops.append(buffer.getvalue())
    return crops, None


def _read_shard_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the index) of a shard file; SampleDirError when it is not a whole shard of this version."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise SampleDirError(f"{path}: not a Jigsaw sample shard; extract the samples again")
            (header_length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_length))
            index_start = f.tell()
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise SampleDirError(f"{path}: the shard header is damaged; delete the file and extract again") from None
    version = header.get("format_version")
    if version != SAMPLE_FORMAT_VERSION:
        raise SampleDirError(
            f"{path}: sample format version {version}, this detpretrain reads version {SAMPLE_FORMAT_VERSION}; "
            "extract the samples again into a new directory"
        )
    expected_size = index_start + header["num_samples"] * _INDEX_DTYPE.itemsize + header["jpeg_bytes"]
    if path.stat().st_size != expected_size:
        raise SampleDirError(f"{path}: the file size does not match its header (truncated?); delete it, extract again")
    return header, index_start


def _differences(found: dict, expected: dict) -> list[str]:
    return [
        f"{key}: {found.get(key)!r} there, {value!r} now" for key, value in expected.items() if found.get(key) != value
    ]


@dataclass
class _ShardedExtraction:
    """The shards of one extraction: what each must hold (its identity), checking, computing and summarizing it."""

    directory: Path
    records: Sequence[ImageRecord]
    names: list[str]
    plan: SamplePlan
    params: dict
    pool: WorkerPool

    @property
    def shard_size(self) -> int:
        return self.params["shard_size"]

    @property
    def num_shards(self) -> int:
        return len(shard_ranges(len(self.records), self.shard_size))

    def images(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self.records)))

    def rows(self, k: int) -> slice:
        """The plan rows of shard k's images (the plan lists samples image by image)."""
        images = self.images(k)
        start, stop = np.searchsorted(self.plan.image_index.numpy(), [images.start, images.stop])
        return slice(int(start), int(stop))

    def identity(self, k: int) -> dict:
        """What shard k must be: its images, the parameters and a digest of its part of the plan (which depends on
        every image: the negatives' sizes and counts are dataset-wide)."""
        images, rows = self.images(k), self.rows(k)
        return {
            "shard": k,
            "images": [images.start, images.stop],
            "extraction": self.params,
            "image_ids": [self.records[i].image_id for i in images],
            "file_names": self.names[images.start : images.stop],
            "plan_sha256": _digest(
                self.plan.image_index[rows], self.plan.boxes[rows], self.plan.labels[rows], self.plan.gt_boxes[rows]
            ),
        }

    def is_complete(self, k: int) -> bool:
        """Shard k exists, is whole (magic, version, size) and is the shard this extraction would write."""
        path = self.directory / _shard_name(k)
        if not path.is_file():
            return False
        try:
            header, _ = _read_shard_header(path)
        except SampleDirError:
            return False  # damaged: computed again
        expected = self.identity(k)
        return {key: header.get(key) for key in expected} == expected

    def compute(self, k: int) -> None:
        """Decode shard k's images, cut and encode their samples, write the shard atomically. An image that cannot
        be used loses its samples and is named in the header's ``skipped`` list, with the reason."""
        images, rows = self.images(k), self.rows(k)
        image_index, boxes = self.plan.image_index[rows], self.plan.boxes[rows]
        counts = torch.bincount(image_index - images.start, minlength=len(images)).tolist()
        starts = np.cumsum([0, *counts]).tolist()
        owners, tasks = [], []
        for i, start, stop in zip(images, starts[:-1], starts[1:], strict=True):
            if stop > start:  # an image without planned samples is not decoded: if bad, it costs nothing
                record = self.records[i]
                owners.append(i)
                tasks.append(
                    (
                        record.file_name,
                        record.width,
                        record.height,
                        boxes[start:stop].tolist(),
                        self.params["jpeg_quality"],
                    )
                )
        results = self.pool.map(_cut_samples, tasks)
        keep = torch.ones(len(image_index), dtype=torch.bool)
        blobs: list[bytes] = []
        skipped = []
        for i, (crops, reason) in zip(owners, results, strict=True):
            if reason is not None:
                skipped.append({"image_index": i, "reason": reason})
                keep[image_index == i] = False
            else:
                blobs += crops
        labels = self.plan.labels[rows][keep]
        index = np.zeros(int(keep.sum()), dtype=_INDEX_DTYPE)
        index["length"] = [len(b) for b in blobs]
        index["offset"] = np.cumsum(index["length"], dtype=np.uint64) - index["length"]
        index["label"] = labels.numpy()
        index["image_index"] = image_index[keep].numpy()
        index["box"] = boxes[keep].numpy()
        index["gt_box"] = self.plan.gt_boxes[rows][keep].numpy()
        lost = self.plan.labels[rows][~keep]
        header = {
            "format": "detpretrain.jigsaw_samples.shard",
            "format_version": SAMPLE_FORMAT_VERSION,
            **self.identity(k),
            "num_samples": len(index),
            "jpeg_bytes": sum(len(b) for b in blobs),
            "stats": {
                "num_positives": int((labels != BACKGROUND_LABEL).sum()),
                "num_negatives": int((labels == BACKGROUND_LABEL).sum()),
                "skipped_images": len(skipped),
                "skipped_positives": int((lost != BACKGROUND_LABEL).sum()),
                "skipped_negatives": int((lost == BACKGROUND_LABEL).sum()),
            },
            "skipped": skipped,
        }
        encoded = json.dumps(header).encode()

        def write(f) -> None:
            f.write(_MAGIC + struct.pack("<Q", len(encoded)) + encoded)
            f.write(index.tobytes())
            for blob in blobs:
                f.write(blob)

        atomic_write(self.directory / _shard_name(k), write)

    def summary(self, k: int) -> dict:
        """What the manifest and the skip report need of shard k (read by ``gather_by_shard``)."""
        path = self.directory / _shard_name(k)
        header, _ = _read_shard_header(path)
        return {
            "file": path.name,
            "num_samples": header["num_samples"],
            "bytes": path.stat().st_size,
            "stats": header["stats"],
            "skipped": header["skipped"],
        }

    def check_reuse(self, *, class_names: Sequence[str], records_sha256: str) -> None:
        """Refuse a directory that holds another extraction, finished (its manifest) or not (its shards), naming
        what differs. Shards that are merely damaged are left to ``is_complete``, which has them computed again."""
        manifest_path = self.directory / MANIFEST_NAME
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        if manifest is not None:
            differences = _differences(manifest["extraction"], self.params)
            if manifest["class_names"] != list(class_names):
                differences.append("other class names")
            if manifest["num_images"] != len(self.records):
                differences.append(f"{manifest['num_images']} images there, {len(self.records)} now")
            if differences:
                raise SampleDirError(
                    f"{self.directory} holds samples extracted from other images or with other settings "
                    f"({'; '.join(differences)}); delete it, or extract into another directory"
                )
        for path in sorted(self.directory.glob("shard-*.jigsaw")):  # each names the first image that differs
            try:
                header, _ = _read_shard_header(path)
            except SampleDirError:
                continue
            differences = self._shard_differences(header)
            if differences:
                raise SampleDirError(
                    f"{path} was extracted from other images or with other settings ({'; '.join(differences)}); "
                    f"delete {self.directory}, or extract into another directory"
                )
        if manifest is not None and manifest["records_sha256"] != records_sha256:
            raise SampleDirError(
                f"{self.directory} holds samples extracted from other images or annotations; delete it, or extract "
                "into another directory"
            )

    def _shard_differences(self, header: dict) -> list[str]:
        k = header["shard"]
        if not 0 <= k < self.num_shards:
            return [f"shard {k}, but {len(self.records)} images make {self.num_shards} shards"]
        expected = self.identity(k)
        differences = _differences(header["extraction"], self.params)
        theirs, ours = header["file_names"], expected["file_names"]
        if header["image_ids"] != expected["image_ids"] or theirs != ours:
            i = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), len(ours))
            there, now = (names[i] if i < len(names) else "nothing" for names in (theirs, ours))
            differences.append(f"image {k * self.shard_size + i}: {there} there, {now} now")
        elif header["plan_sha256"] != expected["plan_sha256"]:
            differences.append("the same images with other annotations")
        return differences


def extract_samples(
    records: Sequence[ImageRecord],
    *,
    class_names: Sequence[str],
    output_dir: str | Path,
    seed: int = 0,
    max_enlarge: float = 2.0,
    positives_per_negative: float = 10.0,
    min_sample_size: int = 8,
    negative_tries: int = 64,
    jpeg_quality: int = 95,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_workers: int = 0,
    category_ids: Sequence[int] | None = None,
    cleaning_report: dict[str, int] | None = None,
    dist_info: DistInfo = SINGLE_PROCESS,
    progress: bool = False,
) -> dict[str, int]:
    """Extract the positive and negative samples of a dataset (§3.1) into a sample directory; returns the statistics.

    Every rank calls this with the same records (under torchrun; ``dist_info`` from ``engine.setup_distributed``).
    Each plans every sample itself (``plan_samples``: box math, ~0.5 ms per image on COCO, a minute for train2017;
    the 10:1 negatives need dataset-wide counts, so planning is not split). The pixel work, decoding each image and
    JPEG-encoding its crops (~7 ms per COCO image on one core), is split by shards of ``shard_size`` images with
    ``detpretrain.sharding.run_shards`` across the ranks, and within a rank over ``num_workers`` processes (0: this
    process). Shards are written atomically; a shard that already exists and is the one this extraction would
    write is kept, so a killed extraction continues where it stopped. The directory is byte-identical for any world
    size, worker count and number of relaunches.

    An image that is missing, empty, undecodable, truncated or of another size than its annotation is skipped: its
    planned samples are dropped, it is counted (``skipped_*`` in the statistics) and named with the reason in
    ``skipped.jsonl``. Modes Pillow decodes (CMYK, grayscale, palette, 16-bit) are converted to RGB and used.
    ``jpeg_quality`` 95 is our choice (crops are stored at native resolution, the paper stores "samples").
    ``category_ids`` and ``cleaning_report`` (``DetectionRecords``'s) are recorded in the manifest as they are.
    A directory holding another extraction raises ``SampleDirError`` naming what differs.
    """
    if class_names[0] != "background":
        raise ValueError(f"class_names[0] must be 'background' (label {BACKGROUND_LABEL}), got {class_names[0]!r}")
    for record in records:
        if len(record.gt_labels) and int(record.gt_labels.max()) >= len(class_names):
            raise ValueError(
                f"{record.file_name}: label {int(record.gt_labels.max())} is not a known category "
                f"(class_names has {len(class_names) - 1}); fix the annotation or the class list"
            )
    params = {
        "seed": seed,
        "max_enlarge": max_enlarge,
        "positives_per_negative": positives_per_negative,
        "min_sample_size": min_sample_size,
        "negative_tries": negative_tries,
        "jpeg_quality": jpeg_quality,
        "shard_size": shard_size,
    }
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be at least 1 image")
    plan = plan_samples(
        records,
        seed=seed,
        max_enlarge=max_enlarge,
        positives_per_negative=positives_per_negative,
        min_sample_size=min_sample_size,
        negative_tries=negative_tries,
    )
    names = relative_to_common_folder([r.file_name for r in records])
    records_sha256 = _records_digest(records, names)
    directory = Path(output_dir)
    if directory.is_file():
        raise SampleDirError(
            f"{directory} is a file (a sample file of format version 1?), not a sample directory; delete it and "
            "extract again, or extract into another directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    own = len(
        rank_shards(len(shard_ranges(len(records), shard_size)), rank=dist_info.rank, world_size=dist_info.world_size)
    )
    with (
        WorkerPool(num_workers) as pool,
        progress_bar(total=own, desc="extracting samples", unit="shard", enabled=progress) as bar,
    ):
        shards = _ShardedExtraction(
            directory=directory, records=records, names=names, plan=plan, params=params, pool=pool
        )
        shards.check_reuse(class_names=class_names, records_sha256=records_sha256)

        def compute(k: int) -> None:
            shards.compute(k)
            if bar is not None:
                bar.update()

        run_shards(
            shards.num_shards,
            is_complete=shards.is_complete,
            exists=lambda k: (directory / _shard_name(k)).is_file(),
            compute=compute,
            directory=directory,
            dist_info=dist_info,
        )
    summaries = gather_by_shard(shards.num_shards, shards.summary, dist_info=dist_info)

    skipped = ("skipped_images", "skipped_positives", "skipped_negatives")
    stats = plan.stats | {
        "num_samples": sum(s["num_samples"] for s in summaries),
        **{key: sum(s["stats"][key] for s in summaries) for key in skipped},
    }
    manifest = {
        "format": "detpretrain.jigsaw_samples",
        "format_version": SAMPLE_FORMAT_VERSION,
        "extraction": params,
        "num_images": len(records),
        "num_samples": stats["num_samples"],
        "records_sha256": records_sha256,
        "stats": stats,
        "class_names": list(class_names),
        "category_ids": list(category_ids) if category_ids is not None else None,
        "cleaning_report": dict(cleaning_report) if cleaning_report is not None else None,
        "shards": [{key: s[key] for key in ("file", "num_samples", "bytes")} for s in summaries],
    }
    if dist_info.is_main:
        # After run_shards' barrier no rank writes a shard: what a killed writer left behind can go.
        for leftover in directory.glob(".shard-*.tmp"):
            leftover.unlink(missing_ok=True)
        report = "".join(
            json.dumps({"file_name": records[i].file_name, "image_id": records[i].image_id, "reason": reason}) + "\n"
            for i, reason in ((skip["image_index"], skip["reason"]) for s in summaries for skip in s["skipped"])
        )
        _write_text_if_changed(directory / SKIPPED_NAME, report)
        _write_text_if_changed(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")  # last: the end mark
    if dist_info.distributed:
        dist.barrier()  # every rank may open the directory once the manifest is there
    return stats


def _write_text_if_changed(path: Path, text: str) -> None:
    """Atomically, and not at all when the file already holds ``text`` (a relaunch of a finished extraction)."""
    if not path.is_file() or path.read_text() != text:
        atomic_write(path, lambda f: f.write(text.encode()))


class JigsawSample(NamedTuple):
    image: Tensor  # (3, h, w) uint8; from JigsawSamples a channels-last view (strides (1, 3w, 3))
    label: int


class JigsawSamples:
    """Reads a sample directory written by ``extract_samples``: ``len(s)`` samples, ``s[i]`` decodes one JigsawSample.

    Opening checks the manifest and every shard it lists (magic, version, size) and reads their indexes: the whole
    index is held in memory (48 bytes per sample) as ``labels``, ``boxes`` (crop windows in the source images),
    ``gt_boxes``, ``image_index``, ``sizes`` and ``group_indices``; ``header`` is the manifest. Dataset-like and safe
    in DataLoader workers: each process opens a shard when it first reads from it and reads with ``os.preadv``
    (no shared file position, so forked workers may share descriptors; pickling drops them). Every shard may stay
    open, so opening raises this process's soft limit on open files to fit them, within the hard limit (``ulimit
    -Hn``). Samples are decoded by torchvision's libjpeg-turbo decoder (``decode_jpeg``), which gives Pillow's
    pixels in ~60% of Pillow's time (benchmarks/bench_jigsaw.py); torchvision 0.29 deprecates it in favour of
    TorchCodec's ``decode_jpeg``, the same call.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        manifest = self.path / MANIFEST_NAME
        if not manifest.is_file():
            raise SampleDirError(
                f"{self.path}: no {MANIFEST_NAME}, so not a finished Jigsaw sample directory; extract the samples "
                "into it (a killed extraction continues where it stopped)"
            )
        self.header = json.loads(manifest.read_text())
        version = self.header.get("format_version")
        if version != SAMPLE_FORMAT_VERSION:
            raise SampleDirError(
                f"{self.path}: sample format version {version}, this detpretrain reads version "
                f"{SAMPLE_FORMAT_VERSION}; extract the samples again into a new directory"
            )
        self._shard_files = [self.path / shard["file"] for shard in self.header["shards"]]
        indexes, blob_starts = [], []
        for path, listed in zip(self._shard_files, self.header["shards"], strict=True):
            if not path.is_file():
                raise SampleDirError(f"{path}: missing; extract the samples into {self.path} again to restore it")
            header, index_start = _read_shard_header(path)
            if header["num_samples"] != listed["num_samples"] or path.stat().st_size != listed["bytes"]:
                raise SampleDirError(f"{path} is not the shard the manifest lists; extract the samples again")
            with open(path, "rb") as f:
                f.seek(index_start)
                indexes.append(np.frombuffer(f.read(header["num_samples"] * _INDEX_DTYPE.itemsize), _INDEX_DTYPE))
            blob_starts.append(index_start + header["num_samples"] * _INDEX_DTYPE.itemsize)
        self.index = np.concatenate(indexes) if indexes else np.zeros(0, _INDEX_DTYPE)
        counts = [len(index) for index in indexes]
        # Per sample: its shard, and where its JPEG bytes start in that shard's file.
        self._shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self._start = self.index["offset"] + np.repeat(np.array(blob_starts, dtype=np.uint64), counts)
        self.class_names: list[str] = self.header["class_names"]
        self.labels = torch.from_numpy(self.index["label"].astype(np.int64))
        self.boxes = torch.from_numpy(self.index["box"].astype(np.int64))  # (S, 4) crop window in the source image
        self.gt_boxes = torch.from_numpy(self.index["gt_box"].copy())  # (S, 4), NaN for negatives
        self.image_index = torch.from_numpy(self.index["image_index"].astype(np.int64))
        self.sizes = self.boxes[:, 2:] - self.boxes[:, :2]  # (S, 2): width, height
        groups = sample_group(self.sizes[:, 0], self.sizes[:, 1])
        self.group_indices = {g: (groups == code).nonzero().flatten() for code, g in enumerate(GROUPS)}
        _allow_open_files(len(self._shard_files), path=self.path)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def encoded(self, i: int) -> Tensor:
        """Sample i as stored: its JPEG bytes, (length,) uint8."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        k = int(self._shard[i])
        if k not in self._fds:
            self._fds[k] = os.open(self._shard_files[k], os.O_RDONLY)
        data = torch.empty(int(self.index["length"][i]), dtype=torch.uint8)
        os.preadv(self._fds[k], [data.numpy()], int(self._start[i]))
        return data

    def __getitem__(self, i: int) -> JigsawSample:
        data = self.encoded(i)
        entry = self.index[i]
        try:
            # (3, h, w) as a view of (h, w, 3) pixels: torch's uint8 resize (assembly) takes this layout as it is.
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise SampleDirError(
                f"{self.path}: sample {i} does not decode ({error}); extract the samples again"
            ) from None
        width, height = (entry["box"][2:] - entry["box"][:2]).tolist()
        if tuple(image.shape) != (3, height, width):
            raise SampleDirError(
                f"{self.path}: sample {i} decodes to {tuple(image.shape)}, expected (3, {height}, {width})"
            )
        return JigsawSample(image=image, label=int(entry["label"]))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()


def _allow_open_files(num_shards: int, *, path: Path) -> None:
    """Raise the soft limit on open files (RLIMIT_NOFILE) so that every shard may stay open beside the files a
    training process has open anyway; fail with what to do when the hard limit is too low."""
    if os.name != "posix":
        return
    import resource

    needed = num_shards + 512  # headroom for the process's own files, sockets and libraries
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SampleDirError(
            f"{path} has {num_shards} shards, more than this process may keep open (ulimit -Hn {hard}); raise the "
            "limit, or extract with a larger shard size"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# ---------------------------------------------------------------------------------------------------------------
# §3.2 Jigsaw assembly
# ---------------------------------------------------------------------------------------------------------------


_TALL_BELOW, _WIDE_ABOVE = 0.5, 1.5  # §3.2: width / height below 0.5 is T, above 1.5 is W, the rest S


def sample_group(width: Tensor, height: Tensor) -> Tensor:
    """Group code per sample by aspect ratio width / height (§3.2): 0 = S in [0.5, 1.5], 1 = T < 0.5, 2 = W > 1.5.

    Codes index GROUPS = ("S", "T", "W").
    """
    ratio = width.double() / height.double()
    return torch.where(ratio < _TALL_BELOW, 1, torch.where(ratio > _WIDE_ABOVE, 2, 0))


def _group_name(width: int, height: int) -> str:
    """sample_group of one sample in plain Python (the same float64 ratio): assembly checks every input, and four
    scalar tensor round trips per image cost more than the check itself."""
    ratio = width / height
    return "T" if ratio < _TALL_BELOW else "W" if ratio > _WIDE_ABOVE else "S"


@dataclass(frozen=True)
class JigsawTemplate:
    """The Jigsaw template (Fig. 4(b)): a canvas cut by one vertical and one horizontal line into four regions.

    The paper's region sizes were printed inside Fig. 4 and are lost (PAPER_NOTES.md, "Template"); the text fixes
    only the 224 x 224 canvas and the placement. ``split_x`` is the width of the left column (top-left S and
    bottom-left T regions), ``split_y`` the height of the top row (top-left S and top-right W regions). The default,
    split at 96 (TL 96x96, TR 128 wide x 96 tall, BL 96 wide x 128 tall, BR 128x128), is our choice: borders on
    multiples of the stride 32 keep each feature cell inside one region; "split64" also fits. Regions are
    half-open pixel ranges, so they tile the canvas exactly; the W region must be at least as wide as tall and
    the T region at least as tall as wide.
    """

    canvas_height: int = 224
    canvas_width: int = 224
    split_x: int = 96
    split_y: int = 96

    def __post_init__(self) -> None:
        if not (0 < self.split_x < self.canvas_width and 0 < self.split_y < self.canvas_height):
            raise ValueError(f"{self}: the splits must lie strictly inside the canvas")
        if self.canvas_width - self.split_x < self.split_y or self.canvas_height - self.split_y < self.split_x:
            raise ValueError(
                f"{self}: the top-right (W) region must be at least as wide as tall and the bottom-left (T) region "
                "at least as tall as wide; use split_x <= canvas_width - split_y and split_y <= canvas_height - split_x"
            )

    def region_boxes(self) -> Tensor:
        """(R, 4) int64 xyxy of the regions, in REGION_NAMES order."""
        W, H, sx, sy = self.canvas_width, self.canvas_height, self.split_x, self.split_y
        return torch.tensor([[0, 0, sx, sy], [sx, 0, W, sy], [0, sy, sx, H], [sx, sy, W, H]], dtype=torch.int64)

    def region_masks(self) -> Tensor:
        """(R, H, W) bool masks M^i of Eq. 2."""
        masks = torch.zeros((4, self.canvas_height, self.canvas_width), dtype=torch.bool)
        for r, (x1, y1, x2, y2) in enumerate(self.region_boxes().tolist()):
            masks[r, y1:y2, x1:x2] = True
        return masks

    def region_area_fractions(self) -> Tensor:
        """(R,) float32: region area / canvas area (the mixing weights of the "global" label, Tab. 2)."""
        boxes = self.region_boxes().double()
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return (areas / (self.canvas_height * self.canvas_width)).float()


JIGSAW_TEMPLATES = {
    "split96": JigsawTemplate(canvas_height=224, canvas_width=224, split_x=96, split_y=96),
    "split64": JigsawTemplate(canvas_height=224, canvas_width=224, split_x=64, split_y=64),
    # Not a pre-training setting: a 96-pixel canvas (a 3x3 feature map) for CPU smoke runs and tests.
    "tiny96": JigsawTemplate(canvas_height=96, canvas_width=96, split_x=32, split_y=32),
}
"""Named templates; "split96" is the default (our choice, PAPER_NOTES.md)."""


def get_template(name: str) -> JigsawTemplate:
    """A named template from JIGSAW_TEMPLATES."""
    if name not in JIGSAW_TEMPLATES:
        raise ValueError(f"unknown Jigsaw template {name!r}; choose one of {sorted(JIGSAW_TEMPLATES)}")
    return JIGSAW_TEMPLATES[name]


class JigsawImage(NamedTuple):
    """One assembled image. Per-region fields are in REGION_NAMES order."""

    image: Tensor  # (3, H, W) uint8, zero where no sample pixel landed
    labels: Tensor  # (R,) int64: the label of the sample in each region
    content_boxes: Tensor  # (R, 4) int64 xyxy on the canvas: where sample pixels landed (the rest is padding)
    # (R, 4) int64 xyxy in the sample as given (before scaling and flipping): the window that, scaled to the content
    # box's size and then flipped if ``flipped``, fills the content box
    source_boxes: Tensor
    scales: Tensor  # (R,) float64: the drawn scale ratio of each region's sample
    flipped: Tensor  # (R,) bool
    input_index: Tensor  # (R,) int64: which input sits there (0, 1: the two squares as given, 2: tall, 3: wide)


def _fit_axis(length: int, region: int, scale: float, u: float) -> tuple[int, int, int, int]:
    """Pad & crop along one axis (§3.2): (offset in the region, window start in the sample, window length, length on
    the canvas), for a sample of ``length`` pixels scaled by ``scale`` into a region of ``region`` pixels.

    When the scaled sample fits (round(length * scale) <= region), the whole sample is scaled and zero-padded at a
    random offset. Otherwise a random crop of the scaled sample fills the region: the window of the sample that
    lands there, round(region / scale) pixels at a random start, is what gets scaled (cropping first resizes a
    fraction of a large sample instead of all of it). The placed length then differs from window * scale by at most
    0.5 * max(1, scale) pixels, as the rounded side of a padded sample does by 0.5: a relative scale error under
    0.8% for regions of 96 pixels or more (under 2.4% for the 32-pixel regions of tiny96).
    """
    scaled = max(1, round(length * scale))
    if scaled <= region:
        return min(int(u * (region - scaled + 1)), region - scaled), 0, length, scaled
    window = min(length, max(1, round(region / scale)))
    return 0, min(int(u * (length - window + 1)), length - window), window, region


def assemble_jigsaw(
    *,
    squares: tuple[JigsawSample, JigsawSample],
    tall: JigsawSample,
    wide: JigsawSample,
    template: JigsawTemplate,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.8, 1.5),
    flip_prob: float = 0.5,
    fit: str = "pad_crop",
) -> JigsawImage:
    """Stitch 2 S-samples, 1 T-sample and 1 W-sample into one canvas (§3.2, Fig. 4; augmentation of §4.1).

    Per sample: scale by a ratio r ~ U(scale_range) keeping the aspect ratio (both sides times r, rounded), flip
    horizontally with probability ``flip_prob``. The S-sample with the smaller area after scaling goes top-left,
    the other bottom-right (ties: the first given); T bottom-left, W top-right. Then each sample is fitted to its
    region per ``fit``:

    - "pad_crop" (the paper's method): per axis, zero-pad at a random offset when smaller than the region, crop at
      a random offset when larger; never warped or resized to fit. Only the cropped window is scaled
      (``_fit_axis`` bounds what that rounding changes).
    - "warp" (Tab. 1 ablation): scale each axis to the region (the drawn ratio is then irrelevant).
    - "resize" (Tab. 1 ablation): scale keeping the aspect ratio to fit inside the region, then pad as above.

    Scaling is torch's antialiased bilinear resize of the uint8 pixels. Randomness comes only from ``generator``:
    16 uniforms per call (scale, flip, x offset, y offset per input). Returns the uint8 canvas; normalize with
    ``normalize_jigsaw_image`` after stitching (so padding becomes -mean/std, as in §4.1).
    """
    if fit not in FIT_MODES:
        raise ValueError(f"unknown fit {fit!r}; choose one of {FIT_MODES}")
    inputs = [squares[0], squares[1], tall, wide]
    expected = ("S", "S", "T", "W")
    for k, (sample, group) in enumerate(zip(inputs, expected, strict=True)):
        if sample.image.dtype != torch.uint8 or sample.image.ndim != 3 or sample.image.shape[0] != 3:
            raise ValueError(
                f"input {k}: expected a (3, h, w) uint8 image, got {sample.image.dtype} {tuple(sample.image.shape)}"
            )
        h, w = sample.image.shape[1:]
        actual = _group_name(w, h)
        if actual != group:
            raise ValueError(f"input {k} ({w}x{h}, width/height {w / h:.2f}) is group {actual}, expected {group}")
    draws = torch.rand((4, 4), generator=generator, dtype=torch.float64)
    low, high = scale_range
    scales = (low + (high - low) * draws[:, 0]).tolist()
    flipped = (draws[:, 1] < flip_prob).tolist()
    offsets = draws[:, 2:].tolist()
    scaled = [
        (max(1, round(s.image.shape[1] * r)), max(1, round(s.image.shape[2] * r)))
        for s, r in zip(inputs, scales, strict=True)
    ]
    smaller_first = scaled[0][0] * scaled[0][1] <= scaled[1][0] * scaled[1][1]
    input_index = [0 if smaller_first else 1, 3, 2, 1 if smaller_first else 0]  # TL, TR (W), BL (T), BR

    canvas = torch.zeros((3, template.canvas_height, template.canvas_width), dtype=torch.uint8)
    content_boxes, source_boxes = [], []
    for (x1, y1, x2, y2), k in zip(template.region_boxes().tolist(), input_index, strict=True):
        region_h, region_w = y2 - y1, x2 - x1
        image = inputs[k].image
        h, w = image.shape[1:]
        if fit == "pad_crop":
            scale_y = scale_x = scales[k]
        elif fit == "warp":
            scale_y, scale_x = region_h / h, region_w / w
        else:
            scale_y = scale_x = min(region_h / h, region_w / w)
        dx, sx, window_w, placed_w = _fit_axis(w, region_w, scale_x, offsets[k][0])
        dy, sy, window_h, placed_h = _fit_axis(h, region_h, scale_y, offsets[k][1])
        window = image[:, sy : sy + window_h, sx : sx + window_w]
        if (placed_h, placed_w) != (window_h, window_w):
            window = TF.resize(window, [placed_h, placed_w], antialias=True)
        if flipped[k]:
            window = window.flip(-1)
        canvas[:, y1 + dy : y1 + dy + placed_h, x1 + dx : x1 + dx + placed_w] = window
        content_boxes.append([x1 + dx, y1 + dy, x1 + dx + placed_w, y1 + dy + placed_h])
        source_boxes.append([sx, sy, sx + window_w, sy + window_h])
    return JigsawImage(
        image=canvas,
        labels=torch.tensor([inputs[k].label for k in input_index], dtype=torch.int64),
        content_boxes=torch.tensor(content_boxes, dtype=torch.int64),
        source_boxes=torch.tensor(source_boxes, dtype=torch.int64),
        scales=torch.tensor([scales[k] for k in input_index], dtype=torch.float64),
        flipped=torch.tensor([flipped[k] for k in input_index]),
        input_index=torch.tensor(input_index),
    )


def sample_jigsaw(
    samples: JigsawSamples,
    *,
    template: JigsawTemplate,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.8, 1.5),
    flip_prob: float = 0.5,
    fit: str = "pad_crop",
) -> tuple[JigsawImage, Tensor]:
    """Draw 2 S-, 1 T- and 1 W-sample (with replacement within each group: T and W are rarer) and assemble them.

    Returns the JigsawImage and the (R,) sample indices in region order. The training engine passes a generator
    seeded per (seed, step, index), which makes every assembled image reproducible on resume.
    """
    for g in GROUPS:
        if len(samples.group_indices[g]) == 0:
            raise ValueError(
                f"{samples.path}: no group-{g} samples; Jigsaw assembly needs S, T and W samples (§3.2): "
                "extract from more images"
            )
    picks = [
        samples.group_indices[g][torch.randint(len(samples.group_indices[g]), (1,), generator=generator)]
        for g in ("S", "S", "T", "W")
    ]
    indices = torch.cat(picks)
    loaded = [samples[int(i)] for i in indices]
    jigsaw = assemble_jigsaw(
        squares=(loaded[0], loaded[1]),
        tall=loaded[2],
        wide=loaded[3],
        template=template,
        generator=generator,
        scale_range=scale_range,
        flip_prob=flip_prob,
        fit=fit,
    )
    return jigsaw, indices[jigsaw.input_index]


def normalize_jigsaw_image(images: Tensor) -> Tensor:
    """(..., 3, H, W) uint8 -> float32 normalized with the ImageNet mean/std (§4.1, after stitching)."""
    if images.dtype != torch.uint8 or images.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# ---------------------------------------------------------------------------------------------------------------
# §3.3 ERF-adaptive dense classification: the classifier, the ERF, the weights of Eq. 2
# ---------------------------------------------------------------------------------------------------------------


class JigsawClassifier(nn.Module):
    """A backbone with its final FC replaced by a 1x1 convolution on the last feature map (§3.3, Fig. 5).

    ``backbone`` is a timm model (create it with ``num_classes=0, global_pool=""``): ``forward_features`` gives
    the stride-32 map before pooling and ``num_features`` its channels. ``forward`` returns dense logits
    (B, num_classes, h, w) with num_classes = categories + 1 (background). The 1x1 convolution is linear, so the
    mean of its logits over any set of cells equals the FC applied to the mean feature there: the "global" and
    "block-wise" strategies of Tab. 2 are pooled dense logits (see detpretrain.losses).
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int) -> None:
        super().__init__()
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError("backbone needs an int num_features and forward_features (a timm model)")
        self.backbone = backbone
        self.classifier = nn.Conv2d(num_features, num_classes, kernel_size=1)

    def forward_features(self, images: Tensor) -> Tensor:
        features = self.backbone.forward_features(images)
        if features.ndim != 4:
            raise ValueError(f"forward_features must return (B, C, h, w), got {tuple(features.shape)}")
        return features

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.forward_features(images))


@torch.enable_grad()
def compute_erf(model: nn.Module, images: Tensor, *, chunk_size: int = 32) -> Tensor:
    """Gradient-based effective receptive field of every position of the last feature map (Luo et al. [17]).

    For position (j, k): the gradient at (j, k) of the feature map (``model.forward_features`` if the model has
    it, else ``model(x)``; (B, C, h, w), before pooling) is set to 1 on every channel and 0 elsewhere, propagated
    to the input, |gradient| summed over RGB, then averaged over ``images`` (B, 3, H, W), a fixed batch of
    assembled, normalized images (PAPER_NOTES.md). Setting all channels at (j, k) to 1 is our reading of
    "the output gradient" for a multi-channel map. The model runs in eval mode (BN with running statistics:
    batch statistics would pass gradient between images) and its train/eval state is restored afterwards; no
    parameter gradient is touched.

    Each (image, position) pair needs its own backward; pairs are processed ``chunk_size`` at a time as one batch
    (exact, as eval-mode samples do not interact). Returns (h, w, H, W) float32 on the images' device.
    """
    feature_fn = model.forward_features if hasattr(model, "forward_features") else model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = feature_fn(images[:1])
        if probe.ndim != 4:
            raise ValueError(f"the model's feature map must be (B, C, h, w), got {tuple(probe.shape)}")
        num_images, _, height, width = images.shape
        fh, fw = probe.shape[2:]
        erf = torch.zeros((fh * fw, height, width), dtype=torch.float32, device=images.device)
        pairs = torch.arange(fh * fw * num_images, device=images.device)
        for chunk in pairs.split(chunk_size):
            image_id, position = chunk % num_images, chunk // num_images
            x = images[image_id].detach().clone().requires_grad_(True)
            features = feature_fn(x)
            grad_output = torch.zeros_like(features)
            grad_output[torch.arange(len(chunk)), :, position // fw, position % fw] = 1.0
            (grad_input,) = torch.autograd.grad(features, x, grad_output)
            erf.index_add_(0, position, grad_input.abs().sum(dim=1).float())
    finally:
        model.train(was_training)
    return (erf / num_images).view(fh, fw, height, width)


def feature_region_index(template: JigsawTemplate, *, feature_height: int, feature_width: int) -> Tensor:
    """(h, w) int64: the region holding each feature cell's centre (PAPER_NOTES.md, "Dense loss").

    Cell (j, k) covers canvas rows [j H/h, (j+1) H/h) and columns likewise; its centre decides. Every region must
    hold at least one cell centre, else the template is too fine for the feature stride.
    """
    cy = (torch.arange(feature_height, dtype=torch.float64) + 0.5) * template.canvas_height / feature_height
    cx = (torch.arange(feature_width, dtype=torch.float64) + 0.5) * template.canvas_width / feature_width
    index = 2 * (cy >= template.split_y).long()[:, None] + (cx >= template.split_x).long()[None, :]
    counts = torch.bincount(index.flatten(), minlength=4)
    if (counts == 0).any():
        empty = [REGION_NAMES[r] for r in (counts == 0).nonzero().flatten().tolist()]
        raise ValueError(
            f"{template}: region(s) {empty} hold no centre of a {feature_height}x{feature_width} feature cell; "
            "put the splits on multiples of the feature stride"
        )
    return index


def erf_region_shares(erf: Tensor, *, template: JigsawTemplate) -> Tensor:
    """(h, w, R): rho_i = sum(G * M^i) / sum(G) for every feature position (Eq. 2's ratios).

    A position with an all-zero ERF (a dead unit) gets its own region's share 1 (our guard: Eq. 2 is 0/0 there).
    """
    fh, fw, height, width = erf.shape
    if (height, width) != (template.canvas_height, template.canvas_width):
        raise ValueError(
            f"ERF is over a {height}x{width} input but the template canvas is "
            f"{template.canvas_height}x{template.canvas_width}"
        )
    masks = template.region_masks().to(device=erf.device, dtype=erf.dtype)
    mass = torch.einsum("jkyx,ryx->jkr", erf, masks)
    total = mass.sum(dim=-1, keepdim=True)
    own = nn.functional.one_hot(
        feature_region_index(template, feature_height=fh, feature_width=fw).to(erf.device), 4
    ).to(erf.dtype)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(erf.dtype).tiny), own)


def label_weights_from_shares(shares: Tensor, *, region_index: Tensor, erf_threshold: float = 0.7) -> Tensor:
    """Eq. 2 (PAPER_NOTES.md reconstruction): the label weights w_i of each position from its ERF shares rho_i.

    For a position in region r: w_r = max(tau, rho_r); for i != r: w_i = (1 - w_r) rho_i / sum_{i' != r} rho_i'
    (the denominator is Eq. 2's sum G (1 - M^r) / sum G). When rho_r >= tau this gives w = rho; tau = 1 gives the
    one-hot label of the region. When rho_r = 1 the others are 0/0 and are set to 0 (w_r = 1).
    ``erf_threshold`` is tau, 0.7 in the paper (§4.1).
    """
    if not 0.0 <= erf_threshold <= 1.0:
        raise ValueError(f"erf_threshold must be in [0, 1], got {erf_threshold}")
    if shares.shape[:2] != region_index.shape or shares.shape[-1] != 4:
        raise ValueError(
            f"shares {tuple(shares.shape)} must be (h, w, 4) over region_index {tuple(region_index.shape)}"
        )
    own = nn.functional.one_hot(region_index.to(shares.device), 4).to(dtype=torch.bool)
    rho_own = (shares * own).sum(dim=-1, keepdim=True)
    w_own = rho_own.clamp_min(erf_threshold)
    others = shares * ~own
    others_total = others.sum(dim=-1, keepdim=True)
    w_others = torch.where(others_total > 0, (1 - w_own) * others / others_total.clamp_min(1e-30), 0.0)
    return torch.where(own, torch.where(others_total > 0, w_own, 1.0), w_others)


def erf_label_weights(erf: Tensor, *, template: JigsawTemplate, erf_threshold: float = 0.7) -> Tensor:
    """(h, w, R) label weights of Eq. 2 from an ERF table (compute_erf): one table for every image (§3.3)."""
    fh, fw = erf.shape[:2]
    region_index = feature_region_index(template, feature_height=fh, feature_width=fw).to(erf.device)
    return label_weights_from_shares(
        erf_region_shares(erf, template=template), region_index=region_index, erf_threshold=erf_threshold
    )


# ---------------------------------------------------------------------------------------------------------------
# Visualization: --visualize and Fig. 6
# ---------------------------------------------------------------------------------------------------------------

REGION_COLORS = ((46, 204, 64), (255, 65, 54), (0, 116, 217), (255, 220, 0))  # TL green (R1 as in Fig. 5), TR, BL, BR


def render_jigsaw(
    image: Tensor,
    labels: Tensor,
    *,
    template: JigsawTemplate,
    class_names: Sequence[str],
    content_boxes: Tensor | None = None,
    scale: int = 2,
) -> Image.Image:
    """An assembled uint8 image (3, H, W) as a PIL image, enlarged ``scale`` x, with each region outlined in its
    colour (REGION_COLORS), its label written in its top-left corner and, if given, the sample extent in white."""
    if image.dtype != torch.uint8 or tuple(image.shape) != (3, template.canvas_height, template.canvas_width):
        raise ValueError(
            f"expected the (3, {template.canvas_height}, {template.canvas_width}) uint8 canvas, got "
            f"{image.dtype} {tuple(image.shape)}"
        )
    picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
        (template.canvas_width * scale, template.canvas_height * scale), Image.NEAREST
    )
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    if content_boxes is not None:
        for box in content_boxes.tolist():
            draw.rectangle([v * scale for v in box[:2]] + [v * scale - 1 for v in box[2:]], outline=(255, 255, 255))
    for r, box in enumerate(template.region_boxes().tolist()):
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=REGION_COLORS[r], width=2)
        text = class_names[int(labels[r])]
        left, top, right, bottom = draw.textbbox((x1 + 4, y1 + 4), text, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=(0, 0, 0))
        draw.text((x1 + 4, y1 + 4), text, fill=REGION_COLORS[r], font=font)
    return picture


def render_erf(erf_map: Tensor, *, image: Tensor | None = None, alpha: float = 0.6) -> Image.Image:
    """An ERF (H, W) of one position as a heat map (black -> red -> yellow -> white, scaled to its maximum), as in
    Fig. 6; blended over the uint8 canvas (3, H, W) with weight ``alpha`` when ``image`` is given."""
    if erf_map.ndim != 2:
        raise ValueError(f"expected one position's ERF (H, W), got {tuple(erf_map.shape)}")
    value = erf_map.detach().float().cpu()
    value = value / value.max().clamp_min(torch.finfo(torch.float32).tiny)
    heat = torch.stack([(3 * value).clamp(0, 1), (3 * value - 1).clamp(0, 1), (3 * value - 2).clamp(0, 1)])
    if image is not None:
        if tuple(image.shape) != (3, *erf_map.shape) or image.dtype != torch.uint8:
            raise ValueError(f"image must be (3, {erf_map.shape[0]}, {erf_map.shape[1]}) uint8")
        heat = alpha * heat + (1 - alpha) * image.float().cpu() / 255.0
    return Image.fromarray((heat * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
