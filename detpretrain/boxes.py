"""Box operations for PreDet's contrastive RPN and ROI head (``papers/predet.txt`` §3.2.1, §3.2.2).

Small functions, each stating its invariant: anchors on the FPN levels, the Faster R-CNN box parametrization
(Ren et al., Eq. 2), the FPN level of a box (Lin et al., Eq. 1), clipping, random subsets, and the random boxes that
replace CRPN proposals in the Tab. 1 rows without L_crpn. IoU matrices are ``torchvision.ops.box_iou``, or
``batched_box_iou`` (the same numbers) over a batch; ``batched_nms_rows`` is greedy NMS over a batch without a loop.

Conventions follow detectron2 (``anchor_generator.py``, ``box_regression.py``, ``poolers.py``), whose Faster R-CNN
defaults PreDet uses "wherever possible" (§4.1): anchors are not rounded and sit at ``(x * stride, y * stride)``
(offset 0); the aspect ratio of an anchor is height / width; box sizes are ``x2 - x1`` (no "+1").

Glossary (names and shapes):

    N, K           boxes; candidates per box
    A              anchors per feature-map location (one size per level x the aspect ratios: 3)
    M              anchors of one level, ordered (y, x, a): index (y * w + x) * A + a, as detectron2
    boxes          (N, 4) float xyxy, pixels of the view they live in; "positive size" means x2 > x1 and y2 > y1
    deltas         (N, 4) float (dx, dy, dw, dh), the Faster R-CNN parametrization multiplied by ``weights``
    weights        (wx, wy, ww, wh): (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the ROI head (detectron2 defaults)
    image_size     (H, W) of the view, pixels
    level          FPN level k of a feature map of stride 2**k (P2: stride 4 ... P6: stride 64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = [
    "DEFAULT_SCALE_CLAMP",
    "batched_box_iou",
    "batched_nms_rows",
    "cell_anchors",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "fpn_levels",
    "grid_anchors",
    "jitter_boxes",
    "nonempty_boxes",
    "random_boxes_away_from",
    "sample_indices",
    "sample_rows",
]

# detectron2's _DEFAULT_SCALE_CLAMP: the largest dw / dh a decoded box may use (a 1000/16 = 62.5x scale-up).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be (N, 4) xyxy boxes, got shape {tuple(boxes.shape)}")


def cell_anchors(size: float, aspect_ratios: Sequence[float]) -> Tensor:
    """The A zero-centred anchors of one location: area ``size**2``, height / width = each aspect ratio; (A, 4).

    Invariants: every anchor has area ``size**2`` and is centred on (0, 0); not rounded (detectron2, unlike
    torchvision's ``AnchorGenerator``).
    """
    anchors = []
    for ratio in aspect_ratios:
        width = math.sqrt(size * size / ratio)
        height = ratio * width
        anchors.append([-width / 2, -height / 2, width / 2, height / 2])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(cell: Tensor, grid_size: tuple[int, int], stride: int) -> Tensor:
    """Every cell anchor at every location of an ``(h, w)`` feature map of the given stride; (h * w * A, 4).

    Location (y, x) is centred at pixel ``(x * stride, y * stride)`` (detectron2's offset 0). Row order is (y, x, a),
    the order in which heads flatten their (N, A, h, w) outputs after moving A last.
    """
    height, width = grid_size
    shifts_x = torch.arange(width, dtype=torch.float32, device=cell.device) * stride
    shifts_y = torch.arange(height, dtype=torch.float32, device=cell.device) * stride
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
    return (shifts + cell.reshape(1, -1, 4)).reshape(-1, 4)


def encode_boxes(reference: Tensor, target: Tensor, *, weights: Sequence[float]) -> Tensor:
    """Deltas that move each ``reference`` box onto its ``target`` box (Faster R-CNN Eq. 2 times ``weights``); (N, 4).

    Invariant: ``decode_boxes(encode_boxes(r, t, weights=w), r, weights=w) == t`` for boxes of positive size.
    """
    _check_boxes(reference, "reference")
    _check_boxes(target, "target")
    wx, wy, ww, wh = weights
    ref_w = reference[:, 2] - reference[:, 0]
    ref_h = reference[:, 3] - reference[:, 1]
    ref_x = reference[:, 0] + 0.5 * ref_w
    ref_y = reference[:, 1] + 0.5 * ref_h
    tgt_w = target[:, 2] - target[:, 0]
    tgt_h = target[:, 3] - target[:, 1]
    tgt_x = target[:, 0] + 0.5 * tgt_w
    tgt_y = target[:, 1] + 0.5 * tgt_h
    return torch.stack(
        (
            wx * (tgt_x - ref_x) / ref_w,
            wy * (tgt_y - ref_y) / ref_h,
            ww * torch.log(tgt_w / ref_w),
            wh * torch.log(tgt_h / ref_h),
        ),
        dim=1,
    )


def decode_boxes(
    deltas: Tensor, reference: Tensor, *, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP
) -> Tensor:
    """Apply ``deltas`` to the ``reference`` boxes; (N, 4) xyxy. The inverse of ``encode_boxes``.

    ``dw`` and ``dh`` (after dividing by their weights) are clamped at ``scale_clamp`` so that an untrained head
    cannot overflow ``exp`` (detectron2's Box2BoxTransform). Decoded in float32 at least, whatever the deltas' dtype:
    bf16 deltas (under autocast) would round a box edge near x = 1000 to a multiple of 8 px.
    """
    _check_boxes(deltas, "deltas")
    _check_boxes(reference, "reference")
    wx, wy, ww, wh = weights
    dtype = torch.promote_types(torch.promote_types(deltas.dtype, reference.dtype), torch.float32)
    deltas, reference = deltas.to(dtype), reference.to(dtype)
    ref_w = reference[:, 2] - reference[:, 0]
    ref_h = reference[:, 3] - reference[:, 1]
    ref_x = reference[:, 0] + 0.5 * ref_w
    ref_y = reference[:, 1] + 0.5 * ref_h
    dx = deltas[:, 0] / wx
    dy = deltas[:, 1] / wy
    dw = (deltas[:, 2] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3] / wh).clamp(max=scale_clamp)
    x = dx * ref_w + ref_x
    y = dy * ref_h + ref_y
    half_w = 0.5 * torch.exp(dw) * ref_w
    half_h = 0.5 * torch.exp(dh) * ref_h
    return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=1)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Boxes clipped to ``[0, W] x [0, H]``; a box fully outside becomes empty (zero width or height)."""
    _check_boxes(boxes, "boxes")
    height, width = image_size
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def nonempty_boxes(boxes: Tensor, *, min_size: float = 0.0) -> Tensor:
    """(N,) bool: width and height both strictly greater than ``min_size`` (detectron2's ``Boxes.nonempty``)."""
    _check_boxes(boxes, "boxes")
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)


def fpn_levels(
    boxes: Tensor, *, min_level: int, max_level: int, canonical_size: float = 224.0, canonical_level: int = 4
) -> Tensor:
    """The FPN level each box is pooled from: ``floor(k0 + log2(sqrt(w * h) / 224))`` clamped; (N,) int64.

    FPN Eq. 1 with k0 = 4 and canonical size 224 (as detectron2 and torchvision). A box of exactly 112 x 112 goes to
    level 3, 224 x 224 to level 4: the 1e-6 (torchvision's) keeps exact powers of two on their own level.
    """
    _check_boxes(boxes, "boxes")
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size) + 1e-6)
    return levels.clamp(min=min_level, max=max_level).to(torch.int64)


