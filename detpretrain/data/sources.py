"""A user's own detection data: the data flags the three scripts, ``python -m detpretrain.evaluate`` and
``python -m detpretrain.data inspect`` share, and the one function that turns them into train / val datasets.

Formats and layouts (``--format``):

- ``coco``: ``--train-images DIR --train-ann instances.json`` (``CocoDataset``); ``lvis``: ``--train-images COCO_ROOT
  --train-ann lvis_v1_train.json`` (``LvisDataset``); the val set from ``--val-images/--val-ann``. As before.
- ``voc`` in a VOCdevkit: ``--voc-root VOCdevkit --train-sets 2007-trainval,2012-trainval --val-sets 2007-test``
  (``VocDataset``), the 20 VOC classes unless ``--class-names`` says otherwise.
- ``voc`` in any other layout: ``--train-images DIR [--train-ann XML_DIR]`` (``VocFolderDataset``; the XML files
  default to the images folder, where labelImg writes them).
- ``yolo``: ``--train-ann data.yaml`` (an ultralytics data yaml: its train and val sets and names) or
  ``--train-images images/train --class-names classes.txt`` (``detpretrain.data.yolo``).

Choosing images (voc outside VOCdevkit, yolo): ``--train-split FILE`` / ``--val-split FILE`` list image names, one
a line (``detpretrain.data.image_lists``); without ``--val-split``, ``--val-fraction F --split-seed N`` holds out a
seeded fraction of the training images as the val set (deterministic and disjoint, recorded in the datasets'
``describe()``). ``--val-images`` / ``--val-ann`` default to the training ones. With no split at all every image
trains and there is no val set: training scripts without evaluation (train_jigsaw.py, train_predet.py) need none,
finetune.py stops with a one-line error naming the flags to pass.

Classes: ``--class-names a,b,c`` or ``--class-names FILE`` (one a line); without it, a flat VOC layout collects the
class names of its training files in sorted order, a data yaml gives its ``names``. Label i is ``class_names[i - 1]``;
the order used is recorded in ``describe()["class_names"]`` (eval.json's data sections, the Jigsaw manifest's class
list). An object of a class outside a given list is a one-line ``DatasetError`` naming the file, the class and the
flag.

Every reader cleans boxes as ``detpretrain.data.detection`` does (clipped or dropped, and counted) and raises
``DatasetError`` with a one-line message for what cannot be used; the scripts turn it into ``SystemExit``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from detpretrain.data.coco import CocoDataset
from detpretrain.data.detection import DatasetError, DetectionDataset
from detpretrain.data.image_lists import ImageFolder, holdout_split
from detpretrain.data.lvis import LvisDataset
from detpretrain.data.voc import VOC_CLASSES, VocDataset, VocFolderDataset, parse_image_sets, voc_folder_images
from detpretrain.data.yolo import YoloDataset, read_data_yaml

__all__ = [
    "DATA_FLAGS",
    "DATA_FORMATS",
    "DataFlags",
    "DetectionData",
    "add_data_arguments",
    "coco_ground_truth",
    "evaluation_ground_truth",
    "load_detection_data",
    "make_evaluator",
    "parse_class_names",
]

DATA_FORMATS = ("coco", "lvis", "voc", "yolo")

# Every shared data flag: (keyword arguments of add_argument). A script adds the ones it reads (add_data_arguments).
DATA_FLAGS: dict[str, dict[str, Any]] = {
    "--train-images": dict(
        type=Path,
        help="training images: the COCO image folder, the COCO root for LVIS, or a VOC / YOLO image folder",
    ),
    "--train-ann": dict(
        type=Path,
        help="COCO instances json, LVIS json, the folder of VOC XML files (default: the images folder), or an "
        "ultralytics data yaml (YOLO)",
    ),
    "--val-images": dict(type=Path, help="evaluation images (COCO, LVIS; VOC and YOLO default to --train-images)"),
    "--val-ann": dict(type=Path, help="evaluation json (COCO, LVIS) or XML folder (VOC; default --train-ann)"),
    "--voc-root": dict(type=Path, help="VOCdevkit folder (--format voc with its image sets)"),
    "--train-sets": dict(default="2007-trainval,2012-trainval", help="VOCdevkit training sets (§4.2: 07+12)"),
    "--val-sets": dict(default="2007-test", help="the VOCdevkit image set to evaluate on (§4.2: 2007-test)"),
    "--train-split": dict(
        type=Path, help="VOC / YOLO folders: file listing the training images, one name a line (default: all)"
    ),
    "--val-split": dict(type=Path, help="VOC / YOLO folders: file listing the evaluation images, one name a line"),
    "--val-fraction": dict(
        type=float,
        help="VOC / YOLO folders without --val-split: hold out this fraction of the training images for evaluation",
    ),
    "--split-seed": dict(type=int, default=0, help="seed of the --val-fraction hold-out (recorded)"),
    "--class-names": dict(
        help="class names, comma-separated or a file with one a line (label i = name i); default: the data yaml's "
        "names (YOLO), the sorted classes of the training XML files (VOC folders), the 20 VOC classes (VOCdevkit)",
    ),
}


def add_data_arguments(
    group: argparse._ArgumentGroup | argparse.ArgumentParser,
    *,
    flags: Sequence[str],
    formats: Sequence[str] = DATA_FORMATS,
    default_format: str | None = "coco",
    format_help: str = "dataset format (and metric)",
) -> None:
    """Add ``--format`` and the shared data ``flags`` (keys of DATA_FLAGS) to a parser group."""
    group.add_argument("--format", default=default_format, choices=list(formats), help=format_help)
    for flag in flags:
        group.add_argument(flag, **DATA_FLAGS[flag])


@dataclass(frozen=True)
class DataFlags:
    """The values of the data flags (None where a script has no such flag)."""

    format: str | None = "coco"
    train_images: Path | None = None
    train_ann: Path | None = None
    val_images: Path | None = None
    val_ann: Path | None = None
    voc_root: Path | None = None
    train_sets: str = "2007-trainval,2012-trainval"
    val_sets: str = "2007-test"
    train_split: Path | None = None
    val_split: Path | None = None
    val_fraction: float | None = None
    split_seed: int = 0
    class_names: str | Path | None = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> DataFlags:
        """The data flags of a parsed command line (the counterpart of ``add_data_arguments``)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**values)


