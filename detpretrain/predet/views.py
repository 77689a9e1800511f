"""PreDet's two views of an image, with the query boxes carried into both (papers/predet.txt §3.2, §3.3, §4.1).

§3.2: "we construct two different views of the same image, by applying different random transformations ... [that]
also include cropping and scaling. As a result, query q will have different bounding box co-ordinates in different
views, even though it represents the same region." §4.1: "We use the same augmentations as MoCo-v2 [18] ... our
model input has a higher resolution of 480 x 480. We randomly sample 16 EdgeBoxes per image to construct queries."
§3.3: "Every training batch of size N contains two-views of N/2 distinct images."

The augmentation is MoCo v2's (facebookresearch/moco, ``main_moco.py`` ``aug_plus``; ``moco/loader.py``), per view:
RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3)) to 480 x 480; ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8
(torchvision's: the four adjustments in a random order); RandomGrayscale(p=0.2); Gaussian blur with sigma ~ U[0.1, 2.0]
and p=0.5; horizontal flip p=0.5; ImageNet mean/std normalization. The geometric steps are implemented here with
explicit parameters, so each box follows its pixels exactly; every random draw comes from the ``generator`` argument
(``detpretrain.engine.sample_generator``), never a global RNG, so a view depends only on (seed, step, index).
Photometric steps do not move boxes. Cost: about 70 ms per image (two 480-px views) on one core, mostly
torchvision's hue adjustment and the blur; DataLoader workers run it.

Readings where the paper is silent (all ours; PAPER_NOTES.md, PreDet "Views and batch", "Queries that leave a view"):

- Blur sigma in output pixels, as MoCo's (PIL ``GaussianBlur(radius=sigma)``, radius being the standard deviation),
  with a kernel of 2 * ceil(3 sigma) + 1 taps. At 480 px that is half of MoCo's blur relative to the image at 224 px:
  we keep the paper's "same augmentations" literally.
- Queries: the candidates (cached EdgeBoxes) are taken in a uniformly random order (sampling without replacement);
  a candidate is kept when at least ``min_visible`` (half) of its area lies inside BOTH crops, then clipped to each
  view; greedy NMS at ``query_nms_iou`` (0.5) in view-1 coordinates, in that random order, removes a candidate that
  overlaps an earlier kept one (queries must not share positives, §3.2.1 footnote 2; clipping can raise the IoU of
  boxes that satisfied NMS in the whole image); the first ``num_queries`` survivors are the queries. Fewer than
  ``num_queries`` are padded with zero boxes and ``query_valid = False``.
- When fewer than ``min(min_queries, K)`` queries survive (``min_queries`` 8, half of Q), both crops are drawn
  again, at most ``max_resample`` (10) times, and the draw with the most queries is kept (first among ties). This
  biases crops towards larger ones on images with few proposals; the bound keeps that bias and the cost small. On
  coco128 with the default proposal cache, 8% of images draw again and every image gets at least 8 queries (without
  redraws, 2% get none; 83% get all 16, 88% with them).
- Both views of an image go into one batch, view-1 of every image first: ``images[:B]`` is view-1 (anchors,
  proposals, every target), ``images[B:]`` view-2 (the queries' features), in the same image order. ``--batch-size``
  counts views (the paper's 1024 = 512 images x 2), so a rank takes ``images_per_batch(batch_size)`` images.

Glossary:

    S            output_size: views are S x S (480)
    K            candidate boxes of an image (its cached proposals)
    Q            num_queries (16): query slots per image, padded
    B            images in a batch; the batch holds 2B views
    crop         CropBox(top, left, height, width): integer pixels of the original image
    boxes        (K, 4) float32 xyxy, pixel edges of the original image
    queries_viewN (Q, 4) float32 xyxy in view N's pixels, inside [0, S]; zero rows where not valid
    query_valid  (Q,) bool
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, nms

from detpretrain.data.labelled_images import LabelledSample
from detpretrain.engine import BadSampleError
from detpretrain.proposals import ProposalCache

__all__ = [
    "ColorParams",
    "CropBox",
    "PreDetBatch",
    "PreDetSample",
    "PreDetViews",
    "TwoViews",
    "ViewParams",
    "ViewSettings",
    "collate_two_views",
    "images_per_batch",
    "map_boxes_to_view",
    "sample_crop",
    "select_queries",
    "two_views",
    "visible_fraction",
]


@dataclass(frozen=True)
class ViewSettings:
    """The view and query recipe; defaults are the paper's (§4.1, MoCo v2) or ours (module docstring)."""

    output_size: int = 480  # §4.1
    num_queries: int = 16  # §4.1
    min_visible: float = 0.5  # share of a query's area inside each crop (PAPER_NOTES.md)
    query_nms_iou: float = 0.5  # §3.2.1 footnote 2 ("NMS applied to Edge Box proposals for queries selection")
    min_queries: int = 8  # fewer survivors (and more candidates) -> draw the crops again (ours: half of Q)
    max_resample: int = 10  # at most this many extra crop draws per image (ours)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # MoCo v2
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision's default, MoCo v2 keeps it
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        if self.output_size < 1 or self.num_queries < 1 or self.max_resample < 0:
            raise ValueError(
                f"output_size {self.output_size} and num_queries {self.num_queries} must be >= 1, "
                f"max_resample {self.max_resample} >= 0"
            )
        if not 0 < self.min_visible <= 1 or not 0 < self.query_nms_iou <= 1:
            raise ValueError(f"min_visible {self.min_visible} and query_nms_iou {self.query_nms_iou} must be in (0, 1]")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale {self.crop_scale} must satisfy 0 < low <= high <= 1")


