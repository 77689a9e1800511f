"""Feature analyses of pre-trained backbones: the IoU / feature-similarity correlation of PreDet §5.5, Fig. 5(b).

PreDet's hypothesis (``papers/predet.txt`` §5.5): classification pre-training builds in translation invariance, so
two boxes of one image that barely overlap still get similar features; detection-oriented pre-training should make
the similarity of two boxes follow their overlap. The paper's test: sample pairs of boxes in an image with IoU
uniform over 0.05-0.95, take the cosine similarity of their ROI-pooled features, repeat over images, and report the
Pearson correlation between IoU and similarity for boxes of different sizes (Fig. 5(b): PreDet-IG50M above
cls-IG50M at every size). The paper gives no further detail; every choice below is ours and is recorded in the
output.

- **Box pairs** (``sample_box_pairs``): the target IoU ``t`` is drawn uniformly from [0.05, 0.95]; the second box is
  the first one *translated*, with the same width and height, by the shift that gives exactly IoU ``t``. Two boxes of
  equal size shifted by fractions ``(ax, ay)`` of their width and height share ``f = (1 - ax)(1 - ay)`` of their area,
  so ``IoU = f / (2 - f)``, i.e. ``f = 2t / (1 + t)``; ``f`` is split between x and y as ``1 - ax = f**u``,
  ``1 - ay = f**(1 - u)`` with ``u ~ U[0, 1]``, and the signs of the shift are random. A pure translation tests the
  hypothesis directly (translation invariance is what it is about), makes the achieved IoU exact, and gives both
  boxes of a pair the same area, so that a pair has one size. The box scale ``sqrt(w * h)`` is log-uniform in
  ``[min_box_size, s_max]`` and the aspect ratio ``h / w`` log-uniform in [1/2, 2], both drawn independently of the
  IoU, so that the IoU is uniform within every size bucket too; ``s_max`` is the largest scale at which any pair
  (the lowest IoU, the most elongated box) fits the image: ``short side / ((2 - f_min) * sqrt(2))``, 0.37 of the
  short side. The pair (the union of its two boxes) is placed uniformly inside the image.
- **Features** (``features=``, recorded under ``"features"`` in the output):
  - ``"fpn"`` (the default, ``fpn_pooler``): the FPN levels P2-P5 that PreDet's ROI losses train (§3.3 "ROI-pooling
    is done at the appropriate FPN-level"), the backbone and ``fpn.safetensors`` of an export folder
    (``train_predet.py`` writes both). Each box is pooled at its level by the FPN paper's rule (Lin et al., Eq. 1),
    ``k = floor(4 + log2(sqrt(w * h) / 224))`` clamped to [2, 5], with ``detpretrain.predet.croi.FPNRoIAlign``, the
    pooler of PreDet's CROI head; both boxes of a pair have one size, so one level. At the 800-pixel test size a box
    of scale < 112 px goes to P2 (stride 4), so even a 16 px box covers 4 x 4 cells.
  - ``"backbone"`` (``backbone_map_pooler``): one map of the timm ``features_only`` backbone, by default the last
    (``feature_level=-1``: stride 32, ``layer4`` of a ResNet, the C5 a detection head's FPN is built on), for
    backbones that come without an FPN (timm's and the zoo's weights, Jigsaw exports). A box below 32 px covers less
    than one cell of C5: compare two backbones on the same kind of features.

  Pooling is ``torchvision.ops.roi_align`` at ``spatial_scale = 1 / stride`` of the pooled map, 7 x 7 bins,
  ``sampling_ratio=0`` and ``aligned=True`` (detectron2's ROIAlignV2, the box pooler of PreDet's heads and of the
  Faster R-CNN PreDet fine-tunes). The similarity is the cosine of the two flattened ``C x 7 x 7`` features: the input
  of a box head, which keeps the layout inside the box (``output_size=1`` gives the cosine of box-averaged features
  instead).
- **Images**: every image under a folder (recursive), sorted by path, decoded by ``read_rgb``, resized so that the
  short side is 800 pixels (long side at most 1333: the test-time size of detectron2 and of ``finetune.py``),
  normalized with the backbone's pretrained mean and std (``timm.data.resolve_data_config``). The pairs of image
  ``i`` come from ``engine.sample_generator(seed, 0, i)``: the same seed gives the same pairs whatever the device.
- **Buckets** (``AREA_BUCKETS``): COCO's small / medium / large areas (< 32², 32²-96², >= 96² pixels) applied to the
  area of the pair's boxes in pixels of the resized image the backbone sees, plus "all". Pearson's r is taken over
  every pair of every image in a bucket (``pearson``); it is undefined (None) for fewer than 2 pairs or a constant
  variable.

Glossary (names and shapes):

    N              box pairs of one image
    boxes_a/_b     (N, 4) float xyxy, pixels of the resized image; boxes_b[i] is boxes_a[i] translated
    ious           (N,) the IoU of each pair, in [0.05, 0.95]
    pixels         (1, 3, H, W): the normalized image the backbone sees
    feature_map    (1, C, h, w): one level of the backbone (or FPN) for one image, stride s (h = ceil(H / s))
    pool           a callable (pixels, boxes (K, 4)) -> pooled (K, C, S, S): ROIAlign of each box, S = 7
    pooled         (2N, C, S, S): boxes_a then boxes_b; flattened to (N, C * S * S) each for the cosine
    cosines        (N,) cosine similarity of the pooled features of boxes_a[i] and boxes_b[i], in [-1, 1]

Command line (``detpretrain/analysis/__main__.py``)::

    python -m detpretrain.analysis iou-similarity --backbone resnet50 --backbone-weights OUT/export --images DIR \
        --output r50_predet.json
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torchvision.transforms.v2.functional as F
from timm.data import resolve_data_config
from torch import Tensor, nn
from torchvision.ops import box_area, roi_align
from tqdm import tqdm

from detpretrain.backbone import TimmFPN, create_body
from detpretrain.boxes import fpn_levels
from detpretrain.data.labelled_images import IMAGE_EXTENSIONS, ImageDecodeError, read_rgb
from detpretrain.data.transforms import MAX_SIZE, TEST_SHORT_SIDE, shortest_edge_size
from detpretrain.engine import sample_generator
from detpretrain.hub import check_keys, load_weights, read_weights
from detpretrain.predet.croi import FPNRoIAlign

__all__ = [
    "AREA_BUCKETS",
    "FEATURES",
    "FPN_WEIGHTS_NAME",
    "AnalysisInputError",
    "area_bucket",
    "backbone_map_pooler",
    "correlation_table",
    "create_analysis_backbone",
    "create_analysis_fpn",
    "describe_feature_map",
    "feature_map_info",
    "find_images",
    "format_table",
    "fpn_pooler",
    "iou_similarity",
    "max_box_scale",
    "measure_image",
    "pair_cosines",
    "pearson",
    "plot_iou_similarity",
    "roi_cosine_similarity",
    "sample_box_pairs",
]

MIN_IOU, MAX_IOU = 0.05, 0.95  # §5.5: "IoU is uniformly distributed from 0.05-0.95"
MAX_ASPECT_RATIO = 2.0  # box h / w in [1/2, 2]: the range of Faster R-CNN's anchor aspect ratios
MIN_BOX_SIZE = 16.0  # smallest box scale sqrt(w * h), pixels: half a cell of the stride-32 map
ROI_OUTPUT_SIZE = 7  # Faster R-CNN's box pooler (detectron2 and torchvision)
ROI_SAMPLING_RATIO = 0  # adaptive: ceil(bin size) samples per bin (detectron2's ROIAlignV2)
ROI_ALIGNED = True  # continuous box coordinates, shifted half a pixel onto the cell centres (ROIAlignV2)
# COCO's area ranges (pycocotools' areaRng), pixels²: [low, high).
AREA_BUCKETS = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}
BAD_IMAGE_POLICIES = ("error", "skip")
FEATURES = ("fpn", "backbone")  # what the boxes are pooled from (module docstring, "Features")
FPN_WEIGHTS_NAME = "fpn.safetensors"  # beside model.safetensors in a train_predet.py export
# FPN Eq. 1 as PreDet's ROI pooler applies it (detpretrain.predet.croi.FPNRoIAlign): P2-P5, canonical 224 px at P4.
FPN_MIN_LEVEL, FPN_MAX_LEVEL = 2, 5
FPN_ASSIGNMENT = "k = floor(4 + log2(sqrt(w*h) / 224)) clamped to [2, 5] (FPN Eq. 1, as PreDet's ROI pooler)"
Pool = Callable[[Tensor, Tensor], Tensor]  # (pixels (1, 3, H, W), boxes (K, 4)) -> pooled (K, C, S, S)


class AnalysisInputError(ValueError):
    """An input the analysis cannot use (folder, backbone name, feature level, sizes); the message says what to do."""


# -------------------------------------------------------------------------------------------------------- box pairs
def max_box_scale(image_size: tuple[int, int], *, min_iou: float = MIN_IOU) -> float:
    """The largest box scale ``sqrt(w * h)`` at which a pair of IoU ``min_iou`` with any aspect ratio fits the image.

    A pair with overlap fraction ``f`` spans ``(2 - f)`` box sides along a fully shifted axis; the lowest IoU has the
    lowest ``f``, and the most elongated box has a side of ``scale * sqrt(MAX_ASPECT_RATIO)``.
    """
    min_overlap = 2 * min_iou / (1 + min_iou)
    return min(image_size) / ((2 - min_overlap) * math.sqrt(MAX_ASPECT_RATIO))


def sample_box_pairs(
    image_size: tuple[int, int],
    num_pairs: int,
    *,
    generator: torch.Generator,
    min_iou: float = MIN_IOU,
    max_iou: float = MAX_IOU,
    min_box_size: float = MIN_BOX_SIZE,
) -> tuple[Tensor, Tensor, Tensor]:
    """``num_pairs`` pairs of equal-size boxes inside an ``(H, W)`` image with IoU uniform in [min_iou, max_iou].

    Returns ``(boxes_a, boxes_b, ious)``: (N, 4), (N, 4) float32 xyxy and (N,) float32, the exact IoU of each pair
    (``boxes_b`` is ``boxes_a`` translated; the construction is in the module docstring). Invariants: every box lies
    in ``[0, W] x [0, H]``; the box scale ``sqrt(w * h)`` is in ``[min_box_size, max_box_scale(image_size)]``.
    """
    if not 0 < min_iou <= max_iou < 1:
        raise AnalysisInputError(f"need 0 < min_iou <= max_iou < 1, got {min_iou} and {max_iou}")
    largest = max_box_scale(image_size, min_iou=min_iou)
    if largest < min_box_size:
        raise AnalysisInputError(
            f"an image of {image_size[0]}x{image_size[1]} pixels cannot hold a pair of boxes of scale "
            f"{min_box_size:g} at IoU {min_iou}: the largest that fits is {largest:.1f}; use larger images "
            "(--image-size) or smaller boxes (--min-box-size)"
        )

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(num_pairs, generator=generator, dtype=torch.float64)

    ious = uniform(min_iou, max_iou)
    overlap = 2 * ious / (1 + ious)  # fraction of each box inside the intersection: IoU = f / (2 - f)
    split = uniform(0.0, 1.0)
    shift_x = 1 - overlap**split  # shifts as fractions of the width and height: (1 - ax)(1 - ay) = f
    shift_y = 1 - overlap ** (1 - split)
    scale = torch.exp(uniform(math.log(min_box_size), math.log(largest)))
    log_aspect = uniform(-math.log(MAX_ASPECT_RATIO), math.log(MAX_ASPECT_RATIO))
    width = scale * torch.exp(-log_aspect / 2)
    height = scale * torch.exp(log_aspect / 2)
    dx, dy = shift_x * width, shift_y * height
    # The pair spans (w + dx) x (h + dy); place that union uniformly inside the image.
    height_img, width_img = image_size
    left = uniform(0.0, 1.0) * (width_img - width - dx)
    top = uniform(0.0, 1.0) * (height_img - height - dy)
    # Random direction: box a at the left (top) of the union and b shifted right (down), or the other way round.
    a_first_x = torch.rand(num_pairs, generator=generator) < 0.5
    a_first_y = torch.rand(num_pairs, generator=generator) < 0.5
    ax1 = torch.where(a_first_x, left, left + dx)
    bx1 = torch.where(a_first_x, left + dx, left)
    ay1 = torch.where(a_first_y, top, top + dy)
    by1 = torch.where(a_first_y, top + dy, top)
    boxes_a = torch.stack((ax1, ay1, ax1 + width, ay1 + height), dim=1)
    boxes_b = torch.stack((bx1, by1, bx1 + width, by1 + height), dim=1)
    return boxes_a.float(), boxes_b.float(), ious.float()


def area_bucket(area: float) -> str:
    """The COCO size bucket (``AREA_BUCKETS``) of a box area in pixels²."""
    return next(name for name, (low, high) in AREA_BUCKETS.items() if low <= area < high)


# ---------------------------------------------------------------------------------------------------- features
def _roi_align(feature_map: Tensor, boxes: Tensor, *, stride: int, output_size: int) -> Tensor:
    """(K, C, S, S): ROIAlignV2 of (K, 4) boxes, in pixels of the image, on a (1, C, h, w) map of that stride."""
    return roi_align(
        feature_map,
        [boxes.to(feature_map)],
        output_size=output_size,
        spatial_scale=1.0 / stride,
        sampling_ratio=ROI_SAMPLING_RATIO,
        aligned=ROI_ALIGNED,
    )


def pair_cosines(pooled: Tensor) -> Tensor:
    """Cosine similarity of pooled features ``pooled[i]`` and ``pooled[N + i]`` (the two boxes of pair i); (N,),
    computed in float64 from (2N, C, S, S)."""
    pooled_a, pooled_b = pooled.flatten(1).double().chunk(2)  # (N, C * S * S) each
    return torch.nn.functional.cosine_similarity(pooled_a, pooled_b, dim=1)


def roi_cosine_similarity(
    feature_map: Tensor,
    boxes_a: Tensor,
    boxes_b: Tensor,
    *,
    stride: int,
    output_size: int = ROI_OUTPUT_SIZE,
) -> Tensor:
    """Cosine similarity of the ROIAlign features of ``boxes_a[i]`` and ``boxes_b[i]`` on a (1, C, h, w) map; (N,).

    Boxes are in pixels of the image the map was computed from; ``spatial_scale = 1 / stride`` maps them onto it.
    """
    if feature_map.ndim != 4 or feature_map.shape[0] != 1:
        raise ValueError(f"feature_map must be (1, C, h, w), got shape {tuple(feature_map.shape)}")
    # One roi_align call for both boxes of each pair: (2N, C, S, S).
    pooled = _roi_align(feature_map, torch.cat((boxes_a, boxes_b)), stride=stride, output_size=output_size)
    return pair_cosines(pooled)


def backbone_map_pooler(
    body: Callable[[Tensor], Sequence[Tensor]], *, level: int, stride: int, output_size: int = ROI_OUTPUT_SIZE
) -> Pool:
    """``pool(pixels, boxes)``: every box pooled from ``body(pixels)[level]``, a map of stride ``stride``."""

    def pool(pixels: Tensor, boxes: Tensor) -> Tensor:
        return _roi_align(body(pixels)[level], boxes, stride=stride, output_size=output_size)

    return pool


def fpn_pooler(
    fpn: Callable[[Tensor], dict[str, Tensor]], *, strides: Sequence[int], output_size: int = ROI_OUTPUT_SIZE
) -> Pool:
    """``pool(pixels, boxes)``: each box pooled at its FPN level (``FPN_ASSIGNMENT``) by PreDet's ROI pooler.

    ``fpn`` returns the pyramid as ``TimmFPN`` does, P2 first; its first ``len(strides)`` levels (P2-P5 for
    ``strides`` (4, 8, 16, 32)) are pooled, as PreDet's CRPN and CROI head pool them; P6 is not.
    """
    pooler = FPNRoIAlign(
        strides=strides, output_size=output_size, sampling_ratio=ROI_SAMPLING_RATIO, aligned=ROI_ALIGNED
    )
    if (pooler.min_level, pooler.max_level) != (FPN_MIN_LEVEL, FPN_MAX_LEVEL):
        raise AnalysisInputError(f"FPN strides {tuple(strides)} are not P2-P5's (4, 8, 16, 32)")

    def pool(pixels: Tensor, boxes: Tensor) -> Tensor:
        levels = list(fpn(pixels).values())[: len(strides)]
        image = torch.zeros(len(boxes), dtype=torch.int64, device=pixels.device)  # every box is in image 0
        return pooler(levels, boxes.to(levels[0]), image)

    return pool


def create_analysis_backbone(name: str, *, pretrained: bool, weights: str | Path | None = None) -> nn.Module:
    """A timm ``features_only`` backbone in eval mode: ``name``'s pretrained weights, or ``weights`` (a local export
    folder or weights file, loaded strictly by ``detpretrain.hub.load_weights``), or a random init.

    ``name`` is any ``timm.create_model`` name: an architecture, a tag (``resnet50.predet``; ``import detpretrain``
    registers the zoo's), ``hf-hub:org/repo`` or ``local-dir:PATH``. A random init draws from torch's global RNG.
    """
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name):
        raise AnalysisInputError(
            f"{name!r} is not a timm model (timm {timm.__version__}); see timm.list_models() or detpretrain.ZOO"
        )
    body = timm.create_model(name, pretrained=pretrained and weights is None, features_only=True)
    if weights is not None:
        load_weights(body, weights)
    return body.eval()


def create_analysis_fpn(name: str, *, weights: str | Path | None) -> TimmFPN:
    """The backbone and FPN of a PreDet export folder, in eval mode: ``name``'s architecture on C2-C5
    (``detpretrain.backbone.create_body``, as ``train_predet.py`` builds it) with the folder's ``model.safetensors``
    and ``FPN_WEIGHTS_NAME``, both loaded strictly."""
    folder = None if weights is None else Path(weights)
    if folder is None or not (folder / FPN_WEIGHTS_NAME).is_file():
        where = "no --backbone-weights" if folder is None else f"{folder} holds no {FPN_WEIGHTS_NAME}"
        raise AnalysisInputError(
            f"features='fpn' pools the FPN levels PreDet trains, from an export folder with {FPN_WEIGHTS_NAME} "
            f"(train_predet.py writes one), but there is {where}: pass --backbone-weights EXPORT_DIR, or "
            "--features backbone to pool one backbone map (timm's and the zoo's weights have no FPN)"
        )
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name):
        raise AnalysisInputError(
            f"{name!r} is not a timm model (timm {timm.__version__}); see timm.list_models() or detpretrain.ZOO"
        )
    body = load_weights(create_body(name), folder)
    path = folder / FPN_WEIGHTS_NAME
    state = read_weights(path)
    if "inner_blocks.0.0.weight" not in state:  # the lateral 1x1 conv of C2, whose output width is the FPN's
        raise AnalysisInputError(f"{path} holds no FPN (no inner_blocks.0.0.weight): export it with train_predet.py")
    channels = state["inner_blocks.0.0.weight"].shape[0]
    fpn = TimmFPN(body, out_channels=channels)
    check_keys(
        {k: tuple(v.shape) for k, v in state.items()},
        {k: tuple(v.shape) for k, v in fpn.fpn.state_dict().items()},
        what=f"{path} does not fit a {channels}-channel FPN on {name}'s C2-C5",
    )
    fpn.fpn.load_state_dict(state)
    return fpn.eval()


def feature_map_info(body: nn.Module, level: int) -> dict[str, Any]:
    """What ``body(images)[level]`` is: its feature_info index, module name, stride and channels."""
    info = body.feature_info
    modules, strides = info.module_name(), info.reduction()
    if not -len(strides) <= level < len(strides):
        levels = ", ".join(f"{i} ({m}, stride {r})" for i, (m, r) in enumerate(zip(modules, strides, strict=True)))
        raise AnalysisInputError(f"feature level {level} does not exist: this backbone's feature maps are {levels}")
    index = level % len(strides)
    return {
        "index": index,
        "module": modules[index],
        "stride": int(strides[index]),
        "channels": int(info.channels()[index]),
    }


def describe_feature_map(feature_map: dict[str, Any]) -> str:
    """One line naming the pooled map, e.g. ``layer4 (feature level 4, stride 32, 2048 channels)``."""
    return (
        f"{feature_map['module']} (feature level {feature_map['index']}, stride {feature_map['stride']}, "
        f"{feature_map['channels']} channels)"
    )


# --------------------------------------------------------------------------------------------------- one image
@torch.inference_mode()
def measure_image(
    pool: Pool,
    image: Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    num_pairs: int,
    generator: torch.Generator,
    min_box_size: float = MIN_BOX_SIZE,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Sample ``num_pairs`` box pairs in a (3, H, W) uint8 image and measure them with ``pool``.

    ``pool(pixels, boxes)`` returns the (K, C, S, S) ROI features of (K, 4) boxes in the normalized (1, 3, H, W)
    image on ``device`` (``backbone_map_pooler``, ``fpn_pooler``). Returns CPU tensors ``{"ious", "cosines",
    "areas"}``, each (N,), and ``"boxes"`` (N, 4), the first box of each pair; ``areas`` is the area of both boxes.
    """
    boxes_a, boxes_b, ious = sample_box_pairs(
        tuple(image.shape[-2:]), num_pairs, generator=generator, min_box_size=min_box_size
    )
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.float() / 255 - mean_t) / std_t  # (3, H, W), the normalization the backbone was trained with
    cosines = pair_cosines(pool(pixels[None].to(device), torch.cat((boxes_a, boxes_b)).to(device)))
    return {"ious": ious, "cosines": cosines.float().cpu(), "areas": box_area(boxes_a), "boxes": boxes_a}


