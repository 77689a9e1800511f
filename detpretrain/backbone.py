"""Detection backbones: a timm ``features_only`` CNN, optionally topped with torchvision's FPN.

Pre-training and fine-tuning differ in how they treat normalization and early stages, and that choice moves AP by
about two points (../shared/USERS.md, item 3), so each is an explicit setting here:

- ``norm``: ``"bn"`` (trained BatchNorm: PreDet pre-training starts from scratch and trains BN, predet.txt §4.1, and
  PreDet's fine-tuning protocol trains it too, §4.2), ``"frozen_bn"`` (statistics and affine fixed: the Jigsaw paper's
  fine-tuning, montage_jigsaw.txt §4.1, and torchvision's standard protocol), ``"syncbn"`` (BN synchronized across
  processes: our reading of PreDet's "fine-tuned without freezing any layers" on many GPUs), ``"gn"`` (GroupNorm with
  32 groups: the papers' setting for training detectors from scratch, after He et al. [P19]).
- ``frozen_stages``: how many of stem, stage 1, stage 2, ... get ``requires_grad=False`` (detectron2's FREEZE_AT; the
  standard protocol freezes 2: the stem and stage 1).

BN is frozen after the model is built, with timm's own ``freeze_batch_norm_2d`` (it also handles RegNet's fused
``BatchNormAct2d``); passing torchvision's ``FrozenBatchNorm2d`` as timm's ``norm_layer`` fails (DESIGN.md).

Shapes: images ``(B, 3, H, W)``; ``body(images)`` is a list of ``(B, C_i, H / r_i, W / r_i)`` with reductions
``r = (4, 8, 16, 32)`` for ``out_indices=(1, 2, 3, 4)``; ``TimmFPN(images)`` is an ordered dict ``{"0": P2, "1": P3,
"2": P4, "3": P5, "pool": P6}`` of ``(B, out_channels, ...)`` maps, the names torchvision's detection heads expect.
"""

from __future__ import annotations

from collections import OrderedDict
from math import gcd

import timm
import torch
from timm.layers import GroupNorm, GroupNormAct, convert_sync_batchnorm, freeze_batch_norm_2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

__all__ = ["NORMS", "create_body", "freeze_stages", "group_norm", "TimmFPN"]

NORMS = ("bn", "frozen_bn", "syncbn", "gn")
GN_GROUPS = 32
_NORM_ACT_ARGS = {"apply_act", "act_layer", "act_kwargs"}


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


def create_body(
    name: str,
    *,
    pretrained: bool = False,
    out_indices: tuple[int, ...] = (1, 2, 3, 4),
    norm: str = "bn",
    frozen_stages: int = 0,
    **timm_kwargs,
) -> nn.Module:
    """A timm ``features_only`` backbone with the given normalization and frozen stages.

    ``name`` is anything ``timm.create_model`` takes: ``"resnet50"``, a zoo tag ``"resnet50.jigsaw"``, or
    ``"hf-hub:org/repo"``; ``timm_kwargs`` pass through (e.g. ``pretrained_cfg_overlay=dict(file=...)``).
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if norm == "gn":
        if pretrained:
            raise ValueError(
                f"norm='gn' replaces BatchNorm, so the pre-trained BN weights of {name!r} cannot load; GroupNorm is "
                "for training from scratch (pretrained=False), as in the papers' from-scratch baselines"
            )
        timm_kwargs["norm_layer"] = group_norm
    body = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=out_indices, **timm_kwargs)
    if norm == "frozen_bn":
        body = freeze_batch_norm_2d(body)
    elif norm == "syncbn":
        body = convert_sync_batchnorm(body)
    freeze_stages(body, frozen_stages)
    return body


def freeze_stages(body: nn.Module, frozen_stages: int) -> None:
    """Stop gradients into the stem (``frozen_stages >= 1``) and stages 1 .. ``frozen_stages - 1``.

    A timm ``features_only`` model lists its stem and stages as ordered children; ``feature_info`` names the module
    that ends each (index 0: the stem). Everything up to and including the module that ends stage
    ``frozen_stages - 1`` is frozen, whatever the architecture calls its parts (``conv1 .. layer1`` in a ResNet,
    ``stem, s1`` in a RegNet).
    """
    if frozen_stages <= 0:
        return
    stage_ends = [info["module"].split(".")[0] for info in body.feature_info.info]
    if frozen_stages > len(stage_ends):
        raise ValueError(
            f"frozen_stages={frozen_stages}, but this backbone has a stem and {len(stage_ends) - 1} stages"
        )
    last_frozen = stage_ends[frozen_stages - 1]
    for child_name, child in body.named_children():
        child.requires_grad_(False)
        if child_name == last_frozen:
            return
    raise RuntimeError(f"stage module {last_frozen!r} is not a child of {type(body).__name__}")


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
