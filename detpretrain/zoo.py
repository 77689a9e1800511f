"""The zoo: one row per pre-trained weight this package offers, and its registration as timm pretrained tags.

Each row names a timm architecture, a tag (``predet``, ``predet_in1k``, ``jigsaw``), the Hugging Face Hub repo that
holds the weights (``<org>/<arch>.<tag>``, pinned to a commit once published), the method and data that produce
them, a license, the paper, and the detection results that paper reports for the recipe, each with the protocol it
was measured under. Results are copied from the papers only where a paper gives them (../shared/PAPER_NOTES.md,
"Results for the zoo"); an empty ``results`` means the paper reports no number for that row.

timm has no public API to add a pretrained tag to an existing architecture. ``register_with_timm`` writes the private
tables of ``timm.models._registry`` (unchanged since late 2022), guarded: if timm's layout changes it raises
``TimmRegistryError`` naming the public fallbacks (``pretrained_cfg(name)`` for
``timm.create_model(arch, pretrained=True, pretrained_cfg=...)``, and ``hf-hub:`` names), which need no registration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

__all__ = [
    "HUB_ORG",
    "PaperResult",
    "ZooEntry",
    "ZOO",
    "TimmRegistryError",
    "find_entry",
    "get_entry",
    "register_entry",
    "register_with_timm",
    "pretrained_cfg",
    "markdown_table",
]

# The Hub organisation that hosts the zoo. A fork publishing its own weights sets DETPRETRAIN_HUB_ORG.
HUB_ORG = os.environ.get("DETPRETRAIN_HUB_ORG", "detpretrain")

PREDET_PAPER = (
    "Ramanathan, Wang, Mahajan. PreDet: Large-Scale Weakly Supervised Pre-Training for Detection. ICCV 2021. "
    "https://openaccess.thecvf.com/content/ICCV2021/html/"
    "Ramanathan_PreDet_Large-Scale_Weakly_Supervised_Pre-Training_for_Detection_ICCV_2021_paper.html"
)
JIGSAW_PAPER = (
    "Zhou, Zhou, Zhang, Yi, Ouyang. Cheaper Pre-training Lunch: An Efficient Paradigm for Object Detection "
    "(Jigsaw / Montage pre-training). ECCV 2020. https://arxiv.org/abs/2004.12178"
)


@dataclass(frozen=True)
class PaperResult:
    """One detection result a paper reports for a recipe, in points (AP x 100) exactly as the paper prints it."""

    detector: str
    dataset: str
    schedule: str
    protocol: str  # the finetune.py preset it was measured under: "predet", "predet_r50", "jigsaw"
    metrics: dict[str, float]
    source: str  # where in the paper, e.g. "predet.txt Tab. 2"
    relative_to: str | None = None  # set when ``metrics`` are deltas over a baseline, not absolute numbers
    note: str | None = None


@dataclass(frozen=True)
class ZooEntry:
    """A pre-trained weight: a timm architecture, a tag, where its weights live, and what produces them."""

    arch: str
    tag: str
    method: str  # "PreDet" | "Jigsaw"
    recipe: str  # the script that produces the weights
    data: str
    license: str  # a Hub license id
    paper: str
    results: tuple[PaperResult, ...] = ()
    revision: str | None = None  # the Hub commit to pin once published; None reads the repo's main branch
    hub_org: str = field(default=HUB_ORG)

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def hub_repo(self) -> str:
        return f"{self.hub_org}/{self.name}"

    @property
    def hf_hub_id(self) -> str:
        """The id timm resolves: ``org/repo``, or ``org/repo@revision`` once the weights are pinned."""
        return f"{self.hub_repo}@{self.revision}" if self.revision else self.hub_repo

    @property
    def recipe_command(self) -> str:
        """A command that produces these weights; its export folder loads with ``pretrained_cfg_overlay``."""
        if self.recipe == "train_jigsaw.py":
            return f"python train_jigsaw.py --model {self.arch} --train-images DIR --train-ann FILE --output-dir OUT"
        if self.tag == "predet_in1k":
            return f"python train_predet.py --model {self.arch} --train-images IMAGENET_TRAIN_DIR --output-dir OUT"
        return f"python train_predet.py --model {self.arch} --train-images DIR --train-ann LABELS --output-dir OUT"


# ---------------------------------------------------------------------------------------------------------- results
# PreDet (predet.txt): the default backbone is ResNeXt-101 32x8d + FPN pre-trained on IG-50M. Fine-tuning follows
# the "predet" protocol (§4.2: nothing frozen, BN trained, multi-scale 640-800, mask head lr x4) except Tab. 4's
# ResNet-50 rows, which use the 4conv+1fc box head ("predet_r50"). LVIS and VOC numbers are averages over 3 runs.
_MASK = "Mask R-CNN + FPN"
_COCO = "COCO val2017"

_X101_32X8D_PREDET = (
    PaperResult(_MASK, _COCO, "1x", "predet", {"AP_box": 47.1, "AP_mask": 41.7}, "predet.txt Tab. 2"),
    PaperResult(
        _MASK, _COCO, "1x", "predet", {"AP_box": 47.1, "AP50_box": 68.2, "AP75_box": 51.6}, "predet.txt Tab. 3"
    ),
    PaperResult("RetinaNet + FPN", _COCO, "1x", "predet", {"AP_box": 45.1}, "predet.txt Tab. 2"),
    PaperResult(
        _MASK, "LVIS v1 val", "1x", "predet", {"AP_box": 30.1, "AP_mask": 29.2}, "predet.txt Tab. 5", note="3 runs"
    ),
    PaperResult(
        "Faster R-CNN + FPN",
        "VOC test2007 (trainval07+12)",
        "24k iters",
        "predet",
        {"AP_box": 62.5, "AP50_box": 85.6, "AP75_box": 69.8},
        "predet.txt Tab. 6",
        note="3 runs; detectron2's VOC AP",
    ),
    PaperResult(
        _MASK,
        "COCO val2017, low-shot train subsets",
        "grid-searched",
        "predet",
        {"AP_box@1k": 16.1, "AP_box@5k": 26.7, "AP_box@10k": 30.3, "AP_box@35k": 40.1, "AP_box@118k": 47.1},
        "predet.txt Tab. 7",
    ),
)
_X101_32X8D_PREDET_IN1K = (
    PaperResult(_MASK, _COCO, "1x", "predet", {"AP_box": 45.8, "AP_mask": 40.8}, "predet.txt Tab. 2"),
    PaperResult("RetinaNet + FPN", _COCO, "1x", "predet", {"AP_box": 43.1}, "predet.txt Tab. 2"),
    PaperResult(
        _MASK, "LVIS v1 val", "1x", "predet", {"AP_box": 26.1, "AP_mask": 25.6}, "predet.txt Tab. 5", note="3 runs"
    ),
    PaperResult(
        "Faster R-CNN + FPN",
        "VOC test2007 (trainval07+12)",
        "24k iters",
        "predet",
        {"AP_box": 61.1, "AP50_box": 84.8, "AP75_box": 68.0},
        "predet.txt Tab. 6",
        note="3 runs; detectron2's VOC AP",
    ),
)
_R50_PREDET = (
    PaperResult(
        _MASK,
        _COCO,
        "1x",
        "predet_r50",
        {"AP_box": 42.1, "AP50_box": 62.5, "AP75_box": 46.0, "AP_mask": 37.4, "AP50_mask": 59.1, "AP75_mask": 39.9},
        "predet.txt Tab. 4",
    ),
    PaperResult(
        _MASK,
        _COCO,
        "2x",
        "predet_r50",
        {"AP_box": 43.3, "AP50_box": 63.3, "AP75_box": 47.7, "AP_mask": 38.7, "AP50_mask": 60.5, "AP75_mask": 41.5},
        "predet.txt Tab. 4",
    ),
)
_REGNETY_640_PREDET = (
    PaperResult(
        _MASK,
        _COCO,
        "1x",
        "predet",
        {"AP_box": 49.1, "AP50_box": 70.5, "AP75_box": 53.9, "AP_mask": 43.3, "AP50_mask": 67.4, "AP75_mask": 46.9},
        "predet.txt Tab. 4",
        note="RegNet-64 in the paper; regnety_640 is our mapping of SEER's RegNetY-64GF",
    ),
)
_FIG5A_BASELINE = "cls-ImageNet pre-training of the same backbone"
_X50_32X4D_PREDET = (
    PaperResult(_MASK, _COCO, "1x", "predet", {"AP_box": 2.3}, "predet.txt Fig. 5(a)", relative_to=_FIG5A_BASELINE),
)
_X101_32X16D_PREDET = (
    PaperResult(_MASK, _COCO, "1x", "predet", {"AP_box": 3.6}, "predet.txt Fig. 5(a)", relative_to=_FIG5A_BASELINE),
)

# Jigsaw (montage_jigsaw.txt): pre-trained on COCO train2017 only, fine-tuned with the "jigsaw" protocol (§4.1:
# frozen BN, single scale 1333x800 with flip, 13 epochs = 1x). Where text and table disagree, the table's number.
_C4 = "Faster R-CNN C4"
_FPN = "Faster R-CNN + FPN"
_BOX6 = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _box(*values: float) -> dict[str, float]:
    return {f"{k}_box": v for k, v in zip(_BOX6, values, strict=True)}


_R50_JIGSAW = (
    PaperResult(_C4, _COCO, "1x", "jigsaw", _box(36.3, 56.5, 38.9, 18.9, 40.8, 49.7), "montage_jigsaw.txt Tab. 3"),
    PaperResult(_FPN, _COCO, "1x", "jigsaw", _box(36.5, 58.3, 39.2, 22.2, 40.4, 45.8), "montage_jigsaw.txt Tab. 3"),
    PaperResult(_MASK, _COCO, "1x", "jigsaw", _box(37.5, 58.9, 40.6, 22.8, 41.2, 46.9), "montage_jigsaw.txt Tab. 3"),
    PaperResult(
        _C4, _COCO, "2x", "jigsaw", {"AP_box": 37.5, "AP50_box": 57.6, "AP75_box": 40.7}, "montage_jigsaw.txt Tab. 5"
    ),
)
_R101_JIGSAW = (
    PaperResult(_C4, _COCO, "1x", "jigsaw", _box(39.2, 59.6, 42.0, 20.6, 43.3, 54.8), "montage_jigsaw.txt Tab. 4"),
)
_X101_32X4D_JIGSAW = (
    PaperResult(_C4, _COCO, "1x", "jigsaw", _box(40.2, 61.0, 43.0, 21.3, 44.5, 55.7), "montage_jigsaw.txt Tab. 4"),
)

# ------------------------------------------------------------------------------------------------------------ table
# Licenses are our choice: IG-50M-trained weights follow Meta's Instagram-data releases (CC-BY-NC-4.0, as timm's
# fb_*_ig weights); weights trained on ImageNet-1k or COCO are released under Apache-2.0 with the data's own terms.
_PREDET_ARCHS = {
    "resnet50": _R50_PREDET,
    "resnext50_32x4d": _X50_32X4D_PREDET,
    "resnext101_32x4d": (),
    "resnext101_32x8d": _X101_32X8D_PREDET,
    "resnext101_32x16d": _X101_32X16D_PREDET,
    "regnety_640": _REGNETY_640_PREDET,
}
_PREDET_IN1K_RESULTS = {"resnext101_32x8d": _X101_32X8D_PREDET_IN1K}
_JIGSAW_ARCHS = {"resnet50": _R50_JIGSAW, "resnet101": _R101_JIGSAW, "resnext101_32x4d": _X101_32X4D_JIGSAW}


def _build_zoo() -> dict[str, ZooEntry]:
    rows = []
    for arch, results in _PREDET_ARCHS.items():
        rows.append(
            ZooEntry(
                arch=arch,
                tag="predet",
                method="PreDet",
                recipe="train_predet.py",
                data="IG-50M: 50M Instagram images with noisy hashtag labels (predet.txt §4.1)",
                license="cc-by-nc-4.0",
                paper=PREDET_PAPER,
                results=results,
            )
        )
        rows.append(
            ZooEntry(
                arch=arch,
                tag="predet_in1k",
                method="PreDet",
                recipe="train_predet.py",
                data="ImageNet-1k train (1.28M images, 1000 classes), PreDet-ImageNet of predet.txt §5.2",
                license="apache-2.0",
                paper=PREDET_PAPER,
                results=_PREDET_IN1K_RESULTS.get(arch, ()),
            )
        )
    for arch, results in _JIGSAW_ARCHS.items():
        rows.append(
            ZooEntry(
                arch=arch,
                tag="jigsaw",
                method="Jigsaw",
                recipe="train_jigsaw.py",
                data="COCO train2017 (118k images, 80 categories), the detection data itself (montage_jigsaw.txt §4)",
                license="apache-2.0",
                paper=JIGSAW_PAPER,
                results=results,
            )
        )
    return {row.name: row for row in rows}


ZOO: dict[str, ZooEntry] = _build_zoo()


def find_entry(name: str) -> ZooEntry | None:
    """The zoo row for ``arch.tag``, or None."""
    return ZOO.get(name)


def get_entry(name: str) -> ZooEntry:
    """The zoo row for ``arch.tag``; a KeyError listing the zoo when there is none."""
    entry = ZOO.get(name)
    if entry is None:
        raise KeyError(f"{name!r} is not in the detpretrain zoo; known weights: {', '.join(sorted(ZOO))}")
    return entry


# ------------------------------------------------------------------------------------------------------------- timm
class TimmRegistryError(RuntimeError):
    """timm's private registry no longer has the layout ``register_with_timm`` writes to."""


