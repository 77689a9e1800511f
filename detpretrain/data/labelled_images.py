"""Images with noisy image-level multi-labels: PreDet's pre-training data (papers/predet.txt §3, §4.1).

PreDet pre-trains on images that carry noisy class labels (hashtags mapped to LVIS classes, §4.1) and no boxes; the
classification loss (§3.1, multi-label cross-entropy after Mahajan et al. [34]) needs the label indices of each image.
Three sources give one in-memory form, ``LabelledImages``: a list of ``(image path, label indices)`` and class names.

- ``from_label_file(images_dir, labels_file)``: a folder of images and a label file, JSONL or CSV (formats below).
- ``from_class_folders(root)``: an ImageNet-style tree ``root/<class name>/<image>``, one label per image.
- ``from_coco(ann_file, images_dir)``: image-level labels from a COCO or LVIS json; boxes are ignored.

Label file formats (UTF-8; paths relative to ``images_dir``, or absolute):

- JSONL (``.jsonl``): one JSON object per line, ``{"file": "a/b.jpg", "labels": ["dog", "frisbee"]}``; other keys are
  ignored, blank lines are skipped. Labels are class names (strings).
- CSV (``.csv``): a header row ``file,labels``, then one row per image, ``a/b.jpg,dog;frisbee``: labels separated by
  ``;``, whitespace around each label stripped, standard CSV quoting (quote a file name that holds a comma).

The class list is ``class_names`` when given (a sequence, or a text file with one name per line), else the sorted
set of every label seen; with a given list, a label outside it makes the row bad. Label indices index ``class_names``;
repeated labels in a row count once.

Bad rows: a missing image file, an unknown label, an empty label set, a row that does not parse, and (after the
optional decoding pass ``verify_images``) an image that does not decode. ``on_bad_row="error"`` (default) raises
``BadRowError`` naming the row and what to do; ``on_bad_row="skip"`` drops the row and counts it by reason in
``LabelledImages.skipped``. A source with no usable row left is always an error.

Decoding: ``read_rgb`` is the one image decoder of the package's PreDet path (the dataset here and the proposal cache
in ``detpretrain.proposals`` both use it), so cached proposal boxes and decoded pixels share one coordinate frame.
It uses Pillow, which reads more of the formats found in web data than torchvision.io, and it does not apply EXIF
orientation (our choice: the pixel layout as stored, the frame COCO's annotations use).

Glossary:

    N        images (rows) in a LabelledImages
    C        classes, ``len(class_names)``
    k        labels of one image, k >= 1
    image    (3, H, W) uint8 tensor, RGB
    labels   (k,) int64 tensor of class indices in [0, C), sorted, unique
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BAD_ROW_POLICIES",
    "EMPTY_LABELS",
    "IMAGE_EXTENSIONS",
    "MALFORMED_ROW",
    "MISSING_FILE",
    "UNDECODABLE_IMAGE",
    "UNKNOWN_LABEL",
    "BadRowError",
    "ImageDecodeError",
    "LabelledImageDataset",
    "LabelledImages",
    "LabelledSample",
    "from_class_folders",
    "from_coco",
    "from_label_file",
    "map_images",
    "read_rgb",
    "verify_images",
]

BAD_ROW_POLICIES = ("error", "skip")
# Reasons a row is bad: the keys of LabelledImages.skipped.
MISSING_FILE = "missing file"
UNKNOWN_LABEL = "unknown label"
EMPTY_LABELS = "empty label set"
MALFORMED_ROW = "malformed row"
UNDECODABLE_IMAGE = "undecodable image"
# The extensions torchvision's ImageFolder accepts; other files in class folders (README, .DS_Store) are not images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadRowError(ValueError):
    """A bad row under ``on_bad_row="error"``; the message names the row, the problem and what to do."""


class ImageDecodeError(ValueError):
    """An image file that exists but does not decode."""


# --------------------------------------------------------------------------------------------------------- decoding


def read_rgb(source: str | Path | bytes, *, name: str | None = None) -> np.ndarray:
    """Decode an image file, or its bytes (a tar member; ``name`` says which in errors), to an (H, W, 3) uint8 RGB
    array; raise a one-line error naming the image when it fails."""
    if name is None:
        name = "<image bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # Image.open only reads the header: a truncated file fails here, not later
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: image file not found; check the image directory") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # SyntaxError and ValueError: some Pillow plugins report malformed headers with them.
        raise ImageDecodeError(
            f"{name}: cannot decode the image ({type(error).__name__}: {error}); replace or delete the file, or "
            "check the data with verify_images(..., on_bad_row='skip') to drop undecodable images"
        ) from None
    return np.array(rgb)  # a writable copy: torch.from_numpy warns on read-only arrays


_START_METHOD = "fork" if sys.platform == "linux" else "spawn"


def map_images(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    num_workers: int,
    progress: bool = False,
    desc: str = "images",
    initializer: Callable[[], None] | None = None,
    start_method: str = _START_METHOD,
) -> Iterator[Any]:
    """``fn`` over ``tasks``, in order, in this process (``num_workers=0``) or a pool of ``num_workers`` processes.

    Results come back in task order whatever the worker count, so what a caller writes does not depend on it. By
    default the pool forks on Linux, as torch's DataLoader does, which spares each worker a fresh import of torch;
    a forked ``fn`` must then use only Pillow and numpy: a library with its own thread pool (torch, OpenCV) can hang
    in a child forked after the parent used that pool. Pass ``start_method="spawn"`` for such an ``fn``.
    ``initializer`` runs once in each worker process (not in this process).
    """
    if num_workers < 0:
        raise ValueError(f"num_workers {num_workers} is negative; pass 0 (this process) or more")
    with ExitStack() as stack:
        if num_workers == 0:
            results: Iterable[Any] = map(fn, tasks)
        else:
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    max_workers=num_workers, mp_context=get_context(start_method), initializer=initializer
                )
            )
            # Chunks amortize the inter-process round trip; results still arrive in order.
            results = pool.map(fn, tasks, chunksize=max(1, min(64, len(tasks) // (4 * num_workers))))
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(tasks), desc=desc, unit="img")
        yield from results


# ------------------------------------------------------------------------------------------------- the common form


@dataclass(frozen=True)
class LabelledImages:
    """Images with image-level labels: ``samples[i] = (image path, sorted unique label indices)``.

    ``skipped`` counts the rows dropped under ``on_bad_row="skip"`` by reason (MISSING_FILE, UNKNOWN_LABEL, ...).
    """

    samples: tuple[tuple[str, tuple[int, ...]], ...]
    class_names: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_paths(self) -> list[str]:
        """The image paths in sample order: the image list of a proposal cache (``compute_proposal_cache``)."""
        return [path for path, _ in self.samples]

    def label_names(self, i: int) -> list[str]:
        """The class names of sample ``i``'s labels."""
        return [self.class_names[c] for c in self.samples[i][1]]

    def summary(self) -> str:
        """One line for logs: what was read, and what was skipped and why."""
        line = f"{len(self)} images, {self.num_classes} classes from {self.source}"
        if self.skipped:
            line += f"; skipped {sum(self.skipped.values())} rows: {self.skipped}"
        return line


