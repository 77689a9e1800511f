"""Parts that replace torchvision's in the fine-tuned detectors: float32 box decoding, detectron2's anchors, RoIAlign.

torchvision's detector classes take their anchor generator and poolers as arguments and keep their box coders as
attributes, so each part here is a small subclass or adapter put in place by ``detpretrain.detection.detectors``:

- ``Float32BoxCoder``: torchvision's ``BoxCoder`` casts the reference boxes to the deltas' dtype before decoding.
  Under bf16 autocast the deltas come out of a bf16 conv or linear layer, so anchors, proposals and detections are
  rounded to 8 significant bits: between 1024 and 2048 px every coordinate lands on a multiple of 8. This coder
  decodes in float32 (autocast off) whatever the deltas' dtype; encoding already runs in the boxes' float32.
- ``DetectorAnchorGenerator``: float32 anchors whatever the feature maps' dtype (torchvision takes theirs: bf16 under
  autocast), with torchvision's anchors or detectron2's (``exact=True``: ``DefaultAnchorGenerator`` with OFFSET 0,
  cell anchors not rounded to whole pixels, each level at its nominal stride).
- ``AlignedRoIPooler``: detectron2's ``ROIPooler`` with ``ROIAlignV2`` (``aligned=True``: the half-pixel shift;
  ``sampling_ratio=0``: ceil(bin size) samples per bin) behind torchvision's ``box_roi_pool`` / ``mask_roi_pool``
  interface. torchvision's ``MultiScaleRoIAlign`` has no ``aligned`` option.

Glossary (names and shapes):

    N                  images in the batch
    L                  pyramid levels that carry anchors (P2-P6: 5) or that are pooled (P2-P5: 4)
    A                  anchors per location (sizes x aspect ratios of a level)
    rel_codes          (K, 4 * C) or (K, 4) deltas (dx, dy, dw, dh) per box, divided by the coder's weights
    boxes              (K, 4) xyxy reference boxes (anchors or proposals), pixels of the resized, padded batch
    cell_anchors       list of L (A, 4) xyxy anchors centred on (0, 0)
    anchors            list of N (sum_l H_l * W_l * A, 4) xyxy: every level's grid, levels in order
    features           dict name -> (N, C, H_l, W_l): the FPN maps (or C4's single map "0")
    proposals          list of N (P_i, 4) xyxy boxes to pool; pooled: (sum_i P_i, C, S, S) in proposal order
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detpretrain.predet.croi import FPNRoIAlign

__all__ = ["AlignedRoIPooler", "DetectorAnchorGenerator", "Float32BoxCoder", "exact_cell_anchors"]


class Float32BoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` that decodes in float32 (or float64 when given), with autocast off."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        dtype = torch.promote_types(torch.promote_types(rel_codes.dtype, boxes.dtype), torch.float32)
        with torch.autocast(device_type=rel_codes.device.type, enabled=False):
            return super().decode_single(rel_codes.to(dtype), boxes.to(dtype))


def exact_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], *, dtype: torch.dtype) -> Tensor:
    """detectron2's cell anchors of one level: for size s and ratio r (height / width), w = s / sqrt(r) and
    h = s * sqrt(r), the box (-w/2, -h/2, w/2, h/2); computed in float64 and cast, as detectron2 builds them from
    Python floats. (A, 4), in torchvision's order (ratio-major), which is the order its heads' channels assume."""
    rows = []
    for ratio in aspect_ratios:
        for size in sizes:
            w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
            rows.append((-w / 2, -h / 2, w / 2, h / 2))
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


class DetectorAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with float32 anchors; ``exact=True`` gives detectron2's anchors.

    ``exact=False``: torchvision's anchors. Cell anchors are rounded to whole pixels (``generate_anchors``: the
    32 x 64 anchor of ratio 0.5 is (-23, -11, 23, 11)), and each level's stride is the padded batch size divided by
    the map size, rounded down. ``exact=True``: cell anchors unrounded (``exact_cell_anchors``: (-22.627, -11.314,
    22.627, 11.314)) and the level strides ``strides`` (4, 8, 16, 32, 64 for P2-P6). The strides differ where a map's
    size was rounded up: P6 of an 800 x 1216 batch is 13 x 19, at stride 800 // 13 = 61 vertically in torchvision
    and 64 in detectron2.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        *,
        exact: bool,
        strides: Sequence[int] | None = None,
    ):
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in aspect_ratios))
        if exact and (strides is None or len(strides) != len(sizes)):
            raise ValueError(f"exact anchors need one stride per level: {len(sizes)} levels, strides {strides}")
        self.exact = exact
        self.strides = tuple(strides) if exact else None
        if exact:
            self.cell_anchors = [
                exact_cell_anchors(s, r, dtype=torch.float32)
                for s, r in zip(self.sizes, self.aspect_ratios, strict=True)
            ]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [list(feature_map.shape[-2:]) for feature_map in feature_maps]
        device = feature_maps[0].device
        if self.strides is None:
            height, width = image_list.tensors.shape[-2:]
            strides = [(height // h, width // w) for h, w in grid_sizes]
        else:
            strides = [(stride, stride) for stride in self.strides]
        if len(strides) != len(self.cell_anchors):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.cell_anchors)} anchor levels")
        self.set_cell_anchors(torch.float32, device)
        per_level = self.grid_anchors(
            grid_sizes, [[torch.tensor(s, dtype=torch.int64, device=device) for s in pair] for pair in strides]
        )
        return [torch.cat(per_level) for _ in image_list.image_sizes]


class AlignedRoIPooler(nn.Module):
    """detectron2's ROIAlignV2 pooler for torchvision's ROI heads: ``pooler(features, proposals, image_shapes)``.

    Each box is pooled from the level k = floor(4 + log2(sqrt(wh) / 224)) clamped to the pooled levels (FPN Eq. 1,
    the rule of detectron2 and torchvision; the 1e-6 that keeps exact powers of two on their level is torchvision's,
    added to the log, where detectron2 adds 1e-8 inside it: only boxes within about 1e-6 of a level boundary
    differ). The maps are pooled in float32, the precision torchvision's roi_align computes in under autocast, and
    the result comes back in the maps' dtype, as from ``MultiScaleRoIAlign``.
    """

    def __init__(self, *, featmap_names: Sequence[str], strides: Sequence[int], output_size: int):
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError(f"one stride per pooled map: {list(featmap_names)} with strides {list(strides)}")
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size)
        self.roi_align = FPNRoIAlign(strides=strides, output_size=output_size, sampling_ratio=0, aligned=True)

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        maps = [features[name] for name in self.featmap_names]
        batch_index = torch.cat(
            [torch.full((len(boxes),), i, dtype=torch.int64, device=boxes.device) for i, boxes in enumerate(proposals)]
        )
        # FPNRoIAlign casts the boxes to the maps' dtype; float32 maps keep the boxes at full precision.
        pooled = self.roi_align([m.float() for m in maps], torch.cat(proposals).float(), batch_index)
        return pooled.to(maps[0].dtype)