def _timm_registry():
    """timm's private registry module, checked to have the four tables the zoo writes."""
    from timm.models import _registry

    tables = ("_model_pretrained_cfgs", "_model_has_pretrained", "_model_with_tags", "_model_default_cfgs")
    missing = [t for t in tables if not hasattr(_registry, t)]
    if missing:
        raise TimmRegistryError(
            f"this timm's registry has no {', '.join(missing)}, so detpretrain cannot add its tags to timm; load a "
            "zoo weight without registration: timm.create_model(arch, pretrained=True, "
            "pretrained_cfg=detpretrain.pretrained_cfg('arch.tag')) or timm.create_model('hf-hub:org/arch.tag')"
        )
    return _registry


def _timm_pretrained_cfg(entry: ZooEntry):
    """A timm ``PretrainedCfg`` for the row: the architecture's own input config, our weights and metadata."""
    import timm
    from timm.models import PretrainedCfg

    if not timm.is_model(entry.arch):
        raise ValueError(f"zoo row {entry.name!r}: {entry.arch!r} is not a timm architecture (timm {timm.__version__})")
    base = timm.models.get_pretrained_cfg(entry.arch) or PretrainedCfg()
    return replace(
        base,
        url=None,
        file=None,
        state_dict=None,
        source=None,
        hf_hub_id=entry.hf_hub_id,
        hf_hub_filename="model.safetensors",  # safetensors only: nothing from the Hub is ever unpickled
        architecture=entry.arch,
        tag=entry.tag,
        custom_load=False,
        num_classes=0,  # the export is backbone-only
        label_names=None,
        label_descriptions=None,
        license=entry.license,
        description=f"{entry.method} pre-training for detection ({entry.data})",
        paper_name=entry.paper,
        origin_url=f"https://huggingface.co/{entry.hub_repo}",
        notes=(f"produced by {entry.recipe} of detpretrain",),
    )


