"""Detectors on timm backbones, fine-tuning protocols, schedules: each protocol builds the model it promises, each
arch trains and evaluates on tiny inputs, pre-trained parts load exactly (and the record says which), schedules
match the papers' tables."""

import json
import math

import pytest
import timm
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

import detpretrain
from detpretrain import engine
from detpretrain.backbone import TimmFPN, create_body
from detpretrain.detection import (
    PROTOCOLS,
    SCHEDULES,
    build_detector,
    override_protocol,
    param_groups,
    parse_settings,
    schedule_for,
)
from detpretrain.detection.detectors import _backbone_record
from detpretrain.hub import IncompatibleWeightsError

BACKBONE = "test_resnet"  # timm's 0.5M-parameter ResNet: stem + 4 stages, C5 with 96 channels
# Small RPN/ROI budgets so that a CPU test runs in seconds; the defaults are torchvision's (and C4's detectron2's).
SMALL = dict(
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=32,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machine's cores are shared; OpenMP threads spinning against other processes made these
    # forward/backward passes 30x slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(arch="maskrcnn", protocol="predet", **kwargs):
    kwargs.setdefault("pretrained", False)
    kwargs.setdefault("detector_kwargs", {} if arch == "retinanet" else SMALL)
    return build_detector(arch, backbone=BACKBONE, num_classes=3, protocol=PROTOCOLS[protocol], **kwargs)


def _types(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules()}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Distinct, non-default values everywhere (weights and BN statistics), so that a wrong copy shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model


def _export(tmp_path, arch=BACKBONE, *, fpn_state=None, seed=0):
    model = _randomize(timm.create_model(arch, num_classes=0), seed)
    extra = {"fpn": fpn_state} if fpn_state is not None else None
    out = detpretrain.save_pretrained(
        model, tmp_path / f"{arch}_export", arch=arch, tag="test", license="apache-2.0", extra_state_dicts=extra
    )
    return out, model.state_dict()


# ---------------------------------------------------------------------------------------------- protocols
@pytest.mark.parametrize(
    "protocol, frozen, body_norm, box_head, mask_lr, train_sizes, crop",
    [
        ("predet", [], nn.BatchNorm2d, TwoMLPHead, 4.0, (640, 672, 704, 736, 768, 800), (0.9, 0.9)),
        ("predet_r50", [], nn.BatchNorm2d, FastRCNNConvFCHead, 4.0, (640, 672, 704, 736, 768, 800), (0.9, 0.9)),
        # montage_jigsaw.txt names no frozen stage: the references' shared default, stem + stage 1 (our reading)
        ("jigsaw", ["conv1", "bn1", "layer1"], FrozenBatchNorm2d, TwoMLPHead, 1.0, (800,), None),
        ("standard", ["conv1", "bn1", "layer1"], FrozenBatchNorm2d, TwoMLPHead, 1.0, (800,), None),
    ],
)
def test_each_protocol_builds_the_model_it_promises(protocol, frozen, body_norm, box_head, mask_lr, train_sizes, crop):
    model, record = _build("maskrcnn", protocol)
    body = model.backbone.body
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected_frozen = {f"backbone.body.{n}" for n, _ in body.named_parameters() if n.split(".")[0] in frozen}
    assert frozen_names == expected_frozen and bool(frozen_names) == bool(frozen)  # everything else trains

    norms = {t for t in _types(body) if t in (nn.BatchNorm2d, FrozenBatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)}
    assert norms == {body_norm}
    assert type(model.roi_heads.box_head) is box_head
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())  # one process: no SyncBN

    groups = {g["name"]: g for g in param_groups(model, base_lr=0.02, weight_decay=1e-4, protocol=PROTOCOLS[protocol])}
    assert groups["mask_head"]["lr_scale"] == mask_lr and groups["mask_head"]["lr"] == pytest.approx(0.02 * mask_lr)
    mask_params = {id(p) for p in model.roi_heads.mask_head.parameters()} | {
        id(p) for p in model.roi_heads.mask_predictor.parameters()
    }
    in_mask_groups = {id(p) for name, g in groups.items() if name.startswith("mask_head") for p in g["params"]}
    assert in_mask_groups == mask_params

    transform = model.transform
    assert (transform.min_size, transform.max_size) == (train_sizes, 1333)
    model.eval()
    assert (transform.min_size, transform.max_size) == ((800,), 1333)
    model.train()
    assert transform.min_size == train_sizes

    assert json.loads(json.dumps(record)) == record  # eval.json takes it as it is
    settings = record["protocol"]
    assert settings["name"] == protocol and settings["overrides"] == {}
    assert settings["random_crop"] == (list(crop) if crop else None) and settings["flip_prob"] == 0.5
    assert settings["frozen_stages"] == (2 if frozen else 0)


