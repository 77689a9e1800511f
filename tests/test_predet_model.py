"""The PreDet model (§3): CRPN (group convolution, matching, sampling, loss, proposals), CROI head (pooling levels,
sampling, InfoNCE assembly, dot-product regression) and the whole model's losses, gradients and Tab. 1 ablations."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou, nms
from torchvision.transforms.v2.functional import pil_to_tensor

from detpretrain.backbone import TimmFPN, create_body
from detpretrain.boxes import cell_anchors, clip_boxes, decode_boxes, encode_boxes, grid_anchors, nonempty_boxes
from detpretrain.losses import info_nce_loss
from detpretrain.predet.croi import ContrastiveROIHeads, CROIHead, FPNRoIAlign, sample_query_proposals
from detpretrain.predet.crpn import ContrastiveRPN, CRPNHead, match_anchors_to_queries, query_anchor_products
from detpretrain.predet.model import LOSS_KEYS, PreDet, PreDetConfig, create_predet


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this module: on a small shared CPU, threads spinning on each other made these tiny
    forwards over ten times slower (measured: 5 s against 0.3 s per step), and the result is the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Small widths keep the whole model fast on a CPU; the defaults (256 / 1024) change only sizes.
SMALL = PreDetConfig(crpn_dim=16, croi_embed_dim=16, croi_reg_dim=16, box_head_dim=32)


def make_crpn(head=None, **overrides):
    config = dict(
        anchor_sizes=(32,),
        aspect_ratios=(0.5, 1.0, 2.0),
        strides=(4,),
        iou_thresholds=(0.3, 0.7),
        allow_low_quality_matches=False,
        positives_per_image=128,
        negatives_per_image=128,
        bbox_reg_weights=(1.0, 1.0, 1.0, 1.0),
        smooth_l1_beta=0.0,
        pre_nms_topk=2000,
        nms_threshold=0.7,
        post_nms_topk=1000,
        min_box_size=0.0,
    )
    config.update(overrides)
    num_anchors = len(config["aspect_ratios"])
    head = head or CRPNHead(in_channels=4, query_in_features=8, num_anchors=num_anchors, dim=4)
    return ContrastiveRPN(head, **config)


# ---------------------------------------------------------------------------------------------------------------------
# CRPN


def test_query_anchor_products_are_the_group_convolution_and_the_explicit_per_anchor_dot_products():
    torch.manual_seed(0)
    n, q, a, k, d, h, w = 2, 3, 3, 4, 5, 3, 4
    image = torch.randn(n, a * d, h, w)
    vectors = torch.randn(n, q, a, k, d)
    out = query_anchor_products(image, vectors)
    assert out.shape == (n, q, h * w * a, k)
    for i in range(n):
        for j in range(q):
            for y in range(h):
                for x in range(w):
                    for anchor in range(a):
                        feature = image[i, anchor * d : (anchor + 1) * d, y, x]
                        expected = vectors[i, j, anchor] @ feature  # (k,)
                        torch.testing.assert_close(out[i, j, (y * w + x) * a + anchor], expected)
    # The paper's literal formulation (§3.2.1): a 1x1 convolution with A groups per image, whose kernels are the
    # query vectors (Q * K output channels per group); the images are folded into the groups.
    kernels = vectors.permute(0, 2, 1, 3, 4).reshape(n * a * q * k, d, 1, 1)  # (N*A*Q*K, D, 1, 1)
    conv = F.conv2d(image.reshape(1, n * a * d, h, w), kernels, groups=n * a)  # (1, N*A*Q*K, h, w)
    conv = conv.reshape(n, a, q, k, h, w).permute(0, 2, 4, 5, 1, 3).reshape(n, q, h * w * a, k)
    torch.testing.assert_close(out, conv)
    # The same numbers and gradients from channels_last features.
    image.requires_grad_()
    channels_last = image.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.testing.assert_close(query_anchor_products(channels_last, vectors), out)
    weights = torch.randn_like(out)
    (query_anchor_products(image, vectors) * weights).sum().backward()
    (query_anchor_products(channels_last, vectors) * weights).sum().backward()
    torch.testing.assert_close(channels_last.grad, image.grad)


@pytest.mark.parametrize("scale_dot_products", [False, True], ids=["paper", "scaled"])
def test_crpn_head_scores_line_up_with_the_anchor_order(scale_dot_products):
    torch.manual_seed(0)
    head = CRPNHead(in_channels=4, query_in_features=8, num_anchors=3, dim=5, scale_dot_products=scale_dot_products)
    for p in head.parameters():  # values of order 1, well above assert_close's tolerance (the init is 0.01)
        torch.nn.init.normal_(p)
    features = [torch.randn(1, 4, 3, 2)]
    query_features = torch.randn(1, 2, 8)
    logits, deltas = head(features, query_features)
    assert logits[0].shape == (1, 2, 3 * 2 * 3) and deltas[0].shape == (1, 2, 3 * 2 * 3, 4)
    hidden = F.relu(head.conv(features[0]))
    image_cls, image_reg = head.image_cls(hidden), head.image_reg(hidden)
    query_cls = head.query_cls(query_features).reshape(1, 2, 3, 5)
    query_reg = head.query_reg(query_features).reshape(1, 2, 3, 4, 5)
    y, x, a, q = 2, 1, 2, 1
    m = (y * 2 + x) * 3 + a  # the row of this anchor in grid_anchors
    scale = 1 / math.sqrt(5) if scale_dot_products else 1.0  # the paper's dot products have no scale (§3.2.1)
    expected_logit = image_cls[0, a * 5 : (a + 1) * 5, y, x] @ query_cls[0, q, a] * scale
    torch.testing.assert_close(logits[0][0, q, m], expected_logit)
    expected_deltas = query_reg[0, q, a] @ image_reg[0, a * 5 : (a + 1) * 5, y, x] * scale
    torch.testing.assert_close(deltas[0][0, q, m], expected_deltas)


def test_matching_takes_the_max_iou_query_and_the_paper_thresholds():
    iou = torch.tensor(
        [
            [0.8, 0.5, 0.2, 0.0, 0.0, 0.29],
            [0.5, 0.1, 0.25, 0.0, 0.6, 0.31],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # a query that overlaps no anchor
            [0.9, 0.9, 0.9, 0.9, 0.9, 0.9],  # an invalid slot: ignored whatever its IoUs
        ]
    )[None]  # (N=1, Q=4, M=6)
    valid = torch.tensor([[True, True, True, False]])
    matched, labels = match_anchors_to_queries(
        iou, valid, negative_threshold=0.3, positive_threshold=0.7, allow_low_quality_matches=False
    )
    assert labels.tolist() == [[1, -1, 0, 0, -1, -1]]
    assert matched[0, [0, 1, 2, 4, 5]].tolist() == [0, 0, 1, 1, 1]
    assert matched[0, 3] != 3  # anchor 3 overlaps no valid query: a random valid one
    # detectron2's low-quality rule: query 1's best anchor (4, IoU 0.6) turns positive; query 2 (no overlap) adds none.
    matched, labels = match_anchors_to_queries(
        iou, valid, negative_threshold=0.3, positive_threshold=0.7, allow_low_quality_matches=True
    )
    assert labels.tolist() == [[1, -1, 0, 0, 1, -1]]
    assert matched[0, 4].item() == 1
    # Equal maxima go to the lowest slot (anchor 1); an image without a valid query gets no label.
    tied = torch.tensor([[[0.0, 0.8], [0.5, 0.8]], [[0.9, 0.9], [0.9, 0.9]]])  # (N=2, Q=2, M=2)
    valid = torch.tensor([[True, True], [False, False]])
    matched, labels = match_anchors_to_queries(
        tied, valid, negative_threshold=0.3, positive_threshold=0.7, allow_low_quality_matches=True
    )
    assert matched.tolist() == [[1, 0], [0, 0]] and labels.tolist() == [[-1, 1], [-1, -1]]


def test_matching_all_images_at_once_equals_matching_each_image_alone():
    torch.manual_seed(0)
    xy = torch.rand(3, 5, 2) * 100
    queries = torch.cat((xy, xy + torch.rand(3, 5, 2) * 60 + 2), dim=-1)  # (N, Q, 4)
    xy = torch.rand(400, 2) * 120
    anchors = torch.cat((xy, xy + torch.rand(400, 2) * 60 + 2), dim=-1)
    valid = torch.tensor([[True, False, True, True, False], [True] * 5, [False, False, True, False, False]])
    iou = box_iou(queries.reshape(-1, 4), anchors).reshape(3, 5, 400)
    for low_quality in (False, True):
        kwargs = dict(negative_threshold=0.3, positive_threshold=0.7, allow_low_quality_matches=low_quality)
        matched, labels = match_anchors_to_queries(iou, valid, **kwargs)
        for i in range(3):
            slots = torch.nonzero(valid[i]).squeeze(1)
            alone_iou = iou[i, slots][None]  # (1, Qv, M): this image's valid queries only
            alone_matched, alone_labels = match_anchors_to_queries(
                alone_iou, torch.ones(1, len(slots), dtype=torch.bool), **kwargs
            )
            overlap = alone_iou[0].amax(dim=0) > 0  # elsewhere the match is random
            assert torch.equal(labels[i], alone_labels[0])
            assert torch.equal(matched[i, overlap], slots[alone_matched[0, overlap]])
            assert valid[i, matched[i]].all()


def test_anchors_without_overlap_get_a_uniformly_random_query():
    torch.manual_seed(0)
    iou = torch.zeros(2, 4, 3000)
    iou[:, 1, 0] = 0.9
    valid = torch.tensor([[True, True, False, True], [False, True, False, False]])  # slot 2 holds no query
    matched, labels = match_anchors_to_queries(
        iou, valid, negative_threshold=0.3, positive_threshold=0.7, allow_low_quality_matches=False
    )
    assert matched[:, 0].tolist() == [1, 1] and labels[:, 0].tolist() == [1, 1]
    counts = torch.bincount(matched[0, 1:], minlength=4)
    assert counts[2] == 0 and (counts[[0, 1, 3]] > 900).all(), counts  # about 1000 for each valid query
    assert (matched[1] == 1).all()  # the only valid query
    assert (labels[:, 1:] == 0).all()


def test_sampling_keeps_at_most_128_positives_and_128_negatives_and_ignores_invalid_queries():
    torch.manual_seed(0)
    query = torch.tensor([100.0, 100.0, 164.0, 164.0])
    near = query + torch.randint(-2, 3, (400, 4)).float()  # IoU > 0.85 with the query
    xy = torch.rand(600, 2) * 400 + 300
    far = torch.cat((xy, xy + 40), dim=1)  # no overlap
    between = query + torch.tensor([20.0, 0.0, 20.0, 0.0])  # IoU 44/84 ~ 0.52: ignored
    anchors = torch.cat((near, far, between[None]))
    queries = torch.stack(
        (
            torch.stack((query, torch.tensor([300.0, 300.0, 340.0, 340.0]))),  # image 0: query 1 is invalid
            torch.stack((query, query)),  # image 1: no valid query at all
        )
    )
    valid = torch.tensor([[True, False], [False, False]])
    crpn = make_crpn()
    labels, matched = crpn.label_and_sample_anchors(anchors, queries, valid)
    assert (labels[0] == 1).sum() == 128 and (labels[0] == 0).sum() == 128
    iou = box_iou(anchors, query[None]).squeeze(1)
    assert (iou[labels[0] == 1] > 0.7).all() and (iou[labels[0] == 0] < 0.3).all()
    assert labels[0, -1] == -1  # the in-between anchor is never sampled
    assert (matched[0] == 0).all()  # the invalid query (which overlaps some far anchors) is never matched
    assert (labels[1] == -1).all()

    few = make_crpn(positives_per_image=128, negatives_per_image=128)
    labels, _ = few.label_and_sample_anchors(torch.cat((near[:5], far)), queries, valid)
    assert (labels[0] == 1).sum() == 5 and (labels[0] == 0).sum() == 128  # negatives do not fill up to 256
    labels, _ = few.label_and_sample_anchors(torch.cat((near, far[:3])), queries, valid)
    assert (labels[0] == 1).sum() == 128 and (labels[0] == 0).sum() == 3


def test_crpn_loss_uses_only_the_matched_querys_score_and_deltas():
    crpn = make_crpn()
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    queries = torch.tensor([[[20.0, 20.0, 30.0, 30.0], [1.0, 0.0, 11.0, 12.0]]])  # (1, Q=2, 4)
    anchor_labels = torch.tensor([[1, 0, -1]])  # anchor 0 positive for query 1, anchor 1 negative (matched to 0)
    matched_query = torch.tensor([[1, 0, 0]])
    pred_logits = torch.tensor([[[50.0, -1.0, 7.0], [2.0, 50.0, 7.0]]])  # (1, Q, M): the 50s must not count
    pred_deltas = torch.zeros(1, 2, 3, 4)
    pred_deltas[0, 1, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    pred_deltas[0, 0, 0] = 100.0  # query 0's deltas at anchor 0: not its match, ignored
    losses = crpn.losses(
        pred_logits,
        pred_deltas,
        anchors,
        queries,
        anchor_labels=anchor_labels,
        matched_query=matched_query,
        num_images=1,
    )
    # BCE: positive with logit 2, negative with logit -1; normalized by 128 + 128 anchors x 1 image.
    expected_cls = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 256
    assert losses["loss_crpn_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    target = encode_boxes(anchors[:1], queries[0, 1:], weights=(1.0, 1.0, 1.0, 1.0))[0]
    expected_reg = (target - torch.tensor([0.1, 0.0, 0.0, 0.0])).abs().sum().item() / 256
    assert losses["loss_crpn_reg"].item() == pytest.approx(expected_reg, rel=1e-6)


def test_proposals_take_the_best_valid_query_then_top_k_clip_and_nms_in_view1():
    crpn = make_crpn(aspect_ratios=(1.0,), pre_nms_topk=3, post_nms_topk=3)
    anchors = [
        torch.tensor(
            [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 20.0, 15.0, 30.0]]
        )
    ]
    logits = torch.tensor(
        [
            [[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, -1.0], [9.0, 9.0, 9.0, 9.0]],  # image 0: query 2 is invalid
            [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]],  # image 1: no valid query
        ]
    ).requires_grad_()
    deltas = torch.zeros(2, 3, 4, 4)
    deltas[0, 1, 2] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # query 1 moves anchor 2 right by half its width
    deltas[0, 2] = 3.0  # the invalid query's deltas would blow boxes up: must not be used
    deltas.requires_grad_()
    valid = torch.tensor([[True, True, False], [False, False, False]])
    proposals, scores = crpn.find_proposals([logits], [deltas], anchors, valid, image_size=(32, 32))
    # Top-3 by best valid score: anchor 2 (5, query 1), anchor 0 (3), anchor 1 (2); anchor 1 overlaps anchor 0 by
    # IoU 9/11 > 0.7 and goes in NMS; anchor 2 moved to x 25..35 is clipped to the 32-pixel view.
    torch.testing.assert_close(proposals[0], torch.tensor([[25.0, 20.0, 32.0, 30.0], [0.0, 0.0, 10.0, 10.0]]))
    torch.testing.assert_close(scores[0], torch.tensor([5.0, 3.0]))
    assert not proposals[0].requires_grad
    assert proposals[1].shape == (0, 4)

    one = make_crpn(aspect_ratios=(1.0,), pre_nms_topk=3, post_nms_topk=1)
    proposals, _ = one.find_proposals([logits], [deltas], anchors, valid, image_size=(32, 32))
    assert len(proposals[0]) == 1


@pytest.mark.parametrize("pre_nms_topk", [150, 500])  # both levels cut to 150 (one NMS call), or 500 and 192
def test_proposals_equal_a_per_image_per_level_reference_with_torchvision_nms(pre_nms_topk):
    # The batched construction against a plain loop over images and levels with torchvision's nms (distinct scores:
    # torchvision does not promise an order among equal ones).
    torch.manual_seed(0)
    crpn = make_crpn(
        anchor_sizes=(16, 32), strides=(4, 8), pre_nms_topk=pre_nms_topk, post_nms_topk=120, min_box_size=2.0
    )
    features = [torch.zeros(3, 4, 16, 16), torch.zeros(3, 4, 8, 8)]
    anchors = crpn.anchors(features)
    logits = [torch.randn(3, 4, len(a)) for a in anchors]
    deltas = [torch.randn(3, 4, len(a), 4) * 0.3 for a in anchors]
    valid = torch.tensor([[True, False, True, True], [False] * 4, [False, True, False, False]])
    proposals, scores = crpn.find_proposals(logits, deltas, anchors, valid, image_size=(64, 64))
    for i in range(3):
        if not valid[i].any():
            assert proposals[i].shape == (0, 4) and scores[i].shape == (0,)
            continue
        kept_boxes, kept_scores = [], []
        for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors, strict=True):
            best, query = level_logits[i, valid[i]].max(dim=0)
            query = torch.nonzero(valid[i]).squeeze(1)[query]
            top, anchor = best.topk(min(pre_nms_topk, len(best)))
            boxes = clip_boxes(
                decode_boxes(level_deltas[i, query[anchor], anchor], level_anchors[anchor], weights=(1.0,) * 4),
                (64, 64),
            )
            nonempty = nonempty_boxes(boxes, min_size=2.0)
            boxes, top = boxes[nonempty], top[nonempty]
            keep = nms(boxes, top, 0.7)
            kept_boxes.append(boxes[keep])
            kept_scores.append(top[keep])
        expected_scores, order = torch.cat(kept_scores).sort(descending=True, stable=True)
        assert torch.equal(scores[i], expected_scores[:120])
        assert torch.equal(proposals[i], torch.cat(kept_boxes)[order[:120]])
    assert sum(len(p) for p in proposals) > 100  # the NMS and the limits had work to do


def test_crpn_forward_proposals_are_view1_boxes_within_the_limits():
    torch.manual_seed(0)
    head = CRPNHead(in_channels=4, query_in_features=8, num_anchors=3, dim=4)
    crpn = make_crpn(head, anchor_sizes=(16, 32), strides=(4, 8), pre_nms_topk=50, post_nms_topk=30)
    features = [torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8)]
    queries = torch.tensor([[[4.0, 4.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]]]).repeat(2, 1, 1)
    valid = torch.tensor([[True, True], [True, False]])
    losses, proposals = crpn(features, torch.randn(2, 2, 8), queries, valid, image_size=(64, 64), with_proposals=True)
    assert set(losses) == {"loss_crpn_cls", "loss_crpn_reg"} and all(torch.isfinite(v) for v in losses.values())
    for boxes in proposals:
        assert 0 < len(boxes) <= 30 and not boxes.requires_grad
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()
        # NMS within each level left no pair above 0.7 among same-level boxes; across levels it may, so check the
        # weaker property that the list is not full of duplicates.
        assert len(torch.unique(boxes, dim=0)) == len(boxes)


# ---------------------------------------------------------------------------------------------------------------------
# CROI head


def test_fpn_roi_align_pools_each_box_at_its_level_and_image():
    strides = (4, 8, 16, 32)
    features = [
        torch.full((2, 1, 640 // s, 640 // s), float(level)) + torch.tensor([0.0, 10.0]).view(2, 1, 1, 1)
        for level, s in zip((2, 3, 4, 5), strides, strict=True)
    ]
    pooler = FPNRoIAlign(strides=strides, output_size=7, sampling_ratio=0, aligned=True)
    sizes = torch.tensor([50.0, 150.0, 300.0, 600.0, 40.0])
    boxes = torch.stack((torch.zeros(5), torch.zeros(5), sizes, sizes), dim=1)
    pooled = pooler(features, boxes, torch.tensor([0, 0, 0, 0, 1]))
    assert pooled.shape == (5, 1, 7, 7)
    torch.testing.assert_close(pooled.mean(dim=(1, 2, 3)), torch.tensor([2.0, 3.0, 4.0, 5.0, 12.0]))


def sample_one_image(proposals, queries, *, max_negatives):
    """``sample_query_proposals`` on a batch of one image whose queries are all valid: (positives, negatives)."""
    positives, negatives, negative_valid = sample_query_proposals(
        proposals[None],
        torch.ones(1, len(proposals), dtype=torch.bool),
        queries[None],
        torch.ones(1, len(queries), dtype=torch.bool),
        iou_threshold=0.5,
        max_negatives=max_negatives,
    )
    return positives[0], negatives[0][negative_valid[0]]


def test_croi_sampling_appends_queries_and_draws_positives_and_negatives_by_iou():
    torch.manual_seed(0)
    queries = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 100.0, 90.0]])
    xy = torch.rand(300, 2) * 100
    proposals = torch.cat((xy, xy + torch.rand(300, 2) * 40 + 5), dim=1)
    proposals = torch.cat((proposals, queries + 2.0))  # a near copy of each query
    positives, negatives = sample_one_image(proposals, queries, max_negatives=20)
    assert positives.shape == (2, 4) and len(negatives) == 20
    assert (box_iou(positives, queries).diag() > 0.5).all()
    assert (box_iou(negatives, queries) < 0.5).all()
    # With no proposal at all the appended query is its own positive, and there is no negative.
    positives, negatives = sample_one_image(torch.zeros(0, 4), queries, max_negatives=20)
    torch.testing.assert_close(positives, queries)
    assert len(negatives) == 0
    # The positive is uniform among the candidates above 0.5: both the copy and the query itself come up.
    drawn = {tuple(sample_one_image(queries[:1] + 2.0, queries[:1], max_negatives=0)[0][0].tolist()) for _ in range(40)}
    assert len(drawn) == 2


def test_croi_info_loss_pads_each_images_negatives():
    torch.manual_seed(0)
    heads = ContrastiveROIHeads(
        CROIHead(in_features=4, box_head_dim=8, embed_dim=4, reg_dim=None),
        FPNRoIAlign(strides=(4,), output_size=1, sampling_ratio=0, aligned=True),
        iou_threshold=0.5,
        negatives_per_image=512,
        temperature=0.07,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta=0.0,
    )
    query_embed = F.normalize(torch.randn(3, 4), dim=1)
    positive_embed = F.normalize(torch.randn(3, 4), dim=1)
    negatives = [F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)]
    # Image 0 has two queries and 2 negatives, image 1 no query, image 2 one query and 5 negatives; 5 negative slots
    # per image, the unused ones (and image 1's) filled with random embeddings that must not count.
    query_valid = torch.tensor([[True, True], [False, False], [False, True]])
    negative_embed = F.normalize(torch.randn(3, 5, 4), dim=2)
    negative_embed[0, :2], negative_embed[2] = negatives[0], negatives[1]
    negative_valid = torch.tensor([[True, True, False, False, False], [False] * 5, [True] * 5])
    loss = heads._info_loss(query_embed, positive_embed, negative_embed, negative_valid, query_valid=query_valid)
    expected = torch.stack(
        [
            info_nce_loss(
                (query_embed[i] * positive_embed[i]).sum()[None],
                (negatives[image] @ query_embed[i])[None],
                temperature=0.07,
            )
            for i, image in enumerate((0, 0, 1))
        ]
    ).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("scale_dot_products", [False, True], ids=["paper", "scaled"])
def test_croi_losses_equal_the_formulas_when_each_query_is_its_own_only_positive(scale_dot_products):
    """No proposal overlaps a query, so p+_q is the query box itself (view-1) and every proposal is a negative."""
    torch.manual_seed(0)
    pooler = FPNRoIAlign(strides=(4,), output_size=2, sampling_ratio=0, aligned=True)
    head = CROIHead(
        in_features=3 * 2 * 2, box_head_dim=8, embed_dim=4, reg_dim=4, scale_dot_products=scale_dot_products
    )
    for layer in (head.reg_query, head.reg_proposal):  # deltas of order 1, above assert_close's tolerance
        torch.nn.init.normal_(layer.weight)
    heads = ContrastiveROIHeads(
        head,
        pooler,
        iou_threshold=0.5,
        negatives_per_image=512,
        temperature=0.07,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta=0.0,
    )
    features = [torch.randn(2, 3, 16, 16)]
    queries = torch.tensor(
        [[[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 50.0]], [[8.0, 4.0, 40.0, 36.0], [0.0, 0.0, 1.0, 1.0]]]
    )
    valid = torch.tensor([[True, True], [True, False]])
    proposals = [
        torch.tensor([[40.0, 0.0, 64.0, 20.0], [0.0, 40.0, 20.0, 64.0], [20.0, 20.0, 32.0, 32.0]]),
        torch.tensor([[44.0, 44.0, 64.0, 64.0], [0.0, 40.0, 30.0, 60.0]]),
    ]
    query_pooled = torch.randn(3, 3, 2, 2)
    losses = heads(features, proposals, queries, valid, query_pooled)

    image = torch.tensor([0, 0, 1])
    b_p = head.box_features(pooler(features, queries[valid], image))  # the queries' own boxes, pooled from view-1
    b_q = head.box_features(query_pooled)
    e_p, e_q = head.embeddings(b_p), head.embeddings(b_q)
    expected_info = 0.0
    for j, i in enumerate(image.tolist()):
        e_neg = head.embeddings(head.box_features(pooler(features, proposals[i], torch.full((len(proposals[i]),), i))))
        positive = torch.exp(e_p[j] @ e_q[j] / 0.07)
        expected_info += -torch.log(positive / (positive + torch.exp(e_neg @ e_q[j] / 0.07).sum())) / 3
    torch.testing.assert_close(losses["loss_info"], expected_info)
    # Target deltas are 0 (the positive is the query box in view-1): the loss is the mean L1 norm of the prediction.
    # <FC(b_q) as 4 x D, FC(b_p) as 1 x D> (Fig. 4), written out row by row; / sqrt(D) = 2 when scaled.
    pred = (head.reg_query(b_q).reshape(3, 4, 4) * head.reg_proposal(b_p)[:, None, :]).sum(dim=2)
    pred = pred / 2 if scale_dot_products else pred
    torch.testing.assert_close(losses["loss_croi_reg"], pred.abs().sum(dim=1).mean())


def test_dot_product_regression_reproduces_the_target_encoding_with_set_weights():
    head = CROIHead(in_features=4, box_head_dim=8, embed_dim=None, reg_dim=4)
    weights = (10.0, 10.0, 5.0, 5.0)
    proposals = torch.tensor([[10.0, 10.0, 50.0, 40.0], [0.0, 5.0, 20.0, 45.0]])
    queries = torch.tensor([[12.0, 8.0, 55.0, 40.0], [2.0, 2.0, 18.0, 50.0]])
    targets = encode_boxes(proposals, queries, weights=weights)
    with torch.no_grad():
        head.reg_proposal.weight.zero_()
        head.reg_proposal.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # FC(b_p) = e_1
        head.reg_query.weight.zero_()
        head.reg_query.bias.zero_()
        for c in range(4):
            head.reg_query.weight[c * 4, c] = 1.0  # row c of FC(b_q) as 4 x D starts with b_q[c]
    query_features = torch.cat((targets, torch.randn(2, 4)), dim=1)  # b_q carries the encoding in its first 4 dims
    pred = head.regression(torch.randn(2, 8), query_features)
    torch.testing.assert_close(pred, targets)
    torch.testing.assert_close(decode_boxes(pred, proposals, weights=weights), queries, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# The whole model


def make_model(losses=("cls", "crpn", "info", "croi_reg"), **config):
    torch.manual_seed(0)
    body = create_body("resnet18")
    fields = {**SMALL.__dict__, **config}
    return PreDet(TimmFPN(body, out_channels=16), num_classes=5, losses=losses, config=PreDetConfig(**fields))


def make_batch(size=64, num_images=2, num_queries=4):
    torch.manual_seed(1)
    xy = torch.rand(num_images, num_queries, 2) * (size / 2)
    wh = torch.rand(num_images, num_queries, 2) * (size / 3) + 12
    queries1 = torch.cat((xy, xy + wh), dim=-1)
    queries2 = (queries1 * 0.8 + 4).clamp(max=size)  # the same regions in a rescaled, shifted view-2
    return dict(
        images=torch.randn(2 * num_images, 3, size, size),  # view-1s, then view-2s
        queries1=queries1,
        queries2=queries2,
    )


@pytest.fixture(scope="module")
def full_model_run():
    """One forward of the full model: image 0 has 3 valid queries and labels, image 1 no valid query and no label."""
    model = make_model()
    batch = make_batch()
    valid = torch.tensor([[True, True, False, True], [False, False, False, False]])
    labels = [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)]
    losses = model(**batch, query_valid=valid, labels=labels)
    return model, losses


def test_every_loss_is_finite_with_a_fully_masked_image_and_an_unlabelled_one(full_model_run):
    _, losses = full_model_run
    assert set(losses) == {"loss_cls", "loss_crpn_cls", "loss_crpn_reg", "loss_info", "loss_croi_reg"}
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
        assert value.item() > 0, name


def test_gradients_reach_the_backbone_through_every_loss_term(full_model_run):
    model, losses = full_model_run
    stem = model.body.conv1.weight
    for name, value in losses.items():
        (grad,) = torch.autograd.grad(value, stem, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def detach_next_output(module):
    """Detach what ``module`` returns on its next call only."""

    def hook(module, args, output):
        handle.remove()
        return output.detach()

    handle = module.register_forward_hook(hook)


def view_gradients(model, *, detach_fq=False) -> dict[str, tuple[float, float]]:
    """Per loss, |d loss / d pixels| summed over view-1 and over view-2 (2 images, 3 valid queries each)."""
    batch = make_batch(size=64, num_queries=3)
    images = batch.pop("images").requires_grad_()
    if detach_fq:
        detach_next_output(model.pooler)  # the pooler's first call of a forward pools f_q from view-2
    losses = model(images, **batch, query_valid=torch.ones(2, 3, dtype=torch.bool))
    sums = {}
    for name, value in losses.items():
        (grad,) = torch.autograd.grad(value, images, retain_graph=True)
        assert torch.isfinite(grad).all(), name
        sums[name] = (grad[:2].abs().sum().item(), grad[2:].abs().sum().item())
    return sums


def test_detection_losses_reach_the_backbone_through_the_view2_query_features():
    """f_q is pooled from view-2 (§3.2): each detection loss must train the backbone through it. With BN in eval mode
    the views do not meet in the backbone, so the only path from view-2's pixels to a loss goes through the backbone,
    the FPN and f_q; detaching f_q must then cut it (which shows that the check can fail). In train mode BN couples
    the views, so view-2 would get gradient even with f_q detached."""
    model = make_model(("crpn", "info", "croi_reg")).eval()
    detection_losses = {"loss_crpn_cls", "loss_crpn_reg", "loss_info", "loss_croi_reg"}
    through_fq = view_gradients(model)
    assert set(through_fq) == detection_losses
    assert all(view1 > 0 and view2 > 0 for view1, view2 in through_fq.values()), through_fq
    assert all(view2 == 0.0 for _, view2 in view_gradients(model, detach_fq=True).values())
    coupled_by_bn = view_gradients(model.train(), detach_fq=True)  # why the check needs eval mode
    assert all(view2 > 0 for _, view2 in coupled_by_bn.values()), coupled_by_bn


def test_every_parameter_gets_a_gradient(full_model_run):
    model, losses = full_model_run
    model.zero_grad()
    sum(losses.values()).backward(retain_graph=True)
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_batch_without_any_valid_query_or_label_gives_zero_detection_losses_that_backpropagate():
    model = make_model()
    batch = make_batch(size=64, num_queries=3)
    valid = torch.zeros(2, 3, dtype=torch.bool)
    losses = model(**batch, query_valid=valid, labels=torch.full((2, 1), -1))
    assert set(losses) == {"loss_cls", "loss_crpn_cls", "loss_crpn_reg", "loss_info", "loss_croi_reg"}
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def pooler_calls(model):
    """One forward of ``model`` in eval mode (BN uses running statistics, so views do not mix) on 2 images with 3 and
    2 valid queries; returns the batch, the valid mask and the arguments of each of the pooler's calls."""
    model.eval()
    batch = make_batch(size=64, num_queries=3)
    valid = torch.tensor([[True, False, True], [True, True, True]])
    calls = []
    model.pooler.register_forward_hook(lambda module, args, output: calls.append(args))
    with torch.no_grad():
        model(**batch, query_valid=valid)
    return batch, valid, calls


