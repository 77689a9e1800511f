"""The detection dataset contract shared by the COCO, LVIS and PASCAL VOC readers, and the pieces they share.

Every reader (``CocoDataset``, ``LvisDataset``, ``VocDataset``) is a ``DetectionDataset``:
``dataset[i] -> (image, target)`` with

    image               tv_tensors.Image, uint8, (3, H, W), RGB, the file's pixels (no EXIF rotation: annotations
                        are in the stored pixel frame, as COCO's tools and torchvision's references read them)
    target["boxes"]     tv_tensors.BoundingBoxes, XYXY, float32, (N, 4), pixels, inside the image, positive size
    target["labels"]    int64 (N,), contiguous 1..C (0 is torchvision's background)
    target["masks"]     tv_tensors.Mask, uint8 (N, H, W): only with ``with_masks=True`` (COCO and LVIS)
    target["image_id"]  int: the json's image id (COCO, LVIS); a number made from the image's name for VOC
    target["iscrowd"]   bool (N,) for COCO and LVIS; target["difficult"] bool (N,) for VOC
    target["image_name"] str, VOC only: the name in the image set, which the VOC evaluator keys on

and the attributes ``categories`` (label -> the dataset's category id and name), ``num_classes`` (C + 1, with the
background), ``label_to_category`` (what the evaluators take), ``cleaning_report`` (what loading fixed or dropped,
for the script's log) and ``describe()`` (a JSON-able record of what was loaded, for args.json / eval.json).

Validation happens once, at load time, and is cheap: the annotation file parses (a malformed file fails with the
file and the parser's position), every annotation names a listed image and a known category, every image file
exists. Fixable boxes are fixed and counted: a box that sticks out of the image but overlaps it is clipped; a box of
non-positive size or entirely outside the image is dropped. Images without annotations are kept: they are the
negatives of detection training. Pixels are decoded only in ``__getitem__``; an undecodable or truncated file fails
there, naming the file (``verify_images()`` decodes them all up front, when a run should fail early instead).

Per-image entries are kept pickled in one numpy buffer (as detectron2 does), not as a list of Python objects: a
DataLoader worker forked from the main process then shares them instead of copying every page it touches through
reference counting, which on COCO grows each worker by gigabytes.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

__all__ = [
    "Category",
    "DatasetError",
    "DetectionDataset",
    "ImageEntry",
    "clean_boxes",
    "collate_detection",
    "decode_masks",
    "load_image",
    "read_json",
    "subset_indices",
]

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file that cannot be used as it is; the message names the file and what to do."""


@dataclass(frozen=True)
class Category:
    """Contiguous ``label`` (1..C) of a dataset category: its ``id`` in the source (an int for COCO and LVIS, the
    class name for VOC, which has no ids) and its ``name``."""

    label: int
    id: int | str
    name: str


@dataclass(frozen=True)
class ImageEntry:
    """One image after validation: what ``__getitem__`` needs besides the pixels.

    ``boxes`` (N, 4) float32 xyxy, cleaned (inside the image, positive size); ``labels`` (N,) int64 1..C;
    ``flags`` (N,) bool: iscrowd (COCO, LVIS) or difficult (VOC); ``segmentations`` the json's ``segmentation`` of
    each box (only when masks were asked for); ``extra`` per-image metadata of the format (LVIS: the federated
    category lists).
    """

    image_id: int
    path: str
    name: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    flags: np.ndarray
    segmentations: tuple | None = None
    extra: dict = field(default_factory=dict)


class _SerializedList:
    """A read-only list stored as one numpy byte buffer of pickles (see the module docstring for why)."""

    def __init__(self, items: Iterable[Any]) -> None:
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(self._buffer[start : int(self._ends[index])].tobytes())


