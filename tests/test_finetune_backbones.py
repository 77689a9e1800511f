"""finetune.py on any timm backbone: the detector reads the stride 4..32 levels of each family's feature_info, the
protocols freeze its stem and first stages, exports of any family load strictly, and a model without those levels
is refused in one line.

Expected levels are written by hand from timm's feature_info (timm 1.0): ResNet and RegNet expose a stride-2 stem
level first (index 0), ConvNeXt starts at stride 4, EfficientNet and MobileNet list several blocks per stride and the
deepest one of each stride is taken. Runs are tiny (96-128 px, 2 steps, 2 evaluation images, the embedded default
dataset): they check the wiring, not the AP.
"""

import json

import pytest
import timm
import torch
from torch import nn

import detpretrain
import finetune
from detpretrain.backbone import BackboneError, choose_levels, create_body
from detpretrain.detection import PROTOCOLS, build_detector, override_protocol

TINY = ["--device", "cpu", "--num-workers", "0", "--quiet", "--log-every", "1", "--val-subset", "2"]
TINY += ["--protocol-set", "precise_bn_iters=1", "--min-size", "96", "--max-size", "128", "--batch-size", "2"]
TINY += ["--detections-per-img", "10", "--iters", "2"]
CHEAP = {  # torchvision's defaults sample 512 ROIs per image and keep 1000 proposals: most of a step at 96 px
    "rcnn": ["--detector-set", "box_batch_size_per_image=32", "rpn_pre_nms_top_n_train=200"]
    + ["rpn_post_nms_top_n_train=50", "rpn_pre_nms_top_n_test=100", "rpn_post_nms_top_n_test=50"],
    "retinanet": ["--detector-set", "topk_candidates=100"],
}

# family, timm name: the levels at strides 4, 8, 16, 32 (feature indices, channels, modules in the timm model)
FPN_LEVELS = {
    "resnet18": ((1, 2, 3, 4), (64, 128, 256, 512), ("layer1", "layer2", "layer3", "layer4")),
    "regnetx_002": ((1, 2, 3, 4), (24, 56, 152, 368), ("s1", "s2", "s3", "s4")),
    "convnext_atto": ((0, 1, 2, 3), (40, 80, 160, 320), ("stages.0", "stages.1", "stages.2", "stages.3")),
    "efficientnet_b0": ((1, 2, 3, 4), (24, 40, 112, 320), ("blocks.1", "blocks.2", "blocks.4", "blocks.6")),
    "mobilenetv3_small_050": ((1, 2, 3, 4), (8, 16, 24, 288), ("blocks.0", "blocks.1", "blocks.3", "blocks.5")),
}


def run(output_dir, *extra: str):
    args = finetune.get_args_parser().parse_args([*TINY, "--output-dir", str(output_dir), *extra])
    return finetune.main(args)


def cheap(arch: str) -> list[str]:
    return CHEAP["retinanet" if arch == "retinanet" else "rcnn"]


def _random_export(path, arch: str):
    torch.manual_seed(0)
    model = timm.create_model(arch)
    with torch.no_grad():  # no constant-initialized tensor (LayerNorm, layer scale), so a skipped load shows
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.rand_like(tensor))
    return model, detpretrain.save_pretrained(model, path, arch=arch, tag="test", license="apache-2.0")


@pytest.fixture(scope="module")
def convnext_export(tmp_path_factory):
    return _random_export(tmp_path_factory.mktemp("convnext") / "export", "convnext_atto")


# ------------------------------------------------------------------------------------------------------ levels


@pytest.mark.parametrize("name", sorted(FPN_LEVELS))
def test_each_family_gives_its_stride_4_to_32_levels(name):
    indices, channels, modules = FPN_LEVELS[name]
    assert choose_levels(name) == indices
    body = create_body(name)
    assert tuple(body.feature_info.out_indices) == indices
    assert body.feature_info.reduction() == [4, 8, 16, 32]
    assert tuple(body.feature_info.channels()) == channels
    assert tuple(body.feature_info.module_name()) == modules
    maps = body(torch.rand(1, 3, 64, 96))
    expected = [(c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32), strict=True)]
    assert [tuple(m.shape[1:]) for m in maps] == expected