class DetectionData(NamedTuple):
    train: DetectionDataset | None
    val: DetectionDataset | None


def parse_class_names(value: str | Path | Sequence[str] | None) -> list[str] | None:
    """``--class-names``: a file with one name a line (blank lines skipped), or names separated by commas; None stays
    None. Names must be distinct."""
    if value is None:
        return None
    if isinstance(value, str | Path) and (Path(value).is_file() or Path(value).suffix in (".txt", ".names")):
        path = Path(value)
        if not path.is_file():
            raise DatasetError(f"--class-names {path}: no such file; pass a file with one name a line, or a,b,c")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        where = f"--class-names {path}"
    elif isinstance(value, str | Path):
        names, where = [name.strip() for name in str(value).split(",") if name.strip()], f"--class-names {value}"
    else:
        names, where = [str(name) for name in value], "--class-names"
    if not names:
        raise DatasetError(f"{where}: no class names; pass a,b,c or a file with one name a line")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{where}: {', '.join(duplicates[:5])} listed more than once; list each class once")
    return names


def _split_record(split_file: Path | None) -> dict[str, Any]:
    return {"split_file": str(split_file)} if split_file is not None else {}


def _holdout(
    relative: list[str], *, fraction: float, seed: int, record: dict[str, Any]
) -> tuple[list[str], list[str], dict[str, Any], dict[str, Any]]:
    train_idx, val_idx = holdout_split(len(relative), fraction=fraction, seed=seed)
    common = {**record, "val_fraction": fraction, "split_seed": seed, "from_num_images": len(relative)}
    return (
        [relative[i] for i in train_idx],
        [relative[i] for i in val_idx],
        {**common, "part": "train (the rest)"},
        {**common, "part": "val (held out)", "held_out": [relative[i] for i in val_idx]},
    )


