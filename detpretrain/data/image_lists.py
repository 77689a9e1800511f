"""Image folders of a user's own detection data: which files are images, their int ids, split files and the seeded
hold-out of a validation set. Shared by the flat VOC reader (``detpretrain.data.voc.VocFolderDataset``) and the YOLO
reader (``detpretrain.data.yolo``); ``detpretrain.data.sources`` turns the scripts' flags into calls of these.

Image ids. The detection contract wants a unique non-negative int per image, stable across runs (it seeds the
per-image random streams of Jigsaw and keys the COCO evaluator). A folder of arbitrarily named files has no number in
its names, so an image's id is its index in the sorted list of every image file under the folder (``list_images``,
by relative POSIX path): the train and val subsets of one folder share it, and it stays put as long as the folder's
set of images does (adding or removing an image renumbers the ones after it in sorted order).

Split files (``--train-split`` / ``--val-split``): one image per line, named relative to the images folder, with or
without its extension (``raccoon-1``, ``raccoon-1.jpg``, ``sub/raccoon-1``); blank lines are skipped, and a line
``name extra`` (VOC's per-class image sets) is read by its first word. A name matching no image, or two images
(``a.jpg`` and ``a.png``), is an error naming the file and line.

Hold-out (``--val-fraction F --split-seed N``): round(F x n) images, at least 1 and at most n - 1, drawn by a
permutation from numpy's PCG64 seeded with N, become the validation set; the rest train. Deterministic in
(n, F, N), disjoint, and recorded (``holdout_record``) in args.json / eval.json with the images it held out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from detpretrain.data.detection import DatasetError

__all__ = [
    "DETAIL_LIMIT",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "add_detail",
    "count_cleaning",
    "holdout_split",
    "image_size",
    "read_split_file",
]

# The image extensions ultralytics reads (IMG_FORMATS), lower case; torchvision's ImageFolder's are a subset.
IMAGE_EXTENSIONS = (".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic")


class ImageFolder:
    """Every image file under ``root`` (recursively, by IMAGE_EXTENSIONS, case-insensitive), sorted by relative POSIX
    path; ``image_id(rel)`` is the index in that list (module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist; pass the folder that holds the images")
        files = []
        for directory, subdirectories, names in os.walk(self.root):
            subdirectories.sort()
            relative = Path(directory).relative_to(self.root)
            files += [(relative / n).as_posix() for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        self.files: list[str] = sorted(files)
        if not self.files:
            raise DatasetError(
                f"image folder {self.root} holds no image files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...); "
                "pass the folder that holds the images"
            )
        self._id = {rel: i for i, rel in enumerate(self.files)}
        self._by_stem: dict[str, list[str]] = {}
        for rel in self.files:
            self._by_stem.setdefault(_without_suffix(rel), []).append(rel)

    def image_id(self, relative: str) -> int:
        return self._id[relative]

    def path(self, relative: str) -> Path:
        return self.root / relative

    def resolve(self, name: str, *, where: str) -> str:
        """The relative path of the image ``name`` (relative path, with or without extension); ``where`` names the
        line that gave it, for the error when it matches no image or two."""
        name = name.strip().replace("\\", "/").removeprefix("./")
        if name in self._id:
            return name
        matches = self._by_stem.get(name, [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise DatasetError(
                f"{where}: {name!r} matches {len(matches)} images of {self.root} ({', '.join(matches[:3])}); "
                "name it with its extension"
            )
        raise DatasetError(
            f"{where}: image {name!r} is not in {self.root} (no {name}.jpg, .png, ...); fix the line or add the image"
        )

    def select(self, split_file: str | Path | None) -> list[str]:
        """The relative paths a split file lists, in its order; every image of the folder when None."""
        if split_file is None:
            return list(self.files)
        names = read_split_file(split_file)
        selected = [self.resolve(name, where=f"{split_file}:{line}") for line, name in names]
        seen: dict[str, int] = {}
        for (line, _), rel in zip(names, selected, strict=True):
            if rel in seen:
                raise DatasetError(f"{split_file}:{line}: image {rel} is also on line {seen[rel]}; list each once")
            seen[rel] = line
        return selected


def _without_suffix(relative: str) -> str:
    head, _, tail = relative.rpartition("/")
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return f"{head}/{stem}" if head else stem


def read_split_file(path: str | Path) -> list[tuple[int, str]]:
    """(line number, image name) of each non-blank line of a split file; a line ``name extra`` gives ``name``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist; pass a text file listing one image per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"split file {path} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    names = [(k + 1, line.split()[0]) for k, line in enumerate(lines) if line.strip()]
    if not names:
        raise DatasetError(f"split file {path} lists no images; list one image name per line")
    return names


def holdout_split(num_images: int, *, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices) of ``range(num_images)``, each sorted: the seeded hold-out of the module
    docstring. Deterministic in its arguments; the two lists are disjoint and cover every index."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"--val-fraction {fraction}: pass a fraction in (0, 1), e.g. 0.2")
    if seed < 0:
        raise DatasetError(f"--split-seed {seed}: pass a seed >= 0")
    if num_images < 2:
        raise DatasetError(f"--val-fraction needs at least 2 images to hold some out; the dataset has {num_images}")
    num_val = min(max(round(fraction * num_images), 1), num_images - 1)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(num_images)
    return sorted(order[num_val:].tolist()), sorted(order[:num_val].tolist())


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the image header (PIL decodes no pixels here); an unreadable file names itself."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DatasetError(f"image {path} does not exist; add it or remove it from the annotations") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"image {path} is unreadable ({error}); re-download it or remove it") from None


# What each cleaning step did, by file, as ``python -m detpretrain.data inspect`` lists it: the first few per kind
# (the counts of ``cleaning_report`` hold the totals).
DETAIL_LIMIT = 20


def add_detail(details: dict[str, list[str]] | None, key: str, text: str) -> None:
    """Note ``text`` (a file and what happened in it) under the ``cleaning_report`` key ``key``; keeps the first
    DETAIL_LIMIT of each key."""
    if details is None:
        return
    notes = details.setdefault(key, [])
    if len(notes) < DETAIL_LIMIT:
        notes.append(text)


# clean_boxes' outcome masks (detpretrain.data.detection) -> the cleaning_report keys that count them
CLEANING_OUTCOMES = (
    ("dropped_nonpositive_size", "nonpositive"),
    ("dropped_outside_image", "outside"),
    ("clipped_to_image", "clipped"),
)


def count_cleaning(
    outcome: dict[str, np.ndarray],
    *,
    report: dict[str, int],
    details: dict[str, list[str]] | None,
    describe: Callable[[int], str],
) -> None:
    """Add ``clean_boxes``' outcome for one image to a ``cleaning_report`` (dropped and clipped counts), and note each
    dropped or clipped box as ``describe(k)`` (its file and the k-th box) under its key in ``details``."""
    for key, mask_name in CLEANING_OUTCOMES:
        mask = outcome[mask_name]
        report[key] += int(mask.sum())
        for k in np.flatnonzero(mask):
            add_detail(details, key, describe(int(k)))