def test_queries_are_pooled_from_view2_at_their_view2_boxes_and_proposals_from_view1():
    model = make_model(("crpn", "info"))
    batch, valid, calls = pooler_calls(model)
    with torch.no_grad():
        view1_p2 = model.fpn(batch["images"][:2])["0"]
        view2_p2 = model.fpn(batch["images"][2:])["0"]
    (query_maps, query_boxes, query_rows), (box_maps, _, box_image) = calls
    # The queries are pooled from the backbone batch (view-1s, then view-2s) at rows 2 and 3: the view-2s.
    torch.testing.assert_close(query_maps[0][2:], view2_p2)
    torch.testing.assert_close(query_boxes, batch["queries2"][valid])
    assert query_rows.tolist() == [2, 2, 3, 3, 3]
    torch.testing.assert_close(box_maps[0], view1_p2)
    assert box_image[:5].tolist() == [0, 0, 1, 1, 1]  # the queries' positives first, then the negatives


def test_symmetric_views_add_the_other_direction_view1_queries_matched_in_view2():
    model = make_model(("crpn", "info"), symmetric_views=True)
    batch, valid, calls = pooler_calls(model)
    with torch.no_grad():
        every_p2 = model.fpn(batch["images"])["0"]
    (query_maps, query_boxes, query_rows), (box_maps, box_boxes, box_image) = calls
    # Direction 1 (images 0, 1): pooled from the view-2s at their view-2 boxes; direction 2 ("images" 2, 3): pooled
    # from the view-1s at their view-1 boxes.
    torch.testing.assert_close(query_maps[0], every_p2)
    torch.testing.assert_close(query_boxes, torch.cat([batch["queries2"][valid], batch["queries1"][valid]]))
    assert query_rows.tolist() == [2, 2, 3, 3, 3, 0, 0, 1, 1, 1]
    # The CROI head compares boxes in view-1 for direction 1 and in view-2 for direction 2; the positives come first,
    # one per query, each with IoU > 0.5 to its query box in the target view.
    torch.testing.assert_close(box_maps[0], every_p2)
    assert box_image[:10].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    targets = torch.cat([batch["queries1"][valid], batch["queries2"][valid]])
    assert (box_iou(box_boxes[:10], targets).diagonal() > 0.5).all()


