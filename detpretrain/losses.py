"""Pure loss functions of the pre-training methods.

Jigsaw (Montage) pre-training, ``papers/montage_jigsaw.txt`` §3.3 and Tab. 2: the ERF-adaptive dense
classification loss (Eq. 1 soft labels, per-position cross-entropy, block-wise average, Fig. 5) and the two
alternative strategies it is compared with, "global" and "block-wise" classification (Appendix B). Readings where
the paper is silent follow ``PAPER_NOTES.md`` ("Dense loss").

All three take the dense logits of ``detpretrain.jigsaw.JigsawClassifier`` (a 1x1 convolution on the last feature
map). The convolution is linear, so pooling its logits over a set of cells equals classifying the pooled features
there: "global" pools over the whole map, "block-wise" over each region. They compute in float32 with autocast
switched off, wherever they are called: ``engine.train_step`` runs the loss inside the model's bf16 autocast, where
the einsum of Eq. 1 and the region means (matrix products) would run in bf16 (soft labels summing to 1 +- 0.002, a
weight of 0.7 becoming 0.6992).

PreDet, ``papers/predet.txt`` §3: the multi-label classification loss L_cls (§3.1; the softmax cross-entropy against
1/k-normalized targets of Mahajan et al. [34], PAPER_NOTES.md "L_cls"), the InfoNCE loss L_info of the CROI head
(§3.2.2) and the box-regression loss of L_crpn and L_croi-reg (smooth L1, Faster R-CNN). Matching and sampling live
in ``detpretrain.predet.crpn`` / ``croi``; these functions only reduce what those modules select.

Glossary (names and shapes):

    B              assembled images in the batch
    K              classes: 0 = background (negative samples), 1..C = the dataset's categories
    h, w           the last feature map (7 x 7 for a 224 canvas at stride 32)
    R = 4          template regions in detpretrain.jigsaw.REGION_NAMES order (TL, TR, BL, BR)
    pred_logits    (B, K, h, w) float: dense class logits
    labels         (B, R) int64: the class of the sample in each region
    label_weights  (h, w, R) float: Eq. 2 weights w_i of each position (detpretrain.jigsaw.erf_label_weights),
                   shared by all images; each position's weights sum to 1
    region_index   (h, w) int64 in [0, R): the region holding each cell's centre
                   (detpretrain.jigsaw.feature_region_index)
    region_area_fractions  (R,) float: region area / canvas area (JigsawTemplate.region_area_fractions)

  PreDet:
    N              images (or views) classified; C classes of the pre-training labels
    image_labels   per image, the indices of its k >= 0 labels: a sequence of N 1-D int64 tensors, or an (N, L)
                   int64 tensor padded with -1 (any negative entry is padding)
    targets        (N, C) float: the k-hot vector divided by k (all zero for an image without labels)
    Qn             queries with a positive (all images together); P: the widest negative set
    positive_scores  (Qn,) float: s_{p+_q q}, cosine similarities in [-1, 1]
    negative_scores  (Qn, P) float: s_{p- q} for the negatives of the query's image, padded;
                   negative_mask (Qn, P) bool says which entries are real
    pred_deltas, target_deltas  (S, 4) float: box deltas of the S regressed samples
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "box_regression_loss",
    "erf_adaptive_dense_loss",
    "info_nce_loss",
    "jigsaw_blockwise_loss",
    "jigsaw_global_loss",
    "jigsaw_soft_labels",
    "multilabel_softmax_loss",
    "multilabel_targets",
    "region_mean",
]

NUM_REGIONS = 4


def _without_autocast(tensor: Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``tensor``'s device, so that the Jigsaw losses run in the dtype they cast to."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _check_shapes(pred_logits: Tensor, labels: Tensor) -> None:
    if pred_logits.ndim != 4:
        raise ValueError(f"pred_logits must be (B, K, h, w), got {tuple(pred_logits.shape)}")
    if labels.shape != (pred_logits.shape[0], NUM_REGIONS):
        raise ValueError(f"labels must be (B, {NUM_REGIONS}) = ({pred_logits.shape[0]}, 4), got {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= pred_logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {pred_logits.shape[1]}) (K classes), got {labels.unique().tolist()}")


def region_mean(values: Tensor, region_index: Tensor) -> Tensor:
    """Mean of ``values`` (..., h, w) over the cells of each region: (..., R), in ``values``' dtype (outside autocast).
    Every region needs a cell."""
    if values.shape[-2:] != region_index.shape:
        raise ValueError(f"values {tuple(values.shape)} do not end with region_index's {tuple(region_index.shape)}")
    one_hot = F.one_hot(region_index.flatten().to(values.device), NUM_REGIONS).to(values.dtype)  # (h*w, R)
    counts = one_hot.sum(dim=0)
    if (counts == 0).any():
        raise ValueError(f"region(s) {(counts == 0).nonzero().flatten().tolist()} have no feature cell")
    with _without_autocast(values):
        return values.flatten(-2) @ one_hot / counts


def jigsaw_soft_labels(labels: Tensor, label_weights: Tensor, *, num_classes: int) -> Tensor:
    """Eq. 1: the soft label of every position, y~^{j,k} = sum_i w_i^{j,k} y_i, as (B, K, h, w) float32.

    Two regions with the same class add their weights on that class.
    """
    if label_weights.ndim != 3 or label_weights.shape[-1] != NUM_REGIONS:
        raise ValueError(f"label_weights must be (h, w, {NUM_REGIONS}), got {tuple(label_weights.shape)}")
    with _without_autocast(label_weights):
        one_hot = F.one_hot(labels, num_classes).float()  # (B, R, K)
        return torch.einsum("jkr,brc->bcjk", label_weights.float(), one_hot)


def erf_adaptive_dense_loss(
    pred_logits: Tensor, labels: Tensor, *, label_weights: Tensor, region_index: Tensor
) -> Tensor:
    """The ERF-adaptive dense classification loss (§3.3, Fig. 5), a scalar.

    At every position, the cross-entropy -sum_c y~_c log softmax(z)_c against the soft label of Eq. 1; then the
    mean over the cells of each region (a cell belongs to the region that holds its centre), the plain mean of the
    R region losses (so a region with more cells does not weigh more: "to make a balance among different
    regions"), and the mean over the batch.
    """
    _check_shapes(pred_logits, labels)
    if label_weights.shape[:2] != pred_logits.shape[2:]:
        raise ValueError(
            f"label_weights {tuple(label_weights.shape)} do not match the {tuple(pred_logits.shape[2:])} "
            "feature map; recompute them (erf_label_weights) for this input size"
        )
    targets = jigsaw_soft_labels(labels, label_weights.to(pred_logits.device), num_classes=pred_logits.shape[1])
    with _without_autocast(pred_logits):
        loss_map = F.cross_entropy(pred_logits.float(), targets, reduction="none")  # (B, h, w)
        return region_mean(loss_map, region_index).mean()


def jigsaw_blockwise_loss(pred_logits: Tensor, labels: Tensor, *, region_index: Tensor) -> Tensor:
    """ "Block-wise" classification (§3.3, Tab. 2, Fig. B1(b)), a scalar.

    Average-pool each region, classify it with its hard label (cross-entropy), then average over regions and
    the batch. Pooling the 1x1-convolution logits is pooling the features first (the classifier is linear).
    Note: dense classification with tau = 1 has the same labels but a different loss (the mean of per-cell
    cross-entropies, not the cross-entropy of the mean logits).
    """
    _check_shapes(pred_logits, labels)
    with _without_autocast(pred_logits):
        region_logits = region_mean(pred_logits.float(), region_index)  # (B, K, R)
        return F.cross_entropy(region_logits, labels)


def jigsaw_global_loss(pred_logits: Tensor, labels: Tensor, *, region_area_fractions: Tensor) -> Tensor:
    """ "Global" classification (§3.3, Tab. 2, Fig. B1(a)), a scalar.

    Global average pooling, then the cross-entropy against one label per image: the four region labels mixed by
    region area (as in CutMix). Mean over the batch.
    """
    _check_shapes(pred_logits, labels)
    if region_area_fractions.shape != (NUM_REGIONS,):
        raise ValueError(f"region_area_fractions must be ({NUM_REGIONS},), got {tuple(region_area_fractions.shape)}")
    with _without_autocast(pred_logits):
        one_hot = F.one_hot(labels, pred_logits.shape[1]).float()  # (B, R, K)
        targets = torch.einsum("r,brc->bc", region_area_fractions.to(pred_logits.device, torch.float32), one_hot)
        return F.cross_entropy(pred_logits.float().mean(dim=(2, 3)), targets)


# ---------------------------------------------------------------------------------------------------------------------
# PreDet (papers/predet.txt §3)


def multilabel_targets(image_labels: Sequence[Tensor] | Tensor, *, num_classes: int) -> Tensor:
    """The 1/k-normalized target of each image: 1/k on each of its k distinct labels, 0 elsewhere; (N, C).

    Mahajan et al. [34] (cited by §3.1): a softmax over classes against the k-hot vector scaled to sum to 1. A label
    repeated in one image counts once; an image without labels gets an all-zero row (``multilabel_softmax_loss``
    leaves it out).
    """
    if isinstance(image_labels, Tensor) and image_labels.ndim != 2:
        raise ValueError(f"padded image_labels must be (N, L) with -1 padding, got shape {tuple(image_labels.shape)}")
    rows = list(image_labels)
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"the labels of image {i} must be a 1-D tensor of class indices, got {tuple(row.shape)}")
    device = rows[0].device if rows else None
    hot = torch.zeros(len(rows), num_classes, device=device)
    if not rows:
        return hot
    # All images at once, with one host synchronization for the range check (a loop would sync per image).
    labels = torch.cat(rows).long().to(device)
    image = torch.repeat_interleave(
        torch.arange(len(rows), device=device), torch.tensor([len(r) for r in rows]).to(device)
    )
    labels, image = labels[labels >= 0], image[labels >= 0]
    if len(labels) and int(labels.max()) >= num_classes:
        bad = int(image[labels.argmax()])
        raise ValueError(f"image {bad} has label {int(labels.max())}, outside [0, {num_classes}) (num_classes)")
    hot[image, labels] = 1.0
    return hot / hot.sum(dim=1, keepdim=True).clamp(min=1.0)


def multilabel_softmax_loss(pred_logits: Tensor, image_labels: Sequence[Tensor] | Tensor) -> Tensor:
    """L_cls of one classifier output (§3.1): -sum_c t_c log softmax(z)_c, the mean over images with labels; a scalar.

    ``t`` is ``multilabel_targets``. Images with no label are excluded from the mean (their target is undefined);
    when no image has a label the loss is an exact 0 still attached to ``pred_logits``, so that backward runs and
    every parameter gets its (zero) gradient, as DistributedDataParallel expects.
    """
    if pred_logits.ndim != 2:
        raise ValueError(f"pred_logits must be (N, C), got shape {tuple(pred_logits.shape)}")
    targets = multilabel_targets(image_labels, num_classes=pred_logits.shape[1])
    if len(targets) != len(pred_logits):
        raise ValueError(f"{len(pred_logits)} rows of logits but labels for {len(targets)} images")
    # Counted where the targets were built (the labels' device, the CPU in training): no GPU synchronization.
    num_labelled = int((targets.sum(dim=1) > 0).sum())
    if num_labelled == 0:
        return pred_logits.sum() * 0.0
    # An unlabelled row has an all-zero target, so it adds exactly 0 to the sum: the mean over labelled images.
    log_probs = F.log_softmax(pred_logits.float(), dim=1)
    return -(targets.to(pred_logits.device, non_blocking=True) * log_probs).sum() / num_labelled


def info_nce_loss(
    positive_scores: Tensor,
    negative_scores: Tensor,
    *,
    temperature: float,
    negative_mask: Tensor | None = None,
) -> Tensor:
    """L_info (§3.2.2): -(1/Qn) sum_q log[exp(s+/tau) / (exp(s+/tau) + sum_{p- in P_neg} exp(s_{p- q}/tau))].

    ``negative_mask`` marks the real entries of a padded ``negative_scores`` (queries of different images have
    negative sets of different sizes); masked entries do not enter the sum. A query without negatives contributes
    log 1 = 0. With no query at all the loss is an exact 0 attached to the inputs (see ``multilabel_softmax_loss``).
    """
    if positive_scores.ndim != 1 or negative_scores.ndim != 2 or len(negative_scores) != len(positive_scores):
        raise ValueError(
            f"positive_scores must be (Qn,) and negative_scores (Qn, P), got {tuple(positive_scores.shape)} "
            f"and {tuple(negative_scores.shape)}"
        )
    if len(positive_scores) == 0:
        return positive_scores.sum() * 0.0 + negative_scores.sum() * 0.0
    logits = torch.cat((positive_scores[:, None], negative_scores), dim=1).float() / temperature  # (Qn, 1 + P)
    if negative_mask is not None:
        if negative_mask.shape != negative_scores.shape:
            raise ValueError(f"negative_mask {tuple(negative_mask.shape)} != {tuple(negative_scores.shape)}")
        keep = torch.cat((negative_mask.new_ones(len(negative_mask), 1), negative_mask), dim=1)
        logits = logits.masked_fill(~keep, float("-inf"))
    # -log softmax at the positive's column (0): the positive's column is always finite, so no NaN from -inf.
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def box_regression_loss(pred_deltas: Tensor, target_deltas: Tensor, *, beta: float, normalizer: float) -> Tensor:
    """Smooth L1 (Fast R-CNN) summed over samples and the 4 coordinates, divided by ``normalizer``; a scalar.

    ``beta`` is where the quadratic part ends; ``beta = 0`` is plain L1 (detectron2's default for both the RPN and
    the ROI box head). With no sample the loss is an exact 0 attached to ``pred_deltas``.
    """
    if pred_deltas.shape != target_deltas.shape or pred_deltas.shape[-1:] != (4,):
        raise ValueError(f"pred_deltas {tuple(pred_deltas.shape)} and target_deltas must both be (S, 4)")
    if normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    pred_deltas = pred_deltas.float()
    target_deltas = target_deltas.float()
    if beta == 0:
        loss = F.l1_loss(pred_deltas, target_deltas, reduction="sum")
    else:
        loss = F.smooth_l1_loss(pred_deltas, target_deltas, beta=beta, reduction="sum")
    return loss / normalizer
