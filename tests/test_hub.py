"""Export, publishing and loading (detpretrain/hub.py), end to end against a fake Hub on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so everything that downloads runs in a
subprocess pointed at `tests/hub_server.FakeHub`; the real client does the downloading. Three subprocesses cover
the download paths: online (the user lines, then each failure), offline from the same cache, and `hf-hub:` in a
Python that never imports detpretrain. Each prints a JSON of its cases, which the tests below check one by one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml

import detpretrain
from detpretrain import hub, zoo
from detpretrain.hub import __main__ as hub_cli
from tests.hub_server import FakeHub, commit_hash

ORG = "detpretrain"
# Small rows the subprocesses add with register_entry: (tag, revision). Each is a different Hub situation.
TEST_ROWS = [("hubtest", None), ("hubwrong", None), ("hubtrunc", None), ("hubnofile", None), ("hubrev", "v2")]
TEST_ROWS += [("hubnever", None), ("hubpinned", commit_hash(f"{ORG}/resnet18.hubpinned", "main"))]


def random_backbone(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)  # non-default buffers, so a lost buffer shows
    return model


def export_files(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    r18 = hub.save_pretrained(random_backbone("resnet18"), root / "r18", arch="resnet18", tag="hubtest", license="mit")
    r10t = hub.save_pretrained(random_backbone("resnet10t"), root / "r10t", arch="resnet10t", tag="x", license="mit")
    # The user line of the issue, on the real zoo name: the card defaults come from the resnet50.jigsaw row.
    r50 = hub.save_pretrained(random_backbone("resnet50", seed=1), root / "r50", arch="resnet50", tag="jigsaw")
    return {"r18": r18, "r10t": r10t, "r50": r50}


@pytest.fixture(scope="module")
def fake_hub(exports):
    r18 = export_files(exports["r18"])
    truncated = dict(r18, **{hub.WEIGHTS_NAME: r18[hub.WEIGHTS_NAME][: len(r18[hub.WEIGHTS_NAME]) // 2]})
    repos = {
        f"{ORG}/resnet18.hubtest": {"main": r18},
        f"{ORG}/resnet18.hubnever": {"main": r18},
        f"{ORG}/resnet18.hubwrong": {"main": export_files(exports["r10t"])},  # weights of another architecture
        f"{ORG}/resnet18.hubtrunc": {"main": truncated},
        f"{ORG}/resnet18.hubnofile": {"main": {"config.json": r18["config.json"]}},
        f"{ORG}/resnet18.hubrev": {"main": r18},  # the row pins revision v2, which does not exist
        f"{ORG}/resnet18.hubpinned": {"main": r18, "later": truncated},  # the row pins main's commit
        f"{ORG}/resnet50.jigsaw": {"main": export_files(exports["r50"])},
    }
    with FakeHub(repos) as server:
        yield server


def run_python(code: str, fake_hub: FakeHub, cache: Path, *, offline: bool = False) -> dict:
    env = dict(
        os.environ,
        HF_ENDPOINT=fake_hub.endpoint,
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        DETPRETRAIN_HUB_ORG=ORG,
    )
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULTS "))


# Run in the subprocess: add the test rows, then record each case's value or error as JSON.
PREAMBLE = """
import json, sys
import safetensors.torch, timm, torch
import detpretrain
HOOKED_BY_IMPORT = getattr(timm.models._builder.load_pretrained, "_detpretrain_hook", False)
from detpretrain import hub
from detpretrain.zoo import ZooEntry, register_entry
hub.install_timm_load_hook()
for tag, revision in TEST_ROWS:
    register_entry(ZooEntry(arch="resnet18", tag=tag, method="Jigsaw", recipe="train_jigsaw.py", data="test",
                            license="mit", paper="test", revision=revision))
results = {"hooked_by_import": {"ok": True, "value": HOOKED_BY_IMPORT}}

def case(fn):
    try:
        results[fn.__name__] = {"ok": True, "value": fn()}
    except Exception as err:
        results[fn.__name__] = {"ok": False, "type": type(err).__name__, "message": str(err)}

def same_as_export(state_dict, path):
    ref = safetensors.torch.load_file(path)
    return sorted(state_dict) == sorted(ref) and all(torch.equal(state_dict[k], ref[k]) for k in ref)