def test_symmetric_views_loss_is_the_mean_of_both_directions():
    """With the randomness removed (every anchor overlaps a query, so none is matched at random, and the sampling caps
    exceed the anchors, so all are taken), L_crpn with symmetric views is exactly the mean of the default model's
    L_crpn on (view-1, view-2) and on the views swapped."""
    caps = dict(crpn_positives_per_image=10_000, crpn_negatives_per_image=10_000)
    default = make_model(("crpn",), **caps).eval()
    symmetric = make_model(("crpn",), symmetric_views=True, **caps).eval()
    symmetric.load_state_dict(default.state_dict())
    batch = make_batch(size=64, num_queries=3)
    whole_view = torch.tensor([0.0, 0.0, 64.0, 64.0])
    batch["queries1"][:, 0] = whole_view
    batch["queries2"][:, 0] = whole_view
    valid = torch.tensor([[True, False, True], [True, True, True]])
    swapped = dict(
        images=torch.cat([batch["images"][2:], batch["images"][:2]]),
        queries1=batch["queries2"],
        queries2=batch["queries1"],
    )
    with torch.no_grad():
        forward, backward = default(**batch, query_valid=valid), default(**swapped, query_valid=valid)
        both = symmetric(**batch, query_valid=valid)
    assert set(both) == {"loss_crpn_cls", "loss_crpn_reg"}
    for name, value in both.items():
        assert not torch.isclose(forward[name], backward[name]), name  # the two directions differ
        torch.testing.assert_close(value, (forward[name] + backward[name]) / 2, rtol=1e-5, atol=1e-6)


