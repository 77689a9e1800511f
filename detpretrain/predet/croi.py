"""The contrastive ROI head (CROI) of PreDet (``papers/predet.txt`` §3.2.2, Fig. 4), and the FPN ROI pooler.

Query-box lookup: the pooled features of proposals (view-1) and of queries (view-2) go through one shared box-head MLP
(b_p, b_q), one shared FC, and their cosine similarity s_pq enters an InfoNCE loss (tau = 0.07) whose positive for a
query is one proposal overlapping it (IoU > 0.5) and whose negatives P_neg are up to 512 proposals overlapping no query
(IoU < 0.5 to every query). An additional regression loss moves each query's positive proposal onto the query box
(view-1): b_q is projected to 4 x D, b_p to 1 x D, and their 4 dot products are the deltas.

``FPNRoIAlign`` pools a box at the FPN level that fits its size; ``CROIHead`` predicts (box features, similarities,
deltas); ``ContrastiveROIHeads`` samples positives and negatives and computes L_info and L_croi-reg. Readings where
the paper is silent follow PAPER_NOTES.md ("CROI") and are marked where they are made.

The whole batch is sampled and scored at once, without a loop over images and without a host synchronization (the
pooler's level split is the one per call): each image's proposals are padded to the batch's longest list with a
validity mask, and its negatives to ``M`` slots with a mask, so that every step has the same sequence of kernels.

Glossary (names and shapes):

    N              images in the batch
    Q, Qv          query slots per image (padded), valid queries of an image; Qn: valid queries of the batch
    P_i, P         proposals of image i (view-1 pixels); P = max_i P_i, the padded width
    C              candidates per image: its P proposal slots, then its Q query slots (P + Q)
    M              negative slots per image: min(512, C); n_i <= M of image i's slots hold a sampled negative
    C, S           FPN width, pooled resolution (7); F = C * S * S
    E              width of the shared FC before the cosine similarity; D: width of the regression dot products
    features       list of (N, C, h_l, w_l): the FPN maps pooled from (P2..P5)
    boxes          (K, 4) xyxy boxes to pool and batch_index (K,) int64: the image each box belongs to
    pooled         (K, C, S, S): ROIAlign output; b: (K, 1024) box-head features
    queries        (N, Q, 4): the query boxes in view-1 coordinates; query_valid (N, Q) bool
    query_pooled   (Qn, C, S, S): the queries pooled from view-2, in the order of ``queries[query_valid]``
    proposals      list of N (P_i, 4): CRPN proposals, or random boxes when CRPN is off (Tab. 1); padded: (N, P, 4)
                   with proposal_valid (N, P) bool
    iou            (N, Q, C): IoU of each query slot with each candidate slot of its image
    negatives      (N, M, 4) with negative_valid (N, M) bool; an invalid slot holds the empty box (0, 0, 0, 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import roi_align

from detpretrain.boxes import (
    batched_box_iou,
    encode_boxes,
    fpn_levels,
    jitter_boxes,
    random_boxes_away_from,
    sample_rows,
)
from detpretrain.losses import box_regression_loss, info_nce_loss

__all__ = [
    "CROIHead",
    "ContrastiveROIHeads",
    "FPNRoIAlign",
    "pad_proposals",
    "random_query_proposals",
    "sample_query_proposals",
]


class FPNRoIAlign(nn.Module):
    """ROIAlign of each box on the FPN level that fits it, k = floor(4 + log2(sqrt(wh) / 224)) clamped to the levels.

    detectron2's ROIPooler with ROIAlignV2: ``aligned=True`` (pixel-centre half-pixel shift), ``sampling_ratio=0``
    (adaptive: ceil(bin size) samples per bin). torchvision's ``MultiScaleRoIAlign`` has the same level rule but no
    ``aligned`` option, hence this small module. ``strides`` are those of the pooled maps, powers of two (4, 8, 16, 32
    for P2..P5).
    """

    def __init__(
        self,
        *,
        strides: Sequence[int],
        output_size: int,
        sampling_ratio: int,
        aligned: bool,
        canonical_size: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        levels = [math.log2(s) for s in strides]
        if any(level != int(level) for level in levels) or levels != list(range(int(levels[0]), int(levels[-1]) + 1)):
            raise ValueError(f"strides must be consecutive powers of two, got {tuple(strides)}")
        self.strides = tuple(strides)
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_size = canonical_size
        self.canonical_level = canonical_level

    def forward(self, features: Sequence[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        """(K, C, S, S): each box pooled from its image's map at its level."""
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (strides {self.strides}), got {len(features)}")
        levels = fpn_levels(
            boxes,
            min_level=self.min_level,
            max_level=self.max_level,
            canonical_size=self.canonical_size,
            canonical_level=self.canonical_level,
        )
        rois = torch.cat((batch_index[:, None].to(boxes.dtype), boxes), dim=1)
        # The boxes sorted by level, one slice per level: a single host synchronization (the slice sizes) instead of
        # one per level. The stable sort keeps each level's boxes in their input order. A box of negative size gets a
        # NaN level, which the clamp lets through and the integer cast makes arbitrary: counted in an extra slot, it
        # fails loudly here with no further synchronization.
        num_levels = len(self.strides)
        index = levels - self.min_level
        index = index.masked_fill((index < 0) | (index >= num_levels), num_levels)
        order = torch.argsort(index, stable=True)
        *counts, num_unpooled = torch.bincount(index, minlength=num_levels + 1).tolist()
        if num_unpooled:
            raise ValueError(f"{num_unpooled} boxes have no FPN level: boxes need x2 >= x1 and y2 >= y1 (no NaN)")
        # Pooled in float32 (as autocast would run torchvision's roi_align anyway): boxes cast to a bf16 map's dtype
        # would land on an 8-px grid near x = 1000.
        pooled = [
            roi_align(
                x.float(),
                level_rois.float(),
                output_size=self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )
            for x, stride, level_rois in zip(features, self.strides, rois[order].split(counts), strict=True)
        ]
        dtype = features[0].dtype
        pooled = torch.cat([p.to(dtype) for p in pooled])  # (K, C, S, S), level-sorted
        return pooled.index_select(0, torch.argsort(order))  # back to the input order


