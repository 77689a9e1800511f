"""Pictures for --visualize and Fig. 6: the assembled image with its regions and labels, and an ERF as a heat map."""

import numpy as np
import pytest
import torch

from detpretrain.jigsaw import REGION_COLORS, get_template, render_erf, render_jigsaw

TEMPLATE = get_template("split96")


def test_render_jigsaw_outlines_regions_and_writes_labels():
    canvas = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 4, 3, 1])
    names = ["background", "cat", "dog", "bus", "kite"]
    picture = render_jigsaw(canvas, labels, template=TEMPLATE, class_names=names, scale=2)
    assert picture.size == (448, 448)
    pixels = np.asarray(picture)
    for r, (x1, y1, _, y2) in enumerate(TEMPLATE.region_boxes().tolist()):
        assert tuple(pixels[(y1 + y2), 2 * x1]) == REGION_COLORS[r]  # left edge, halfway down
        label_area = pixels[2 * y1 + 3 : 2 * y1 + 20, 2 * x1 + 3 : 2 * x1 + 40].astype(int)
        # The label text in the region's colour (anti-aliased: close to it).
        assert (np.abs(label_area - REGION_COLORS[r]).sum(-1) < 30).any()
    other = np.asarray(render_jigsaw(canvas, labels.flip(0), template=TEMPLATE, class_names=names))
    assert (other[3:20, 3:40] != pixels[3:20, 3:40]).any()
    with pytest.raises(ValueError, match="uint8 canvas"):
        render_jigsaw(canvas.float(), labels, template=TEMPLATE, class_names=names)


def test_render_erf_is_brightest_where_the_erf_peaks():
    erf = torch.zeros(32, 48)
    erf[20, 30], erf[5, 5] = 4.0, 1.0
    picture = np.asarray(render_erf(erf))
    assert picture.shape == (32, 48, 3)
    assert tuple(picture[20, 30]) == (255, 255, 255) and tuple(picture[0, 0]) == (0, 0, 0)
    assert picture[5, 5, 0] > 0 and picture[5, 5, 2] == 0  # a quarter of the peak: dark red
    overlay = np.asarray(render_erf(erf, image=torch.full((3, 32, 48), 200, dtype=torch.uint8), alpha=0.5))
    assert tuple(overlay[0, 0]) == (100, 100, 100)