def register_with_timm(entries=None) -> None:
    """Make every zoo row (or ``entries``) a timm pretrained tag; timm's own default tag stays the default."""
    registry = _timm_registry()
    for entry in ZOO.values() if entries is None else entries:
        cfg = _timm_pretrained_cfg(entry)
        try:
            registry._model_pretrained_cfgs[entry.name] = cfg
            registry._model_has_pretrained.add(entry.name)
            if entry.name not in registry._model_with_tags[entry.arch]:
                registry._model_with_tags[entry.arch].append(entry.name)
            default_cfg = registry._model_default_cfgs[entry.arch]
            if entry.tag not in default_cfg.cfgs:
                default_cfg.tags.append(entry.tag)  # appended, so timm's default tag keeps its first place
            default_cfg.cfgs[entry.tag] = cfg
            default_cfg.is_pretrained = True
        except (AttributeError, KeyError, TypeError) as err:
            raise TimmRegistryError(
                f"could not register {entry.name!r} with timm ({type(err).__name__}: {err}); timm's private registry "
                "changed. Load without registration: timm.create_model(arch, pretrained=True, "
                f"pretrained_cfg=detpretrain.pretrained_cfg({entry.name!r}))"
            ) from err


def register_entry(entry: ZooEntry) -> None:
    """Add a row to the zoo (your own weights, or a test's) and register it with timm."""
    ZOO[entry.name] = entry
    register_with_timm([entry])


