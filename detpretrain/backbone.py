"""Detection backbones: any timm ``features_only`` model, its stride 4..32 levels, optionally topped with an FPN.

Levels. A detector reads the maps at strides 4, 8, 16, 32 (C2-C5 in ResNet terms; RetinaNet C3-C5, the C4 model C4
and C5). ``choose_levels`` finds them in the model's timm ``feature_info`` (built on the meta device: no weights, no
memory), whatever their indices: for each stride it takes the LAST feature index with that stride, timm's own
convention (EfficientNet and MobileNet list several blocks per stride; the deepest is the stage's output). ResNet
gives indices (1, 2, 3, 4), ConvNeXt (0, 1, 2, 3), EfficientNet (1, 2, 3, 4) = blocks 1, 2, 4, 6. A model without
those strides (a plain ViT: every level at stride 16), with NHWC maps, or that cannot run on an image of any size is
refused with a ``BackboneError`` that says what is missing.

Stages (``body_stages``): the stem is every parameter before the module that produces the stride-4 level; stage k
(k = 1..4) ends with the module that produces the k-th level (strides 4, 8, 16, 32) and starts after stage k - 1:
``conv1, bn1`` + ``layer1`` .. ``layer4`` in a ResNet, ``stem`` + ``s1`` .. ``s4`` in a RegNet, ``stem_0, stem_1``
+ ``stages_0`` .. ``stages_3`` in a ConvNeXt, ``conv_stem, bn1, blocks.0`` + ``blocks.1``, ``blocks.2``,
``blocks.3-4``, ``blocks.5-6`` in an EfficientNet. Parameters are taken in registration order, which is forward
order in timm's feature models (its FeatureListNet is built on that assumption too).

Pre-training and fine-tuning differ in how they treat normalization and early stages, and that choice moves AP by
about two points (../shared/USERS.md, item 3), so each is an explicit setting here:

- ``norm``: ``"bn"`` (trained BatchNorm: PreDet pre-training starts from scratch and trains BN, predet.txt §4.1, and
  PreDet's fine-tuning protocol trains it too, §4.2), ``"frozen_bn"`` (statistics and affine fixed: the Jigsaw paper's
  fine-tuning, montage_jigsaw.txt §4.1, and torchvision's standard protocol), ``"syncbn"`` (BN synchronized across
  processes: our reading of PreDet's "fine-tuned without freezing any layers" on many GPUs), ``"gn"`` (GroupNorm with
  32 groups: the papers' setting for training detectors from scratch, after He et al. [P19]). Every setting acts on
  BatchNorm only; other norms (ConvNeXt's LayerNorm2d) are left as they are and train under all four. ``"gn"`` on a
  model without BatchNorm would change nothing and is refused. ``norm_layers`` counts what a body ends up with.
- ``frozen_stages``: how many of stem, stage 1, stage 2, ... get ``requires_grad=False`` (detectron2's FREEZE_AT; the
  standard protocol freezes 2: the stem and stage 1).

BN is frozen after the model is built, with timm's own ``freeze_batch_norm_2d`` (it also handles RegNet's fused
``BatchNormAct2d``); passing torchvision's ``FrozenBatchNorm2d`` as timm's ``norm_layer`` fails (DESIGN.md). GN
replaces BN after the build too (``batch_norm_to_group_norm``): timm's ``norm_layer`` argument would swap
ConvNeXt's LayerNorm and breaks EfficientNet's and MobileNet's builders.

Shapes: images ``(B, 3, H, W)``; ``body(images)`` is a list of ``(B, C_i, H / r_i, W / r_i)`` with reductions
``r = (4, 8, 16, 32)`` for the default levels; ``TimmFPN(images)`` is an ordered dict ``{"0": P2, "1": P3, "2": P4,
"3": P5, "pool": P6}`` of ``(B, out_channels, ...)`` maps, the names torchvision's detection heads expect.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from math import gcd
from typing import Any

import timm
import torch
from timm.layers import GroupNorm, GroupNormAct, convert_sync_batchnorm, freeze_batch_norm_2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

__all__ = [
    "FPN_STRIDES",
    "NORMS",
    "BackboneError",
    "TimmFPN",
    "batch_norm_to_group_norm",
    "body_stages",
    "choose_levels",
    "create_body",
    "feature_levels",
    "feature_module_path",
    "freeze_stages",
    "group_norm",
    "norm_layers",
]

NORMS = ("bn", "frozen_bn", "syncbn", "gn")
FPN_STRIDES = (4, 8, 16, 32)  # C2-C5: the levels of the R-CNN FPN, and of the stages that can be frozen
GN_GROUPS = 32
_NORM_ACT_ARGS = {"apply_act", "act_layer", "act_kwargs"}
# The image a candidate body must turn into maps at its feature_info strides (on the meta device: no compute).
# Detection pads images to multiples of 32, not to the model's pre-training size; a model that takes only its own
# size (Swin's windows at 224) fails here, not in the first training step.
_CHECK_SIZE = (256, 320)


class BackboneError(ValueError):
    """A timm model that cannot serve as this detector's backbone; the one-line message says what it lacks."""


