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
exists, and no image id is listed twice. Fixable boxes are fixed and counted: a box that sticks out of the image but
overlaps it is clipped; a box of non-positive size or entirely outside the image is dropped. Images without
annotations are kept by the readers (an evaluation set needs them); ``drop_images_without_annotations()`` leaves them
out of a training set, as detectron2 (DATALOADER.FILTER_EMPTY_ANNOTATIONS, on by default: images without a non-crowd
annotation) and torchvision's references (``_coco_remove_images_without_annotations``) both do.
``check_has_boxes()`` refuses a set left with no box to train on or to score against, with the counts that led there.

Pixels are decoded only in ``__getitem__``. An undecodable, truncated, empty or vanished file, or one of another size
than its annotation says, raises ``BadImageError`` (an ``engine.BadSampleError``) naming the file: in training,
``engine.StepSeededDataset`` replaces such an image and the run reports it (``engine.BadSampleTracker``), up to
``--max-bad-image-fraction`` of the dataset; ``verify_images()`` decodes them all up front, when a run should fail
early instead.

Batches grouped by aspect ratio. Both references fill each batch with images of one orientation, so that padding
to the largest image of the batch wastes little: detectron2's ``AspectRatioGroupedDataset`` with two groups
(width > height, and the rest), torchvision's ``GroupedBatchSampler`` with eight aspect-ratio bins. PreDet
fine-tuned in detectron2: ``GroupedBatchSampler`` here takes its two groups (``aspect_ratio_groups``). Each group
keeps the images of the ungrouped epoch stream in order, and a batch is complete when its group has gathered enough
images, carried over epoch ends, as detectron2's buckets fill. The unit is the global batch of a step, not one
process's batch as in detectron2: every image of a step shares a group, so the order stays a pure function of
(seed, step) whatever the number of processes and micro-steps (``detpretrain.engine``, rule 2), and every
process's batch is grouped. The group is read from the stored image size: the training crop (at most 10% per side)
can turn a nearly square image to the other orientation.

Per-image entries are kept pickled in one numpy buffer (as detectron2 does), not as a list of Python objects: a
DataLoader worker forked from the main process then shares them instead of copying every page it touches through
reference counting, which on COCO grows each worker by gigabytes.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from detpretrain.engine import BadSampleError, InputError, SampleKey, StepBatchSampler

__all__ = [
    "ASPECT_RATIO_GROUPS",
    "BadImageError",
    "Category",
    "DatasetError",
    "DetectionDataset",
    "GroupedBatchSampler",
    "ImageEntry",
    "box_counts",
    "check_has_boxes",
    "clean_boxes",
    "collate_detection",
    "decode_masks",
    "load_image",
    "read_json",
    "stream_generator",
    "subset_indices",
    "uniform_epoch_order",
]

logger = logging.getLogger(__name__)

# detectron2's AspectRatioGroupedDataset: bucket 0 for width > height, bucket 1 for the others.
ASPECT_RATIO_GROUPS = ("width > height", "width <= height")
# Domain tag of the uniform epoch permutations (lvis.py has its own for the repeat-factor stream).
_UNIFORM_STREAM = 0x47525031


class DatasetError(InputError, ValueError):
    """A dataset file that cannot be used as it is; the message names the file and what to do."""