class CropBox(NamedTuple):
    """A crop of the original image, integer pixels: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int

    def xyxy(self) -> Tensor:
        return torch.tensor([self.left, self.top, self.left + self.width, self.top + self.height], dtype=torch.float32)


class ColorParams(NamedTuple):
    """ColorJitter's draw: the order of the four adjustments (0 brightness, 1 contrast, 2 saturation, 3 hue)."""

    order: tuple[int, ...]
    brightness: float
    contrast: float
    saturation: float
    hue: float


class ViewParams(NamedTuple):
    """Everything drawn for one view (for debugging and visualisation)."""

    crop: CropBox
    flip: bool
    color: ColorParams | None  # None: no jitter
    grayscale: bool
    blur_sigma: float | None  # None: no blur


class TwoViews(NamedTuple):
    view1: Tensor  # (3, S, S) float32, normalized
    view2: Tensor  # (3, S, S) float32, normalized
    queries_view1: Tensor  # (Q, 4) float32 xyxy in view-1 pixels
    queries_view2: Tensor  # (Q, 4) float32 xyxy in view-2 pixels
    query_valid: Tensor  # (Q,) bool
    query_index: Tensor  # (Q,) int64: the query's row in query_boxes, -1 where not valid
    params1: ViewParams
    params2: ViewParams
    crop_draws: int  # how many times the crops were drawn (1 + resamples)


# --------------------------------------------------------------------------------------------------- random draws


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _coin(p: float, generator: torch.Generator) -> bool:
    return torch.rand((), generator=generator).item() < p


