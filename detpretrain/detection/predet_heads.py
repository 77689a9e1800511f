"""PreDet's pre-trained heads into a fine-tuned detector: the RPN conv and the 2 x 1024 box head (our reading).

predet.txt §1: PreDet's design "has the advantage of making our model-architecture similar to Faster R-CNN"; §4.2:
the mask head is "initialized from scratch unlike other modules". Our reading (../shared/PAPER_NOTES.md, "Fine-tuning
protocols"): fine-tuning a PreDet export starts two more modules from its ``heads.safetensors`` (written by
``train_predet.py --export-heads``: the PreDet model's state dict without the ``fpn.`` keys), where shapes match:

    detector module         PreDet module           the same computation in both
    rpn.head.conv           crpn.head.conv          3x3 conv + ReLU, shared by the anchor levels P2-P6
    roi_heads.box_head      croi.head.box_head      torchvision's TwoMLPHead: fc6, fc7 (2 x 1024, ReLU after each)

Nothing else has a counterpart: the CRPN's dot-product layers score (query, anchor) pairs, not objectness; the CROI
similarity and regression projections compare two boxes; the classification head predicts image labels. A module
the detector lacks or builds otherwise (RetinaNet; a 4conv1fc box head; C4's RPN on res4's channels and res5 box
head) or that the export lacks (a PreDet trained without L_crpn) keeps its initialization, and the record says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from detpretrain.hub import read_weights

__all__ = ["HEADS_FILE", "HEAD_INIT", "load_predet_heads"]

HEADS_FILE = "heads.safetensors"
# detector module -> (PreDet module, {detector parameter: PreDet parameter}). torchvision's RPNHead holds its conv as
# Sequential(Conv2dNormActivation(conv, ReLU)), hence "0.0".
HEAD_INIT: dict[str, tuple[str, dict[str, str]]] = {
    "rpn.head.conv": ("crpn.head.conv", {"0.0.weight": "weight", "0.0.bias": "bias"}),
    "roi_heads.box_head": (
        "croi.head.box_head",
        {f"{fc}.{p}": f"{fc}.{p}" for fc in ("fc6", "fc7") for p in ("weight", "bias")},
    ),
}


def load_predet_heads(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Copy the ``HEAD_INIT`` modules of the PreDet heads file ``path`` into ``model`` where every key is there and
    every shape matches; returns the record: ``initialized`` ({detector module: PreDet module}) and
    ``not_initialized`` ({detector module: why})."""
    heads = read_weights(path)
    own = model.state_dict()
    values, initialized, not_initialized = {}, {}, {}
    for module, (source, names) in HEAD_INIT.items():
        pairs = {f"{module}.{mine}": f"{source}.{theirs}" for mine, theirs in names.items()}
        if not all(mine in own for mine in pairs):
            not_initialized[module] = f"this detector has no {module} of PreDet's form ({', '.join(names)})"
            continue
        if not all(theirs in heads for theirs in pairs.values()):
            not_initialized[module] = f"{path} has no {source} (pre-trained without that head)"
            continue
        mismatched = [(mine, theirs) for mine, theirs in pairs.items() if own[mine].shape != heads[theirs].shape]
        if mismatched:
            mine, theirs = mismatched[0]
            not_initialized[module] = (
                f"shapes differ: {theirs} {tuple(heads[theirs].shape)}, {mine} {tuple(own[mine].shape)}"
            )
            continue
        values.update({mine: heads[theirs] for mine, theirs in pairs.items()})
        initialized[module] = source
    model.load_state_dict(values, strict=False)
    return {"from": "export", "weights": str(path), "initialized": initialized, "not_initialized": not_initialized}