class BadImageError(DatasetError, BadSampleError):
    """One image file that cannot be used (``load_image``); training skips it (``engine.StepSeededDataset``)."""


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
    would be wrong. A missing, empty, undecodable or truncated file fails too: each raises ``BadImageError`` with the
    file's name and a short reason.
    """
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError as error:
        raise BadImageError(
            f"image {path} does not exist (it was there when the dataset was loaded)",
            name=str(path),
            reason="missing: the file is gone",
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL raises UnidentifiedImageError for non-images and empty files, OSError "image file is truncated" for cut
        # files and SyntaxError / ValueError for some broken headers.
        empty = Path(path).is_file() and Path(path).stat().st_size == 0
        reason = "empty file (0 bytes)" if empty else f"undecodable: {error}"
        raise BadImageError(
            f"image {path} is unreadable or truncated ({reason}): re-download it or remove it from the annotations",
            name=str(path),
            reason=reason,
        ) from error
    height, width = pixels.shape[:2]
    if expected_size is not None and (height, width) != tuple(expected_size):
        raise BadImageError(
            f"image {path} is {width}x{height} but the annotations say {expected_size[1]}x{expected_size[0]}; "
            "the file or its annotation entry is wrong: fix the entry's width/height or replace the file",
            name=str(path),
            reason=f"size mismatch: the file is {width}x{height}, the annotations say "
            f"{expected_size[1]}x{expected_size[0]}",
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
        self._sizes = np.array([(e.width, e.height) for e in entries], dtype=np.int64)  # (N, 2)
        self._num_boxes = np.array([len(e.boxes) for e in entries], dtype=np.int64)
        self._num_flagged = np.array([int(np.count_nonzero(e.flags)) for e in entries], dtype=np.int64)
        self.images_without_annotations_dropped = 0
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

    def aspect_ratio_groups(self) -> np.ndarray:
        """(N,) int64: 0 where the image is wider than tall, 1 otherwise (``ASPECT_RATIO_GROUPS``, detectron2's)."""
        return np.where(self._sizes[:, 0] > self._sizes[:, 1], 0, 1)

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
            "images_without_annotations": {
                "kept": int((self._num_boxes == 0).sum()),
                "dropped": self.images_without_annotations_dropped,
            },
            "subset": self.subset_info,
        }

    # ----------------------------------------------------------------------------------------- operations

    def subset(self, indices: Sequence[int], *, record: dict[str, Any] | None = None) -> DetectionDataset:
        """A dataset of the images at ``indices`` (same categories and labels); ``record`` goes into
        ``subset_info`` with the image ids. ``cleaning_report`` stays the report of the whole file's load."""
        subset = self._select(indices)
        subset.subset_info = {**(record or {}), "num_images": len(subset), "image_ids": subset.image_ids}
        return subset

    def _select(self, indices: Sequence[int]) -> DetectionDataset:
        """A copy holding the images at ``indices`` (distinct, in range), every per-image array with them."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("a subset needs at least one image index")
        if len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= len(self):
            raise ValueError(f"subset indices must be distinct and in 0..{len(self) - 1}")
        selected = copy.copy(self)
        selected._entries = _SerializedList(self._entries[i] for i in indices)
        selected._image_ids = self._image_ids[indices]
        selected._sizes = self._sizes[indices]
        selected._num_boxes = self._num_boxes[indices]
        selected._num_flagged = self._num_flagged[indices]
        return selected

    def drop_images_without_annotations(self) -> DetectionDataset:
        """The training set without the images that have no box left after loading (crowd regions, which training
        leaves out, count as none): detectron2's FILTER_EMPTY_ANNOTATIONS and torchvision's references. Counted in
        ``describe()["images_without_annotations"]["dropped"]``; a dataset with none to drop is returned as is."""
        keep = np.flatnonzero(self._num_boxes > 0)
        if len(keep) == len(self):
            return self
        if len(keep) == 0:
            check_has_boxes(self, role="training")  # raises, with the counts that led there
        filtered = self._select(keep)
        filtered.images_without_annotations_dropped = self.images_without_annotations_dropped + len(self) - len(keep)
        return filtered

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


def box_counts(dataset: DetectionDataset) -> dict[str, int]:
    """What became of ``dataset``'s annotations, from its ``cleaning_report`` and entries: ``usable`` boxes (kept, not
    flagged), ``flagged`` (kept as crowd or difficult: ignore regions), ``excluded`` (crowd or difficult left out at
    load, the report's ``*_excluded``), ``dropped`` (by cleaning, the report's ``dropped_*``), ``images``,
    ``images_without_boxes`` and ``images_dropped`` (``drop_images_without_annotations``)."""
    report = dataset.cleaning_report
    flagged = int(dataset._num_flagged.sum())
    return {
        "images": len(dataset),
        "annotations": int(report.get("annotations", int(dataset._num_boxes.sum()))),
        "usable": int(dataset._num_boxes.sum()) - flagged,
        "flagged": flagged,
        "excluded": sum(int(v) for k, v in report.items() if k.endswith("_excluded")),
        "dropped": sum(int(v) for k, v in report.items() if k.startswith("dropped_")),
        "images_without_boxes": int((dataset._num_boxes == dataset._num_flagged).sum()),
        "images_dropped": dataset.images_without_annotations_dropped,
    }


def check_has_boxes(dataset: DetectionDataset, *, role: str = "training") -> None:
    """Refuse, before any training, a ``role`` ("training" or "evaluation") set with no usable box after cleaning
    (every box a crowd region or difficult, dropped by cleaning, or no annotation at all): a training set would train
    on nothing, an evaluation set would score nothing. One line naming the files and the counts that led there."""
    if role not in ("training", "evaluation"):
        raise ValueError(f"role {role!r} is not 'training' or 'evaluation'")
    counts = box_counts(dataset)
    if counts["usable"] > 0:
        return
    kind = "crowd" if dataset.flag_key == "iscrowd" else dataset.flag_key
    dropped = {k: int(v) for k, v in dataset.cleaning_report.items() if k.startswith("dropped_") and v}
    what = "no box to train on" if role == "training" else "no ground-truth box to score against"
    raise DatasetError(
        f"{', '.join(map(str, dataset.source.values()))} ({role} set) has {what} after cleaning: "
        f"{counts['annotations']} annotations on {counts['images'] + counts['images_dropped']} images, of which "
        f"{counts['excluded'] + counts['flagged']} {kind}, {counts['dropped']} dropped {json.dumps(dropped)}; "
        f"{counts['images_without_boxes'] + counts['images_dropped']} images without a usable box; pass annotations "
        f"with {'non-' + kind + ' ' if counts['excluded'] + counts['flagged'] else ''}boxes"
    )


# --------------------------------------------------------------------------------------- grouped batch order


def stream_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from non-negative ``keys`` (a domain tag, the seed, the epoch) through numpy's
    SeedSequence, so that neighbouring keys give unrelated streams."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def uniform_epoch_order(num_images: int, *, seed: int, epoch: int) -> torch.Tensor:
    """Every dataset index once, in a seeded random order: epoch ``epoch`` of the uniform stream; int64 (N,)."""
    if num_images < 1 or seed < 0 or epoch < 0:
        raise ValueError(f"need num_images >= 1, seed >= 0, epoch >= 0; got {num_images}, {seed}, {epoch}")
    return torch.randperm(num_images, generator=stream_generator(_UNIFORM_STREAM, seed, epoch))


class GroupedBatchSampler(StepBatchSampler):
    """``engine.StepBatchSampler`` whose global batches each hold images of one group (module docstring).

    ``epoch_order(epoch=e)`` gives epoch e of the ungrouped stream (``uniform_epoch_order`` or the repeat-factor
    stream of ``detpretrain.data.lvis``), ``groups[i]`` the group of dataset index i (``aspect_ratio_groups``).
    Group g's stream is the concatenation over epochs of the epoch orders' indices of group g; its k-th global
    batch is positions [k*G, (k+1)*G) of it (G = batch_size * world_size * accum_steps), complete where the stream
    reaches position (k+1)*G - 1. Global batches follow in the order they complete, whichever their group. Step s
    takes the s-th; rank r and micro-step m take the same slice of it as ``StepBatchSampler``. Everything is a pure
    function of (epoch_order, groups, G, s): any step can start without replaying the earlier ones.
    """

    def __init__(
        self,
        *,
        epoch_order: Callable[..., torch.Tensor],
        groups: np.ndarray | Sequence[int],
        batch_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
    ) -> None:
        groups = np.asarray(groups, dtype=np.int64)
        if groups.ndim != 1 or len(groups) == 0 or groups.min() < 0:
            raise ValueError(f"groups must be a non-empty 1-D array of group ids >= 0, got shape {groups.shape}")
        super().__init__(
            dataset_size=len(groups),
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            total_steps=total_steps,
            rank=rank,
            world_size=world_size,
            accum_steps=accum_steps,
        )
        self.epoch_order, self.groups = epoch_order, groups
        self.num_groups = int(groups.max()) + 1
        self.global_batch_size = batch_size * world_size * accum_steps
        self._totals: list[np.ndarray] = []  # per epoch e: images of each group in epochs 0..e, (num_groups,)
        self._batch_totals: list[int] = []  # per epoch e: global batches complete by the end of epoch e
        self._cache: dict[int, tuple[list[np.ndarray], list[tuple[int, int]]]] = {}

    def _epoch(self, epoch: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """(the epoch's indices of each group in stream order, the (group, k) of the batches completing in it in
        the order they complete)."""
        if epoch not in self._cache:
            order = np.asarray(self.epoch_order(epoch=epoch), dtype=np.int64)
            groups = self.groups[order]
            before = self._total(epoch - 1)
            members, completions = [], []
            for g in range(self.num_groups):
                positions = np.flatnonzero(groups == g)
                members.append(order[positions])
                first, end = before[g] // self.global_batch_size, (before[g] + len(positions)) // self.global_batch_size
                for k in range(first, end):  # batch k of group g ends at group position (k + 1) * G - 1
                    completions.append((int(positions[(k + 1) * self.global_batch_size - 1 - before[g]]), g, k))
            if len(self._cache) >= 4:  # a batch reaches back one epoch or two: keep the last few
                del self._cache[min(self._cache)]
            self._cache[epoch] = (members, [(g, k) for _, g, k in sorted(completions)])
        return self._cache[epoch]

    def _total(self, epoch: int) -> np.ndarray:
        """Images of each group in epochs 0..``epoch`` (zeros for epoch -1)."""
        if epoch < 0:
            return np.zeros(self.num_groups, dtype=np.int64)
        while len(self._totals) <= epoch:
            order = np.asarray(self.epoch_order(epoch=len(self._totals)), dtype=np.int64)
            counts = np.bincount(self.groups[order], minlength=self.num_groups)
            self._totals.append(self._total(len(self._totals) - 1) + counts)
            self._batch_totals.append(int((self._totals[-1] // self.global_batch_size).sum()))
        return self._totals[epoch]

    def global_batch_indices(self, step: int) -> list[int]:
        """Dataset indices of the global batch at ``step``, all of one group."""
        if step < 0:
            raise ValueError(f"step {step} must be >= 0")
        while not self._batch_totals or self._batch_totals[-1] <= step:
            self._total(len(self._totals))
        epoch = bisect.bisect_right(self._batch_totals, step)  # the epoch in which batch ``step`` completes
        group, k = self._epoch(epoch)[1][step - (self._batch_totals[epoch - 1] if epoch else 0)]
        start, end = k * self.global_batch_size, (k + 1) * self.global_batch_size
        first = epoch  # the epoch holding the batch's first image: this one, or an earlier one for carried images
        while first > 0 and self._total(first - 1)[group] > start:
            first -= 1
        indices: list[int] = []
        for e in range(first, epoch + 1):
            offset = int(self._total(e - 1)[group])
            indices.extend(self._epoch(e)[0][group][max(start - offset, 0) : end - offset].tolist())
        return indices

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.start_step, self.total_steps):
            indices = self.global_batch_indices(step)
            for micro_step in range(self.accum_steps):
                begin = (micro_step * self.world_size + self.rank) * self.batch_size
                yield [SampleKey(step, index) for index in indices[begin : begin + self.batch_size]]
