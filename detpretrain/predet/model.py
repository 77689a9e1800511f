"""The PreDet model (``papers/predet.txt`` §3, Fig. 2) and its configuration.

Backbone + FPN with trained BN (pre-training starts from scratch, §4.1), a multi-label classification head shared by
the pyramid levels (L_cls, §3.1), the contrastive RPN (L_crpn, §3.2.1) and the contrastive ROI head (L_info and
L_croi-reg, §3.2.2); L = L_cls + L_crpn + L_info + L_croi-reg (Eq. 1, 2). In train mode (and in eval mode: PreDet has
no inference output) ``PreDet.forward`` returns a dict of named losses, the torchvision convention; the engine sums
them. ``losses=`` switches terms off for the Tab. 1 ablation; without ``"crpn"`` the CROI head trains on random boxes
around the queries (§5.1).

Both views go through the backbone in one forward so that BatchNorm sees both (PAPER_NOTES.md "Views and batch").
Everything the CRPN and CROI head compare lives in view-1 coordinates; only the query features are pooled from view-2,
at the query's view-2 box. ``PreDetConfig.symmetric_views`` adds the other direction (an option, off by default).

Glossary (names and shapes):

    B              images; the backbone sees 2B views (view-1 of every image, then view-2 of every image)
    H, W           view size (480 x 480 in the paper, §4.1); both views have the same size
    Q              query slots per image (16 in the paper, padded; ``query_valid`` marks the real ones)
    C              classes of the image-level labels (1209 for IG-50M)
    images         (2B, 3, H, W) float, normalized: view-1 of every image, then view-2 of every image in the same
                   order (``images[:B]`` / ``images[B:]``, the layout of detpretrain.predet.views.collate_two_views)
    queries1       (B, Q, 4) xyxy: the query boxes in view-1 pixels (targets of the CRPN and CROI head)
    queries2       (B, Q, 4) xyxy: the same queries in view-2 pixels (where f_q is pooled)
    query_valid    (B, Q) bool; a valid query must have positive size in both views
    labels         per image the indices of its k >= 0 labels: a sequence of B 1-D int64 tensors, or a (B, L) int64
                   tensor padded with -1 (detpretrain.losses.multilabel_targets)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detpretrain.backbone import TimmFPN, create_body
from detpretrain.boxes import nonempty_boxes
from detpretrain.losses import multilabel_softmax_loss
from detpretrain.predet.croi import ContrastiveROIHeads, CROIHead, FPNRoIAlign, random_query_proposals
from detpretrain.predet.crpn import ContrastiveRPN, CRPNHead

__all__ = ["LOSS_KEYS", "LOSS_NAMES", "MultiLabelHead", "PreDet", "PreDetConfig", "create_predet"]

# The switchable terms of Tab. 1, and the loss keys each one puts in the output dict.
LOSS_NAMES = ("cls", "crpn", "info", "croi_reg")
LOSS_KEYS = {
    "cls": ("loss_cls",),
    "crpn": ("loss_crpn_cls", "loss_crpn_reg"),
    "info": ("loss_info",),
    "croi_reg": ("loss_croi_reg",),
}


@dataclass(frozen=True)
class PreDetConfig:
    """PreDet's hyper-parameters. §4.1: "the default Faster R-CNN hyper-parameters in [detectron2] wherever possible".

    Each field says where its default comes from: "paper" (predet.txt), "detectron2 default" (its Base-RCNN-FPN
    config), or "our choice" (the paper is silent; PAPER_NOTES.md records the reading).
    """

    # --- Views (§3.2, §3.3)
    symmetric_views: bool = False
    """Let each view take each role: besides the queries pooled from view-2 and matched in view-1, the queries pooled
    from view-1 and matched in view-2; L_crpn, L_info and L_croi-reg average over the two directions. Our choice,
    off: the paper pools queries from view-2 only (Fig. 2); PAPER_NOTES.md "Views and batch" names this variant as a
    flagged option. It doubles the CRPN and CROI work."""

    # --- L_cls (§3.1)
    cls_levels: tuple[str, ...] = ("0", "1", "2", "3", "pool")
    """FPN outputs with a classification head: P2..P6, every level the FPN outputs ("a classification head added to
    each pyramid level"): our choice (P6, a subsampled P5, is a pyramid level of detectron2's FPN too)."""

    # --- CRPN (§3.2.1)
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    """One anchor size per level P2..P6: detectron2 default."""
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Height / width of the A = 3 anchors of a location: detectron2 default."""
    crpn_dim: int = 256
    """D, the width of the (query, anchor) dot products: our choice (the FPN width, PAPER_NOTES.md)."""
    scale_dot_products: bool = False
    """Divide the CRPN and CROI-regression dot products by sqrt(D). Off: paper (§3.2.1, §3.2.2 have no scale). The
    weights can absorb the factor (it equals the plain heads with other initial weights, learning rate and weight decay
    on their six dot-product layers), so it changes training, not what the heads compute. CPU evidence (resnet18 + FPN
    256, D = 256, 8 coco128 views of 128 px per step, SGD, warmup linear from 0.001 x lr, no lr drop): at the recipe's
    lr scaled to 8 views (0.0016, warmup 60) both trained 160 steps, total loss 14.98 -> 12.24 plain, 13.75 -> 12.10
    scaled (first / last 20 steps); at 8 x that lr (0.0125, warmup 40) the plain form diverged by step 27 (lr 0.008,
    non-finite CRPN boxes) while the scaled one trained 100 steps. The recipe's lr (0.2 on the mean loss of 1024
    views) is far above both, so the GPU check decides: both forms at 1024 views, lr 0.2, warmup 1000 from 0.001 x,
    bf16, for 2000 steps (past the warmup); if the plain form diverges where the scaled one does not, make this True."""
    crpn_iou_thresholds: tuple[float, float] = (0.3, 0.7)
    """Negative below 0.3, positive above 0.7, ignored between: paper."""
    crpn_allow_low_quality_matches: bool = True
    """Also positive: each query's best anchors, even below 0.7: detectron2 default (the paper does not say)."""
    crpn_positives_per_image: int = 128
    """Sampled positive anchors per image, at most: paper."""
    crpn_negatives_per_image: int = 128
    """Sampled negative anchors per image, at most (no fill-up when positives are fewer): paper."""
    crpn_bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    """Faster R-CNN encoding weights of the CRPN deltas: detectron2 default."""
    crpn_smooth_l1_beta: float = 0.0
    """Smooth-L1 beta of the CRPN regression (0 = L1): detectron2 default."""
    crpn_pre_nms_topk: int = 2000
    """Top-K anchors per level before NMS (training): detectron2 default (PRE_NMS_TOPK_TRAIN, per FPN level)."""
    crpn_nms_threshold: float = 0.7
    """NMS IoU threshold of the proposals: detectron2 default."""
    crpn_post_nms_topk: int = 1000
    """K_nms, proposals kept per image after NMS (training): detectron2 default (POST_NMS_TOPK_TRAIN, per image)."""
    crpn_min_box_size: float = 0.0
    """Proposals need width and height above this, in pixels: detectron2 default (PROPOSAL_GENERATOR.MIN_SIZE)."""

    # --- ROI pooling (§3.3 "ROI-pooling is done at the appropriate FPN-level")
    pooler_resolution: int = 7
    """ROIAlign output size: detectron2 default."""
    pooler_sampling_ratio: int = 0
    """Samples per bin, 0 = adaptive: detectron2 default."""
    pooler_aligned: bool = True
    """Half-pixel aligned ROIAlign (ROIAlignV2): detectron2 default."""

    # --- CROI head (§3.2.2)
    box_head_dim: int = 1024
    """Width of the 2-FC box head shared by proposals and queries: detectron2 default."""
    croi_embed_dim: int = 256
    """Output width of the shared FC before the cosine similarity: our choice."""
    croi_reg_dim: int = 256
    """D of the 4 x D / 1 x D regression projections: our choice (the CRPN's D; the paper uses one symbol)."""
    temperature: float = 0.07
    """InfoNCE temperature tau: paper."""
    croi_iou_threshold: float = 0.5
    """Positive proposal IoU > 0.5 with its query; negative IoU < 0.5 with every query: paper."""
    croi_negatives_per_image: int = 512
    """|P_neg|, negatives sampled per image, at most: paper."""
    croi_bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    """Faster R-CNN encoding weights of the CROI deltas: detectron2 default (ROI_BOX_HEAD.BBOX_REG_WEIGHTS)."""
    croi_smooth_l1_beta: float = 0.0
    """Smooth-L1 beta of L_croi-reg (0 = L1): detectron2 default (ROI_BOX_HEAD.SMOOTH_L1_BETA)."""

    # --- Random boxes instead of CRPN proposals (Tab. 1 rows without L_crpn, §5.1)
    random_positives_per_query: int = 4
    """Jittered boxes with IoU > 0.5 per query: our choice."""
    random_negatives_per_image: int = 512
    """Random boxes with IoU < 0.5 to every query, per image: our choice (|P_neg|)."""


