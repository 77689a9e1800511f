"""The network Jigsaw pre-trains and its ERF (§3.3): the residual init, the dense head, the gradient ERF, Eq. 2.

Eq. 2 runs on hand-built and random ERFs; the ERF itself on a linear network (exact) and on small timm ResNets.
"""

import math

import pytest
import timm
import torch
from torch import nn

from detpretrain.jigsaw import (
    JigsawClassifier,
    JigsawTemplate,
    compute_erf,
    create_backbone,
    erf_label_weights,
    erf_region_shares,
    feature_region_index,
    get_template,
    has_zero_init_last,
    label_weights_from_shares,
    normalize_jigsaw_image,
)

TEMPLATE = get_template("split96")


# ---------------------------------------------------------------------------------------------------------------
# the network: residual init (step-0 ERF), dense head, the feature map's size
# ---------------------------------------------------------------------------------------------------------------


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_backbones_start_with_torchvisions_residual_init_unless_timms_is_asked_for():
    torchvision_init = create_backbone("test_resnet")
    assert all(bool((bn.weight == 1).all()) for bn in batch_norms(torchvision_init))
    timm_init = create_backbone("test_resnet", zero_init_last=True)
    zero = [bn for bn in batch_norms(timm_init) if bool((bn.weight == 0).all())]
    assert len(zero) == 4  # the last BN of each of test_resnet's four blocks
    assert has_zero_init_last("regnetx_002") and not has_zero_init_last("convnext_atto")
    assert create_backbone("convnext_atto").num_features == 320  # an architecture's own init when it has no option
    with pytest.raises(ValueError, match="convnext_atto takes no zero_init_last.*drop --zero-init-last"):
        create_backbone("convnext_atto", zero_init_last=True)


def erf_spread(erf):
    """(h, w): the RMS distance of each position's ERF mass from its centroid, in canvas pixels."""
    erf = erf.double()
    ys = torch.arange(erf.shape[2], dtype=torch.float64) + 0.5
    xs = torch.arange(erf.shape[3], dtype=torch.float64) + 0.5
    rows, columns = erf.sum(3), erf.sum(2)  # (h, w, H), (h, w, W)
    mass = rows.sum(2)
    cy, cx = (rows * ys).sum(2) / mass, (columns * xs).sum(2) / mass
    variance = (rows * (ys - cy[..., None]) ** 2).sum(2) + (columns * (xs - cx[..., None]) ** 2).sum(2)
    return (variance / mass).sqrt()


def test_the_step0_erf_reflects_the_network_not_timms_zero_init():
    """With timm's zero_init_last every block starts as its shortcut, and each cell's step-0 ERF is a few pixels at
    the cell's top-left corner (an 11 x 11 patch for resnet50 at 224 px); with torchvision's init it spreads past
    the cell, as a trained network's does.

    The test does not ask each ERF's centroid to lie inside its cell. A stride-2 3x3 convolution centres each output
    on the first input pixel of its pair, so a stride-32 cell's ERF is centred on the cell's top-left corner, and an
    ERF wider than a cell is pulled towards the canvas centre by the canvas border: on resnet50 and a 224 canvas the
    centroids of 40 of 49 cells lie outside their cells with torchvision's init, and all 49 inside (by under 3 px,
    at the corner) with timm's (2 random images).
    """
    cell = 32  # tiny96: a 96 x 96 canvas, a 3 x 3 map
    images = normalize_jigsaw_image(
        torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    )
    spreads = {}
    for zero_init_last in (False, True):
        torch.manual_seed(0)
        model = JigsawClassifier(create_backbone("resnet18", zero_init_last=zero_init_last), num_classes=3)
        spreads[zero_init_last] = erf_spread(compute_erf(model, images))
    assert (spreads[False] > cell / 2).all(), spreads[False]
    assert (spreads[True] < cell / 4).all(), spreads[True]