TABLE_1_ROWS = [
    ("cls",),
    ("crpn", "info", "croi_reg"),
    ("cls", "info", "croi_reg"),  # no CRPN: the CROI head trains on random boxes
    ("cls", "info"),
]  # the fifth row, all four losses, is the full_model_run fixture


@pytest.mark.parametrize("losses", TABLE_1_ROWS, ids=["+".join(row) for row in TABLE_1_ROWS])
def test_table1_rows_return_their_losses_and_use_every_parameter(losses):
    model = make_model(losses)
    batch = make_batch(size=64, num_queries=3)
    valid = torch.tensor([[True, True, True], [True, False, True]])
    out = model(**batch, query_valid=valid, labels=[torch.tensor([0]), torch.tensor([2, 4])])
    assert set(out) == {key for name in losses for key in LOSS_KEYS[name]}
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert (model.crpn is None) == ("crpn" not in losses) and (model.cls_head is None) == ("cls" not in losses)


def test_random_proposals_without_crpn_give_positives_and_negatives_per_query():
    model = make_model(("cls", "info"))
    queries = torch.tensor([[[10.0, 10.0, 40.0, 50.0], [50.0, 50.0, 90.0, 80.0]]])
    torch.manual_seed(0)
    (boxes,) = model.random_proposals(queries, torch.tensor([[True, True]]), image_size=(96, 96))
    iou = box_iou(boxes, queries[0])
    positives = SMALL.random_positives_per_query
    assert (iou[:positives, 0] > 0.5).all() and (iou[positives : 2 * positives, 1] > 0.5).all()
    assert len(boxes) == 2 * positives + SMALL.random_negatives_per_image
    assert (iou[2 * positives :] < 0.5).all()


