"""Export a backbone as a Hugging Face Hub folder, push it, and load zoo weights with errors a user can act on.

The export folder (DESIGN.md, "Contracts") holds ``model.safetensors`` (backbone only, keys exactly timm's for the
architecture with ``num_classes=0``), ``config.json`` in timm's own Hub format (written by timm's
``save_config_for_hf``, so plain timm loads it with ``hf-hub:`` or ``local-dir:``) and ``README.md``, a model card
whose front matter carries the license, datasets and the paper's detection results as Hub metadata.

Loading: ``install_timm_load_hook()`` wraps ``timm.models._builder.load_pretrained`` so that
``timm.create_model("arch.tag", pretrained=True)`` for a zoo row downloads through ``download_weights``: each
failure (not published yet, file or revision missing, offline without a cache, corrupt file, keys that do not fit)
raises its own one-line error, and the keys and shapes are checked before any tensor is copied, so nothing is ever
half loaded. Only safetensors come from the Hub; local ``.pth`` files load with ``torch.load(weights_only=True)``.

Command line (``detpretrain/hub/__main__.py``)::

    python -m detpretrain.hub push OUT/export --repo org/resnet50.jigsaw [--revision BRANCH] [--private]
    python -m detpretrain.hub convert OUT/export --to {torchvision,detectron2,mmdet} --out FILE
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import pickle
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
from huggingface_hub import EvalResult, HfApi, ModelCardData, constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import get_pretrained_cfg
from timm.models._hub import save_config_for_hf

from detpretrain.backbone import choose_levels
from detpretrain.zoo import ZooEntry, find_entry, pretrained_cfg

__all__ = [
    "HubWeightsError",
    "WeightsNotPublishedError",
    "WeightsNotFoundError",
    "OfflineCacheMissError",
    "CorruptWeightsError",
    "IncompatibleWeightsError",
    "TimmHookError",
    "save_pretrained",
    "model_card",
    "check_keys",
    "validate_export",
    "push_to_hub",
    "read_weights",
    "load_weights",
    "download_weights",
    "load_zoo_state_dict",
    "install_timm_load_hook",
]

WEIGHTS_NAME = "model.safetensors"
EXPORT_FILES = (WEIGHTS_NAME, "config.json", "README.md")
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")
_LISTED_KEYS = 8  # keys named per category in a mismatch message; the rest are counted


# ------------------------------------------------------------------------------------------------------------ errors
class HubWeightsError(RuntimeError):
    """Weights could not be loaded or exported; the message says what to do."""


class WeightsNotPublishedError(HubWeightsError):
    """A zoo row whose Hub repo does not exist yet: its recipe has to be run first."""


class WeightsNotFoundError(HubWeightsError):
    """The repo exists but the file or revision does not, or a local path is missing."""


class OfflineCacheMissError(HubWeightsError):
    """Offline (HF_HUB_OFFLINE=1 or no connection) and the weights are not in the local cache."""


class CorruptWeightsError(HubWeightsError):
    """A weights file that cannot be read: truncated, corrupt, or not a weights-only checkpoint."""


class IncompatibleWeightsError(HubWeightsError):
    """Weights whose keys or shapes do not fit the architecture."""


class TimmHookError(RuntimeError):
    """timm's loading function no longer has the layout the hook wraps."""


# -------------------------------------------------------------------------------------------------------- key checks
@functools.cache
def _arch_layout(arch: str) -> tuple[dict[str, tuple[int, ...]], frozenset[str], dict[str, str]]:
    """For a timm architecture: backbone key shapes (``num_classes=0``), classifier keys, and flattened names.

    Built on the meta device, so even a 350 MB architecture costs no memory. The flattened names map what timm's
    feature wrappers call a module (``stages_0``, flatten_sequential) back to its name in the plain model.
    """
    if not timm.is_model(arch):
        raise ValueError(f"{arch!r} is not a timm architecture (timm {timm.__version__}); see timm.list_models()")
    with torch.device("meta"):
        backbone = timm.create_model(arch, num_classes=0)
        full = timm.create_model(arch, num_classes=2)
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    classifier = frozenset(full.state_dict()) - frozenset(shapes)
    flat = {}
    for name, module in backbone.named_children():
        if isinstance(module, torch.nn.Sequential):
            flat.update({f"{name}_{child}": f"{name}.{child}" for child, _ in module.named_children()})
    return shapes, classifier, flat


