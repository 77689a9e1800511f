"""The Jigsaw template (§3.2, Fig. 4(b)): the S/T/W groups of samples, the four regions of the canvas, and which region
each cell of the last feature map belongs to (§3.3).

``papers/montage_jigsaw.txt`` §3.2: samples are grouped by aspect ratio (S square, T tall, W wide); an assembled image
holds 2 S-samples, 1 T and 1 W, the smaller S top-left, W top-right, T bottom-left, the larger S bottom-right. The
region sizes were printed inside Fig. 4 and are lost; the templates here are our choice (PAPER_NOTES.md, "Template").

Glossary:

    R = 4          template regions, always in the order REGION_NAMES: top_left (smaller S-sample),
                   top_right (W-sample), bottom_left (T-sample), bottom_right (larger S-sample)
    H, W           canvas (assembled image) height and width, 224 x 224 by default
    h, w           the last feature map (stride 32 before pooling: 7 x 7 on a 224 canvas)
    region_index   (h, w) int64 in [0, R): the region that holds the centre of each feature cell
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GROUPS",
    "JIGSAW_TEMPLATES",
    "REGION_GROUPS",
    "REGION_NAMES",
    "JigsawTemplate",
    "feature_region_index",
    "get_template",
    "group_name",
    "sample_group",
]

REGION_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right")
# §3.2: the smaller S-sample top-left, the W-sample top-right, the T-sample bottom-left, the larger S bottom-right.
REGION_GROUPS = ("S", "W", "T", "S")
GROUPS = ("S", "T", "W")
_TALL_BELOW, _WIDE_ABOVE = 0.5, 1.5  # §3.2: width / height below 0.5 is T, above 1.5 is W, the rest S


def sample_group(width: Tensor, height: Tensor) -> Tensor:
    """Group code per sample by aspect ratio width / height (§3.2): 0 = S in [0.5, 1.5], 1 = T < 0.5, 2 = W > 1.5.

    Codes index GROUPS = ("S", "T", "W").
    """
    ratio = width.double() / height.double()
    return torch.where(ratio < _TALL_BELOW, 1, torch.where(ratio > _WIDE_ABOVE, 2, 0))


def group_name(width: int, height: int) -> str:
    """The group ("S", "T" or "W") of one sample, as ``sample_group`` decides it (the same float64 ratio) in plain
    Python: assembly checks every input, and four scalar tensor round trips per image cost more than the check."""
    ratio = width / height
    return "T" if ratio < _TALL_BELOW else "W" if ratio > _WIDE_ABOVE else "S"


@dataclass(frozen=True)
class JigsawTemplate:
    """The Jigsaw template (Fig. 4(b)): a canvas cut by one vertical and one horizontal line into four regions.

    The paper's region sizes were printed inside Fig. 4 and are lost (PAPER_NOTES.md, "Template"); the text fixes
    only the 224 x 224 canvas and the placement. ``split_x`` is the width of the left column (top-left S and
    bottom-left T regions), ``split_y`` the height of the top row (top-left S and top-right W regions). The default,
    split at 96 (TL 96x96, TR 128 wide x 96 tall, BL 96 wide x 128 tall, BR 128x128), is our choice: borders on
    multiples of the stride 32 keep each feature cell inside one region; "split64" also fits. Regions are
    half-open pixel ranges, so they tile the canvas exactly; the W region must be at least as wide as tall and
    the T region at least as tall as wide.
    """

    canvas_height: int = 224
    canvas_width: int = 224
    split_x: int = 96
    split_y: int = 96

    def __post_init__(self) -> None:
        if not (0 < self.split_x < self.canvas_width and 0 < self.split_y < self.canvas_height):
            raise ValueError(f"{self}: the splits must lie strictly inside the canvas")
        if self.canvas_width - self.split_x < self.split_y or self.canvas_height - self.split_y < self.split_x:
            raise ValueError(
                f"{self}: the top-right (W) region must be at least as wide as tall and the bottom-left (T) region "
                "at least as tall as wide; use split_x <= canvas_width - split_y and split_y <= canvas_height - split_x"
            )

    def region_boxes(self) -> Tensor:
        """(R, 4) int64 xyxy of the regions, in REGION_NAMES order."""
        W, H, sx, sy = self.canvas_width, self.canvas_height, self.split_x, self.split_y
        return torch.tensor([[0, 0, sx, sy], [sx, 0, W, sy], [0, sy, sx, H], [sx, sy, W, H]], dtype=torch.int64)

    def region_masks(self) -> Tensor:
        """(R, H, W) bool masks M^i of Eq. 2."""
        masks = torch.zeros((4, self.canvas_height, self.canvas_width), dtype=torch.bool)
        for r, (x1, y1, x2, y2) in enumerate(self.region_boxes().tolist()):
            masks[r, y1:y2, x1:x2] = True
        return masks

    def region_area_fractions(self) -> Tensor:
        """(R,) float32: region area / canvas area (the mixing weights of the "global" label, Tab. 2)."""
        boxes = self.region_boxes().double()
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return (areas / (self.canvas_height * self.canvas_width)).float()


JIGSAW_TEMPLATES = {
    "split96": JigsawTemplate(canvas_height=224, canvas_width=224, split_x=96, split_y=96),
    "split64": JigsawTemplate(canvas_height=224, canvas_width=224, split_x=64, split_y=64),
    # Not a pre-training setting: a 96-pixel canvas (a 3x3 feature map) for CPU smoke runs and tests.
    "tiny96": JigsawTemplate(canvas_height=96, canvas_width=96, split_x=32, split_y=32),
}
"""Named templates; "split96" is the default (our choice, PAPER_NOTES.md)."""


def get_template(name: str) -> JigsawTemplate:
    """A named template from JIGSAW_TEMPLATES."""
    if name not in JIGSAW_TEMPLATES:
        raise ValueError(f"unknown Jigsaw template {name!r}; choose one of {sorted(JIGSAW_TEMPLATES)}")
    return JIGSAW_TEMPLATES[name]


def feature_region_index(template: JigsawTemplate, *, feature_height: int, feature_width: int) -> Tensor:
    """(h, w) int64: the region holding each feature cell's centre (PAPER_NOTES.md, "Dense loss").

    Cell (j, k) covers canvas rows [j H/h, (j+1) H/h) and columns likewise; its centre decides. Every region must
    hold at least one cell centre, else the template is too fine for the feature stride.

    What a cell sees is centred elsewhere: a stride-2 3x3 convolution with padding 1 centres each output on the first
    input pixel of its pair, so in a ResNet the ERF of cell (j, k) is centred on the cell's top-left corner pixel
    (32j, 32k). With the splits on multiples of 32, the cells just past a split have half or more of their step-0 ERF
    mass outside their region, with either residual init (resnet50, split96), and Eq. 2's threshold sets their labels.
    """
    cy = (torch.arange(feature_height, dtype=torch.float64) + 0.5) * template.canvas_height / feature_height
    cx = (torch.arange(feature_width, dtype=torch.float64) + 0.5) * template.canvas_width / feature_width
    index = 2 * (cy >= template.split_y).long()[:, None] + (cx >= template.split_x).long()[None, :]
    counts = torch.bincount(index.flatten(), minlength=4)
    if (counts == 0).any():
        empty = [REGION_NAMES[r] for r in (counts == 0).nonzero().flatten().tolist()]
        raise ValueError(
            f"{template}: region(s) {empty} hold no centre of a {feature_height}x{feature_width} feature cell; "
            "put the splits on multiples of the feature stride"
        )
    return index
