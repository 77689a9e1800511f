"""Datasets: COCO, LVIS and VOC readers, labelled-image lists, and the embedded default dataset (``synthetic_coco``)."""

__all__ = ["SyntheticCoco", "synthetic_coco"]


def __getattr__(name: str):
    # Imported on first use, not here: `python -m detpretrain.data.synthetic` would otherwise find the module
    # already imported by its package and warn (runpy's "found in sys.modules").
    if name in __all__:
        from detpretrain.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