def sample_indices(mask: Tensor, max_count: int) -> Tensor:
    """Indices of at most ``max_count`` True entries of a 1-D ``mask``, uniformly without replacement; (<=max_count,).

    All of them (in random order) when there are fewer. Randomness: torch's global RNG of the mask's device, which the
    engine saves and restores on resume.
    """
    if mask.ndim != 1:
        raise ValueError(f"mask must be 1-D, got shape {tuple(mask.shape)}")
    candidates = torch.nonzero(mask).squeeze(1)
    order = torch.randperm(candidates.numel(), device=mask.device)[: max(max_count, 0)]
    return candidates[order]


def sample_rows(mask: Tensor, max_count: int) -> Tensor:
    """Per row of a 2-D ``mask`` (N, M), at most ``max_count`` of its True entries, uniformly without replacement;
    returns the selection as an (N, M) bool mask. All of a row's True entries when it has fewer.

    ``sample_indices`` for a whole batch at once, without a host synchronization: every entry gets a uniform random
    key, and the ``max_count`` largest keys among a row's True entries are taken (a uniformly random subset).
    Randomness: torch's global RNG of the mask's device.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (rows, entries), got shape {tuple(mask.shape)}")
    count = min(max(max_count, 0), mask.shape[1])
    keys = torch.rand(mask.shape, device=mask.device).masked_fill_(~mask, -1.0)
    top_keys, top_index = keys.topk(count, dim=1)
    selected = torch.zeros_like(mask)
    return selected.scatter_(1, top_index, top_keys >= 0)


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every box of ``boxes1`` (..., N, 4) with every box of ``boxes2`` (..., M, 4); (..., N, M).

    The leading (batch) dimensions broadcast: (B, N, 4) against (M, 4) compares each batch's boxes with one shared set.
    The arithmetic is ``torchvision.ops.box_iou``'s, step for step, so the values are bitwise the same (a box of zero
    area against another of zero area gives 0 / 0 = NaN there as here).
    """
    if boxes1.ndim < 2 or boxes1.shape[-1] != 4 or boxes2.ndim < 2 or boxes2.shape[-1] != 4:
        raise ValueError(
            f"boxes1 and boxes2 must be (..., N, 4) xyxy boxes, got shapes {tuple(boxes1.shape)}, {tuple(boxes2.shape)}"
        )
    planes1, planes2 = _coordinate_planes(boxes1), _coordinate_planes(boxes2)
    return _planes_iou([c[..., :, None] for c in planes1], [c[..., None, :] for c in planes2])


