"""Fine-tuning protocols: named presets of independent settings, and the optimizer groups they imply.

The same backbone weights give AP two points apart under two protocols (../shared/USERS.md, item 3: MoCo v2's
R50 gives 40.4 under the self-supervised-transfer protocol and 38.0 under mmdetection's standard one), so the
protocol is a value that is built, overridden setting by setting, and written whole into eval.json
(``Protocol.as_dict``). The presets (../shared/PAPER_NOTES.md, "Fine-tuning protocols"):

- ``predet`` (predet.txt §4.2): "fine-tuned without freezing any layers", BN trained (SyncBN across GPUs: our
  reading), the standard 2-fc box head, mask head lr x4 ("scaling the lr by a factor of 4 worked best for all
  methods"), short side from {640, 672, ..., 800} "with random crop and flip", test at 800.
- ``predet_r50`` (predet.txt §5.2.1, Tab. 4): the same with the "deeper RoI-head (4 convolution and 1
  fully-connected layers) as per MoCo-v2 and InfoMin settings". Those settings (InfoMin's detectron2 config
  R_50_FPN_1x.yaml: ROI_BOX_HEAD FastRCNNConvFCHead, NUM_CONV 4, NUM_FC 1, NORM SyncBN; ROI_MASK_HEAD NORM
  SyncBN) normalize the head convs with BN, not GN: ``head_norm="bn"``. They also put SyncBN in the FPN; PreDet
  names only the head, and its pre-trained FPN has no norm, so we keep ``fpn_norm="none"`` and the FPN loads.
- ``jigsaw`` (montage_jigsaw.txt §4.1): "batch normalization layers are frozen", images "resized to 1333x800 and
  randomly flipped with probability 0.5". The paper names neither a frozen stage nor a codebase, and fine-tunes
  ImageNet and Jigsaw backbones "with the same training settings": we take the default that every reference
  shares, the stem and stage 1 frozen (detectron2's FREEZE_AT 2, mmdetection's frozen_stages=1, torchvision's
  trainable_backbone_layers=3). Our reading, recorded.
- ``standard``: torchvision's references: frozen BN (statistics and affine parameters), stem and stage 1 frozen,
  800/1333, flip 0.5. mmdetection's defaults freeze the same stages and the BN statistics (``norm_eval=True``) but
  train the BN affine parameters of stages 2-4 (``requires_grad=True``): not this preset.

Detector defaults (``detector_defaults``): what fills the detector settings the papers leave to their codebase.
PreDet fine-tuned in detectron2, so the ``predet`` presets are ``"detectron2"`` on every point torchvision's
detectors let us set (``detpretrain.detection.detectors`` lists them: RoIAlign, RPN top-n, anchors); the others are
``"torchvision"``, torchvision's own values. Precise BN (``precise_bn_iters``): before every evaluation, BN
statistics are recomputed over the training batches of that many steps wherever BN is trained (detectron2's
PreciseBN hook with its TEST.PRECISE_BN.NUM_ITER 200, enabled in detectron2's SyncBN configs and in MoCo's BN
detection configs); frozen-BN models have nothing to recompute.

Who applies what: the model (``detpretrain.detection.build_detector``) applies the norms, frozen stages, heads and
the test resize; ``param_groups`` applies the lr multipliers and weight decay; the dataset transform
(``detpretrain.data.transforms``) applies ``random_crop``, then the train resize (``train_min_sizes``,
``train_max_size``; or the model does, with ``build_detector(train_resize="model")``), then ``flip_prob``: crop
before resize, as detectron2's DatasetMapper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from detpretrain.backbone import NORMS
from detpretrain.engine import unwrap_model

__all__ = [
    "BOX_HEADS",
    "DETECTOR_DEFAULTS",
    "HEAD_NORMS",
    "PRECISE_BN_ITERS",
    "PROTOCOLS",
    "Protocol",
    "get_protocol",
    "override_protocol",
    "param_groups",
    "parse_settings",
]

BOX_HEADS = ("2fc", "4conv1fc")
HEAD_NORMS = ("none", "bn", "gn")
DETECTOR_DEFAULTS = ("detectron2", "torchvision")
PRECISE_BN_ITERS = 200  # detectron2's TEST.PRECISE_BN.NUM_ITER
# Parameters of these modules are "norm" parameters for weight decay (detectron2's WEIGHT_DECAY_NORM). timm's
# BatchNormAct2d and GroupNormAct subclass them; frozen BN keeps its affine values as buffers, not parameters.
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
# torchvision's Mask R-CNN names: the 4 convs (mask_head) and the deconv + 1x1 predictor (mask_predictor). Both
# start from scratch, which is PreDet's reason for the larger lr (§4.2), so both get the multiplier.
MASK_HEAD_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")


@dataclass(frozen=True)
class Protocol:
    """A fine-tuning protocol: every setting that moves AP between papers, each independent of the others.

    Backbone: ``norm`` (``detpretrain.backbone.NORMS``: "bn" trained, "frozen_bn", "syncbn", "gn"),
    ``frozen_stages`` (detectron2's FREEZE_AT: 0 none, 1 stem, 2 stem + stage 1, ...), ``syncbn_when_distributed``
    (every trained BatchNorm becomes SyncBatchNorm when more than one process trains on CUDA).
    Heads: ``fpn_norm`` and ``head_norm`` ("none", "bn", "gn": the FPN convs; the box head convs and mask head
    convs), ``box_head`` ("2fc": torchvision's TwoMLPHead, 2 x 1024 fc; "4conv1fc": 4 x 256 conv + 1 x 1024 fc),
    ``detector_defaults`` ("detectron2" or "torchvision": whose values the detector takes where the papers are
    silent; ``detpretrain.detection.detectors``).
    Evaluation: ``precise_bn_iters`` (recompute trained BN statistics over this many training steps before each
    evaluation, as detectron2's PreciseBN; 0: off; no effect without trained BN).
    Optimizer: ``mask_head_lr_mult`` (lr multiplier of the mask head), ``norm_weight_decay`` (weight decay of norm
    parameters; None = the optimizer's weight decay).
    Data: ``train_min_sizes`` (short side drawn uniformly from these per image), ``train_max_size`` (long side cap),
    ``random_crop`` (None, or detectron2's "relative_range" crop: height and width each a uniform fraction in
    [min, 1] of the image, given as (min_h, min_w), taken before the resize), ``flip_prob`` (horizontal),
    ``test_min_size`` / ``test_max_size``. ``source``: where the preset comes from.
    """

    name: str
    norm: str
    frozen_stages: int
    syncbn_when_distributed: bool
    fpn_norm: str
    box_head: str
    head_norm: str
    detector_defaults: str
    precise_bn_iters: int
    mask_head_lr_mult: float
    norm_weight_decay: float | None
    train_min_sizes: tuple[int, ...]
    train_max_size: int
    random_crop: tuple[float, float] | None
    flip_prob: float
    test_min_size: int
    test_max_size: int
    source: str

    def __post_init__(self) -> None:
        _check_choice("norm", self.norm, NORMS)
        _check_choice("fpn_norm", self.fpn_norm, HEAD_NORMS)
        _check_choice("head_norm", self.head_norm, HEAD_NORMS)
        _check_choice("box_head", self.box_head, BOX_HEADS)
        _check_choice("detector_defaults", self.detector_defaults, DETECTOR_DEFAULTS)
        if not isinstance(self.precise_bn_iters, int) or self.precise_bn_iters < 0:
            raise ValueError(f"precise_bn_iters={self.precise_bn_iters!r}: use 0 (off) or a number of training steps")
        if not isinstance(self.frozen_stages, int) or self.frozen_stages < 0:
            raise ValueError(
                f"frozen_stages={self.frozen_stages!r}: use 0 (nothing frozen), 1 (stem), 2 (+stage 1) ..."
            )
        if not self.mask_head_lr_mult > 0:
            raise ValueError(f"mask_head_lr_mult={self.mask_head_lr_mult!r}: use a positive factor (1 = no change)")
        if self.norm_weight_decay is not None and self.norm_weight_decay < 0:
            raise ValueError(f"norm_weight_decay={self.norm_weight_decay!r}: use >= 0, or None for the optimizer's")
        sizes = tuple(self.train_min_sizes)
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"train_min_sizes={self.train_min_sizes!r}: give one or more positive short sides")
        object.__setattr__(self, "train_min_sizes", sizes)
        for name in ("train_max_size", "test_min_size", "test_max_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r}: use a positive number of pixels")
        if self.random_crop is not None:
            crop = tuple(self.random_crop)
            if len(crop) != 2 or not all(0 < f <= 1 for f in crop):
                raise ValueError(f"random_crop={self.random_crop!r}: use None or (min_h, min_w) fractions in (0, 1]")
            object.__setattr__(self, "random_crop", crop)
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob={self.flip_prob!r}: use a probability in [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        """Every setting (JSON-able), plus ``overrides``: the settings that differ from the preset of this name."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        preset = PROTOCOLS.get(self.name)
        out["overrides"] = (
            {}
            if preset is None
            else {
                f.name: _jsonable(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(preset, f.name)
            }
        )
        return out


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_PREDET = Protocol(
    name="predet",
    norm="bn",
    frozen_stages=0,  # "All models are fine-tuned without freezing any layers" (predet.txt §4.2)
    syncbn_when_distributed=True,  # BN trained across GPUs: our reading of §4.2 (PAPER_NOTES)
    fpn_norm="none",  # detectron2's default (FPN.NORM ""), and PreDet's pre-trained FPN has no norm
    box_head="2fc",  # "the standard 2-fc head" for every ResNeXt row (PAPER_NOTES)
    head_norm="none",  # detectron2's default for the mask head convs (ROI_MASK_HEAD.NORM "")
    detector_defaults="detectron2",  # PreDet fine-tuned in detectron2 (§4.1: "the default ... in [detectron2]")
    precise_bn_iters=PRECISE_BN_ITERS,  # BN is trained: detectron2's PreciseBN, as its SyncBN configs enable it
    mask_head_lr_mult=4.0,  # "scaling the lr by a factor of 4 worked best for all methods" (§4.2)
    norm_weight_decay=0.0,  # detectron2's SOLVER.WEIGHT_DECAY_NORM default; PreDet builds on detectron2 (§4.1)
    train_min_sizes=(640, 672, 704, 736, 768, 800),  # §4.2
    train_max_size=1333,  # detectron2's MAX_SIZE_TRAIN (not stated in the paper)
    # §4.2 says "random crop" only. Our choice: detectron2's RandomCrop with its default type and size
    # ("relative_range", 0.9), the crop PreDet's codebase offers, applied to every training image.
    random_crop=(0.9, 0.9),
    flip_prob=0.5,  # §4.2 "flip"; probability 0.5 is detectron2's RandomFlip default
    test_min_size=800,  # §4.2 "At test-time the shortest side is resized to 800"
    test_max_size=1333,  # detectron2's MAX_SIZE_TEST
    source="predet.txt §4.2",
)

PROTOCOLS: dict[str, Protocol] = {
    "predet": _PREDET,
    "predet_r50": dataclasses.replace(
        _PREDET,
        name="predet_r50",
        box_head="4conv1fc",  # predet.txt §5.2.1: "4 convolution and 1 fully-connected layers" (Tab. 4)
        head_norm="bn",  # InfoMin's / detectron2's syncbn config: box and mask head convs with (Sync)BN
        source="predet.txt §5.2.1, Tab. 4 (ResNet-50 rows); InfoMin detection/configs/R_50_FPN_1x.yaml",
    ),
    "jigsaw": Protocol(
        name="jigsaw",
        norm="frozen_bn",  # "The batch normalization layers are frozen during training" (montage_jigsaw.txt §4.1)
        frozen_stages=2,  # not stated: the default of detectron2, mmdetection and torchvision alike (our reading)
        syncbn_when_distributed=False,
        fpn_norm="none",
        box_head="2fc",
        head_norm="none",
        detector_defaults="torchvision",  # the paper names no codebase
        precise_bn_iters=PRECISE_BN_ITERS,  # a no-op under frozen BN; acts if --norm bn trains it
        mask_head_lr_mult=1.0,
        norm_weight_decay=None,  # no trainable norm in this protocol; None keeps a user's GN under plain decay
        train_min_sizes=(800,),  # "resized to 1333 x 800"
        train_max_size=1333,
        random_crop=None,
        flip_prob=0.5,  # "randomly flipped with probability 0.5"
        test_min_size=800,  # single scale: the test size equals the train size (not stated)
        test_max_size=1333,
        source="montage_jigsaw.txt §4.1",
    ),
    "standard": Protocol(
        name="standard",
        norm="frozen_bn",
        frozen_stages=2,  # torchvision's trainable_backbone_layers=3: conv1 and layer1 frozen
        syncbn_when_distributed=False,
        fpn_norm="none",
        box_head="2fc",
        head_norm="none",
        detector_defaults="torchvision",
        precise_bn_iters=PRECISE_BN_ITERS,  # a no-op under frozen BN; acts if --norm bn trains it
        mask_head_lr_mult=1.0,
        norm_weight_decay=None,  # torchvision's references: --norm-weight-decay unset
        train_min_sizes=(800,),
        train_max_size=1333,
        random_crop=None,
        flip_prob=0.5,
        test_min_size=800,
        test_max_size=1333,
        source="torchvision references/detection defaults",
    ),
}

_FIXED = ("name", "source")  # what a preset is; changing them would misreport the run


def get_protocol(name: str) -> Protocol:
    """The preset called ``name``."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol {name!r} is not one of {tuple(PROTOCOLS)}")
    return PROTOCOLS[name]


def override_protocol(protocol: Protocol, **settings: Any) -> Protocol:
    """``protocol`` with the named settings replaced (validated); ``as_dict()["overrides"]`` lists them."""
    names = {f.name for f in dataclasses.fields(Protocol)} - set(_FIXED)
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"unknown protocol setting(s) {unknown}: use {sorted(names)}")
    return dataclasses.replace(protocol, **settings)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean: use true or false")


def _parse_optional(parse):
    return lambda text: None if text.lower() == "none" else parse(text)


def _parse_tuple(parse):
    return lambda text: tuple(parse(part) for part in text.split(",") if part.strip())


_PARSERS = {
    "norm": str,
    "frozen_stages": int,
    "syncbn_when_distributed": _parse_bool,
    "fpn_norm": str,
    "box_head": str,
    "head_norm": str,
    "detector_defaults": str,
    "precise_bn_iters": int,
    "mask_head_lr_mult": float,
    "norm_weight_decay": _parse_optional(float),
    "train_min_sizes": _parse_tuple(int),
    "train_max_size": int,
    "random_crop": _parse_optional(_parse_tuple(float)),
    "flip_prob": float,
    "test_min_size": int,
    "test_max_size": int,
}


def parse_settings(items: Iterable[str]) -> dict[str, Any]:
    """``["box_head=4conv1fc", "train_min_sizes=640,800", "random_crop=none"]`` -> typed settings for
    ``override_protocol`` (the form a script's ``--protocol-set KEY=VALUE`` flag takes)."""
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"{item!r}: write a protocol setting as NAME=VALUE, e.g. box_head=4conv1fc")
        if key not in _PARSERS:
            raise ValueError(f"unknown protocol setting {key!r}: use one of {sorted(_PARSERS)}")
        try:
            settings[key] = _PARSERS[key](text.strip())
        except ValueError as err:
            raise ValueError(f"{item!r}: cannot read the value ({err})") from err
    return settings


def param_groups(model: nn.Module, *, base_lr: float, weight_decay: float, protocol: Protocol) -> list[dict[str, Any]]:
    """Optimizer param groups for ``protocol``: each has ``lr = base_lr * lr_scale`` and an ``lr_scale`` key
    (``detpretrain.engine.set_lr`` multiplies by it each step) and a ``name``.

    The mask head (torchvision's ``roi_heads.mask_head`` and ``roi_heads.mask_predictor``) gets
    ``protocol.mask_head_lr_mult``; parameters of norm layers get ``protocol.norm_weight_decay`` (None: the
    ``weight_decay`` of the rest; biases always get ``weight_decay``, as detectron2's WEIGHT_DECAY_BIAS default).
    Parameters with ``requires_grad=False`` (frozen stages) are left out.
    """
    if base_lr <= 0 or weight_decay < 0:
        raise ValueError(f"base_lr={base_lr!r}, weight_decay={weight_decay!r}: need base_lr > 0, weight_decay >= 0")
    model = unwrap_model(model)
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_MODULES) for p in m.parameters(recurse=False)}
    norm_decay = weight_decay if protocol.norm_weight_decay is None else protocol.norm_weight_decay
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mask = name.startswith(MASK_HEAD_PREFIXES)
        norm = id(param) in norm_params
        key = ("mask_head" if mask else "base", "norm" if norm else "other")
        if key not in groups:
            lr_scale = protocol.mask_head_lr_mult if mask else 1.0
            groups[key] = {
                "name": key[0] + ("_norm" if norm else ""),
                "params": [],
                "lr": base_lr * lr_scale,
                "lr_scale": lr_scale,
                "weight_decay": norm_decay if norm else weight_decay,
            }
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameter: check the protocol's frozen_stages")
    return [groups[key] for key in sorted(groups)]