class MultiLabelHead(nn.Module):
    """The classification head of §3.1: global average pooling and one linear layer, shared by all pyramid levels."""

    def __init__(self, *, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """One (N, C) logit tensor per feature map."""
        return [self.fc(x.mean(dim=(2, 3))) for x in features]


class PreDet(nn.Module):
    """PreDet (§3): ``fpn`` (a ``TimmFPN``; ``model.body`` is its timm body) and the heads of the enabled losses.

    Only the heads that the enabled ``losses`` use are built, so that every parameter gets a gradient at every step
    (DistributedDataParallel without ``find_unused_parameters``).
    """

    def __init__(
        self,
        fpn: TimmFPN,
        *,
        num_classes: int | None,
        losses: Iterable[str] = LOSS_NAMES,
        config: PreDetConfig | None = None,
    ):
        super().__init__()
        self.enabled_losses = frozenset(losses)
        unknown = self.enabled_losses - set(LOSS_NAMES)
        if unknown or not self.enabled_losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSS_NAMES}, got {sorted(losses)}")
        self.config = config = config if config is not None else PreDetConfig()
        self.fpn = fpn
        channels = fpn.out_channels
        reductions = list(fpn.body.feature_info.reduction())
        # TimmFPN adds one max-pooled level (P6, stride x2) on top of the body's levels: the anchor levels.
        anchor_strides = [*reductions, reductions[-1] * 2]

        self.cls_head = None
        if "cls" in self.enabled_losses:
            if not num_classes:
                raise ValueError("the 'cls' loss needs num_classes (the number of image-level label classes)")
            # TimmFPN's output names: "0", "1", ... for the body's levels, then "pool" (P6).
            fpn_names = [*(str(level) for level in range(len(reductions))), "pool"]
            missing = [name for name in config.cls_levels if name not in fpn_names]
            if missing:
                raise ValueError(f"cls_levels {missing} are not FPN outputs (those are {fpn_names})")
            self.cls_head = MultiLabelHead(in_channels=channels, num_classes=num_classes)

        self.pooler = None
        if self.enabled_losses & {"crpn", "info", "croi_reg"}:
            self.pooler = FPNRoIAlign(
                strides=reductions,  # pooled from P2..P5, the body's levels, as detectron2's ROI heads
                output_size=config.pooler_resolution,
                sampling_ratio=config.pooler_sampling_ratio,
                aligned=config.pooler_aligned,
            )
        pooled_features = channels * config.pooler_resolution**2

        self.crpn = None
        if "crpn" in self.enabled_losses:
            if len(config.anchor_sizes) != len(anchor_strides):
                raise ValueError(
                    f"{len(config.anchor_sizes)} anchor sizes for {len(anchor_strides)} FPN levels (strides "
                    f"{anchor_strides}); give one size per level"
                )
            self.crpn = ContrastiveRPN(
                CRPNHead(
                    in_channels=channels,
                    query_in_features=pooled_features,
                    num_anchors=len(config.anchor_aspect_ratios),
                    dim=config.crpn_dim,
                    scale_dot_products=config.scale_dot_products,
                ),
                anchor_sizes=config.anchor_sizes,
                aspect_ratios=config.anchor_aspect_ratios,
                strides=anchor_strides,
                iou_thresholds=config.crpn_iou_thresholds,
                allow_low_quality_matches=config.crpn_allow_low_quality_matches,
                positives_per_image=config.crpn_positives_per_image,
                negatives_per_image=config.crpn_negatives_per_image,
                bbox_reg_weights=config.crpn_bbox_reg_weights,
                smooth_l1_beta=config.crpn_smooth_l1_beta,
                pre_nms_topk=config.crpn_pre_nms_topk,
                nms_threshold=config.crpn_nms_threshold,
                post_nms_topk=config.crpn_post_nms_topk,
                min_box_size=config.crpn_min_box_size,
            )

        self.croi = None
        if self.enabled_losses & {"info", "croi_reg"}:
            self.croi = ContrastiveROIHeads(
                CROIHead(
                    in_features=pooled_features,
                    box_head_dim=config.box_head_dim,
                    embed_dim=config.croi_embed_dim if "info" in self.enabled_losses else None,
                    reg_dim=config.croi_reg_dim if "croi_reg" in self.enabled_losses else None,
                    scale_dot_products=config.scale_dot_products,
                ),
                self.pooler,
                iou_threshold=config.croi_iou_threshold,
                negatives_per_image=config.croi_negatives_per_image,
                temperature=config.temperature,
                bbox_reg_weights=config.croi_bbox_reg_weights,
                smooth_l1_beta=config.croi_smooth_l1_beta,
            )

    @property
    def body(self) -> nn.Module:
        """The timm ``features_only`` backbone (what the training script exports)."""
        return self.fpn.body

    def forward(
        self,
        images: Tensor,
        queries1: Tensor | None = None,
        queries2: Tensor | None = None,
        query_valid: Tensor | None = None,
        labels: Sequence[Tensor] | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The enabled losses by name: ``loss_cls``, ``loss_crpn_cls``, ``loss_crpn_reg``, ``loss_info``,
        ``loss_croi_reg`` (each a scalar; the total is their sum, Eq. 2)."""
        if images.ndim != 4 or len(images) % 2:
            raise ValueError(
                f"images must be (2B, 3, H, W): view-1 of B images, then their view-2, got {tuple(images.shape)}"
            )
        num_images = len(images) // 2
        image_size = (images.shape[-2], images.shape[-1])
        if self.cls_head is not None:
            if labels is None:
                raise ValueError("the 'cls' loss needs the image-level labels (labels=...)")
            if len(labels) != num_images:
                raise ValueError(f"labels for {len(labels)} images, but {num_images} images in the batch")
        if self.pooler is not None:
            queries1, queries2, query_valid = self._check_queries(queries1, queries2, query_valid, num_images)
        # One backbone pass over both views: BN statistics over both (PAPER_NOTES.md "Views and batch").
        features = self.fpn(images)
        levels = list(features.values())  # P2..P6, each (2B, C, h, w)

        losses: dict[str, Tensor] = {}
        if self.cls_head is not None:
            losses["loss_cls"] = self.classification_loss(features, labels)
        if self.pooler is None:
            return losses

        # The roles of the views (PAPER_NOTES.md "Views and batch"): the "target" view holds the anchors, proposals
        # and every target, the other view gives the query features. By default view-1 is the target view of each
        # image; with symmetric_views each image is also taken the other way round, as a second "image" (rows B to
        # 2B - 1 of the target levels: view-2's maps, queries2 as targets, features pooled from view-1). The CRPN
        # and CROI losses are means over images and queries, so over both directions they are the mean of the two.
        roi_levels = len(self.pooler.strides)  # P2..P5
        if self.config.symmetric_views:
            target_levels = levels
            targets, sources = torch.cat([queries1, queries2]), torch.cat([queries2, queries1])
            query_valid = torch.cat([query_valid, query_valid])
        else:
            target_levels = [x[:num_images] for x in levels]
            targets, sources = queries1, queries2
        # f_q: each valid query pooled from the other view of its image, at its box there (§3.2, "ROI-pooling ...
        # for query q"): target row i pools from backbone row (i + B) mod 2B, view-2 for view-1 and vice versa.
        query_image = torch.nonzero(query_valid)[:, 0]
        source_image = (query_image + num_images) % len(images)
        query_pooled = self.pooler(levels[:roi_levels], sources[query_valid], source_image)  # (Qn, C, S, S)

        proposals = None
        if self.crpn is not None:
            query_features = query_pooled.new_zeros(*query_valid.shape, query_pooled.shape[1:].numel())
            query_features = query_features.index_put(tuple(torch.nonzero(query_valid).T), query_pooled.flatten(1))
            crpn_losses, proposals = self.crpn(
                target_levels,
                query_features,
                targets,
                query_valid,
                image_size=image_size,
                with_proposals=self.croi is not None,
            )
            losses.update(crpn_losses)
        if self.croi is not None:
            if proposals is None:
                proposals = self.random_proposals(targets, query_valid, image_size=image_size)
            losses.update(self.croi(target_levels[:roi_levels], proposals, targets, query_valid, query_pooled))
        return losses

    def classification_loss(self, features: dict[str, Tensor], labels: Sequence[Tensor] | Tensor) -> Tensor:
        """L_cls (§3.1): the 1/k softmax cross-entropy of each level's logits, over both views and the labelled
        images, averaged over the levels ``config.cls_levels``. ``features`` hold view-1 of the B images, then
        view-2, and ``labels`` the B images' labels."""
        # Each image's labels hold for both of its views, and for every level. Every level has the same labelled
        # rows, so the mean over all levels' rows is the mean over levels of each level's mean: one loss call, one
        # target matrix (built where the labels are: keep them on the CPU to spare the GPU any synchronization).
        levels = len(self.config.cls_levels)
        every_row = torch.cat([labels] * 2 * levels) if isinstance(labels, Tensor) else [*labels] * 2 * levels
        logits = self.cls_head([features[name] for name in self.config.cls_levels])
        return multilabel_softmax_loss(torch.cat(logits), every_row)

    def random_proposals(self, queries1: Tensor, query_valid: Tensor, *, image_size: tuple[int, int]) -> list[Tensor]:
        """Random positives and negatives around each image's queries, in place of CRPN proposals (Tab. 1, §5.1)."""
        config = self.config
        return [
            random_query_proposals(
                queries1[i, query_valid[i]],
                positives_per_query=config.random_positives_per_query,
                num_negatives=config.random_negatives_per_image,
                iou_threshold=config.croi_iou_threshold,
                image_size=image_size,
            )
            if bool(query_valid[i].any())
            else queries1.new_zeros(0, 4)
            for i in range(len(queries1))
        ]

    @staticmethod
    def _check_queries(
        queries1: Tensor | None, queries2: Tensor | None, query_valid: Tensor | None, num_images: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        if queries1 is None or queries2 is None or query_valid is None:
            raise ValueError("the CRPN / CROI losses need queries1, queries2 and query_valid")
        if queries1.shape != queries2.shape or queries1.ndim != 3 or queries1.shape[::2] != (num_images, 4):
            raise ValueError(
                f"queries1 and queries2 must both be (B, Q, 4) with B = {num_images}, got {tuple(queries1.shape)} "
                f"and {tuple(queries2.shape)}"
            )
        if query_valid.shape != queries1.shape[:2] or query_valid.dtype != torch.bool:
            raise ValueError(f"query_valid must be a (B, Q) bool tensor, got {query_valid.dtype} {query_valid.shape}")
        for name, queries in (("queries1", queries1), ("queries2", queries2)):
            if not bool(nonempty_boxes(queries[query_valid]).all()):
                raise ValueError(f"every valid query needs a positive width and height in {name}")
        if queries1.shape[1] == 0:
            # No query slot at all: one invalid slot keeps every shape (and the CRPN's convolution) well defined.
            queries1, queries2 = queries1.new_zeros(num_images, 1, 4), queries2.new_zeros(num_images, 1, 4)
            query_valid = query_valid.new_zeros(num_images, 1)
        return queries1.float(), queries2.float(), query_valid


def create_predet(
    name: str,
    *,
    num_classes: int | None,
    losses: Iterable[str] = LOSS_NAMES,
    config: PreDetConfig | None = None,
    fpn_channels: int = 256,
    pretrained: bool = False,
    sync_bn: bool = False,
) -> PreDet:
    """PreDet on the timm architecture ``name`` with trained BatchNorm (pre-training starts from scratch, §4.1).

    BatchNorm normalizes over each process's own views (both views of its images); ``sync_bn`` makes it SyncBatchNorm,
    whose statistics span every process of a GPU run (the paper does not say which it used). Only the body has
    normalization layers: the FPN and the heads have none.
    """
    body = create_body(name, pretrained=pretrained, norm="syncbn" if sync_bn else "bn")
    return PreDet(TimmFPN(body, out_channels=fpn_channels), num_classes=num_classes, losses=losses, config=config)