def _coordinate_planes(boxes: Tensor) -> list[Tensor]:
    """x1, y1, x2, y2 and the area of (..., N, 4) boxes, each a contiguous (..., N) tensor (broadcast ops vectorize)."""
    x1, y1, x2, y2 = (c.contiguous() for c in boxes.unbind(-1))
    return [x1, y1, x2, y2, (x2 - x1) * (y2 - y1)]


def _planes_iou(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """IoU from two sets of ``_coordinate_planes`` that broadcast against each other, in torchvision's arithmetic."""
    x1a, y1a, x2a, y2a, area_a = a
    x1b, y1b, x2b, y2b, area_b = b
    # In place after the first op of each line: only a few full-size tensors are alive at a time.
    width = torch.minimum(x2a, x2b).sub_(torch.maximum(x1a, x1b)).clamp_(min=0)
    height = torch.minimum(y2a, y2b).sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
    inter = width.mul_(height)
    union = (area_a + area_b).sub_(inter)
    return inter.div_(union)


# Entries of the IoU blocks that batched_nms_rows computes at once: bounds its float32 intermediates to a few times
# 64 MiB whatever the batch. Its boxes come in tiles of _NMS_TILE (a multiple of 64, the bits of a word).
_NMS_BLOCK_ENTRIES = 1 << 24
_NMS_TILE = 256
# Greedy-NMS iterations between two convergence checks (each check is one host synchronization).
_NMS_CHECK_EVERY = 4


def batched_nms_rows(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within each row of a batch, all rows at once; returns ``keep`` (B, K) bool.

    ``boxes`` (B, K, 4), ``scores`` (B, K), ``valid`` (B, K) bool: each row is one independent NMS problem over its
    valid boxes (invalid ones are neither kept nor suppress anything; a row without valid box keeps none). Within a
    row, as ``torchvision.ops.nms``: boxes are visited by decreasing score, and a box is kept unless a kept box visited
    before it overlaps it with IoU > ``iou_threshold``. ``keep`` marks the kept boxes in the input's positions.

    Equal scores: the boxes are visited in a stable order (equal scores in input order). torchvision sorts with
    ``Tensor.sort(descending=True)``, which does not promise an order among equal scores (on CPU it is not stable), so
    with ties the two may keep different boxes; with distinct scores they agree exactly. The IoUs are
    ``batched_box_iou``'s, bitwise those of torchvision's CPU kernel (its CUDA kernel may fuse a multiply-add in the
    union, which can move an IoU by one unit in the last place).

    No per-row loop and no data-dependent shape: the host waits on the device only in a convergence check every few
    iterations of the fixed point below, once for the whole batch.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2] or valid.shape != scores.shape:
        raise ValueError(
            f"boxes must be (B, K, 4) with scores and valid (B, K), got {tuple(boxes.shape)}, {tuple(scores.shape)} "
            f"and {tuple(valid.shape)}"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask, got {valid.dtype}")
    rows, k = scores.shape
    if k == 0:
        return valid.clone()
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, K): the visiting order
    # Padded with invalid all-zero boxes to whole 64-bit words (their IoUs are 0 or NaN: never above the threshold).
    padded = -(-k // 64) * 64
    sorted_boxes = boxes.new_zeros(rows, padded, 4)
    sorted_boxes[:, :k] = boxes.gather(1, order[:, :, None].expand(rows, k, 4))
    sorted_valid = valid.new_zeros(rows, padded)
    sorted_valid[:, :k] = valid.gather(1, order)
    planes = _coordinate_planes(sorted_boxes)  # 5 x (B, K)
    bit_values = 2 ** torch.arange(8, dtype=torch.uint8, device=boxes.device)  # made on the device: no host copy
    # suppressors[b, j]: bit i set when box i is visited before box j and overlaps it above the threshold, 64 boxes i
    # per int64 word (K * K bits in all). Only i < j matters: the boxes j of a tile [top, bottom) are compared with the
    # boxes i < bottom alone, about half of the K * K pairs.
    suppressors = torch.zeros((rows, padded, padded // 64), dtype=torch.int64, device=boxes.device)
    for top in range(0, padded, _NMS_TILE):
        bottom = min(top + _NMS_TILE, padded)
        block = max(1, _NMS_BLOCK_ENTRIES // ((bottom - top) * bottom))
        for start in range(0, rows, block):
            later = [c[start : start + block, top:bottom, None] for c in planes]  # boxes j: (b, bottom - top, 1)
            earlier = [c[start : start + block, None, :bottom] for c in planes]  # boxes i: (b, 1, bottom)
            iou = _planes_iou(later, earlier)  # (b, bottom - top, bottom); IoU(j, i) == IoU(i, j) bit for bit
            overlaps = torch.gt(iou, iou_threshold).tril_(diagonal=top - 1)  # [j, i] with i < j only
            suppressors[start : start + block, top:bottom, : bottom // 64] = _pack_bits(overlaps, bit_values)
    # Greedy NMS is the unique solution of keep[j] = valid[j] and not any_{i<j}(keep[i] and overlaps[j, i]): the
    # right side reads only boxes visited before j, so it fixes keep[0], then keep[1], ... in turn. Iterating
    # keep <- valid & ~any_i(keep[i] & overlaps[j, i]) from keep = valid reaches it exactly (Cluster-NMS, Zheng et
    # al. 2021):
    # - after t iterations the first t + 1 boxes hold their final value (induction on t: box 0 has nothing before it,
    #   and box j <= t + 1 at iteration t + 1 reads only boxes i <= t, final since iteration t), so K - 1 iterations
    #   always suffice;
    # - an iterate that the update leaves unchanged satisfies the recursive definition, whose solution is unique, so
    #   it is greedy NMS's keep: stopping at the first unchanged iterate is exact, not an approximation.
    keep = sorted_valid
    for iteration in range(1, k + 1):
        previous = keep
        keep = sorted_valid & ~(suppressors & _pack_bits(keep, bit_values)[:, None, :]).any(dim=-1)
        if iteration % _NMS_CHECK_EVERY == 0 and torch.equal(keep, previous):
            break
    return torch.zeros_like(valid).scatter_(1, order, keep[:, :k])


def _pack_bits(mask: Tensor, bit_values: Tensor) -> Tensor:
    """(..., 64 * W) bool -> (..., W) int64 holding the bits of ``mask``; ``bit_values`` is 1, 2, 4, ..., 128 (uint8).
    The bit order within a word is the machine's: packed masks are only ever compared with each other."""
    packed_bytes = (mask.view(torch.uint8).unflatten(-1, (-1, 8)) * bit_values).sum(dim=-1, dtype=torch.uint8)
    return packed_bytes.view(torch.int64)


def jitter_boxes(
    boxes: Tensor,
    *,
    num_per_box: int,
    min_iou: float,
    image_size: tuple[int, int],
    max_shift: float = 0.25,
    max_scale: float = 1.5,
    max_tries: int = 10,
) -> Tensor:
    """``num_per_box`` random boxes per box, each with IoU > ``min_iou`` to its box and inside the image; (N, K, 4).

    Each candidate moves the centre by up to ``max_shift`` of the width / height and scales each side by a factor in
    ``[1 / max_scale, max_scale]`` (log-uniform), is clipped to the image and kept only if its IoU with its box is
    above ``min_iou`` (rejection sampling, ``max_tries`` rounds); a slot that never gets a candidate keeps the box
    itself (IoU 1). The input boxes must lie inside the image and have positive size. Used for the Tab. 1 rows
    without CRPN: "we randomly sampled positive and negative boxes for each query box" (§5.1); the distribution is
    our choice.
    """
    _check_boxes(boxes, "boxes")
    if not bool(nonempty_boxes(boxes).all()):
        raise ValueError("jitter_boxes needs boxes of positive size")
    n = len(boxes)
    result = boxes[:, None, :].expand(n, num_per_box, 4).clone()
    if n == 0 or num_per_box == 0:
        return result
    filled = torch.zeros(n, num_per_box, dtype=torch.bool, device=boxes.device)
    widths = (boxes[:, 2] - boxes[:, 0])[:, None]
    heights = (boxes[:, 3] - boxes[:, 1])[:, None]
    centre_x = (boxes[:, 0] + boxes[:, 2])[:, None] / 2
    centre_y = (boxes[:, 1] + boxes[:, 3])[:, None] / 2
    log_scale = math.log(max_scale)
    shape = (n, num_per_box)
    for _ in range(max_tries):
        new_x = centre_x + _uniform(shape, -max_shift, max_shift, like=boxes) * widths
        new_y = centre_y + _uniform(shape, -max_shift, max_shift, like=boxes) * heights
        new_w = widths * torch.exp(_uniform(shape, -log_scale, log_scale, like=boxes))
        new_h = heights * torch.exp(_uniform(shape, -log_scale, log_scale, like=boxes))
        candidates = torch.stack((new_x - new_w / 2, new_y - new_h / 2, new_x + new_w / 2, new_y + new_h / 2), dim=-1)
        candidates = clip_boxes(candidates.reshape(-1, 4), image_size).reshape(n, num_per_box, 4)
        ious = _paired_iou(candidates.reshape(-1, 4), boxes.repeat_interleave(num_per_box, dim=0)).reshape(shape)
        accept = (ious > min_iou) & ~filled
        result[accept] = candidates[accept]
        filled |= accept
        if bool(filled.all()):
            break
    return result


def random_boxes_away_from(
    boxes: Tensor,
    *,
    num: int,
    max_iou: float,
    image_size: tuple[int, int],
    min_size: float = 16.0,
    max_tries: int = 10,
) -> Tensor:
    """Up to ``num`` random boxes inside the image with IoU < ``max_iou`` to every one of ``boxes``; (<=num, 4).

    Width and height are log-uniform in ``[min_size, image side]`` and the position uniform inside the image;
    candidates overlapping any box too much are rejected (``max_tries`` rounds of ``num`` candidates). Fewer than
    ``num`` come back only when the boxes cover the image so densely that rejection keeps failing. The negatives of
    the Tab. 1 rows without CRPN (§5.1); the distribution is our choice.
    """
    _check_boxes(boxes, "boxes")
    height, width = image_size
    if min_size >= min(height, width):
        raise ValueError(f"min_size={min_size} must be smaller than the image side (image_size={image_size})")
    kept: list[Tensor] = []
    count = 0
    device = boxes.device
    for _ in range(max_tries):
        if count >= num:
            break
        sides = (
            torch.exp(
                torch.empty(num, 2, device=device).uniform_(0.0, 1.0)
                * torch.tensor([math.log(width / min_size), math.log(height / min_size)], device=device)
            )
            * min_size
        )  # (num, 2): (w, h)
        x1 = torch.rand(num, device=device) * (width - sides[:, 0])
        y1 = torch.rand(num, device=device) * (height - sides[:, 1])
        candidates = torch.stack((x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]), dim=1)
        if len(boxes):
            candidates = candidates[box_iou(candidates, boxes.to(candidates.dtype)).amax(dim=1) < max_iou]
        candidates = candidates[: num - count]
        kept.append(candidates)
        count += len(candidates)
    return torch.cat(kept) if kept else boxes.new_zeros(0, 4)


def _uniform(shape: tuple[int, ...], low: float, high: float, *, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(low, high)


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]``; (N,). Zero when both boxes are empty."""
    width = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    height = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))