class CROIHead(nn.Module):
    """The predicting part of Fig. 4: a shared box head, a shared FC + cosine similarity, the dot-product regression.

    ``embed_dim=None`` leaves out the similarity FC (no L_info), ``reg_dim=None`` the regression projections (no
    L_croi-reg), so that an ablation row of Tab. 1 has no parameter without gradient. ``scale_dot_products`` (off by
    default: the paper's form) divides the regression dot product by sqrt(D), an option explained in
    ``detpretrain.predet.crpn.CRPNHead``.
    """

    def __init__(
        self,
        *,
        in_features: int,
        box_head_dim: int,
        embed_dim: int | None,
        reg_dim: int | None,
        scale_dot_products: bool = False,
    ):
        super().__init__()
        self.box_head = TwoMLPHead(in_features, box_head_dim)  # detectron2's 2 x FC 1024 box head, ReLU after each
        self.embed = nn.Linear(box_head_dim, embed_dim) if embed_dim else None
        self.reg_dim = reg_dim
        self.scale = reg_dim**-0.5 if reg_dim and scale_dot_products else 1.0
        if reg_dim:
            # Small init of both sides of the dot product (our choice, as the CRPN's): initial deltas are small.
            self.reg_query = nn.Linear(box_head_dim, 4 * reg_dim)  # b_q -> 4 x D
            self.reg_proposal = nn.Linear(box_head_dim, reg_dim)  # b_p -> 1 x D
            for layer in (self.reg_query, self.reg_proposal):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        else:
            self.reg_query = self.reg_proposal = None

    def box_features(self, pooled: Tensor) -> Tensor:
        """b_p or b_q: (K, box_head_dim) from pooled (K, C, S, S)."""
        return self.box_head(pooled)

    def embeddings(self, box_features: Tensor) -> Tensor:
        """The shared FC, L2-normalized so that dot products are the cosine similarities s_pq; (K, E)."""
        if self.embed is None:
            raise RuntimeError("this CROI head was built without the similarity FC (embed_dim=None)")
        return F.normalize(self.embed(box_features).float(), dim=1)

    def regression(self, proposal_features: Tensor, query_features: Tensor) -> Tensor:
        """Deltas of each proposal towards its query: <FC(b_q) as 4 x D, FC(b_p) as 1 x D> (/ sqrt(D) with
        ``scale_dot_products``); (K, 4).
        Row k of both inputs belongs to the same (proposal, query) pair."""
        if self.reg_query is None or self.reg_proposal is None:
            raise RuntimeError("this CROI head was built without the regression projections (reg_dim=None)")
        query_side = self.reg_query(query_features).reshape(len(query_features), 4, self.reg_dim)  # (K, 4, D)
        proposal_side = self.reg_proposal(proposal_features)  # (K, D)
        return torch.einsum("kcd,kd->kc", query_side, proposal_side) * self.scale


