"""Jigsaw losses (§3.3, Tab. 2) on hand-computed cases: dense ERF-adaptive, block-wise and global classification."""

import math

import pytest
import torch

from detpretrain.jigsaw import get_template
from detpretrain.losses import (
    erf_adaptive_dense_loss,
    jigsaw_blockwise_loss,
    jigsaw_global_loss,
    jigsaw_soft_labels,
    region_mean,
)

# A 2 x 3 feature map whose regions hold 1, 2, 1 and 2 cells (TL, TR, BL, BR), three classes (0 = background).
REGION_INDEX = torch.tensor([[0, 1, 1], [2, 3, 3]])
LABELS = torch.tensor([[1, 2, 0, 1]])  # TL class 1, TR class 2, BL background, BR class 1
WEIGHTS = torch.tensor(  # (h, w, R): Eq. 2 weights of each cell, each row summing to 1
    [
        [[0.7, 0.1, 0.1, 0.1], [0.15, 0.7, 0.05, 0.1], [0.0, 1.0, 0.0, 0.0]],
        [[0.1, 0.0, 0.9, 0.0], [0.2, 0.1, 0.0, 0.7], [0.0, 0.0, 0.0, 1.0]],
    ]
)
# Logits log(a): softmax is a / sum(a), so every probability below is a fraction of small integers.
COUNTS = torch.tensor(
    [
        [[1.0, 2.0, 1.0], [1.0, 1.0, 2.0], [2.0, 1.0, 1.0]],
        [[2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 2.0]],
    ]
)  # (h, w, K)
LOGITS = COUNTS.log().permute(2, 0, 1).unsqueeze(0)  # (1, K, h, w)


def soft_ce(target, counts):
    """-sum_c t_c log(a_c / sum a), written out."""
    total = sum(counts)
    return -sum(t * math.log(a / total) for t, a in zip(target, counts, strict=True) if t)


def test_soft_labels_follow_eq1():
    targets = jigsaw_soft_labels(LABELS, WEIGHTS, num_classes=3)
    assert targets.shape == (1, 3, 2, 3)
    # Class 1 collects the TL and BR weights, class 2 the TR weight, background the BL weight.
    torch.testing.assert_close(targets[0, :, 0, 0], torch.tensor([0.1, 0.8, 0.1]))
    torch.testing.assert_close(targets[0, :, 0, 1], torch.tensor([0.05, 0.25, 0.7]))
    torch.testing.assert_close(targets[0, :, 1, 1], torch.tensor([0.0, 0.9, 0.1]))
    torch.testing.assert_close(targets.sum(1), torch.ones(1, 2, 3))


def test_dense_loss_matches_a_hand_computed_value():
    cell = {
        (0, 0): soft_ce([0.1, 0.8, 0.1], [1, 2, 1]),
        (0, 1): soft_ce([0.05, 0.25, 0.7], [1, 1, 2]),
        (0, 2): soft_ce([0.0, 0.0, 1.0], [2, 1, 1]),
        (1, 0): soft_ce([0.9, 0.1, 0.0], [2, 1, 1]),
        (1, 1): soft_ce([0.0, 0.9, 0.1], [1, 2, 1]),
        (1, 2): soft_ce([0.0, 1.0, 0.0], [1, 1, 2]),
    }
    regions = [cell[0, 0], (cell[0, 1] + cell[0, 2]) / 2, cell[1, 0], (cell[1, 1] + cell[1, 2]) / 2]
    expected = sum(regions) / 4
    loss = erf_adaptive_dense_loss(LOGITS, LABELS, label_weights=WEIGHTS, region_index=REGION_INDEX)
    assert loss.shape == ()
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    # The plain mean over cells would weigh the two-cell regions more: it is a different number here.
    assert not math.isclose(loss.item(), sum(cell.values()) / 6, rel_tol=1e-3)


