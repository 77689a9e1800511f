"""torchvision detectors on any timm backbone, built as a fine-tuning protocol says, with a record of what loaded.

Architectures (``ARCHS``):

- ``fasterrcnn``, ``maskrcnn``: torchvision's FasterRCNN / MaskRCNN on ``TimmFPN`` (P2-P5 from C2-C5, P6 by max
  pool for the RPN only); anchors 32..512, one size per level x ratios (0.5, 1, 2); RoIAlign 7x7 (box) and 14x14
  (mask) on P2-P5; box head per the protocol (2fc: TwoMLPHead 1024; 4conv1fc: FastRCNNConvFCHead 4 x 256 conv +
  1 x 1024 fc); mask head MaskRCNNHeads (4 x 256 conv) and MaskRCNNPredictor. RPN and ROI sampling are
  torchvision's defaults.
- ``retinanet``: torchvision's RetinaNet on ``TimmFPN`` over C3-C5 with P6 and P7 from C5 (``LastLevelP6P7``), as
  the RetinaNet paper and detectron2 (torchvision's v2 model takes P5 instead); anchors 32..512 x 2^(0, 1/3, 2/3)
  x (0.5, 1, 2) per level, detectron2's exact sizes (torchvision's v1 rounds them down to integers).
- ``fasterrcnn_c4``: Faster R-CNN C4, the Jigsaw paper's main table (montage_jigsaw.txt Tab. 3; PAPER_NOTES,
  "Faster R-CNN C4"). torchvision has no C4 model; it is built from torchvision's parts like detectron2's
  Res5ROIHeads: stem..res4 give one stride-16 map; the RPN runs on it with 15 anchors (32..512 x 3 ratios); RoIAlign
  14x14; the ROI head is the backbone's res5 stage (its first block strides 2: 14 -> 7) initialized from the same
  pre-trained weights, then global average pooling and FastRCNNPredictor. The paper credits that transfer of res5
  for its C4 gain (§4.2), so res5 is a copy of the pre-trained stage, never a fresh one. RPN top-k are detectron2's
  C4 values (12000/2000 train, 6000/1000 test).

The protocol (``detpretrain.detection.protocols``) sets the backbone norm and frozen stages, FPN and head norms, the
box head, and the sizes. The model's transform (``ProtocolTransform``) always resizes test images (torchvision's
GeneralizedRCNNTransform would test at ``min_size[-1]`` with the train ``max_size``; this one switches sizes with
``train()`` / ``eval()``); training images are resized by the dataset transform (``train_resize="dataset"``, the
default, so the random size comes from the sample's generator) or by the model (``"model"``).

Weights (``build_detector``): ``pretrained=True`` lets timm load the backbone name's weights (a zoo tag such as
``resnet50.jigsaw``, any timm tag, ``hf-hub:org/repo``); ``backbone_weights=PATH`` builds without them and loads
a local export (or .safetensors / .pth) strictly with ``detpretrain.hub.load_weights``, then the export's
``fpn.safetensors`` (PreDet's pre-trained FPN) into the detector's FPN, level by level. The returned record says
which parts loaded from where; finetune.py writes it into eval.json.

SyncBN: with ``syncbn_when_distributed`` and more than one process, every trained BatchNorm (backbone and heads)
becomes SyncBatchNorm. torch's SyncBatchNorm trains only on GPU-like devices (CUDA, XPU, HPU); on CPU (gloo) each
process keeps plain BatchNorm over its own images, and the record says so.

Contract (torchvision's): ``model(images, targets)`` in train mode returns a dict of losses; in eval mode a list of
dicts with ``boxes`` (N, 4) xyxy, ``labels`` (N,), ``scores`` (N,), and ``masks`` (N, 1, H, W) for maskrcnn.
Images are float (3, H, W) in [0, 1]; the transform normalizes with the backbone's pretrained_cfg mean and std.
``num_classes`` counts the background class, as torchvision does (COCO: 91 with its sparse ids, or 81).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from timm.layers import convert_sync_batchnorm
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detpretrain.backbone import TimmFPN, create_body, group_norm
from detpretrain.detection.protocols import Protocol, override_protocol
from detpretrain.hub import check_keys, load_weights, read_weights
from detpretrain.zoo import find_entry

__all__ = ["ARCHS", "TRAIN_RESIZE", "C4Backbone", "ProtocolTransform", "build_detector"]

ARCHS = ("fasterrcnn", "fasterrcnn_c4", "maskrcnn", "retinanet")
TRAIN_RESIZE = ("dataset", "model")  # who resizes training images to the protocol's train sizes
SYNCBN_DEVICE_TYPES = ("cuda", "xpu", "hpu")  # where torch's SyncBatchNorm trains (its forward checks this)
FPN_CHANNELS = 256
FPN_LEVELS = ("0", "1", "2", "3")  # P2-P5, TimmFPN's names
# Body feature indices (timm out_indices; index i has stride 2 ** (i + 1)): C2-C5 for the R-CNN FPN, C3-C5 for
# RetinaNet, C4 and C5 for the C4 model (C5 only to take res5 out as the ROI head).
OUT_INDICES = {"fasterrcnn": (1, 2, 3, 4), "maskrcnn": (1, 2, 3, 4), "retinanet": (2, 3, 4), "fasterrcnn_c4": (3, 4)}
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# detectron2's Base-RCNN-C4 (PRE_NMS_TOPK_TEST 6000, POST_NMS_TOPK_TEST 1000) and its defaults for training.
C4_RPN_TOP_N = dict(
    rpn_pre_nms_top_n_train=12000,
    rpn_post_nms_top_n_train=2000,
    rpn_pre_nms_top_n_test=6000,
    rpn_post_nms_top_n_test=1000,
)


class ProtocolTransform(GeneralizedRCNNTransform):
    """torchvision's resize-and-normalize transform with separate train and test sizes.

    Eval mode: the short side to ``test_min_size``, the long side capped at ``test_max_size``; predictions are
    mapped back to the input image's pixels (torchvision's postprocess). Train mode with ``train_resize="model"``:
    the short side drawn uniformly from ``train_min_sizes`` (torchvision's ``torch_choice``, from the global torch
    RNG), capped at ``train_max_size``; with ``train_resize="dataset"`` training images pass at the size the
    dataset transform gave them (``detpretrain.data.transforms.ResizeShortestEdge`` with the protocol's train
    sizes, drawing from the sample's own generator, so that a resumed run resizes the same way). ``min_size`` /
    ``max_size`` always show the sizes of the current mode.
    """

    def __init__(
        self,
        *,
        train_min_sizes: tuple[int, ...],
        train_max_size: int,
        test_min_size: int,
        test_max_size: int,
        image_mean: list[float],
        image_std: list[float],
        train_resize: str = "dataset",
    ):
        if train_resize not in TRAIN_RESIZE:
            raise ValueError(f"train_resize={train_resize!r} is not one of {TRAIN_RESIZE}")
        super().__init__(min_size=train_min_sizes, max_size=train_max_size, image_mean=image_mean, image_std=image_std)
        self.train_sizes = (tuple(train_min_sizes), train_max_size)
        self.test_sizes = ((test_min_size,), test_max_size)
        self.train_resize = train_resize

    def train(self, mode: bool = True) -> ProtocolTransform:
        super().train(mode)
        self.min_size, self.max_size = self.train_sizes if mode else self.test_sizes
        return self

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.training and self.train_resize == "dataset":
            return image, target
        return super().resize(image, target)


class C4Backbone(nn.Module):
    """A timm ``features_only`` body ending at res4, as the single feature map ``{"0": C4}`` torchvision expects."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.out_channels = body.feature_info.channels()[-1]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(images)[-1])])


def _norm_layer(kind: str):
    return {"none": None, "bn": nn.BatchNorm2d, "gn": group_norm}[kind]


def _rpn(in_channels: int, sizes_per_level: tuple[tuple[int, ...], ...]) -> tuple[AnchorGenerator, RPNHead]:
    anchors = AnchorGenerator(sizes_per_level, (ASPECT_RATIOS,) * len(sizes_per_level))
    return anchors, RPNHead(in_channels, anchors.num_anchors_per_location()[0])


def _box_head(protocol: Protocol) -> nn.Module:
    if protocol.box_head == "2fc":
        return TwoMLPHead(FPN_CHANNELS * 7 * 7, 1024)
    return FastRCNNConvFCHead(
        (FPN_CHANNELS, 7, 7), [256, 256, 256, 256], [1024], norm_layer=_norm_layer(protocol.head_norm)
    )


def _split_res5(full: nn.Module, backbone: str, protocol: Protocol, norm: str) -> tuple[nn.Module, nn.Module]:
    """(stem..res4 body, res5 stage) from a body built with out_indices (3, 4), res5 keeping its weights.

    A timm features_only model holds its modules up to the last returned stage, so res5 is its last child.
    The stem..res4 body is a second features_only model of the same architecture ending at res4, given the
    full body's weights (same keys), so nothing of timm's feature wrapper is edited in place.
    """
    res5_name, res5 = list(full.named_children())[-1]
    if res5_name != full.feature_info.module_name()[-1].replace(".", "_"):
        raise ValueError(
            f"{backbone!r}: its last stage is not one module of the timm feature model ({res5_name!r}), so it "
            "cannot become the C4 ROI head; use fasterrcnn (FPN) with this backbone"
        )
    # res5 is frozen (or not) in ``full`` already; the res4 body has no stage 5 to freeze.
    body = create_body(
        backbone, pretrained=False, out_indices=(3,), norm=norm, frozen_stages=min(protocol.frozen_stages, 4)
    )
    body.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(f"{res5_name}.")})
    return body, res5


