"""Jigsaw assembly (§3.2, Fig. 4) with the per-sample augmentation of §4.1: four samples stitched into one image.

``papers/montage_jigsaw.txt`` §3.2: 2 S-samples, 1 T-sample and 1 W-sample drawn at random from their groups are
stitched into the four regions of the template (``detpretrain.jigsaw.template``); a sample that does not match its
region is zero-padded or randomly cropped, never warped or resized (Tab. 1 compares warping and resizing).
§4.1: each sample is first scaled by a ratio drawn from [0.8, 1.5] keeping its aspect ratio and flipped with
probability 0.5; the assembled image is normalized with the ImageNet mean and std after stitching.

Glossary:

    R = 4          template regions in REGION_NAMES order (TL, TR, BL, BR)
    H, W           canvas (assembled image) height and width
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from detpretrain.jigsaw.samples import JigsawSample, JigsawSamples, SampleDirError
from detpretrain.jigsaw.template import GROUPS, JigsawTemplate, group_name

__all__ = [
    "FIT_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JigsawImage",
    "assemble_jigsaw",
    "normalize_jigsaw_image",
    "sample_jigsaw",
]

# §4.1 "Pre-training Augmentation": normalization after stitching (the ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FIT_MODES = ("pad_crop", "warp", "resize")  # §3.2's pad & crop; Tab. 1's warp and resize


class JigsawImage(NamedTuple):
    """One assembled image. Per-region fields are in REGION_NAMES order."""

    image: Tensor  # (3, H, W) uint8, zero where no sample pixel landed
    labels: Tensor  # (R,) int64: the label of the sample in each region
    content_boxes: Tensor  # (R, 4) int64 xyxy on the canvas: where sample pixels landed (the rest is padding)
    # (R, 4) int64 xyxy in the sample as given (before scaling and flipping): the window that, scaled to the content
    # box's size and then flipped if ``flipped``, fills the content box
    source_boxes: Tensor
    scales: Tensor  # (R,) float64: the drawn scale ratio of each region's sample
    flipped: Tensor  # (R,) bool
    input_index: Tensor  # (R,) int64: which input sits there (0, 1: the two squares as given, 2: tall, 3: wide)


def _fit_axis(length: int, region: int, scale: float, u: float) -> tuple[int, int, int, int]:
    """Pad & crop along one axis (§3.2): (offset in the region, window start in the sample, window length, length on
    the canvas), for a sample of ``length`` pixels scaled by ``scale`` into a region of ``region`` pixels.

    When the scaled sample fits (round(length * scale) <= region), the whole sample is scaled and zero-padded at a
    random offset. Otherwise a random crop of the scaled sample fills the region: the window of the sample that
    lands there, round(region / scale) pixels at a random start, is what gets scaled (cropping first resizes a
    fraction of a large sample instead of all of it). The placed length then differs from window * scale by at most
    0.5 * max(1, scale) pixels, as the rounded side of a padded sample does by 0.5: a relative scale error under
    0.8% for regions of 96 pixels or more (under 2.4% for the 32-pixel regions of tiny96).
    """
    scaled = max(1, round(length * scale))
    if scaled <= region:
        return min(int(u * (region - scaled + 1)), region - scaled), 0, length, scaled
    window = min(length, max(1, round(region / scale)))
    return 0, min(int(u * (length - window + 1)), length - window), window, region


def assemble_jigsaw(
    *,
    squares: tuple[JigsawSample, JigsawSample],
    tall: JigsawSample,
    wide: JigsawSample,
    template: JigsawTemplate,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.8, 1.5),
    flip_prob: float = 0.5,
    fit: str = "pad_crop",
    borrowed_groups: Mapping[str, str] | None = None,
) -> JigsawImage:
    """Stitch 2 S-samples, 1 T-sample and 1 W-sample into one canvas (§3.2, Fig. 4; augmentation of §4.1).

    Per sample: a scale ratio r ~ U(scale_range), a horizontal flip with probability ``flip_prob``. The S-sample with
    the smaller area after scaling by its r (both sides times r, rounded) goes top-left, the other bottom-right
    (ties: the first given); T bottom-left, W top-right. Each sample is then brought to its region per ``fit``,
    scaled by its r on top of that, and zero-padded at a random offset where smaller than the region or cropped at a
    random offset where larger, per axis:

    - "pad_crop" (the paper's method, §3.2): the sample at its native size, so scaled by r only, keeping its aspect
      ratio; never warped or resized to fit.
    - "warp" (Tab. 1): each axis scaled to the region (size and aspect ratio change), then by r.
    - "resize" (Tab. 1): scaled keeping the aspect ratio to fit inside the region (size changes), then by r.

    So the three methods of Tab. 1 differ only in how a sample meets its region, and each keeps §4.1's scale
    augmentation and the placement rule, decided on the same draws (our reading, PAPER_NOTES.md "Assembly": the paper
    states the augmentation for every run). Only the cropped window is scaled (``_fit_axis`` bounds what that
    rounding changes). Scaling is torch's antialiased bilinear resize of the uint8 pixels. Randomness comes only from
    ``generator``: 16 uniforms per call (scale, flip, x offset, y offset per input). Returns the uint8 canvas;
    normalize with ``normalize_jigsaw_image`` after stitching (so padding becomes -mean/std, as in §4.1).
    ``borrowed_groups`` ({empty group: lender}, ``JigsawSamples.borrow_empty_groups``) lets a region take a sample of
    the group that stands in for its own.
    """
    if fit not in FIT_MODES:
        raise ValueError(f"unknown fit {fit!r}; choose one of {FIT_MODES}")
    inputs = [squares[0], squares[1], tall, wide]
    expected = ("S", "S", "T", "W")
    for k, (sample, group) in enumerate(zip(inputs, expected, strict=True)):
        if sample.image.dtype != torch.uint8 or sample.image.ndim != 3 or sample.image.shape[0] != 3:
            raise ValueError(
                f"input {k}: expected a (3, h, w) uint8 image, got {sample.image.dtype} {tuple(sample.image.shape)}"
            )
        h, w = sample.image.shape[1:]
        actual = group_name(w, h)
        if actual != group and actual != (borrowed_groups or {}).get(group):
            raise ValueError(f"input {k} ({w}x{h}, width/height {w / h:.2f}) is group {actual}, expected {group}")
    draws = torch.rand((4, 4), generator=generator, dtype=torch.float64)
    low, high = scale_range
    scales = (low + (high - low) * draws[:, 0]).tolist()
    flipped = (draws[:, 1] < flip_prob).tolist()
    offsets = draws[:, 2:].tolist()
    scaled = [
        (max(1, round(s.image.shape[1] * r)), max(1, round(s.image.shape[2] * r)))
        for s, r in zip(inputs, scales, strict=True)
    ]
    smaller_first = scaled[0][0] * scaled[0][1] <= scaled[1][0] * scaled[1][1]
    input_index = [0 if smaller_first else 1, 3, 2, 1 if smaller_first else 0]  # TL, TR (W), BL (T), BR

    canvas = torch.zeros((3, template.canvas_height, template.canvas_width), dtype=torch.uint8)
    content_boxes, source_boxes = [], []
    for (x1, y1, x2, y2), k in zip(template.region_boxes().tolist(), input_index, strict=True):
        region_h, region_w = y2 - y1, x2 - x1
        image = inputs[k].image
        h, w = image.shape[1:]
        if fit == "pad_crop":
            fit_y = fit_x = 1.0
        elif fit == "warp":
            fit_y, fit_x = region_h / h, region_w / w
        else:
            fit_y = fit_x = min(region_h / h, region_w / w)
        scale_y, scale_x = fit_y * scales[k], fit_x * scales[k]
        dx, sx, window_w, placed_w = _fit_axis(w, region_w, scale_x, offsets[k][0])
        dy, sy, window_h, placed_h = _fit_axis(h, region_h, scale_y, offsets[k][1])
        window = image[:, sy : sy + window_h, sx : sx + window_w]
        if (placed_h, placed_w) != (window_h, window_w):
            window = TF.resize(window, [placed_h, placed_w], antialias=True)
        if flipped[k]:
            window = window.flip(-1)
        canvas[:, y1 + dy : y1 + dy + placed_h, x1 + dx : x1 + dx + placed_w] = window
        content_boxes.append([x1 + dx, y1 + dy, x1 + dx + placed_w, y1 + dy + placed_h])
        source_boxes.append([sx, sy, sx + window_w, sy + window_h])
    return JigsawImage(
        image=canvas,
        labels=torch.tensor([inputs[k].label for k in input_index], dtype=torch.int64),
        content_boxes=torch.tensor(content_boxes, dtype=torch.int64),
        source_boxes=torch.tensor(source_boxes, dtype=torch.int64),
        scales=torch.tensor([scales[k] for k in input_index], dtype=torch.float64),
        flipped=torch.tensor([flipped[k] for k in input_index]),
        input_index=torch.tensor(input_index),
    )


def sample_jigsaw(
    samples: JigsawSamples,
    *,
    template: JigsawTemplate,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.8, 1.5),
    flip_prob: float = 0.5,
    fit: str = "pad_crop",
) -> tuple[JigsawImage, Tensor]:
    """Draw 2 S-, 1 T- and 1 W-sample (with replacement within each group: T and W are rarer) and assemble them.

    Returns the JigsawImage and the (R,) sample indices in region order. The training engine passes a generator
    seeded per (seed, step, index), which makes every assembled image reproducible on resume.
    """
    for g in GROUPS:
        if len(samples.group_indices[g]) == 0:
            raise SampleDirError(
                f"{samples.path}: no group-{g} samples; Jigsaw assembly needs S, T and W samples (§3.2): "
                "extract from more images, or pass --empty-group borrow"
            )
    picks = [
        samples.group_indices[g][torch.randint(len(samples.group_indices[g]), (1,), generator=generator)]
        for g in ("S", "S", "T", "W")
    ]
    indices = torch.cat(picks)
    loaded = [samples[int(i)] for i in indices]
    jigsaw = assemble_jigsaw(
        squares=(loaded[0], loaded[1]),
        tall=loaded[2],
        wide=loaded[3],
        template=template,
        generator=generator,
        scale_range=scale_range,
        flip_prob=flip_prob,
        fit=fit,
        borrowed_groups=samples.borrowed_groups,
    )
    return jigsaw, indices[jigsaw.input_index]


def normalize_jigsaw_image(images: Tensor) -> Tensor:
    """(..., 3, H, W) uint8 -> float32 normalized with the ImageNet mean/std (§4.1, after stitching)."""
    if images.dtype != torch.uint8 or images.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std