def test_predet_r50_head_is_four_bn_convs_and_one_fc_and_the_mask_head_has_bn():
    model, _ = _build("maskrcnn", "predet_r50")
    head = model.roi_heads.box_head
    convs = [m for m in head if isinstance(m, Conv2dNormActivation)]
    assert len(convs) == 4 and all(isinstance(c[1], nn.BatchNorm2d) for c in convs)
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [1024]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.roi_heads.mask_head.modules()) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.fpn.modules())  # the FPN stays norm-free


def test_trained_bn_becomes_syncbn_only_with_several_processes_on_a_gpu():
    model, record = _build("maskrcnn", "predet", world_size=8, device_type="cuda")
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.body.modules()) > 0
    assert record["batch_norm"] == "SyncBatchNorm across 8 processes"

    model, record = _build("maskrcnn", "predet", world_size=2, device_type="cpu")  # gloo: torch's SyncBN refuses CPU
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert record["batch_norm"].startswith("BatchNorm per process")
    with pytest.raises(ValueError, match="norm='syncbn' with 2 processes on 'cpu'"):
        _build("maskrcnn", "predet", norm="syncbn", world_size=2, device_type="cpu")

    model, _ = _build("maskrcnn", "predet_r50", world_size=8, device_type="cuda")  # head BN is synced too
    assert all(isinstance(c[1], nn.SyncBatchNorm) for c in model.roi_heads.box_head if isinstance(c, nn.Sequential))


def test_groupnorm_from_scratch_and_refused_with_pretrained_weights(tmp_path):
    model, record = _build("fasterrcnn", "predet", norm="gn")
    norms = {t for t in _types(model.backbone.body) if issubclass(t, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d))}
    assert norms and all(issubclass(t, nn.GroupNorm) for t in norms)
    assert record["protocol"]["overrides"] == {"norm": "gn"}
    with pytest.raises(ValueError, match="training from scratch"):
        _build("fasterrcnn", "predet", norm="gn", pretrained=True)
    export, _ = _export(tmp_path)
    with pytest.raises(ValueError, match="norm='gn' cannot load"):
        _build("fasterrcnn", "predet", norm="gn", pretrained=True, backbone_weights=export)


def test_settings_override_by_name_and_are_recorded():
    custom = override_protocol(PROTOCOLS["jigsaw"], **parse_settings(["box_head=4conv1fc", "train_min_sizes=640,800"]))
    assert custom.box_head == "4conv1fc" and custom.train_min_sizes == (640, 800)
    assert custom.as_dict()["overrides"] == {"box_head": "4conv1fc", "train_min_sizes": [640, 800]}
    assert parse_settings(["random_crop=none", "norm_weight_decay=None", "syncbn_when_distributed=false"]) == {
        "random_crop": None,
        "norm_weight_decay": None,
        "syncbn_when_distributed": False,
    }
    with pytest.raises(ValueError, match="unknown protocol setting"):
        override_protocol(PROTOCOLS["predet"], box_heads="2fc")
    with pytest.raises(ValueError, match="box_head='3fc' is not one of"):
        override_protocol(PROTOCOLS["predet"], box_head="3fc")
    with pytest.raises(ValueError, match="random_crop=\\(1.5, 0.9\\)"):
        override_protocol(PROTOCOLS["predet"], random_crop=(1.5, 0.9))
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_settings(["box_head"])
    d2_off = override_protocol(
        PROTOCOLS["predet"], **parse_settings(["detector_defaults=torchvision", "precise_bn_iters=0"])
    )
    assert d2_off.as_dict()["overrides"] == {"detector_defaults": "torchvision", "precise_bn_iters": 0}
    with pytest.raises(ValueError, match="detector_defaults='mmdetection' is not one of"):
        override_protocol(PROTOCOLS["predet"], detector_defaults="mmdetection")
    with pytest.raises(ValueError, match="precise_bn_iters=-1: use 0"):
        override_protocol(PROTOCOLS["predet"], precise_bn_iters=-1)


def test_size_flags_override_the_protocol_sizes():
    model, record = _build("fasterrcnn", "predet", min_size=(96, 128), max_size=160)
    assert (model.transform.min_size, model.transform.max_size) == ((96, 128), 160)
    model.eval()
    assert (model.transform.min_size, model.transform.max_size) == ((128,), 160)
    overrides = record["protocol"]["overrides"]
    assert overrides == {
        "train_min_sizes": [96, 128],
        "train_max_size": 160,
        "test_min_size": 128,
        "test_max_size": 160,
    }


