"""Datasets: COCO, LVIS, VOC (VOCdevkit or any folder of XML files) and YOLO detection datasets, the data flags the
scripts share (``sources``) and ``python -m detpretrain.data inspect``, with their transforms, labelled-image lists
for PreDet, and the embedded default dataset (``synthetic_coco``) every script uses when it is given no data flags.

Submodules are imported on first use: ``python -m detpretrain.data.synthetic`` would otherwise find its module
already imported by this package and warn (runpy's "found in sys.modules").
"""

import importlib

_EXPORTS = {
    "SyntheticCoco": "synthetic",
    "synthetic_coco": "synthetic",
    "CocoDataset": "coco",
    "LvisDataset": "lvis",
    "RepeatFactorBatchSampler": "lvis",
    "VocDataset": "voc",
    "VocFolderDataset": "voc",
    "YoloDataset": "yolo",
    "DataFlags": "sources",
    "load_detection_data": "sources",
    "parse_image_sets": "voc",
    "DetectionDataset": "detection",
    "DatasetError": "detection",
    "Category": "detection",
    "collate_detection": "detection",
    "subset_indices": "detection",
    "train_transforms": "transforms",
    "eval_transforms": "transforms",
    "SampleTransform": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"detpretrain.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
