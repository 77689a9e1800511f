"""Detection backbones: norm settings, frozen stages, and the FPN on a timm body."""

import math

import pytest
import timm
import torch
from timm.layers import FrozenBatchNormAct2d, GroupNorm, GroupNormAct
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detpretrain.backbone import TimmFPN, create_body, freeze_stages


def _count(module: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def test_frozen_bn_replaces_every_batchnorm_and_keeps_eval_outputs():
    torch.manual_seed(0)
    trained = create_body("resnet18", norm="bn")
    for m in trained.modules():  # non-trivial statistics, so that a wrong conversion shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    frozen = create_body("resnet18", norm="frozen_bn")
    frozen.load_state_dict(trained.state_dict(), strict=False)  # frozen BN has no num_batches_tracked
    assert _count(frozen, nn.BatchNorm2d) == 0 and _count(frozen, FrozenBatchNorm2d) == _count(trained, nn.BatchNorm2d)

    images = torch.randn(2, 3, 64, 64)
    trained.eval()
    frozen.train()  # frozen BN ignores train mode: batch statistics never enter
    for a, b in zip(trained(images), frozen(images), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(
        not isinstance(p, nn.Parameter)
        for m in frozen.modules()
        if isinstance(m, FrozenBatchNorm2d)
        for p in m.buffers()
    )


def test_frozen_bn_handles_regnets_fused_norm_act():
    body = create_body("regnety_002", norm="frozen_bn")
    assert _count(body, FrozenBatchNormAct2d) > 0
    assert _count(body, nn.BatchNorm2d) == 0


@pytest.mark.parametrize("arch, kind", [("resnet18", GroupNorm), ("regnety_002", GroupNormAct)])
def test_group_norm_for_training_from_scratch(arch, kind):
    body = create_body(arch, norm="gn")
    assert _count(body, nn.BatchNorm2d) == 0 and _count(body, kind) > 0
    groups = {m.num_channels: m.num_groups for m in body.modules() if isinstance(m, nn.GroupNorm)}
    assert all(g == 32 for c, g in groups.items() if c % 32 == 0)
    assert all(g == math.gcd(32, c) for c, g in groups.items())  # RegNet: 24 channels -> 8 groups
    body(torch.randn(1, 3, 64, 64))


def test_group_norm_refuses_pretrained_bn_weights():
    with pytest.raises(ValueError, match="training from scratch"):
        create_body("resnet18", pretrained=True, norm="gn")


def test_syncbn_conversion():
    body = create_body("resnet18", norm="syncbn")
    assert _count(body, nn.SyncBatchNorm) == 20 and _count(body, nn.BatchNorm2d) == 0


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm='ln'"):
        create_body("resnet18", norm="ln")


@pytest.mark.parametrize(
    "arch, frozen_stages, frozen, trainable",
    [
        ("resnet18", 0, [], ["conv1", "bn1", "layer1", "layer4"]),
        ("resnet18", 1, ["conv1", "bn1"], ["layer1", "layer2"]),
        ("resnet18", 2, ["conv1", "bn1", "layer1"], ["layer2", "layer3", "layer4"]),
        ("resnet18", 5, ["conv1", "layer1", "layer4"], []),
        ("regnety_002", 2, ["stem", "s1"], ["s2", "s3", "s4"]),
    ],
)
def test_frozen_stages_follow_detectron2_freeze_at(arch, frozen_stages, frozen, trainable):
    body = create_body(arch, frozen_stages=frozen_stages)
    grad = {name: all(p.requires_grad for p in child.parameters()) for name, child in body.named_children()}
    assert all(not grad[n] and any(True for _ in getattr(body, n).parameters()) for n in frozen)
    assert all(grad[n] for n in trainable)


def test_freezing_more_stages_than_exist_is_refused():
    body = create_body("resnet18")
    with pytest.raises(ValueError, match="stem and 4 stages"):
        freeze_stages(body, 6)


def test_fpn_levels_names_and_strides():
    model = TimmFPN(create_body("resnet18"), out_channels=64)
    levels = model(torch.randn(2, 3, 128, 192))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in levels.values()] == [(2, 64, 128 // s, 192 // s) for s in (4, 8, 16, 32, 64)]
    assert model.out_channels == 64


def test_fpn_body_is_the_timm_backbone_unchanged():
    """The body's weights and outputs are timm's: what an export holds loads into ``model.body`` directly."""
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    model = TimmFPN(create_body("resnet18")).eval()
    model.body.load_state_dict(reference.state_dict())
    images = torch.randn(1, 3, 64, 64)
    for a, b in zip(reference(images), model.body(images), strict=True):
        assert torch.equal(a, b)
    loss = sum(v.sum() for v in model(images).values())
    loss.backward()
    assert model.body.conv1.weight.grad is not None and model.fpn.layer_blocks[0][0].weight.grad is not None
