"""Pictures of Jigsaw's inputs and ERFs: ``train_jigsaw.py --visualize`` and Fig. 6 of ``papers/montage_jigsaw.txt``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from detpretrain.jigsaw.template import JigsawTemplate

__all__ = ["REGION_COLORS", "render_erf", "render_jigsaw"]

REGION_COLORS = ((46, 204, 64), (255, 65, 54), (0, 116, 217), (255, 220, 0))  # TL green (R1 as in Fig. 5), TR, BL, BR


def render_jigsaw(
    image: Tensor,
    labels: Tensor,
    *,
    template: JigsawTemplate,
    class_names: Sequence[str],
    content_boxes: Tensor | None = None,
    scale: int = 2,
) -> Image.Image:
    """An assembled uint8 image (3, H, W) as a PIL image, enlarged ``scale`` x, with each region outlined in its
    colour (REGION_COLORS), its label written in its top-left corner and, if given, the sample extent in white."""
    if image.dtype != torch.uint8 or tuple(image.shape) != (3, template.canvas_height, template.canvas_width):
        raise ValueError(
            f"expected the (3, {template.canvas_height}, {template.canvas_width}) uint8 canvas, got "
            f"{image.dtype} {tuple(image.shape)}"
        )
    picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
        (template.canvas_width * scale, template.canvas_height * scale), Image.NEAREST
    )
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    if content_boxes is not None:
        for box in content_boxes.tolist():
            draw.rectangle([v * scale for v in box[:2]] + [v * scale - 1 for v in box[2:]], outline=(255, 255, 255))
    for r, box in enumerate(template.region_boxes().tolist()):
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=REGION_COLORS[r], width=2)
        text = class_names[int(labels[r])]
        left, top, right, bottom = draw.textbbox((x1 + 4, y1 + 4), text, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=(0, 0, 0))
        draw.text((x1 + 4, y1 + 4), text, fill=REGION_COLORS[r], font=font)
    return picture


def render_erf(erf_map: Tensor, *, image: Tensor | None = None, alpha: float = 0.6) -> Image.Image:
    """An ERF (H, W) of one position as a heat map (black -> red -> yellow -> white, scaled to its maximum), as in
    Fig. 6; blended over the uint8 canvas (3, H, W) with weight ``alpha`` when ``image`` is given."""
    if erf_map.ndim != 2:
        raise ValueError(f"expected one position's ERF (H, W), got {tuple(erf_map.shape)}")
    value = erf_map.detach().float().cpu()
    value = value / value.max().clamp_min(torch.finfo(torch.float32).tiny)
    heat = torch.stack([(3 * value).clamp(0, 1), (3 * value - 1).clamp(0, 1), (3 * value - 2).clamp(0, 1)])
    if image is not None:
        if tuple(image.shape) != (3, *erf_map.shape) or image.dtype != torch.uint8:
            raise ValueError(f"image must be (3, {erf_map.shape[0]}, {erf_map.shape[1]}) uint8")
        heat = alpha * heat + (1 - alpha) * image.float().cpu() / 255.0
    return Image.fromarray((heat * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