def test_a_region_with_more_cells_does_not_weigh_more():
    # Perfectly confident correct logits everywhere except one bad cell; where that cell sits decides its weight.
    logits = torch.full((1, 3, 2, 3), -20.0)
    labels = torch.tensor([[1, 1, 1, 1]])
    logits[:, 1] = 20.0
    one_hot = torch.eye(4)[REGION_INDEX]  # tau = 1: hard labels
    bad_in_tl, bad_in_tr = logits.clone(), logits.clone()
    bad_in_tl[0, :, 0, 0] = torch.tensor([0.0, 0.0, 0.0])  # TL has 1 cell: its region loss is log 3
    bad_in_tr[0, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0])  # TR has 2 cells: its region loss is log 3 / 2
    loss_tl = erf_adaptive_dense_loss(bad_in_tl, labels, label_weights=one_hot, region_index=REGION_INDEX)
    loss_tr = erf_adaptive_dense_loss(bad_in_tr, labels, label_weights=one_hot, region_index=REGION_INDEX)
    assert math.isclose(loss_tl.item(), math.log(3) / 4, rel_tol=1e-5)
    assert math.isclose(loss_tr.item(), math.log(3) / 8, rel_tol=1e-5)


def test_dense_loss_is_the_batch_mean_and_gradients_flow():
    other = torch.randn(1, 3, 2, 3)
    logits = torch.cat([LOGITS, other]).requires_grad_(True)
    labels = torch.cat([LABELS, torch.tensor([[2, 0, 1, 1]])])
    loss = erf_adaptive_dense_loss(logits, labels, label_weights=WEIGHTS, region_index=REGION_INDEX)
    each = [
        erf_adaptive_dense_loss(logits[i : i + 1], labels[i : i + 1], label_weights=WEIGHTS, region_index=REGION_INDEX)
        for i in range(2)
    ]
    torch.testing.assert_close(loss, (each[0] + each[1]) / 2)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad.abs().sum(1) > 0).all()  # every cell gets gradient


def test_blockwise_loss_pools_each_region_then_uses_its_hard_label():
    logits = torch.tensor(
        [[[[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]], [[0.0, 2.0, 0.0], [1.0, 0.0, 1.0]], [[2.0, 1.0, 1.0], [0.0, 0.0, 2.0]]]]
    )  # (1, 3, 2, 3)
    pooled = [  # region mean logits per class, written out: TL (0,0); TR (0,1),(0,2); BL (1,0); BR (1,1),(1,2)
        [1.0, 0.0, 2.0],
        [(0.0 + 2.0) / 2, (2.0 + 0.0) / 2, (1.0 + 1.0) / 2],
        [0.0, 1.0, 0.0],
        [(3.0 + 1.0) / 2, (0.0 + 1.0) / 2, (0.0 + 2.0) / 2],
    ]
    labels = [1, 2, 0, 1]

    def ce(z, y):
        return math.log(sum(math.exp(v) for v in z)) - z[y]

    expected = sum(ce(z, y) for z, y in zip(pooled, labels, strict=True)) / 4
    loss = jigsaw_blockwise_loss(logits, LABELS, region_index=REGION_INDEX)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_global_loss_mixes_the_labels_by_template_area():
    template = get_template("split96")
    fractions = template.region_area_fractions()
    torch.testing.assert_close(fractions, torch.tensor([9216.0, 12288.0, 12288.0, 16384.0]) / 50176)
    logits = torch.zeros(1, 3, 2, 3)
    logits[0, 0] = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # mean 0.5
    logits[0, 1] = torch.tensor([[0.0, 6.0, 0.0], [0.0, 0.0, 6.0]])  # mean 2.0
    logits[0, 2] = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # mean 1.0
    # Labels TL 1, TR 2, BL 0, BR 1: background takes BL's area, class 1 TL's + BR's, class 2 TR's.
    target = [12288 / 50176, (9216 + 16384) / 50176, 12288 / 50176]
    pooled = [0.5, 2.0, 1.0]
    log_norm = math.log(sum(math.exp(v) for v in pooled))
    expected = -sum(t * (z - log_norm) for t, z in zip(target, pooled, strict=True))
    loss = jigsaw_global_loss(logits, LABELS, region_area_fractions=fractions)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_tau_one_gives_blockwise_labels_but_not_the_blockwise_loss():
    one_hot = torch.eye(4)[REGION_INDEX]  # Eq. 2 with tau = 1
    targets = jigsaw_soft_labels(LABELS, one_hot, num_classes=3)
    assert torch.equal(targets.argmax(1), LABELS[0][REGION_INDEX].unsqueeze(0))  # each cell: its region's label
    dense = erf_adaptive_dense_loss(LOGITS, LABELS, label_weights=one_hot, region_index=REGION_INDEX)
    blockwise = jigsaw_blockwise_loss(LOGITS, LABELS, region_index=REGION_INDEX)
    # Mean of cross-entropies vs cross-entropy of mean logits: log-sum-exp is convex, so the first is larger
    # whenever the logits vary within a region (TR and BR do here).
    assert dense.item() > blockwise.item() + 1e-3
    constant = LOGITS[:, :, :1, :1].expand(1, 3, 2, 3)  # the same logits in every cell: the two coincide
    torch.testing.assert_close(
        erf_adaptive_dense_loss(constant, LABELS, label_weights=one_hot, region_index=REGION_INDEX),
        jigsaw_blockwise_loss(constant, LABELS, region_index=REGION_INDEX),
    )


