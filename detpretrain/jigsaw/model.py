"""The network Jigsaw pre-trains (§3.3, Fig. 5): a timm backbone built from scratch with a stated residual init, and
its final FC as a 1x1 convolution on the last feature map, so that every position is classified.

The residual init matters to Jigsaw more than to plain classification: the ERF measured at step 0 sets the labels of
the first 5k steps (§4.1). timm builds its residual networks with ``zero_init_last=True`` (each residual branch ends
in a BN of weight 0), so at step 0 every block is its shortcut: on resnet50 and a 224 canvas each cell's ERF is an
11 x 11 patch at the cell's top-left corner and 36 of 49 cells get one-hot labels, from an init choice rather than
from the network. ``create_backbone`` builds the branches as torchvision's ResNet does (BN weight 1), the usual base
of classification pre-training (PAPER_NOTES.md, "ERF"); timm's init stays an option. The step-0 ERF of every cell
then spreads past the cell; it stays centred on the cell's top-left corner, where strided convolutions put it
(``detpretrain.jigsaw.template.feature_region_index``).
"""

from __future__ import annotations

import inspect

import timm
import torch
from torch import Tensor, nn

__all__ = ["JigsawClassifier", "create_backbone", "has_zero_init_last"]


def has_zero_init_last(arch: str) -> bool:
    """Whether timm's ``arch`` takes ``zero_init_last`` (its residual networks do: ResNet, ResNeXt, RegNet, ...).

    Read from the model class's signature, built on the meta device (no memory, no init).
    """
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return "zero_init_last" in inspect.signature(type(model)).parameters


def create_backbone(arch: str, *, zero_init_last: bool = False) -> nn.Module:
    """The timm backbone Jigsaw pre-trains, randomly initialized, without classifier or pooling: ``forward_features``
    gives the stride-32 map and ``num_features`` its channels (``JigsawClassifier`` adds the dense head).

    Every residual branch starts as torchvision's ResNet starts it (its last BN's weight is 1), or as timm's does
    (weight 0: each block starts as its shortcut) with ``zero_init_last=True``. An architecture that takes no
    ``zero_init_last`` (``has_zero_init_last``) is built with its own init, and cannot be asked for timm's.
    """
    if not has_zero_init_last(arch):
        if zero_init_last:
            raise ValueError(
                f"timm's {arch} takes no zero_init_last, so it has no zero-initialized residual branches to ask for; "
                "drop --zero-init-last"
            )
        return timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
    return timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", zero_init_last=zero_init_last)


class JigsawClassifier(nn.Module):
    """A backbone with its final FC replaced by a 1x1 convolution on the last feature map (§3.3, Fig. 5).

    ``backbone`` is a timm model (``create_backbone``, or ``num_classes=0, global_pool=""``): ``forward_features`` gives
    the stride-32 map before pooling and ``num_features`` its channels. ``forward`` returns dense logits
    (B, num_classes, h, w) with num_classes = categories + 1 (background). The 1x1 convolution is linear, so the
    mean of its logits over any set of cells equals the FC applied to the mean feature there: the "global" and
    "block-wise" strategies of Tab. 2 are pooled dense logits (see detpretrain.losses).
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int) -> None:
        super().__init__()
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError("backbone needs an int num_features and forward_features (a timm model)")
        self.backbone = backbone
        self.classifier = nn.Conv2d(num_features, num_classes, kernel_size=1)

    def forward_features(self, images: Tensor) -> Tensor:
        features = self.backbone.forward_features(images)
        if features.ndim != 4:
            raise ValueError(f"forward_features must return (B, C, h, w), got {tuple(features.shape)}")
        return features

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.forward_features(images))

    @torch.no_grad()
    def feature_map_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the last feature map for height x width inputs, without side effects: one zero image in eval mode
        (BN normalizes with its running statistics and leaves them as they are), then the train/eval state is
        restored. A probe in train mode would move every BN running statistic towards one image's."""
        was_training = self.training
        self.eval()
        try:
            parameter = next(self.parameters())
            probe = torch.zeros((1, 3, height, width), device=parameter.device, dtype=parameter.dtype)
            height_out, width_out = self.forward_features(probe).shape[2:]
        finally:
            self.train(was_training)
        return int(height_out), int(width_out)