@pytest.mark.parametrize("train_resize", ["dataset", "model"])
def test_training_images_are_resized_by_whoever_the_wiring_says_and_test_images_by_the_model(train_resize):
    model, record = _build("fasterrcnn", "predet", min_size=(64, 80), max_size=200, train_resize=train_resize)
    images = [torch.rand(3, 100, 150), torch.rand(3, 120, 90)]
    torch.manual_seed(0)
    sizes = {tuple(size) for _ in range(8) for size in model.transform(images)[0].image_sizes}
    if train_resize == "dataset":
        assert sizes == {(100, 150), (120, 90)}
    else:  # the short side drawn from (64, 80), per batch
        assert {min(size) for size in sizes} == {64, 80}
    model.eval()
    assert [tuple(s) for s in model.transform(images)[0].image_sizes] == [(80, 120), (106, 80)]  # torchvision floors
    assert record["detector"]["train_resize"] == train_resize


def test_bad_arguments_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="arch='yolo' is not one of"):
        _build("yolo")
    with pytest.raises(ValueError, match="count the background"):
        build_detector("fasterrcnn", backbone=BACKBONE, num_classes=1, protocol=PROTOCOLS["predet"], pretrained=False)
    with pytest.raises(ValueError, match="shared by P3-P7"):
        _build("retinanet", "predet_r50")
    with pytest.raises(ValueError, match="train_resize='loader' is not one of"):
        _build("fasterrcnn", train_resize="loader")
    with pytest.raises(ValueError, match="contradicts backbone_weights"):
        _build("fasterrcnn", backbone_weights="somewhere")


def test_param_groups_leave_out_frozen_parameters_and_spare_norms_from_weight_decay():
    model, _ = _build("maskrcnn", "standard")
    groups = param_groups(model, base_lr=0.02, weight_decay=1e-4, protocol=PROTOCOLS["standard"])
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable) < len(list(model.parameters()))
    assert {g["lr_scale"] for g in groups} == {1.0}

    model, _ = _build("maskrcnn", "predet_r50")
    groups = param_groups(model, base_lr=0.02, weight_decay=1e-4, protocol=PROTOCOLS["predet_r50"])
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"base", "base_norm", "mask_head", "mask_head_norm"}
    assert by_name["base_norm"]["weight_decay"] == 0.0 and by_name["base"]["weight_decay"] == 1e-4
    optimizer = torch.optim.SGD(groups, lr=0.02, momentum=0.9)
    engine.set_lr(optimizer, 0.01)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"base": 0.01, "base_norm": 0.01, "mask_head": 0.04, "mask_head_norm": 0.04}
    )