def load_detection_data(
    flags: DataFlags,
    *,
    need_train: bool = True,
    need_val: bool = False,
    with_masks: bool = False,
    include_difficult: bool = True,
) -> DetectionData:
    """The train and val datasets the flags name (module docstring). ``need_val``: a missing val set is an error
    (finetune.py); otherwise val is None when the flags give none. ``need_train=False`` reads the val set alone
    (``python -m detpretrain.evaluate``). Raises DatasetError with a one-line message naming the flags to pass."""
    fmt = flags.format or "coco"
    class_names = parse_class_names(flags.class_names)
    if flags.val_fraction is not None and flags.val_split is not None:
        raise DatasetError("--val-fraction holds out images when there is no --val-split: pass one of the two")
    needs_val_message = (
        "a validation set is needed: pass --val-split FILE (images listed one a line) or --val-fraction F "
        "(a seeded hold-out of the training images)"
    )
    if fmt in ("coco", "lvis"):
        if class_names is not None:
            raise DatasetError(f"--class-names is for --format voc / yolo: a {fmt} json names its own categories")
        reader = CocoDataset if fmt == "coco" else LvisDataset
        train = val = None
        if need_train:
            _require(
                flags.train_images is not None and flags.train_ann is not None,
                f"--format {fmt} needs --train-images and --train-ann",
            )
            train = reader(flags.train_ann, flags.train_images, with_masks=with_masks)
        if flags.val_ann is not None or need_val:
            _require(
                flags.val_images is not None and flags.val_ann is not None,
                f"--format {fmt} needs --val-images and --val-ann for evaluation",
            )
            val = reader(flags.val_ann, flags.val_images)
        return DetectionData(train, val)
    if fmt == "voc" and flags.voc_root is not None:
        given = [
            f
            for f in ("train_images", "train_ann", "val_images", "val_ann", "train_split", "val_split")
            if getattr(flags, f) is not None
        ]
        _require(
            not given,
            f"--voc-root reads its image sets (--train-sets, --val-sets), not "
            f"{', '.join('--' + g.replace('_', '-') for g in given)}: drop them",
        )
        names = class_names or list(VOC_CLASSES)
        train = VocDataset(flags.voc_root, flags.train_sets, class_names=names) if need_train else None
        val = None
        if need_val or not need_train:
            _require(
                len(parse_image_sets(flags.val_sets)) == 1,
                f"--val-sets {flags.val_sets}: evaluate one VOC image set at a time, e.g. 2007-test",
            )
            val = VocDataset(flags.voc_root, flags.val_sets, class_names=names, include_difficult=include_difficult)
        return DetectionData(train, val)
    if fmt not in ("voc", "yolo"):
        raise DatasetError(f"--format {fmt}: pass one of {', '.join(DATA_FORMATS)}")
    if fmt == "yolo" and _is_yaml(flags.train_ann if need_train else flags.val_ann or flags.train_ann):
        return _yolo_yaml(flags, class_names, need_train=need_train, need_val=need_val, message=needs_val_message)

    # A folder of images (VOC XML beside or in --train-ann; YOLO labels by ultralytics' rule).
    train_images = flags.train_images if need_train else flags.val_images or flags.train_images
    _require(
        train_images is not None,
        f"--format {fmt} needs --train-images DIR (or --voc-root VOCdevkit, or --train-ann data.yaml for YOLO)"
        if need_train
        else f"--format {fmt} needs --val-images DIR",
    )
    if fmt == "yolo":
        _require(
            class_names is not None,
            "--format yolo with an image folder needs --class-names FILE or a,b,c "
            "(or pass an ultralytics data yaml as --train-ann)",
        )
    folder = ImageFolder(train_images)
    train_ann = flags.train_ann if fmt == "voc" else None
    val_images = flags.val_images or train_images
    val_folder = folder if Path(val_images) == Path(train_images) else ImageFolder(val_images)
    val_ann = (flags.val_ann or (flags.train_ann if need_train else None)) if fmt == "voc" else None

    def make(which_folder, relative, ann, names, record):
        if fmt == "voc":
            return VocFolderDataset(
                which_folder,
                ann,
                relative_paths=relative,
                class_names=names,
                include_difficult=include_difficult,
                record=record,
            )
        return YoloDataset(which_folder, relative_paths=relative, class_names=names, record=record)

    if not need_train:
        relative = val_folder.select(flags.val_split)
        return DetectionData(None, make(val_folder, relative, val_ann, class_names, _split_record(flags.val_split)))
    if flags.train_split is None and fmt == "voc":  # the folder is the dataset: every XML must have its image
        train_relative = voc_folder_images(folder, Path(train_ann) if train_ann is not None else folder.root)
    else:
        train_relative = folder.select(flags.train_split)
    train_record, val_record, val_relative = _split_record(flags.train_split), None, None
    if flags.val_split is not None:
        val_relative, val_record = val_folder.select(flags.val_split), _split_record(flags.val_split)
    elif flags.val_fraction is not None:
        train_relative, val_relative, train_record, val_record = _holdout(
            train_relative, fraction=flags.val_fraction, seed=flags.split_seed, record=train_record
        )
        val_folder = folder
    elif flags.val_images is not None and Path(flags.val_images) != Path(train_images):
        val_relative, val_record = val_folder.files, {"all images of the folder": len(val_folder.files)}
    if need_val and val_relative is None:
        raise DatasetError(needs_val_message)
    train = make(folder, train_relative, train_ann, class_names, train_record)
    names = train.class_names[1:]  # the val set takes the training classes, in their order
    val = make(val_folder, val_relative, val_ann, names, val_record) if val_relative is not None else None
    return DetectionData(train, val)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DatasetError(message)


def _is_yaml(path: Path | None) -> bool:
    return path is not None and Path(path).suffix.lower() in (".yaml", ".yml")


