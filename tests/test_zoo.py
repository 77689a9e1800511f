"""The zoo table and its registration as timm pretrained tags."""

import json
import re
import subprocess
import sys

import pytest
import timm
import torch

import detpretrain
from detpretrain import zoo
from tests.conftest import REPO_ROOT, shared_path

PREDET_ARCHS = ["resnet50", "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext101_32x16d"]
PREDET_ARCHS += ["regnety_640"]
JIGSAW_ARCHS = ["resnet50", "resnet101", "resnext101_32x4d"]
EXPECTED = [f"{a}.{tag}" for tag in ("predet", "predet_in1k") for a in PREDET_ARCHS]
EXPECTED += [f"{a}.jigsaw" for a in JIGSAW_ARCHS]


def test_the_zoo_has_exactly_the_rows_of_the_issue():
    assert zoo.markdown_table().count("\n| `") == len(EXPECTED)
    assert set(EXPECTED) <= set(zoo.ZOO)
    for name in EXPECTED:
        entry = zoo.ZOO[name]
        assert entry.hub_repo == f"{zoo.HUB_ORG}/{name}"
        assert entry.recipe == ("train_jigsaw.py" if entry.tag == "jigsaw" else "train_predet.py")
        assert entry.recipe in entry.recipe_command and entry.arch in entry.recipe_command


def test_every_row_is_a_timm_pretrained_tag():
    listed = set(timm.list_pretrained("*.predet")) | set(timm.list_pretrained("*.predet_in1k"))
    listed |= set(timm.list_pretrained("*.jigsaw"))
    assert listed == set(EXPECTED)
    for name in EXPECTED:
        cfg = timm.models.get_pretrained_cfg(name)
        entry = zoo.ZOO[name]
        assert (cfg.hf_hub_id, cfg.hf_hub_filename, cfg.tag, cfg.num_classes) == (
            entry.hf_hub_id,
            "model.safetensors",
            entry.tag,
            0,
        )
        assert cfg.url is None and cfg.file is None  # the Hub, in safetensors, is the only source


def test_timm_default_tags_are_unchanged():
    """The default tag of every zoo architecture is the one timm picks without detpretrain."""
    archs = sorted({zoo.ZOO[n].arch for n in EXPECTED})
    code = f"import json, timm; print(json.dumps({{a: timm.models.get_pretrained_cfg(a).tag for a in {archs!r}}}))"
    plain = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert "detpretrain" not in plain
    assert {a: timm.models.get_pretrained_cfg(a).tag for a in archs} == plain
    assert all(tag not in ("predet", "predet_in1k", "jigsaw") for tag in plain.values())


def test_create_model_by_tag_builds_a_backbone_only_model():
    model = timm.create_model("resnet50.jigsaw", pretrained=False)
    assert model.num_classes == 0 and model.pretrained_cfg["tag"] == "jigsaw"
    assert model.pretrained_cfg["hf_hub_id"] == zoo.ZOO["resnet50.jigsaw"].hf_hub_id


def test_public_fallback_needs_no_registration():
    cfg = detpretrain.pretrained_cfg("resnext101_32x8d.predet")
    json.dumps(cfg)  # plain data, usable in a config file
    with torch.device("meta"):
        model = timm.create_model("resnext101_32x8d", pretrained=False, pretrained_cfg=cfg)
    assert model.pretrained_cfg["hf_hub_id"] == "detpretrain/resnext101_32x8d.predet"
    assert model.num_classes == 0


def test_unknown_name_lists_the_zoo():
    with pytest.raises(KeyError, match="resnet50.jigsaw"):
        zoo.get_entry("resnet50.moco")


def test_register_entry_adds_a_user_row():
    entry = zoo.ZooEntry(
        arch="resnet18", tag="mydet", method="Jigsaw", recipe="train_jigsaw.py", data="mine", license="mit", paper="-"
    )
    zoo.register_entry(entry)
    try:
        assert "resnet18.mydet" in timm.list_pretrained("resnet18.*")
        assert timm.models.get_pretrained_cfg("resnet18").tag != "mydet"
    finally:
        del zoo.ZOO["resnet18.mydet"]


def test_timm_registry_layout_is_what_the_zoo_writes():
    """Fails when a timm upgrade changes the private tables; the error then names the public fallback."""
    from timm.models import _registry
    from timm.models._pretrained import DefaultCfg, PretrainedCfg

    assert isinstance(_registry._model_pretrained_cfgs, dict)
    assert isinstance(_registry._model_has_pretrained, set)
    assert isinstance(_registry._model_default_cfgs["resnet50"], DefaultCfg)
    assert isinstance(_registry._model_pretrained_cfgs["resnet50.jigsaw"], PretrainedCfg)
    assert "resnet50.jigsaw" in _registry._model_with_tags["resnet50"]


def test_changed_timm_layout_gives_a_clear_error(monkeypatch):
    from timm.models import _registry

    monkeypatch.delattr(_registry, "_model_with_tags")
    with pytest.raises(zoo.TimmRegistryError, match=r"pretrained_cfg=detpretrain\.pretrained_cfg"):
        zoo.register_with_timm()


@pytest.mark.parametrize("arch", sorted({zoo.ZOO[n].arch for n in EXPECTED}))
def test_every_zoo_arch_is_a_detection_backbone(arch):
    """features_only gives strides 4..32 with the channels FPN needs, checked by a forward on the meta device."""
    with torch.device("meta"):  # no real weights: regnety_640 and the 101-layer ResNeXts would take seconds each
        model = timm.create_model(
            f"{arch}.{'jigsaw' if arch == 'resnet101' else 'predet'}", features_only=True, out_indices=(1, 2, 3, 4)
        )
        features = model(torch.empty(1, 3, 256, 320))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[1] for f in features] == model.feature_info.channels()
    assert [tuple(f.shape[2:]) for f in features] == [(256 // r, 320 // r) for r in (4, 8, 16, 32)]
    expected = {"regnety_640": [328, 984, 1968, 4920]}.get(arch, [256, 512, 1024, 2048])
    assert model.feature_info.channels() == expected


def _number_forms(value: float) -> set[str]:
    return {f"{value:.1f}", f"{value:g}"}


def test_paper_numbers_appear_in_the_cited_paper():
    """Every number in the table is printed in the paper it cites (catches a typo in the table)."""
    papers = {name: shared_path("papers", f"{name}.txt").read_text() for name in ("predet", "montage_jigsaw")}
    for entry in zoo.ZOO.values():
        for result in entry.results:
            text = papers[result.source.split(".txt")[0]]
            for key, value in result.metrics.items():
                numbers = set(re.findall(r"\d+(?:\.\d+)?", text))
                assert _number_forms(value) & numbers, f"{entry.name} {key}={value} not in {result.source}"


def test_readme_zoo_table_is_the_package_table():
    readme = (REPO_ROOT / "README.md").read_text()
    assert zoo.README_START in readme and zoo.README_END in readme, "README.md lost its zoo-table markers"
    table = readme.split(zoo.README_START, 1)[1].split(zoo.README_END, 1)[0]
    assert table.strip() == zoo.markdown_table(), (
        "README's zoo table is stale: python -c \"from detpretrain import zoo; zoo.write_readme_table('README.md')\""
    )
