"""Detection augmentation: ``(image, target) -> (image, target)`` with every random draw from an explicit generator.

The contract of torchvision's detection references (transforms take and return ``(image, target)``), on the
tv_tensors of ``detpretrain.data.detection``: ``target["boxes"]`` (BoundingBoxes) and ``target["masks"]`` (Mask)
move with the image; per-box fields (``PER_BOX_KEYS``) are filtered together when a crop removes boxes.

Randomness comes only from the ``generator`` argument (``detpretrain.engine.sample_generator(seed, step, index)``,
which ``engine.StepSeededDataset`` passes): a random transform called without one fails. The same sample at the same
step is then augmented the same way in any worker, process or resumed run.

The fine-tuning augmentations (``train_transforms``), in this order:

1. ``RandomCrop(relative_range=(0.9, 0.9))``: detectron2's default crop (``INPUT.CROP.TYPE "relative_range"``,
   ``SIZE [0.9, 0.9]``). PreDet (§4.2) fine-tunes with detectron2 and says only "random crop": this is our reading.
   Crop height and width are independently U[0.9, 1) of the image's, rounded to pixels, placed uniformly. Boxes
   are clipped to the crop; a box the crop cut gets the tight box of its cropped mask when masks are loaded
   (detectron2 recomputes tight boxes from masks after a crop, for every box; we do it for the boxes the crop cut,
   so uncut boxes keep their annotated values); boxes left with no area are removed with their labels, masks and
   flags.
   As in detectron2, the crop comes before the resize.
2. ``ResizeShortestEdge``: the short side to a size drawn from a set (PreDet's multi-scale {640, 672, ..., 800},
   ``MULTISCALE_SHORT_SIDES``; on VOC {480, 512, ..., 800}, ``VOC_SHORT_SIDES``, our reading) or uniformly from an
   integer range (``LOW_SHOT_SHORT_RANGE`` = [512, 800], PreDet §5.3 after He et al. [19]), the long side capped at
   ``max_size`` (1333), sizes rounded as detectron2 rounds them; bilinear with antialiasing for the image, nearest
   for masks.
3. ``RandomHorizontalFlip(p=0.5)``.

Test time: the short side to 800 (max 1333), no crop or flip.

Where the resizing happens. torchvision's detectors resize once more inside the model (``GeneralizedRCNNTransform``
with ``min_size``/``max_size``). The wiring we recommend: training images are resized here, so that the random size
comes from the sample's generator like every other draw, and the detector is built with ``_skip_resize=True`` (the
switch torchvision's own detection reference uses for its multi-scale and LSJ recipes), which skips the model's
resize in training only; test images go in at their own size (``eval_transforms()``, the identity) and the detector
resizes them (``min_size=800, max_size=1333``) and maps its predictions back to the image's pixels, the frame the
evaluators expect. ``eval_transforms(short_side=800)`` resizes here instead, for a model without its own resize;
its predictions must then be scaled back. ``Compose.recipe()`` lists the transforms and their parameters, to record
in eval.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision import tv_tensors

__all__ = [
    "LOW_SHOT_SHORT_RANGE",
    "MAX_SIZE",
    "MULTISCALE_SHORT_SIDES",
    "PER_BOX_KEYS",
    "TEST_SHORT_SIDE",
    "VOC_SHORT_SIDES",
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "SampleTransform",
    "crop_detection",
    "eval_transforms",
    "hflip_detection",
    "resize_detection",
    "shortest_edge_size",
    "train_transforms",
]

MULTISCALE_SHORT_SIDES = (640, 672, 704, 736, 768, 800)  # PreDet §4.2, fine-tuning on COCO
LOW_SHOT_SHORT_RANGE = (512, 800)  # PreDet §5.3 low-shot subsets, after He et al. [19]
# PreDet §4.2 states for VOC the recipe of MoCo's detection/configs/pascal_voc_R_50_C4_24k.yaml (24k iterations,
# lr 0.02, drops at 18k and 22k), whose MIN_SIZE_TRAIN is this; the self-supervised VOC configs share it.
VOC_SHORT_SIDES = tuple(range(480, 801, 32))
TEST_SHORT_SIDE = 800
MAX_SIZE = 1333  # detectron2's and torchvision's cap on the long side

# Target fields with one entry per box: filtered together when boxes are removed.
PER_BOX_KEYS = ("boxes", "labels", "masks", "iscrowd", "difficult")

Sample = tuple[Any, dict[str, Any]]


def _image_size(image: Tensor) -> tuple[int, int]:
    return int(image.shape[-2]), int(image.shape[-1])


def _check_boxes(target: dict[str, Any]) -> None:
    # A plain tensor would be taken for an image by torchvision's functional ops and silently left unchanged.
    boxes = target.get("boxes")
    if not isinstance(boxes, tv_tensors.BoundingBoxes) or boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
        raise TypeError(
            f"target['boxes'] must be a tv_tensors.BoundingBoxes in XYXY format, got {type(boxes).__name__}; "
            "the datasets of detpretrain.data produce them"
        )


def _require_generator(generator: torch.Generator | None, name: str) -> torch.Generator:
    if generator is None:
        raise TypeError(
            f"{name} draws its randomness from an explicit generator: call it with "
            "generator=engine.sample_generator(seed, step, index) (engine.StepSeededDataset does)"
        )
    return generator


# ------------------------------------------------------------------------------------------------- functional ops


def hflip_detection(image: Tensor, target: dict[str, Any]) -> Sample:
    """Mirror the image left-right: a box [x1, y1, x2, y2] becomes [W - x2, y1, W - x1, y2]; masks mirror too."""
    _check_boxes(target)
    target = dict(target)
    target["boxes"] = F.horizontal_flip(target["boxes"])
    if "masks" in target:
        target["masks"] = F.horizontal_flip(target["masks"])
    return F.horizontal_flip(image), target


def resize_detection(image: Tensor, target: dict[str, Any], *, size: tuple[int, int]) -> Sample:
    """Resize to ``size`` = (height, width): boxes scale by width and height ratios, masks by nearest neighbour."""
    _check_boxes(target)
    size = [int(size[0]), int(size[1])]
    target = dict(target)
    target["boxes"] = F.resize(target["boxes"], size)
    if "masks" in target:
        target["masks"] = F.resize(target["masks"], size)  # tv_tensors.Mask: nearest, whatever the default
    return F.resize(image, size, antialias=True), target


def crop_detection(image: Tensor, target: dict[str, Any], *, top: int, left: int, height: int, width: int) -> Sample:
    """Crop the window [left, left + width) x [top, top + height) (integer pixels, inside the image).

    Boxes are shifted and clipped to the window; a box the window cut gets the tight box of its cropped mask when
    ``target`` has masks; boxes with no area left are removed with every per-box field (``PER_BOX_KEYS``).
    """
    _check_boxes(target)
    image_height, image_width = _image_size(image)
    if not (0 <= top and 0 <= left and 1 <= height and 1 <= width):
        raise ValueError(f"crop window top={top} left={left} height={height} width={width} is not a valid window")
    if top + height > image_height or left + width > image_width:
        raise ValueError(f"crop window {top, left, height, width} leaves the {image_width}x{image_height} image")
    target = dict(target)
    boxes = target["boxes"]
    shift = torch.tensor([left, top, left, top], dtype=boxes.dtype)
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    moved = boxes.as_subclass(Tensor) - shift
    clipped = torch.minimum(moved.clamp(min=0), limits)
    if "masks" in target:
        target["masks"] = F.crop(target["masks"], top, left, height, width)
        cut = (clipped != moved).any(dim=1)
        if cut.any():
            clipped[cut] = _tight_boxes(target["masks"][cut]).to(clipped.dtype)
    target["boxes"] = tv_tensors.BoundingBoxes(clipped, format="XYXY", canvas_size=(height, width))
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not keep.all():
        target = _filter_boxes(target, keep)
    return F.crop(image, top, left, height, width), target


def _tight_boxes(masks: Tensor) -> Tensor:
    """(K, H, W) masks -> (K, 4) xyxy covering their pixels (continuous coordinates: a pixel column x spans
    [x, x + 1)); an empty mask gives an all-zero box, which the caller removes."""
    boxes = torch.zeros((len(masks), 4))
    for k, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            boxes[k] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
    return boxes


def _filter_boxes(target: dict[str, Any], keep: Tensor) -> dict[str, Any]:
    filtered = dict(target)
    for key in PER_BOX_KEYS:
        if key in target:
            value = target[key][keep]
            # Boolean indexing of a tv_tensor returns a plain tensor; wrap it again with its metadata.
            filtered[key] = (
                tv_tensors.wrap(value, like=target[key]) if isinstance(target[key], tv_tensors.TVTensor) else value
            )
    return filtered


def shortest_edge_size(height: int, width: int, *, short_side: int, max_size: int) -> tuple[int, int]:
    """(height, width) with the short side at ``short_side`` and the long side at most ``max_size``, keeping the
    aspect ratio, rounded to the nearest pixel (detectron2's ``ResizeShortestEdge.get_output_shape``)."""
    scale = short_side / min(height, width)
    new_height, new_width = height * scale, width * scale
    if max(new_height, new_width) > max_size:
        scale = max_size / max(new_height, new_width)
        new_height, new_width = new_height * scale, new_width * scale
    return int(new_height + 0.5), int(new_width + 0.5)


# ------------------------------------------------------------------------------------------------- transforms


class RandomCrop:
    """detectron2's ``RandomCrop("relative_range", relative_range)``: crop height and width independently
    U[relative_range[i], 1) of the image's, placed uniformly (see ``crop_detection`` for the boxes)."""

    def __init__(self, relative_range: tuple[float, float] = (0.9, 0.9)) -> None:
        if not all(0 < r <= 1 for r in relative_range) or len(relative_range) != 2:
            raise ValueError(f"relative_range {relative_range} must be two fractions in (0, 1]")
        self.relative_range = (float(relative_range[0]), float(relative_range[1]))

    def __call__(self, image: Tensor, target: dict[str, Any], *, generator: torch.Generator | None = None) -> Sample:
        generator = _require_generator(generator, "RandomCrop")
        height, width = _image_size(image)
        low = torch.tensor(self.relative_range, dtype=torch.float64)
        relative = low + torch.rand(2, generator=generator, dtype=torch.float64) * (1 - low)
        crop_height = min(height, max(1, int(height * float(relative[0]) + 0.5)))
        crop_width = min(width, max(1, int(width * float(relative[1]) + 0.5)))
        top = int(torch.randint(height - crop_height + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop_width + 1, (1,), generator=generator))
        return crop_detection(image, target, top=top, left=left, height=crop_height, width=crop_width)

    def recipe(self) -> dict[str, Any]:
        return {"name": "RandomCrop", "type": "relative_range", "relative_range": list(self.relative_range)}


class ResizeShortestEdge:
    """Resize the short side to a size drawn uniformly from ``short_sides`` (a set) or from the integers of
    ``short_range`` (inclusive), the long side capped at ``max_size``. One size: deterministic, no generator needed."""

    def __init__(
        self,
        short_sides: Sequence[int] | None = None,
        *,
        short_range: tuple[int, int] | None = None,
        max_size: int = MAX_SIZE,
    ) -> None:
        if (short_sides is None) == (short_range is None):
            raise ValueError("pass exactly one of short_sides (a set of sizes) and short_range (min, max)")
        if short_sides is not None:
            short_sides = tuple(int(s) for s in short_sides)
            if not short_sides or min(short_sides) < 1:
                raise ValueError(f"short_sides {short_sides} must be positive sizes")
        if short_range is not None:
            short_range = (int(short_range[0]), int(short_range[1]))
            if not 1 <= short_range[0] <= short_range[1]:
                raise ValueError(f"short_range {short_range} must be (min, max) with 1 <= min <= max")
        if max_size < 1:
            raise ValueError(f"max_size {max_size} must be positive")
        self.short_sides, self.short_range, self.max_size = short_sides, short_range, int(max_size)

    @property
    def is_random(self) -> bool:
        return (
            self.short_range is not None
            and self.short_range[0] < self.short_range[1]
            or (self.short_sides is not None and len(self.short_sides) > 1)
        )

    def draw_short_side(self, generator: torch.Generator | None) -> int:
        if not self.is_random:
            return self.short_sides[0] if self.short_sides is not None else self.short_range[0]
        generator = _require_generator(generator, "ResizeShortestEdge with several sizes")
        if self.short_sides is not None:
            return self.short_sides[int(torch.randint(len(self.short_sides), (1,), generator=generator))]
        return int(torch.randint(self.short_range[0], self.short_range[1] + 1, (1,), generator=generator))

    def __call__(self, image: Tensor, target: dict[str, Any], *, generator: torch.Generator | None = None) -> Sample:
        short_side = self.draw_short_side(generator)
        height, width = _image_size(image)
        size = shortest_edge_size(height, width, short_side=short_side, max_size=self.max_size)
        return resize_detection(image, target, size=size)

    def recipe(self) -> dict[str, Any]:
        sizes = {"short_sides": list(self.short_sides)} if self.short_sides else {"short_range": list(self.short_range)}
        return {"name": "ResizeShortestEdge", **sizes, "max_size": self.max_size, "interpolation": "bilinear+antialias"}


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"flip probability {p} must be in [0, 1]")
        self.p = float(p)

    def __call__(self, image: Tensor, target: dict[str, Any], *, generator: torch.Generator | None = None) -> Sample:
        generator = _require_generator(generator, "RandomHorizontalFlip")
        if float(torch.rand(1, generator=generator)) < self.p:
            return hflip_detection(image, target)
        return image, target

    def recipe(self) -> dict[str, Any]:
        return {"name": "RandomHorizontalFlip", "p": self.p}