def group_norm(num_channels: int, **kwargs) -> nn.Module:
    """GroupNorm where timm would build a BatchNorm: 32 groups (Wu & He), or gcd(32, C) when 32 does not divide C.

    RegNet widths are multiples of 8, not 32 (``regnety_640`` starts at 328 channels), hence the gcd: our choice.
    Architectures that fuse norm and activation (RegNet) call the norm layer with activation arguments and get
    timm's ``GroupNormAct``; the others (ResNet) call it with the channel count (and device/dtype) and get a plain
    ``GroupNorm``.
    """
    num_groups = gcd(GN_GROUPS, num_channels)
    if _NORM_ACT_ARGS & kwargs.keys():
        return GroupNormAct(num_channels, num_groups=num_groups, **kwargs)
    return GroupNorm(num_channels, num_groups=num_groups, **kwargs)


# ------------------------------------------------------------------------------------------------------------ levels
def feature_levels(name: str, **timm_kwargs) -> list[dict[str, Any]]:
    """Every level timm's ``features_only`` model of ``name`` offers: ``index``, ``stride``, ``channels``, ``module``.

    Read from the model's ``feature_info``, built on the meta device: no weights, no memory, no download.
    """
    model = _meta_features(name, None, **timm_kwargs)
    return [
        {"index": i, "stride": int(d["reduction"]), "channels": int(d["num_chs"]), "module": d["module"]}
        for i, d in enumerate(model.feature_info.info)
    ]