def _export_architecture(path: Path) -> str | None:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        return json.loads(config.read_text())["architecture"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{config} is not a timm Hub config with an 'architecture' ({err}): export again") from err


def _backbone_record(backbone: str, body: nn.Module, *, pretrained: bool, weights: Path | None) -> dict[str, Any]:
    cfg = body.pretrained_cfg
    arch = cfg["architecture"]
    if weights is not None:
        kind = "export" if weights.is_dir() else "file"
        return {"from": kind, "weights": str(weights), "architecture": arch}
    if not pretrained:
        return {"from": "none", "weights": None, "architecture": arch, "reason": "pretrained=False: from scratch"}
    if backbone.startswith(("hf-hub:", "local-dir:")):
        return {"from": backbone.split(":", 1)[0], "weights": backbone, "architecture": arch}
    name = f"{arch}.{cfg.get('tag')}" if cfg.get("tag") else arch
    entry = find_entry(name)
    if entry is not None:
        return {"from": "zoo", "weights": name, "architecture": arch, "hub": entry.hf_hub_id}
    return {"from": "timm", "weights": name, "architecture": arch}


def _load_fpn(fpn: FeaturePyramidNetwork, path: Path, levels: tuple[int, ...]) -> dict[str, Any]:
    """Load an export's ``fpn.safetensors`` into ``fpn`` (built on body ``levels``), strictly, level by level.

    The export's FPN is taken to end at C5 (PreDet pre-trains P2-P6 on C2-C5, PAPER_NOTES "CRPN"); a detector
    whose FPN starts higher (RetinaNet: C3-C5) gets the export's blocks of the same levels, which compute
    exactly the same P3-P5 (the top-down path never reads P2). Extra blocks the export lacks (RetinaNet's P6/P7
    convs) stay at their init and are named in the record; anything else missing, unexpected, or of another
    shape raises before a tensor is copied.
    """
    state = read_weights(path)
    blocks = ("inner_blocks", "layer_blocks")
    n_export = len({k.split(".")[1] for k in state if k.startswith(blocks)})
    export_levels = tuple(range(5 - n_export, 5))
    if not export_levels:
        raise ValueError(f"{path} holds no FPN blocks (inner_blocks / layer_blocks): export the FPN again")
    if not set(levels) <= set(export_levels):
        raise ValueError(
            f"{path} holds an FPN on C{export_levels[0] + 1}-C5 but this detector's FPN needs C{levels[0] + 1}-C5: "
            "pass load_fpn_weights=False to start the FPN from scratch"
        )
    offset = levels[0] - export_levels[0]
    mapped = {}
    for key, value in state.items():
        if key.startswith(blocks):
            block, index, rest = key.split(".", 2)
            if int(index) - offset >= 0:
                mapped[f"{block}.{int(index) - offset}.{rest}"] = value
        else:
            mapped[key] = value
    own = {k: tuple(v.shape) for k, v in fpn.state_dict().items()}
    new = frozenset(k for k in own if k.startswith("extra_blocks.") and k not in mapped)
    check_keys(
        {k: tuple(v.shape) for k, v in mapped.items()},
        own,
        what=f"{path} does not fit this detector's FPN",
        optional=new,
        outcome="Nothing was loaded: match the protocol's fpn_norm to the export's FPN, or load_fpn_weights=False.",
    )
    fpn.load_state_dict(mapped, strict=False)
    record: dict[str, Any] = {"from": "export", "weights": str(path), "levels": [f"P{i + 1}" for i in levels]}
    if export_levels != levels:
        record["not_used"] = [f"P{i + 1}" for i in export_levels if i not in levels]
    if new:
        record["new"] = sorted({k.split(".")[1] for k in new})  # e.g. ["p6", "p7"] for RetinaNet
    return record


def _c4_detector(
    features: C4Backbone, res5: nn.Module, res5_channels: int, num_classes: int, tv_kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """Faster R-CNN C4 from torchvision's parts: RPN on C4, RoIAlign 14x14, res5 + average pool as the box head."""
    anchors, rpn_head = _rpn(features.out_channels, (ANCHOR_SIZES,))
    box_head = nn.Sequential(OrderedDict(res5=res5, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(start_dim=1)))
    model = FasterRCNN(
        features,
        num_classes=None,  # torchvision wants None when the predictor is given
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        # detectron2's C4 pooler: 14x14, adaptive sampling (POOLER_SAMPLING_RATIO 0) on the stride-16 map
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=0),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(res5_channels, num_classes),
        **tv_kwargs,
    )
    return model, {"anchors": [list(ANCHOR_SIZES)], "box_roi_align": 14, "box_head": "res5"}


def _rcnn_fpn(
    arch: str, features: TimmFPN, num_classes: int, protocol: Protocol, tv_kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """torchvision's FasterRCNN / MaskRCNN on the FPN, with the protocol's box head and head norm."""
    anchors, rpn_head = _rpn(FPN_CHANNELS, tuple((size,) for size in ANCHOR_SIZES))
    common = dict(
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=list(FPN_LEVELS), output_size=7, sampling_ratio=2),
        box_head=_box_head(protocol),
        box_predictor=FastRCNNPredictor(1024, num_classes),
        **tv_kwargs,
    )
    settings: dict[str, Any] = {"anchors": [[size] for size in ANCHOR_SIZES], "box_roi_align": 7}
    if arch == "fasterrcnn":
        return FasterRCNN(features, **common), settings
    mask_head = MaskRCNNHeads(FPN_CHANNELS, [256, 256, 256, 256], 1, norm_layer=_norm_layer(protocol.head_norm))
    model = MaskRCNN(
        features,
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=list(FPN_LEVELS), output_size=14, sampling_ratio=2),
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(256, 256, num_classes),
        **common,
    )
    return model, {**settings, "mask_roi_align": 14}


