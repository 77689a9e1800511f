"""torchvision detectors on any timm backbone, built as a fine-tuning protocol says, with a record of what loaded.

Backbones: any timm model with ``features_only`` maps at the strides the arch reads (``LEVEL_STRIDES``), found in
its ``feature_info`` whatever their indices (``detpretrain.backbone.choose_levels``): ResNet / ResNeXt, RegNet,
ConvNeXt, EfficientNet, MobileNet, and the ViT-style models whose levels reach strides 4..32. Others (a plain ViT:
every level at stride 16) are refused with ``detpretrain.backbone.BackboneError``, one line naming what is missing.
C2..C5 below mean the levels at strides 4..32 of any such model, res5 the modules that produce C5 from C4.

Architectures (``ARCHS``):

- ``fasterrcnn``, ``maskrcnn``: torchvision's FasterRCNN / MaskRCNN on ``TimmFPN`` (P2-P5 from C2-C5, P6 by max
  pool for the RPN only); anchors 32..512, one size per level x ratios (0.5, 1, 2); RoIAlign 7x7 (box) and 14x14
  (mask) on P2-P5; box head per the protocol (2fc: TwoMLPHead 1024; 4conv1fc: FastRCNNConvFCHead 4 x 256 conv +
  1 x 1024 fc); mask head MaskRCNNHeads (4 x 256 conv) and MaskRCNNPredictor. RPN and ROI sampling (256 anchors
  and 512 proposals per image, IoU thresholds 0.3/0.7 and 0.5) are torchvision's defaults, the same as detectron2's.
- ``retinanet``: torchvision's RetinaNet on ``TimmFPN`` over C3-C5 with P6 and P7 from C5 (``LastLevelP6P7``), as
  the RetinaNet paper and detectron2 (torchvision's v2 model takes P5 instead); anchors 32..512 x 2^(0, 1/3, 2/3)
  x (0.5, 1, 2) per level (the sizes as the defaults below say).
- ``fasterrcnn_c4``: Faster R-CNN C4, the Jigsaw paper's main table (montage_jigsaw.txt Tab. 3; PAPER_NOTES,
  "Faster R-CNN C4"). torchvision has no C4 model; it is built from torchvision's parts like detectron2's
  Res5ROIHeads: stem..res4 give one stride-16 map; the RPN runs on it with 15 anchors (32..512 x 3 ratios); RoIAlign
  14x14; the ROI head is the backbone's res5 stage (its first block strides 2: 14 -> 7) initialized from the same
  pre-trained weights, then global average pooling and FastRCNNPredictor. The paper credits that transfer of res5
  for its C4 gain (§4.2), so res5 is a copy of the pre-trained stage, never a fresh one. res5 is ``layer4`` of a
  ResNet, ``stages_3`` of a ConvNeXt, ``blocks.5-6`` of an EfficientNet; a model whose stride-32 stage is not a run
  of sibling modules mapping C4 to C5 is refused. RPN top-k are detectron2's Base-RCNN-C4 values (12000/2000 train,
  6000/1000 test) under both defaults: torchvision has no C4 values.

The protocol (``detpretrain.detection.protocols``) sets the backbone norm and frozen stages, FPN and head norms, the
box head, and the sizes. The model's transform (``ProtocolTransform``) always resizes test images (torchvision's
GeneralizedRCNNTransform would test at ``min_size[-1]`` with the train ``max_size``; this one switches sizes with
``train()`` / ``eval()``); training images are resized by the dataset transform (``train_resize="dataset"``, the
default, so the random size comes from the sample's generator) or by the model (``"model"``).

Detector defaults (``protocol.detector_defaults``). PreDet fine-tuned in detectron2, whose defaults differ from
torchvision's on a few points; the ``predet`` presets take detectron2's wherever torchvision's classes let us set
them, the ``jigsaw`` and ``standard`` presets torchvision's (``detpretrain.detection.parts`` holds the parts):

    point                                   "detectron2" (predet presets)         "torchvision" (jigsaw, standard)
    RoIAlign (box, mask, C4)                ROIAlignV2: aligned, sampling 0       not aligned, sampling_ratio 2
    RPN post-NMS top-n in training (FPN)    1000 per image (POST_NMS_TOPK_TRAIN)  2000 per image
    anchors                                 unrounded, nominal level strides      rounded to whole pixels, stride =
                                                                                  padded size // map size
    RetinaNet anchor sizes                  32 x 2^(k/3) as computed              int(32 x 2^(k/3)): 32, 40, 50, ...
                                                                                  (torchvision's retinanet v1)

Both: box decoding in float32 under any autocast (``parts.Float32BoxCoder``), float32 anchors. Not settable in
torchvision's classes, so torchvision's under both defaults (the record lists them): the box regression loss of the
RPN and ROI heads is smooth L1 with beta 1/9 (detectron2: L1, SMOOTH_L1_BETA 0); RetinaNet regresses with L1 and
normalizes its losses per image by the foreground count (detectron2: smooth L1 with beta 0.1, a normalizer averaged
over iterations).

Weights (``build_detector``): ``pretrained=True`` lets timm load the backbone name's weights (a zoo tag such as
``resnet50.jigsaw``, any timm tag, ``hf-hub:org/repo``); ``backbone_weights=PATH`` builds without them and loads
a local export (or .safetensors / .pth) strictly with ``detpretrain.hub.load_weights``, then the export's
``fpn.safetensors`` (PreDet's pre-trained FPN) into the detector's FPN, level by level, and its
``heads.safetensors`` (PreDet's heads) into the RPN conv and the 2fc box head where shapes match
(``detpretrain.detection.predet_heads``). The returned record says which parts loaded from where; finetune.py writes
it into eval.json.

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
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detpretrain.backbone import (
    BackboneError,
    TimmFPN,
    body_stages,
    choose_levels,
    create_body,
    feature_module_path,
    freeze_stages,
    group_norm,
    norm_layers,
)
from detpretrain.detection.parts import AlignedRoIPooler, DetectorAnchorGenerator, Float32BoxCoder
from detpretrain.detection.predet_heads import HEADS_FILE, load_predet_heads
from detpretrain.detection.protocols import Protocol, override_protocol
from detpretrain.hub import check_keys, load_weights, read_weights
from detpretrain.zoo import find_entry

__all__ = ["ARCHS", "LEVEL_STRIDES", "TRAIN_RESIZE", "C4Backbone", "ProtocolTransform", "build_detector"]

ARCHS = ("fasterrcnn", "fasterrcnn_c4", "maskrcnn", "retinanet")
TRAIN_RESIZE = ("dataset", "model")  # who resizes training images to the protocol's train sizes
SYNCBN_DEVICE_TYPES = ("cuda", "xpu", "hpu")  # where torch's SyncBatchNorm trains (its forward checks this)
FPN_CHANNELS = 256
FPN_LEVELS = ("0", "1", "2", "3")  # P2-P5, TimmFPN's names
# The strides of the body levels each arch reads (their timm indices differ by family: ``choose_levels``): C2-C5 for
# the R-CNN FPN, C3-C5 for RetinaNet, C4 and C5 for the C4 model (C5 only to take res5 out as the ROI head).
LEVEL_STRIDES = {"fasterrcnn": (4, 8, 16, 32), "maskrcnn": (4, 8, 16, 32), "retinanet": (8, 16, 32)}
LEVEL_STRIDES["fasterrcnn_c4"] = (16, 32)
_NEEDED_BY = {  # what needs the strides, for the refusal of a backbone without them
    "fasterrcnn": "the FPN (fasterrcnn)",
    "maskrcnn": "the FPN (maskrcnn)",
    "retinanet": "RetinaNet's FPN",
    "fasterrcnn_c4": "fasterrcnn_c4 (a stride-16 body and the stride-32 stage as its ROI head)",
}
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
TORCHVISION_SAMPLING = 2  # the RoIAlign sampling_ratio of torchvision's own detectors
# detectron2's Base-RCNN-FPN keeps 1000 proposals per image in training (RPN.POST_NMS_TOPK_TRAIN; torchvision 2000);
# the other RPN top-n (2000 per level before NMS in training, 1000 / 1000 at test time) are the same in both.
DETECTRON2_FPN_RPN_TOP_N = dict(rpn_post_nms_top_n_train=1000)
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


def _anchor_generator(
    sizes_per_level: tuple[tuple[float, ...], ...], *, exact: bool, strides: tuple[int, ...]
) -> DetectorAnchorGenerator:
    return DetectorAnchorGenerator(
        sizes_per_level, (ASPECT_RATIOS,) * len(sizes_per_level), exact=exact, strides=strides if exact else None
    )


def _rpn(
    in_channels: int, sizes_per_level: tuple[tuple[float, ...], ...], *, exact: bool, strides: tuple[int, ...]
) -> tuple[DetectorAnchorGenerator, RPNHead]:
    anchors = _anchor_generator(sizes_per_level, exact=exact, strides=strides)
    return anchors, RPNHead(in_channels, anchors.num_anchors_per_location()[0])


def _box_head(protocol: Protocol) -> nn.Module:
    if protocol.box_head == "2fc":
        return TwoMLPHead(FPN_CHANNELS * 7 * 7, 1024)
    return FastRCNNConvFCHead(
        (FPN_CHANNELS, 7, 7), [256, 256, 256, 256], [1024], norm_layer=_norm_layer(protocol.head_norm)
    )


def _aligned_poolers(model: nn.Module, strides: tuple[int, ...]) -> None:
    """detectron2's ROIAlignV2 in place of the ROI heads' MultiScaleRoIAlign (torchvision's constructors accept no
    other pooler type): the same maps and output sizes."""
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(model.roi_heads, name, None)
        if pool is not None:
            size = pool.output_size[0]
            setattr(
                model.roi_heads,
                name,
                AlignedRoIPooler(featmap_names=pool.featmap_names, strides=strides, output_size=size),
            )


def _float32_box_coders(model: nn.Module) -> None:
    """``Float32BoxCoder`` for every box coder torchvision's classes hold (RPN, ROI heads, RetinaNet and its
    regression head), with the same weights and clip."""
    for module in model.modules():
        coder = getattr(module, "box_coder", None)
        if isinstance(coder, BoxCoder):
            module.box_coder = Float32BoxCoder(coder.weights, coder.bbox_xform_clip)


def _split_res5(
    full: nn.Module, backbone: str, protocol: Protocol, norm: str
) -> tuple[nn.Module, nn.Module, list[str]]:
    """(stem..res4 body, res5 head, res5's module paths in ``full``) from a body on the stride-16 and 32 levels.

    res5 is the run of modules after the one that produces C4, up to the one that produces C5, siblings in one
    container: ``layer4`` (ResNet), ``s4`` (RegNet), ``stages_3`` (ConvNeXt), ``blocks.5, blocks.6`` (EfficientNet,
    whose stride-32 stage is two block groups). It keeps the weights ``full`` has. The stem..res4 body is a second
    features_only model of the same architecture on the C4 level, given the full body's other weights (same keys);
    the res5 blocks that timm's own feature classes (EfficientNet's, MobileNet's) keep anyway are removed from it.
    """

    def refused(why: str) -> BackboneError:
        return BackboneError(
            f"{backbone}: {why}, so its stride-32 stage cannot become the C4 ROI head; use fasterrcnn (FPN) with it"
        )

    c4_index = full.feature_info.out_indices[0]
    c4_path, c5_path = (feature_module_path(full, module) for module in full.feature_info.module_name())
    if c4_path is None or c5_path is None or c4_path.rpartition(".")[0] != c5_path.rpartition(".")[0]:
        modules = " and ".join(full.feature_info.module_name())
        raise refused(f"its C4 and C5 come from {modules}, not two sibling modules of its {type(full).__name__}")
    parent_path, _, c4_name = c4_path.rpartition(".")
    parent = full.get_submodule(parent_path)
    names = [name for name, _ in parent.named_children()]
    head_names = names[names.index(c4_name) + 1 : names.index(c5_path.rpartition(".")[2]) + 1]
    head_paths = [f"{parent_path}.{name}" if parent_path else name for name in head_names]
    res5 = parent.get_submodule(head_names[0])
    if len(head_names) > 1:
        res5 = nn.Sequential(OrderedDict((name, parent.get_submodule(name)) for name in head_names))
    _check_res5(res5, full.feature_info.channels(), refused)

    body = create_body(backbone, pretrained=False, out_indices=(c4_index,), norm=norm)
    body_parent = body.get_submodule(parent_path)
    for name in head_names:
        if hasattr(body_parent, name):
            delattr(body_parent, name)
    head_prefixes = tuple(f"{path}." for path in head_paths)
    body.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(head_prefixes)})
    # res5 is frozen (or not) in ``full`` already; the res4 body has the stem and 3 stages to freeze.
    freeze_stages(body, min(protocol.frozen_stages, 4))
    return body, res5, head_paths


def _check_res5(res5: nn.Module, channels: list[int], refused) -> None:
    """res5 must map a 14 x 14 C4 RoI to a 7 x 7 C5 map (NCHW): run it once, in eval mode, without gradients."""
    was_training = res5.training
    res5.eval()
    try:
        with torch.no_grad():
            out = res5(torch.zeros(1, channels[0], 14, 14))
    except Exception as err:  # a foreign stage can fail in any way: refused with its reason
        raise refused(f"its res5 does not run on a ({channels[0]}, 14, 14) RoI ({str(err).splitlines()[0]})") from err
    finally:
        res5.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, channels[1], 7, 7):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise refused(f"its res5 maps a ({channels[0]}, 14, 14) RoI to {shape}, not ({channels[1]}, 7, 7)")


def _body_record(model: nn.Module, res5_paths: list[str], *, norm: str, c5_stride: int) -> dict[str, Any]:
    """The backbone's stages (stem, stage1..4: modules, frozen or not; C4's stage4 is the ROI head) and its norm
    layers after the protocol's norm, with those the norm setting leaves as they are (LayerNorm)."""
    body = model.backbone.body
    params = dict(body.named_parameters())

    def frozen(names: list[str], tensors: dict[str, torch.Tensor]) -> bool:
        return bool(names) and not any(tensors[name].requires_grad for name in names)

    stages = [
        {"name": stage["name"], "stride": stage["stride"], "modules": stage["modules"]}
        | {"frozen": frozen(stage["parameters"], params)}
        for stage in body_stages(body)
    ]
    norms = norm_layers(body)
    if res5_paths:
        res5 = model.roi_heads.box_head.res5
        res5_params = dict(res5.named_parameters())
        stages.append(
            {"name": f"stage{len(stages)}", "stride": c5_stride, "modules": res5_paths}
            | {"module": "roi_heads.box_head.res5", "frozen": frozen(list(res5_params), res5_params)}
        )
        norms = {k: norms.get(k, 0) + norm_layers(res5).get(k, 0) for k in sorted({*norms, *norm_layers(res5)})}
    converted = ("GroupNorm", "GroupNormAct") if norm == "gn" else ()
    untouched = [k for k in norms if "BatchNorm" not in k and k not in converted]
    note = f"norm={norm!r} acts on BatchNorm only" + (
        f"; left as they are: {', '.join(untouched)}" if untouched else ""
    )
    return {"stages": stages, "norm_layers": norms, "norm": note}


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


