"""The batched CROI sampling and pooling against per-image references: the same rules (§3.2.2), the same draws'
distributions, the same pooled values. The references are the plain per-image forms the batched code replaced."""

import pytest
import torch
from torchvision.ops import box_iou, roi_align

from detpretrain.boxes import batched_box_iou, fpn_levels, sample_indices
from detpretrain.predet.croi import FPNRoIAlign, pad_proposals, sample_query_proposals


def reference_sample(proposals, queries, *, iou_threshold, max_negatives):
    """One image, its valid queries only: the rules written out with torchvision's box_iou and sample_indices. An
    image without a valid query has no lookup, so nothing is drawn."""
    if len(queries) == 0:
        return queries, queries
    candidates = torch.cat((proposals, queries))
    iou = box_iou(queries, candidates)  # (Qv, P + Qv)
    keys = torch.rand_like(iou).masked_fill(iou <= iou_threshold, -1.0)
    positives = candidates[keys.argmax(dim=1)]
    negatives = candidates[sample_indices(iou.amax(dim=0) < iou_threshold, max_negatives)]
    return positives, negatives


def make_images(seed=0):
    """Four images of different proposal counts: near copies of the queries (positives), boxes overlapping them a
    little, and far boxes. Image 1 has no proposal, image 2 no valid query; invalid slots hold junk boxes."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    num_slots = 3
    xy = rand(4, num_slots, 2) * 60
    queries = torch.cat((xy, xy + rand(4, num_slots, 2) * 30 + 20), dim=2)
    query_valid = torch.tensor([[True, True, False], [True, False, True], [False, False, False], [True, True, True]])
    queries[~query_valid] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # an empty box: NaN IoU if it were not masked
    proposals = []
    for i, count in enumerate((40, 0, 25, 60)):
        near = queries[i].repeat(count // 6 + 1, 1)[: count // 3] + (rand(count // 3, 4) - 0.5) * 8
        xy = rand(count - count // 3, 2) * 100
        other = torch.cat((xy, xy + rand(len(xy), 2) * 40 + 4), dim=1)
        proposals.append(torch.cat((near, other)))
    return proposals, queries, query_valid


def batched(proposals, queries, query_valid, *, max_negatives):
    padded, proposal_valid = pad_proposals(proposals, dtype=queries.dtype)
    return sample_query_proposals(
        padded, proposal_valid, queries, query_valid, iou_threshold=0.5, max_negatives=max_negatives
    )


def rows_in(boxes, candidates):
    """(len(boxes), len(candidates)) bool: which candidate rows each box equals exactly."""
    return (boxes[:, None, :] == candidates[None, :, :]).all(dim=2)


def test_batched_iou_equals_torchvisions_image_by_image():
    proposals, queries, _ = make_images()
    padded, _ = pad_proposals(proposals, dtype=queries.dtype)
    iou = batched_box_iou(queries, padded)
    for i, boxes in enumerate(proposals):
        valid = (queries[i, :, 2:] > queries[i, :, :2]).all(dim=1)
        assert torch.equal(iou[i, valid, : len(boxes)], box_iou(queries[i, valid], boxes))


def test_pad_proposals_marks_the_real_rows():
    padded, valid = pad_proposals([torch.ones(2, 4), torch.zeros(0, 4), torch.full((3, 4), 2.0)], dtype=torch.float32)
    assert padded.shape == (3, 3, 4) and valid.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert torch.equal(padded[valid], torch.cat((torch.ones(2, 4), torch.full((3, 4), 2.0))))
    assert (padded[~valid] == 0).all()
    padded, valid = pad_proposals([torch.zeros(0, 4)] * 2, dtype=torch.float32)
    assert padded.shape == (2, 0, 4) and valid.shape == (2, 0)


@pytest.mark.parametrize("max_negatives", [7, 512])
def test_batched_sampling_obeys_the_per_image_rules(max_negatives):
    torch.manual_seed(0)
    proposals, queries, query_valid = make_images()
    positives, negatives, negative_valid = batched(proposals, queries, query_valid, max_negatives=max_negatives)
    assert negatives.shape[1] == min(max_negatives, 60 + 3) and negative_valid.shape == negatives.shape[:2]
    assert (negatives[~negative_valid] == 0).all()
    available = []
    for i in range(len(proposals)):
        image_queries = queries[i, query_valid[i]]
        candidates = torch.cat((proposals[i], image_queries))
        drawn = negatives[i, negative_valid[i]]
        if len(image_queries) == 0:
            assert len(drawn) == 0  # no query, no lookup
            continue
        iou = box_iou(image_queries, candidates)
        # Each valid query's positive is one of its candidates with IoU > 0.5.
        for q, positive in zip(query_valid[i].nonzero().squeeze(1).tolist(), iou > 0.5, strict=True):
            assert rows_in(positives[i, q][None], candidates[positive]).any()
        # Negatives: distinct candidates below 0.5 IoU with every valid query, min(max_negatives, available) of them.
        pool = candidates[iou.amax(dim=0) < 0.5]
        assert len(drawn) == min(max_negatives, len(pool))
        assert rows_in(drawn, pool).any(dim=1).all()
        assert len(torch.unique(drawn, dim=0)) == len(drawn)
        available.append(len(pool))
    assert available[1] == 0 and min(available[0], available[2]) > 7  # image 1: no proposal, so no negative


def test_batched_and_per_image_sampling_draw_from_the_same_sets():
    # Over many draws each side reaches every box it can draw: the reached sets must be the same. The batched side
    # draws many times at once by repeating the batch.
    proposals, queries, query_valid = make_images()
    repeats = 150
    torch.manual_seed(0)
    positives, negatives, negative_valid = batched(
        proposals * repeats, queries.repeat(repeats, 1, 1), query_valid.repeat(repeats, 1), max_negatives=5
    )
    num_images = len(proposals)
    for i in range(num_images):
        image_queries = queries[i, query_valid[i]]
        reference = [
            reference_sample(proposals[i], image_queries, iou_threshold=0.5, max_negatives=5) for _ in range(repeats)
        ]
        if len(image_queries):
            got = positives[i::num_images][:, query_valid[i]]  # (repeats, Qv, 4)
            for q in range(len(image_queries)):
                expected = torch.unique(torch.stack([pos[q] for pos, _ in reference]), dim=0)
                assert torch.equal(torch.unique(got[:, q], dim=0), expected)
        expected = torch.unique(torch.cat([neg for _, neg in reference]), dim=0)
        got = negatives[i::num_images][negative_valid[i::num_images]]
        assert torch.equal(torch.unique(got, dim=0).reshape(-1, 4), expected.reshape(-1, 4))


def test_batched_draws_are_uniform():
    # One image repeated 6000 times in one batch: the query has 3 candidates above 0.5 IoU (two near copies and
    # itself), and 10 boxes are negatives of which 4 are drawn; each should come up at its uniform rate.
    torch.manual_seed(0)
    repeats = 6000
    query = torch.tensor([[20.0, 20.0, 60.0, 60.0]])
    near = query + torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 2.0]])
    far = torch.stack([torch.tensor([100.0 + 10 * k, 0.0, 108.0 + 10 * k, 8.0]) for k in range(10)])
    proposals = torch.cat((near, far))
    positives, negatives, negative_valid = batched(
        [proposals] * repeats,
        query.expand(repeats, 1, 4).contiguous(),
        torch.ones(repeats, 1, dtype=torch.bool),
        max_negatives=4,
    )
    assert negative_valid.sum(dim=1).eq(4).all()
    positive_counts = rows_in(positives[:, 0], torch.cat((near, query))).sum(dim=0).float()
    negative_counts = rows_in(negatives[negative_valid], far).sum(dim=0).float()
    # Binomial counts: expected n p, standard deviation sqrt(n p (1 - p)); 5 of them is far beyond chance.
    for counts, p in ((positive_counts, 1 / 3), (negative_counts, 0.4)):
        assert ((counts - repeats * p).abs() < 5 * (repeats * p * (1 - p)) ** 0.5).all(), counts


def reference_pool(features, boxes, batch_index, *, strides):
    """The per-level loop: each level's boxes found with nonzero, pooled, and put back in place."""
    levels = fpn_levels(boxes, min_level=2, max_level=1 + len(strides))
    rois = torch.cat((batch_index[:, None].to(boxes.dtype), boxes), dim=1)
    result = features[0].new_zeros(len(boxes), features[0].shape[1], 7, 7)
    for offset, (x, stride) in enumerate(zip(features, strides, strict=True)):
        index = torch.nonzero(levels == 2 + offset).squeeze(1)
        pooled = roi_align(x, rois[index], output_size=7, spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
        result = result.index_copy(0, index, pooled)
    return result


def test_fpn_roi_align_equals_the_per_level_loop_with_its_gradients():
    torch.manual_seed(0)
    strides = (4, 8, 16, 32)
    features = [torch.randn(2, 3, 768 // s, 768 // s, requires_grad=True) for s in strides]
    xy = torch.rand(60, 2) * 100
    sides = torch.exp(torch.rand(60, 1) * 6.5) * (0.8 + 0.4 * torch.rand(60, 2)) + 1  # about 2..800: every level
    boxes = torch.cat((xy, xy + sides), dim=1)
    boxes = torch.cat((boxes, torch.zeros(3, 4)))  # empty boxes (padding slots): level 2, pooled as zeros
    batch_index = torch.randint(0, 2, (len(boxes),))
    assert set(fpn_levels(boxes, min_level=2, max_level=5).tolist()) == {2, 3, 4, 5}
    pooler = FPNRoIAlign(strides=strides, output_size=7, sampling_ratio=0, aligned=True)
    pooled = pooler(features, boxes, batch_index)
    expected = reference_pool(features, boxes, batch_index, strides=strides)
    assert torch.equal(pooled, expected)
    assert (pooled[-3:] == 0).all()
    weights = torch.randn_like(pooled)
    got = torch.autograd.grad((pooled * weights).sum(), features)
    want = torch.autograd.grad((expected * weights).sum(), features)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert pooler(features, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)).shape == (0, 3, 7, 7)
    with pytest.raises(ValueError, match="no FPN level"):
        pooler(features, torch.tensor([[10.0, 10.0, 8.0, 20.0]]), torch.zeros(1, dtype=torch.int64))