def test_bad_inputs_fail_with_a_message():
    model = make_model(("crpn",))
    batch = make_batch(size=64, num_queries=2)
    with pytest.raises(ValueError, match="positive width"):
        batch["queries2"][0, 0] = torch.tensor([10.0, 10.0, 10.0, 30.0])
        model(**batch, query_valid=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="subset"):
        make_model(("cls", "rpn"))
    with pytest.raises(ValueError, match="labels"):
        make_model(("cls",))(**make_batch(size=64))
    with pytest.raises(ValueError, match="not FPN outputs"):
        make_model(("cls",), cls_levels=("0", "p6"))
    with pytest.raises(ValueError, match="view-1 of B images"):
        make_model(("cls",))(torch.zeros(3, 3, 64, 64), labels=[torch.tensor([0])])


def test_defaults_are_the_papers_and_detectron2s():
    config = PreDetConfig()
    assert (config.crpn_positives_per_image, config.crpn_negatives_per_image) == (128, 128)
    assert config.crpn_iou_thresholds == (0.3, 0.7) and config.croi_iou_threshold == 0.5
    assert config.temperature == 0.07 and config.croi_negatives_per_image == 512
    assert config.anchor_sizes == (32, 64, 128, 256, 512) and config.anchor_aspect_ratios == (0.5, 1.0, 2.0)
    assert (config.crpn_pre_nms_topk, config.crpn_nms_threshold, config.crpn_post_nms_topk) == (2000, 0.7, 1000)
    assert config.croi_bbox_reg_weights == (10.0, 10.0, 5.0, 5.0) and config.pooler_resolution == 7
    assert not config.scale_dot_products  # §3.2.1, §3.2.2: plain dot products


