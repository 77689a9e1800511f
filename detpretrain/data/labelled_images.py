"""Images with noisy image-level multi-labels: PreDet's pre-training data (papers/predet.txt §3, §4.1).

PreDet pre-trains on images that carry noisy class labels (hashtags mapped to LVIS classes, §4.1) and no boxes; the
classification loss (§3.1, multi-label cross-entropy after Mahajan et al. [34]) needs the label indices of each image.
Three sources give one form, ``LabelledImages``: the image paths, the label indices of each image, the class names.

- ``from_label_file(images_dir, labels_file)``: a folder of images and a label file, JSONL or CSV (formats below).
- ``from_class_folders(root)``: an ImageNet-style tree ``root/<class name>/<image>``, one label per image.
- ``from_coco(ann_file, images_dir)``: image-level labels from a COCO or LVIS json; boxes are ignored.
- ``from_detection_dataset(dataset)``: the classes present in each image of a detection dataset (VOC in any layout,
  YOLO: ``detpretrain.data.sources``).

``read_labelled_images(images_dir, ann_file)`` picks among them as the scripts' --train-images/--train-ann do.

The index is a few numpy arrays, never a Python object per row. At the papers' scale (ImageNet's 1.28M images, up to
50M hashtag-labelled ones; 8 ranks per node, 8+ loader workers per rank) a tuple of ``(str, tuple)`` rows costs over
200 bytes per row in every process: a forked DataLoader worker that merely reads a row writes its reference counts,
so copy-on-write hands each worker a private copy of every page it reads (over 10 GB per process at 50M rows). The
buffers of numpy arrays are only ever read, so forked workers share them with their rank, and pickling them is one
memory copy. For N rows:

    path_bytes     (P,) uint8         the UTF-8 paths relative to ``root``, concatenated: one path table
    path_offsets   (N + 1,) int64     row i's path is path_bytes[path_offsets[i]:path_offsets[i + 1]]
    label_values   (L,) int16/int32   each row's sorted unique label indices, concatenated (int16 when C <= 32768)
    label_offsets  (N + 1,) int64     row i's labels are label_values[label_offsets[i]:label_offsets[i + 1]]

An ImageNet-like row ("n01440764/n01440764_10026.JPEG", one to three labels) takes 50 bytes, and 8 forked workers
reading every row add nothing (benchmarks/bench_index.py: 53 MiB per rank per million images, workers included,
against 1.9 GiB for the tuples). Every rank builds the index itself from the label source, with no broadcast and
no long rank-0-only step: the builders are deterministic (the same arrays on every rank) and parse in chunks
straight into arrays, without a Python object per row surviving its chunk (5M JSONL rows: 12 s on one core).

Label file formats (UTF-8; paths relative to ``images_dir``, or absolute):

- JSONL (``.jsonl``): one JSON object per line, ``{"file": "a/b.jpg", "labels": ["dog", "frisbee"]}``; other keys are
  ignored, blank lines are skipped. Labels are class names (strings).
- CSV (``.csv``): a header row ``file,labels``, then one row per image, ``a/b.jpg,dog;frisbee``: labels separated by
  ``;``, whitespace around each label stripped, standard CSV quoting (quote a file name that holds a comma).

The class list is ``class_names`` when given (a sequence, or a text file with one name per line), else the sorted
set of every label seen; with a given list, a label outside it makes the row bad. Label indices index ``class_names``;
repeated labels in a row count once.

Bad rows. The builders judge rows by their labels: an unknown label, an empty label set, a row that does not parse.
``on_bad_row="error"`` (default) raises ``BadRowError`` naming the row and what to do; ``on_bad_row="skip"`` drops
the row and counts it by reason in ``LabelledImages.skipped``. A source with no usable row left is always an error.
The builders do not open the image files: one existence check per row on every rank is too slow at 50M rows.
``image_status`` checks the files once (existence, or a full decode), split over every rank and worker of the job,
and ``drop_bad_rows`` applies the same policy to its verdict (MISSING_FILE, UNDECODABLE_IMAGE); ``verify_images``
does both, with a decode. Without them, a missing or corrupt file stops training when it is read, naming the file.

Decoding: ``read_rgb`` is the one image decoder of the package's PreDet path (the dataset here and the proposal cache
in ``detpretrain.proposals`` both use it), so cached proposal boxes and decoded pixels share one coordinate frame.
It uses Pillow, which reads more of the formats found in web data than torchvision.io, and it does not apply EXIF
orientation (our choice: the pixel layout as stored, the frame COCO's annotations use).

Glossary:

    N        images (rows) in a LabelledImages
    C        classes, ``len(class_names)``
    k        labels of one image, k >= 1
    P, L     bytes of all paths, labels of all rows
    image    (3, H, W) uint8 tensor, RGB
    labels   (k,) int64 class indices in [0, C), sorted, unique
    status   (N,) uint8 per-row image status codes (STATUS_OK, STATUS_MISSING_FILE, STATUS_UNDECODABLE_IMAGE)
"""

