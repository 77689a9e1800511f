"""PreDet's pure losses on hand-computed cases: L_cls (1/k softmax cross-entropy), InfoNCE, box regression."""

import math

import pytest
import torch

from detpretrain.losses import box_regression_loss, info_nce_loss, multilabel_softmax_loss, multilabel_targets

# Logits log(a): softmax is a / sum(a) = a / 8, so every probability is a fraction of small integers.
COUNTS = torch.tensor([[1.0, 2.0, 1.0, 4.0], [2.0, 2.0, 2.0, 2.0], [4.0, 1.0, 1.0, 2.0]])
LOGITS = COUNTS.log()


def test_targets_are_k_hot_over_k_with_duplicates_counted_once():
    targets = multilabel_targets(
        [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long), torch.tensor([0, 0])], num_classes=4
    )
    torch.testing.assert_close(
        targets, torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    )
    padded = multilabel_targets(torch.tensor([[1, 3], [-1, -1], [0, -1]]), num_classes=4)
    torch.testing.assert_close(padded, targets)
    with pytest.raises(ValueError, match="outside"):
        multilabel_targets([torch.tensor([4])], num_classes=4)


def test_multilabel_loss_is_the_1_over_k_softmax_cross_entropy_and_skips_unlabelled_images():
    labels = [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long), torch.tensor([0])]
    # Image 0: -(1/2 log(2/8) + 1/2 log(4/8)); image 1 has no label and is left out; image 2: -log(4/8).
    expected = (-(0.5 * math.log(2 / 8) + 0.5 * math.log(4 / 8)) - math.log(4 / 8)) / 2
    loss = multilabel_softmax_loss(LOGITS, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Not the per-class sigmoid: a softmax, so raising a wrong class's logit raises the loss.
    raised = LOGITS.clone()
    raised[0, 0] += 1.0
    assert multilabel_softmax_loss(raised, labels) > loss


def test_multilabel_loss_without_any_label_is_a_zero_that_backpropagates():
    logits = LOGITS.clone().requires_grad_()
    loss = multilabel_softmax_loss(logits, torch.full((3, 2), -1))
    assert loss.item() == 0.0
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits))


def test_info_nce_equals_the_formula_on_a_hand_built_case():
    tau = 0.07
    positive = torch.tensor([0.5, 0.9])
    negatives = torch.tensor([[0.1, -0.2, 0.7], [0.3, 0.8, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # query 0's image has two negatives
    expected = 0.0
    for s_pos, s_negs in ((0.5, [0.1, -0.2]), (0.9, [0.3, 0.8, 0.0])):
        expected += -math.log(math.exp(s_pos / tau) / (math.exp(s_pos / tau) + sum(math.exp(s / tau) for s in s_negs)))
    expected /= 2
    loss = info_nce_loss(positive, negatives, negative_mask=mask, temperature=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_is_near_zero_for_a_perfect_positive_and_rises_when_swapped_with_a_negative():
    tau = 0.07
    perfect = info_nce_loss(torch.tensor([1.0]), torch.tensor([[-1.0, -0.5, 0.0]]), temperature=tau)
    assert perfect.item() < 1e-5
    swapped = info_nce_loss(torch.tensor([-1.0]), torch.tensor([[1.0, -0.5, 0.0]]), temperature=tau)
    assert swapped.item() > 20.0  # about 2 / tau
    # Without negatives a query contributes log 1 = 0; masked entries never count, even huge ones.
    alone = info_nce_loss(
        torch.tensor([0.2]), torch.tensor([[5.0]]), negative_mask=torch.tensor([[False]]), temperature=tau
    )
    assert alone.item() == 0.0


def test_info_nce_gradient_is_finite_with_masked_entries_and_zero_without_queries():
    positive = torch.tensor([0.3, 0.4], requires_grad=True)
    negatives = torch.tensor([[0.1, 0.2], [0.5, 0.0]], requires_grad=True)
    loss = info_nce_loss(
        positive, negatives, negative_mask=torch.tensor([[True, False], [True, True]]), temperature=0.07
    )
    loss.backward()
    assert torch.isfinite(positive.grad).all() and torch.isfinite(negatives.grad).all()
    assert negatives.grad[0, 1] == 0.0 and positive.grad.lt(0).all()

    empty_pos = torch.zeros(0, requires_grad=True)
    empty = info_nce_loss(empty_pos, torch.zeros(0, 0), temperature=0.07)
    assert empty.item() == 0.0
    empty.backward()


def test_box_regression_loss_is_l1_at_beta_zero_and_smooth_l1_otherwise():
    pred = torch.tensor([[0.0, 0.5, 2.0, -1.0]])
    target = torch.tensor([[0.2, 0.5, 0.0, 0.0]])
    # |diff| = 0.2, 0, 2, 1; summed and divided by the normalizer.
    assert box_regression_loss(pred, target, beta=0.0, normalizer=2.0).item() == pytest.approx(3.2 / 2)
    # beta = 1: 0.5 * 0.2^2, 0, 2 - 0.5, 1 - 0.5
    assert box_regression_loss(pred, target, beta=1.0, normalizer=1.0).item() == pytest.approx(0.02 + 1.5 + 0.5)
    empty = torch.zeros(0, 4, requires_grad=True)
    assert box_regression_loss(empty, torch.zeros(0, 4), beta=0.0, normalizer=1.0).item() == 0.0