def pretrained_cfg(name: str) -> dict:
    """The public fallback: ``timm.create_model(arch, pretrained=True, pretrained_cfg=pretrained_cfg(name))``.

    It needs no registration, so it keeps working if timm's private registry changes.
    """
    from dataclasses import asdict

    return asdict(_timm_pretrained_cfg(get_entry(name)))


# ----------------------------------------------------------------------------------------------------------- README
def _format_results(entry: ZooEntry) -> str:
    """The headline numbers (box and mask AP) of each result; the model card carries every metric."""
    if not entry.results:
        return "not reported"
    parts = []
    for r in entry.results:
        headline = {k: v for k, v in r.metrics.items() if k in ("AP_box", "AP_mask")} or r.metrics
        sign = "+" if r.relative_to else ""
        metrics = ", ".join(f"{k} {sign}{v:.1f}" for k, v in headline.items())
        over = f" over {r.relative_to}" if r.relative_to else ""
        parts.append(f"{r.detector}, {r.dataset}, {r.schedule}, `{r.protocol}`: {metrics}{over} ({r.source})")
    return "<br>".join(parts)


def markdown_table() -> str:
    """The zoo as the README's Markdown table (a test keeps README.md equal to this)."""
    lines = [
        "| weights | method | pre-training data | license | Hub repo | paper's detection results (AP, points) |",
        "|---|---|---|---|---|---|",
    ]
    for entry in _build_zoo().values():  # the package's own rows, not those added at run time
        lines.append(
            f"| `{entry.name}` | {entry.method} | {entry.data} | {entry.license} | `{entry.hf_hub_id}` "
            f"| {_format_results(entry)} |"
        )
    return "\n".join(lines)


README_START, README_END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


def write_readme_table(readme_path) -> None:
    """Replace what stands between the README's zoo-table markers with ``markdown_table()``."""
    from pathlib import Path

    path = Path(readme_path)
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no zoo-table markers {README_START} ... {README_END}: add them where it goes")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    path.write_text(f"{head}{README_START}\n{markdown_table()}\n{README_END}{tail}")