def _load_fpn(fpn: FeaturePyramidNetwork, path: Path, strides: tuple[int, ...]) -> dict[str, Any]:
    """Load an export's ``fpn.safetensors`` into ``fpn`` (built on the body levels of ``strides``), strictly, level
    by level.

    The export's FPN is taken to end at C5, stride 32 (PreDet pre-trains P2-P6 on C2-C5, PAPER_NOTES "CRPN"); a
    detector whose FPN starts higher (RetinaNet: C3-C5) gets the export's blocks of the same levels, which compute
    exactly the same P3-P5 (the top-down path never reads P2). Extra blocks the export lacks (RetinaNet's P6/P7
    convs) stay at their init and are named in the record; anything else missing, unexpected, or of another
    shape raises before a tensor is copied.
    """
    state = read_weights(path)
    blocks = ("inner_blocks", "layer_blocks")
    n_export = len({k.split(".")[1] for k in state if k.startswith(blocks)})
    export_strides = tuple(32 // 2**k for k in reversed(range(n_export)))  # (4, 8, 16, 32) for C2-C5
    if not export_strides:
        raise ValueError(f"{path} holds no FPN blocks (inner_blocks / layer_blocks): export the FPN again")
    if not set(strides) <= set(export_strides):
        raise ValueError(
            f"{path} holds an FPN on C{_level(export_strides[0])}-C5 but this detector's FPN needs "
            f"C{_level(strides[0])}-C5: pass load_fpn_weights=False to start the FPN from scratch"
        )
    offset = export_strides.index(strides[0])
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
    record: dict[str, Any] = {"from": "export", "weights": str(path), "levels": [f"P{_level(s)}" for s in strides]}
    if export_strides != strides:
        record["not_used"] = [f"P{_level(s)}" for s in export_strides if s not in strides]
    if new:
        record["new"] = sorted({k.split(".")[1] for k in new})  # e.g. ["p6", "p7"] for RetinaNet
    return record


def _level(stride: int) -> int:
    """The pyramid level of a stride: C2 / P2 at stride 4 ... C5 / P5 at stride 32."""
    return stride.bit_length() - 1


def _c4_detector(
    features: C4Backbone, res5: nn.Module, res5_channels: int, num_classes: int, *, exact: bool, tv_kwargs: dict
) -> tuple[nn.Module, dict[str, Any]]:
    """Faster R-CNN C4 from torchvision's parts: RPN on C4, RoIAlign 14x14, res5 + average pool as the box head."""
    stride = features.body.feature_info.reduction()[-1]
    anchors, rpn_head = _rpn(features.out_channels, (ANCHOR_SIZES,), exact=exact, strides=(stride,))
    box_head = nn.Sequential(OrderedDict(res5=res5, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(start_dim=1)))
    model = FasterRCNN(
        features,
        num_classes=None,  # torchvision wants None when the predictor is given
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        # 14x14 on the stride-16 map, as detectron2's C4 (POOLER_RESOLUTION 14); alignment and sampling follow the
        # detector defaults (replaced below by ROIAlignV2 for detectron2's)
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=TORCHVISION_SAMPLING),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(res5_channels, num_classes),
        **tv_kwargs,
    )
    if exact:
        _aligned_poolers(model, (stride,))
    return model, {"anchors": [list(ANCHOR_SIZES)], "box_roi_align": 14, "box_head": "res5"}