def _yolo_yaml(
    flags: DataFlags, class_names: list[str] | None, *, need_train: bool, need_val: bool, message: str
) -> DetectionData:
    """The train and val sets of an ultralytics data yaml (``--train-ann data.yaml``)."""
    yaml_path = flags.train_ann if need_train else flags.val_ann or flags.train_ann
    data, folder = read_data_yaml(yaml_path)
    if class_names is not None and class_names != data.names:
        raise DatasetError(
            f"--class-names ({', '.join(class_names[:5])}, ...) differs from the names of {yaml_path} "
            f"({', '.join(data.names[:5])}, ...): drop --class-names, the data yaml names the classes"
        )
    base = {"data_yaml": str(yaml_path)}
    train_relative = folder.select(flags.train_split) if flags.train_split is not None else data.train
    train_record = {**base, "split": "train", **_split_record(flags.train_split)}
    val_relative, val_record = data.val, {**base, "split": "val"}
    if flags.val_split is not None:
        val_relative, val_record = folder.select(flags.val_split), {**base, **_split_record(flags.val_split)}
    elif flags.val_fraction is not None:
        train_relative, val_relative, train_record, val_record = _holdout(
            train_relative, fraction=flags.val_fraction, seed=flags.split_seed, record=train_record
        )
    if not need_train:
        _require(val_relative is not None, f"{yaml_path} has no 'val' set: pass --val-split FILE")
        return DetectionData(
            None, YoloDataset(folder, relative_paths=val_relative, class_names=data.names, record=val_record)
        )
    if need_val and val_relative is None:
        raise DatasetError(f"{yaml_path} has no 'val' set; {message}")
    train = YoloDataset(folder, relative_paths=train_relative, class_names=data.names, record=train_record)
    val = None
    if val_relative is not None:
        val = YoloDataset(folder, relative_paths=val_relative, class_names=data.names, record=val_record)
    return DetectionData(train, val)


# ----------------------------------------------------------------------------------------------------- evaluation


def coco_ground_truth(dataset: DetectionDataset) -> dict[str, Any]:
    """A COCO instances dict of a dataset's cleaned boxes (``iscrowd`` from the flags of COCO-like datasets), for
    pycocotools: how YOLO datasets are scored (``detpretrain.data.yolo``). Area is the box's, in pixels."""
    images, annotations = [], []
    for entry in dataset.entries():
        images.append({"id": entry.image_id, "width": entry.width, "height": entry.height, "file_name": entry.name})
        for box, label, flag in zip(entry.boxes.tolist(), entry.labels.tolist(), entry.flags.tolist(), strict=True):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": entry.image_id,
                    "category_id": dataset.label_to_category[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(flag) if dataset.flag_key == "iscrowd" else 0,
                }
            )
    categories = [{"id": c.id, "name": c.name} for c in dataset.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def evaluation_ground_truth(dataset: DetectionDataset) -> Any:
    """What ``make_evaluator`` scores ``dataset`` against, loaded once: its VOCdevkit image set, its XML files read
    by the VOC evaluator, its COCO / LVIS json, or (YOLO) ``coco_ground_truth``. Raises EvaluationInputError."""
    from detpretrain import evaluation

    if isinstance(dataset, VocDataset):
        ((year, image_set),) = dataset.image_sets
        names = dataset.class_names[1:]
        return evaluation.load_voc_ground_truth(dataset.voc_root, year=year, image_set=image_set, class_names=names)
    if isinstance(dataset, VocFolderDataset):
        xml_files = {e.name: dataset.ann_dir / f"{e.name}.xml" for e in dataset.entries()}
        return evaluation.voc_folder_ground_truth(
            xml_files, class_names=dataset.class_names[1:], source=str(dataset.ann_dir)
        )
    if isinstance(dataset, LvisDataset):
        return evaluation.load_lvis_ground_truth(dataset.ann_file)
    if isinstance(dataset, CocoDataset):
        return evaluation.load_coco_ground_truth(dataset.ann_file)
    return evaluation.load_coco_ground_truth(coco_ground_truth(dataset))


def make_evaluator(dataset: DetectionDataset, ground_truth: Any, *, iou_types: Sequence[str] = ("bbox",)):
    """The evaluator of ``dataset``'s metric: VOC's (VOCdevkit and VOC folders), LVIS's, else COCO's (COCO, YOLO)."""
    from detpretrain import evaluation

    if isinstance(dataset, VocDataset | VocFolderDataset):
        return evaluation.VocEvaluator(ground_truth, label_to_category=dataset.label_to_category)
    if isinstance(dataset, LvisDataset):
        return evaluation.LvisEvaluator(ground_truth, iou_types=iou_types, label_to_category=dataset.label_to_category)
    return evaluation.CocoEvaluator(ground_truth, iou_types=iou_types, label_to_category=dataset.label_to_category)


def image_level_labels(dataset: DetectionDataset) -> tuple[list[str], list[np.ndarray]]:
    """(image paths, per image the 0-based class indices present) of a detection dataset: PreDet's image-level
    labels (``detpretrain.data.labelled_images.from_detection_dataset``)."""
    paths, labels = [], []
    for entry in dataset.entries():
        paths.append(entry.path)
        labels.append(np.unique(entry.labels) - 1)
    return paths, labels