def _check_policy(on_bad_row: str) -> None:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not one of {BAD_ROW_POLICIES}")


class _RowFilter:
    """Collects good rows and applies the bad-row policy; ``finish`` builds the LabelledImages."""

    def __init__(self, *, source: str, on_bad_row: str) -> None:
        _check_policy(on_bad_row)
        self.source, self.on_bad_row = source, on_bad_row
        self.samples: list[tuple[str, tuple[int, ...]]] = []
        self.skipped: Counter[str] = Counter()

    def bad(self, reason: str, where: str, detail: str) -> None:
        if self.on_bad_row == "error":
            raise BadRowError(
                f"{where}: {detail} ({reason}); fix the row, or pass on_bad_row='skip' to skip bad rows and count them"
            )
        self.skipped[reason] += 1

    def add(self, *, where: str, path: str, labels: Iterable[int]) -> None:
        """Adds the row if its file exists and it has labels (both checked here, for every source)."""
        unique = tuple(sorted(set(labels)))
        if not unique:
            self.bad(EMPTY_LABELS, where, f"{path} has no labels")
        elif not os.path.isfile(path):
            self.bad(MISSING_FILE, where, f"image file {path} not found")
        else:
            self.samples.append((path, unique))

    def finish(self, class_names: Sequence[str]) -> LabelledImages:
        if not self.samples:
            raise ValueError(
                f"{self.source}: no usable images (skipped rows by reason: {dict(self.skipped) or 'none'}); "
                "check the paths and the file format described in detpretrain.data.labelled_images"
            )
        return LabelledImages(
            samples=tuple(self.samples),
            class_names=tuple(class_names),
            skipped=dict(self.skipped),
            source=self.source,
        )


# ------------------------------------------------------------------------------------------------------ label files


def _read_class_names(class_names: Sequence[str] | str | Path) -> list[str]:
    if isinstance(class_names, (str, Path)):
        with open(class_names, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        where = str(class_names)
    else:
        names, where = [str(name) for name in class_names], "class_names"
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"{where}: class names {duplicates[:5]} appear more than once; list each class once")
    if not names:
        raise ValueError(f"{where}: the class list is empty")
    return names


