"""PASCAL VOC datasets (``--format voc --voc-root VOCdevkit --train-sets 2007-trainval,2012-trainval``), the VOC
class list and XML reader. Jigsaw reads VOC through this dataset too (``detpretrain.jigsaw.voc_image_records``).

Layout: ``VOC_ROOT/VOC<year>/ImageSets/Main/<split>.txt`` lists image names, ``Annotations/<name>.xml`` holds their
objects, ``JPEGImages/<name>.jpg`` their pixels (the image file is found by name, as detectron2 does, not by the
XML's ``<filename>``). PreDet §4.2 trains on VOC2007 trainval + VOC2012 trainval and tests on VOC2007 test.

Conventions, each as detectron2's VOC loader (PreDet's VOC numbers come from detectron2):

- The 20 classes in the standard order (``VOC_CLASSES``); label i is ``VOC_CLASSES[i - 1]``.
- Coordinates: the XML's ``xmin ymin xmax ymax`` are 1-based inclusive pixel indices, so a box covering the whole
  image is (1, 1, W, H); in continuous 0-based xyxy it is (xmin - 1, ymin - 1, xmax, ymax) = (0, 0, W, H).
- ``difficult`` objects are kept in the training targets by default (``include_difficult=True``): detectron2's
  loader keeps them ("they don't hurt accuracy") and PreDet used detectron2; torchvision has no VOC recipe and
  mmdetection turns them into ignored boxes. ``target["difficult"]`` marks them; ``include_difficult=False`` leaves
  them out (counted in ``cleaning_report["difficult_excluded"]``). Evaluation ignores them, as VOC does: the VOC
  evaluator reads them from the XML.
- Boxes are cleaned as for COCO (``detpretrain.data.detection``): clipped to the image when they stick out,
  dropped when of non-positive size or outside it, and counted.

The XML reader. ``read_voc_annotation`` is the package's one reader of VOC's XML: the VOC evaluator
(``detpretrain.evaluation.voc``) reads its ground truth with it too, so training and evaluation agree on what a file
says (a missing ``<difficult>`` is 0, coordinates may be decimals, a missing or non-positive ``<size>`` is None). It
reports boxes as written and leaves judging them to its callers, whose policies differ: this dataset clips or drops
and counts bad boxes, as for COCO; the evaluator refuses an inverted box, since ground truth that silently lost an
object would change the recall it measures. Unreadable files raise ``DatasetError`` naming the file; the evaluator
re-raises them as its own ``EvaluationInputError``.

Image ids. The contract wants a unique non-negative int per image (it seeds per-image random streams in Jigsaw):
``"2008_000123"`` (VOC2008+ names) becomes 2008000123 and ``"000123"`` (VOC2007 names, six digits) becomes
2007000123, the year of its folder times 10**6 plus the number (``voc_image_id``). Any other name is an error:
convert such a dataset to a COCO json. The VOC evaluator keys images by name: use ``target["image_name"]``.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from detpretrain.data.detection import Category, DatasetError, DetectionDataset, ImageEntry, clean_boxes

__all__ = [
    "VOC_CLASSES",
    "VOC_SPLITS",
    "VOC_YEARS",
    "VocDataset",
    "VocImage",
    "VocObject",
    "parse_image_sets",
    "read_voc_annotation",
    "voc_image_id",
]

# The 20 classes in detectron2's and torchvision's order, for training and for the VOC evaluator alike.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VOC_YEARS = (2007, 2008, 2009, 2010, 2011, 2012)
VOC_SPLITS = ("train", "val", "trainval", "test")

CLEANING_KEYS = (
    "images",
    "annotations",
    "kept",
    "difficult",
    "difficult_excluded",
    "clipped_to_image",
    "dropped_nonpositive_size",
    "dropped_outside_image",
    "images_without_annotations",
)

_VOC2008_NAME = re.compile(r"^(\d{4})_(\d{6})$")
_VOC2007_NAME = re.compile(r"^\d{6}$")


def parse_image_sets(image_sets: str | Sequence[str | tuple[int, str]]) -> list[tuple[int, str]]:
    """``"2007-trainval,2012-trainval"`` (the ``--train-sets`` flag) -> ``[(2007, "trainval"), (2012, "trainval")]``.

    Also takes a list of such strings or of (year, split) pairs. Unknown years or splits fail naming the entry.
    """
    items = image_sets.split(",") if isinstance(image_sets, str) else list(image_sets)
    parsed = []
    for item in items:
        if isinstance(item, str):
            text = item.strip()
            year_text, _, split = text.partition("-")
            year = int(year_text) if year_text.isdigit() else None
        else:
            text, (year, split) = str(item), item
        if year not in VOC_YEARS or split not in VOC_SPLITS:
            raise ValueError(
                f"VOC image set {text!r} is not YEAR-SPLIT with YEAR in {VOC_YEARS[0]}..{VOC_YEARS[-1]} and SPLIT one "
                f"of {', '.join(VOC_SPLITS)} (e.g. --train-sets 2007-trainval,2012-trainval)"
            )
        parsed.append((int(year), split))
    if not parsed:
        raise ValueError("no VOC image set given; pass e.g. 2007-trainval,2012-trainval")
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"VOC image sets {image_sets!r} name one set twice; list each once")
    return parsed


def voc_image_id(name: str, *, year: int) -> int:
    """The int id of VOC image ``name`` in folder VOC<year> (module docstring): "2008_000123" -> 2008000123,
    "000123" -> 2007000123 (for year 2007)."""
    match = _VOC2008_NAME.match(name)
    if match:
        return int(match.group(1)) * 10**6 + int(match.group(2))
    if _VOC2007_NAME.match(name):
        return year * 10**6 + int(name)
    raise DatasetError(
        f"VOC image name {name!r} (VOC{year}) is neither YYYY_NNNNNN nor NNNNNN, so it has no int id; "
        "rename the images, or convert the dataset to a COCO json and use --format coco"
    )


@dataclass(frozen=True)
class VocObject:
    """One ``<object>`` of a VOC annotation."""

    name: str
    bndbox: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as in the XML: 1-based, inclusive
    difficult: bool = False
    truncated: bool = False

    @property
    def box(self) -> tuple[float, float, float, float]:
        """xyxy in 0-based continuous pixel coordinates (module docstring), the frame models train and predict in."""
        xmin, ymin, xmax, ymax = self.bndbox
        return (xmin - 1.0, ymin - 1.0, xmax, ymax)


@dataclass(frozen=True)
class VocImage:
    """One VOC annotation file: the image's name (the file's stem), its file name and size when given, its objects."""

    name: str
    filename: str | None
    width: int | None
    height: int | None
    objects: tuple[VocObject, ...]


def _number(element: ET.Element, tag: str, *, path: Path, where: str, required: bool) -> float | None:
    """The finite number in ``element``'s child ``tag``; None when the child is missing or empty and not required."""
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise DatasetError(f"VOC annotation {path}: {where} has no <{tag}>; fix the file")
        return None
    try:
        value = float(child.text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(
            f"VOC annotation {path}: {where} <{tag}> is {child.text.strip()!r}, not a number; fix the file"
        )
    return value


def read_voc_annotation(path: str | Path) -> VocImage:
    """Read one VOC XML file as written: boxes are neither checked nor fixed (module docstring: each caller has its
    own policy).

    A missing ``<difficult>`` or ``<truncated>`` means 0; coordinates may be integers or decimals. The size is None
    unless the file gives a positive width and height. Raises DatasetError, naming the file (and the parser's
    position for malformed XML), for a missing or unreadable file, malformed XML, or an object without a name or
    a complete box, or with a coordinate that is not a finite number.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"VOC annotation {path} does not exist; the image set lists it") from None
    except ET.ParseError as error:
        raise DatasetError(f"VOC annotation {path} is malformed XML ({error}); re-download it or fix it") from None
    except OSError as error:
        raise DatasetError(f"VOC annotation {path} cannot be read ({error}); make it a readable file") from None
    if root.tag != "annotation":
        raise DatasetError(f"VOC annotation {path} has root <{root.tag}>, not <annotation>; is it a VOC file?")
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name_element = obj.find("name")
        if name_element is None or not (name_element.text or "").strip():
            raise DatasetError(f"VOC annotation {path}: object {k} has no <name>; fix the file")
        name = name_element.text.strip()
        where = f"object {k} ({name})"  # the class helps find the object in a file with many
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetError(f"VOC annotation {path}: {where} has no <bndbox>; fix the file")
        xmin, ymin, xmax, ymax = (
            _number(bndbox, tag, path=path, where=where, required=True) for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        flags = {tag: _number(obj, tag, path=path, where=where, required=False) for tag in ("difficult", "truncated")}
        objects.append(
            VocObject(
                name=name,
                bndbox=(xmin, ymin, xmax, ymax),
                difficult=bool(flags["difficult"]),
                truncated=bool(flags["truncated"]),
            )
        )
    size = root.find("size")
    width = height = None
    if size is not None:
        width = _number(size, "width", path=path, where="<size>", required=False)
        height = _number(size, "height", path=path, where="<size>", required=False)
    if not (width is not None and height is not None and width > 0 and height > 0):
        width = height = None  # callers then take the size from the image (VocDataset) or do without it
    filename = root.find("filename")
    return VocImage(
        name=path.stem,
        filename=filename.text.strip() if filename is not None and filename.text and filename.text.strip() else None,
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        objects=tuple(objects),
    )


class VocDataset(DetectionDataset):
    """PASCAL VOC image sets of a VOCdevkit folder (module docstring), as one dataset.

    Args:
        voc_root: the VOCdevkit folder holding ``VOC2007/``, ``VOC2012/`` (``--voc-root``).
        image_sets: ``"2007-trainval,2012-trainval"`` or (year, split) pairs (``--train-sets``); ``"2007-test"``
            for evaluation.
        class_names: the classes, label i = class_names[i - 1]; an object of another class is an error.
        include_difficult: keep ``difficult`` objects in the targets (default, as detectron2), marked in
            ``target["difficult"]``.
    """

    format = "voc"
    flag_key = "difficult"

    def __init__(
        self,
        voc_root: str | Path,
        image_sets: str | Sequence[str | tuple[int, str]] = "2007-trainval,2012-trainval",
        *,
        class_names: Sequence[str] = VOC_CLASSES,
        include_difficult: bool = True,
    ) -> None:
        voc_root = Path(voc_root)
        self.voc_root, self.image_sets = voc_root, parse_image_sets(image_sets)
        self.include_difficult = include_difficult
        categories = [Category(label=i + 1, id=name, name=name) for i, name in enumerate(class_names)]
        label_of = {name: i + 1 for i, name in enumerate(class_names)}
        report = dict.fromkeys(CLEANING_KEYS, 0)
        entries: list[ImageEntry] = []
        seen: dict[int, str] = {}
        missing: list[Path] = []
        for year, split in self.image_sets:
            year_dir = voc_root / f"VOC{year}"
            set_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
            if not year_dir.is_dir():
                raise DatasetError(f"{voc_root} has no VOC{year} folder; pass the VOCdevkit folder as the VOC root")
            if not set_file.is_file():
                raise DatasetError(f"VOC image set {set_file} does not exist; check the split name and the download")
            names = [line.split()[0] for line in set_file.read_text().splitlines() if line.strip()]
            for name in names:
                image_id = voc_image_id(name, year=year)
                if image_id in seen:
                    raise DatasetError(f"VOC image {name} of {set_file} is also in {seen[image_id]}; list each once")
                seen[image_id] = str(set_file)
                image_path = year_dir / "JPEGImages" / f"{name}.jpg"
                if not image_path.is_file():
                    missing.append(image_path)
                    continue
                xml_path = year_dir / "Annotations" / f"{name}.xml"
                annotation = read_voc_annotation(xml_path)
                width, height = annotation.width, annotation.height
                if width is None:
                    width, height = _image_size(image_path)
                entries.append(
                    self._entry(
                        annotation.objects,
                        image_id=image_id,
                        name=name,
                        path=image_path,
                        xml_path=xml_path,
                        width=width,
                        height=height,
                        label_of=label_of,
                        report=report,
                    )
                )
        if missing:
            raise DatasetError(
                f"{len(missing)} images of VOC image sets {self.image_sets} are missing from their JPEGImages "
                f"folders, e.g. {missing[0]}; re-download them or remove them from the image set files"
            )
        super().__init__(
            entries,
            categories=categories,
            with_masks=False,
            cleaning_report=report,
            source={"voc_root": str(voc_root), "image_sets": [f"{y}-{s}" for y, s in self.image_sets]},
        )

    def _entry(
        self,
        objects: Sequence[VocObject],
        *,
        image_id: int,
        name: str,
        path: Path,
        xml_path: Path,
        width: int,
        height: int,
        label_of: dict[str, int],
        report: dict[str, int],
    ) -> ImageEntry:
        report["images"] += 1
        report["annotations"] += len(objects)
        for obj in objects:
            if obj.name not in label_of:
                raise DatasetError(
                    f"VOC annotation {xml_path}: class {obj.name!r} is not one of the {len(label_of)} classes "
                    f"({', '.join(label_of)}); fix the file or pass class_names"
                )
        difficult = np.array([obj.difficult for obj in objects], dtype=bool)
        report["difficult"] += int(difficult.sum())
        if not self.include_difficult:
            report["difficult_excluded"] += int(difficult.sum())
            objects = [obj for obj in objects if not obj.difficult]
            difficult = np.zeros(len(objects), dtype=bool)
        # VocObject.box: the XML's 1-based inclusive pixel indices as 0-based continuous xyxy (module docstring).
        xyxy = np.array([obj.box for obj in objects], dtype=np.float64).reshape(-1, 4)
        boxes, outcome = clean_boxes(xyxy, width=width, height=height)
        report["dropped_nonpositive_size"] += int(outcome["nonpositive"].sum())
        report["dropped_outside_image"] += int(outcome["outside"].sum())
        report["clipped_to_image"] += int(outcome["clipped"].sum())
        keep = outcome["keep"]
        report["kept"] += int(keep.sum())
        report["images_without_annotations"] += not keep.any()
        return ImageEntry(
            image_id=image_id,
            path=str(path),
            name=name,
            width=width,
            height=height,
            boxes=boxes[keep].astype(np.float32),
            labels=np.array([label_of[obj.name] for obj in objects], dtype=np.int64).reshape(-1)[keep],
            flags=difficult[keep],
        )

    def _target(self, entry: ImageEntry) -> dict[str, Any]:
        return {**super()._target(entry), "image_name": entry.name}


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, for XML files without a <size> (PIL reads no pixels here)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(
            f"image {path} is unreadable ({error}) and its annotation gives no <size>: re-download the image"
        ) from error