def _plain_key(key: str, arch: str) -> str:
    """The plain-model name of a key from a DDP / compiled / features_only model, or the key unchanged."""
    shapes, classifier, flat = _arch_layout(arch)
    for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
        key = key.removeprefix(prefix)
    if key in shapes or key in classifier:
        return key
    for prefix in ("model.", "body."):  # timm's FeatureGetterNet and FeatureHookNet
        if key.startswith(prefix) and key[len(prefix) :] in shapes:
            return key[len(prefix) :]
    first, _, rest = key.partition(".")
    if first in flat:  # FeatureListNet / FeatureDictNet flatten one level of Sequential
        return f"{flat[first]}.{rest}"
    return key


def _list(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED_KEYS])
    return shown + (f" and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else "")


def check_keys(
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    *,
    what: str,
    optional: frozenset[str] = frozenset(),
    ignore_shape: frozenset[str] = frozenset(),
    outcome: str = "Nothing was loaded.",
) -> None:
    """Raise ``IncompatibleWeightsError`` naming missing, unexpected and shape-mismatched keys; else nothing."""
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k} {tuple(found[k])} vs {tuple(expected[k])}"
        for k in found
        if k in expected and k not in ignore_shape and tuple(found[k]) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(keys)} {label}: {_list(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("with other shapes", mismatched))
            if keys
        ]
        raise IncompatibleWeightsError(f"{what}: {'; '.join(parts)}. {outcome}")


# ------------------------------------------------------------------------------------------------------------ export
def _state_dict_of(model_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, dict):
        return dict(model_or_state_dict)
    raise TypeError(f"save_pretrained takes a torch.nn.Module or a state dict, not {type(model_or_state_dict)}")


