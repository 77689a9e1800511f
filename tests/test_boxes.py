"""Box operations of PreDet's CRPN and CROI head: anchors, encoding, FPN levels, clipping, sampling, random boxes."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from detpretrain.boxes import (
    cell_anchors,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    fpn_levels,
    grid_anchors,
    jitter_boxes,
    nonempty_boxes,
    random_boxes_away_from,
    sample_indices,
    sample_rows,
)


def test_cell_anchors_keep_the_area_and_take_ratio_as_height_over_width():
    anchors = cell_anchors(32, (0.5, 1.0, 2.0))
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    torch.testing.assert_close(widths * heights, torch.full((3,), 1024.0))
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(anchors[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    torch.testing.assert_close(anchors[0, 2].item(), math.sqrt(2048) / 2)  # not rounded (detectron2)
    torch.testing.assert_close(anchors[:, :2] + anchors[:, 2:], torch.zeros(3, 2))  # centred on (0, 0)


def test_grid_anchors_are_ordered_y_x_a_and_centred_on_stride_multiples():
    cell = cell_anchors(8, (0.5, 1.0, 2.0))
    anchors = grid_anchors(cell, (2, 3), stride=4)
    assert anchors.shape == (2 * 3 * 3, 4)
    for y in range(2):
        for x in range(3):
            for a in range(3):
                expected = cell[a] + torch.tensor([4.0 * x, 4.0 * y, 4.0 * x, 4.0 * y])
                torch.testing.assert_close(anchors[(y * 3 + x) * 3 + a], expected)


def test_encode_matches_a_hand_computed_case_and_decode_inverts_it():
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    target = torch.tensor([[5.0, 5.0, 15.0, 25.0]])  # centre (5, 5) -> (10, 15), size 10 x 10 -> 10 x 20
    deltas = encode_boxes(reference, target, weights=(1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(deltas, torch.tensor([[0.5, 1.0, 0.0, math.log(2.0)]]))
    weighted = encode_boxes(reference, target, weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(weighted, torch.tensor([[5.0, 10.0, 0.0, 5 * math.log(2.0)]]))

    torch.manual_seed(0)
    xy = torch.rand(50, 2) * 100
    ref = torch.cat((xy, xy + torch.rand(50, 2) * 50 + 1), dim=1)
    xy = torch.rand(50, 2) * 100
    tgt = torch.cat((xy, xy + torch.rand(50, 2) * 50 + 1), dim=1)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        back = decode_boxes(encode_boxes(ref, tgt, weights=weights), ref, weights=weights)
        torch.testing.assert_close(back, tgt, rtol=1e-4, atol=1e-4)


def test_decode_clamps_the_scale_so_exp_cannot_overflow():
    boxes = decode_boxes(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), torch.tensor([[0.0, 0.0, 2.0, 2.0]]), weights=(1,) * 4)
    assert torch.isfinite(boxes).all()
    torch.testing.assert_close(boxes[0, 2] - boxes[0, 0], torch.tensor(2.0 * 1000 / 16))


def test_fpn_levels_follow_the_fpn_rule_with_exact_boundaries():
    sizes = torch.tensor([10.0, 111.9, 112.0, 223.9, 224.0, 447.0, 448.0, 1000.0])
    boxes = torch.stack((torch.zeros(8), torch.zeros(8), sizes, sizes), dim=1)
    levels = fpn_levels(boxes, min_level=2, max_level=5)
    assert levels.tolist() == [2, 2, 3, 3, 4, 4, 5, 5]
    # sqrt(w * h) decides, not the longer side: 448 x 112 has size 224.
    assert fpn_levels(torch.tensor([[0.0, 0.0, 448.0, 112.0]]), min_level=2, max_level=5).tolist() == [4]


def test_clip_and_nonempty():
    boxes = torch.tensor([[-5.0, -5.0, 20.0, 30.0], [50.0, 10.0, 70.0, 20.0], [10.0, 10.0, 12.0, 30.0]])
    clipped = clip_boxes(boxes, (25, 60))  # (H, W)
    torch.testing.assert_close(
        clipped, torch.tensor([[0.0, 0.0, 20.0, 25.0], [50.0, 10.0, 60.0, 20.0], [10.0, 10.0, 12.0, 25.0]])
    )
    outside = clip_boxes(torch.tensor([[70.0, 0.0, 80.0, 10.0]]), (25, 60))
    assert nonempty_boxes(outside).tolist() == [False]
    assert nonempty_boxes(clipped, min_size=2.0).tolist() == [True, True, False]


def test_sample_indices_draws_a_subset_of_the_true_entries():
    torch.manual_seed(0)
    mask = torch.zeros(100, dtype=torch.bool)
    mask[torch.arange(0, 100, 3)] = True  # 34 true entries
    picked = sample_indices(mask, 10)
    assert len(picked) == 10 and len(picked.unique()) == 10 and mask[picked].all()
    everything = sample_indices(mask, 1000)
    assert sorted(everything.tolist()) == list(range(0, 100, 3))
    assert len(sample_indices(torch.zeros(5, dtype=torch.bool), 3)) == 0


def test_jittered_boxes_overlap_their_box_and_stay_in_the_image():
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 40.0], [0.0, 50.0, 30.0, 96.0], [70.0, 0.0, 96.0, 20.0]])
    jittered = jitter_boxes(boxes, num_per_box=20, min_iou=0.5, image_size=(96, 96))
    assert jittered.shape == (3, 20, 4)
    for i in range(3):
        iou = box_iou(jittered[i], boxes[i : i + 1]).squeeze(1)
        assert (iou > 0.5).all()
        assert (iou < 1.0).sum() > 10  # really jittered, not copies of the box
    assert (jittered >= 0).all() and (jittered <= 96).all()


def test_random_negatives_overlap_no_box_and_stay_in_the_image():
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 40.0], [40.0, 40.0, 90.0, 90.0]])
    negatives = random_boxes_away_from(boxes, num=64, max_iou=0.5, image_size=(96, 128))
    assert negatives.shape == (64, 4)
    assert (box_iou(negatives, boxes) < 0.5).all()
    assert (negatives[:, 0::2] >= 0).all() and (negatives[:, 0::2] <= 128).all()
    assert (negatives[:, 1::2] >= 0).all() and (negatives[:, 1::2] <= 96).all()
    assert nonempty_boxes(negatives, min_size=15.9).all()
    with pytest.raises(ValueError, match="min_size"):
        random_boxes_away_from(boxes, num=4, max_iou=0.5, image_size=(10, 128))


def test_sample_rows_draws_a_uniform_subset_of_each_rows_true_entries():
    torch.manual_seed(0)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, [1, 4, 7]] = True  # fewer than max_count: all of them
    mask[1, :] = True  # more: exactly max_count
    selected = sample_rows(mask, 5)
    assert torch.equal(selected[0], mask[0]) and int(selected[1].sum()) == 5 and not selected[2].any()
    assert not (selected & ~mask).any()
    # Uniform: over many draws every entry of a full row is chosen about max_count / M of the time.
    counts = sum(sample_rows(torch.ones(1, 10, dtype=torch.bool), 3)[0].float() for _ in range(2000))
    assert torch.allclose(counts / 2000, torch.full((10,), 0.3), atol=0.05)


def test_decode_in_float32_whatever_the_deltas_dtype():
    """bf16 deltas (a head under autocast) must not round the decoded boxes: near x = 1000 bf16 steps are 8 px."""
    reference = torch.tensor([[1000.0, 600.0, 1090.0, 700.0], [13.0, 17.0, 40.0, 90.0]])
    deltas = torch.tensor([[0.11, -0.07, 0.05, 0.2], [0.3, 0.1, -0.4, 0.02]])
    weights = (10.0, 10.0, 5.0, 5.0)
    from_bf16 = decode_boxes(deltas.bfloat16(), reference, weights=weights)
    assert from_bf16.dtype == torch.float32
    assert torch.equal(from_bf16, decode_boxes(deltas.bfloat16().float(), reference, weights=weights))
    assert (from_bf16[0] % 8 != 0).any()  # not on bf16's 8-px grid
    assert decode_boxes(deltas.double(), reference, weights=weights).dtype == torch.float64