from __future__ import annotations

import csv
import functools
import gc
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from detpretrain.engine import BadSampleError, DistInfo, InputError
from detpretrain.sharding import SINGLE_PROCESS, WorkerPool, gather_by_shard, progress_bar, rank_shards, shard_ranges

__all__ = [
    "BAD_ROW_POLICIES",
    "SKIP_HINT",
    "EMPTY_LABELS",
    "IMAGE_EXTENSIONS",
    "MALFORMED_ROW",
    "MISSING_FILE",
    "STATUS_MISSING_FILE",
    "STATUS_OK",
    "STATUS_REASONS",
    "STATUS_UNDECODABLE_IMAGE",
    "UNDECODABLE_IMAGE",
    "UNKNOWN_LABEL",
    "UNLABELLED",
    "BadRowError",
    "ImageDecodeError",
    "LabelledImageDataset",
    "LabelledImages",
    "LabelledSample",
    "drop_bad_rows",
    "from_class_folders",
    "from_coco",
    "from_detection_dataset",
    "from_label_file",
    "image_status",
    "read_labelled_images",
    "read_class_names",
    "relative_to_common_folder",
    "read_rgb",
    "verify_images",
]

BAD_ROW_POLICIES = ("error", "skip")
# How a bad-row message says to skip bad rows: the API's argument by default; a script passes its flag
# (``skip_hint="--skip-bad-rows"``), so that a message never names an argument its user cannot pass.
SKIP_HINT = "on_bad_row='skip'"
# Reasons a row is bad: the keys of LabelledImages.skipped.
MISSING_FILE = "missing file"
UNKNOWN_LABEL = "unknown label"
EMPTY_LABELS = "empty label set"
# A COCO/LVIS image without a (non-crowd) annotation, left out with ``skip_unlabelled=True``: not a bad row.
UNLABELLED = "image without labels"
MALFORMED_ROW = "malformed row"
UNDECODABLE_IMAGE = "undecodable image"
# Image status codes (image_status), one uint8 per row; the same codes as the proposal cache's status section.
STATUS_OK = 0
STATUS_MISSING_FILE = 1
STATUS_UNDECODABLE_IMAGE = 2
STATUS_REASONS = ("ok", MISSING_FILE, UNDECODABLE_IMAGE)  # indexed by code
# The extensions torchvision's ImageFolder accepts; other files in class folders (README, .DS_Store) are not images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Rows parsed per step by the builders: enough to amortize each call, few enough that the chunk's Python objects
# (one parsed row each) stay small next to the finished index.
_PARSE_CHUNK_ROWS = 1 << 16
# Rows relabelled and sorted at a time when the class list is discovered: the sort's temporaries are ~24 bytes a label.
_RELABEL_BLOCK_ROWS = 1 << 20
# Rows per unit of work of image_status, the units dealt round-robin to the ranks: a few seconds of decoding.
_STATUS_CHUNK_ROWS = 4096


class BadRowError(InputError, ValueError):
    """A bad row under ``on_bad_row="error"``; the message names the row, the problem and what to do."""


class ImageDecodeError(BadSampleError, ValueError):
    """An image file that exists but does not decode; in training, ``engine.StepSeededDataset`` replaces it."""


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
            f"{name}: cannot decode the image ({type(error).__name__}: {error}); replace or delete the file",
            name=name,
            reason=f"undecodable: {type(error).__name__}: {error}",
        ) from None
    return np.array(rgb)  # a writable copy: torch.from_numpy warns on read-only arrays


# ------------------------------------------------------------------------------------------------- the common form


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """(N + 1,) int64 start offsets of N consecutive segments of the given lengths, then the total."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _take_segments(values: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The segments (rows) of ``values`` where ``keep`` is True, with their new offsets; vectorized, so a selection
    costs the same whether it keeps one row in a hundred or one in two."""
    lengths = np.diff(offsets)
    return values[np.repeat(keep, lengths)], _offsets(lengths[keep])


def _label_dtype(num_classes: int) -> type[np.integer]:
    return np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32