# family, arch (each non-ResNet family on another arch), and the levels that arch reads
RUNS = [
    ("resnet18", "fasterrcnn", [1, 2, 3, 4], [4, 8, 16, 32], [64, 128, 256, 512]),
    ("regnetx_002", "fasterrcnn", [1, 2, 3, 4], [4, 8, 16, 32], [24, 56, 152, 368]),
    ("efficientnet_b0", "retinanet", [2, 3, 4], [8, 16, 32], [40, 112, 320]),
    ("mobilenetv3_small_050", "fasterrcnn_c4", [3, 4], [16, 32], [24, 288]),
]


@pytest.mark.parametrize(("name", "arch", "indices", "strides", "channels"), RUNS)
def test_finetune_runs_on_each_family_and_records_its_levels(tmp_path, name, arch, indices, strides, channels):
    eval_path = run(tmp_path, "--backbone", name, "--no-pretrained", "--arch", arch, *cheap(arch))
    result = json.loads(eval_path.read_text())
    assert 0 <= result["bbox"]["AP"] <= 1 and result["iter"] == 2
    body = result["model"]["body"]
    assert {k: body["levels"][k] for k in ("indices", "strides", "channels")} == {
        "indices": indices,
        "strides": strides,
        "channels": channels,
    }
    assert [stage["name"] for stage in body["stages"]] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert [stage["stride"] for stage in body["stages"]] == [None, 4, 8, 16, 32]
    assert not any(stage["frozen"] for stage in body["stages"])  # predet: nothing frozen
    assert all("BatchNorm" in kind for kind in body["norm_layers"]), body["norm_layers"]
    if arch == "fasterrcnn_c4":  # MobileNet's stride-32 stage is two block groups: both become the ROI head
        assert body["stages"][-1]["modules"] == ["blocks.4", "blocks.5"]
        assert result["model"]["loaded"]["res5_head"]["from_body"] == ["blocks.4", "blocks.5"]


# ---------------------------------------------------------------------------- ConvNeXt: an export, LayerNorm, C4


@pytest.mark.parametrize("arch", ["fasterrcnn", "fasterrcnn_c4"])
def test_convnext_export_fine_tunes_with_its_weights_loaded_strictly(tmp_path, convnext_export, arch):
    full, export = convnext_export
    flags = ["--backbone", "convnext_atto", "--backbone-weights", str(export), "--arch", arch, *cheap(arch)]
    eval_path = run(tmp_path, *flags)
    result = json.loads(eval_path.read_text())
    model = result["model"]
    assert model["loaded"]["backbone"] == {"from": "export", "weights": str(export), "architecture": "convnext_atto"}
    levels = {"fasterrcnn": ([0, 1, 2, 3], [4, 8, 16, 32], [40, 80, 160, 320]), "fasterrcnn_c4": ([2, 3], [16, 32])}
    assert model["body"]["levels"]["indices"] == levels[arch][0]
    assert model["body"]["levels"]["strides"] == levels[arch][1]
    assert model["body"]["norm_layers"] == {"LayerNorm2d": 16}  # stem 1, downsamples 3, blocks 2 + 2 + 6 + 2
    assert model["body"]["norm"] == "norm='bn' acts on BatchNorm only; left as they are: LayerNorm2d"

    # The same build, before training: every backbone tensor is the export's (and C4's ROI head is its stages.3).
    detector, _ = build_detector(
        arch, backbone="convnext_atto", num_classes=9, protocol=PROTOCOLS["predet"], backbone_weights=export
    )
    exported = full.state_dict()
    body = detector.backbone.body.state_dict()
    for key, value in body.items():
        assert torch.equal(value, exported[key.replace("stem_", "stem.").replace("stages_", "stages.")]), key
    if arch == "fasterrcnn_c4":
        assert len(body) == len([k for k in exported if k.startswith(("stem.", "stages.0.", "stages.1.", "stages.2."))])
        for key, value in detector.roi_heads.box_head.res5.state_dict().items():
            assert torch.equal(value, exported[f"stages.3.{key}"]), key
    else:
        assert len(body) == len([k for k in exported if k.startswith(("stem.", "stages."))])