def _retinanet(
    features: TimmFPN, num_classes: int, protocol: Protocol, tv_kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """torchvision's RetinaNet on P3-P7. ``num_classes`` counts background like the R-CNNs, so that labels mean
    the same in every arch; the sigmoid head's channel 0 is then never a positive (torchvision's own convention)."""
    octave_scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    sizes = tuple(tuple(size * scale for scale in octave_scales) for size in ANCHOR_SIZES)
    anchors = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))
    head = RetinaNetHead(
        FPN_CHANNELS, anchors.num_anchors_per_location()[0], num_classes, norm_layer=_norm_layer(protocol.head_norm)
    )
    model = RetinaNet(features, num_classes, anchor_generator=anchors, head=head, **tv_kwargs)
    return model, {"anchors": [list(level) for level in sizes]}


def _fpn_weights(fpn: FeaturePyramidNetwork, weights: Path | None, *, levels: tuple[int, ...], load: bool) -> dict:
    """Load the export's fpn.safetensors when there is one (and ``load``); the record says what happened."""
    if weights is None or not weights.is_dir():
        reason = "backbone_weights is a file, not an export folder" if weights else "no backbone_weights export"
        return {"from": "none", "reason": f"{reason}: the FPN starts from scratch"}
    if not (weights / "fpn.safetensors").is_file():
        return {"from": "none", "reason": f"{weights} has no fpn.safetensors: the FPN starts from scratch"}
    if not load:
        return {"from": "none", "reason": "load_fpn_weights=False: the FPN starts from scratch"}
    return _load_fpn(fpn, weights / "fpn.safetensors", levels)