def test_real_images_two_views_and_their_boxes_as_queries(coco128):
    """Two coco128 photos at 128 px; view-2 is the horizontal flip of view-1 with the boxes flipped too."""
    data = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    images = {image["id"]: image for image in data["images"]}
    size, num_queries = 128, 4
    view1, queries1, valid, labels = [], [], [], []
    for image_id in (9, 25):
        info = images[image_id]
        picture = Image.open(coco128 / "images" / info["file_name"]).convert("RGB").resize((size, size))
        view1.append(pil_to_tensor(picture).float() / 255 - 0.45)
        scale = torch.tensor([size / info["width"], size / info["height"]] * 2)
        anns = [a for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]][:num_queries]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]) * scale
        padded = torch.zeros(num_queries, 4)
        padded[: len(boxes)] = boxes
        queries1.append(padded)
        valid.append(torch.arange(num_queries) < len(boxes))
        labels.append(torch.tensor(sorted({a["category_id"] % 5 for a in anns})))
    view1, queries1, valid = torch.stack(view1), torch.stack(queries1), torch.stack(valid)
    valid &= ((queries1[..., 2:] - queries1[..., :2]) > 1).all(dim=-1)
    queries2 = torch.stack(
        (size - queries1[..., 2], queries1[..., 1], size - queries1[..., 0], queries1[..., 3]), dim=-1
    )
    model = make_model()
    losses = model(torch.cat((view1, view1.flip(-1))), queries1, queries2, valid, labels)
    assert len(losses) == 5 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(model.body.conv1.weight.grad).all()