def read_json(path: str | Path, *, what: str) -> Any:
    """Parse a json file; a missing or malformed file fails with the path, the parser's position and what to do."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist; pass the path of an existing file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{what} {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "re-download it or repair it"
        ) from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"{what} {path} is not UTF-8 text ({error.reason}); is it really a json file?") from error


def load_image(path: str | Path, *, expected_size: tuple[int, int] | None = None) -> tv_tensors.Image:
    """Decode an image file into a uint8 (3, H, W) RGB tv_tensors.Image.

    ``expected_size`` is (height, width) as the annotations give it; a file of another size fails, because its boxes
    would be wrong. An undecodable or truncated file fails with the file's name.
    """
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError as error:
        raise DatasetError(f"image {path} does not exist (it was there when the dataset was loaded)") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        # PIL raises UnidentifiedImageError for non-images, OSError "image file is truncated" for cut files and
        # SyntaxError / ValueError for some broken headers.
        raise DatasetError(
            f"image {path} is unreadable or truncated ({error}): re-download it or remove it from the annotations"
        ) from error
    height, width = pixels.shape[:2]
    if expected_size is not None and (height, width) != tuple(expected_size):
        raise DatasetError(
            f"image {path} is {width}x{height} but the annotations say {expected_size[1]}x{expected_size[0]}; "
            "the file or its annotation entry is wrong: fix the entry's width/height or replace the file"
        )
    return tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))


def clean_boxes(boxes: np.ndarray, *, width: int, height: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Clip boxes to the image and classify what happened to each.

    ``boxes`` (N, 4) float64 xyxy in pixels, finite. Returns the clipped boxes and boolean masks (N,):
    ``nonpositive`` (x2 <= x1 or y2 <= y1 as given: dropped), ``outside`` (positive but with nothing inside the
    image: dropped), ``clipped`` (overlapping the image and changed by clipping: kept), ``keep``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    nonpositive = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    limits = np.array([width, height, width, height], dtype=np.float64)
    clipped_boxes = np.clip(boxes, 0.0, limits)
    empty = (clipped_boxes[:, 2] <= clipped_boxes[:, 0]) | (clipped_boxes[:, 3] <= clipped_boxes[:, 1])
    outside = ~nonpositive & empty
    clipped = ~nonpositive & ~outside & (clipped_boxes != boxes).any(axis=1)
    keep = ~nonpositive & ~outside
    return clipped_boxes, {"nonpositive": nonpositive, "outside": outside, "clipped": clipped, "keep": keep}


def decode_masks(segmentations: Sequence[Any], *, height: int, width: int) -> np.ndarray:
    """Decode COCO segmentations (polygon lists, uncompressed or compressed RLE) into (N, H, W) uint8 masks.

    Always through pycocotools: COCO and the synthetic dataset have non-crowd objects stored as RLE, which a
    polygon-only converter would get wrong.
    """
    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for k, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        masks[k] = mask_utils.decode(rle)
    return masks


def subset_indices(num_images: int, size: int, *, seed: int) -> list[int]:
    """``size`` distinct indices of ``range(num_images)``, drawn at random from ``seed``, in increasing order.

    Deterministic in (num_images, size, seed), and nested (our choice): for one seed the subset of size k is
    contained in the subset of every larger size, so PreDet §5.3's low-shot sets (1k, 5k, 10k, 35k images drawn at
    random from COCO train) differ only by the images added.
    """
    if not 1 <= size <= num_images:
        raise ValueError(f"subset size {size} must be in 1..{num_images} (the number of training images)")
    if seed < 0:
        raise ValueError(f"subset seed {seed} must be >= 0")
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(num_images, generator=generator)[:size].tolist())


def collate_detection(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Batch ``(image, target)`` pairs as torchvision's detectors take them: a list of images, a list of targets."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


class DetectionDataset(torch.utils.data.Dataset):
    """Base of the COCO, LVIS and VOC readers: the contract of the module docstring, over validated entries.

    Subclasses build the entries; this class decodes pixels and masks and builds targets.
    """

    format: str = ""
    flag_key: str = "iscrowd"  # the name of ImageEntry.flags in the target: "iscrowd" or "difficult"

    def __init__(
        self,
        entries: Sequence[ImageEntry],
        *,
        categories: Sequence[Category],
        with_masks: bool,
        cleaning_report: dict[str, int],
        source: dict[str, Any],
    ) -> None:
        if not entries:
            raise DatasetError(f"{', '.join(map(str, source.values()))} lists no images; pass a dataset with images")
        self._entries = _SerializedList(entries)
        self._image_ids = np.array([e.image_id for e in entries], dtype=np.int64)
        self.categories = tuple(categories)
        self.with_masks = with_masks
        self.cleaning_report = dict(cleaning_report)
        self.source = dict(source)
        self.subset_info: dict[str, Any] | None = None
        logger.info("loaded %d images from %s; cleaning: %s", len(self), self.source, self.cleaning_report)

    # ----------------------------------------------------------------------------------------- the contract

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        entry = self.entry(index)
        image = load_image(entry.path, expected_size=(entry.height, entry.width))
        return image, self._target(entry)

    def _target(self, entry: ImageEntry) -> dict[str, Any]:
        canvas = (entry.height, entry.width)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(entry.boxes.copy()).reshape(-1, 4), format="XYXY", canvas_size=canvas
            ),
            "labels": torch.from_numpy(entry.labels.copy()),
            "image_id": entry.image_id,
            self.flag_key: torch.from_numpy(entry.flags.copy()),
        }
        if self.with_masks:
            masks = decode_masks(entry.segmentations, height=entry.height, width=entry.width)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        return target

    # ----------------------------------------------------------------------------------------- attributes

    @property
    def num_classes(self) -> int:
        """C + 1: the categories and torchvision's background (label 0)."""
        return len(self.categories) + 1

    @property
    def class_names(self) -> list[str]:
        """``class_names[label]``, with "background" at 0."""
        return ["background"] + [c.name for c in self.categories]

    @property
    def label_to_category(self) -> dict[int, int | str]:
        """Label -> the source's category id (COCO, LVIS) or class name (VOC): the evaluators' ``label_to_category``."""
        return {c.label: c.id for c in self.categories}

    @property
    def image_ids(self) -> list[int]:
        return self._image_ids.tolist()

    def entry(self, index: int) -> ImageEntry:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images")
        return self._entries[index % len(self)]

    def entries(self) -> Iterable[ImageEntry]:
        return (self._entries[i] for i in range(len(self)))

    def image_category_ids(self) -> list[set[int | str]]:
        """Per image, the set of category ids it has annotations of (after cleaning): what repeat factors count."""
        id_of = {c.label: c.id for c in self.categories}
        return [{id_of[int(label)] for label in entry.labels} for entry in self.entries()]

    def describe(self) -> dict[str, Any]:
        """What was loaded, as plain JSON types: record it in args.json / eval.json beside the results."""
        return {
            "format": self.format,
            **self.source,
            "num_images": len(self),
            "num_classes": self.num_classes,
            "with_masks": self.with_masks,
            "cleaning_report": self.cleaning_report,
            "subset": self.subset_info,
        }

    # ----------------------------------------------------------------------------------------- operations

    def subset(self, indices: Sequence[int], *, record: dict[str, Any] | None = None) -> DetectionDataset:
        """A dataset of the images at ``indices`` (same categories and labels); ``record`` goes into
        ``subset_info`` with the image ids. ``cleaning_report`` stays the report of the whole file's load."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("a subset needs at least one image index")
        if len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= len(self):
            raise ValueError(f"subset indices must be distinct and in 0..{len(self) - 1}")
        chosen = [self._entries[i] for i in indices]
        subset = copy.copy(self)
        subset._entries = _SerializedList(chosen)
        subset._image_ids = self._image_ids[indices]
        subset.subset_info = {**(record or {}), "num_images": len(indices), "image_ids": subset.image_ids}
        return subset

    def random_subset(self, size: int, *, seed: int) -> DetectionDataset:
        """The low-shot subset of PreDet §5.3 (``--train-subset SIZE --subset-seed SEED``): ``subset_indices``."""
        indices = subset_indices(len(self), size, seed=seed)
        return self.subset(indices, record={"size": size, "seed": seed, "from_num_images": len(self)})

    def verify_images(self, *, progress: Callable[[int], None] | None = None) -> None:
        """Decode every image now and fail listing the bad files, instead of failing at the first bad sample
        mid-training. Slow on a full dataset (a decode per image): an opt-in check."""
        bad = []
        for index in range(len(self)):
            entry = self.entry(index)
            try:
                load_image(entry.path, expected_size=(entry.height, entry.width))
            except DatasetError as error:
                bad.append((entry.path, str(error)))
            if progress is not None:
                progress(index)
        if bad:
            # One line: the first failure in full (it says what to do), then the other files by name.
            others = ", ".join(path for path, _ in bad[1:6]) + (", ..." if len(bad) > 6 else "")
            also = f"; also bad: {others}" if len(bad) > 1 else ""
            raise DatasetError(f"{len(bad)} of {len(self)} images cannot be used: {bad[0][1]}{also}")