def test_region_mean_and_bad_inputs():
    values = torch.tensor([[[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]])
    torch.testing.assert_close(region_mean(values, REGION_INDEX), torch.tensor([[1.0, 3.0, 8.0, 24.0]]))
    with pytest.raises(ValueError, match=r"region\(s\) \[3\] have no feature cell"):
        region_mean(values, torch.tensor([[0, 1, 1], [2, 2, 2]]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        erf_adaptive_dense_loss(LOGITS, torch.tensor([[1, 2, 3, 1]]), label_weights=WEIGHTS, region_index=REGION_INDEX)
    with pytest.raises(ValueError, match=r"labels must be \(B, 4\)"):
        jigsaw_blockwise_loss(LOGITS, torch.tensor([1, 2, 0, 1]), region_index=REGION_INDEX)
    with pytest.raises(ValueError, match="recompute them"):
        erf_adaptive_dense_loss(LOGITS, LABELS, label_weights=torch.ones(7, 7, 4) / 4, region_index=REGION_INDEX)


def test_soft_labels_and_losses_are_float32_under_bf16_autocast():
    """engine.train_step runs the loss inside the model's autocast: Eq. 1 and the losses must not follow it."""
    weights = torch.tensor([0.7, 0.1, 0.15, 0.05]).expand(2, 3, 4)  # 0.7 and 0.15 are not bf16 numbers
    region_index = torch.tensor([[0, 1, 1], [2, 3, 3]])
    logits = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, 0, 1], [0, 0, 2, 1]])
    fractions = get_template("split96").region_area_fractions()
    losses = {
        "soft labels": lambda z: jigsaw_soft_labels(labels, weights, num_classes=3),
        "dense": lambda z: erf_adaptive_dense_loss(z, labels, label_weights=weights, region_index=region_index),
        "block-wise": lambda z: jigsaw_blockwise_loss(z, labels, region_index=region_index),
        "global": lambda z: jigsaw_global_loss(z, labels, region_area_fractions=fractions),
    }
    for name, loss in losses.items():
        float32 = loss(logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = loss(logits)
            from_bf16_logits = loss(logits.bfloat16())  # what the model returns under autocast
        assert autocast.dtype == torch.float32 and torch.equal(autocast, float32), name
        assert torch.equal(from_bf16_logits, loss(logits.bfloat16().float())), name
    means = region_mean(logits, region_index)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # region means keep their input's dtype, autocast or not
        assert torch.equal(region_mean(logits, region_index), means)
    soft_labels = jigsaw_soft_labels(labels, weights, num_classes=3)
    torch.testing.assert_close(soft_labels.sum(1), torch.ones(2, 2, 3), rtol=0, atol=1e-6)