def test_dense_head_is_the_fc_applied_everywhere():
    backbone = timm.create_model("resnet10t", channels=(8, 16, 32, 64), num_classes=0, global_pool="")
    model = JigsawClassifier(backbone, num_classes=4).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits, features = model(images), model.forward_features(images)
    assert logits.shape == (2, 4, 3, 3)
    fc = nn.Linear(64, 4)
    fc.weight.data, fc.bias.data = model.classifier.weight.data.view(4, 64), model.classifier.bias.data
    # Pooling the dense logits equals classifying pooled features (why "global"/"block-wise" pool logits).
    torch.testing.assert_close(logits.mean((2, 3)), fc(features.mean((2, 3))), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, :, 1, 2], fc(features[:, :, 1, 2]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_features"):
        JigsawClassifier(nn.Conv2d(3, 3, 1), num_classes=4)


def test_the_feature_map_size_probe_changes_nothing():
    model = JigsawClassifier(create_backbone("test_resnet"), num_classes=3).train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert model.feature_map_size(96, 96) == (3, 3) and model.feature_map_size(224, 160) == (7, 5)
    assert model.training
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    with torch.no_grad():
        model(torch.randn(2, 3, 96, 96))  # what a probe in train mode does: every running statistic moves
    assert not torch.equal(model.backbone.bn1.running_mean, before["backbone.bn1.running_mean"])


# ---------------------------------------------------------------------------------------------------------------
# the ERF (Luo et al. [17])
# ---------------------------------------------------------------------------------------------------------------


def test_compute_erf_is_exact_on_a_linear_network():
    conv = nn.Conv2d(3, 1, kernel_size=3, stride=2, padding=1, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    bn = nn.BatchNorm2d(1)
    bn.running_var.fill_(4.0)
    bn.weight.data.fill_(3.0)
    model = nn.Sequential(conv, bn).train()
    images = torch.randn(2, 3, 8, 8)
    erf = compute_erf(model, images, chunk_size=5)
    assert erf.shape == (4, 4, 8, 8) and model.training  # the train/eval state is restored
    assert conv.weight.grad is None and bn.weight.grad is None
    scale = 3 * 3.0 / math.sqrt(4.0 + bn.eps)  # 3 channels, eval-mode BN: gamma / sqrt(running_var + eps)
    for j in range(4):
        for k in range(4):
            expected = torch.zeros(8, 8)
            expected[max(0, 2 * j - 1) : 2 * j + 2, max(0, 2 * k - 1) : 2 * k + 2] = scale
            torch.testing.assert_close(erf[j, k], expected)
    torch.testing.assert_close(compute_erf(model, images, chunk_size=1), erf)


@pytest.fixture(scope="module")
def tiny_backbone_erf():
    """The ERF of a real timm ResNet (resnet10t, narrowed to 16..128 channels) on a 160 canvas: a 5 x 5 map.

    zero_init_last=False, as create_backbone builds it (narrowed here for speed): timm's zero-initialized blocks would
    leave an untrained network with only its shortcut path and a tiny receptive field.
    """
    torch.manual_seed(0)
    backbone = timm.create_model(
        "resnet10t", channels=(16, 32, 64, 128), zero_init_last=False, num_classes=0, global_pool=""
    )
    model = JigsawClassifier(backbone, num_classes=5)
    template = JigsawTemplate(canvas_height=160, canvas_width=160, split_x=64, split_y=64)
    images = normalize_jigsaw_image(torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8))
    return template, compute_erf(model, images, chunk_size=50)


def test_erf_of_a_tiny_timm_backbone_peaks_at_its_position(tiny_backbone_erf):
    template, erf = tiny_backbone_erf
    assert erf.shape == (5, 5, 160, 160) and (erf >= 0).all()
    # The 32 x 32 tile with the most ERF mass is the position's own tile or a neighbour.
    tile_mass = nn.functional.avg_pool2d(erf.view(25, 1, 160, 160), 32).view(25, 25)
    peak, own = tile_mass.argmax(1), torch.arange(25)
    assert (torch.maximum((peak // 5 - own // 5).abs(), (peak % 5 - own % 5).abs()) <= 1).all()
    # The ERF's centre of mass moves down with j and right with k.
    coords = torch.arange(160.0) + 0.5
    mass = erf.sum((2, 3))
    centre_y, centre_x = (erf.sum(3) * coords).sum(2) / mass, (erf.sum(2) * coords).sum(2) / mass
    assert (centre_y.diff(dim=0) > 0).all() and (centre_x.diff(dim=1) > 0).all()


def test_weights_from_a_real_erf_obey_eq2(tiny_backbone_erf):
    template, erf = tiny_backbone_erf
    shares = erf_region_shares(erf, template=template)
    weights = erf_label_weights(erf, template=template, erf_threshold=0.7)
    own = nn.functional.one_hot(feature_region_index(template, feature_height=5, feature_width=5), 4).bool()
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, 5))
    assert (weights[own] >= 0.7 - 1e-6).all()
    dominant = (shares * own).sum(-1) >= 0.7  # (h, w): positions whose own region holds >= tau of the ERF
    assert dominant.any() and not dominant.all()  # both cases of Eq. 2 occur
    torch.testing.assert_close(weights[dominant], shares[dominant])
    assert (weights[~own] > 0).any()  # positions near a border see their neighbours' labels


# ---------------------------------------------------------------------------------------------------------------
# Eq. 2: label weights from ERF shares
# ---------------------------------------------------------------------------------------------------------------


def hand_built_erf():
    """A 4x4 canvas split at 2 (four 2x2 regions), a 2x2 feature map: one cell per region."""
    template = JigsawTemplate(canvas_height=4, canvas_width=4, split_x=2, split_y=2)
    erf = torch.zeros(2, 2, 4, 4)
    erf[0, 0, 0, 0], erf[0, 0, 1, 1] = 4.0, 2.0  # top-left cell: mass 6 in TL,
    erf[0, 0, 0, 3], erf[0, 0, 3, 0], erf[0, 0, 3, 3] = 2.0, 1.0, 1.0  # 2 in TR, 1 in BL, 1 in BR
    erf[0, 1, 0, 3], erf[0, 1, 0, 0], erf[0, 1, 2, 1], erf[0, 1, 3, 2] = 16.0, 2.0, 1.0, 1.0  # TR cell: 0.8 own
    erf[1, 0, 2:, :2] = 1.0  # BL cell: everything inside its own region (rho_r = 1, the 0/0 case)
    return template, erf  # BR cell: all zero (a dead unit)


def test_eq2_on_a_hand_built_erf():
    template, erf = hand_built_erf()
    shares = erf_region_shares(erf, template=template)
    torch.testing.assert_close(shares[0, 0], torch.tensor([0.6, 0.2, 0.1, 0.1]))
    torch.testing.assert_close(shares[0, 1], torch.tensor([0.1, 0.8, 0.05, 0.05]))
    weights = erf_label_weights(erf, template=template, erf_threshold=0.7)
    # TL: rho_r = 0.6 < 0.7, so w_r = 0.7 and the other 0.3 is split 2:1:1 as rho is.
    torch.testing.assert_close(weights[0, 0], torch.tensor([0.7, 0.15, 0.075, 0.075]))
    torch.testing.assert_close(weights[0, 1], torch.tensor([0.1, 0.8, 0.05, 0.05]))  # rho_r >= tau: w = rho
    assert weights[1, 0].tolist() == [0.0, 0.0, 1.0, 0.0]  # rho_r = 1: no 0/0
    assert weights[1, 1].tolist() == [0.0, 0.0, 0.0, 1.0]  # dead unit: its own label
    one_hot = erf_label_weights(erf, template=template, erf_threshold=1.0)
    assert torch.equal(one_hot, torch.eye(4).view(2, 2, 4))


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.7, 0.95, 1.0])
def test_eq2_properties_on_random_erfs(tau):
    generator = torch.Generator().manual_seed(0)
    erf = torch.rand((7, 7, 224, 224), generator=generator) ** 8  # peaky, so shares range widely
    shares = erf_region_shares(erf, template=TEMPLATE)
    region_index = feature_region_index(TEMPLATE, feature_height=7, feature_width=7)
    weights = label_weights_from_shares(shares, region_index=region_index, erf_threshold=tau)
    own = nn.functional.one_hot(region_index, 4).bool()
    torch.testing.assert_close(weights.sum(-1), torch.ones(7, 7))
    assert (weights[own] >= tau - 1e-6).all()
    dominant = (shares * own).sum(-1) >= tau
    torch.testing.assert_close(weights[dominant], shares[dominant])
    # The others keep their ERF proportions.
    ratio = weights[~own].view(7, 7, 3) / shares[~own].view(7, 7, 3)
    torch.testing.assert_close(ratio, ratio[..., :1].expand(7, 7, 3))
    if tau == 1.0:
        assert torch.equal(weights, own.float())
    with pytest.raises(ValueError, match="erf_threshold must be in"):
        label_weights_from_shares(shares, region_index=region_index, erf_threshold=1.5)
