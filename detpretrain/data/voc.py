"""PASCAL VOC datasets: VOCdevkit image sets (``--format voc --voc-root VOCdevkit --train-sets
2007-trainval,2012-trainval``) and any folder of VOC XML files (``--format voc --train-images DIR --train-ann XML_DIR``,
``VocFolderDataset``), the VOC class list and XML reader. Jigsaw reads VOC through these datasets too
(``detpretrain.jigsaw.voc_image_records``, ``detpretrain.jigsaw.dataset_records``).

VOCdevkit layout: ``VOC_ROOT/VOC<year>/ImageSets/Main/<split>.txt`` lists image names, ``Annotations/<name>.xml``
holds their objects, ``JPEGImages/<name>.jpg`` their pixels (the image file is found by name, as detectron2 does, not
by the XML's ``<filename>``). PreDet §4.2 trains on VOC2007 trainval + VOC2012 trainval and tests on VOC2007 test.

Flat layout (labelImg, CVAT's and Roboflow's VOC exports): ``DIR/<rel>.<ext>`` and ``XML_DIR/<rel>.xml``, any file
names, any classes (``class_names`` given, or collected sorted from the files), the images chosen by a split file or
a seeded hold-out (``detpretrain.data.image_lists``, ``detpretrain.data.sources``). Everything below holds for both.

Conventions, each as detectron2's VOC loader (PreDet's VOC numbers come from detectron2):

- VOCdevkit: the 20 classes in the standard order (``VOC_CLASSES``); label i is ``VOC_CLASSES[i - 1]``. A flat
  layout: its own classes, label i is ``class_names[i - 1]``.
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

Image ids. The contract wants a unique non-negative int per image (it seeds per-image random streams in Jigsaw).
VOCdevkit: ``"2008_000123"`` (VOC2008+ names) becomes 2008000123 and ``"000123"`` (VOC2007 names, six digits) becomes
2007000123, the year of its folder times 10**6 plus the number (``voc_image_id``); any other name in a VOCdevkit is
an error. A flat layout: the image's index in the sorted list of its folder's images (``ImageFolder``), shared by the
train and val subsets of one folder. The VOC evaluator keys images by name: use ``target["image_name"]`` (a flat
layout's name is the image's path relative to its folder, without extension).
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
from detpretrain.data.image_lists import ImageFolder, add_detail, count_cleaning, image_size

__all__ = [
    "VOC_CLASSES",
    "VOC_SPLITS",
    "VOC_YEARS",
    "VocDataset",
    "VocFolderDataset",
    "VocImage",
    "VocObject",
    "parse_image_sets",
    "read_voc_annotation",
    "voc_entry",
    "voc_folder_images",
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
        details: dict[str, list[str]] = {}
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
                    voc_entry(
                        annotation.objects,
                        image_id=image_id,
                        name=name,
                        path=image_path,
                        xml_path=xml_path,
                        width=width,
                        height=height,
                        label_of=label_of,
                        include_difficult=include_difficult,
                        report=report,
                        details=details,
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
        self.cleaning_details = details

    def _target(self, entry: ImageEntry) -> dict[str, Any]:
        return {**super()._target(entry), "image_name": entry.name}


def voc_entry(
    objects: Sequence[VocObject],
    *,
    image_id: int,
    name: str,
    path: Path,
    xml_path: Path,
    width: int,
    height: int,
    label_of: dict[str, int],
    include_difficult: bool,
    report: dict[str, int],
    details: dict[str, list[str]] | None = None,
) -> ImageEntry:
    """One image's entry from its XML objects: the class check, the difficult policy and the box cleaning of the
    module docstring, counted in ``report`` (CLEANING_KEYS) and noted by file in ``details`` (``add_detail``)."""
    report["images"] += 1
    report["annotations"] += len(objects)
    for obj in objects:
        if obj.name not in label_of:
            shown = ", ".join(list(label_of)[:10]) + (", ..." if len(label_of) > 10 else "")
            raise DatasetError(
                f"VOC annotation {xml_path}: class {obj.name!r} is not one of the {len(label_of)} classes ({shown}); "
                "fix the file, or pass --class-names listing every class of the dataset"
            )
    difficult = np.array([obj.difficult for obj in objects], dtype=bool)
    report["difficult"] += int(difficult.sum())
    if not include_difficult:
        report["difficult_excluded"] += int(difficult.sum())
        objects = [obj for obj in objects if not obj.difficult]
        difficult = np.zeros(len(objects), dtype=bool)
    # VocObject.box: the XML's 1-based inclusive pixel indices as 0-based continuous xyxy (module docstring).
    xyxy = np.array([obj.box for obj in objects], dtype=np.float64).reshape(-1, 4)
    boxes, outcome = clean_boxes(xyxy, width=width, height=height)
    count_cleaning(
        outcome,
        report=report,
        details=details,
        describe=lambda k: f"{xml_path}: object {k} ({objects[k].name}) {list(objects[k].bndbox)}",
    )
    keep = outcome["keep"]
    report["kept"] += int(keep.sum())
    if not keep.any():
        report["images_without_annotations"] += 1
        add_detail(details, "images_without_annotations", str(path))
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


class VocFolderDataset(DetectionDataset):
    """Pascal-VOC XML files outside VOCdevkit (``--format voc --train-images DIR --train-ann XML_DIR``), as labelImg
    and most annotation tools write them: image ``DIR/<rel>.<ext>`` has its objects in ``XML_DIR/<rel>.xml``
    (``XML_DIR`` defaults to ``DIR``: the XML beside the image).

    Args:
        images: the image folder, or its ``ImageFolder`` (to share one listing between train and val).
        annotations: the XML folder (default: ``images``).
        relative_paths: the images to read, relative to ``images`` (``ImageFolder.select`` of a split file, or a
            hold-out); default every image of the folder, and then every XML must have its image.
        class_names: label i = class_names[i - 1]; None collects the class names of these files, sorted. An object of
            a class outside a given list is an error naming the file, the class and ``--class-names``.
        include_difficult: as ``VocDataset``.
        record: how the images were chosen (split file, hold-out), kept in ``describe()``.

    An image without an XML file is an image without objects (labelImg writes none for an image it never saved),
    counted in ``cleaning_report["images_without_annotation_file"]``; a folder where no image has one is an error.
    Image ids are ``ImageFolder`` ids (``detpretrain.data.image_lists``); ``target["image_name"]``, which the VOC
    evaluator keys on, is the relative path without extension.
    """

    format = "voc"
    flag_key = "difficult"

    def __init__(
        self,
        images: str | Path | ImageFolder,
        annotations: str | Path | None = None,
        *,
        relative_paths: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        include_difficult: bool = True,
        record: dict[str, Any] | None = None,
    ) -> None:
        folder = images if isinstance(images, ImageFolder) else ImageFolder(images)
        ann_dir = Path(annotations) if annotations is not None else folder.root
        if not ann_dir.is_dir():
            raise DatasetError(f"annotation folder {ann_dir} does not exist; pass the folder of the XML files")
        if relative_paths is None:
            relative_paths = voc_folder_images(folder, ann_dir)
        self.folder, self.ann_dir, self.include_difficult = folder, ann_dir, include_difficult
        annotations_read: list[tuple[str, Path, VocImage | None]] = []
        for rel in relative_paths:
            xml_path = ann_dir / f"{_stem_path(rel)}.xml"
            annotations_read.append((rel, xml_path, read_voc_annotation(xml_path) if xml_path.is_file() else None))
        if not any(annotation is not None for _, _, annotation in annotations_read):
            raise DatasetError(
                f"none of the {len(annotations_read)} images of {folder.root} has an XML file in {ann_dir} (looked "
                f"for e.g. {annotations_read[0][1]}); pass the folder of the XML files as --train-ann / --val-ann"
            )
        if class_names is None:
            class_names = sorted({o.name for _, _, a in annotations_read if a is not None for o in a.objects})
            if not class_names:
                raise DatasetError(f"the XML files in {ann_dir} name no object; pass --class-names or annotate some")
        class_names = list(class_names)
        categories = [Category(label=i + 1, id=name, name=name) for i, name in enumerate(class_names)]
        label_of = {name: i + 1 for i, name in enumerate(class_names)}
        report = dict.fromkeys((*CLEANING_KEYS, "images_without_annotation_file"), 0)
        details: dict[str, list[str]] = {}
        entries = []
        for rel, xml_path, annotation in annotations_read:
            image_path = folder.path(rel)
            if annotation is None:
                report["images_without_annotation_file"] += 1
                add_detail(details, "images_without_annotation_file", str(image_path))
            width, height = (annotation.width, annotation.height) if annotation is not None else (None, None)
            if width is None:
                width, height = image_size(image_path)
            entries.append(
                voc_entry(
                    annotation.objects if annotation is not None else (),
                    image_id=folder.image_id(rel),
                    name=_stem_path(rel),
                    path=image_path,
                    xml_path=xml_path,
                    width=width,
                    height=height,
                    label_of=label_of,
                    include_difficult=include_difficult,
                    report=report,
                    details=details,
                )
            )
        super().__init__(
            entries,
            categories=categories,
            with_masks=False,
            cleaning_report=report,
            source={
                "images": str(folder.root),
                "annotations": str(ann_dir),
                "class_names": class_names,
                "images_chosen": record or {"all images of the folder": len(entries)},
            },
        )
        self.cleaning_details = details

    def _target(self, entry: ImageEntry) -> dict[str, Any]:
        return {**super()._target(entry), "image_name": entry.name}


def voc_folder_images(folder: ImageFolder, ann_dir: Path) -> list[str]:
    """Every image of ``folder`` (relative paths), after checking that every XML file of ``ann_dir`` has its image:
    without a split file the images and the XML files are the dataset, and an XML whose image is missing is an
    error naming it."""
    for xml_path in sorted(Path(ann_dir).rglob("*.xml")):
        stem = xml_path.relative_to(ann_dir).with_suffix("").as_posix()
        folder.resolve(stem, where=f"VOC annotation {xml_path}")
    return list(folder.files)


def _stem_path(relative: str) -> str:
    """``"sub/a.jpg"`` -> ``"sub/a"``: an image's name in a flat layout (its XML is ``<name>.xml``)."""
    path = Path(relative)
    return path.with_suffix("").as_posix() if path.suffix else path.as_posix()


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, for XML files without a <size> (PIL reads no pixels here)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(
            f"image {path} is unreadable ({error}) and its annotation gives no <size>: re-download the image"
        ) from error