def _batch_norm_mode(protocol: Protocol, *, world_size: int, device_type: str) -> tuple[bool, str]:
    """(convert trained BatchNorm to SyncBatchNorm?, what the record says about it)."""
    wants_sync = protocol.norm == "syncbn" or protocol.syncbn_when_distributed
    if world_size <= 1:
        return False, "BatchNorm statistics from each process's own images (one process)"
    if not wants_sync:
        return False, f"no SyncBatchNorm (protocol): each of {world_size} processes normalizes its own images"
    if device_type in SYNCBN_DEVICE_TYPES:
        return True, f"SyncBatchNorm across {world_size} processes"
    if protocol.norm == "syncbn":
        raise ValueError(
            f"norm='syncbn' with {world_size} processes on {device_type!r}: torch's SyncBatchNorm trains only on "
            f"{SYNCBN_DEVICE_TYPES}; use norm='bn' (per-process statistics) or a GPU"
        )
    return False, (
        f"BatchNorm per process: SyncBatchNorm needs {'/'.join(SYNCBN_DEVICE_TYPES)}, not {device_type!r}, so each "
        f"of {world_size} processes normalizes its own images"
    )


def build_detector(
    arch: str,
    *,
    backbone: str,
    num_classes: int,
    protocol: Protocol,
    pretrained: bool = True,
    backbone_weights: str | Path | None = None,
    load_fpn_weights: bool = True,
    norm: str | None = None,
    min_size: int | tuple[int, ...] | None = None,
    max_size: int | None = None,
    world_size: int = 1,
    device_type: str = "cpu",
    train_resize: str = "dataset",
    detections_per_img: int = 100,
    score_thresh: float = 0.05,
    detector_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A torchvision detector ``arch`` on the timm ``backbone``, built as ``protocol`` says; returns
    ``(model, record)``.

    ``pretrained``: timm loads ``backbone``'s own weights (False: from scratch). ``backbone_weights``: a local
    export folder (or .safetensors / .pth) loaded strictly instead, plus the folder's ``fpn.safetensors`` when the
    detector has an FPN and ``load_fpn_weights``. ``norm`` (the script's ``--norm``), ``min_size`` (one short
    side, or several to draw from in training; the test size is the largest) and ``max_size`` override the
    protocol. ``train_resize``: "dataset" (the dataset transform resizes training images to the protocol's train
    sizes and the model leaves them; the wiring ``detpretrain.data.transforms`` recommends) or "model" (the model
    draws the size); test images are always resized by the model. ``world_size`` and ``device_type`` decide
    SyncBatchNorm. ``detections_per_img`` (COCO 100, LVIS 300)
    and ``score_thresh`` apply at test time; ``detector_kwargs`` go to the torchvision class (e.g.
    ``box_batch_size_per_image``).

    ``record`` (for eval.json): ``arch``, ``backbone``, ``num_classes``, ``protocol`` (every setting in effect,
    overrides included), ``batch_norm``, ``detector`` (the settings fixed here), and ``loaded``: for
    ``backbone``, ``fpn`` and (C4) ``res5_head``, where the weights came from (``from``: zoo, timm, hf-hub,
    local-dir, export, file, or none with a ``reason``).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not one of {ARCHS}")
    if train_resize not in TRAIN_RESIZE:
        raise ValueError(f"train_resize={train_resize!r} is not one of {TRAIN_RESIZE}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: count the background too, as torchvision does (>= 2)")
    overrides: dict[str, Any] = {}
    if norm is not None:
        overrides["norm"] = norm
    if min_size is not None:
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        overrides.update(train_min_sizes=sizes, test_min_size=max(sizes))
    if max_size is not None:
        overrides.update(train_max_size=max_size, test_max_size=max_size)
    protocol = override_protocol(protocol, **overrides)

    weights = None if backbone_weights is None else Path(backbone_weights)
    if weights is not None and not pretrained:
        raise ValueError(f"pretrained=False (from scratch) contradicts backbone_weights={str(weights)!r}: drop one")
    if protocol.norm == "gn" and pretrained:
        raise ValueError(
            f"norm='gn' cannot load the BatchNorm weights of {str(weights or backbone)!r}: GroupNorm is the papers' "
            "setting for training from scratch, so pass pretrained=False (--no-pretrained) or another norm"
        )
    if arch == "retinanet" and protocol.head_norm == "bn":
        raise ValueError(
            "head_norm='bn' in RetinaNet's head, which is shared by P3-P7, would mix the statistics of all levels: "
            "use head_norm='gn' or 'none'"
        )
    sync, batch_norm = _batch_norm_mode(protocol, world_size=world_size, device_type=device_type)
    body_norm = "bn" if protocol.norm == "syncbn" else protocol.norm  # synced below, with the heads' BN

    out_indices = OUT_INDICES[arch]
    body = create_body(
        backbone,
        pretrained=pretrained and weights is None,
        out_indices=out_indices,
        norm=body_norm,
        frozen_stages=protocol.frozen_stages,
    )
    if weights is not None:
        export_arch = _export_architecture(weights)
        model_arch = body.pretrained_cfg["architecture"]
        if export_arch is not None and export_arch != model_arch:
            raise ValueError(f"{weights} holds {export_arch} weights, not {model_arch}: pass backbone={export_arch!r}")
        load_weights(body, weights)
    loaded: dict[str, Any] = {"backbone": _backbone_record(backbone, body, pretrained=pretrained, weights=weights)}
    mean, std = list(body.pretrained_cfg["mean"]), list(body.pretrained_cfg["std"])

    # Test-time limits under each class's own names; then the arch's defaults; the caller's kwargs win.
    if arch == "retinanet":
        tv_kwargs: dict[str, Any] = dict(detections_per_img=detections_per_img, score_thresh=score_thresh)
    else:
        tv_kwargs = dict(box_detections_per_img=detections_per_img, box_score_thresh=score_thresh)
    if arch == "fasterrcnn_c4":
        tv_kwargs.update(C4_RPN_TOP_N)
    tv_kwargs.update(detector_kwargs or {})

    if arch == "fasterrcnn_c4":
        res5_channels = body.feature_info.channels()[-1]
        body, res5 = _split_res5(body, backbone, protocol, body_norm)
        model, settings = _c4_detector(C4Backbone(body), res5, res5_channels, num_classes, tv_kwargs)
        loaded["fpn"] = {"from": "none", "reason": "fasterrcnn_c4 has no FPN"}
        loaded["res5_head"] = {**loaded["backbone"], "module": "roi_heads.box_head.res5"}
    else:
        extra = LastLevelP6P7(body.feature_info.channels()[-1], FPN_CHANNELS) if arch == "retinanet" else None
        features = TimmFPN(
            body, out_channels=FPN_CHANNELS, extra_blocks=extra, norm_layer=_norm_layer(protocol.fpn_norm)
        )
        if arch == "retinanet":
            model, settings = _retinanet(features, num_classes, protocol, tv_kwargs)
            settings["p6_p7_from"] = "P5" if extra.use_P5 else "C5"  # torchvision uses P5 when C5 has 256 channels
        else:
            model, settings = _rcnn_fpn(arch, features, num_classes, protocol, tv_kwargs)
        loaded["fpn"] = _fpn_weights(features.fpn, weights, levels=out_indices, load=load_fpn_weights)

    model.transform = ProtocolTransform(
        train_min_sizes=protocol.train_min_sizes,
        train_max_size=protocol.train_max_size,
        test_min_size=protocol.test_min_size,
        test_max_size=protocol.test_max_size,
        image_mean=mean,
        image_std=std,
        train_resize=train_resize,
    )
    if sync:
        model = convert_sync_batchnorm(model)
    record = {
        "arch": arch,
        "backbone": backbone,
        "num_classes": num_classes,
        "protocol": protocol.as_dict(),
        "batch_norm": batch_norm,
        "detector": {
            "out_indices": list(out_indices),
            **settings,
            "train_resize": train_resize,
            "torchvision_kwargs": tv_kwargs,
        },
        "loaded": loaded,
    }
    return model, record