def sample_crop(
    height: int,
    width: int,
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """RandomResizedCrop's crop, drawn from ``generator`` (torchvision's ``RandomResizedCrop.get_params``: the same
    distribution and fallback): area ~ U(scale) of the image's, log(w/h) ~ U(log ratio), 10 tries, then a centre
    crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale, generator)
        aspect = math.exp(_uniform(*log_ratio, generator))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return CropBox(top, left, h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def _sample_color(settings: ViewSettings, generator: torch.Generator) -> ColorParams | None:
    if not _coin(settings.jitter_p, generator):
        return None
    b, c, s, h = settings.jitter
    order = tuple(torch.randperm(4, generator=generator).tolist())
    return ColorParams(
        order=order,
        brightness=_uniform(1 - b, 1 + b, generator),
        contrast=_uniform(1 - c, 1 + c, generator),
        saturation=_uniform(1 - s, 1 + s, generator),
        hue=_uniform(-h, h, generator),
    )


def _sample_view_params(crop: CropBox, settings: ViewSettings, generator: torch.Generator) -> ViewParams:
    # Drawn in MoCo v2's order of operations: jitter, grayscale, blur, flip.
    color = _sample_color(settings, generator)
    grayscale = _coin(settings.grayscale_p, generator)
    blur_sigma = _uniform(*settings.blur_sigma, generator) if _coin(settings.blur_p, generator) else None
    flip = _coin(settings.flip_p, generator)
    return ViewParams(crop=crop, flip=flip, color=color, grayscale=grayscale, blur_sigma=blur_sigma)


# ------------------------------------------------------------------------------------------------------ box math


def visible_fraction(boxes: Tensor, crop: CropBox) -> Tensor:
    """(K,) area(box ∩ crop) / area(box) for boxes (K, 4) with positive area; in [0, 1]."""
    crop_xyxy = crop.xyxy()
    top_left = torch.maximum(boxes[:, :2], crop_xyxy[:2])
    bottom_right = torch.minimum(boxes[:, 2:], crop_xyxy[2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    return inter / area


def map_boxes_to_view(boxes: Tensor, crop: CropBox, *, output_size: int, flip: bool) -> Tensor:
    """Boxes (K, 4) in original pixels -> view pixels, clipped to [0, S]: the crop's offset, its per-axis scale to
    S x S (pixel edges map exactly: resizing with align_corners=False maps edge u to u * S / size), then the flip."""
    scale = torch.tensor([output_size / crop.width, output_size / crop.height] * 2)
    offset = torch.tensor([crop.left, crop.top] * 2, dtype=torch.float32)
    mapped = (boxes - offset) * scale
    if flip:
        mapped = torch.stack([output_size - mapped[:, 2], mapped[:, 1], output_size - mapped[:, 0], mapped[:, 3]], 1)
    return clip_boxes_to_image(mapped, (output_size, output_size))


def select_queries(
    boxes: Tensor,
    crop1: CropBox,
    crop2: CropBox,
    *,
    order: Tensor,
    num_queries: int,
    min_visible: float,
    nms_iou: float,
) -> Tensor:
    """Indices into ``boxes`` of at most ``num_queries`` queries, in ``order`` (a permutation of the rows).

    A row qualifies when at least ``min_visible`` of it is inside both crops; NMS at ``nms_iou`` on the qualifying
    boxes clipped to crop1 (view-1's frame up to a per-axis scale, which leaves IoU unchanged) drops a row that
    overlaps an earlier qualifying one, so earlier rows in ``order`` win.
    """
    candidates = order[
        (visible_fraction(boxes[order], crop1) >= min_visible) & (visible_fraction(boxes[order], crop2) >= min_visible)
    ]
    if len(candidates) == 0:
        return candidates
    crop1_xyxy = crop1.xyxy()
    clipped = torch.cat(
        [torch.maximum(boxes[candidates, :2], crop1_xyxy[:2]), torch.minimum(boxes[candidates, 2:], crop1_xyxy[2:])],
        dim=1,
    )
    priority = torch.arange(len(candidates), 0, -1, dtype=torch.float32)  # earlier in order = higher score
    keep = nms(clipped, priority, nms_iou)  # sorted by priority: the sampling order
    return candidates[keep[:num_queries]]


# ------------------------------------------------------------------------------------------------------- pixels


def _render_view(image: Tensor, params: ViewParams, settings: ViewSettings) -> Tensor:
    """(3, H, W) uint8 -> (3, S, S) float32 normalized, MoCo v2's pipeline with the drawn parameters."""
    crop, size = params.crop, settings.output_size
    view = TF.resized_crop(image, crop.top, crop.left, crop.height, crop.width, [size, size], antialias=True)
    view = TF.to_dtype(view, torch.float32, scale=True)
    if params.color is not None:
        adjust = (
            lambda x: TF.adjust_brightness(x, params.color.brightness),
            lambda x: TF.adjust_contrast(x, params.color.contrast),
            lambda x: TF.adjust_saturation(x, params.color.saturation),
            lambda x: TF.adjust_hue(x, params.color.hue),
        )
        for k in params.color.order:
            view = adjust[k](view)
    if params.grayscale:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if params.blur_sigma is not None:
        taps = 2 * math.ceil(3 * params.blur_sigma) + 1
        view = TF.gaussian_blur(view, [taps, taps], [params.blur_sigma, params.blur_sigma])
    if params.flip:
        view = TF.horizontal_flip(view)
    return TF.normalize(view, list(settings.mean), list(settings.std))


# ---------------------------------------------------------------------------------------------------- two views


def two_views(
    image: Tensor, query_boxes: Tensor, *, generator: torch.Generator, settings: ViewSettings | None = None
) -> TwoViews:
    """Two MoCo v2 views of ``image`` (3, H, W) uint8 and up to Q queries from ``query_boxes`` (K, 4) xyxy in its
    pixels, mapped into both views (module docstring: the sampling, visibility, NMS and crop resampling rules)."""
    settings = settings or ViewSettings()
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"two_views takes a (3, H, W) uint8 image, got {tuple(image.shape)} {image.dtype}")
    if query_boxes.ndim != 2 or query_boxes.shape[1] != 4:
        raise ValueError(f"query_boxes must be (K, 4) xyxy, got {tuple(query_boxes.shape)}")
    height, width = image.shape[1:]
    boxes = clip_boxes_to_image(query_boxes.to(torch.float32), (height, width))
    rows = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).flatten()  # empty boxes out
    boxes = boxes[rows]
    order = torch.randperm(len(boxes), generator=generator)
    enough = min(settings.min_queries, settings.num_queries, len(boxes))
    best: tuple[CropBox, CropBox, Tensor] | None = None
    crop_draws = 0
    while crop_draws <= settings.max_resample:
        crop_draws += 1
        crops = [
            sample_crop(height, width, generator=generator, scale=settings.crop_scale, ratio=settings.crop_ratio)
            for _ in range(2)
        ]
        chosen = select_queries(
            boxes,
            *crops,
            order=order,
            num_queries=settings.num_queries,
            min_visible=settings.min_visible,
            nms_iou=settings.query_nms_iou,
        )
        if best is None or len(chosen) > len(best[2]):
            best = (crops[0], crops[1], chosen)
        if len(best[2]) >= enough:
            break
    crop1, crop2, chosen = best
    params1 = _sample_view_params(crop1, settings, generator)
    params2 = _sample_view_params(crop2, settings, generator)

    num, size = len(chosen), settings.output_size
    queries = []
    for params in (params1, params2):
        padded = torch.zeros(settings.num_queries, 4)
        padded[:num] = map_boxes_to_view(boxes[chosen], params.crop, output_size=size, flip=params.flip)
        queries.append(padded)
    query_index = torch.full((settings.num_queries,), -1, dtype=torch.int64)
    query_index[:num] = rows[chosen]
    return TwoViews(
        view1=_render_view(image, params1, settings),
        view2=_render_view(image, params2, settings),
        queries_view1=queries[0],
        queries_view2=queries[1],
        query_valid=query_index >= 0,
        query_index=query_index,
        params1=params1,
        params2=params2,
        crop_draws=crop_draws,
    )