def _jsonl_rows(labels_file: Path) -> Iterator[tuple[str, Any, Any]]:
    """(where, file, labels) per non-blank line; a line that does not parse gives file=None."""
    with open(labels_file, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{labels_file}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield where, None, f"not JSON ({error.msg})"
                continue
            if not isinstance(row, dict) or "file" not in row or "labels" not in row:
                yield where, None, 'expected an object {"file": ..., "labels": [...]}'
                continue
            yield where, row["file"], row["labels"]


def _csv_rows(labels_file: Path) -> Iterator[tuple[str, Any, Any]]:
    with open(labels_file, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [cell.strip().lower() for cell in header] != ["file", "labels"]:
            raise ValueError(
                f"{labels_file}: the first row must be the header 'file,labels' (got {header!r}); "
                "see the CSV format in detpretrain.data.labelled_images"
            )
        for row in reader:
            where = f"{labels_file}:{reader.line_num}"
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                yield where, None, f"expected 2 columns 'file,labels', got {len(row)}"
                continue
            labels = [label.strip() for label in row[1].split(";")]
            yield where, row[0].strip(), [label for label in labels if label]


def from_label_file(
    images_dir: str | Path,
    labels_file: str | Path,
    *,
    class_names: Sequence[str] | str | Path | None = None,
    on_bad_row: str = "error",
) -> LabelledImages:
    """Images under ``images_dir`` with labels from a JSONL or CSV file (formats in the module docstring).

    ``class_names``: the class list (a sequence, or a text file with one name per line); None takes the sorted set
    of labels in the file. The file's extension (``.jsonl`` or ``.csv``) selects the format.
    """
    images_dir, labels_file = Path(images_dir), Path(labels_file)
    suffix = labels_file.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"{labels_file}: a label file ends in .jsonl or .csv (see detpretrain.data.labelled_images)")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: image directory not found")
    rows = list(_jsonl_rows(labels_file) if suffix == ".jsonl" else _csv_rows(labels_file))
    parsed = []
    rows_filter = _RowFilter(source=str(labels_file), on_bad_row=on_bad_row)
    for where, file, labels in rows:
        if file is None:
            rows_filter.bad(MALFORMED_ROW, where, labels)
        elif not isinstance(file, str) or not file:
            rows_filter.bad(MALFORMED_ROW, where, f'"file" must be a non-empty string, got {file!r}')
        elif not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            rows_filter.bad(MALFORMED_ROW, where, f'"labels" must be a list of class names, got {labels!r}')
        else:
            parsed.append((where, file, labels))
    names = _read_class_names(class_names) if class_names is not None else sorted({x for *_, ls in parsed for x in ls})
    index = {name: i for i, name in enumerate(names)}
    for where, file, labels in parsed:
        unknown = sorted(set(labels) - index.keys())
        if unknown:
            rows_filter.bad(UNKNOWN_LABEL, where, f"labels {unknown[:5]} are not in the class list")
            continue
        rows_filter.add(where=where, path=str(images_dir / file), labels=[index[label] for label in labels])
    return rows_filter.finish(names)


# --------------------------------------------------------------------------------------------------- class folders


def from_class_folders(root: str | Path) -> LabelledImages:
    """An ImageNet-style tree: each subdirectory of ``root`` is a class (sorted by name), each image in it (searched
    recursively, by IMAGE_EXTENSIONS) has that single label. Files with other extensions are not images and are
    ignored, as torchvision's ImageFolder does; no row can be bad, so there is no policy to choose."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: class-folder root not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root}: no class folders; expected root/<class name>/<image files>")
    rows_filter = _RowFilter(source=str(root), on_bad_row="error")
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                rows_filter.add(where=str(path), path=str(path), labels=[label])
    return rows_filter.finish([p.name for p in class_dirs])


# ----------------------------------------------------------------------------------------------------- COCO / LVIS


def _coco_image_path(image: dict, images_dir: Path) -> str:
    """The image's file under ``images_dir``: ``file_name`` (COCO), else the tail of ``coco_url`` (LVIS v1 has no
    file_name, and its images come from both COCO 2017 folders): ``<split>/<name>``, then ``<name>``. The first
    candidate that exists wins; when none does, the first is returned (and reported missing)."""
    candidates = []
    if image.get("file_name"):
        candidates.append(images_dir / image["file_name"])
    if image.get("coco_url"):
        parts = image["coco_url"].rstrip("/").split("/")
        candidates += [images_dir / parts[-2] / parts[-1], images_dir / parts[-1]]
    if not candidates:
        raise ValueError(f"image {image.get('id')!r} has neither file_name nor coco_url")
    return str(next((c for c in candidates if c.is_file()), candidates[0]))


def from_coco(ann_file: str | Path, images_dir: str | Path, *, on_bad_row: str = "error") -> LabelledImages:
    """Image-level labels from a COCO or LVIS instances json: the set of categories of each image's non-crowd
    annotations (LVIS has no crowd). Classes are the json's categories in id order; label ``i`` is the ``i``-th
    smallest category id. An image without annotations has an empty label set (a bad row: COCO train2017 has ~1%)."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    with open(ann_file, encoding="utf-8") as f:
        data = json.load(f)
    if not all(key in data for key in ("images", "annotations", "categories")):
        raise ValueError(f"{ann_file}: not a COCO/LVIS instances json (needs images, annotations, categories)")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    labels: dict[Any, set[int]] = {image["id"]: set() for image in data["images"]}
    unknown: dict[Any, set[Any]] = {}
    for ann in data["annotations"]:
        if ann["image_id"] not in labels:
            raise ValueError(f"{ann_file}: annotation {ann.get('id')} refers to image {ann['image_id']}, not listed")
        if ann.get("iscrowd", 0):
            continue
        if ann["category_id"] in label_of:
            labels[ann["image_id"]].add(label_of[ann["category_id"]])
        else:
            unknown.setdefault(ann["image_id"], set()).add(ann["category_id"])
    rows_filter = _RowFilter(source=str(ann_file), on_bad_row=on_bad_row)
    for image in data["images"]:
        where = f"{ann_file}: image {image['id']}"
        if image["id"] in unknown:
            rows_filter.bad(UNKNOWN_LABEL, where, f"category ids {sorted(unknown[image['id']])} are not in categories")
            continue
        rows_filter.add(where=where, path=_coco_image_path(image, images_dir), labels=labels[image["id"]])
    return rows_filter.finish([c["name"] for c in categories])


