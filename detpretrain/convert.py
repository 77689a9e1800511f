"""Convert an export (timm key names) to the key layouts of torchvision, detectron2 and mmdetection backbones.

Users of those frameworks ask for exactly this (USERS.md, 2): converters otherwise get written by hand in issue
threads. Every converter renames keys only; tensors are unchanged, so converted weights give the same features.

Supported (timm architecture -> target):

- torchvision: ResNet/ResNeXt/Wide-ResNet of the same name (timm and torchvision share the key names), and the
  RegNets that timm itself loads from torchvision checkpoints (``TORCHVISION_ARCHS``). The output is torchvision's
  model state dict without ``fc``: exactly the ``body`` of ``BackboneWithFPN`` (``resnet_fpn_backbone(...).body``).
- detectron2: the ResNet/ResNeXt/Wide-ResNet rows of ``TORCHVISION_ARCHS``, named as detectron2's
  ``tools/convert-torchvision-to-d2.py`` names them (``stem.conv1``, ``res2.0.conv1.norm``, ``shortcut``), in its
  ``.pkl`` format. detectron2 RegNets are not supported: detectron2 names them after pycls, and we have no
  reference layout to test against; use the timm backbone itself in detectron2 (detrex has one).
- mmdetection: the ResNet/ResNeXt rows that mmdet's ``ResNet``/``ResNeXt`` build (depths 18-152; ResNeXt with
  ``groups``/``base_width``), whose keys are torchvision's (mmdet loads ``torchvision://resnet50`` unchanged),
  saved as mmcv's ``{"state_dict": ..., "meta": ...}``. mmdet RegNets are RegNetX-only and named differently:
  not supported; use mmdet's ``TIMMBackbone`` (mmpretrain) with the export instead.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

TARGETS = ("torchvision", "detectron2", "mmdet")

# timm architecture -> torchvision builder with identical tensors. The ResNet family shares names; the RegNet pairs
# are the ones timm loads from torchvision's own checkpoints (their `tv2_in1k` / `swag` tags), so the shapes agree.
_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
_REGNETS = {
    "regnetx_004_tv": "regnet_x_400mf",
    "regnetx_008": "regnet_x_800mf",
    "regnetx_016": "regnet_x_1_6gf",
    "regnetx_032": "regnet_x_3_2gf",
    "regnetx_080": "regnet_x_8gf",
    "regnetx_160": "regnet_x_16gf",
    "regnetx_320": "regnet_x_32gf",
    "regnety_004": "regnet_y_400mf",
    "regnety_008_tv": "regnet_y_800mf",
    "regnety_016": "regnet_y_1_6gf",
    "regnety_032": "regnet_y_3_2gf",
    "regnety_080_tv": "regnet_y_8gf",
    "regnety_160": "regnet_y_16gf",
    "regnety_320": "regnet_y_32gf",
    "regnety_1280": "regnet_y_128gf",
}
TORCHVISION_ARCHS: dict[str, str] = {**{arch: arch for arch in _RESNETS}, **_REGNETS}

# mmdet's ResNet/ResNeXt arguments per architecture (mmdet/models/backbones/resnet.py, resnext.py). Wide ResNets
# are missing: mmdet's ResNet has no width-per-group argument for them.
MMDET_ARCHS: dict[str, dict] = {
    "resnet18": dict(type="ResNet", depth=18),
    "resnet34": dict(type="ResNet", depth=34),
    "resnet50": dict(type="ResNet", depth=50),
    "resnet101": dict(type="ResNet", depth=101),
    "resnet152": dict(type="ResNet", depth=152),
    "resnext50_32x4d": dict(type="ResNeXt", depth=50, groups=32, base_width=4),
    "resnext101_32x8d": dict(type="ResNeXt", depth=101, groups=32, base_width=8),
    "resnext101_64x4d": dict(type="ResNeXt", depth=101, groups=64, base_width=4),
}

# detectron2's RESNETS config per architecture: NUM_GROUPS, WIDTH_PER_GROUP (ResNeXt / Wide-ResNet widths).
DETECTRON2_ARCHS: dict[str, dict] = {
    "resnet18": dict(DEPTH=18, NUM_GROUPS=1, WIDTH_PER_GROUP=64, RES2_OUT_CHANNELS=64),
    "resnet34": dict(DEPTH=34, NUM_GROUPS=1, WIDTH_PER_GROUP=64, RES2_OUT_CHANNELS=64),
    "resnet50": dict(DEPTH=50, NUM_GROUPS=1, WIDTH_PER_GROUP=64),
    "resnet101": dict(DEPTH=101, NUM_GROUPS=1, WIDTH_PER_GROUP=64),
    "resnet152": dict(DEPTH=152, NUM_GROUPS=1, WIDTH_PER_GROUP=64),
    "resnext50_32x4d": dict(DEPTH=50, NUM_GROUPS=32, WIDTH_PER_GROUP=4),
    "resnext101_32x8d": dict(DEPTH=101, NUM_GROUPS=32, WIDTH_PER_GROUP=8),
    "resnext101_64x4d": dict(DEPTH=101, NUM_GROUPS=64, WIDTH_PER_GROUP=4),
    "wide_resnet50_2": dict(DEPTH=50, NUM_GROUPS=1, WIDTH_PER_GROUP=128),
    "wide_resnet101_2": dict(DEPTH=101, NUM_GROUPS=1, WIDTH_PER_GROUP=128),
}

_SUPPORTED = {"torchvision": TORCHVISION_ARCHS, "detectron2": DETECTRON2_ARCHS, "mmdet": MMDET_ARCHS}


class UnsupportedConversionError(ValueError):
    """The architecture has no layout in the requested framework."""


def _check_supported(arch: str, to: str) -> None:
    if to not in _SUPPORTED:
        raise UnsupportedConversionError(f"unknown conversion target {to!r}; choose one of {', '.join(TARGETS)}")
    if arch not in _SUPPORTED[to]:
        raise UnsupportedConversionError(
            f"no {to} layout for timm architecture {arch!r}; {to} supports {', '.join(sorted(_SUPPORTED[to]))}. "
            "Other architectures: use the timm backbone directly (timm.create_model(..., features_only=True))"
        )


def _backbone_only(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Refuse a state dict with a classifier: converters take an export, which has none."""
    heads = [k for k in state_dict if k.startswith(("fc.", "head."))]
    if heads:
        raise ValueError(
            f"{arch} weights hold classifier keys ({', '.join(heads[:4])}): convert an export made by "
            "detpretrain.save_pretrained, which is backbone-only"
        )
    return state_dict