"""

ONLINE = """
@case
def zoo_tag():
    model = timm.create_model("resnet18.hubtest", pretrained=True)
    return {"same": same_as_export(model.state_dict(), R18), "num_classes": model.num_classes}

@case
def real_name_features_only():
    f = timm.create_model("resnet50.jigsaw", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
    return {"same": same_as_export(f.state_dict(), R50), "channels": f.feature_info.channels()}

@case
def classifier_requested():
    model = timm.create_model("resnet18.hubtest", pretrained=True, num_classes=10)
    sd = model.state_dict()
    ref = safetensors.torch.load_file(R18)
    return {"backbone_same": all(torch.equal(sd[k], v) for k, v in ref.items()), "fc": list(sd["fc.weight"].shape)}

@case
def zoo_state_dict_pinned():
    state_dict = hub.load_zoo_state_dict(detpretrain.get_entry("resnet18.hubpinned"))
    return same_as_export(state_dict, R18)

@case
def not_published():
    with torch.device("meta"):  # the real 350 MB row: nothing is allocated, the Hub is asked all the same
        timm.create_model("resnext101_32x8d.predet", pretrained=True)

@case
def file_not_found():
    timm.create_model("resnet18.hubnofile", pretrained=True)

@case
def revision_not_found():
    timm.create_model("resnet18.hubrev", pretrained=True)

@case
def truncated():
    timm.create_model("resnet18.hubtrunc", pretrained=True)

@case
def wrong_arch():
    timm.create_model("resnet18.hubwrong", pretrained=True)

@case
def wrong_arch_loads_nothing():
    model = timm.create_model("resnet18.hubwrong", pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        timm.models._builder.load_pretrained(model)  # the call create_model makes, on a model we keep
    except hub.IncompatibleWeightsError:
        return all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return "loaded"

@case
def timm_tag_passes_through():
    timm.create_model("resnet18.a1_in1k", pretrained=True)  # timm's own tag: timm's own path and errors
"""

OFFLINE = """
@case
def second_load():
    model = timm.create_model("resnet18.hubtest", pretrained=True)
    return same_as_export(model.state_dict(), R18)

@case
def offline_not_cached():
    timm.create_model("resnet18.hubnever", pretrained=True)
"""

# Plain timm, as a user without detpretrain installed would run it.
HF_HUB_ONLY = """
import json, sys
import safetensors.torch, timm, torch
results = {}
model = timm.create_model("hf-hub:REPO", pretrained=True)
features = timm.create_model("hf-hub:REPO", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
ref = safetensors.torch.load_file(R18)
results["same"] = all(torch.equal(model.state_dict()[k], v) for k, v in ref.items()) and len(ref) == len(
    model.state_dict())
results["features_same"] = all(torch.equal(features.state_dict()[k], v) for k, v in ref.items())
results["num_classes"] = model.num_classes
results["tag"] = model.pretrained_cfg["tag"]
results["detpretrain_imported"] = "detpretrain" in sys.modules
print("RESULTS " + json.dumps(results))
"""


def scenario(body: str, exports) -> str:
    paths = f"R18 = {str(exports['r18'] / hub.WEIGHTS_NAME)!r}\nR50 = {str(exports['r50'] / hub.WEIGHTS_NAME)!r}\n"
    return f"TEST_ROWS = {TEST_ROWS!r}\n{paths}{PREAMBLE}{body}\nprint('RESULTS ' + json.dumps(results))\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_cache")


@pytest.fixture(scope="module")
def online(fake_hub, exports, cache):
    start = len(fake_hub.requests)
    results = run_python(scenario(ONLINE, exports), fake_hub, cache)
    return results, fake_hub.requests[start:]


@pytest.fixture(scope="module")
def offline(online, fake_hub, exports, cache):
    start = len(fake_hub.requests)
    results = run_python(scenario(OFFLINE, exports), fake_hub, cache, offline=True)
    return results, fake_hub.requests[start:]


def error_of(results: dict, name: str) -> tuple[str, str]:
    result = results[name]
    assert not result["ok"], f"{name} did not fail: {result}"
    return result["type"], result["message"]


# ------------------------------------------------------------------------------------------------ the user lines
def test_zoo_tag_loads_the_export_bit_identical(online, fake_hub):
    results, requests = online
    assert results["zoo_tag"] == {"ok": True, "value": {"same": True, "num_classes": 0}}
    assert ("GET", f"/{ORG}/resnet18.hubtest/resolve/main/model.safetensors") in requests
    assert not fake_hub.unhandled  # the client asked for nothing the fake Hub does not serve


def test_real_zoo_name_features_only_with_out_indices(online):
    value = online[0]["real_name_features_only"]
    assert value == {"ok": True, "value": {"same": True, "channels": [256, 512, 1024, 2048]}}


def test_a_requested_classifier_stays_at_init_and_the_backbone_loads(online):
    assert online[0]["classifier_requested"] == {"ok": True, "value": {"backbone_same": True, "fc": [10, 512]}}


def test_load_zoo_state_dict_downloads_the_pinned_commit(online):
    assert online[0]["zoo_state_dict_pinned"] == {"ok": True, "value": True}
    commit = commit_hash(f"{ORG}/resnet18.hubpinned", "main")
    assert ("GET", f"/{ORG}/resnet18.hubpinned/resolve/{commit}/model.safetensors") in online[1]


def test_hf_hub_name_loads_without_detpretrain(fake_hub, exports, tmp_path):
    code = f"R18 = {str(exports['r18'] / hub.WEIGHTS_NAME)!r}\n" + HF_HUB_ONLY.replace(
        "REPO", f"{ORG}/resnet18.hubtest"
    )
    start = len(fake_hub.requests)
    results = run_python(code, fake_hub, tmp_path / "fresh_cache")
    assert results == {
        "same": True,
        "features_same": True,
        "num_classes": 0,
        "tag": "hubtest",
        "detpretrain_imported": False,
    }
    files = {path.rsplit("/", 1)[1] for _, path in fake_hub.requests[start:]}
    assert files == {"config.json", "model.safetensors"}  # safetensors only: no pytorch_model.bin was asked for


def test_second_load_works_offline_from_the_cache(offline):
    results, requests = offline
    assert results["second_load"] == {"ok": True, "value": True}
    assert requests == []  # HF_HUB_OFFLINE=1: the Hub saw nothing


def test_import_detpretrain_installs_the_hook(online):
    assert online[0]["hooked_by_import"]["value"] is True, "detpretrain/__init__.py must call install_timm_load_hook()"


# ---------------------------------------------------------------------------------------------------- failures
def test_not_published_names_the_recipe_and_the_local_export(online):
    kind, message = error_of(online[0], "not_published")
    assert kind == "WeightsNotPublishedError"
    assert "resnext101_32x8d.predet: no weights on the Hub yet" in message
    assert "python train_predet.py --model resnext101_32x8d" in message
    assert 'pretrained_cfg_overlay=dict(file="OUT/export/model.safetensors")' in message
    # Found out from the Hub, not from a local flag.
    assert ("HEAD", f"/{ORG}/resnext101_32x8d.predet/resolve/main/model.safetensors") in online[1]


def test_file_not_found(online):
    kind, message = error_of(online[0], "file_not_found")
    assert kind == "WeightsNotFoundError"
    assert f"{ORG}/resnet18.hubnofile has no model.safetensors at revision main" in message


def test_revision_not_found(online):
    kind, message = error_of(online[0], "revision_not_found")
    assert kind == "WeightsNotFoundError" and f"{ORG}/resnet18.hubrev has no revision 'v2'" in message


def test_truncated_file_names_the_cached_path(online, cache):
    kind, message = error_of(online[0], "truncated")
    assert kind == "CorruptWeightsError"
    assert str(cache) in message and "model.safetensors is not a readable safetensors file" in message
    assert "delete it and load again" in message


def test_weights_of_another_arch_list_the_keys_and_load_nothing(online):
    kind, message = error_of(online[0], "wrong_arch")
    assert kind == "IncompatibleWeightsError"
    assert f"{ORG}/resnet18.hubwrong/model.safetensors does not fit resnet18" in message
    assert "64 missing: conv1.weight, layer1.1.bn1.bias" in message and "28 unexpected: conv1.0.weight" in message
    assert "3 with other shapes: layer2.0.downsample.1.weight (128, 64, 1, 1) vs (128,)" in message
    assert "Nothing was loaded." in message
    assert online[0]["wrong_arch_loads_nothing"] == {"ok": True, "value": True}


def test_offline_without_cache(offline):
    kind, message = error_of(offline[0], "offline_not_cached")
    assert kind == "OfflineCacheMissError"
    assert f"HF_HUB_OFFLINE=1 and {ORG}/resnet18.hubnever/model.safetensors is not in the cache" in message


def test_timm_own_tags_pass_through_untouched(online):
    kind, _ = error_of(online[0], "timm_tag_passes_through")
    assert kind == "RepositoryNotFoundError"  # huggingface_hub's own error, raised through timm's own loader


# -------------------------------------------------------------------------------------------------------- export
def test_export_keys_are_timms_without_classifier_from_any_wrapper(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=7)  # a classifier to drop
    features = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    ddp_state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    with torch.device("meta"):
        expected = set(timm.create_model("resnet18", num_classes=0).state_dict())
    for i, source in enumerate((model, features, ddp_state_dict)):
        out = hub.save_pretrained(source, tmp_path / str(i), arch="resnet18", tag="x", license="mit")
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        saved = safetensors.torch.load_file(out / "model.safetensors")
        assert set(saved) == expected
        assert all(torch.equal(saved[k], model.state_dict()[k]) for k in expected)


def test_export_of_the_wrong_arch_lists_keys_and_writes_nothing(tmp_path):
    with pytest.raises(hub.IncompatibleWeightsError, match=r"as resnet34 .*missing: layer1\.2\.bn1\.bias.*written\.$"):
        hub.save_pretrained(random_backbone("resnet18"), tmp_path / "out", arch="resnet34", tag="x", license="mit")
    assert not (tmp_path / "out").exists()


def test_export_config_is_timms_hub_format(exports):
    config = json.loads((exports["r50"] / "config.json").read_text())
    assert config["architecture"] == "resnet50" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["tag"] == "jigsaw" and config["pretrained_cfg"]["num_classes"] == 0
    assert "hf_hub_id" not in config["pretrained_cfg"]  # timm strips the source; the Hub repo is the source
    model = timm.create_model(f"local-dir:{exports['r50']}", pretrained=True)  # plain timm reads the folder
    assert model.num_classes == 0 and model.pretrained_cfg["tag"] == "jigsaw"


def test_extra_state_dicts_are_written_beside(tmp_path):
    fpn = {"inner.weight": torch.randn(4, 4)}
    out = hub.save_pretrained(
        random_backbone("resnet18"), tmp_path, arch="resnet18", tag="x", license="mit", extra_state_dicts={"fpn": fpn}
    )
    assert torch.equal(safetensors.torch.load_file(out / "fpn.safetensors")["inner.weight"], fpn["inner.weight"])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_outside_the_zoo_a_license_is_required(tmp_path):
    with pytest.raises(ValueError, match="resnet18.mine is not a zoo row: pass license="):
        hub.save_pretrained(random_backbone("resnet18"), tmp_path, arch="resnet18", tag="mine")


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_of_a_zoo_row(exports):
    entry = zoo.get_entry("resnet50.jigsaw")
    card = (exports["r50"] / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == entry.license and meta["library_name"] == "timm"
    assert "detection-datasets/coco" in meta["datasets"]
    [index] = meta["model-index"]
    assert index["name"] == "resnet50.jigsaw"
    fpn_box_ap = [
        r
        for r in index["results"]
        if r["dataset"]["type"] == "coco"
        and any(m["name"].startswith("AP_box, Faster R-CNN + FPN 1x") for m in r["metrics"])
    ]
    assert fpn_box_ap and 36.5 in [m["value"] for r in fpn_box_ap for m in r["metrics"]]  # montage_jigsaw.txt Tab. 3
    for section in ("## Method", "## Data", "## Paper", "## Detection results", "## How to load", "## License"):
        assert section in card
    assert entry.paper in card and entry.data in card
    assert f'timm.create_model("hf-hub:{entry.hub_repo}", pretrained=True)' in card
    assert "pretrained_cfg_overlay=dict(file=" in card and "not a measurement of this file" in card


def test_card_fields_override_the_row_and_fill_the_recipe_table():
    entry = zoo.get_entry("resnet50.jigsaw")
    card = hub.model_card(
        arch="resnet50", tag="jigsaw", entry=entry, data="my own 5k images", template="2S+1T+1W", erf_threshold=0.7
    )
    assert "my own 5k images" in card and entry.data not in card
    assert "| template | 2S+1T+1W |" in card and "| erf_threshold | 0.7 |" in card


# ------------------------------------------------------------------------------------------------ local loading
def test_local_export_loads_with_pretrained_cfg_overlay(exports, monkeypatch):
    hub.install_timm_load_hook()
    entry = zoo.ZooEntry("resnet18", "local", "Jigsaw", "train_jigsaw.py", "test", "mit", "test")
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    file = str(exports["r18"] / "model.safetensors")
    ref = safetensors.torch.load_file(file)
    zoo_model = timm.create_model(
        "resnet18",
        pretrained=True,
        pretrained_cfg=detpretrain.pretrained_cfg(entry.name),
        pretrained_cfg_overlay=dict(file=file),
    )
    plain = timm.create_model("resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=file))
    for model in (zoo_model, plain):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


def test_local_pth_loads_with_weights_only(exports, tmp_path):
    ref = safetensors.torch.load_file(exports["r18"] / "model.safetensors")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in ref.items()}, "epoch": 3}, path)  # a DDP training checkpoint
    model = hub.load_weights(timm.create_model("resnet18", num_classes=0), path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


class _Payload:
    """Unpickling this would create a file: a stand-in for code execution from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pth_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    with pytest.raises(hub.CorruptWeightsError, match="holds objects other than tensors"):
        hub.load_weights(timm.create_model("resnet18", num_classes=0), path)
    assert not marker.exists()


def test_a_mismatched_file_leaves_the_model_exactly_as_it_was(exports, tmp_path):
    state_dict = safetensors.torch.load_file(exports["r18"] / "model.safetensors")
    state_dict.pop("layer4.1.bn2.bias")
    state_dict["layer4.1.bn2.weight"] = state_dict["layer4.1.bn2.weight"][:10]
    state_dict["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state_dict, path)
    model = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # torch's own strict load would have copied every other tensor before raising.
    with pytest.raises(hub.IncompatibleWeightsError) as info:
        hub.load_weights(model, path)
    message = str(info.value)
    assert "1 missing: layer4.1.bn2.bias" in message and "1 unexpected: extra.weight" in message
    assert "layer4.1.bn2.weight (10,) vs (512,)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_local_paths_say_what_to_pass(tmp_path):
    with pytest.raises(hub.WeightsNotFoundError, match="has no model.safetensors"):
        hub.read_weights(tmp_path)
    with pytest.raises(hub.WeightsNotFoundError, match="does not exist"):
        hub.read_weights(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------------------- the hook
def test_hook_install_is_idempotent_and_guarded(monkeypatch):
    from timm.models import _builder

    hub.install_timm_load_hook()
    installed = _builder.load_pretrained
    hub.install_timm_load_hook()
    assert _builder.load_pretrained is installed and installed._detpretrain_hook
    monkeypatch.setattr(_builder, "load_pretrained", lambda model, cfg: None)
    with pytest.raises(hub.TimmHookError, match=r"pretrained_cfg=detpretrain.pretrained_cfg\('arch.tag'\)"):
        hub.install_timm_load_hook()


def test_package_exports_the_hub_api():
    assert detpretrain.save_pretrained is hub.save_pretrained, "detpretrain/__init__.py must export save_pretrained"


# --------------------------------------------------------------------------------------------------------- push
class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls push makes."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return type("CommitInfo", (), {"oid": "a" * 40})()


def test_push_validates_then_creates_and_uploads(exports, monkeypatch, capsys):
    RecordingApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    args = hub_cli.get_args_parser().parse_args(
        ["push", str(exports["r18"]), "--repo", "me/resnet18.hubtest", "--revision", "v1", "--private"]
    )
    hub_cli.main(args)
    assert [c[0] for c in RecordingApi.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert RecordingApi.calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    upload = RecordingApi.calls[2][2]
    assert upload["folder_path"] == str(exports["r18"]) and upload["revision"] == "v1"
    assert f'revision="{"a" * 40}"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "README.md").unlink(), "lacks README.md"),
        (lambda d: (d / "pytorch_model.bin").write_bytes(b"x"), r"pickled files \(pytorch_model.bin\)"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x08"), "not a readable safetensors file"),
    ],
)
def test_push_refuses_a_broken_export_before_any_call(exports, tmp_path, monkeypatch, damage, match):
    RecordingApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    out = tmp_path / "export"
    out.mkdir()
    for name, data in export_files(exports["r18"]).items():
        (out / name).write_bytes(data)
    damage(out)
    with pytest.raises((hub.HubWeightsError, ValueError), match=match):
        hub.push_to_hub(out, "me/x")
    assert RecordingApi.calls == []