def _rcnn_fpn(
    arch: str, features: TimmFPN, num_classes: int, protocol: Protocol, *, exact: bool, tv_kwargs: dict
) -> tuple[nn.Module, dict[str, Any]]:
    """torchvision's FasterRCNN / MaskRCNN on the FPN, with the protocol's box head and head norm."""
    strides = tuple(features.body.feature_info.reduction())  # P2-P5, the pooled maps
    anchor_strides = (*strides, 2 * strides[-1])  # P6 is P5 max-pooled with stride 2
    anchors, rpn_head = _rpn(FPN_CHANNELS, tuple((size,) for size in ANCHOR_SIZES), exact=exact, strides=anchor_strides)
    pool = dict(featmap_names=list(FPN_LEVELS), sampling_ratio=TORCHVISION_SAMPLING)
    common = dict(
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        box_roi_pool=MultiScaleRoIAlign(output_size=7, **pool),
        box_head=_box_head(protocol),
        box_predictor=FastRCNNPredictor(1024, num_classes),
        **tv_kwargs,
    )
    settings: dict[str, Any] = {"anchors": [[size] for size in ANCHOR_SIZES], "box_roi_align": 7}
    if arch == "fasterrcnn":
        model = FasterRCNN(features, **common)
    else:
        mask_head = MaskRCNNHeads(FPN_CHANNELS, [256, 256, 256, 256], 1, norm_layer=_norm_layer(protocol.head_norm))
        model = MaskRCNN(
            features,
            mask_roi_pool=MultiScaleRoIAlign(output_size=14, **pool),
            mask_head=mask_head,
            mask_predictor=MaskRCNNPredictor(256, 256, num_classes),
            **common,
        )
        settings["mask_roi_align"] = 14
    if exact:
        _aligned_poolers(model, strides)
    return model, settings