# ------------------------------------------------------------------------------------------------ verification pass


def _decode_error(path: str) -> str | None:
    """None when the image decodes, else the error message (runs in verification workers)."""
    try:
        read_rgb(path)
    except (ImageDecodeError, FileNotFoundError) as error:
        return str(error)
    return None


def verify_images(
    images: LabelledImages, *, on_bad_row: str = "error", num_workers: int = 0, progress: bool = False
) -> LabelledImages:
    """Decode every image once (in ``num_workers`` processes); an undecodable or vanished one is a bad row.

    Returns ``images`` without the bad rows (counted under UNDECODABLE_IMAGE or MISSING_FILE) for
    ``on_bad_row="skip"``; raises BadRowError on the first one for ``"error"``. Run it once when building a dataset
    from web data, so that training never stops on a corrupt file.
    """
    _check_policy(on_bad_row)
    paths = images.image_paths
    errors = map_images(_decode_error, paths, num_workers=num_workers, progress=progress, desc="verifying images")
    kept, skipped = [], Counter(images.skipped)
    for sample, error in zip(images.samples, errors, strict=True):
        if error is None:
            kept.append(sample)
            continue
        if on_bad_row == "error":
            raise BadRowError(f"{error}; or pass on_bad_row='skip' to skip bad rows and count them")
        skipped[MISSING_FILE if not os.path.isfile(sample[0]) else UNDECODABLE_IMAGE] += 1
    if not kept:
        raise ValueError(f"{images.source}: no image decodes (skipped rows by reason: {dict(skipped)})")
    return replace(images, samples=tuple(kept), skipped=dict(skipped))


# ----------------------------------------------------------------------------------------------------- the dataset


class LabelledSample(NamedTuple):
    image: torch.Tensor  # (3, H, W) uint8 RGB
    labels: torch.Tensor  # (k,) int64 class indices, sorted, unique
    index: int  # position in the LabelledImages (the proposal cache's image index)


class LabelledImageDataset(torch.utils.data.Dataset):
    """``dataset[i]`` decodes image ``i`` of a LabelledImages: a LabelledSample with its label indices.

    The multi-label target of §3.1 (a k-hot vector normalized to 1/k, after [34]) is built by the loss from
    ``labels``; nothing here depends on the loss. A file that fails to decode raises ImageDecodeError naming it: run
    ``verify_images`` once beforehand to drop such files instead.
    """

    def __init__(self, images: LabelledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> LabelledSample:
        path, labels = self.images.samples[index]
        pixels = read_rgb(path)  # (H, W, 3)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)
        return LabelledSample(image=image, labels=torch.tensor(labels, dtype=torch.int64), index=index)
