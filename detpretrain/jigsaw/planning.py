"""Planning Jigsaw's samples (§3.1): the crop window of every positive and negative sample, box math only.

``papers/montage_jigsaw.txt`` §3.1: positives are the ground-truth boxes enlarged with context (each corner moves
outwards, up to 2x the size, clipped to the image); negatives are background boxes with IoU 0 to every positive, 10
positives per negative. Where the paper is silent the reading is ours, marked "(our choice)" or "our reading" and
listed in ``PAPER_NOTES.md`` ("Samples"). Every random draw comes from a generator seeded per (seed, image id,
stream) (``seeded_generator``), so an image's samples do not depend on which process plans or cuts them.

Glossary:

    N              boxes of one image
    S              samples planned for a dataset
    sample boxes   (S, 4) int64 xyxy: the crop window of each sample in its source image (integer pixel edges)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from detpretrain.data.detection import DatasetError
from detpretrain.jigsaw.records import BACKGROUND_LABEL, ImageRecord

__all__ = ["SamplePlan", "plan_negative_samples", "plan_positive_samples", "plan_samples", "seeded_generator"]


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from a tuple of non-negative ints, e.g. (seed, image_id, stream).

    numpy's SeedSequence mixes the keys, so nearby tuples give unrelated streams; the same keys always give the
    same stream, whatever process computes it (this is what makes extraction independent of the worker count).
    """
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seeded_generator needs non-negative integer keys, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def plan_positive_samples(
    record: ImageRecord, *, generator: torch.Generator, max_enlarge: float = 2.0, min_sample_size: int = 8
) -> tuple[Tensor, Tensor, int]:
    """Positive crop windows of one image (§3.1, Fig. 2): each non-crowd ground-truth box, enlarged at random.

    Each corner moves outwards by U(0, (max_enlarge - 1) / 2) times the box width (horizontally) and height
    (vertically), so width and height grow by up to ``max_enlarge`` x (PAPER_NOTES.md: U(0, w/2) per corner for
    the paper's 2x). The window is rounded outwards to whole pixels and clipped at the image edges, so it always
    contains its box and lies inside the image. Crowd boxes never become positives. Windows with a side below
    ``min_sample_size`` pixels are dropped and counted (our choice: the paper drops nothing explicitly; 8 px).

    Returns (boxes (P, 4) int64 xyxy, gt_index (P,) int64 into the record's boxes, number dropped as too small).
    Draws exactly 4 uniforms per annotation (crowd included), so one box's draw never shifts another's.
    """
    gt = record.gt_boxes.double()
    u = torch.rand((len(gt), 4), generator=generator, dtype=torch.float64)
    size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)  # (N, 4): w, h, w, h
    outwards = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    enlarged = gt + outwards * u * (max_enlarge - 1.0) / 2.0 * size
    boxes = torch.cat([enlarged[:, :2].floor(), enlarged[:, 2:].ceil()], dim=1)
    limits = torch.tensor([record.width, record.height, record.width, record.height], dtype=torch.float64)
    boxes = torch.minimum(boxes.clamp_min(0), limits).long()
    large_enough = ((boxes[:, 2:] - boxes[:, :2]) >= min_sample_size).all(dim=1)
    keep = ~record.gt_crowd & large_enough
    num_dropped = int((~record.gt_crowd & ~large_enough).sum())
    return boxes[keep], keep.nonzero().flatten(), num_dropped


def plan_negative_samples(
    record: ImageRecord,
    *,
    num_negatives: int,
    positive_boxes: Tensor,
    size_pool: Tensor,
    generator: torch.Generator,
    min_sample_size: int = 8,
    num_tries: int = 64,
) -> Tensor:
    """Up to ``num_negatives`` background crop windows of one image (§3.1 "Negative samples").

    Candidates are random boxes whose (width, height) is drawn from ``size_pool`` ((M, 2) int64, the positives'
    sizes, so sizes and aspect ratios follow the positives' and all three groups get background: our reading,
    PAPER_NOTES.md), shrunk keeping the aspect ratio when larger than the image, placed uniformly. A candidate is
    kept only if its IoU is 0 with every positive sample of the image ("IoU(pos, neg) = 0") and with every ground
    truth box, crowd regions included (our addition: crowd regions and too-small objects are not background).
    Each negative gets ``num_tries`` candidates; the search stops at the first negative that finds none.

    Returns (K, 4) int64 xyxy with K <= num_negatives.
    """
    if len(size_pool) == 0:
        raise ValueError("plan_negative_samples needs a non-empty size_pool (the positives' sizes)")
    blockers = torch.cat([positive_boxes.double(), record.gt_boxes.double()])
    image_size = torch.tensor([record.width, record.height], dtype=torch.float64)
    placed = []
    for _ in range(num_negatives):
        wh = size_pool[torch.randint(len(size_pool), (num_tries,), generator=generator)].double()
        shrink = (image_size / wh).amin(dim=1).clamp(max=1.0)
        wh = (wh * shrink[:, None]).floor().clamp(min=1)
        wh = torch.minimum(wh, image_size)
        xy = (torch.rand((num_tries, 2), generator=generator, dtype=torch.float64) * (image_size - wh + 1)).floor()
        xy = torch.minimum(xy, image_size - wh)
        candidates = torch.cat([xy, xy + wh], dim=1)
        ok = (wh >= min_sample_size).all(dim=1)
        if len(blockers):
            ok &= (box_iou(candidates, blockers) == 0).all(dim=1)
        if not ok.any():
            break
        placed.append(candidates[ok.nonzero()[0, 0]])
    return torch.stack(placed).long() if placed else torch.zeros((0, 4), dtype=torch.int64)