def choose_levels(name: str, strides: tuple[int, ...] = FPN_STRIDES, *, needed_by: str = "the FPN", **timm_kwargs):
    """The feature indices of ``name`` at ``strides``: for each, the last index with that stride (``feature_levels``).

    Raises ``BackboneError`` when a stride is missing, naming the strides the model has and ``needed_by`` (what needs
    them, for the message: "the FPN", "RetinaNet's FPN", ...). The model, with those levels, is then run on the meta
    device on a 256 x 320 image: one whose maps are not ``(B, C, H / stride, W / stride)`` (Swin's NHWC), or that
    takes only its pre-training size, is refused here rather than in the first training step.
    """
    levels = feature_levels(name, **timm_kwargs)
    last = {level["stride"]: level["index"] for level in levels}  # later indices overwrite: the deepest wins
    missing = [s for s in strides if s not in last]
    if missing:
        have = tuple(level["stride"] for level in levels)
        raise BackboneError(
            f"{name}: its features_only levels have strides {have}, but {needed_by} needs strides "
            f"{', '.join(map(str, strides))} (no level at {', '.join(map(str, missing))})"
        )
    indices = tuple(last[s] for s in strides)
    model = _meta_features(name, indices, **timm_kwargs)
    output_fmt = str(getattr(model, "output_fmt", "NCHW")).rsplit(".", 1)[-1]
    if output_fmt != "NCHW":
        raise BackboneError(f"{name}: its features_only maps are {output_fmt}, but the detectors take NCHW maps")
    height, width = _CHECK_SIZE
    try:
        with torch.device("meta"), torch.no_grad():
            maps = model(torch.empty(1, 3, height, width))
    except Exception as err:  # a foreign model's forward can fail in any way: refused with its reason
        raise BackboneError(
            f"{name}: its features_only model does not run on a {height}x{width} image ({_first_line(err)}); "
            "detectors feed images of any size"
        ) from err
    shapes = [tuple(m.shape[1:]) for m in maps]
    expected = [(levels[i]["channels"], height // levels[i]["stride"], width // levels[i]["stride"]) for i in indices]
    if shapes != expected:
        raise BackboneError(
            f"{name}: on a {height}x{width} image its levels {indices} give maps {shapes}, not the (C, H, W) "
            f"{expected} its feature_info states"
        )
    return indices


def _meta_features(name: str, out_indices: tuple[int, ...] | None, **timm_kwargs) -> nn.Module:
    kwargs = dict(timm_kwargs, pretrained=False, features_only=True)
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    try:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    except (RuntimeError, AssertionError, AttributeError, TypeError, ValueError, KeyError) as err:
        raise BackboneError(f"{name}: timm builds no features_only model of it ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# -------------------------------------------------------------------------------------------------------------- body
def create_body(
    name: str,
    *,
    pretrained: bool = False,
    out_indices: tuple[int, ...] | None = None,
    norm: str = "bn",
    frozen_stages: int = 0,
    **timm_kwargs,
) -> nn.Module:
    """A timm ``features_only`` backbone with the given normalization and frozen stages.

    ``name`` is anything ``timm.create_model`` takes: ``"resnet50"``, a zoo tag ``"resnet50.jigsaw"``, or
    ``"hf-hub:org/repo"``; ``timm_kwargs`` pass through (e.g. ``pretrained_cfg_overlay=dict(file=...)``).
    ``out_indices``: the feature indices to return; None: the stride 4, 8, 16, 32 levels (``choose_levels``).
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if norm == "gn" and pretrained:
        raise ValueError(
            f"norm='gn' replaces BatchNorm, so the pre-trained BN weights of {name!r} cannot load; GroupNorm is "
            "for training from scratch (pretrained=False), as in the papers' from-scratch baselines"
        )
    if out_indices is None:
        out_indices = choose_levels(name, FPN_STRIDES, **timm_kwargs)
    body = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=out_indices, **timm_kwargs)
    if norm == "gn" and batch_norm_to_group_norm(body) == 0:
        raise BackboneError(
            f"{name}: norm='gn' replaces BatchNorm, and this model has none (its norm layers: "
            f"{norm_layers(body) or 'none'}, left as they are under every norm setting): drop norm='gn'"
        )
    if norm == "frozen_bn":
        body = freeze_batch_norm_2d(body)
    elif norm == "syncbn":
        body = convert_sync_batchnorm(body)
    freeze_stages(body, frozen_stages)
    return body


def batch_norm_to_group_norm(module: nn.Module) -> int:
    """Replace every ``BatchNorm2d`` in ``module`` by GroupNorm (``group_norm``'s groups), in place; returns how many.

    timm's fused ``BatchNormAct2d`` becomes ``GroupNormAct`` with the same activation and dropout. The affine values
    are copied, so an architecture's own init (ResNet's zero-init of each block's last norm) carries over.
    """
    replaced = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.BatchNorm2d):
                continue
            channels = child.num_features
            if hasattr(child, "act"):  # timm's BatchNormAct2d
                norm = GroupNormAct(channels, num_groups=gcd(GN_GROUPS, channels), affine=child.affine, apply_act=False)
                norm.act, norm.drop = child.act, child.drop
            else:
                norm = GroupNorm(channels, num_groups=gcd(GN_GROUPS, channels), affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                    norm.bias.copy_(child.bias)
            setattr(parent, child_name, norm)
            replaced += 1
    return replaced


def norm_layers(module: nn.Module) -> dict[str, int]:
    """``{class name: count}`` of the normalization layers in ``module`` (for eval.json): every module whose class
    name says Norm and that holds no other such module (a ``ConvNormAct`` counts as its ``BatchNormAct2d``)."""

    def is_norm(m: nn.Module) -> bool:
        return "Norm" in type(m).__name__

    counts = Counter(type(m).__name__ for m in module.modules() if is_norm(m) and not any(map(is_norm, m.children())))
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------------------------ stages
def feature_module_path(body: nn.Module, feature_module: str) -> str | None:
    """The path in ``body`` of the module feature_info calls ``feature_module``, or None when the body lacks it.

    timm's FeatureListNet flattens one level of Sequential (``stages.0`` -> ``stages_0``); FeatureGetterNet and
    FeatureHookNet hold the model under ``model.``; EfficientNet's own feature class keeps the names.
    """
    candidates = (feature_module, feature_module.replace(".", "_", 1), f"model.{feature_module}")
    for path in candidates:
        try:
            body.get_submodule(path)
        except AttributeError:
            continue
        return path
    return None


def body_stages(body: nn.Module) -> list[dict[str, Any]]:
    """The body's stem and stages 1..4 (the levels at strides 4..32 it holds), each with its parameter names.

    Each entry: ``name`` ("stem", "stage1" ..), ``stride`` (None for the stem), ``module`` (the path of the module
    that produces the stage's level), ``modules`` (the body's modules holding the stage's parameters and buffers:
    frozen BN has only buffers) and ``parameters``. A body truncated at res4 (the C4 model's) has stages 1..3.
    Anything after the last stage (nothing, in timm's CNNs) is left out.
    """
    last = {int(d["reduction"]): d["module"] for d in body.feature_info.info}  # the deepest module per stride
    ends: list[tuple[int, str]] = []
    for stride in FPN_STRIDES:
        path = feature_module_path(body, last[stride]) if stride in last else None
        if path is not None:  # a body truncated at res4 (the C4 model's) lacks the stride-32 stage
            ends.append((stride, path))
    if not ends:
        raise BackboneError(f"{type(body).__name__}: no level at strides {FPN_STRIDES}, so no stages to name")
    stages: list[dict[str, Any]] = [{"name": "stem", "stride": None, "module": None, "modules": [], "parameters": []}]
    stages += [
        {"name": f"stage{k}", "stride": stride, "module": path, "modules": [], "parameters": []}
        for k, (stride, path) in enumerate(ends, 1)
    ]
    depth = len(ends[0][1].split("."))  # name the other modules at the depth of the level modules
    current = 0
    for name, tensor in body.state_dict(keep_vars=True).items():  # registration order: parameters and buffers
        owner = next((k for k, (_, path) in enumerate(ends, 1) if name.startswith(path + ".")), None)
        if owner is not None:
            if owner < current:
                raise RuntimeError(f"{name} (stage {owner}) is registered after stage {current}'s parameters")
            current = owner
            unit = ends[owner - 1][1]
        else:
            owner = current + 1 if current > 0 else 0  # after stage k, not in its module: stage k + 1
            parts = name.split(".")
            unit = ".".join(parts[: max(1, min(depth, len(parts) - 1))])
        if owner >= len(stages):
            continue
        if unit not in stages[owner]["modules"]:
            stages[owner]["modules"].append(unit)
        if isinstance(tensor, nn.Parameter):
            stages[owner]["parameters"].append(name)
    return stages


def freeze_stages(body: nn.Module, frozen_stages: int) -> None:
    """Stop gradients into the stem (``frozen_stages >= 1``) and stages 1 .. ``frozen_stages - 1`` (``body_stages``:
    ``conv1 .. layer1`` in a ResNet, ``stem, s1`` in a RegNet, ``stem_0 .. stages_0`` in a ConvNeXt)."""
    if frozen_stages <= 0:
        return
    stages = body_stages(body)
    if frozen_stages > len(stages):
        raise ValueError(f"frozen_stages={frozen_stages}, but this backbone has a stem and {len(stages) - 1} stages")
    frozen = {name for stage in stages[:frozen_stages] for name in stage["parameters"]}
    for name, param in body.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


class TimmFPN(nn.Module):
    """A timm ``features_only`` body with torchvision's FeaturePyramidNetwork on top (Lin et al., FPN).

    ``out_channels`` is the attribute torchvision's detectors read. ``extra_blocks`` defaults to a max-pooled P6 on
    top of P5, as in Faster / Mask R-CNN (anchors 32..512 on P2..P6); RetinaNet passes ``LastLevelP6P7``.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: type[nn.Module] | None = None,
    ):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.feature_info.channels(),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(images)
        return self.fpn(OrderedDict((str(level), feature) for level, feature in enumerate(features)))
