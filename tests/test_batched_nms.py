"""Batched box IoU and batched greedy NMS (detpretrain.boxes), checked against torchvision's box_iou and nms."""

import pytest
import torch
from torchvision.ops import box_iou, nms

from detpretrain.boxes import batched_box_iou, batched_nms_rows


def clustered_boxes(generator: torch.Generator, rows: int, k: int, clusters: int = 6) -> torch.Tensor:
    """(rows, k, 4) boxes around a few centres per row, so that many pairs overlap above 0.5 and chains form."""
    centres = torch.rand(rows, clusters, 2, generator=generator) * 200
    which = torch.randint(clusters, (rows, k), generator=generator)
    centre = centres.gather(1, which[:, :, None].expand(rows, k, 2)) + torch.randn(rows, k, 2, generator=generator) * 6
    size = 20 + torch.rand(rows, k, 2, generator=generator) * 30
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)


def reference_keep(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision.ops.nms on each row's valid boxes, as a (B, K) mask."""
    keep = torch.zeros_like(valid)
    for row in range(len(boxes)):
        index = torch.nonzero(valid[row]).squeeze(1)
        keep[row, index[nms(boxes[row, index], scores[row, index], threshold)]] = True
    return keep


def test_batched_box_iou_is_bitwise_torchvisions_box_iou_and_broadcasts_batches():
    generator = torch.Generator().manual_seed(0)
    boxes1 = clustered_boxes(generator, 3, 7)
    boxes2 = clustered_boxes(generator, 3, 5)
    iou = batched_box_iou(boxes1, boxes2)
    assert iou.shape == (3, 7, 5)
    for row in range(3):
        assert torch.equal(iou[row], box_iou(boxes1[row], boxes2[row]))
    shared = boxes2[0]  # (M, 4) against a batch: every batch sees the same boxes
    iou = batched_box_iou(boxes1, shared)
    assert iou.shape == (3, 7, 5) and all(torch.equal(iou[row], box_iou(boxes1[row], shared)) for row in range(3))
    # Hand-computed: 10x10 boxes sharing a 5x10 strip -> 50 / 150.
    square = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert batched_box_iou(square, square + torch.tensor([5.0, 0.0, 5.0, 0.0])).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="boxes1 and boxes2"):
        batched_box_iou(torch.zeros(4), square)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_batched_nms_equals_torchvision_nms_per_row_with_distinct_scores(threshold):
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        rows, k = 3, int(torch.randint(1, 120, (1,), generator=generator))
        boxes = clustered_boxes(generator, rows, k)
        scores = torch.rand(rows, k, generator=generator)  # distinct (continuous) scores, in no particular order
        valid = torch.rand(rows, k, generator=generator) > 0.2
        valid[seed % rows] = seed % 2 == 0  # a row without any valid box every other seed, a full row otherwise
        keep = batched_nms_rows(boxes, scores, valid, threshold)
        assert keep.dtype == torch.bool and keep.shape == (rows, k)
        assert torch.equal(keep, reference_keep(boxes, scores, valid, threshold)), seed


def test_batched_nms_converges_on_a_chain_that_needs_one_iteration_per_box():
    # Boxes slide right by 2 px, each overlapping the next above 0.7 but not the one after, in decreasing score:
    # greedy NMS keeps every other box, and the fixed point settles one box per iteration, the longest possible run.
    k = 40
    x = torch.arange(k, dtype=torch.float32) * 2
    boxes = torch.stack((x, torch.zeros(k), x + 14, torch.full((k,), 10.0)), dim=1)[None]
    scores = -torch.arange(k, dtype=torch.float32)[None]
    iou = box_iou(boxes[0, :1], boxes[0, 1:3])[0]
    assert iou[0] > 0.7 > iou[1]  # 120 / 160 with the next box, 100 / 180 with the one after
    keep = batched_nms_rows(boxes, scores, torch.ones(1, k, dtype=torch.bool), 0.7)
    assert keep[0].tolist() == [i % 2 == 0 for i in range(k)]
    assert torch.equal(keep, reference_keep(boxes, scores, torch.ones(1, k, dtype=torch.bool), 0.7))


def test_batched_nms_handles_empty_batches_rows_and_invalid_suppressors():
    for rows, k in ((0, 5), (2, 0)):
        none = torch.zeros(rows, k, dtype=torch.bool)
        keep = batched_nms_rows(torch.zeros(rows, k, 4), torch.zeros(rows, k), none, 0.5)
        assert keep.shape == (rows, k) and keep.dtype == torch.bool
    # An invalid box never suppresses: the best box is invalid, so the identical second one is kept.
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]]])
    keep = batched_nms_rows(boxes, torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[False, True, True]]), 0.5)
    assert keep.tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match="bool"):
        batched_nms_rows(boxes, torch.zeros(1, 3), torch.ones(1, 3), 0.5)
    with pytest.raises(ValueError, match=r"\(B, K, 4\)"):
        batched_nms_rows(boxes[0], torch.zeros(3), torch.ones(3, dtype=torch.bool), 0.5)


def test_batched_nms_visits_equal_scores_in_input_order():
    # Ties: a stable sort, so of two identical boxes with one score the first is kept. (torchvision's sort does not
    # promise an order among ties, which is why the comparison with it uses distinct scores.)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]])
    keep = batched_nms_rows(boxes, torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), 0.5)
    assert keep.tolist() == [[True, False, True]]
    keep = batched_nms_rows(boxes.flip(1), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), 0.5)
    assert keep.tolist() == [[True, True, False]]


def test_batched_nms_gives_the_same_keep_in_tiles_and_blocks(monkeypatch):
    # Tiles of boxes and blocks of rows bound the IoU intermediates; smaller ones, which do not divide the boxes or
    # the batch, must not change the result.
    import detpretrain.boxes as boxes_module

    generator = torch.Generator().manual_seed(1)
    boxes = clustered_boxes(generator, 5, 200)
    scores = torch.rand(5, 200, generator=generator)
    valid = torch.rand(5, 200, generator=generator) > 0.1
    expected = reference_keep(boxes, scores, valid, 0.6)
    assert torch.equal(batched_nms_rows(boxes, scores, valid, 0.6), expected)
    monkeypatch.setattr(boxes_module, "_NMS_TILE", 64)  # 200 boxes -> 256 padded: 4 tiles
    monkeypatch.setattr(boxes_module, "_NMS_BLOCK_ENTRIES", 3 * 64 * 256)  # 3 rows per block in the last tile
    assert torch.equal(batched_nms_rows(boxes, scores, valid, 0.6), expected)