def pad_proposals(proposals: Sequence[Tensor], *, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The N proposal lists padded to the longest: ``(proposals (N, P, 4), proposal_valid (N, P))``; padding boxes
    are (0, 0, 0, 0). Sizes come from the tensors' shapes, so no host synchronization."""
    boxes = pad_sequence([b.to(dtype) for b in proposals], batch_first=True)
    valid = pad_sequence([torch.ones(len(b), dtype=torch.bool, device=b.device) for b in proposals], batch_first=True)
    return boxes, valid


def sample_query_proposals(
    proposals: Tensor,
    proposal_valid: Tensor,
    queries: Tensor,
    query_valid: Tensor,
    *,
    iou_threshold: float,
    max_negatives: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One positive per query slot and the shared negatives of each image (§3.2.2), the whole batch at once;
    ``(positives (N, Q, 4), negatives (N, M, 4), negative_valid (N, M))`` with M = min(``max_negatives``, P + Q).

    Per image, the valid queries (view-1 boxes) are appended to its valid proposals first, as detectron2 appends ground
    truth, so that every query has a positive (PAPER_NOTES.md). p+_q is drawn uniformly among those candidates with
    IoU > ``iou_threshold`` to q; P_neg is a uniform draw of at most ``max_negatives`` candidates whose IoU with every
    valid query of the image is < ``iou_threshold`` (``detpretrain.boxes.sample_rows``). An image without a valid
    query gets no negative; an invalid query slot gets an arbitrary positive, to be ignored. Randomness: torch's global
    RNG of the boxes' device. No host synchronization.
    """
    num_images, num_slots = query_valid.shape
    candidates = torch.cat((proposals.to(queries.dtype), queries), dim=1)  # (N, C, 4)
    candidate_valid = torch.cat((proposal_valid, query_valid), dim=1)  # (N, C)
    iou = batched_box_iou(queries, candidates)  # (N, Q, C)
    # A uniform choice among the positives: the largest of independent uniform keys, restricted to them.
    positive = (iou > iou_threshold) & candidate_valid[:, None, :]
    keys = torch.rand_like(iou).masked_fill_(~positive, -1.0)
    positive_index = keys.argmax(dim=2)  # (N, Q)
    positives = candidates.gather(1, positive_index[..., None].expand(-1, -1, 4))

    # Each candidate's largest IoU with the image's valid queries; an image without any valid query has no negative.
    if num_slots:
        max_iou = iou.masked_fill(~query_valid[:, :, None], -1.0).amax(dim=1)  # (N, C)
    else:
        max_iou = torch.zeros_like(candidate_valid, dtype=iou.dtype)
    negative = candidate_valid & (max_iou < iou_threshold) & query_valid.any(dim=1, keepdim=True)
    selected = sample_rows(negative, max_negatives)  # (N, C), at most max_negatives per row
    # The selected candidates moved to the first slots of each row (n_i <= M of them), in candidate order.
    num_negative_slots = min(max(max_negatives, 0), candidates.shape[1])
    negative_valid, negative_index = torch.sort(selected.to(torch.uint8), dim=1, descending=True, stable=True)
    negative_valid = negative_valid[:, :num_negative_slots].bool()
    negative_index = negative_index[:, :num_negative_slots]
    negatives = candidates.gather(1, negative_index[..., None].expand(-1, -1, 4))
    negatives = negatives.masked_fill(~negative_valid[..., None], 0.0)
    return positives, negatives, negative_valid


def random_query_proposals(
    queries: Tensor,
    *,
    positives_per_query: int,
    num_negatives: int,
    iou_threshold: float,
    image_size: tuple[int, int],
) -> Tensor:
    """Random boxes in place of CRPN proposals, for the Tab. 1 rows without L_crpn (§5.1); (P, 4).

    "We randomly sampled positive and negative boxes for each query box": ``positives_per_query`` jittered copies of
    each query with IoU > ``iou_threshold`` to it, and ``num_negatives`` boxes with IoU < ``iou_threshold`` to every
    query. The counts and distributions are our choice (detpretrain.boxes.jitter_boxes, random_boxes_away_from).
    """
    positives = jitter_boxes(
        queries, num_per_box=positives_per_query, min_iou=iou_threshold, image_size=image_size
    ).reshape(-1, 4)
    negatives = random_boxes_away_from(queries, num=num_negatives, max_iou=iou_threshold, image_size=image_size)
    return torch.cat((positives, negatives.to(positives.dtype)))


class ContrastiveROIHeads(nn.Module):
    """Sampling and the CROI losses (§3.2.2) around a ``CROIHead``: L_info and L_croi-reg.

    Arguments are the CROI fields of ``detpretrain.predet.model.PreDetConfig``, where each default's origin is given.
    """

    def __init__(
        self,
        head: CROIHead,
        pooler: FPNRoIAlign,
        *,
        iou_threshold: float,
        negatives_per_image: int,
        temperature: float,
        bbox_reg_weights: tuple[float, float, float, float],
        smooth_l1_beta: float,
    ):
        super().__init__()
        self.head = head
        self.pooler = pooler
        self.iou_threshold = iou_threshold
        self.negatives_per_image = negatives_per_image
        self.temperature = temperature
        self.bbox_reg_weights = bbox_reg_weights
        self.smooth_l1_beta = smooth_l1_beta

    def forward(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        queries: Tensor,
        query_valid: Tensor,
        query_pooled: Tensor,
    ) -> dict[str, Tensor]:
        """``loss_info`` when the head has its similarity FC, ``loss_croi_reg`` when it has its regression.

        Both are means over the Qn valid queries of the batch (the formula's 1/Q, over all images together: our
        choice). Only the sampled boxes are pooled (view-1): each query's positive and its image's negatives (M slots
        per image, whose unused ones hold empty boxes that enter no loss).
        """
        num_images, num_slots = query_valid.shape
        if len(proposals) != num_images:
            raise ValueError(f"proposals for {len(proposals)} images, but queries for {num_images}")
        # The valid slots in row-major order (the order of queries[query_valid] and of query_pooled); Qn is known on
        # the host from query_pooled, so nonzero_static needs no synchronization (nor checks that Qn is right).
        slots = torch.nonzero_static(query_valid.flatten(), size=len(query_pooled)).squeeze(1)  # (Qn,)
        query_image = slots // num_slots  # (Qn,)
        valid_queries = queries.flatten(0, 1).index_select(0, slots)  # (Qn, 4), view-1
        with torch.no_grad():
            padded, proposal_valid = pad_proposals([p.detach() for p in proposals], dtype=queries.dtype)
            positives, negatives, negative_valid = sample_query_proposals(
                padded,
                proposal_valid,
                queries.detach(),
                query_valid,
                iou_threshold=self.iou_threshold,
                max_negatives=self.negatives_per_image,
            )
        positive_boxes = positives.flatten(0, 1).index_select(0, slots)  # (Qn, 4)
        num_negative_slots = negatives.shape[1]  # M
        # The padding slots of negatives hold empty boxes: pooled at almost no cost, masked out of the loss, so the
        # losses and their gradients are those of the sampled boxes alone.
        boxes = torch.cat((positive_boxes, negatives.flatten(0, 1)))
        negative_image = torch.arange(num_images, device=slots.device).repeat_interleave(num_negative_slots)
        batch_index = torch.cat((query_image, negative_image))
        box_features = self.head.box_features(self.pooler(features, boxes, batch_index))  # (Qn + N * M, 1024)
        positive_features, negative_features = box_features[: len(slots)], box_features[len(slots) :]
        query_features = self.head.box_features(query_pooled)  # b_q: (Qn, 1024)

        losses = {}
        if self.head.embed is not None:
            losses["loss_info"] = self._info_loss(
                self.head.embeddings(query_features),
                self.head.embeddings(positive_features),
                self.head.embeddings(negative_features).reshape(num_images, num_negative_slots, -1),
                negative_valid,
                query_valid=query_valid,
            )
        if self.head.reg_query is not None:
            pred_deltas = self.head.regression(positive_features, query_features)
            target_deltas = encode_boxes(positive_boxes, valid_queries, weights=self.bbox_reg_weights)
            # One term per query, summed over the 4 coordinates, averaged over the queries (§3.2.2).
            losses["loss_croi_reg"] = box_regression_loss(
                pred_deltas, target_deltas, beta=self.smooth_l1_beta, normalizer=float(max(len(slots), 1))
            )
        return losses

    def _info_loss(
        self,
        query_embed: Tensor,
        positive_embed: Tensor,
        negative_embed: Tensor,
        negative_valid: Tensor,
        *,
        query_valid: Tensor,
    ) -> Tensor:
        """InfoNCE of each valid query over its positive and its own image's negatives.

        ``query_embed`` and ``positive_embed`` (Qn, E) follow the order of ``query_valid``'s (N, Q) True entries;
        ``negative_embed`` (N, M, E) holds each image's negative slots and ``negative_valid`` (N, M) the real ones.
        """
        num_images, num_slots = query_valid.shape
        slots = torch.nonzero_static(query_valid.flatten(), size=len(query_embed)).squeeze(1)  # (Qn,)
        positive_scores = (query_embed * positive_embed).sum(dim=1)  # s_{p+_q q}: (Qn,)
        # Every query slot against its image's negative slots in one batched product, then the valid slots' rows.
        padded = query_embed.new_zeros(num_images * num_slots, query_embed.shape[1]).index_copy(0, slots, query_embed)
        scores = torch.bmm(padded.reshape(num_images, num_slots, -1), negative_embed.transpose(1, 2))  # (N, Q, M)
        negative_scores = scores.flatten(0, 1).index_select(0, slots)  # (Qn, M)
        negative_mask = negative_valid.index_select(0, slots // num_slots)  # (Qn, M)
        return info_nce_loss(
            positive_scores, negative_scores, negative_mask=negative_mask, temperature=self.temperature
        )
