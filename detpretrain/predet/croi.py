"""The contrastive ROI head (CROI) of PreDet (``papers/predet.txt`` §3.2.2, Fig. 4), and the FPN ROI pooler.

Query-box lookup: the pooled features of proposals (view-1) and of queries (view-2) go through one shared box-head MLP
(b_p, b_q), one shared FC, and their cosine similarity s_pq enters an InfoNCE loss (tau = 0.07) whose positive for a
query is one proposal overlapping it (IoU > 0.5) and whose negatives P_neg are up to 512 proposals overlapping no query
(IoU < 0.5 to every query). An additional regression loss moves each query's positive proposal onto the query box
(view-1): b_q is projected to 4 x D, b_p to 1 x D, and their 4 dot products are the deltas.

``FPNRoIAlign`` pools a box at the FPN level that fits its size; ``CROIHead`` predicts (box features, similarities,
deltas); ``ContrastiveROIHeads`` samples positives and negatives and computes L_info and L_croi-reg. Readings where
the paper is silent follow PAPER_NOTES.md ("CROI") and are marked where they are made.

Glossary (names and shapes):

    N              images in the batch
    Q, Qv          query slots per image (padded), valid queries of an image; Qn: valid queries of the batch
    P_i            proposals of image i (view-1 pixels); n_i: the negatives sampled from them (<= 512)
    C, S           FPN width, pooled resolution (7); F = C * S * S
    E              width of the shared FC before the cosine similarity; D: width of the regression dot products
    features       list of (N, C, h_l, w_l): the FPN maps pooled from (P2..P5)
    boxes          (K, 4) xyxy boxes to pool and batch_index (K,) int64: the image each box belongs to
    pooled         (K, C, S, S): ROIAlign output; b: (K, 1024) box-head features
    queries        (N, Q, 4): the query boxes in view-1 coordinates; query_valid (N, Q) bool
    query_pooled   (Qn, C, S, S): the queries pooled from view-2, in the order of ``queries[query_valid]``
    proposals      list of N (P_i, 4): CRPN proposals, or random boxes when CRPN is off (Tab. 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import box_iou, roi_align

from detpretrain.boxes import encode_boxes, fpn_levels, jitter_boxes, random_boxes_away_from, sample_indices
from detpretrain.losses import box_regression_loss, info_nce_loss

__all__ = [
    "CROIHead",
    "ContrastiveROIHeads",
    "FPNRoIAlign",
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
        first = features[0]
        result = first.new_zeros(len(boxes), first.shape[1], self.output_size, self.output_size)
        for offset, (x, stride) in enumerate(zip(features, self.strides, strict=True)):
            index = torch.nonzero(levels == self.min_level + offset).squeeze(1)
            pooled = roi_align(
                x,
                rois[index].to(x.dtype),
                output_size=self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )
            result = result.index_copy(0, index, pooled.to(result.dtype))
        return result


class CROIHead(nn.Module):
    """The predicting part of Fig. 4: a shared box head, a shared FC + cosine similarity, the dot-product regression.

    ``embed_dim=None`` leaves out the similarity FC (no L_info), ``reg_dim=None`` the regression projections (no
    L_croi-reg), so that an ablation row of Tab. 1 has no parameter without gradient. ``scale_dot_products`` divides
    the regression dot product by sqrt(D): our deviation, for the reason given in ``detpretrain.predet.crpn.CRPNHead``.
    """

    def __init__(
        self,
        *,
        in_features: int,
        box_head_dim: int,
        embed_dim: int | None,
        reg_dim: int | None,
        scale_dot_products: bool = True,
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
        """Deltas of each proposal towards its query: <FC(b_q) as 4 x D, FC(b_p) as 1 x D> (times the scale); (K, 4).
        Row k of both inputs belongs to the same (proposal, query) pair."""
        if self.reg_query is None or self.reg_proposal is None:
            raise RuntimeError("this CROI head was built without the regression projections (reg_dim=None)")
        query_side = self.reg_query(query_features).reshape(len(query_features), 4, self.reg_dim)  # (K, 4, D)
        proposal_side = self.reg_proposal(proposal_features)  # (K, D)
        return torch.einsum("kcd,kd->kc", query_side, proposal_side) * self.scale


def sample_query_proposals(
    proposals: Tensor, queries: Tensor, *, iou_threshold: float, max_negatives: int
) -> tuple[Tensor, Tensor]:
    """One positive per query and the shared negatives of an image (§3.2.2); ``(positives (Qv, 4), negatives (n, 4))``.

    The queries (view-1 boxes) are appended to the proposals first, as detectron2 appends ground truth, so that every
    query has a positive (PAPER_NOTES.md). p+_q is drawn uniformly among the boxes with IoU > ``iou_threshold`` to q;
    P_neg is a uniform draw of at most ``max_negatives`` boxes whose IoU with every query is < ``iou_threshold``.
    Randomness: torch's global RNG.
    """
    candidates = torch.cat((proposals.to(queries.dtype), queries))
    iou = box_iou(queries, candidates)  # (Qv, P + Qv)
    # A uniform choice among the positives: the largest of independent uniform keys, restricted to them.
    keys = torch.rand_like(iou).masked_fill(iou <= iou_threshold, -1.0)
    positives = candidates[keys.argmax(dim=1)]
    if len(queries):
        negative = iou.amax(dim=0) < iou_threshold
    else:
        negative = torch.ones(len(candidates), dtype=torch.bool, device=candidates.device)
    negatives = candidates[sample_indices(negative, max_negatives)]
    return positives, negatives


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
        choice). Only the sampled boxes are pooled (view-1): each query's positive and its image's negatives.
        """
        valid_queries = queries[query_valid]  # (Qn, 4), view-1
        positives, negatives, negative_images = [], [], []
        with torch.no_grad():
            for i in range(len(queries)):
                image_queries = queries[i, query_valid[i]]
                if len(image_queries) == 0:
                    continue  # no query, so no lookup: the image's proposals are not needed
                pos, neg = sample_query_proposals(
                    proposals[i].detach(),
                    image_queries,
                    iou_threshold=self.iou_threshold,
                    max_negatives=self.negatives_per_image,
                )
                positives.append(pos)
                negatives.append(neg)
                negative_images.append(torch.full((len(neg),), i, dtype=torch.int64, device=neg.device))
        query_image = torch.nonzero(query_valid)[:, 0]  # (Qn,)
        num_negatives = [len(neg) for neg in negatives]
        boxes = torch.cat([valid_queries.new_zeros(0, 4), *positives, *negatives])
        batch_index = torch.cat([query_image, *negative_images])
        box_features = self.head.box_features(self.pooler(features, boxes, batch_index))  # (Qn + sum n_i, 1024)
        positive_features, negative_features = box_features[: len(query_image)], box_features[len(query_image) :]
        query_features = self.head.box_features(query_pooled)  # b_q: (Qn, 1024)

        losses = {}
        if self.head.embed is not None:
            losses["loss_info"] = self._info_loss(
                self.head.embeddings(query_features),
                self.head.embeddings(positive_features),
                self.head.embeddings(negative_features).split(num_negatives),
                query_image=query_image,
            )
        if self.head.reg_query is not None:
            pred_deltas = self.head.regression(positive_features, query_features)
            positive_boxes = boxes[: len(query_image)]
            target_deltas = encode_boxes(positive_boxes, valid_queries, weights=self.bbox_reg_weights)
            # One term per query, summed over the 4 coordinates, averaged over the queries (§3.2.2).
            losses["loss_croi_reg"] = box_regression_loss(
                pred_deltas, target_deltas, beta=self.smooth_l1_beta, normalizer=float(max(len(query_image), 1))
            )
        return losses

    def _info_loss(
        self, query_embed: Tensor, positive_embed: Tensor, negative_embed: Sequence[Tensor], *, query_image: Tensor
    ) -> Tensor:
        """InfoNCE over the padded negatives of each query's image."""
        positive_scores = (query_embed * positive_embed).sum(dim=1)  # s_{p+_q q}: (Qn,)
        width = max((len(e) for e in negative_embed), default=0)
        negative_scores = query_embed.new_zeros(len(query_embed), width)
        negative_mask = torch.zeros(len(query_embed), width, dtype=torch.bool, device=query_embed.device)
        images_with_queries = torch.unique_consecutive(query_image)
        for image, embed in zip(images_with_queries.tolist(), negative_embed, strict=True):
            rows = torch.nonzero(query_image == image).squeeze(1)
            scores = query_embed[rows] @ embed.T  # (Qv, n_i)
            negative_scores = negative_scores.index_put(
                (rows[:, None], torch.arange(len(embed), device=embed.device)[None, :]), scores
            )
            negative_mask[rows, : len(embed)] = True
        return info_nce_loss(
            positive_scores, negative_scores, negative_mask=negative_mask, temperature=self.temperature
        )