def _retinanet(
    features: TimmFPN, num_classes: int, protocol: Protocol, *, exact: bool, tv_kwargs: dict
) -> tuple[nn.Module, dict[str, Any]]:
    """torchvision's RetinaNet on P3-P7. ``num_classes`` counts background like the R-CNNs, so that labels mean
    the same in every arch; the sigmoid head's channel 0 is then never a positive (torchvision's own convention)."""
    octave_scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    if exact:  # detectron2's RetinaNet: ANCHOR_GENERATOR.SIZES [[x, x * 2**(1/3), x * 2**(2/3)] for x in 32..512]
        sizes = tuple(tuple(size * scale for scale in octave_scales) for size in ANCHOR_SIZES)
    else:  # torchvision's retinanet_resnet50_fpn (_default_anchorgen) rounds them down to whole pixels
        sizes = tuple(tuple(int(size * scale) for scale in octave_scales) for size in ANCHOR_SIZES)
    c5_stride = features.body.feature_info.reduction()[-1]
    strides = (*features.body.feature_info.reduction(), 2 * c5_stride, 4 * c5_stride)  # P3-P5, then P6 and P7
    anchors = _anchor_generator(sizes, exact=exact, strides=strides)
    head = RetinaNetHead(
        FPN_CHANNELS, anchors.num_anchors_per_location()[0], num_classes, norm_layer=_norm_layer(protocol.head_norm)
    )
    model = RetinaNet(features, num_classes, anchor_generator=anchors, head=head, **tv_kwargs)
    return model, {"anchors": [list(level) for level in sizes]}