def _export_pretrained_cfg(arch: str, tag: str, entry: ZooEntry | None, license_id: str | None) -> dict:
    """The pretrained cfg written into config.json: the zoo row's when there is one, else the arch's own inputs."""
    if entry is not None:
        cfg = pretrained_cfg(entry.name)
    else:
        base = get_pretrained_cfg(arch)
        cfg = asdict(base) if base is not None else {}
        for key in ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "paper_ids", "paper_name"):
            cfg[key] = None
        for key in ("test_input_size", "test_crop_pct", "origin_url", "notes", "description"):
            cfg.pop(key, None)
    cfg.update(architecture=arch, tag=tag, num_classes=0, label_names=None, label_descriptions=None)
    if license_id is not None:
        cfg["license"] = license_id
    return cfg


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_safetensors(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def save_pretrained(
    model_or_state_dict,
    out_dir: str | Path,
    *,
    arch: str,
    tag: str,
    extra_state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
    **card_fields,
) -> Path:
    """Write the export folder for ``arch.tag``: model.safetensors, config.json, README.md (the model card).

    ``model_or_state_dict``: a timm model (with or without classifier), a features_only model, a DDP-wrapped
    or compiled model, or a state dict. Classifier keys are dropped; the rest must be exactly timm's keys and
    shapes for ``arch`` with ``num_classes=0``, or nothing is written. ``extra_state_dicts={"fpn": sd}`` adds
    ``fpn.safetensors`` beside it. ``card_fields`` override the zoo row's card defaults (method, data, license,
    paper, results, datasets, tags); every other field is a recipe choice listed in the card's table.
    Returns the folder.
    """
    shapes, classifier, _ = _arch_layout(arch)
    entry = find_entry(f"{arch}.{tag}")
    if entry is None and "license" not in card_fields:
        raise ValueError(f"{arch}.{tag} is not a zoo row: pass license=... (a Hub license id such as 'apache-2.0')")
    state_dict = {_plain_key(k, arch): v for k, v in _state_dict_of(model_or_state_dict).items()}
    state_dict = {k: v for k, v in state_dict.items() if k not in classifier}
    check_keys(
        {k: tuple(v.shape) for k, v in state_dict.items()},
        shapes,
        what=f"cannot export these weights as {arch} (timm keys with num_classes=0)",
        outcome="Nothing was written.",
    )
    # Everything that can fail is computed before the first write.
    cfg = _export_pretrained_cfg(arch, tag, entry, card_fields.get("license"))
    with torch.device("meta"):
        meta_model = timm.create_model(arch, num_classes=0, pretrained_cfg=cfg)
    card = model_card(arch=arch, tag=tag, entry=entry, **card_fields)
    extras = {name: _state_dict_of(extra) for name, extra in (extra_state_dicts or {}).items()}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_safetensors(out_dir / WEIGHTS_NAME, state_dict, {"format": "pt", "arch": arch, "tag": tag})
    for name, extra in extras.items():
        _save_safetensors(out_dir / f"{name}.safetensors", extra, {"format": "pt", "part": name})
    _atomic_write(out_dir / "config.json", lambda tmp: save_config_for_hf(meta_model, str(tmp)))
    _atomic_write(out_dir / "README.md", lambda tmp: tmp.write_text(card))
    return out_dir


# -------------------------------------------------------------------------------------------------------- model card
_METHODS = {
    "PreDet": (
        "PreDet (predet.txt): weakly supervised pre-training of a backbone *and FPN* for detection. Two augmented "
        "views of an image are tracked box by box; the model is trained with an image-level classification loss on "
        "noisy labels, a contrastive RPN loss (CRPN) and a contrastive RoI loss (CROI) between the views."
    ),
    "Jigsaw": (
        "Jigsaw / Montage pre-training (montage_jigsaw.txt): object and context samples cut from a detection "
        "dataset are assembled into one canvas by a fixed template, and the backbone is trained with a dense "
        "classification loss whose soft labels are weighted by each feature's effective receptive field."
    ),
}
_DATASET_IDS = (("ImageNet-1k", "imagenet-1k"), ("COCO", "detection-datasets/coco"))
_DATASET_TYPES = (("COCO", "coco"), ("LVIS", "lvis"), ("VOC", "pascal_voc"))


def _result_fields(result) -> dict:
    """A zoo ``PaperResult`` (or a dict with its fields) as a dict."""
    return asdict(result) if is_dataclass(result) else dict(result)


def _eval_results(results: list[dict], source_url: str | None) -> list[EvalResult]:
    """The absolute paper results as Hub model-index entries (deltas over a baseline stay in the card body)."""
    out = []
    for r in results:
        if r.get("relative_to"):
            continue
        dataset_type = next((t for k, t in _DATASET_TYPES if k in r["dataset"]), "other")
        for metric, value in r["metrics"].items():
            mask = "mask" in metric
            out.append(
                EvalResult(
                    task_type="image-segmentation" if mask else "object-detection",
                    task_name="Instance Segmentation" if mask else "Object Detection",
                    dataset_type=dataset_type,
                    dataset_name=r["dataset"],
                    metric_type=metric,
                    metric_value=value,
                    metric_name=f"{metric}, {r['detector']} {r['schedule']}, {r['protocol']} protocol (paper)",
                    source_name=f"reported in the paper: {r['source']}",
                    source_url=source_url,
                )
            )
    return out


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def model_card(*, arch: str, tag: str, entry: ZooEntry | None = None, **card_fields) -> str:
    """The README.md of an export: YAML front matter (license, datasets, model-index) and the card body.

    Defaults come from the zoo row ``entry``; ``card_fields`` override method, data, license, paper, results,
    repo, datasets and tags, and every other field is listed in the card's recipe table.
    """
    name = f"{arch}.{tag}"
    fields = dict(card_fields)
    method = fields.pop("method", entry.method if entry else None)
    data = fields.pop("data", entry.data if entry else None)
    license_id = fields.pop("license", entry.license if entry else None)
    paper = fields.pop("paper", entry.paper if entry else None)
    results = [_result_fields(r) for r in fields.pop("results", entry.results if entry else ())]
    repo = fields.pop("repo", entry.hub_repo if entry else f"<org>/{name}")
    datasets = fields.pop("datasets", [ds for key, ds in _DATASET_IDS if data and key in data])
    tags = fields.pop("tags", ["timm", "detpretrain", "object-detection", "backbone", tag])
    paper_url = next((w for w in (paper or "").split() if w.startswith("http")), None)

    metadata = ModelCardData(
        license=license_id,
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        tags=tags,
        datasets=datasets or None,
        model_name=name,
        eval_results=_eval_results(results, paper_url) or None,
    )
    with_method = f" with {method}" if method else ""
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        f"# {name}",
        "",
        f"A `{arch}` backbone pre-trained for object detection{with_method}, exported by detpretrain. "
        f"Backbone only: no classifier (`num_classes=0`); the keys are timm's `{arch}`.",
        "",
        "## Method",
        "",
        _METHODS.get(method, method) if method else "Not stated.",
        "",
        "## Data",
        "",
        data or "Not stated.",
        "",
        "## Paper",
        "",
        paper or "Not stated.",
        "",
        "## Detection results",
        "",
    ]
    if results:
        lines += [
            "These are the numbers the paper reports for this recipe, under the named fine-tuning protocol "
            "(`finetune.py --protocol`); they are not a measurement of this file. AP in points.",
            "",
            "| detector | dataset | schedule | fine-tuning protocol | metrics | source |",
            "|---|---|---|---|---|---|",
        ]
        for r in results:
            sign = "+" if r.get("relative_to") else ""
            metrics = ", ".join(f"{k} {sign}{v}" for k, v in r["metrics"].items())
            if r.get("relative_to"):
                metrics += f" over {r['relative_to']}"
            if r.get("note"):
                metrics += f" ({r['note']})"
            row_cells = (r["detector"], r["dataset"], r["schedule"], r["protocol"], metrics, r["source"])
            lines.append("| " + " | ".join(_cell(c) for c in row_cells) + " |")
    else:
        lines.append("No detection result is recorded for these weights.")
    lines += ["", "## How to load", ""]
    if entry is not None:
        lines += [
            "```python",
            "import detpretrain, timm",
            f'model = timm.create_model("{name}", pretrained=True)  # zoo tag, safetensors from the Hub',
            # the stride 4..32 levels, as finetune.py picks them for this family (detpretrain.backbone)
            f'backbone = timm.create_model("{name}", pretrained=True, features_only=True, '
            f"out_indices={choose_levels(arch)})",
            "```",
            "",
            "Without detpretrain, plain timm:",
            "",
        ]
    lines += [
        "```python",
        "import timm",
        f'model = timm.create_model("hf-hub:{repo}", pretrained=True)',
        "```",
        "",
        "From a local export folder (what the training scripts write to `OUTPUT_DIR/export/`):",
        "",
        "```python",
        f'model = timm.create_model("{arch}", pretrained=True, num_classes=0,',
        '                          pretrained_cfg_overlay=dict(file="OUTPUT_DIR/export/model.safetensors"))',
        'model = timm.create_model("local-dir:OUTPUT_DIR/export", pretrained=True)  # the same, config.json included',
        "```",
        "",
        "For torchvision, detectron2 or mmdetection: "
        "`python -m detpretrain.hub convert OUTPUT_DIR/export --to {torchvision,detectron2,mmdet} --out FILE`.",
    ]
    if fields:
        lines += ["", "## Recipe", "", "| field | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in fields.items()]
    lines += ["", "## License", "", f"{license_id}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ reading
def _read_safetensors(path: Path, *, origin: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupt one raises ``CorruptWeightsError`` naming the path."""
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CorruptWeightsError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: {origin}"
        ) from err


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local export folder, a ``.safetensors`` file, or a ``.pth``/``.pt`` checkpoint.

    ``.pth`` files load with ``torch.load(weights_only=True)`` (no arbitrary objects are unpickled); a training
    checkpoint ``{"model": state_dict, ...}`` or ``{"state_dict": ...}`` is unwrapped and a ``module.`` prefix
    (DDP) stripped.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise WeightsNotFoundError(f"{path} has no {WEIGHTS_NAME} (it holds {found}): pass an export folder")
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} does not exist: pass an export folder, a .safetensors or a .pth file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, origin="export it again with detpretrain.save_pretrained")
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors, .pth or .pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CorruptWeightsError(
            f"{path} holds objects other than tensors, which torch.load(weights_only=True) refuses: re-save only "
            f"the weights, e.g. torch.save(model.state_dict(), path), or export with detpretrain.save_pretrained"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CorruptWeightsError(f"{path} is not a readable torch checkpoint ({err}): truncated or corrupt") from err
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CorruptWeightsError(f"{path} holds no state dict of tensors (nor one under 'model' or 'state_dict')")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _model_arch(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise ValueError(f"{type(model).__name__} was not built by timm.create_model; pass arch=... to load_weights")
    return arch


def load_weights(model: torch.nn.Module, path: str | Path, *, arch: str | None = None) -> torch.nn.Module:
    """Load a local export folder or weights file into a timm model, strictly, and return the model.

    The model may have a classifier (it stays at its init), be features_only, or be DDP-wrapped. Every key and
    shape is checked before anything is copied: on a mismatch the model is left exactly as it was.
    """
    target = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    arch = arch or _model_arch(target)
    shapes, classifier, _ = _arch_layout(arch)
    state_dict = {_plain_key(k, arch): v for k, v in read_weights(path).items()}
    state_dict = {k: v for k, v in state_dict.items() if k not in classifier}
    to_model = {_plain_key(k, arch): k for k in target.state_dict()}  # plain name -> the model's own name
    own = target.state_dict()
    expected = {plain: tuple(own[k].shape) for plain, k in to_model.items() if plain not in classifier}
    # A features_only model may lack the last stages; their keys in a full export are not unexpected.
    unused_stages = {k for k in shapes if k not in expected}
    check_keys(
        {k: tuple(v.shape) for k, v in state_dict.items() if k not in unused_stages},
        expected,
        what=f"{path} does not fit {arch}",
    )
    result = target.load_state_dict({to_model[k]: v for k, v in state_dict.items() if k in to_model}, strict=False)
    left = [k for k in result.missing_keys if _plain_key(k, arch) not in classifier]
    if left or result.unexpected_keys:  # cannot happen after check_keys; a bug if it does
        raise IncompatibleWeightsError(f"{path}: {arch} load left {left} and {result.unexpected_keys}")
    return model


# ------------------------------------------------------------------------------------------------------ the zoo path
def _not_published_message(entry: ZooEntry, repo: str) -> str:
    return (
        f"{entry.name}: no weights on the Hub yet ({repo} does not exist at {constants.ENDPOINT}, or it is private "
        f"and you are not logged in). Produce them with `{entry.recipe_command}`, then load the export: "
        f'timm.create_model("{entry.name}", pretrained=True, '
        f'pretrained_cfg_overlay=dict(file="OUT/export/{WEIGHTS_NAME}"))'
    )


def download_weights(
    repo_id: str,
    *,
    revision: str | None = None,
    filename: str = WEIGHTS_NAME,
    entry: ZooEntry | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """``hf_hub_download`` of a safetensors file with one clear message per failure; returns the cached path."""
    if not filename.endswith(".safetensors"):
        raise ValueError(f"{repo_id}/{filename}: detpretrain loads only .safetensors from the Hub, never a pickle")
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except GatedRepoError as err:
        raise WeightsNotFoundError(
            f"{repo_id} is gated: accept its terms on the Hub and log in (`hf auth login`) to download {filename}"
        ) from err
    except RepositoryNotFoundError as err:
        if entry is not None:
            raise WeightsNotPublishedError(_not_published_message(entry, repo_id)) from err
        raise WeightsNotFoundError(
            f"{repo_id}: no such repo at {constants.ENDPOINT} (or it is private and you are not logged in)"
        ) from err
    except RevisionNotFoundError as err:
        raise WeightsNotFoundError(
            f"{repo_id} has no revision {revision!r}: use a branch, tag or commit of the repo, or revision=None"
        ) from err
    except RemoteEntryNotFoundError as err:
        raise WeightsNotFoundError(
            f"{repo_id} has no {filename} at revision {revision or 'main'}: the repo is not a detpretrain export "
            "(model.safetensors, config.json, README.md); push one with `python -m detpretrain.hub push`"
        ) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        if constants.is_offline_mode():
            raise OfflineCacheMissError(
                f"HF_HUB_OFFLINE=1 and {where} is not in the cache ({cache_dir or constants.HF_HUB_CACHE}): load it "
                "once online, or unset HF_HUB_OFFLINE"
            ) from err
        raise OfflineCacheMissError(
            f"could not reach {constants.ENDPOINT} and {where} is not in the cache "
            f"({cache_dir or constants.HF_HUB_CACHE}): check the connection (or HF_ENDPOINT) and retry"
        ) from err


def load_zoo_state_dict(
    entry: ZooEntry,
    cache_dir: str | Path | None = None,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
) -> dict[str, torch.Tensor]:
    """Download and read a zoo row's ``model.safetensors`` (revision from the row), checked against its arch.

    Raises ``WeightsNotPublishedError`` (naming the recipe that produces the weights), ``WeightsNotFoundError``,
    ``OfflineCacheMissError``, ``CorruptWeightsError`` or ``IncompatibleWeightsError``, each with one clear line.
    """
    repo_id = repo_id or entry.hub_repo
    revision = revision or entry.revision
    path = download_weights(repo_id, revision=revision, entry=entry, cache_dir=cache_dir)
    state_dict = _read_safetensors(path, origin=f"delete it and load again to download a fresh copy of {repo_id}")
    shapes, _, _ = _arch_layout(entry.arch)
    check_keys(
        {k: tuple(v.shape) for k, v in state_dict.items()},
        shapes,
        what=f"{repo_id}/{WEIGHTS_NAME} does not fit {entry.arch} (timm keys with num_classes=0)",
    )
    return state_dict


# ------------------------------------------------------------------------------------------------------ timm hook
_HOOK_PARAMS = ("model", "pretrained_cfg", "num_classes", "in_chans", "filter_fn", "strict", "cache_dir")


def _zoo_entry_for(cfg: dict | None) -> ZooEntry | None:
    """The zoo row a timm pretrained cfg loads, or None when timm should load it unchanged.

    ``hf-hub:`` and ``local-dir:`` names (source set) and a ``state_dict`` passed by the user are plain timm loads.
    """
    if not cfg or cfg.get("source") in ("hf-hub", "local-dir") or cfg.get("state_dict") is not None:
        return None
    return find_entry(f"{cfg.get('architecture')}.{cfg.get('tag')}")


def _checked_zoo_state_dict(model, cfg: dict, entry: ZooEntry, in_chans: int, cache_dir) -> dict[str, torch.Tensor]:
    """Download (or read the overlay ``file``) and check every key and shape against ``model``, copying nothing."""
    if cfg.get("file"):
        state_dict = read_weights(cfg["file"])
        what = f"{cfg['file']} does not fit {entry.arch}"
    else:
        repo_id, _, revision = (cfg.get("hf_hub_id") or entry.hf_hub_id).partition("@")
        filename = cfg.get("hf_hub_filename") or WEIGHTS_NAME
        path = download_weights(repo_id, revision=revision or None, filename=filename, entry=entry, cache_dir=cache_dir)
        state_dict = _read_safetensors(path, origin=f"delete it and load again to download a fresh copy of {repo_id}")
        what = f"{repo_id}/{filename} does not fit {entry.arch}"
    classifier = cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = frozenset(k for k in own if any(k.startswith(f"{c}.") for c in classifier))
    first_convs = cfg.get("first_conv") or ()
    first_convs = (first_convs,) if isinstance(first_convs, str) else tuple(first_convs)
    # timm adapts the first conv to other input channels itself (adapt_input_conv); its shape differs then.
    adapted = frozenset(f"{c}.weight" for c in first_convs) if in_chans != (cfg.get("input_size") or (3,))[0] else ()
    check_keys(
        {k: tuple(v.shape) for k, v in state_dict.items()},
        own,
        what=what,
        optional=head,
        ignore_shape=frozenset(adapted),
    )
    return state_dict


def install_timm_load_hook() -> None:
    """Route timm's pretrained loading of zoo rows through detpretrain's loader. Idempotent.

    Wraps ``timm.models._builder.load_pretrained``, which ``build_model_with_cfg`` looks up at call time, before
    any features_only wrapping. For a zoo row the wrapper downloads and checks the weights (clear errors,
    nothing half loaded) and hands them to timm's own function as a ``state_dict``, so timm's semantics stay:
    a requested classifier stays at its init, other input channels adapt the first conv. Every other load
    (timm's own tags, ``hf-hub:``, ``local-dir:``) passes through untouched.
    """
    from timm.models import _builder

    original = getattr(_builder, "load_pretrained", None)
    if getattr(original, "_detpretrain_hook", False):
        return
    params = tuple(inspect.signature(original).parameters) if callable(original) else ()
    if params != _HOOK_PARAMS:
        raise TimmHookError(
            f"timm {timm.__version__}'s timm.models._builder.load_pretrained is not the function detpretrain wraps "
            f"(parameters {params}); load zoo weights without the hook: timm.create_model(arch, pretrained=True, "
            "pretrained_cfg=detpretrain.pretrained_cfg('arch.tag')) or timm.create_model('hf-hub:org/arch.tag')"
        )

    @functools.wraps(original)
    def load_pretrained(
        model, pretrained_cfg=None, num_classes=1000, in_chans=3, filter_fn=None, strict=True, cache_dir=None
    ):
        cfg = pretrained_cfg or getattr(model, "pretrained_cfg", None)
        entry = _zoo_entry_for(cfg)
        if entry is not None:
            state_dict = _checked_zoo_state_dict(model, cfg, entry, in_chans, cache_dir)
            no_source = dict(url=None, file=None, hf_hub_id=None, hf_hub_filename=None, source=None)
            pretrained_cfg = {**cfg, **no_source, "state_dict": state_dict}
        return original(model, pretrained_cfg, num_classes, in_chans, filter_fn, strict, cache_dir)

    load_pretrained._detpretrain_hook = True
    _builder.load_pretrained = load_pretrained


# ------------------------------------------------------------------------------------------------------------ publish
def validate_export(out_dir: str | Path) -> str:
    """Check an export folder before it is published; returns its architecture.

    It must hold the three files, no pickle, a config.json timm can read, and safetensors that load, with
    ``model.safetensors`` fitting the architecture exactly.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise WeightsNotFoundError(f"{out_dir} is not a folder: pass the export folder save_pretrained wrote")
    missing = [name for name in EXPORT_FILES if not (out_dir / name).is_file()]
    if missing:
        raise WeightsNotFoundError(f"{out_dir} lacks {', '.join(missing)}: write it with detpretrain.save_pretrained")
    pickles = sorted(p.name for p in out_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{out_dir} holds pickled files ({', '.join(pickles)}): the Hub gets safetensors only")
    try:
        config = json.loads((out_dir / "config.json").read_text())
        arch = config["architecture"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{out_dir / 'config.json'} is not a timm Hub config with an 'architecture' ({err})") from err
    for path in sorted(out_dir.glob("*.safetensors")):
        _read_safetensors(path, origin="export it again with detpretrain.save_pretrained")
    shapes, _, _ = _arch_layout(arch)
    state_dict = _read_safetensors(out_dir / WEIGHTS_NAME, origin="export it again")
    check_keys(
        {k: tuple(v.shape) for k, v in state_dict.items()},
        shapes,
        what=f"{out_dir / WEIGHTS_NAME} does not fit {arch} (timm keys with num_classes=0)",
        outcome="Nothing was pushed.",
    )
    return arch


def push_to_hub(
    out_dir: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Validate an export folder and upload it to ``repo_id`` (created if needed); returns the commit hash.

    Pin the hash in the zoo row (``revision=``) so that the published weights can never change under a user.
    Authentication is huggingface_hub's own (``hf auth login`` or HF_TOKEN).
    """
    arch = validate_export(out_dir)
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        folder_path=str(out_dir),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload {arch} export from detpretrain",
    )
    return info.oid