def test_scale_dot_products_reaches_the_crpn_and_the_croi_regression():
    for scaled in (False, True):
        model = make_model(scale_dot_products=scaled)
        expected = 16**-0.5 if scaled else 1.0  # SMALL's crpn_dim and croi_reg_dim are both 16
        assert model.crpn.head.scale == expected and model.croi.head.scale == expected


def test_sync_bn_replaces_every_batch_norm_and_in_one_process_computes_the_same():
    torch.manual_seed(0)
    plain = create_predet("test_resnet", num_classes=3, losses=("cls",), fpn_channels=16)
    synced = create_predet("test_resnet", num_classes=3, losses=("cls",), fpn_channels=16, sync_bn=True)
    synced.load_state_dict(plain.state_dict())  # the same keys: an export loads into plain timm
    batch_norms = [m for m in plain.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(batch_norms) > 0
    assert [type(m) for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] == [
        torch.nn.SyncBatchNorm
    ] * len(batch_norms)
    images, labels = torch.randn(4, 3, 64, 64), [torch.tensor([0]), torch.tensor([1, 2])]
    torch.testing.assert_close(synced(images, labels=labels), plain(images, labels=labels))


def test_anchor_helpers_agree_with_the_crpn_levels():
    crpn = make_crpn(anchor_sizes=(32, 64), strides=(4, 8))
    features = [torch.zeros(1, 4, 5, 6), torch.zeros(1, 4, 3, 3)]
    anchors = crpn.anchors(features)
    torch.testing.assert_close(anchors[1], grid_anchors(cell_anchors(64, (0.5, 1.0, 2.0)), (3, 3), 8))
    assert [len(a) for a in anchors] == [5 * 6 * 3, 3 * 3 * 3]


def test_pooler_keeps_float32_boxes_for_a_bf16_map():
    """A bf16 feature map (autocast) must not round the boxes: near x = 1000 bf16 steps are 8 px."""
    torch.manual_seed(0)
    pooler = FPNRoIAlign(strides=(4,), output_size=2, sampling_ratio=0, aligned=True)
    features = torch.randn(1, 3, 8, 300)  # 1200 px wide at stride 4
    boxes = torch.tensor([[1001.3, 5.0, 1013.7, 21.0]])  # bf16 would make it [1000, 5, 1016, 21]
    pooled = pooler([features.bfloat16()], boxes, torch.zeros(1, dtype=torch.long))
    expected = pooler([features.bfloat16().float()], boxes, torch.zeros(1, dtype=torch.long)).bfloat16()
    assert pooled.dtype == torch.bfloat16 and torch.equal(pooled, expected)
