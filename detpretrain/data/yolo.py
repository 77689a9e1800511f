"""YOLO-format detection datasets, read as ultralytics writes them (``--format yolo``).

Two ways in, both through ``detpretrain.data.sources``:

- ``--train-ann data.yaml``: an ultralytics data yaml (``read_data_yaml``): ``path`` the dataset root (relative to
  the yaml's folder; the yaml's folder when absent), ``train`` and ``val`` a folder of images or a ``.txt`` list of
  image paths (or a list of such), relative to the root, ``names`` the classes as a list or an ``{index: name}``
  dict with the indices 0..C-1. A list file's relative lines are relative to the list file's folder (ultralytics
  reads ``./x`` so and other relative lines from the working directory, which depends on where it runs: ours do not).
- ``--train-images images/train --class-names classes.txt`` (or ``a,b,c``): every image under the folder, or the
  ones a split file lists.

Labels are found by ultralytics' rule (``label_path``): the image path with its last ``/images/`` component replaced by
``/labels/`` and its extension by ``.txt``. Each line is ``class cx cy w h``, the class a 0-based index into the
names and the box normalized by the image's width and height (0..1); a line of ``class x1 y1 x2 y2 ...`` (an odd
count of at least 7 numbers: a segmentation polygon, which ultralytics also accepts for detection) is read as the box
of its points. An image without a label file, or with an empty one, is an image without objects (ultralytics'
"background" images), counted in ``cleaning_report["images_without_label_file"]``.

The contract of ``detpretrain.data.detection``: label = class index + 1 (0 is torchvision's background), the
category ``id`` is the class index, the image size comes from the image's header, boxes are converted to pixels
(``x1 = (cx - w / 2) * W``, continuous coordinates) and cleaned as for COCO: a box sticking out of the image
(ultralytics refuses the whole file for coordinates outside 0..1) is clipped and counted, a box of non-positive size
or with nothing inside the image is dropped and counted. A line that is not numbers, has a wrong count, or a class
that is not an integer in 0..C-1 is a ``DatasetError`` naming the file and line (and ``--class-names`` for an
unknown class). Image ids are ``ImageFolder`` ids (``detpretrain.data.image_lists``): the index of the image in the
sorted list of images under the dataset root (the yaml's ``path``, or ``--train-images``).

Evaluation (finetune.py, ``python -m detpretrain.evaluate --format yolo``): with COCO's metric, pycocotools on an
in-memory COCO ground truth built from the cleaned boxes (``detpretrain.data.sources.coco_ground_truth``), category
ids = class indices: ultralytics reports COCO-style mAP50-95 on these datasets, and boxes in continuous normalized
coordinates have no VOC +1 pixel convention.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detpretrain.data.detection import Category, DatasetError, DetectionDataset, ImageEntry, clean_boxes
from detpretrain.data.image_lists import ImageFolder, add_detail, count_cleaning, image_size

__all__ = ["CLEANING_KEYS", "YoloDataYaml", "YoloDataset", "label_path", "read_data_yaml", "read_yolo_labels"]

CLEANING_KEYS = (
    "images",
    "annotations",
    "kept",
    "clipped_to_image",
    "dropped_nonpositive_size",
    "dropped_outside_image",
    "images_without_annotations",
    "images_without_label_file",
)


def label_path(image_path: str | Path) -> Path:
    """ultralytics' ``img2label_paths``: the last ``/images/`` of the path becomes ``/labels/``, the extension
    ``.txt`` (a path without an ``images`` folder keeps its folder)."""
    text = os.fspath(image_path)
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    text = labels.join(text.rsplit(images, 1))
    return Path(text).with_suffix(".txt")


def read_yolo_labels(path: Path, *, num_classes: int) -> np.ndarray:
    """(N, 5) float64 rows ``class cx cy w h`` of a label file (polygons as their boxes; module docstring); raises
    DatasetError naming the file and line for a malformed line or a class outside 0..num_classes-1."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"YOLO label file {path} cannot be read ({error}); make it a UTF-8 text file") from None
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"YOLO label file {path}:{line_number}"
        try:
            values = [float(v) for v in parts]
        except ValueError:
            values = [math.nan]
        if not all(math.isfinite(v) for v in values) or not (
            len(values) == 5 or (len(values) >= 7 and len(values) % 2)
        ):
            raise DatasetError(
                f"{where}: {line.strip()[:60]!r} is not 'class cx cy w h' (5 numbers, or a polygon 'class x1 y1 x2 y2 "
                "x3 y3 ...'); fix the line"
            )
        class_index = values[0]
        if class_index != int(class_index) or class_index < 0:
            raise DatasetError(f"{where}: class {parts[0]!r} is not a class index (an integer >= 0); fix the line")
        if class_index >= num_classes:
            raise DatasetError(
                f"{where}: class {int(class_index)} is not one of the {num_classes} classes (0..{num_classes - 1}); "
                "fix the line, or pass --class-names (or the data yaml's names) listing every class"
            )
        if len(values) == 5:
            rows.append(values)
        else:
            xs, ys = np.array(values[1::2]), np.array(values[2::2])
            x1, x2, y1, y2 = xs.min(), xs.max(), ys.min(), ys.max()
            rows.append([class_index, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


class YoloDataset(DetectionDataset):
    """YOLO images and label files (module docstring) as a detection dataset.

    Args:
        images: the folder the image ids are counted in (``ImageFolder``, or its path).
        class_names: class index k is ``class_names[k]``, label k + 1.
        relative_paths: the images to read, relative to ``images`` (default: all of them).
        record: how the images were chosen (data yaml split, split file, hold-out), kept in ``describe()``.
    """

    format = "yolo"
    flag_key = "iscrowd"  # YOLO has no crowd regions: all False

    def __init__(
        self,
        images: str | Path | ImageFolder,
        *,
        class_names: Sequence[str],
        relative_paths: Sequence[str] | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        folder = images if isinstance(images, ImageFolder) else ImageFolder(images)
        class_names = list(class_names)
        if not class_names:
            raise DatasetError("a YOLO dataset needs its class names: pass --class-names or a data yaml with names")
        self.folder = folder
        report = dict.fromkeys(CLEANING_KEYS, 0)
        details: dict[str, list[str]] = {}
        entries = []
        for rel in folder.files if relative_paths is None else relative_paths:
            path = folder.path(rel)
            labels_file = label_path(path)
            width, height = image_size(path)
            if labels_file.is_file():
                rows = read_yolo_labels(labels_file, num_classes=len(class_names))
            else:
                rows = np.zeros((0, 5))
                report["images_without_label_file"] += 1
                add_detail(details, "images_without_label_file", str(path))
            report["images"] += 1
            report["annotations"] += len(rows)
            centers, sizes = rows[:, 1:3], rows[:, 3:5]
            scale = np.array([width, height, width, height], dtype=np.float64)
            xyxy = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1) * scale
            boxes, outcome = clean_boxes(xyxy, width=width, height=height)
            count_cleaning(
                outcome,
                report=report,
                details=details,
                describe=lambda k, where=labels_file, rows=rows: (
                    f"{where}: object {k} (class {int(rows[k, 0])}) {rows[k, 1:].tolist()}"
                ),
            )
            keep = outcome["keep"]
            report["kept"] += int(keep.sum())
            if not keep.any():
                report["images_without_annotations"] += 1
                add_detail(details, "images_without_annotations", str(path))
            entries.append(
                ImageEntry(
                    image_id=folder.image_id(rel),
                    path=str(path),
                    name=rel,
                    width=width,
                    height=height,
                    boxes=boxes[keep].astype(np.float32),
                    labels=rows[keep, 0].astype(np.int64) + 1,
                    flags=np.zeros(int(keep.sum()), dtype=bool),
                )
            )
        super().__init__(
            entries,
            categories=[Category(label=k + 1, id=k, name=name) for k, name in enumerate(class_names)],
            with_masks=False,
            cleaning_report=report,
            source={
                "images": str(folder.root),
                "class_names": class_names,
                "images_chosen": record or {"all images of the folder": len(entries)},
            },
        )
        self.cleaning_details = details


@dataclass(frozen=True)
class YoloDataYaml:
    """An ultralytics data yaml, resolved: the dataset ``root``, the ``train`` and ``val`` image paths relative to it
    (``val`` None when the yaml has none), the class ``names``."""

    path: Path
    root: Path
    train: list[str]
    val: list[str] | None
    names: list[str]


def _yaml_names(names: Any, *, path: Path) -> list[str]:
    if isinstance(names, list) and names and all(isinstance(n, str | int) for n in names):
        return [str(n) for n in names]
    if isinstance(names, dict) and names:
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DatasetError(f"data yaml {path}: names {{index: name}} must have the indices 0..{len(keys) - 1}")
        return [str(names[k]) for k in keys]
    raise DatasetError(f"data yaml {path}: 'names' must be a list of class names or an {{index: name}} dict")


def _split_images(value: Any, *, key: str, folder: ImageFolder, path: Path) -> list[str]:
    """The images of a yaml split (a folder, a .txt list, or a list of those), relative to the dataset root."""
    items = value if isinstance(value, list) else [value]
    selected: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise DatasetError(f"data yaml {path}: '{key}' must be a folder or a .txt list (or a list of them)")
        location = (folder.root / item).resolve()
        if location.is_dir():
            prefix = Path(os.path.relpath(location, folder.root.resolve())).as_posix()
            selected += [rel for rel in folder.files if prefix == "." or rel.startswith(prefix + "/")]
        elif location.is_file() and location.suffix == ".txt":
            lines = location.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                image = (location.parent / line.strip()).resolve()
                relative = os.path.relpath(image, folder.root.resolve())
                if relative.startswith(".."):
                    raise DatasetError(
                        f"{location}:{number}: image {image} is outside the dataset root {folder.root}; set 'path' in "
                        f"{path} to a folder that holds every image"
                    )
                selected.append(folder.resolve(Path(relative).as_posix(), where=f"{location}:{number}"))
        else:
            raise DatasetError(
                f"data yaml {path}: '{key}' entry {item!r} is neither a folder nor a .txt list under {folder.root}"
            )
    if not selected:
        raise DatasetError(f"data yaml {path}: '{key}' ({value!r}) holds no images")
    return list(dict.fromkeys(selected))


def read_data_yaml(path: str | Path) -> tuple[YoloDataYaml, ImageFolder]:
    """Parse an ultralytics data yaml (module docstring); returns it and the ``ImageFolder`` of its root."""
    import yaml  # pyyaml, a dependency of timm (and ours)

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data yaml {path} does not exist; pass an ultralytics data yaml as --train-ann")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DatasetError(f"data yaml {path} is not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict) or "train" not in data or "names" not in data:
        raise DatasetError(f"data yaml {path} needs 'train' and 'names' (and usually 'path' and 'val')")
    root = Path(data["path"]) if data.get("path") else path.parent
    if not root.is_absolute():
        root = path.parent / root
    folder = ImageFolder(root)
    names = _yaml_names(data["names"], path=path)
    train = _split_images(data["train"], key="train", folder=folder, path=path)
    val = _split_images(data["val"], key="val", folder=folder, path=path) if data.get("val") else None
    return YoloDataYaml(path=path, root=root, train=train, val=val, names=names), folder