class Compose:
    """Apply transforms in order, all drawing from the one ``generator``."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict[str, Any], *, generator: torch.Generator | None = None) -> Sample:
        for transform in self.transforms:
            image, target = transform(image, target, generator=generator)
        return image, target

    def recipe(self) -> list[dict[str, Any]]:
        """The transforms and their parameters, in order, as plain JSON types (for eval.json)."""
        return [transform.recipe() for transform in self.transforms]


class SampleTransform:
    """Adapts an ``(image, target)`` transform to ``engine.StepSeededDataset``, which calls
    ``transform(dataset[index], generator=...)`` with the sample as one tuple. A class, not a lambda, so that
    DataLoader workers started by spawn can pickle it."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, sample: Sample, *, generator: torch.Generator | None = None) -> Sample:
        image, target = sample
        return self.transform(image, target, generator=generator)


def train_transforms(
    *,
    short_sides: Sequence[int] | None = MULTISCALE_SHORT_SIDES,
    short_range: tuple[int, int] | None = None,
    max_size: int = MAX_SIZE,
    crop_relative_range: tuple[float, float] | None = (0.9, 0.9),
    flip_p: float = 0.5,
) -> Compose:
    """The fine-tuning augmentation (module docstring): crop, resize, flip. Defaults: PreDet §4.2 on COCO.

    Low-shot (§5.3): ``short_sides=None, short_range=LOW_SHOT_SHORT_RANGE``. Single scale (the Jigsaw paper's
    protocol, the standard 1x): ``short_sides=(800,), crop_relative_range=None``. ``short_sides=None`` and
    ``short_range=None`` leave the resizing to the model.
    """
    transforms: list[Any] = []
    if crop_relative_range is not None:
        transforms.append(RandomCrop(crop_relative_range))
    if short_range is not None:
        transforms.append(ResizeShortestEdge(short_range=short_range, max_size=max_size))
    elif short_sides is not None:
        transforms.append(ResizeShortestEdge(short_sides, max_size=max_size))
    if flip_p > 0:
        transforms.append(RandomHorizontalFlip(flip_p))
    return Compose(transforms)


def eval_transforms(*, short_side: int | None = None, max_size: int = MAX_SIZE) -> Compose:
    """Test-time transform: the short side to ``short_side`` (800 in PreDet §4.2), or nothing when the detector
    resizes (``short_side=None``, the recommended wiring: predictions then come back in the image's own pixels)."""
    return Compose([] if short_side is None else [ResizeShortestEdge((short_side,), max_size=max_size)])