def _regnet_to_torchvision(key: str) -> str:
    """timm RegNet names -> torchvision's (the inverse of timm.models.regnet._filter_fn's torchvision branch)."""
    key = re.sub(r"^stem\.conv\.", "stem.0.", key)
    key = re.sub(r"^stem\.bn\.", "stem.1.", key)
    # s{stage}.b{block, from 1} -> trunk_output.block{stage}.block{stage}-{block, from 0}
    key = re.sub(r"^s(\d+)\.b(\d+)\.", lambda m: f"trunk_output.block{m[1]}.block{m[1]}-{int(m[2]) - 1}.", key)
    for timm_name, tv_name in (
        (".conv1.conv.", ".f.a.0."),
        (".conv1.bn.", ".f.a.1."),
        (".conv2.conv.", ".f.b.0."),
        (".conv2.bn.", ".f.b.1."),
        (".se.fc1.", ".f.se.fc1."),
        (".se.fc2.", ".f.se.fc2."),
        (".conv3.conv.", ".f.c.0."),
        (".conv3.bn.", ".f.c.1."),
        (".downsample.conv.", ".proj.0."),
        (".downsample.bn.", ".proj.1."),
    ):
        key = key.replace(timm_name, tv_name)
    return key


def to_torchvision(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """torchvision's state dict for ``arch`` without ``fc``: loads into ``resnet_fpn_backbone(...).body``."""
    _check_supported(arch, "torchvision")
    state_dict = _backbone_only(state_dict, arch)
    if arch in _REGNETS:
        return {_regnet_to_torchvision(k): v for k, v in state_dict.items()}
    return dict(state_dict)


def _detectron2_name(key: str) -> str:
    """detectron2's name for a torchvision ResNet key, the renaming of detectron2's convert-torchvision-to-d2.py."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


def to_detectron2(state_dict: dict[str, torch.Tensor], arch: str) -> dict:
    """detectron2's checkpoint dict: ``{"model": {name: numpy array}, "__author__", "matching_heuristics"}``.

    ``num_batches_tracked`` is dropped: detectron2's ResNets use FrozenBatchNorm2d by default, which has no such
    buffer, and its own converted checkpoints carry none.
    """
    _check_supported(arch, "detectron2")
    state_dict = _backbone_only(state_dict, arch)
    model = {
        _detectron2_name(k): v.detach().cpu().numpy() for k, v in state_dict.items() if "num_batches_tracked" not in k
    }
    return {"model": model, "__author__": "detpretrain", "matching_heuristics": True}


def to_mmdet(state_dict: dict[str, torch.Tensor], arch: str) -> dict:
    """mmcv's checkpoint dict ``{"state_dict": ..., "meta": ...}`` for mmdet's ResNet/ResNeXt backbone."""
    _check_supported(arch, "mmdet")
    state_dict = _backbone_only(state_dict, arch)
    backbone = dict(MMDET_ARCHS[arch], init_cfg=dict(type="Pretrained", checkpoint="THIS_FILE.pth"))
    meta = {"converted_by": "detpretrain", "timm_arch": arch, "mmdet_backbone": backbone}
    return {"state_dict": dict(state_dict), "meta": meta}


def framework_config(arch: str, to: str) -> str:
    """The lines a user puts in the target framework's config to use the converted file (printed by the CLI)."""
    _check_supported(arch, to)
    if to == "torchvision":
        if arch in _REGNETS:
            return (
                f"model = torchvision.models.{TORCHVISION_ARCHS[arch]}(); "
                "model.load_state_dict(torch.load(FILE, weights_only=True), strict=False)  # only fc stays at init"
            )
        return (
            f"backbone = resnet_fpn_backbone(backbone_name={arch!r}, weights=None); "
            "backbone.body.load_state_dict(torch.load(FILE, weights_only=True))"
        )
    if to == "detectron2":
        resnets = ", ".join(f"{k}: {v}" for k, v in DETECTRON2_ARCHS[arch].items())
        return (
            f'MODEL.WEIGHTS: "FILE"; MODEL.RESNETS: {{{resnets}, STRIDE_IN_1X1: False}}; '
            "MODEL.PIXEL_MEAN: [123.675, 116.280, 103.530]; MODEL.PIXEL_STD: [58.395, 57.120, 57.375]; "
            'INPUT.FORMAT: "RGB"'
        )
    args = ", ".join(f"{k}={v!r}" for k, v in MMDET_ARCHS[arch].items())
    return f"backbone=dict({args}, style='pytorch', init_cfg=dict(type='Pretrained', checkpoint='FILE'))"


def convert(state_dict: dict[str, torch.Tensor], arch: str, to: str):
    """The converted object for ``to`` in {"torchvision", "detectron2", "mmdet"}."""
    _check_supported(arch, to)
    return {"torchvision": to_torchvision, "detectron2": to_detectron2, "mmdet": to_mmdet}[to](state_dict, arch)


def save_converted(converted, to: str, out: str | Path) -> Path:
    """Write a converted object: ``torch.save`` for torchvision and mmdet, pickle for detectron2's ``.pkl``.

    Pickle is written only to a file the user asked for on their own disk; nothing here reads one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if to == "detectron2":
        with tmp.open("wb") as f:
            pickle.dump(converted, f)
    else:
        torch.save(converted, tmp)
    tmp.replace(out)
    return out
