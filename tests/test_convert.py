"""Converters from an export to torchvision, detectron2 and mmdetection key layouts (detpretrain/convert.py).

torchvision is checked by loading into torchvision's own models and comparing features with timm's; detectron2 and
mmdetection are not installable here (not on PyPI / pinned mmcv), so their layouts are checked against the key names
their code documents, rebuilt independently in this file.
"""

import pickle

import pytest
import timm
import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from detpretrain import convert, hub
from detpretrain.hub import __main__ as hub_cli


def random_backbone(arch: str, seed: int = 0) -> torch.nn.Module:
    """A timm backbone (num_classes=0) in eval mode with random BN statistics too, so a mis-mapped BN key shows."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=0).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def resnet18():
    return random_backbone("resnet18")


@pytest.fixture(scope="module")
def export_r18(tmp_path_factory, resnet18):
    out_dir = tmp_path_factory.mktemp("r18") / "export"
    return hub.save_pretrained(resnet18, out_dir, arch="resnet18", tag="unit", license="mit")


def test_torchvision_fpn_body_loads_strictly_and_gives_timm_features(resnet18, export_r18):
    converted = convert.to_torchvision(hub.read_weights(export_r18), "resnet18")
    features = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    hub.load_weights(features, export_r18)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = features(x)
        # torchvision's default detection body (FrozenBatchNorm2d) and one with plain BatchNorm2d.
        frozen = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5).eval()
        frozen.body.load_state_dict(converted)  # strict: exactly the body's keys
        plain = resnet_fpn_backbone(
            backbone_name="resnet18", weights=None, trainable_layers=5, norm_layer=torch.nn.BatchNorm2d
        ).eval()
        plain.body.load_state_dict(converted)
        frozen_out, plain_out = list(frozen.body(x).values()), list(plain.body(x).values())
    assert [t.shape[1] for t in frozen_out] == [64, 128, 256, 512]
    for a, b, c in zip(ours, frozen_out, plain_out, strict=True):
        assert torch.equal(a, c)
        # FrozenBatchNorm2d folds BN into one scale and shift: equal up to float rounding (~1e-6 of the range).
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * float(a.abs().max()))


def test_torchvision_resnet_loads_everything_but_fc_and_matches_exactly(resnet18):
    model = torchvision.models.resnet18().eval()
    result = model.load_state_dict(convert.to_torchvision(resnet18.state_dict(), "resnet18"), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        assert torch.equal(resnet18.forward_features(x), model.layer4(model.layer3(model.layer2(model.layer1(stem)))))


@pytest.mark.parametrize("arch", [a for a in convert.TORCHVISION_ARCHS if not a.startswith("regnet")])
def test_every_resnet_pair_has_torchvision_keys_and_shapes(arch):
    with torch.device("meta"):
        ours = timm.create_model(arch, num_classes=0).state_dict()
        theirs = getattr(torchvision.models, convert.TORCHVISION_ARCHS[arch])().state_dict()
    converted = convert.to_torchvision(ours, arch)
    expected = {k: v.shape for k, v in theirs.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in converted.items()} == expected


@pytest.mark.parametrize(("arch", "tv_name"), [("regnety_004", "regnet_y_400mf"), ("regnetx_004_tv", "regnet_x_400mf")])
def test_regnet_converts_to_torchvision_with_identical_features(arch, tv_name):
    model = random_backbone(arch)
    tv = getattr(torchvision.models, tv_name)().eval()
    result = tv.load_state_dict(convert.to_torchvision(model.state_dict(), arch), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), tv.trunk_output(tv.stem(x)))


def detectron2_r50_names() -> set[str]:
    """detectron2's ResNet-50 parameter names, from detectron2/modeling/backbone/resnet.py's structure.

    BasicStem: ``stem.conv1`` with its norm inside (``stem.conv1.norm``); stages ``res2``..``res5`` of
    BottleneckBlocks ``conv1..conv3`` each with ``.norm``, the first block with a ``shortcut`` conv and norm.
    FrozenBatchNorm2d holds weight, bias, running_mean, running_var (no num_batches_tracked).
    """
    norm = ("weight", "bias", "running_mean", "running_var")
    names = {"stem.conv1.weight"} | {f"stem.conv1.norm.{n}" for n in norm}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if b == 0 else [])
            for conv in convs:
                names.add(f"res{stage}.{b}.{conv}.weight")
                names |= {f"res{stage}.{b}.{conv}.norm.{n}" for n in norm}
    return names


def test_detectron2_layout_has_detectron2s_names_and_the_same_tensors():
    with torch.device("meta"):
        meta_sd = timm.create_model("resnet50", num_classes=0).state_dict()
    # Distinct values per tensor, so that a key swapped with another of the same shape would show.
    sd = {k: torch.full(v.shape, float(i)) for i, (k, v) in enumerate(meta_sd.items())}
    converted = convert.to_detectron2(sd, "resnet50")
    assert converted["matching_heuristics"] is True and "__author__" in converted
    assert set(converted["model"]) == detectron2_r50_names()

    # The renaming of detectron2's tools/convert-torchvision-to-d2.py, re-typed here as the reference.
    def d2_script(k):
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")

    for key, value in sd.items():
        if "num_batches_tracked" not in key:
            assert (converted["model"][d2_script(key)] == value.numpy()).all()


def mmdet_resnet_names(blocks: tuple[int, ...], convs: int) -> set[str]:
    """mmdet ResNet/ResNeXt state-dict names, from mmdet/models/backbones/resnet.py and resnext.py.

    Stem ``conv1`` + ``bn1`` (build_norm_layer(..., postfix=1) names a BN "bn1"); stages ``layer{i + 1}``; blocks
    ``conv{n}`` + ``bn{n}``; the first block's ``downsample`` is Sequential(conv, norm) -> ``downsample.0/1``.
    mmdet's BatchNorm2d keeps num_batches_tracked.
    """
    norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = {"conv1.weight"} | {f"bn1.{n}" for n in norm}
    for stage, count in enumerate(blocks, start=1):
        for b in range(count):
            prefix = f"layer{stage}.{b}"
            for c in range(1, convs + 1):
                names.add(f"{prefix}.conv{c}.weight")
                names |= {f"{prefix}.bn{c}.{n}" for n in norm}
            if b == 0 and (stage > 1 or convs == 3):
                names.add(f"{prefix}.downsample.0.weight")
                names |= {f"{prefix}.downsample.1.{n}" for n in norm}
    return names


@pytest.mark.parametrize(
    ("arch", "blocks", "convs"),
    [("resnet18", (2, 2, 2, 2), 2), ("resnet50", (3, 4, 6, 3), 3), ("resnext101_32x8d", (3, 4, 23, 3), 3)],
)
def test_mmdet_layout_has_mmdets_names(arch, blocks, convs):
    with torch.device("meta"):
        sd = timm.create_model(arch, num_classes=0).state_dict()
    converted = convert.to_mmdet(sd, arch)
    assert set(converted["state_dict"]) == mmdet_resnet_names(blocks, convs)
    assert converted["meta"]["mmdet_backbone"]["type"] == ("ResNeXt" if "resnext" in arch else "ResNet")


def test_cli_writes_each_format_that_loads_without_unpickling_code(export_r18, tmp_path, capsys, resnet18):
    parser = hub_cli.get_args_parser()
    for to, name in (("torchvision", "tv.pth"), ("mmdet", "mmdet.pth"), ("detectron2", "d2.pkl")):
        hub_cli.main(parser.parse_args(["convert", str(export_r18), "--to", to, "--out", str(tmp_path / name)]))
        assert "use it with:" in capsys.readouterr().out
    tv = torch.load(tmp_path / "tv.pth", weights_only=True)
    assert all(torch.equal(tv[k], v) for k, v in resnet18.state_dict().items())
    mm = torch.load(tmp_path / "mmdet.pth", weights_only=True)
    assert mm["meta"]["timm_arch"] == "resnet18" and set(mm["state_dict"]) == set(tv)
    with (tmp_path / "d2.pkl").open("rb") as f:
        d2 = pickle.load(f)  # our own file, just written
    assert "res5.1.conv2.norm.running_var" in d2["model"]


@pytest.mark.parametrize(
    ("arch", "to", "match"),
    [
        ("regnety_004", "detectron2", "no detectron2 layout for timm architecture 'regnety_004'"),
        ("regnety_004", "mmdet", "no mmdet layout"),
        ("resnet50d", "torchvision", "no torchvision layout for timm architecture 'resnet50d'"),
        ("resnet50", "onnx", "unknown conversion target 'onnx'"),
    ],
)
def test_unsupported_pairs_say_what_is_supported(arch, to, match):
    with pytest.raises(convert.UnsupportedConversionError, match=match):
        convert.convert({}, arch, to)


def test_a_state_dict_with_a_classifier_is_refused(resnet18):
    with pytest.raises(ValueError, match="classifier keys"):
        convert.to_torchvision({**resnet18.state_dict(), "fc.weight": torch.zeros(10, 512)}, "resnet18")