def _fpn_weights(fpn: FeaturePyramidNetwork, weights: Path | None, *, strides: tuple[int, ...], load: bool) -> dict:
    """Load the export's fpn.safetensors when there is one (and ``load``); the record says what happened."""
    if weights is None or not weights.is_dir():
        reason = "backbone_weights is a file, not an export folder" if weights else "no backbone_weights export"
        return {"from": "none", "reason": f"{reason}: the FPN starts from scratch"}
    if not (weights / "fpn.safetensors").is_file():
        return {"from": "none", "reason": f"{weights} has no fpn.safetensors: the FPN starts from scratch"}
    if not load:
        return {"from": "none", "reason": "load_fpn_weights=False: the FPN starts from scratch"}
    return _load_fpn(fpn, weights / "fpn.safetensors", strides)


def _head_weights(model: nn.Module, weights: Path | None, *, load: bool) -> dict:
    """Load the export's heads.safetensors (PreDet's heads) when there is one (and ``load``); the record says what
    was initialized from it and why the rest was not."""
    if weights is None or not weights.is_dir():
        reason = "backbone_weights is a file, not an export folder" if weights else "no backbone_weights export"
        return {"from": "none", "reason": f"{reason}: the heads start from scratch"}
    if not (weights / HEADS_FILE).is_file():
        return {"from": "none", "reason": f"{weights} has no {HEADS_FILE}: the heads start from scratch"}
    if not load:
        return {"from": "none", "reason": "load_head_weights=False: the heads start from scratch"}
    return load_predet_heads(model, weights / HEADS_FILE)