@dataclass(frozen=True, eq=False, repr=False)
class LabelledImages:
    """Images with image-level labels, as arrays (layout in the module docstring): ``path(i)`` is image i's file,
    ``labels(i)`` its sorted unique label indices into ``class_names``.

    ``root``: image i is ``os.path.join(root, relative_path(i))``; "" when every row holds an absolute path.
    ``skipped`` counts the rows dropped under ``on_bad_row="skip"`` by reason (MISSING_FILE, UNKNOWN_LABEL, ...);
    ``source`` names where the rows came from, for messages.
    """

    root: str
    path_bytes: np.ndarray  # (P,) uint8
    path_offsets: np.ndarray  # (N + 1,) int64
    label_values: np.ndarray  # (L,) int16 or int32
    label_offsets: np.ndarray  # (N + 1,) int64
    class_names: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        # O(1) checks only: a 50M-row index is built on every rank, and select() builds new ones.
        for name, values, offsets, dtypes in (
            ("path", self.path_bytes, self.path_offsets, (np.uint8,)),
            ("label", self.label_values, self.label_offsets, (np.int16, np.int32)),
        ):
            if values.ndim != 1 or values.dtype not in dtypes:
                expected = " or ".join(np.dtype(d).name for d in dtypes)
                raise ValueError(f"{name} values must be a 1-d {expected} array, got {values.dtype} {values.shape}")
            if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) == 0:
                raise ValueError(f"{name}_offsets must be a non-empty 1-d int64 array, got {offsets.dtype}")
            if offsets[0] != 0 or offsets[-1] != len(values):
                raise ValueError(f"{name}_offsets must run from 0 to {len(values)}, got {offsets[0]}..{offsets[-1]}")
        if len(self.label_offsets) != len(self.path_offsets):
            raise ValueError(f"{len(self.path_offsets) - 1} paths but {len(self.label_offsets) - 1} label rows")

    def __len__(self) -> int:
        return len(self.path_offsets) - 1

    def __repr__(self) -> str:
        return f"<LabelledImages: {self.summary()}>"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def nbytes(self) -> int:
        """Bytes held by the four arrays: the index's memory, shared by forked workers."""
        return sum(a.nbytes for a in (self.path_bytes, self.path_offsets, self.label_values, self.label_offsets))

    def _row(self, i: int) -> int:
        if not 0 <= i < len(self.path_offsets) - 1:
            raise IndexError(f"row {i} is outside [0, {len(self)})")
        return i

    def relative_path(self, i: int) -> str:
        """Row ``i``'s path relative to ``root``: the key a proposal cache stores (stable when the dataset moves)."""
        i = self._row(i)
        start, stop = self.path_offsets[i], self.path_offsets[i + 1]
        # surrogateescape: a file name that is not UTF-8 (scandir gives it escaped) comes back as it was.
        return self.path_bytes[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def path(self, i: int) -> str:
        """The file to open for row ``i``."""
        relative = self.relative_path(i)
        return os.path.join(self.root, relative) if self.root else relative

    def labels(self, i: int) -> np.ndarray:
        """(k,) int64 label indices of row ``i``, sorted, unique."""
        i = self._row(i)
        return self.label_values[self.label_offsets[i] : self.label_offsets[i + 1]].astype(np.int64)

    def label_names(self, i: int) -> list[str]:
        """The class names of row ``i``'s labels."""
        return [self.class_names[c] for c in self.labels(i).tolist()]

    def summary(self) -> str:
        """One line for logs: what was read, and what was skipped and why."""
        line = f"{len(self)} images, {self.num_classes} classes from {self.source}"
        if self.skipped:
            line += f"; skipped {sum(self.skipped.values())} rows: {self.skipped}"
        return line

    def select(self, keep: np.ndarray, *, reasons: dict[str, int]) -> LabelledImages:
        """The rows where ``keep`` ((N,) bool) is True, in order; ``reasons`` (dropped rows by reason) is added to
        ``skipped``."""
        keep = np.asarray(keep)
        if keep.dtype != np.bool_ or keep.shape != (len(self),):
            raise ValueError(f"keep must be a ({len(self)},) bool array, got {keep.dtype} {keep.shape}")
        path_bytes, path_offsets = _take_segments(self.path_bytes, self.path_offsets, keep)
        label_values, label_offsets = _take_segments(self.label_values, self.label_offsets, keep)
        skipped = Counter(self.skipped)
        skipped.update({reason: count for reason, count in reasons.items() if count})
        return replace(
            self,
            path_bytes=path_bytes,
            path_offsets=path_offsets,
            label_values=label_values,
            label_offsets=label_offsets,
            skipped=dict(skipped),
        )


def _check_policy(on_bad_row: str) -> None:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not one of {BAD_ROW_POLICIES}")


class _BadRow(Exception):
    """A row's problem, raised while checking it and handed to ``_IndexBuilder.bad``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _GrowingArray:
    """A 1-d array that chunks are appended to, its capacity doubling: the data lives in one large allocation,
    which the OS maps fresh on each growth and takes back whole when freed. Many chunk-sized arrays kept until
    the end would instead leave the malloc heap full of holes once freed: memory the process keeps after the build.
    """

    def __init__(self, dtype: type[np.generic], initial: Sequence[int] = ()) -> None:
        self._data = np.empty(max(1 << 16, len(initial)), dtype=dtype)
        self._data[: len(initial)] = initial
        self._size = len(initial)

    def __len__(self) -> int:
        return self._size

    @property
    def last(self) -> int:
        return int(self._data[self._size - 1])

    def extend(self, values: np.ndarray) -> None:
        end = self._size + len(values)
        if end > len(self._data):
            grown = np.empty(max(end, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : end] = values
        self._size = end

    def finish(self) -> np.ndarray:
        """The values, in an array of their exact size: shrunk in place (realloc, no copy), the spare capacity
        going back to the OS."""
        values, self._data = self._data, np.empty(0, dtype=self._data.dtype)
        values.resize(self._size, refcheck=False)  # the only reference: nothing else sees the buffer move
        return values


class _IndexBuilder:
    """Fills the arrays of a LabelledImages chunk by chunk, and applies the bad-row policy to label-level problems.

    Each chunk becomes arrays at once, so the rows' Python objects never outlive their chunk.
    """

    def __init__(self, *, source: str, on_bad_row: str, skip_hint: str = SKIP_HINT) -> None:
        _check_policy(on_bad_row)
        self.source, self.on_bad_row, self.skip_hint = source, on_bad_row, skip_hint
        self.skipped: Counter[str] = Counter()
        self._path_bytes = _GrowingArray(np.uint8)
        self._path_offsets = _GrowingArray(np.int64, [0])
        # Label indices of the final class list, or provisional ones that finish() maps; int32 until C is known.
        self._label_values = _GrowingArray(np.int32)
        self._label_offsets = _GrowingArray(np.int64, [0])

    def bad(self, reason: str, where: str, detail: str) -> None:
        if self.on_bad_row == "error":
            raise BadRowError(
                f"{where}: {detail} ({reason}); fix the row, or pass {self.skip_hint} to skip bad rows and count them"
            )
        self.skipped[reason] += 1

    def add_chunk(self, paths: list[str], label_values: list[int], label_counts: list[int]) -> None:
        """Rows ``paths[j]`` (relative to the root) whose labels are the next ``label_counts[j]`` of
        ``label_values``, in any order, repeats allowed."""
        text = "".join(paths)
        encoded = text.encode("utf-8", "surrogateescape")
        # Byte lengths: when the chunk is ASCII (ImageNet's names, most web data) they are the str lengths.
        if len(encoded) == len(text):
            lengths = np.fromiter(map(len, paths), dtype=np.int64, count=len(paths))
        else:
            lengths = np.fromiter((len(p.encode("utf-8", "surrogateescape")) for p in paths), np.int64, len(paths))
        self._path_bytes.extend(np.frombuffer(encoded, dtype=np.uint8))
        self._path_offsets.extend(self._path_offsets.last + np.cumsum(lengths))
        values, offsets = _sort_unique_per_row(
            np.array(label_values, dtype=np.int64), _offsets(np.array(label_counts, dtype=np.int64))
        )
        self._label_values.extend(values)
        self._label_offsets.extend(self._label_offsets.last + offsets[1:])

    def finish(self, *, root: str, class_names: Sequence[str], label_order: np.ndarray | None = None) -> LabelledImages:
        """The LabelledImages of every row added; ``label_order[p]`` is the final index of provisional label p."""
        if len(self._path_offsets) == 1:
            raise ValueError(
                f"{self.source}: no usable images (skipped rows by reason: {dict(self.skipped) or 'none'}); "
                "check the paths and the file format described in detpretrain.data.labelled_images"
            )
        label_values, label_offsets = self._label_values.finish(), self._label_offsets.finish()
        if label_order is not None:
            _relabel_in_place(label_values, label_offsets, label_order)
        return LabelledImages(
            root=root,
            path_bytes=self._path_bytes.finish(),
            path_offsets=self._path_offsets.finish(),
            label_values=label_values.astype(_label_dtype(len(class_names)), copy=False),
            label_offsets=label_offsets,
            class_names=tuple(class_names),
            skipped=dict(self.skipped),
            source=self.source,
        )


def _relabel_in_place(values: np.ndarray, offsets: np.ndarray, new_index: np.ndarray) -> None:
    """``values = new_index[values]``, each row's labels sorted again: a one-to-one relabelling keeps them unique,
    not in order. A block of rows at a time, so that the sort's temporaries stay small next to the index."""
    for start in range(0, len(offsets) - 1, _RELABEL_BLOCK_ROWS):
        stop = min(start + _RELABEL_BLOCK_ROWS, len(offsets) - 1)
        first, last = offsets[start], offsets[stop]
        values[first:last], _ = _sort_unique_per_row(new_index[values[first:last]], offsets[start : stop + 1] - first)


def _sort_unique_per_row(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's labels (``values[offsets[i]:offsets[i + 1]]``, non-negative) sorted and deduplicated, all rows at
    once: one sort of ``row * span + label`` keys (rows stay in order, labels sort within each row), then adjacent
    repeats dropped. Returns the new (values, offsets), int64."""
    if len(values) == 0:
        return values.astype(np.int64), offsets
    span = int(values.max()) + 1
    keys = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64) * span, np.diff(offsets))  # (L,) row * span
    keys += values
    keys.sort()
    first = np.empty(len(keys), dtype=bool)
    first[0], first[1:] = True, keys[1:] != keys[:-1]
    keys = keys[first]
    offsets = _offsets(np.bincount(keys // span, minlength=len(offsets) - 1))
    np.remainder(keys, span, out=keys)
    return keys, offsets


# ------------------------------------------------------------------------------------------------------ label files


@contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Parsing makes a few short-lived containers per row (a dict and a list, a JSON row), none in a cycle: the
    cyclic collector, triggered by their numbers, would walk every live object of the process again and again (3/4
    of the build time at 1M rows). Reference counting still frees each chunk; the collector's state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def relative_to_common_folder(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each path relative to the folder that holds them all: the names a cache records for its images, so that it
    stays valid for the dataset moved or mounted elsewhere."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    return [os.path.relpath(p, root) for p in absolute]


def read_class_names(class_names: Sequence[str] | str | Path) -> list[str]:
    """A class list: the names given, or a text file with one name per line (blank lines skipped); each once."""
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


def _line_namer(labels_file: Path, line_numbers: Sequence[int]) -> Callable[[int], str]:
    """``where(k)``: the ``file:line`` of row k of a chunk, for messages (built only for a bad row)."""
    return lambda k: f"{labels_file}:{line_numbers[k]}"


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return _BadRow(MALFORMED_ROW, f"not JSON ({error.msg})")


def _jsonl_chunks(labels_file: Path) -> Iterator[tuple[list[Any], Callable[[int], str]]]:
    """(rows, where) per chunk of lines: ``rows[k]`` is the JSON value of a non-blank line, or the _BadRow of a line
    that is not JSON; ``where(k)`` names its line."""
    with open(labels_file, encoding="utf-8") as f:
        first_line = 1
        while lines := list(islice(f, _PARSE_CHUNK_ROWS)):
            # The whole chunk as one JSON array: one C-level parse instead of a call per line. A blank line, or a
            # line that is not exactly one JSON value, breaks the parse or the count (short of malformed lines that
            # exactly make up for each other); such a chunk goes line by line, which finds and names the bad lines.
            try:
                rows = json.loads("[" + ",".join(lines) + "]")
            except json.JSONDecodeError:
                rows = None
            if rows is not None and len(rows) == len(lines):
                yield rows, _line_namer(labels_file, range(first_line, first_line + len(lines)))
            else:
                numbers = [first_line + j for j, line in enumerate(lines) if line.strip()]
                yield [_parse_json_line(lines[n - first_line]) for n in numbers], _line_namer(labels_file, numbers)
            first_line += len(lines)


def _jsonl_row(row: Any) -> tuple[str, list[str]]:
    """(file, label names) of a JSONL row, or _BadRow."""
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict) or "file" not in row or "labels" not in row:
        raise _BadRow(MALFORMED_ROW, 'expected an object {"file": ..., "labels": [...]}')
    file, labels = row["file"], row["labels"]
    if not isinstance(file, str) or not file:
        raise _BadRow(MALFORMED_ROW, f'"file" must be a non-empty string, got {file!r}')
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise _BadRow(MALFORMED_ROW, f'"labels" must be a list of class names, got {labels!r}')
    return file, labels


def _csv_chunks(labels_file: Path) -> Iterator[tuple[list[list[str]], Callable[[int], str]]]:
    """(rows, where) per chunk of non-blank CSV rows after the header."""
    with open(labels_file, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [cell.strip().lower() for cell in header] != ["file", "labels"]:
            raise ValueError(
                f"{labels_file}: the first row must be the header 'file,labels' (got {header!r}); "
                "see the CSV format in detpretrain.data.labelled_images"
            )
        # Blank rows are skipped; line_num, read as each row arrives, is where the row ends in the file.
        numbered = ((reader.line_num, row) for row in reader if "".join(row).strip())
        while chunk := list(islice(numbered, _PARSE_CHUNK_ROWS)):
            numbers, rows = zip(*chunk, strict=True)
            yield list(rows), _line_namer(labels_file, numbers)


def _csv_row(row: list[str]) -> tuple[str, list[str]]:
    """(file, label names) of a CSV row, or _BadRow."""
    if len(row) != 2:
        raise _BadRow(MALFORMED_ROW, f"expected 2 columns 'file,labels', got {len(row)}")
    file = row[0].strip()
    if not file:
        raise _BadRow(MALFORMED_ROW, f'"file" must be a non-empty string, got {row[0]!r}')
    return file, [label for label in map(str.strip, row[1].split(";")) if label]


@_without_cyclic_gc()
def from_label_file(
    images_dir: str | Path,
    labels_file: str | Path,
    *,
    class_names: Sequence[str] | str | Path | None = None,
    on_bad_row: str = "error",
    skip_hint: str = SKIP_HINT,
) -> LabelledImages:
    """Images under ``images_dir`` with labels from a JSONL or CSV file (formats in the module docstring).

    ``class_names``: the class list (a sequence, or a text file with one name per line); None takes the sorted set
    of labels in the file. The file's extension (``.jsonl`` or ``.csv``) selects the format. The image files are
    not checked here (``image_status``).
    """
    images_dir, labels_file = Path(images_dir), Path(labels_file)
    suffix = labels_file.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"{labels_file}: a label file ends in .jsonl or .csv (see detpretrain.data.labelled_images)")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: image directory not found")
    fixed_classes = class_names is not None
    names = read_class_names(class_names) if fixed_classes else []
    # With no class list given, classes get provisional indices in order of first appearance; finish() sorts them.
    class_index = {name: i for i, name in enumerate(names)}
    builder = _IndexBuilder(source=str(labels_file), on_bad_row=on_bad_row, skip_hint=skip_hint)
    chunks, read_row = (_jsonl_chunks, _jsonl_row) if suffix == ".jsonl" else (_csv_chunks, _csv_row)
    try:
        for rows, where in chunks(labels_file):
            paths: list[str] = []
            values: list[int] = []
            counts: list[int] = []
            for k, row in enumerate(rows):
                try:
                    path, labels = read_row(row)
                    if not labels:
                        raise _BadRow(EMPTY_LABELS, f"{path} has no labels")
                    if fixed_classes:
                        try:
                            values += [class_index[label] for label in labels]
                        except KeyError:
                            unknown = sorted(set(labels) - class_index.keys())
                            raise _BadRow(UNKNOWN_LABEL, f"labels {unknown[:5]} are not in the class list") from None
                    else:
                        values += [class_index.setdefault(label, len(class_index)) for label in labels]
                except _BadRow as bad:
                    builder.bad(bad.reason, where(k), bad.detail)
                    continue
                paths.append(path)
                counts.append(len(labels))
            builder.add_chunk(paths, values, counts)
    except UnicodeDecodeError as error:
        raise ValueError(f"{labels_file}: not UTF-8 text ({error}); save the label file as UTF-8") from None
    if fixed_classes:
        images = builder.finish(root=str(images_dir), class_names=names)
    else:
        names = sorted(class_index)
        label_order = np.empty(len(names), dtype=np.int64)
        label_order[[class_index[name] for name in names]] = np.arange(len(names))
        images = builder.finish(root=str(images_dir), class_names=names, label_order=label_order)
    # A row may name an absolute path (os.path.join then ignores the root); when every row does, there is no root.
    if (images.path_bytes[images.path_offsets[:-1]] == ord(os.sep)).all():
        images = replace(images, root="")
    return images


# --------------------------------------------------------------------------------------------------- class folders


def _image_files(directory: str, prefix: str) -> list[str]:
    """The image files under ``directory`` (by IMAGE_EXTENSIONS, searched recursively, not following links to
    directories, as pathlib's rglob), as ``prefix/...`` paths. scandir's d_type spares a stat per file."""
    files, subdirectories = [], []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                files.append(f"{prefix}/{entry.name}")
    for name in subdirectories:  # after closing this directory: a deep tree holds one open descriptor at a time
        files += _image_files(os.path.join(directory, name), f"{prefix}/{name}")
    return files


def from_class_folders(root: str | Path) -> LabelledImages:
    """An ImageNet-style tree: each subdirectory of ``root`` is a class (sorted by name), each image in it (searched
    recursively, by IMAGE_EXTENSIONS) has that single label; rows are in class order, then sorted by path. Files
    with other extensions are not images and are ignored, as torchvision's ImageFolder does; no row can be bad, so
    there is no policy to choose. ``root`` is the tree's root: relative paths are ``<class name>/...``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: class-folder root not found")
    with os.scandir(root) as entries:
        class_names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    if not class_names:
        raise ValueError(f"{root}: no class folders; expected root/<class name>/<image files>")
    builder = _IndexBuilder(source=str(root), on_bad_row="error")
    for label, name in enumerate(class_names):
        paths = sorted(_image_files(os.path.join(root, name), name))
        builder.add_chunk(paths, [label] * len(paths), [1] * len(paths))
    return builder.finish(root=str(root), class_names=class_names)


# ----------------------------------------------------------------------------------------------------- COCO / LVIS


def _coco_relative_path(image: dict, has_folder: Callable[[str], bool]) -> str | None:
    """The image's file relative to the images folder: ``file_name`` (COCO); else (LVIS v1 lists images by
    ``coco_url`` only, from both COCO 2017 folders) the url's ``<split>/<name>`` when the images folder has that
    split's folder, else ``<name>``. One directory check per split, not a file check per image. None when the
    image has neither field."""
    if image.get("file_name"):
        return image["file_name"]
    if not image.get("coco_url"):
        return None
    parts = image["coco_url"].rstrip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 and has_folder(parts[-2]) else parts[-1]


@_without_cyclic_gc()
def from_coco(
    ann_file: str | Path,
    images_dir: str | Path,
    *,
    on_bad_row: str = "error",
    skip_unlabelled: bool = False,
    skip_hint: str = SKIP_HINT,
) -> LabelledImages:
    """Image-level labels from a COCO or LVIS instances json: the set of categories of each image's non-crowd
    annotations (LVIS has no crowd). Classes are the json's categories in id order; label ``i`` is the ``i``-th
    smallest category id. An image without annotations has an empty label set: a bad row (COCO train2017 has ~1%),
    or with ``skip_unlabelled=True`` (train_predet.py's default) left out and counted in ``skipped[UNLABELLED]``.
    Rows are in the json's image order; the image files are not checked here (``image_status``)."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    with open(ann_file, encoding="utf-8") as f:
        data = json.load(f)
    if not all(key in data for key in ("images", "annotations", "categories")):
        raise ValueError(f"{ann_file}: not a COCO/LVIS instances json (needs images, annotations, categories)")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    labels: dict[Any, set[int]] = {}
    position: dict[Any, int] = {}
    for i, image in enumerate(data["images"]):
        if image["id"] in labels:  # checked first: a duplicate id is what makes annotations point nowhere
            raise ValueError(
                f"image id {image['id']} is listed twice (images[{position[image['id']]}] and images[{i}]) in "
                f"{ann_file}; give each image its own id, or remove the duplicate"
            )
        labels[image["id"]] = set()
        position[image["id"]] = i
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
    has_folder = functools.cache(lambda name: (images_dir / name).is_dir())
    builder = _IndexBuilder(source=str(ann_file), on_bad_row=on_bad_row, skip_hint=skip_hint)
    paths, values, counts = [], [], []
    for image in data["images"]:
        path = _coco_relative_path(image, has_folder)
        if path is None:
            raise ValueError(f"{ann_file}: image {image.get('id')!r} has neither file_name nor coco_url")
        if image["id"] in unknown:
            detail = f"category ids {sorted(unknown[image['id']])} are not in categories"
            builder.bad(UNKNOWN_LABEL, f"{ann_file}: image {image['id']}", detail)
        elif not labels[image["id"]] and skip_unlabelled:
            builder.skipped[UNLABELLED] += 1
        elif not labels[image["id"]]:
            builder.bad(EMPTY_LABELS, f"{ann_file}: image {image['id']}", f"{images_dir / path} has no labels")
        else:
            paths.append(path)
            values += labels[image["id"]]
            counts.append(len(labels[image["id"]]))
    builder.add_chunk(paths, values, counts)
    return builder.finish(root=str(images_dir), class_names=[c["name"] for c in categories])


def from_detection_dataset(dataset: Any) -> LabelledImages:
    """Image-level labels of a detection dataset (``detpretrain.data``: VOC in any layout, YOLO, COCO): the set of
    classes of each image's boxes after the dataset's cleaning. Classes are the dataset's, in its label order (label
    ``i`` here is its label ``i + 1``: no background); images without a box are left out and counted in
    ``skipped[UNLABELLED]``. Paths are relative to the folder that holds every image."""
    paths, values, counts = [], [], []
    unlabelled = 0
    for entry in dataset.entries():
        labels = sorted({int(label) - 1 for label in entry.labels})
        if not labels:
            unlabelled += 1
            continue
        paths.append(entry.path)
        values += labels
        counts.append(len(labels))
    source = ", ".join(f"{key} {value}" for key, value in dataset.source.items() if key != "class_names")
    builder = _IndexBuilder(source=f"{dataset.format} {source}", on_bad_row="error")
    if unlabelled:
        builder.skipped[UNLABELLED] += unlabelled
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    builder.add_chunk(relative_to_common_folder(paths), values, counts)
    return builder.finish(root=root, class_names=dataset.class_names[1:])


# ------------------------------------------------------------------------------------------------ one entry point


def read_labelled_images(
    images_dir: str | Path,
    ann_file: str | Path | None = None,
    *,
    class_names: Sequence[str] | str | Path | None = None,
    on_bad_row: str = "error",
    skip_unlabelled: bool = False,
    skip_hint: str = SKIP_HINT,
) -> LabelledImages:
    """The source the scripts' data flags name: a class-folder tree (``ann_file`` None), a COCO/LVIS json
    (``.json``; ``skip_unlabelled`` as ``from_coco``), else a JSONL or CSV label file (``from_label_file`` rejects
    other extensions). ``class_names`` applies to label files only; ``skip_hint`` is what a bad-row message says to
    pass to skip bad rows (a script's flag)."""
    suffix = None if ann_file is None else Path(ann_file).suffix.lower()
    if class_names is not None and suffix not in (".jsonl", ".csv"):
        raise ValueError(
            "a class list applies to .jsonl/.csv label files only: class folders and COCO/LVIS name theirs"
        )
    if suffix is None:
        return from_class_folders(images_dir)
    if suffix == ".json":
        return from_coco(
            ann_file, images_dir, on_bad_row=on_bad_row, skip_unlabelled=skip_unlabelled, skip_hint=skip_hint
        )
    return from_label_file(images_dir, ann_file, class_names=class_names, on_bad_row=on_bad_row, skip_hint=skip_hint)


# ---------------------------------------------------------------------------------------------- image file checks


def _file_status(path: str, *, decode: bool) -> int:
    """The status code of one image file (runs in image_status's workers: Pillow and os only)."""
    if not decode:
        return STATUS_OK if os.path.isfile(path) else STATUS_MISSING_FILE
    try:
        read_rgb(path)
    except FileNotFoundError:
        return STATUS_MISSING_FILE
    except ImageDecodeError:
        return STATUS_UNDECODABLE_IMAGE
    return STATUS_OK


def image_status(
    images: LabelledImages,
    *,
    decode: bool,
    num_workers: int = 0,
    dist_info: DistInfo = SINGLE_PROCESS,
    progress: bool = False,
    chunk_rows: int = _STATUS_CHUNK_ROWS,
) -> np.ndarray:
    """(N,) uint8 status of every row's image file: STATUS_OK, STATUS_MISSING_FILE or STATUS_UNDECODABLE_IMAGE.

    ``decode=False`` checks that each file exists; ``decode=True`` decodes each once with ``read_rgb`` (what
    training will do), which also finds truncated and non-image files. The rows are cut into chunks of
    ``chunk_rows`` (the same on every rank); each rank of the job checks its round-robin share of the chunks, in
    ``num_workers`` processes, and every rank gets the whole array back. Every rank must call this.
    """
    chunks = shard_ranges(len(images), chunk_rows)
    check = functools.partial(_file_status, decode=decode)
    own = sum(len(chunks[k]) for k in rank_shards(len(chunks), rank=dist_info.rank, world_size=dist_info.world_size))
    # The pool forks after the index exists and is handed only paths: workers share the index, copy nothing.
    with (
        WorkerPool(num_workers) as pool,
        progress_bar(total=own, desc="checking images", enabled=progress and dist_info.is_main) as bar,
    ):

        def check_chunk(k: int) -> np.ndarray:
            paths = [images.path(i) for i in chunks[k]]
            status = np.fromiter(pool.map(check, paths), dtype=np.uint8, count=len(paths))
            if bar is not None:
                bar.update(len(paths))
            return status

        parts = gather_by_shard(len(chunks), check_chunk, dist_info=dist_info)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def _first_bad_row_message(images: LabelledImages, i: int, code: int, *, skip_hint: str) -> str:
    """A one-line BadRowError message for row ``i``; an undecodable image is decoded again for the decoder's own
    words (one image, on the error path only)."""
    path = images.path(i)
    advice = f"or pass {skip_hint} to drop bad rows and count them"
    if code == STATUS_UNDECODABLE_IMAGE:
        try:
            read_rgb(path)
        except (ImageDecodeError, FileNotFoundError) as error:
            return f"row {i}: {error}; {advice}"
        return f"row {i}: {path}: did not decode when checked ({UNDECODABLE_IMAGE}); replace the file, {advice}"
    return f"row {i}: {path}: image file not found ({MISSING_FILE}); check the image directory, {advice}"


def drop_bad_rows(
    images: LabelledImages, status: np.ndarray, *, on_bad_row: str, skip_hint: str = SKIP_HINT
) -> LabelledImages:
    """Apply the bad-row policy to ``image_status``'s verdict: ``"error"`` raises BadRowError naming the first bad
    row; ``"skip"`` keeps the good rows and counts the others by reason in ``skipped``. No good row is an error."""
    _check_policy(on_bad_row)
    status = np.asarray(status)
    if status.dtype != np.uint8 or status.shape != (len(images),):
        raise ValueError(
            f"status must be image_status's ({len(images)},) uint8 array, got {status.dtype} {status.shape}"
        )
    counts = np.bincount(status, minlength=len(STATUS_REASONS))
    if len(counts) > len(STATUS_REASONS):
        raise ValueError(f"status holds unknown codes {np.unique(status[status >= len(STATUS_REASONS)]).tolist()}")
    if counts[STATUS_OK] == len(images):
        return images
    if on_bad_row == "error":
        first = int(np.flatnonzero(status != STATUS_OK)[0])
        raise BadRowError(_first_bad_row_message(images, first, int(status[first]), skip_hint=skip_hint))
    reasons = {STATUS_REASONS[code]: int(counts[code]) for code in (STATUS_MISSING_FILE, STATUS_UNDECODABLE_IMAGE)}
    if counts[STATUS_OK] == 0:
        raise ValueError(
            f"{images.source}: no usable images, every image file is bad ({reasons}); check the image directory"
        )
    return images.select(status == STATUS_OK, reasons=reasons)


def verify_images(
    images: LabelledImages,
    *,
    on_bad_row: str = "error",
    num_workers: int = 0,
    progress: bool = False,
    dist_info: DistInfo = SINGLE_PROCESS,
    skip_hint: str = SKIP_HINT,
) -> LabelledImages:
    """Decode every image once (split over the ranks of ``dist_info`` and ``num_workers`` processes each); a
    missing or undecodable one is a bad row under ``on_bad_row``. Run it once when building a dataset from web
    data, so that training never stops on a corrupt file."""
    _check_policy(on_bad_row)
    status = image_status(images, decode=True, num_workers=num_workers, dist_info=dist_info, progress=progress)
    return drop_bad_rows(images, status, on_bad_row=on_bad_row, skip_hint=skip_hint)


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
        pixels = read_rgb(self.images.path(index))  # (H, W, 3)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)
        return LabelledSample(image=image, labels=torch.from_numpy(self.images.labels(index)), index=index)