class SamplePlan(NamedTuple):
    """Every sample of a dataset, as crop windows; positives of an image first, then its negatives, image by image."""

    image_index: Tensor  # (S,) int64 into the records
    boxes: Tensor  # (S, 4) int64 xyxy crop window in the source image
    labels: Tensor  # (S,) int64, BACKGROUND_LABEL for negatives
    gt_boxes: Tensor  # (S, 4) float32 xyxy ground truth of a positive, NaN for negatives
    stats: dict[str, int]


def plan_samples(
    records: Sequence[ImageRecord],
    *,
    seed: int = 0,
    max_enlarge: float = 2.0,
    positives_per_negative: float = 10.0,
    min_sample_size: int = 8,
    negative_tries: int = 64,
) -> SamplePlan:
    """Plan every positive and negative sample of a dataset (§3.1); deterministic for a seed.

    Positives of image i come from seeded_generator(seed, image_id, 0). The number of negatives is
    round(positives / positives_per_negative) over the whole dataset (the paper's 10:1 is a dataset-level count,
    PAPER_NOTES.md). They are spread evenly over images (our choice): images are visited in a random order drawn
    from seeded_generator(seed), one negative per image per pass, pass c drawing from
    seeded_generator(seed, image_id, 1 + c), until the count is reached; an image where a negative finds no free
    place is not visited again. ``stats["negative_shortfall"]`` counts negatives no image could host.

    Box math only, no pixels: 0.5 ms of CPU per image on coco128 (7.3 boxes per image, as COCO's average), so about
    a minute for COCO train2017, which every rank of a sharded extraction spends on the whole dataset.
    """
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("image_id values must be unique: they seed each image's random stream")
    positives = [
        plan_positive_samples(
            record,
            generator=seeded_generator(seed, record.image_id, 0),
            max_enlarge=max_enlarge,
            min_sample_size=min_sample_size,
        )
        for record in records
    ]
    num_positives = sum(len(boxes) for boxes, _, _ in positives)
    if num_positives == 0:
        num_boxes, num_crowd = sum(len(r.gt_boxes) for r in records), sum(int(r.gt_crowd.sum()) for r in records)
        raise DatasetError(
            f"no positive samples in {len(records)} images: of their {num_boxes} boxes {num_crowd} are crowd regions "
            f"(never positive) and {sum(dropped for _, _, dropped in positives)} have a side under min_sample_size "
            f"{min_sample_size} px once enlarged; pass annotations with non-crowd boxes, or a smaller --min-sample-size"
        )
    size_pool = torch.cat([boxes[:, 2:] - boxes[:, :2] for boxes, _, _ in positives])
    num_negatives = round(num_positives / positives_per_negative)

    negatives: list[list[Tensor]] = [[] for _ in records]
    exhausted = torch.zeros(len(records), dtype=torch.bool)
    order = torch.randperm(len(records), generator=seeded_generator(seed)).tolist()
    remaining, rounds = num_negatives, 0
    while remaining > 0 and not bool(exhausted.all()):
        for i in order:
            if remaining == 0:
                break
            if exhausted[i]:
                continue
            found = plan_negative_samples(
                records[i],
                num_negatives=1,
                positive_boxes=positives[i][0],
                size_pool=size_pool,
                generator=seeded_generator(seed, records[i].image_id, 1 + rounds),
                min_sample_size=min_sample_size,
                num_tries=negative_tries,
            )
            if len(found) == 0:
                exhausted[i] = True
                continue
            negatives[i].append(found)
            remaining -= 1
        rounds += 1

    image_index, boxes, labels, gt_boxes = [], [], [], []
    nan_box = torch.full((1, 4), float("nan"))
    for i, (record, (pos_boxes, gt_index, _), negs) in enumerate(zip(records, positives, negatives, strict=True)):
        neg_boxes = torch.cat(negs) if negs else torch.zeros((0, 4), dtype=torch.int64)
        image_index.append(torch.full((len(pos_boxes) + len(neg_boxes),), i, dtype=torch.int64))
        boxes += [pos_boxes, neg_boxes]
        labels += [record.gt_labels[gt_index], torch.full((len(neg_boxes),), BACKGROUND_LABEL, dtype=torch.int64)]
        gt_boxes += [record.gt_boxes[gt_index].float(), nan_box.expand(len(neg_boxes), 4)]
    stats = {
        "num_images": len(records),
        "num_gt_boxes": sum(len(r.gt_boxes) for r in records),
        "num_crowd_boxes": sum(int(r.gt_crowd.sum()) for r in records),
        "num_positives": num_positives,
        "num_negatives": num_negatives - remaining,
        "num_dropped_too_small": sum(dropped for _, _, dropped in positives),
        "negative_shortfall": remaining,
    }
    return SamplePlan(torch.cat(image_index), torch.cat(boxes), torch.cat(labels), torch.cat(gt_boxes), stats)
