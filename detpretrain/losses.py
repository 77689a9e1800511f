"""Pure loss functions of the pre-training methods.

Jigsaw (Montage) pre-training, ``papers/montage_jigsaw.txt`` §3.3 and Tab. 2: the ERF-adaptive dense
classification loss (Eq. 1 soft labels, per-position cross-entropy, block-wise average, Fig. 5) and the two
alternative strategies it is compared with, "global" and "block-wise" classification (Appendix B). Readings where
the paper is silent follow ``PAPER_NOTES.md`` ("Dense loss").

All three take the dense logits of ``detpretrain.jigsaw.JigsawClassifier`` (a 1x1 convolution on the last feature
map). The convolution is linear, so pooling its logits over a set of cells equals classifying the pooled features
there: "global" pools over the whole map, "block-wise" over each region.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "erf_adaptive_dense_loss",
    "jigsaw_blockwise_loss",
    "jigsaw_global_loss",
    "jigsaw_soft_labels",
    "region_mean",
]

NUM_REGIONS = 4


def _check_shapes(pred_logits: Tensor, labels: Tensor) -> None:
    if pred_logits.ndim != 4:
        raise ValueError(f"pred_logits must be (B, K, h, w), got {tuple(pred_logits.shape)}")
    if labels.shape != (pred_logits.shape[0], NUM_REGIONS):
        raise ValueError(f"labels must be (B, {NUM_REGIONS}) = ({pred_logits.shape[0]}, 4), got {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= pred_logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {pred_logits.shape[1]}) (K classes), got {labels.unique().tolist()}")


def region_mean(values: Tensor, region_index: Tensor) -> Tensor:
    """Mean of ``values`` (..., h, w) over the cells of each region: (..., R). Every region needs a cell."""
    if values.shape[-2:] != region_index.shape:
        raise ValueError(f"values {tuple(values.shape)} do not end with region_index's {tuple(region_index.shape)}")
    one_hot = F.one_hot(region_index.flatten().to(values.device), NUM_REGIONS).to(values.dtype)  # (h*w, R)
    counts = one_hot.sum(dim=0)
    if (counts == 0).any():
        raise ValueError(f"region(s) {(counts == 0).nonzero().flatten().tolist()} have no feature cell")
    return values.flatten(-2) @ one_hot / counts


def jigsaw_soft_labels(labels: Tensor, label_weights: Tensor, *, num_classes: int) -> Tensor:
    """Eq. 1: the soft label of every position, y~^{j,k} = sum_i w_i^{j,k} y_i, as (B, K, h, w).

    Two regions with the same class add their weights on that class.
    """
    if label_weights.ndim != 3 or label_weights.shape[-1] != NUM_REGIONS:
        raise ValueError(f"label_weights must be (h, w, {NUM_REGIONS}), got {tuple(label_weights.shape)}")
    one_hot = F.one_hot(labels, num_classes).to(label_weights.dtype)  # (B, R, K)
    return torch.einsum("jkr,brc->bcjk", label_weights, one_hot)


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
    targets = jigsaw_soft_labels(labels, label_weights.to(pred_logits.dtype), num_classes=pred_logits.shape[1])
    loss_map = F.cross_entropy(pred_logits, targets, reduction="none")  # (B, h, w)
    return region_mean(loss_map, region_index).mean()


def jigsaw_blockwise_loss(pred_logits: Tensor, labels: Tensor, *, region_index: Tensor) -> Tensor:
    """ "Block-wise" classification (§3.3, Tab. 2, Fig. B1(b)), a scalar.

    Average-pool each region, classify it with its hard label (cross-entropy), then average over regions and
    the batch. Pooling the 1x1-convolution logits is pooling the features first (the classifier is linear).
    Note: dense classification with tau = 1 has the same labels but a different loss (the mean of per-cell
    cross-entropies, not the cross-entropy of the mean logits).
    """
    _check_shapes(pred_logits, labels)
    region_logits = region_mean(pred_logits, region_index)  # (B, K, R)
    return F.cross_entropy(region_logits, labels)


def jigsaw_global_loss(pred_logits: Tensor, labels: Tensor, *, region_area_fractions: Tensor) -> Tensor:
    """ "Global" classification (§3.3, Tab. 2, Fig. B1(a)), a scalar.

    Global average pooling, then the cross-entropy against one label per image: the four region labels mixed by
    region area (as in CutMix). Mean over the batch.
    """
    _check_shapes(pred_logits, labels)
    if region_area_fractions.shape != (NUM_REGIONS,):
        raise ValueError(f"region_area_fractions must be ({NUM_REGIONS},), got {tuple(region_area_fractions.shape)}")
    one_hot = F.one_hot(labels, pred_logits.shape[1]).to(pred_logits.dtype)  # (B, R, K)
    targets = torch.einsum("r,brc->bc", region_area_fractions.to(pred_logits), one_hot)
    return F.cross_entropy(pred_logits.mean(dim=(2, 3)), targets)