# ------------------------------------------------------------------------------------------ every arch runs
def _targets(sizes, *, masks: bool):
    targets = []
    for h, w in sizes:
        boxes = torch.tensor([[8.0, 10.0, 60.0, 70.0], [30.0, 20.0, w - 5.0, h - 8.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if masks:
            target["masks"] = torch.zeros(2, h, w, dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(target["masks"], boxes.int().tolist(), strict=True):
                mask[y0:y1, x0:x1] = 1
        targets.append(target)
    return targets


@pytest.mark.parametrize(
    "arch, protocol",
    [("fasterrcnn", "predet"), ("maskrcnn", "predet_r50"), ("retinanet", "standard"), ("fasterrcnn_c4", "jigsaw")],
)
def test_every_arch_trains_and_evaluates_on_tiny_inputs(arch, protocol):
    torch.manual_seed(0)
    model, _ = _build(arch, protocol, min_size=96, max_size=128, detections_per_img=5)
    sizes = [(96, 120), (100, 90)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    losses = model(images, _targets(sizes, masks=arch == "maskrcnn"))
    assert losses and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    if arch == "maskrcnn":
        assert "loss_mask" in losses
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.body.layer3.parameters())

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, (h, w) in zip(outputs, sizes, strict=True):
        n = len(out["boxes"])
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == out["scores"].shape == (n,) and n <= 5
        if n:
            assert (out["boxes"][:, 2] <= w).all() and (out["boxes"][:, 3] <= h).all()
        if arch == "maskrcnn":
            assert out["masks"].shape == (n, 1, h, w)


def test_c4_anchors_roi_and_res5_head():
    model, record = _build("fasterrcnn_c4", "jigsaw")
    assert list(model.backbone.body.named_children())[-1][0] == "layer3"  # the body ends at res4 (stride 16)
    assert model.backbone.body.feature_info.reduction() == [16]
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    res5 = model.roi_heads.box_head.res5
    assert isinstance(res5, type(timm.create_model(BACKBONE).layer4))
    assert FrozenBatchNorm2d in _types(res5) and nn.BatchNorm2d not in _types(res5)  # the protocol's norm
    features = torch.rand(3, model.backbone.out_channels, 14, 14)
    assert model.roi_heads.box_head(features).shape == (3, model.roi_heads.box_predictor.cls_score.in_features)
    assert res5(features).shape[-2:] == (7, 7)  # res5's first block strides 2, as detectron2's C4
    assert record["loaded"]["fpn"]["from"] == "none" and record["detector"]["box_roi_align"] == 14


# ----------------------------------------------------------------------------------------- pre-trained parts
def test_c4_res5_head_holds_exactly_the_pretrained_layer4(tmp_path):
    export, weights = _export(tmp_path)
    for protocol in ("jigsaw", "predet"):  # frozen BN and trained BN
        model, record = _build("fasterrcnn_c4", protocol, pretrained=True, backbone_weights=export)
        res5 = model.roi_heads.box_head.res5.state_dict()
        expected = {k.removeprefix("layer4."): v for k, v in weights.items() if k.startswith("layer4.")}
        if protocol == "jigsaw":  # frozen BN keeps no num_batches_tracked
            expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
        assert res5.keys() == expected.keys()
        assert all(torch.equal(res5[k], v) for k, v in expected.items())
        body = model.backbone.body.state_dict()
        assert all(torch.equal(v, weights[k]) for k, v in body.items() if k in weights)
        assert record["loaded"]["backbone"] == {"from": "export", "weights": str(export), "architecture": BACKBONE}
        assert record["loaded"]["res5_head"]["from"] == "export"
        assert record["loaded"]["res5_head"]["module"] == "roi_heads.box_head.res5"


def test_export_with_fpn_loads_backbone_and_fpn(tmp_path):
    torch.manual_seed(1)
    fpn = _randomize(TimmFPN(create_body(BACKBONE)), seed=3).fpn.state_dict()
    export, weights = _export(tmp_path, fpn_state=fpn)
    model, record = _build("maskrcnn", "predet", pretrained=True, backbone_weights=export)
    body = model.backbone.body.state_dict()
    assert body.keys() == weights.keys() and all(torch.equal(body[k], weights[k]) for k in weights)
    loaded_fpn = model.backbone.fpn.state_dict()
    assert loaded_fpn.keys() == fpn.keys() and all(torch.equal(loaded_fpn[k], fpn[k]) for k in fpn)
    assert record["loaded"]["fpn"] == {
        "from": "export",
        "weights": str(export / "fpn.safetensors"),
        "levels": ["P2", "P3", "P4", "P5"],
    }

    # RetinaNet's FPN starts at C3: it takes the export's P3-P5 blocks; P6/P7 start from scratch.
    model, record = _build("retinanet", "predet", pretrained=True, backbone_weights=export)
    retina_fpn = model.backbone.fpn.state_dict()
    for block in ("inner_blocks", "layer_blocks"):
        for level in range(3):
            for param in ("weight", "bias"):
                key = f"{block}.{level}.0.{param}"
                assert torch.equal(retina_fpn[key], fpn[f"{block}.{level + 1}.0.{param}"])
    assert record["loaded"]["fpn"]["levels"] == ["P3", "P4", "P5"]
    assert record["loaded"]["fpn"]["not_used"] == ["P2"] and record["loaded"]["fpn"]["new"] == ["p6", "p7"]

    model, record = _build("maskrcnn", "predet", pretrained=True, backbone_weights=export, load_fpn_weights=False)
    assert not torch.equal(model.backbone.fpn.state_dict()["inner_blocks.0.0.weight"], fpn["inner_blocks.0.0.weight"])
    assert record["loaded"]["fpn"]["from"] == "none" and "load_fpn_weights=False" in record["loaded"]["fpn"]["reason"]

    with pytest.raises(IncompatibleWeightsError, match="does not fit this detector's FPN"):  # a GN FPN
        build_detector(
            "maskrcnn",
            backbone=BACKBONE,
            num_classes=3,
            protocol=override_protocol(PROTOCOLS["predet"], fpn_norm="gn"),
            backbone_weights=export,
        )


def test_export_without_fpn_loads_the_backbone_and_says_the_fpn_is_new(tmp_path):
    export, weights = _export(tmp_path)
    model, record = _build("fasterrcnn", "standard", pretrained=True, backbone_weights=export)
    body = model.backbone.body.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in body.items())
    assert record["loaded"]["backbone"]["from"] == "export"
    assert record["loaded"]["fpn"]["from"] == "none" and "no fpn.safetensors" in record["loaded"]["fpn"]["reason"]


def test_a_mismatched_export_is_refused_clearly(tmp_path):
    export, _ = _export(tmp_path, arch="resnet10t")
    with pytest.raises(ValueError, match="holds resnet10t weights, not test_resnet: pass backbone='resnet10t'"):
        _build("fasterrcnn", pretrained=True, backbone_weights=export)
    with pytest.raises(IncompatibleWeightsError, match="does not fit test_resnet"):
        _build("fasterrcnn", pretrained=True, backbone_weights=export / "model.safetensors")


def test_the_record_names_where_pretrained_backbone_weights_come_from():
    def record(name, pretrained=True):
        return _backbone_record(name, create_body(name), pretrained=pretrained, weights=None)

    assert record("resnet50.jigsaw") == {
        "from": "zoo",
        "weights": "resnet50.jigsaw",
        "architecture": "resnet50",
        "hub": detpretrain.get_entry("resnet50.jigsaw").hf_hub_id,
    }
    assert record("resnet18.tv_in1k") == {"from": "timm", "weights": "resnet18.tv_in1k", "architecture": "resnet18"}
    assert record("resnet18.tv_in1k", pretrained=False)["from"] == "none"


# ---------------------------------------------------------------------------------------------- schedules
def test_schedule_table_matches_the_papers():
    expected = {
        "1x": (90_000, (60_000, 80_000)),
        "2x": (180_000, (120_000, 160_000)),
        "3x": (270_000, (210_000, 250_000)),
        "6x": (540_000, (480_000, 520_000)),
        "9x": (810_000, (750_000, 790_000)),
        "voc": (24_000, (18_000, 22_000)),
    }
    for name, (total, milestones) in expected.items():
        schedule = schedule_for(name, global_batch_size=16)
        assert (schedule.total_iters, schedule.milestones, schedule.base_lr) == (total, milestones, 0.02)
        assert (schedule.momentum, schedule.weight_decay, schedule.gamma) == (0.9, 1e-4, 0.1)
    assert schedule_for("1x", global_batch_size=16).warmup_iters == 1000
    assert schedule_for("voc", global_batch_size=16).warmup_iters == 100
    assert set(SCHEDULES) == {*expected, "jigsaw"}


def test_schedules_scale_linearly_with_the_global_batch():
    half = schedule_for("1x", global_batch_size=8)
    assert (half.total_iters, half.milestones, half.warmup_iters) == (180_000, (120_000, 160_000), 2000)
    assert half.base_lr == pytest.approx(0.01)
    big = schedule_for("9x", global_batch_size=64)
    assert (big.total_iters, big.milestones, big.base_lr) == (202_500, (187_500, 197_500), pytest.approx(0.08))
    tuned = schedule_for("1x", global_batch_size=32, base_lr=0.03)
    assert tuned.base_lr == pytest.approx(0.06) and tuned.reference_base_lr == 0.03


def test_jigsaw_schedule_counts_epochs_and_drops_after_epochs_9_and_12():
    schedule = schedule_for("jigsaw", global_batch_size=16, iters_per_epoch=7330)  # COCO train2017 at batch 16
    assert (schedule.total_iters, schedule.milestones) == (13 * 7330, (9 * 7330, 12 * 7330))
    assert schedule.lr_at(9 * 7330 - 1) == pytest.approx(0.02) and schedule.lr_at(9 * 7330) == pytest.approx(0.002)
    assert schedule.lr_at(13 * 7330 - 1) == pytest.approx(0.0002)
    halved = schedule_for("jigsaw", global_batch_size=8, iters_per_epoch=14659)
    assert halved.base_lr == pytest.approx(0.01) and halved.warmup_iters == 2000
    with pytest.raises(ValueError, match="pass iters_per_epoch"):
        schedule_for("jigsaw", global_batch_size=16)
    with pytest.raises(ValueError, match="counts iterations: drop iters_per_epoch"):
        schedule_for("1x", global_batch_size=16, iters_per_epoch=100)
    with pytest.raises(ValueError, match="schedule '12x' is not one of"):
        schedule_for("12x", global_batch_size=16)


def test_warmup_then_steps():
    schedule = schedule_for("1x", global_batch_size=16)
    assert schedule.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert schedule.lr_at(500) == pytest.approx(0.02 * (0.001 + 0.999 * 0.5))
    assert [schedule.lr_at(s) for s in (1000, 59_999, 60_000, 80_000)] == pytest.approx([0.02, 0.02, 0.002, 0.0002])
    assert math.isclose(schedule.as_dict()["base_lr"], 0.02) and schedule.as_dict()["milestones"] == [60_000, 80_000]
