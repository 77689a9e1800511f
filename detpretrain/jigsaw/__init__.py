"""Jigsaw (Montage) pre-training mechanisms: sample extraction, Jigsaw assembly and ERF-adaptive label weights.

Zhou et al., "Cheaper Pre-training Lunch: An Efficient Paradigm for Object Detection" (``papers/montage_jigsaw.txt``).
One concept per module; every public name is also importable from ``detpretrain.jigsaw`` itself.

- ``records`` (§3.1's input): ``ImageRecord`` and ``DetectionRecords``, ``coco_image_records`` and
  ``voc_image_records`` (read by the fine-tuning datasets of ``detpretrain.data``, so pre-training and fine-tuning
  share one parser, one cleaning policy and one label order).
- ``planning`` (§3.1): the crop windows of the positive and negative samples, ``plan_samples``; box math only.
- ``samples`` (§3.1): the sample directory's format and its reader, ``JigsawSamples`` (one sample per index).
- ``extraction`` (§3.1): ``extract_samples``: every rank and worker writes shards of one sample directory; a kill or
  a bad image costs nothing. ``encode_sample``: how a sample is stored (JPEG q95, 4:4:4), and what that costs.
- ``template`` (§3.2, Fig. 4): the S/T/W groups, ``JigsawTemplate`` and its presets ``JIGSAW_TEMPLATES``, and the
  region of each feature cell (``feature_region_index``).
- ``assembly`` (§3.2, §4.1): ``assemble_jigsaw``, ``sample_jigsaw``, ``normalize_jigsaw_image``.
- ``model`` (§3.3, Fig. 5): ``create_backbone`` (the residual init the ERF depends on) and ``JigsawClassifier`` (the
  final FC as a 1x1 convolution).
- ``erf`` (§3.3): ``compute_erf`` (gradient ERF as in Luo et al. [17]), ``erf_region_shares`` and
  ``erf_label_weights`` (Eq. 2). The losses (Eq. 1 and the three strategies of Tab. 2) are in ``detpretrain.losses``.
- ``visualize`` (``--visualize``, Fig. 6): ``render_jigsaw``, ``render_erf``.

Where the paper is silent the reading is ours; each is marked "(our choice)" in a comment and is listed in
``PAPER_NOTES.md`` ("Jigsaw / Montage"), which also reconstructs Eq. 2 and the lost template of Fig. 4.

Glossary (names and shapes used throughout):

    N              boxes of one image
    S              samples in a sample directory (or planned for one)
    R = 4          template regions, always in the order REGION_NAMES: top_left (smaller S-sample),
                   top_right (W-sample), bottom_left (T-sample), bottom_right (larger S-sample)
    H, W           canvas (assembled image) height and width, 224 x 224 by default
    h, w           the last feature map (stride 32 before pooling: 7 x 7 on a 224 canvas)
    B              assembled images in a batch
    gt_boxes       (N, 4) float32 xyxy, pixels, inside the image
    labels         class indices: 0 = background (negative samples), 1..C = the dataset's categories
    sample boxes   (S, 4) int64 xyxy: the crop window of each sample in its source image (integer pixel edges)
    erf            (h, w, H, W) float >= 0: mean |d feature(j, k) / d input| summed over RGB
    shares         (h, w, R) float: rho_i of Eq. 2, the share of the ERF mass of position (j, k) inside region i
    label_weights  (h, w, R) float: w_i of Eq. 2; each position's weights sum to 1
    region_index   (h, w) int64 in [0, R): the region that holds the centre of each feature cell
"""

from detpretrain.jigsaw.assembly import (
    FIT_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JigsawImage,
    assemble_jigsaw,
    normalize_jigsaw_image,
    sample_jigsaw,
)
from detpretrain.jigsaw.erf import compute_erf, erf_label_weights, erf_region_shares, label_weights_from_shares
from detpretrain.jigsaw.extraction import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_SHARD_SIZE,
    JPEG_SUBSAMPLING,
    encode_sample,
    extract_samples,
)
from detpretrain.jigsaw.model import JigsawClassifier, create_backbone, has_zero_init_last
from detpretrain.jigsaw.planning import (
    SamplePlan,
    plan_negative_samples,
    plan_positive_samples,
    plan_samples,
    seeded_generator,
)
from detpretrain.jigsaw.records import (
    BACKGROUND_LABEL,
    DetectionRecords,
    ImageRecord,
    coco_image_records,
    dataset_records,
    voc_image_records,
)
from detpretrain.jigsaw.samples import (
    MANIFEST_NAME,
    SAMPLE_FORMAT_VERSION,
    SKIPPED_NAME,
    JigsawSample,
    JigsawSamples,
    SampleDirError,
)
from detpretrain.jigsaw.template import (
    GROUPS,
    JIGSAW_TEMPLATES,
    REGION_GROUPS,
    REGION_NAMES,
    JigsawTemplate,
    feature_region_index,
    get_template,
    sample_group,
)
from detpretrain.jigsaw.visualize import REGION_COLORS, render_erf, render_jigsaw

__all__ = [
    "BACKGROUND_LABEL",
    "DEFAULT_JPEG_QUALITY",
    "DEFAULT_SHARD_SIZE",
    "FIT_MODES",
    "GROUPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JIGSAW_TEMPLATES",
    "JPEG_SUBSAMPLING",
    "MANIFEST_NAME",
    "REGION_COLORS",
    "REGION_GROUPS",
    "REGION_NAMES",
    "SAMPLE_FORMAT_VERSION",
    "SKIPPED_NAME",
    "DetectionRecords",
    "ImageRecord",
    "JigsawClassifier",
    "JigsawImage",
    "JigsawSample",
    "JigsawSamples",
    "JigsawTemplate",
    "SampleDirError",
    "SamplePlan",
    "assemble_jigsaw",
    "coco_image_records",
    "compute_erf",
    "create_backbone",
    "dataset_records",
    "encode_sample",
    "erf_label_weights",
    "erf_region_shares",
    "extract_samples",
    "feature_region_index",
    "get_template",
    "has_zero_init_last",
    "label_weights_from_shares",
    "normalize_jigsaw_image",
    "plan_negative_samples",
    "plan_positive_samples",
    "plan_samples",
    "render_erf",
    "render_jigsaw",
    "sample_group",
    "sample_jigsaw",
    "seeded_generator",
    "voc_image_records",
]