# ---------------------------------------------------------------------------------------------------- statistics
def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Pearson's correlation coefficient of two equally long samples; None when it is undefined (n < 2, or a
    constant sample). Computed in float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-D samples of one length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else None


def correlation_table(ious: np.ndarray, cosines: np.ndarray, areas: np.ndarray) -> dict[str, dict[str, Any]]:
    """``{bucket: {"pearson": r or None, "pairs": n, "mean_cosine": m or None}}`` for each size bucket and "all"."""
    table = {}
    buckets = [(name, (areas >= low) & (areas < high)) for name, (low, high) in AREA_BUCKETS.items()]
    for name, mask in [*buckets, ("all", np.ones_like(areas, dtype=bool))]:
        table[name] = {
            "pearson": pearson(ious[mask], cosines[mask]),
            "pairs": int(mask.sum()),
            "mean_cosine": float(cosines[mask].mean()) if mask.any() else None,
        }
    return table


# ------------------------------------------------------------------------------------------------------ images
def find_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursive; the extensions of ``IMAGE_EXTENSIONS``, any case), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise AnalysisInputError(f"{root} is not a folder: pass a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise AnalysisInputError(f"{root} holds no image file (searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def load_resized(path: Path, *, short_side: int, max_size: int) -> Tensor:
    """A (3, H, W) uint8 image with its short side at ``short_side`` (long side at most ``max_size``)."""
    image = torch.from_numpy(read_rgb(path)).permute(2, 0, 1)  # (3, H, W)
    size = shortest_edge_size(image.shape[1], image.shape[2], short_side=short_side, max_size=max_size)
    return F.resize(image, list(size), antialias=True)


# -------------------------------------------------------------------------------------------------- the analysis
def _fpn_features(
    backbone: str, *, weights: str | Path | None, output_size: int, device: str
) -> tuple[nn.Module, Pool, dict[str, Any], dict[str, float]]:
    """``(body, pool, features record, spatial scale per level)`` for P2-P5 of an export's FPN."""
    fpn = create_analysis_fpn(backbone, weights=weights).to(device)
    strides = [int(r) for r in fpn.body.feature_info.reduction()]
    levels = [f"P{level}" for level in range(FPN_MIN_LEVEL, FPN_MAX_LEVEL + 1)]
    record = {
        "kind": "fpn",
        "levels": levels,
        "strides": strides,
        "channels": fpn.out_channels,
        "weights": str(Path(weights) / FPN_WEIGHTS_NAME),
        "assignment": FPN_ASSIGNMENT,
        "description": f"FPN P2-P5 ({fpn.out_channels} channels), each box at level "
        "floor(4 + log2(sqrt(wh) / 224)) in [2, 5]",
    }
    scale = {level: 1.0 / stride for level, stride in zip(levels, strides, strict=True)}
    return fpn.body, fpn_pooler(fpn, strides=strides, output_size=output_size), record, scale


def _backbone_features(
    backbone: str,
    *,
    pretrained: bool,
    weights: str | Path | None,
    feature_level: int,
    output_size: int,
    device: str,
) -> tuple[nn.Module, Pool, dict[str, Any], float]:
    """``(body, pool, features record, spatial scale)`` for one map of the backbone."""
    body = create_analysis_backbone(backbone, pretrained=pretrained, weights=weights).to(device)
    feature_map = feature_map_info(body, feature_level)
    record = {"kind": "backbone", **feature_map, "description": describe_feature_map(feature_map)}
    pool = backbone_map_pooler(body, level=feature_map["index"], stride=feature_map["stride"], output_size=output_size)
    return body, pool, record, 1.0 / feature_map["stride"]


def iou_similarity(
    *,
    backbone: str,
    images: str | Path,
    pretrained: bool = True,
    weights: str | Path | None = None,
    features: str = "fpn",
    feature_level: int | None = None,
    pairs_per_image: int = 64,
    image_size: int = TEST_SHORT_SIDE,
    max_size: int = MAX_SIZE,
    max_images: int | None = None,
    min_box_size: float = MIN_BOX_SIZE,
    roi_output_size: int = ROI_OUTPUT_SIZE,
    seed: int = 0,
    device: str = "cpu",
    on_bad_image: str = "error",
    progress: bool = False,
) -> dict[str, Any]:
    """The §5.5 analysis of one backbone over a folder of images; returns the JSON record (see the module docstring).

    ``features="fpn"`` pools P2-P5 of the export folder ``weights`` (its ``fpn.safetensors``), each box at its level;
    ``"backbone"`` pools the backbone map ``feature_level`` (default -1, the last) of ``backbone`` with ``weights``,
    its pretrained weights or a random init drawn from ``seed``. ``on_bad_image="error"`` raises read_rgb's
    ``ImageDecodeError`` (naming the file) on an undecodable image; ``"skip"`` skips it and counts it in
    ``images.skipped``. ``max_images`` counts the images measured.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise AnalysisInputError(f"on_bad_image={on_bad_image!r} is not one of {BAD_IMAGE_POLICIES}")
    if pairs_per_image < 1 or image_size < 1 or (max_images is not None and max_images < 1):
        raise AnalysisInputError(
            f"pairs_per_image, image_size and max_images must be positive, got {pairs_per_image}, {image_size} "
            f"and {max_images}"
        )
    if features not in FEATURES:
        raise AnalysisInputError(f"features={features!r} is not one of {FEATURES}")
    if features == "fpn" and feature_level is not None:
        raise AnalysisInputError(
            "a feature level picks one backbone map: pass --features backbone with --feature-level (the FPN pools "
            "each box at the level its size assigns)"
        )
    paths = find_images(images)
    with torch.random.fork_rng(devices=[]):  # a random init is drawn from the seed, without touching the caller's RNG
        torch.manual_seed(seed)
        if features == "fpn":
            setup = _fpn_features(backbone, weights=weights, output_size=roi_output_size, device=device)
        else:
            level = -1 if feature_level is None else feature_level
            setup = _backbone_features(
                backbone,
                pretrained=pretrained,
                weights=weights,
                feature_level=level,
                output_size=roi_output_size,
                device=device,
            )
    body, pool, features_record, spatial_scale = setup
    data_config = resolve_data_config(model=body)
    mean, std = [float(v) for v in data_config["mean"]], [float(v) for v in data_config["std"]]

    measured: list[dict[str, Tensor]] = []
    used, skipped = [], []
    for index, path in enumerate(tqdm(paths, desc="images", disable=not progress)):
        if max_images is not None and len(used) >= max_images:
            break
        try:
            image = load_resized(path, short_side=image_size, max_size=max_size)
        except ImageDecodeError:
            if on_bad_image == "error":
                raise
            skipped.append(str(path))
            continue
        measured.append(
            measure_image(
                pool,
                image,
                mean=mean,
                std=std,
                num_pairs=pairs_per_image,
                generator=sample_generator(seed, 0, index),  # image i's pairs do not depend on the other images
                min_box_size=min_box_size,
                device=device,
            )
        )
        used.append(str(path))
    if not measured:
        raise AnalysisInputError(f"no image of {images} could be decoded ({len(skipped)} skipped)")

    ious, cosines, areas = (torch.cat([m[key] for m in measured]).numpy() for key in ("ious", "cosines", "areas"))
    pairs = {
        "iou": [round(float(v), 6) for v in ious],
        "cosine": [round(float(v), 6) for v in cosines],
        "area": [round(float(v), 3) for v in areas],
    }
    if features_record["kind"] == "fpn":
        # Both boxes of a pair have one size, hence one level.
        levels = fpn_levels(torch.cat([m["boxes"] for m in measured]), min_level=FPN_MIN_LEVEL, max_level=FPN_MAX_LEVEL)
        pairs["level"] = [f"P{level}" for level in levels.tolist()]
        features_record["pairs_per_level"] = {name: pairs["level"].count(name) for name in features_record["levels"]}
    weights_record = str(weights) if weights is not None else ("pretrained" if pretrained else "random init")
    return {
        "analysis": "iou-similarity: Pearson correlation of box-pair IoU and ROI-feature cosine similarity "
        "(PreDet §5.5, Fig. 5(b))",
        "backbone": {"name": backbone, "architecture": body.pretrained_cfg["architecture"], "weights": weights_record},
        "features": features_record,
        "pooling": {
            "op": "detpretrain.predet.croi.FPNRoIAlign (torchvision.ops.roi_align per level)"
            if features_record["kind"] == "fpn"
            else "torchvision.ops.roi_align",
            "output_size": roi_output_size,
            "spatial_scale": spatial_scale,
            "sampling_ratio": ROI_SAMPLING_RATIO,
            "aligned": ROI_ALIGNED,
            "similarity": f"cosine of the flattened C x {roi_output_size} x {roi_output_size} pooled features",
        },
        "sampler": {
            "iou": "uniform",
            "iou_range": [MIN_IOU, MAX_IOU],
            "pair": "the second box is the first translated (same size) by the shift that gives the drawn IoU",
            "pairs_per_image": pairs_per_image,
            "box_scale": "sqrt(w*h) log-uniform from min_box_size to max_box_scale, independent of the IoU",
            "min_box_size_px": min_box_size,
            "max_box_scale": "short side / ((2 - f_min) * sqrt(2)), f_min = 2 * 0.05 / 1.05: 0.37 x short side",
            "aspect_ratio_range": [1 / MAX_ASPECT_RATIO, MAX_ASPECT_RATIO],
        },
        "input": {"short_side": image_size, "max_size": max_size, "mean": mean, "std": std},
        "buckets": {
            name: {"area_px2": [low, None if math.isinf(high) else high]} for name, (low, high) in AREA_BUCKETS.items()
        },
        "bucket_area": "area of the pair's boxes (both equal) in pixels of the resized image",
        "images": {"dir": str(images), "measured": len(used), "skipped": len(skipped), "skipped_files": skipped},
        "seed": seed,
        "correlation": correlation_table(ious, cosines, areas),
        "pairs": pairs,
    }


# ------------------------------------------------------------------------------------------------------ reporting
def _bucket_label(name: str) -> str:
    if name == "all":
        return "all"
    low, high = AREA_BUCKETS[name]
    if low == 0:
        return f"< {math.isqrt(int(high))}²"
    if math.isinf(high):
        return f">= {math.isqrt(int(low))}²"
    return f"{math.isqrt(int(low))}²-{math.isqrt(int(high))}²"


def format_table(result: dict[str, Any]) -> str:
    """The correlation table of an ``iou_similarity`` record, with what was measured in the first lines."""
    backbone = result["backbone"]
    lines = [
        f"IoU vs cosine similarity (PreDet §5.5): {backbone['name']} ({backbone['weights']}), "
        f"{result['images']['measured']} images, short side {result['input']['short_side']}",
        f"features: {result['features']['description']}, {result['pooling']['output_size']}x"
        f"{result['pooling']['output_size']} ROIAlign",
        f"{'bucket':<8} {'area (px²)':>10} {'pairs':>7} {'Pearson r':>10} {'mean cos':>9}",
    ]
    for name, row in result["correlation"].items():
        r = "-" if row["pearson"] is None else f"{row['pearson']:.3f}"
        mean_cos = "-" if row["mean_cosine"] is None else f"{row['mean_cosine']:.3f}"
        lines.append(f"{name:<8} {_bucket_label(name):>10} {row['pairs']:>7} {r:>10} {mean_cos:>9}")
    return "\n".join(lines)


def plot_iou_similarity(result: dict[str, Any], path: str | Path) -> bool:
    """Fig. 5(b)'s bars (Pearson r per size bucket) beside the IoU / cosine scatter; False when matplotlib (the
    ``plots`` extra) is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(10, 4), dpi=100)
    bars, scatter = figure.subplots(1, 2)
    names = list(result["correlation"])
    values = [result["correlation"][n]["pearson"] for n in names]
    bars.bar(names, [0.0 if v is None else v for v in values], color="tab:blue")
    for x, (name, value) in enumerate(zip(names, values, strict=True)):
        count = result["correlation"][name]["pairs"]
        label = f"n/a\n{count} pairs" if value is None else f"{value:.2f}\n{count} pairs"
        bars.annotate(label, (x, 0.0 if value is None else value), ha="center", va="bottom", fontsize=8)
    bars.set_ylabel("Pearson r (IoU, cosine similarity)")
    bars.set_ylim(min(0.0, *(v for v in values if v is not None)) - 0.05, 1.05)
    bars.set_title(f"{result['backbone']['name']} ({result['backbone']['weights']})", fontsize=9)
    pairs = result["pairs"]
    areas = np.asarray(pairs["area"])
    for name, (low, high) in AREA_BUCKETS.items():
        mask = (areas >= low) & (areas < high)
        scatter.scatter(np.asarray(pairs["iou"])[mask], np.asarray(pairs["cosine"])[mask], s=4, alpha=0.5, label=name)
    scatter.set_xlabel("IoU of the box pair")
    scatter.set_ylabel("cosine similarity of ROI features")
    scatter.set_title(result["features"]["description"], fontsize=9)
    scatter.legend(markerscale=3)
    figure.tight_layout()
    figure.savefig(path)
    return True