def _defaults_record(arch: str, *, exact: bool) -> dict[str, Any]:
    """What ``detector_defaults`` fixed (the module docstring's table), and what torchvision fixes under both."""
    record: dict[str, Any] = {
        "anchor_generator": {
            "cell_anchors": "unrounded" if exact else "rounded to whole pixels",
            "strides": "nominal per level" if exact else "padded image size // map size",
            "dtype": "float32",
        },
        "box_decoding": "float32 under any autocast",
    }
    if arch == "retinanet":
        record["losses_fixed_by_torchvision"] = (
            "L1 box regression, focal loss normalized per image by its foreground count (detectron2: smooth L1 "
            "beta 0.1, a normalizer averaged over iterations)"
        )
    else:
        record["roi_align"] = {"aligned": exact, "sampling_ratio": 0 if exact else TORCHVISION_SAMPLING}
        record["losses_fixed_by_torchvision"] = "smooth L1 beta 1/9 in the RPN and ROI box losses (detectron2: L1)"
    return record


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
    load_head_weights: bool = True,
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
    detector has an FPN and ``load_fpn_weights``, and its ``heads.safetensors`` (PreDet's heads: the RPN conv and
    the 2fc box head, ``detpretrain.detection.predet_heads``) when ``load_head_weights``. ``norm`` (the script's
    ``--norm``), ``min_size`` (one short side, or several to draw from in training; the test size is the largest)
    and ``max_size`` override the protocol. ``train_resize``: "dataset" (the dataset transform resizes training
    images to the protocol's train sizes and the model leaves them; the wiring ``detpretrain.data.transforms``
    recommends) or "model" (the model draws the size); test images are always resized by the model. ``world_size``
    and ``device_type`` decide SyncBatchNorm. ``detections_per_img`` (COCO 100, LVIS 300) and ``score_thresh``
    (COCO 0.05, LVIS 0.0001) apply at test time; ``detector_kwargs`` go to the torchvision class (e.g.
    ``box_batch_size_per_image``) and win over the values the protocol's ``detector_defaults`` set.

    ``record`` (for eval.json): ``arch``, ``backbone``, ``num_classes``, ``protocol`` (every setting in effect,
    overrides included), ``batch_norm``, ``body`` (the timm levels taken: ``levels`` with their indices, strides,
    channels and modules; ``stages``: stem and stages 1..4 with their modules and whether frozen; ``norm_layers`` by
    type, and in ``norm`` those the norm setting leaves as they are), ``detector`` (the settings fixed here, with what
    torchvision fixes that detectron2 does otherwise), and ``loaded``: for ``backbone``, ``fpn``, ``heads`` and (C4)
    ``res5_head``, where the weights came from (``from``: zoo, timm, hf-hub, local-dir, export, file, or none with a
    ``reason``).
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

    out_indices = choose_levels(backbone, LEVEL_STRIDES[arch], needed_by=_NEEDED_BY[arch])
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
    info = body.feature_info
    levels = {"indices": list(out_indices), "strides": info.reduction(), "channels": info.channels()}
    levels["modules"] = info.module_name()

    # Test-time limits under each class's own names; then the arch's defaults; the caller's kwargs win.
    if arch == "retinanet":
        tv_kwargs: dict[str, Any] = dict(detections_per_img=detections_per_img, score_thresh=score_thresh)
    else:
        tv_kwargs = dict(box_detections_per_img=detections_per_img, box_score_thresh=score_thresh)
    exact = protocol.detector_defaults == "detectron2"
    if arch == "fasterrcnn_c4":
        tv_kwargs.update(C4_RPN_TOP_N)
    elif arch != "retinanet" and exact:
        tv_kwargs.update(DETECTRON2_FPN_RPN_TOP_N)
    tv_kwargs.update(detector_kwargs or {})

    if arch == "fasterrcnn_c4":
        res5_channels = body.feature_info.channels()[-1]
        body, res5, res5_paths = _split_res5(body, backbone, protocol, body_norm)
        model, settings = _c4_detector(
            C4Backbone(body), res5, res5_channels, num_classes, exact=exact, tv_kwargs=tv_kwargs
        )
        loaded["fpn"] = {"from": "none", "reason": "fasterrcnn_c4 has no FPN"}
        loaded["res5_head"] = {**loaded["backbone"], "module": "roi_heads.box_head.res5", "from_body": res5_paths}
    else:
        res5_paths = []
        extra = LastLevelP6P7(body.feature_info.channels()[-1], FPN_CHANNELS) if arch == "retinanet" else None
        features = TimmFPN(
            body, out_channels=FPN_CHANNELS, extra_blocks=extra, norm_layer=_norm_layer(protocol.fpn_norm)
        )
        if arch == "retinanet":
            model, settings = _retinanet(features, num_classes, protocol, exact=exact, tv_kwargs=tv_kwargs)
            settings["p6_p7_from"] = "P5" if extra.use_P5 else "C5"  # torchvision uses P5 when C5 has 256 channels
        else:
            model, settings = _rcnn_fpn(arch, features, num_classes, protocol, exact=exact, tv_kwargs=tv_kwargs)
        loaded["fpn"] = _fpn_weights(features.fpn, weights, strides=tuple(levels["strides"]), load=load_fpn_weights)
    loaded["heads"] = _head_weights(model, weights, load=load_head_weights)
    _float32_box_coders(model)
    settings.update(_defaults_record(arch, exact=exact))

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
        "body": {
            "levels": levels,
            **_body_record(model, res5_paths, norm=protocol.norm, c5_stride=levels["strides"][-1]),
        },
        "detector": {
            "out_indices": list(out_indices),
            **settings,
            "train_resize": train_resize,
            "torchvision_kwargs": tv_kwargs,
        },
        "loaded": loaded,
    }
    return model, record