def test_a_wrong_architecture_export_is_refused_in_one_line(tmp_path, convnext_export):
    _, export = convnext_export
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--backbone", "resnet18", "--backbone-weights", str(export), "--arch", "fasterrcnn")
    message = str(info.value)
    assert message == (
        f"--backbone resnet18: {export} holds convnext_atto weights, not resnet18: pass backbone='convnext_atto'"
    )


def test_group_norm_replaces_batch_norm_only_and_is_refused_without_any():
    model, record = build_detector(
        "fasterrcnn",
        backbone="efficientnet_b0",
        num_classes=3,
        protocol=PROTOCOLS["predet"],
        pretrained=False,
        norm="gn",
    )
    assert record["body"]["norm_layers"] == {"GroupNormAct": 48}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())
    with pytest.raises(BackboneError) as info:
        build_detector(
            "fasterrcnn",
            backbone="convnext_atto",
            num_classes=3,
            protocol=PROTOCOLS["predet"],
            pretrained=False,
            norm="gn",
        )
    assert str(info.value) == (
        "convnext_atto: norm='gn' replaces BatchNorm, and this model has none (its norm layers: {'LayerNorm2d': 16}, "
        "left as they are under every norm setting): drop norm='gn'"
    )


# ---------------------------------------------------------------------------------------------- frozen stages

FROZEN = [  # family, frozen_stages: the body's modules that must be frozen, and those that must train
    ("convnext_atto", 3, ["stem_0", "stem_1", "stages_0", "stages_1"], ["stages_2", "stages_3"]),
    ("efficientnet_b0", 4, ["conv_stem", "bn1", *(f"blocks.{i}" for i in range(5))], ["blocks.5", "blocks.6"]),
    ("efficientnet_b0", 1, ["conv_stem", "bn1", "blocks.0"], [f"blocks.{i}" for i in range(1, 7)]),
]


@pytest.mark.parametrize(("name", "frozen_stages", "frozen", "trained"), FROZEN)
def test_protocols_freeze_the_stem_and_first_stages_of_any_family(name, frozen_stages, frozen, trained):
    protocol = override_protocol(PROTOCOLS["predet"], frozen_stages=frozen_stages)  # BN trained: it has parameters
    model, record = build_detector("fasterrcnn", backbone=name, num_classes=3, protocol=protocol, pretrained=False)
    params = dict(model.backbone.body.named_parameters())

    def under(prefixes):
        return [n for n in params if n.startswith(tuple(f"{p}." for p in prefixes))]

    assert len(under(frozen)) + len(under(trained)) == len(params)  # the lists name every module with parameters
    assert under(frozen) and not any(params[n].requires_grad for n in under(frozen))
    assert under(trained) and all(params[n].requires_grad for n in under(trained))
    stages = record["body"]["stages"]
    assert [stage["frozen"] for stage in stages] == [k < frozen_stages for k in range(5)]
    assert [m for stage in stages[:frozen_stages] for m in stage["modules"]] == frozen


# ---------------------------------------------------------------------------------------------------- refusals


def test_a_vit_without_strides_4_to_32_stops_finetune_with_one_line(tmp_path):
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--backbone", "vit_tiny_patch16_224", "--no-pretrained", "--arch", "fasterrcnn")
    strides = ", ".join(["16"] * 12)
    assert str(info.value) == (
        f"--backbone vit_tiny_patch16_224: its features_only levels have strides ({strides}), but the FPN "
        "(fasterrcnn) needs strides 4, 8, 16, 32 (no level at 4, 8, 32)"
    )


@pytest.mark.parametrize(
    ("name", "arch", "message"),
    [
        ("vit_tiny_patch16_224", "fasterrcnn_c4", "needs strides 16, 32 (no level at 32)"),
        ("vit_tiny_patch16_224", "retinanet", "but RetinaNet's FPN needs strides 8, 16, 32 (no level at 8, 32)"),
        ("swin_tiny_patch4_window7_224", "fasterrcnn", "its features_only maps are NHWC, but the detectors take NCHW"),
    ],
)
def test_models_without_the_levels_an_arch_reads_are_refused(name, arch, message):
    with pytest.raises(BackboneError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        build_detector(arch, backbone=name, num_classes=3, protocol=PROTOCOLS["predet"], pretrained=False)
    assert str(info.value).startswith(f"{name}: ") and "\n" not in str(info.value)
