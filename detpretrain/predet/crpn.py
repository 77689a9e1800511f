"""The contrastive region proposal network (CRPN) of PreDet (``papers/predet.txt`` §3.2.1, Fig. 3).

An RPN whose objectness is query-specific: for every anchor of view-1 and every query (pooled from view-2), a score
that says whether the anchor box overlaps the query box, and 4 deltas that regress the anchor onto the query box in
view-1 coordinates. ``CRPNHead`` predicts; ``ContrastiveRPN`` holds the anchors, matches and samples anchors, computes
L_crpn and turns the scores into proposals for the CROI head. Readings where the paper is silent follow
PAPER_NOTES.md ("CRPN") and are marked "(our choice)" or "(detectron2 default)" where they are made.

Scores (Fig. 3): f_I -> 3x3 conv + ReLU (shared across levels, like detectron2's StandardRPNHead) -> 1x1 conv to A*D
channels (f_I^cls: D features for each of the A anchors of a location). The query's pooled feature f_q -> one linear
layer -> A vectors of D (f_q^cls). Score(anchor a at (y, x), query q) = <f_I^cls[a*D:(a+1)*D, y, x], f_q^cls[q, a]>:
for all queries at once the dot products are a 1x1 group convolution with A groups whose kernels are the query vectors
(``query_anchor_products``). Regression "follows the same design": f_I -> 1x1 conv to A*D (f_I^reg), f_q -> A x 4
vectors of D, 4A deltas per query. An optional 1/sqrt(D) on every dot product (``scale_dot_products``, off: the
paper has none) is explained in ``CRPNHead``.

Glossary (names and shapes; view-1 pixels unless said):

    N              images in the batch (one view-1 and one view-2 each)
    Q              query slots per image (padded; ``query_valid`` marks the real ones); Qv: valid queries of an image
    A              anchors per location (3 aspect ratios x one size per level)
    D              feature width of the dot products (256 by default, the FPN width)
    F              width of a flattened pooled query feature (C * 7 * 7)
    L              FPN levels carrying anchors (P2..P6)
    h_l, w_l       size of level l; M_l = h_l * w_l * A anchors there; M = sum_l M_l
    features       list of L (N, C, h_l, w_l): view-1 FPN maps
    query_features (N, Q, F): view-2 pooled features f_q (zeros in invalid slots)
    queries        (N, Q, 4) xyxy: the query boxes in view-1 coordinates (targets of matching and regression)
    query_valid    (N, Q) bool
    anchors        list of L (M_l, 4), rows ordered (y, x, a) (detpretrain.boxes.grid_anchors)
    pred_logits    list of L (N, Q, M_l): score of every (query, anchor) pair, pre-sigmoid
    pred_deltas    list of L (N, Q, M_l, 4): deltas of every anchor towards every query
    anchor_labels  (N, M) int64: 1 positive, 0 negative, -1 ignored (not sampled)
    matched_query  (N, M) int64: the query index in [0, Q) each anchor is matched to
    proposals      list of N (P_i, 4): view-1 boxes, detached, after top-K, clipping, NMS
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detpretrain.boxes import (
    batched_box_iou,
    batched_nms_rows,
    cell_anchors,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    grid_anchors,
    nonempty_boxes,
    sample_rows,
)
from detpretrain.losses import box_regression_loss

__all__ = ["CRPNHead", "ContrastiveRPN", "match_anchors_to_queries", "query_anchor_products"]


def query_anchor_products(image_features: Tensor, query_vectors: Tensor) -> Tensor:
    """Dot products of every query vector with the anchor features at every location; (N, Q, h * w * A, K).

    ``image_features`` (N, A * D, h, w): channels a*D .. (a+1)*D - 1 hold the features of anchor a.
    ``query_vectors`` (N, Q, A, K, D): K vectors per (query, anchor) pair (K = 1 for scores, 4 for deltas).
    Output[n, q, (y * w + x) * A + a, k] = sum_d image_features[n, a*D + d, y, x] * query_vectors[n, q, a, k, d].

    This is the paper's "1x1 group convolution with A groups" (§3.2.1): anchor a's D channels form a group whose
    Q * K kernels are the query vectors. A 1x1 convolution is a matrix product over the locations, and a group
    convolution is a convolution whose kernel is block-diagonal over the groups, so each image is one product
    (h*w, A*D) x (A*D, A*Q*K) with zeros off the diagonal blocks. The zeros add exact zeros to the sums of finite
    features, so the numbers are the group convolution's (tests compare with ``F.conv2d(..., groups=N * A)``, the
    images folded into the groups, and with the explicit dot products). It costs A times the multiply-adds, yet on
    GPUs less time than that ``F.conv2d`` or A separate products (measured on an H100, bf16, channels_last): the
    features are read through a view, without a copy, in the contiguous and the channels_last layouts alike, and so
    is their gradient.
    """
    n, q, a, k, d = query_vectors.shape
    if image_features.ndim != 4 or image_features.shape[:2] != (n, a * d):
        raise ValueError(
            f"image_features must be (N, A * D, h, w) = ({n}, {a * d}, h, w), got {tuple(image_features.shape)}"
        )
    if q == 0:
        raise ValueError("query_vectors has no query slot (Q = 0); pad the queries with at least one invalid slot")
    height, width = image_features.shape[-2:]
    eye = torch.eye(a, dtype=query_vectors.dtype, device=query_vectors.device)
    # kernels[n, a*D + d, b*Q*K + q*K + k] = query_vectors[n, q, a, k, d] if a == b else 0.
    kernels = query_vectors.permute(0, 2, 4, 1, 3)[:, :, :, None] * eye[:, None, :, None, None]  # (N, A, D, A, Q, K)
    features = image_features.flatten(2).transpose(1, 2)  # (N, h*w, A*D), a view
    out = torch.bmm(features, kernels.reshape(n, a * d, a * q * k))  # (N, h*w, A*Q*K)
    # (N, h*w, A, Q, K) -> (N, Q, h*w, A, K): rows in grid_anchors' (y, x, a) order; a view.
    return out.reshape(n, height * width, a, q, k).permute(0, 3, 1, 2, 4).reshape(n, q, height * width * a, k)


class CRPNHead(nn.Module):
    """Query-specific scores and deltas for every (query, anchor) pair of every level (Fig. 3).

    Init (our choice, PAPER_NOTES.md "CRPN": small init for the dot-product layers): every weight N(0, 0.01^2) and
    every bias 0, detectron2's StandardRPNHead init, applied to both sides of the dot products.

    ``scale_dot_products`` (off by default: the paper's form) divides every dot product by sqrt(D), as attention
    does. The weights can absorb the factor, so the head represents the same functions; what changes is training: it
    equals the unscaled head with other initial weights, learning rate and weight decay on its dot-product layers. A
    dot product is bilinear, so an SGD step on one side moves the score in proportion to the squared norm of the
    other, and the query side reads a 12544-d pooled feature. At init (resnet18 + FPN 256, D = 256, random-normal
    images) the unscaled scores and deltas have a standard deviation of about 2.6, the scaled ones about 0.16. Why
    the paper's form is the default, and the evidence: ``detpretrain.predet.model.PreDetConfig.scale_dot_products``.
    """

    def __init__(
        self, *, in_channels: int, query_in_features: int, num_anchors: int, dim: int, scale_dot_products: bool = False
    ):
        super().__init__()
        self.num_anchors = num_anchors
        self.dim = dim
        self.scale = dim**-0.5 if scale_dot_products else 1.0
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.image_cls = nn.Conv2d(in_channels, num_anchors * dim, kernel_size=1)  # f_I^cls
        self.image_reg = nn.Conv2d(in_channels, num_anchors * dim, kernel_size=1)  # f_I^reg
        self.query_cls = nn.Linear(query_in_features, num_anchors * dim)  # f_q^cls: A vectors of D
        self.query_reg = nn.Linear(query_in_features, num_anchors * 4 * dim)  # A x 4 vectors of D
        for layer in (self.conv, self.image_cls, self.image_reg, self.query_cls, self.query_reg):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor], query_features: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``pred_logits`` (list of (N, Q, M_l)) and ``pred_deltas`` (list of (N, Q, M_l, 4)), levels in order."""
        n, q = query_features.shape[:2]
        a, d = self.num_anchors, self.dim
        cls_vectors = self.query_cls(query_features).reshape(n, q, a, 1, d)
        reg_vectors = self.query_reg(query_features).reshape(n, q, a, 4, d)
        pred_logits, pred_deltas = [], []
        for x in features:
            hidden = F.relu(self.conv(x))
            pred_logits.append(query_anchor_products(self.image_cls(hidden), cls_vectors).squeeze(-1) * self.scale)
            pred_deltas.append(query_anchor_products(self.image_reg(hidden), reg_vectors) * self.scale)
        return pred_logits, pred_deltas


def match_anchors_to_queries(
    iou: Tensor,
    query_valid: Tensor,
    *,
    negative_threshold: float,
    positive_threshold: float,
    allow_low_quality_matches: bool,
) -> tuple[Tensor, Tensor]:
    """Match every anchor to a query and label it (§3.2.1 "CRPN losses"), all images at once; ``(matched, labels)``,
    each (N, M) int64.

    ``iou`` (N, Q, M): IoU of each query slot with each anchor; ``query_valid`` (N, Q): the slots that hold a query
    (the IoUs of the others are ignored). ``matched[n, m]`` is the valid query with the largest IoU (the lowest slot
    among equal ones), or a uniformly random valid query when anchor m overlaps no query at all (the paper's rule;
    torch's global RNG). ``labels[n, m]`` is 1 when that IoU is > ``positive_threshold``, 0 when it is
    < ``negative_threshold``, else -1 (ignored). With ``allow_low_quality_matches`` (detectron2's RPN default, Faster
    R-CNN's second positive rule), the anchors with the highest IoU for a query are positive too, even below the
    threshold, so that every query with any overlap gets a positive; ties count, anchors with zero IoU never do. Their
    ``matched`` query stays their own max-IoU query, as in detectron2's Matcher. An image without a valid query has
    every label -1 and every ``matched`` 0.
    """
    if iou.ndim != 3 or query_valid.shape != iou.shape[:2] or query_valid.dtype != torch.bool:
        raise ValueError(
            f"iou must be (N, Q, M) and query_valid (N, Q) bool, got {tuple(iou.shape)} and "
            f"{tuple(query_valid.shape)} {query_valid.dtype}"
        )
    n, q, m = iou.shape
    # IoUs are >= 0, so -1 in the invalid slots keeps them from being any anchor's or any query's best match.
    iou = iou.masked_fill(~query_valid[:, :, None], -1.0)
    max_iou, matched = iou.max(dim=1)  # (N, M); the first (lowest) slot among equal maxima
    # A uniformly random valid slot: the r-th valid slot with r uniform in [0, Qv) (drawn in float64: a rounding bias
    # of about Qv * 1e-16); valid_slots lists each image's valid slots first, in order.
    num_valid = query_valid.sum(dim=1, keepdim=True)  # (N, 1)
    rank = (torch.rand((n, m), dtype=torch.float64, device=iou.device) * num_valid).long()  # (N, M)
    valid_slots = (~query_valid).to(torch.uint8).argsort(dim=1, stable=True)  # (N, Q)
    matched = torch.where(max_iou <= 0, valid_slots.gather(1, rank.clamp(max=q - 1)), matched)
    labels = torch.full_like(matched, -1)
    labels.masked_fill_(max_iou < negative_threshold, 0)
    labels.masked_fill_(max_iou > positive_threshold, 1)
    if allow_low_quality_matches:
        best_per_query = iou.amax(dim=2, keepdim=True)  # (N, Q, 1); -1 for invalid slots
        is_best = (iou == best_per_query) & (best_per_query > 0)
        labels.masked_fill_(is_best.any(dim=1), 1)
    has_query = query_valid.any(dim=1, keepdim=True)  # (N, 1)
    return matched.where(has_query, 0), labels.where(has_query, -1)


class ContrastiveRPN(nn.Module):
    """Anchors, matching, sampling, L_crpn and proposals around a ``CRPNHead`` (§3.2.1).

    Arguments are the CRPN fields of ``detpretrain.predet.model.PreDetConfig``, where each default's origin is given.
    """

    def __init__(
        self,
        head: CRPNHead,
        *,
        anchor_sizes: Sequence[float],
        aspect_ratios: Sequence[float],
        strides: Sequence[int],
        iou_thresholds: tuple[float, float],
        allow_low_quality_matches: bool,
        positives_per_image: int,
        negatives_per_image: int,
        bbox_reg_weights: tuple[float, float, float, float],
        smooth_l1_beta: float,
        pre_nms_topk: int,
        nms_threshold: float,
        post_nms_topk: int,
        min_box_size: float,
    ):
        super().__init__()
        if len(anchor_sizes) != len(strides):
            raise ValueError(f"one anchor size per level: {len(anchor_sizes)} sizes for {len(strides)} levels")
        if head.num_anchors != len(aspect_ratios):
            raise ValueError(f"the head predicts {head.num_anchors} anchors per location, not {len(aspect_ratios)}")
        self.head = head
        self.strides = tuple(strides)
        for level, size in enumerate(anchor_sizes):
            self.register_buffer(f"cell_anchors_{level}", cell_anchors(size, aspect_ratios), persistent=False)
        self.negative_threshold, self.positive_threshold = iou_thresholds
        self.allow_low_quality_matches = allow_low_quality_matches
        self.positives_per_image = positives_per_image
        self.negatives_per_image = negatives_per_image
        self.bbox_reg_weights = bbox_reg_weights
        self.smooth_l1_beta = smooth_l1_beta
        self.pre_nms_topk = pre_nms_topk
        self.nms_threshold = nms_threshold
        self.post_nms_topk = post_nms_topk
        self.min_box_size = min_box_size

    def anchors(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The anchors of every level for these feature maps: list of L (M_l, 4)."""
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(features)}")
        return [
            grid_anchors(getattr(self, f"cell_anchors_{level}"), tuple(x.shape[-2:]), stride)
            for level, (x, stride) in enumerate(zip(features, self.strides, strict=True))
        ]

    def forward(
        self,
        features: Sequence[Tensor],
        query_features: Tensor,
        queries: Tensor,
        query_valid: Tensor,
        *,
        image_size: tuple[int, int],
        with_proposals: bool,
    ) -> tuple[dict[str, Tensor], list[Tensor] | None]:
        """``({"loss_crpn_cls", "loss_crpn_reg"}, proposals or None)``; proposals only when ``with_proposals``."""
        pred_logits, pred_deltas = self.head(features, query_features)
        anchors = self.anchors(features)
        anchor_labels, matched_query = self.label_and_sample_anchors(torch.cat(anchors), queries, query_valid)
        losses = self.losses(
            torch.cat(pred_logits, dim=2),
            torch.cat(pred_deltas, dim=2),
            torch.cat(anchors),
            queries,
            anchor_labels=anchor_labels,
            matched_query=matched_query,
            num_images=int(query_valid.any(dim=1).sum()),
        )
        proposals = None
        if with_proposals:
            proposals, _ = self.find_proposals(pred_logits, pred_deltas, anchors, query_valid, image_size=image_size)
        return losses, proposals

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: Tensor, queries: Tensor, query_valid: Tensor) -> tuple[Tensor, Tensor]:
        """``anchor_labels`` and ``matched_query``, each (N, M): at most ``positives_per_image`` positives and
        ``negatives_per_image`` negatives per image stay labelled, the rest become -1.

        Negatives do not fill up missing positives (detectron2's RPN would sample 256 in all): the paper samples
        "128 positive and 128 negative anchor boxes" (§3.2.1). An image without a valid query has no label at all.
        All images at once, without a host synchronization.
        """
        iou = batched_box_iou(queries.to(anchors.dtype), anchors)  # (N, Q, M)
        matched_query, labels = match_anchors_to_queries(
            iou,
            query_valid,
            negative_threshold=self.negative_threshold,
            positive_threshold=self.positive_threshold,
            allow_low_quality_matches=self.allow_low_quality_matches,
        )
        positives = sample_rows(labels == 1, self.positives_per_image)
        negatives = sample_rows(labels == 0, self.negatives_per_image)
        anchor_labels = torch.full_like(labels, -1).masked_fill_(positives, 1).masked_fill_(negatives, 0)
        return anchor_labels, matched_query

    def losses(
        self,
        pred_logits: Tensor,
        pred_deltas: Tensor,
        anchors: Tensor,
        queries: Tensor,
        *,
        anchor_labels: Tensor,
        matched_query: Tensor,
        num_images: int,
    ) -> dict[str, Tensor]:
        """L_crpn (§3.2.1): binary cross-entropy on the matched query's score of each sampled anchor, and the
        regression of each sampled positive towards its matched query box (view-1), Faster R-CNN encoding.

        ``pred_logits`` (N, Q, M) and ``pred_deltas`` (N, Q, M, 4) are the levels concatenated. Both terms are sums
        divided by (positives_per_image + negatives_per_image) x the number of images with a valid query: detectron2's
        RPN normalizer (BATCH_SIZE_PER_IMAGE x images); images without queries are left out of it (our choice: they
        have no sample). No sample at all gives exact zeros attached to the predictions.
        """
        image_index, anchor_index = torch.nonzero(anchor_labels >= 0, as_tuple=True)
        query_index = matched_query[image_index, anchor_index]
        normalizer = float((self.positives_per_image + self.negatives_per_image) * max(num_images, 1))
        logits = pred_logits[image_index, query_index, anchor_index]  # only the matched query's score
        targets = anchor_labels[image_index, anchor_index].to(logits.dtype)
        loss_cls = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / normalizer

        positive = targets == 1
        pos_image, pos_anchor, pos_query = image_index[positive], anchor_index[positive], query_index[positive]
        target_deltas = encode_boxes(
            anchors[pos_anchor], queries[pos_image, pos_query].to(anchors.dtype), weights=self.bbox_reg_weights
        )
        loss_reg = box_regression_loss(
            pred_deltas[pos_image, pos_query, pos_anchor],
            target_deltas,
            beta=self.smooth_l1_beta,
            normalizer=normalizer,
        )
        return {"loss_crpn_cls": loss_cls, "loss_crpn_reg": loss_reg}

    @torch.no_grad()
    def find_proposals(
        self,
        pred_logits: Sequence[Tensor],
        pred_deltas: Sequence[Tensor],
        anchors: Sequence[Tensor],
        query_valid: Tensor,
        *,
        image_size: tuple[int, int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Proposal construction (§3.2.1): ``(proposals, scores)``, lists of N (P_i, 4) and (P_i,), detached.

        Each anchor is scored by the maximum over the image's valid queries and regressed by that query's deltas;
        then, as detectron2's ``find_top_rpn_proposals``: the top ``pre_nms_topk`` anchors of each level, decoding,
        clipping to the view, removing boxes not larger than ``min_box_size``, NMS at ``nms_threshold`` within each
        level, and the ``post_nms_topk`` best of the image (sorted by score; equal scores in level order, then in
        top-K order). An image without a valid query has no proposal. All images at once: the NMS is
        ``batched_nms_rows`` over (level, image) rows, and the host waits on the device only in its convergence checks
        and once at the end (the sizes of the proposal lists and the divergence check).
        """
        n = len(query_valid)
        has_query = query_valid.any(dim=1)  # (N,)
        batch = torch.arange(n, device=query_valid.device)[:, None]
        level_boxes, level_scores, level_valid = [], [], []
        finite = torch.ones_like(has_query)
        for logits, deltas, level_anchors in zip(pred_logits, pred_deltas, anchors, strict=True):
            masked = logits.masked_fill(~query_valid[:, :, None], float("-inf"))  # (N, Q, M_l)
            best_score, best_query = masked.max(dim=1)  # (N, M_l)
            k = min(self.pre_nms_topk, best_score.shape[1])
            top_score, top_anchor = best_score.topk(k, dim=1)  # (N, k), sorted
            top_score = top_score.float()
            top_deltas = deltas[batch, best_query.gather(1, top_anchor), top_anchor]  # (N, k, 4)
            # Decoded in float32: half-precision deltas (AMP) would round pixel coordinates of a 480 px view.
            boxes = decode_boxes(
                top_deltas.reshape(-1, 4).float(), level_anchors[top_anchor.reshape(-1)], weights=self.bbox_reg_weights
            )
            finite &= torch.isfinite(boxes).reshape(n, -1).all(dim=1) & torch.isfinite(top_score).all(dim=1)
            boxes = clip_boxes(boxes, image_size)
            level_valid.append(nonempty_boxes(boxes, min_size=self.min_box_size).reshape(n, k) & has_query[:, None])
            level_boxes.append(boxes.reshape(n, k, 4))
            level_scores.append(top_score)
        # NMS within each (image, level): one batched_nms_rows call for all the levels with the same number of
        # candidates (at 480 px, P2..P4 all have pre_nms_topk), whose rows are (level, image) pairs.
        level_keep: dict[int, Tensor] = {}
        for k in sorted({scores.shape[1] for scores in level_scores}):
            levels = [level for level, scores in enumerate(level_scores) if scores.shape[1] == k]
            keep = batched_nms_rows(
                torch.cat([level_boxes[level] for level in levels]),
                torch.cat([level_scores[level] for level in levels]),
                torch.cat([level_valid[level] for level in levels]),
                self.nms_threshold,
            )
            level_keep.update(zip(levels, keep.split(n), strict=True))
        boxes, scores = torch.cat(level_boxes, dim=1), torch.cat(level_scores, dim=1)  # (N, sum_l k_l, ...)
        keep = torch.cat([level_keep[level] for level in range(len(level_scores))], dim=1)
        # The post_nms_topk best kept boxes of each image; dropped boxes sort last. Stable: equal scores keep the
        # level, then top-K order.
        order = scores.masked_fill(~keep, float("-inf")).argsort(dim=1, descending=True, stable=True)
        order = order[:, : self.post_nms_topk]
        boxes = boxes.gather(1, order[:, :, None].expand(*order.shape, 4))  # (N, P, 4)
        scores = scores.gather(1, order)  # (N, P)
        counts = keep.sum(dim=1).clamp(max=self.post_nms_topk)
        # One synchronization for both: the divergence check and the number of proposals of each image.
        *counts, diverged = torch.cat((counts, (has_query & ~finite).any()[None].long())).tolist()
        if diverged:
            raise FloatingPointError("CRPN predicted non-finite boxes or scores: training has diverged")
        return [boxes[i, :c] for i, c in enumerate(counts)], [scores[i, :c] for i, c in enumerate(counts)]