# ------------------------------------------------------------------------------------------------ dataset glue


class PreDetSample(NamedTuple):
    views: TwoViews
    labels: Tensor  # (k,) int64 class indices
    index: int


class PreDetViews:
    """The PreDet transform for ``engine.StepSeededDataset`` (and the tar-shard stream): ``transform(sample,
    generator=g) -> PreDetSample``.

    ``sample`` is a ``LabelledSample`` or a ``ShardSample``; its queries come from the proposal cache computed for
    the same data, at ``proposals.locate(sample)`` (its row, or its tar shard and position, key checked), and each
    decoded image must have the size recorded there: one that does not raises ``engine.BadSampleError`` (the file
    changed after the cache was computed), which training skips and reports.
    """

    def __init__(self, proposals: ProposalCache, *, settings: ViewSettings | None = None) -> None:
        self.proposals = proposals
        self.settings = settings or ViewSettings()

    def __call__(self, sample: LabelledSample, *, generator: torch.Generator) -> PreDetSample:
        shard, row = self.proposals.locate(sample)
        height, width = sample.image.shape[1:]
        if (width, height) != shard.image_size(row):
            # The file changed after the cache was computed: its cached boxes belong to other pixels. A bad image for
            # this run (engine.StepSeededDataset replaces and reports it), not a reason to stop a long one.
            cached = "x".join(map(str, shard.image_size(row)))
            raise BadSampleError(
                f"image {shard.name(row)!r} decodes to {width}x{height}, but the proposal cache {shard.path} "
                f"recorded {cached}; the file changed after the cache was computed: restore it, or compute the cache "
                "again",
                name=shard.name(row),
                reason=f"size mismatch: the file is {width}x{height}, the proposal cache recorded {cached}",
            )
        views = two_views(sample.image, shard.boxes(row), generator=generator, settings=self.settings)
        return PreDetSample(views=views, labels=sample.labels, index=sample.index)


class PreDetBatch(NamedTuple):
    """A collated batch of B images: ``images[:B]`` are the view-1s, ``images[B:]`` the view-2s, same image order."""

    images: Tensor  # (2B, 3, S, S)
    queries_view1: Tensor  # (B, Q, 4)
    queries_view2: Tensor  # (B, Q, 4)
    query_valid: Tensor  # (B, Q) bool
    labels: list[Tensor]  # B tensors (k_i,) int64
    index: Tensor  # (B,) int64 dataset indices

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def view1(self) -> Tensor:
        return self.images[: self.num_images]

    @property
    def view2(self) -> Tensor:
        return self.images[self.num_images :]


def collate_two_views(samples: Sequence[PreDetSample]) -> PreDetBatch:
    """Stack B samples: all view-1s, then all view-2s (one backbone pass, BN over both views, §3.3)."""
    if not samples:
        raise ValueError("collate_two_views got an empty batch")
    views = [s.views for s in samples]
    return PreDetBatch(
        images=torch.stack([v.view1 for v in views] + [v.view2 for v in views]),
        queries_view1=torch.stack([v.queries_view1 for v in views]),
        queries_view2=torch.stack([v.queries_view2 for v in views]),
        query_valid=torch.stack([v.query_valid for v in views]),
        labels=[s.labels for s in samples],
        index=torch.tensor([s.index for s in samples], dtype=torch.int64),
    )


def images_per_batch(batch_size: int) -> int:
    """Images per batch for ``--batch-size`` counted in views (§3.3: N views = N/2 images); it must be even."""
    if batch_size < 2 or batch_size % 2:
        raise ValueError(
            f"--batch-size {batch_size} counts views, two per image (PreDet §3.3); pass an even number >= 2"
        )
    return batch_size // 2
