"""The embedded default dataset: a small synthetic COCO-format detection dataset, generated once and cached.

Every script runs with no data flags on this dataset, so the README's main command works on a fresh machine with
no downloads. ``synthetic_coco()`` returns the paths; the first call generates the dataset (one to two seconds on
one CPU core for the default size) and later calls reuse the cached copy.

What it holds, and why (each property serves a consumer):

- Real JPEG files laid out like COCO 2017 (``train/``, ``val/``, ``annotations/instances_{train,val}.json``),
  images of varied size and aspect ratio (long side 256..320 px, landscape and portrait), some with no objects.
- Eight categories that differ in shape, colour and texture, so that a detector fine-tuned for a few hundred CPU
  iterations learns something. Their ids are sparse like COCO's (1, 2, 4, 7, 11, 16, 22, 29), so consumers that
  assume contiguous ids fail here and not only on real data. Image ids are sparse too.
- Objects from 16 px to about 60% of the short side, with aspect ratios (width / height) in all three Jigsaw
  groups (paper §3.1): S in [0.5, 1.5], T below 0.5 (``bar``), W above 1.5 (``banner``); the other shapes
  spread over S and the tails. Objects cover at most 45% of an image with their boxes, leaving background for
  Jigsaw's negatives.
- Cluttered backgrounds (low-frequency colour noise, an illumination gradient, muted blobs and lines, pixel noise)
  in muted colours, against saturated, outlined, textured objects: image gradients separate objects from clutter
  the way PreDet's EdgeBoxes proposals need, without the background being flat.
- Exact masks: each shape is a polygon rasterized by pycocotools itself, so a mask decoded from the json is
  exactly the pixels that were painted. Later objects occlude earlier ones; an annotation describes the visible
  part: its polygon when nothing covers it, else the RLE of its visible pixels. Boxes are the tight box of the
  visible mask (COCO xywh) and ``area`` is its pixel count. A placement that would hide more than half of an
  object below it is redrawn, so no annotation is a sliver and no unannotated fragment is painted.
- A few crowd regions (``iscrowd: 1``, RLE), clusters of small shapes of one category, as in real COCO.

Deterministic: the generator version and the parameters fix every byte. Images are drawn with integer
arithmetic (numpy and Pillow's fixed-point resampling), polygon vertices are rounded to 1/100 px, and JPEGs are
saved with fixed settings; the same numpy and Pillow (with its bundled libjpeg-turbo) give identical files.

Cached after first use in ``$DETPRETRAIN_CACHE`` (default ``~/.cache/detpretrain``), in a folder named by the
generator version and a hash of the parameters. A dataset is written into a temporary folder and renamed into
place, with its manifest written last, so that processes that generate at once (torchrun ranks, parallel tests)
never see a half-written dataset: the first rename wins and the others discard their copy.

Command line, to generate the default dataset and print its paths::

    python -m detpretrain.data.synthetic [--root DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

__all__ = ["GENERATOR_VERSION", "SyntheticCoco", "default_cache_dir", "synthetic_coco"]

logger = logging.getLogger(__name__)

# Bump whenever any output byte would change: the cache folder name carries it, so old caches are not reused.
GENERATOR_VERSION = 1

MANIFEST_NAME = "MANIFEST.json"

# Layout limits, in pixels unless named a fraction. Not parameters: they define what this dataset is.
_MIN_OBJECT_SCALE = 16  # sqrt(w * h) of the smallest object, before clipping by the frame and occlusion
_MAX_OBJECT_SCALE_FRACTION = 0.6  # largest sqrt(w * h), as a fraction of the image's short side
_MIN_OBJECT_SIDE = 6  # no side thinner than this, so that a 16 px bar stays visible
_MIN_VISIBLE_AREA = 40  # an instance is never smaller than this many visible pixels
_MIN_VISIBLE_FRACTION = 0.5  # of the full in-frame mask, after occlusion; and of the polygon, after clipping
_MAX_BOX_COVERAGE = 0.45  # union of object boxes / image area: background stays for Jigsaw's negatives
_MAX_PLACEMENT_TRIES = 25
_EMPTY_IMAGE_FRACTION = 1 / 16  # images with no annotation at all (legal in COCO, and real COCO has them)
_CROWD_IMAGE_FRACTION = 1 / 8  # images with one iscrowd region
_JPEG_SAVE = {"format": "JPEG", "quality": 90, "subsampling": "4:2:0", "optimize": False, "progressive": False}


@dataclass(frozen=True)
class _CategoryStyle:
    """How a category looks: a shape, a range of box aspect ratios (width / height), a colour and a texture."""

    id: int
    name: str
    supercategory: str
    aspect: tuple[float, float]
    max_rotation_deg: float
    rgb: tuple[int, int, int]
    texture: str


# Shape is the main cue; each category also has its own colour and texture family so that fine-tuning learns fast.
# The ids grow by 1, 2, 3, ... so that neither `id - 1` nor `id // 2` maps them onto contiguous indices.
_CATEGORY_STYLES = (
    _CategoryStyle(1, "ellipse", "round", (0.25, 3.0), 15, (215, 45, 45), "solid"),
    _CategoryStyle(2, "rectangle", "polygon", (0.33, 2.5), 15, (40, 90, 225), "stripes"),
    _CategoryStyle(4, "triangle", "polygon", (0.4, 1.6), 15, (35, 175, 60), "gradient"),
    _CategoryStyle(7, "star", "polygon", (0.8, 1.25), 180, (240, 205, 30), "solid"),
    _CategoryStyle(11, "ring", "round", (0.8, 1.25), 180, (225, 70, 200), "solid"),
    _CategoryStyle(16, "cross", "polygon", (0.7, 1.4), 45, (30, 200, 215), "checker"),
    _CategoryStyle(22, "bar", "strip", (0.1, 0.4), 5, (245, 135, 20), "stripes"),
    _CategoryStyle(29, "banner", "strip", (2.5, 7.0), 5, (135, 60, 210), "dots"),
)


@dataclass(frozen=True)
class SyntheticCoco:
    """Where a generated dataset lives: COCO-style image folders and annotation files.

    ``categories`` holds ``(id, name)`` pairs sorted by id, exactly the json's; the ids are sparse, so map them to
    contiguous labels rather than using them as indices. ``num_categories`` does not count a background class.
    """

    root: Path
    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path
    categories: tuple[tuple[int, str], ...]

    @property
    def num_categories(self) -> int:
        return len(self.categories)


def default_cache_dir() -> Path:
    """``$DETPRETRAIN_CACHE`` when set, else ``~/.cache/detpretrain``."""
    return Path(os.environ.get("DETPRETRAIN_CACHE") or Path.home() / ".cache" / "detpretrain").expanduser()


def synthetic_coco(
    root: str | Path | None = None,
    *,
    num_train: int = 64,
    num_val: int = 16,
    seed: int = 0,
    long_side: tuple[int, int] = (256, 320),
    max_objects: int = 8,
) -> SyntheticCoco:
    """Return the synthetic COCO dataset for these parameters, generating it on first use.

    Args:
        root: cache folder; the dataset goes into ``root/synthetic-coco-v{GENERATOR_VERSION}-{hash}``.
            Default: :func:`default_cache_dir`.
        num_train: images in the train split (64 by default; about 4 objects each).
        num_val: images in the val split (16 by default).
        seed: the same seed gives byte-identical files; another seed gives another dataset.
        long_side: inclusive range of the images' long side in pixels; the short side is 56% to 100% of it.
        max_objects: most non-crowd objects in one image (each image draws 1..max_objects, before placement).
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if not 64 <= long_side[0] <= long_side[1]:
        raise ValueError(f"long_side must be (min, max) with 64 <= min <= max, got {long_side}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    params = {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
        "long_side": [int(long_side[0]), int(long_side[1])],
        "max_objects": int(max_objects),
    }
    key = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
    name = f"synthetic-coco-v{GENERATOR_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    root = (Path(root).expanduser() if root is not None else default_cache_dir()).absolute()
    final = root / name

    if not (final / MANIFEST_NAME).is_file():
        if final.exists():
            raise RuntimeError(
                f"{final} exists but has no {MANIFEST_NAME}: it was not written by this generator. Delete it and "
                "run again."
            )
        root.mkdir(parents=True, exist_ok=True)
        # The leading dot keeps the temporary folder out of the way; the pid says who left it if a process dies.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=root))
        try:
            start = time.perf_counter()
            logger.info("generating the synthetic COCO dataset into %s", final)
            _write_dataset(tmp, params)
            try:
                os.rename(tmp, final)
                logger.info("generated %s in %.1f s", final, time.perf_counter() - start)
            except OSError:
                # Another process renamed its complete copy into place first: use it, discard ours.
                if not (final / MANIFEST_NAME).is_file():
                    raise
                logger.info("another process generated %s first; using its copy", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    _check_manifest(final, params)
    return SyntheticCoco(
        root=final,
        train_images=final / "train",
        train_ann=final / "annotations" / "instances_train.json",
        val_images=final / "val",
        val_ann=final / "annotations" / "instances_val.json",
        categories=tuple((style.id, style.name) for style in _CATEGORY_STYLES),
    )


def _check_manifest(folder: Path, params: dict) -> None:
    """A cheap check of a cached dataset: the manifest matches these parameters and every file has its size."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != params:
        raise RuntimeError(f"{folder / MANIFEST_NAME} does not match the requested parameters. Delete {folder}.")
    for rel_path, entry in manifest["files"].items():
        path = folder / rel_path
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise RuntimeError(f"{path} is missing or damaged (size differs from {MANIFEST_NAME}). Delete {folder}.")


# ----------------------------------------------------------------------------------------------------------------
# Writing a dataset
# ----------------------------------------------------------------------------------------------------------------


def _write_dataset(out_dir: Path, params: dict) -> None:
    """Write both splits, their annotation files, and last the manifest (its presence marks a complete dataset)."""
    num_train, num_val, seed = params["num_train"], params["num_val"], params["seed"]
    # Sparse image ids, unique across splits as in COCO.
    id_rng = np.random.default_rng([seed, 0])
    image_ids = id_rng.choice(np.arange(1, 8 * (num_train + num_val) + 1), size=num_train + num_val, replace=False)
    split_ids = {"train": sorted(image_ids[:num_train].tolist()), "val": sorted(image_ids[num_train:].tolist())}

    files: dict[str, bytes] = {}
    next_ann_id = 1
    for split_index, (split, ids) in enumerate(split_ids.items(), start=1):
        coco, next_ann_id, images = _generate_split(
            ids,
            seed=seed,
            split_index=split_index,
            first_ann_id=next_ann_id,
            long_side=tuple(params["long_side"]),
            max_objects=params["max_objects"],
        )
        for file_name, data in images.items():
            files[f"{split}/{file_name}"] = data
        files[f"annotations/instances_{split}.json"] = json.dumps(coco).encode("utf-8")

    for rel_path, data in files.items():
        path = out_dir / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = {
        "version": GENERATOR_VERSION,
        "params": params,
        "files": {p: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in sorted(files.items())},
    }
    (out_dir / MANIFEST_NAME).write_bytes(json.dumps(manifest, indent=1).encode("utf-8"))


def _generate_split(
    image_ids: list[int],
    *,
    seed: int,
    split_index: int,
    first_ann_id: int,
    long_side: tuple[int, int],
    max_objects: int,
) -> tuple[dict, int, dict[str, bytes]]:
    """One split: its COCO dict, the next free annotation id, and its JPEG bytes by file name."""
    n = len(image_ids)
    # Which images are empty and which hold a crowd region is decided per split, so every split has some of each.
    split_rng = np.random.default_rng([seed, split_index])
    order = split_rng.permutation(n)
    num_empty = max(1, round(n * _EMPTY_IMAGE_FRACTION)) if n > 1 else 0
    num_crowd = max(1, round(n * _CROWD_IMAGE_FRACTION))
    empty = set(order[:num_empty].tolist())
    crowd = set(order[num_empty : num_empty + num_crowd].tolist())

    images, annotations, jpegs = [], [], {}
    ann_id = first_ann_id
    for index, image_id in enumerate(image_ids):
        # One generator per image: an image depends only on (seed, split, index), whatever happens to the others.
        rng = np.random.default_rng([seed, split_index, index])
        lo, hi = long_side
        long = int(rng.integers(lo, hi + 1))
        short = int(round(long * rng.uniform(0.5625, 1.0)))
        width, height = (long, short) if rng.random() < 0.5 else (short, long)
        num_objects = 0 if index in empty else int(rng.integers(1, max_objects + 1))
        pixels, instances = _render_image(
            rng, width, height, num_objects=num_objects, with_crowd=index in crowd and index not in empty
        )
        file_name = f"{image_id:012d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, **_JPEG_SAVE)
        jpegs[file_name] = buffer.getvalue()
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1})
        for instance in instances:
            annotations.append({"id": ann_id, "image_id": image_id, **instance})
            ann_id += 1

    coco = {
        "info": {
            "description": "detpretrain synthetic COCO: the embedded default dataset (detpretrain.data.synthetic)",
            "version": str(GENERATOR_VERSION),
            "contributor": "detpretrain",
            # A fixed date, never the time of generation: the files must not depend on when they were made.
            "date_created": "2025-01-01",
            "year": 2025,
            "seed": seed,
        },
        "licenses": [{"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": s.id, "name": s.name, "supercategory": s.supercategory} for s in _CATEGORY_STYLES],
    }
    return coco, ann_id, jpegs


# ----------------------------------------------------------------------------------------------------------------
# Drawing one image
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Placed:
    """An object (or a crowd) laid out on the image: its polygons, their masks, and how it is painted."""

    style: _CategoryStyle
    polygons: list[np.ndarray]  # (K, 2) xy vertices, rounded to 1/100 px: exactly what the json stores
    masks: list[np.ndarray]  # (H, W) bool, one per polygon, as pycocotools rasterizes it
    full_area: int  # pixels of the union of masks inside the frame, before any later object covers it
    is_crowd: bool


def _render_image(
    rng: np.random.Generator, width: int, height: int, *, num_objects: int, with_crowd: bool
) -> tuple[np.ndarray, list[dict]]:
    """Lay out the objects, paint them over a cluttered background, and annotate what stays visible.

    Returns the (H, W, 3) uint8 image and the annotations (without ids) in paint order.
    """
    kinds = [False] * num_objects
    if with_crowd:
        kinds.insert(int(rng.integers(0, num_objects + 1)), True)

    # id_map holds, per pixel, 1 + the index of the topmost object there (0 = background): the visible masks.
    id_map = np.zeros((height, width), dtype=np.int32)
    box_union = np.zeros((height, width), dtype=bool)
    visible_area: list[int] = []
    placed: list[_Placed] = []
    for is_crowd in kinds:
        style = _CATEGORY_STYLES[int(rng.integers(len(_CATEGORY_STYLES)))]
        for _ in range(_MAX_PLACEMENT_TRIES):
            candidate = (
                _sample_crowd(rng, style, width, height) if is_crowd else _sample_object(rng, style, width, height)
            )
            if candidate is None:
                continue
            union = np.logical_or.reduce(candidate.masks)
            ys, xs = np.nonzero(union)
            boxes = box_union.copy()
            boxes[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            if boxes.mean() > _MAX_BOX_COVERAGE:
                continue
            # Pixels each earlier object would lose under the candidate; redraw rather than hide one too much.
            covered = np.bincount(id_map[union], minlength=len(placed) + 1)[1:]
            remaining = np.asarray(visible_area, dtype=np.int64) - covered
            floors = [max(_MIN_VISIBLE_AREA, _MIN_VISIBLE_FRACTION * p.full_area) for p in placed]
            if np.any(remaining < np.asarray(floors)):
                continue
            visible_area = [*remaining.tolist(), candidate.full_area]
            id_map[union] = len(placed) + 1
            box_union = boxes
            placed.append(candidate)
            break

    pixels = _background(rng, width, height)
    for item in placed:
        for mask in item.masks:
            _paint(pixels, mask, item.style, rng)
    # Sensor-like noise over everything, objects included, so that no region is perfectly clean.
    pixels += rng.integers(-8, 9, size=pixels.shape, dtype=np.int16)
    image = np.clip(pixels, 0, 255).astype(np.uint8)

    annotations = []
    for index, item in enumerate(placed):
        visible = id_map == index + 1
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        in_frame = all(
            p[:, 0].min() >= 0 and p[:, 1].min() >= 0 and p[:, 0].max() <= width and p[:, 1].max() <= height
            for p in item.polygons
        )
        if not item.is_crowd and in_frame and int(visible.sum()) == item.full_area:
            # Uncovered and inside the frame: the drawn polygon is the annotation, as in real COCO.
            segmentation = [[float(v) for v in p.ravel()] for p in item.polygons]
        else:
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        annotations.append(
            {
                "category_id": item.style.id,
                "segmentation": segmentation,
                "area": float(visible.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": int(item.is_crowd),
            }
        )
    return image, annotations


def _sample_object(rng: np.random.Generator, style: _CategoryStyle, width: int, height: int) -> _Placed | None:
    """One object of this category at a random size, aspect, rotation and place; None when it does not fit."""
    short = min(width, height)
    scale = _log_uniform(rng, _MIN_OBJECT_SCALE, _MAX_OBJECT_SCALE_FRACTION * short)
    aspect = _log_uniform(rng, *style.aspect)
    obj_w, obj_h = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
    grow = max(1.0, _MIN_OBJECT_SIDE / min(obj_w, obj_h))
    shrink = min(1.0, 0.9 * width / (obj_w * grow), 0.9 * height / (obj_h * grow))
    obj_w, obj_h = obj_w * grow * shrink, obj_h * grow * shrink
    local = _rotate(_SHAPES[style.name](rng, obj_w, obj_h), rng.uniform(-1, 1) * style.max_rotation_deg)
    # The box may leave the frame by up to 15% of its size on a side: truncated objects, as at photo borders.
    (x0, y0), (x1, y1) = local.min(0), local.max(0)
    bw, bh = x1 - x0, y1 - y0
    cx = rng.uniform(-x0 - 0.15 * bw, width - x1 + 0.15 * bw)
    cy = rng.uniform(-y0 - 0.15 * bh, height - y1 + 0.15 * bh)
    polygon = np.round(local + [cx, cy], 2)
    mask = _rasterize(polygon, width, height)
    full_area = int(mask.sum())
    if full_area < max(_MIN_VISIBLE_AREA, _MIN_VISIBLE_FRACTION * _polygon_area(polygon)):
        return None
    return _Placed(style, [polygon], [mask], full_area, is_crowd=False)


def _sample_crowd(rng: np.random.Generator, style: _CategoryStyle, width: int, height: int) -> _Placed | None:
    """A crowd region: a cluster of 6..14 small shapes of one category, annotated as one iscrowd RLE."""
    region = _log_uniform(rng, 48, 0.5 * min(width, height))
    aspect = rng.uniform(0.6, 1.7)
    region_w, region_h = min(region * math.sqrt(aspect), width - 1), min(region / math.sqrt(aspect), height - 1)
    left, top = rng.uniform(0, width - region_w), rng.uniform(0, height - region_h)
    polygons, masks = [], []
    for _ in range(int(rng.integers(6, 15))):
        size = max(7.0, rng.uniform(0.18, 0.32) * region)
        piece_aspect = _log_uniform(rng, *style.aspect)
        piece_w = max(_MIN_OBJECT_SIDE, size * math.sqrt(piece_aspect))
        piece_h = max(_MIN_OBJECT_SIDE, size / math.sqrt(piece_aspect))
        local = _rotate(_SHAPES[style.name](rng, piece_w, piece_h), rng.uniform(-1, 1) * style.max_rotation_deg)
        center = [left + rng.uniform(0, region_w), top + rng.uniform(0, region_h)]
        polygon = np.round(local + center, 2)
        mask = _rasterize(polygon, width, height)
        if mask.any():  # a sliver at the frame's edge may rasterize to nothing: nothing to paint
            polygons.append(polygon)
            masks.append(mask)
    full_area = int(np.logical_or.reduce(masks).sum()) if masks else 0
    if full_area < _MIN_VISIBLE_AREA:
        return None
    return _Placed(style, polygons, masks, full_area, is_crowd=True)


def _rasterize(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """(K, 2) polygon -> (H, W) bool mask, rasterized by pycocotools exactly as ``COCO.annToMask`` will."""
    rles = mask_utils.frPyObjects([polygon.ravel().tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _polygon_area(polygon: np.ndarray) -> float:
    """Shoelace area of a simple (K, 2) polygon: its area before the frame clips it."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(max(low, high))))


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


# Shapes: (rng, w, h) -> (K, 2) vertices of a simple polygon centred on 0 that fills a w x h box before rotation.


def _ellipse(rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    return np.stack([0.5 * w * np.cos(t), 0.5 * h * np.sin(t)], axis=1)


def _rectangle(rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2


def _triangle(rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    apex_x = rng.uniform(-0.3, 0.3) * w
    sign = 1 if rng.random() < 0.5 else -1  # pointing up or down
    return np.array([[apex_x, -sign * h / 2], [w / 2, sign * h / 2], [-w / 2, sign * h / 2]])


def _star(rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    points = int(rng.integers(5, 8))
    radius = np.tile([1.0, rng.uniform(0.4, 0.55)], points)
    t = np.arange(2 * points) * np.pi / points - np.pi / 2
    return np.stack([0.5 * w * radius * np.cos(t), 0.5 * h * radius * np.sin(t)], axis=1)


def _ring(rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    # A ring with a gap (a "C"): a COCO polygon cannot hold a hole, and the gap makes it a simple polygon.
    gap = rng.uniform(0.5, 0.9)
    t = np.linspace(gap / 2, 2 * np.pi - gap / 2, 28)
    inner = rng.uniform(0.5, 0.68)
    outer_xy = np.stack([0.5 * w * np.cos(t), 0.5 * h * np.sin(t)], axis=1)
    return np.concatenate([outer_xy, inner * outer_xy[::-1]])


def _cross(rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    arm = rng.uniform(0.28, 0.42)  # arm thickness as a fraction of the box
    a, b, tw, th = w / 2, h / 2, arm * w / 2, arm * h / 2
    return np.array(
        [[-tw, -b], [tw, -b], [tw, -th], [a, -th], [a, th], [tw, th], [tw, b], [-tw, b], [-tw, th], [-a, th]]
        + [[-a, -th], [-tw, -th]]
    )


def _banner(rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    # A swallowtail flag: besides its aspect ratio, the notch tells it from a wide rectangle.
    notch = min(0.6 * h, 0.2 * w)
    sign = 1 if rng.random() < 0.5 else -1  # notch on the right or on the left
    x = np.array([-w / 2, w / 2, w / 2 - notch, w / 2, -w / 2]) * sign
    return np.stack([x, np.array([-h / 2, -h / 2, 0, h / 2, h / 2])], axis=1)


_SHAPES = {
    "ellipse": _ellipse,
    "rectangle": _rectangle,
    "triangle": _triangle,
    "star": _star,
    "ring": _ring,
    "cross": _cross,
    "bar": _rectangle,
    "banner": _banner,
}


# Painting: integer arithmetic only, so that pixels do not depend on a machine's floating-point functions.


def _muted_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A greyish colour: the background's clutter stays less saturated than any object."""
    grey = int(rng.integers(60, 200))
    return tuple(min(max(grey + int(t), 0), 255) for t in rng.integers(-20, 21, size=3))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A cluttered (H, W, 3) int16 background: colour noise, an illumination gradient, blobs and lines."""
    grid_h, grid_w = (int(v) for v in rng.integers(3, 8, size=2))
    # Grey plus a tint of at most 30 levels per channel: colourful enough to be clutter, duller than any object.
    grey = rng.integers(70, 186, size=(grid_h, grid_w, 1))
    grid = np.clip(grey + rng.integers(-30, 31, size=(grid_h, grid_w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 13))):
        x, y = int(rng.integers(-20, width)), int(rng.integers(-20, height))
        w, h = (int(v) for v in rng.integers(10, 80, size=2))
        draw.ellipse([x, y, x + w, y + h], fill=_muted_color(rng))
    for _ in range(int(rng.integers(6, 21))):
        x0, x1 = (int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = (int(v) for v in rng.integers(0, height, size=2))
        draw.line([x0, y0, x1, y1], fill=_muted_color(rng), width=int(rng.integers(1, 4)))
    pixels = np.asarray(image, dtype=np.int16).copy()
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    ramp = np.arange(width)[None, :] * dx + np.arange(height)[:, None] * dy
    ramp = (ramp - ramp.min()) * 60 // max(int(ramp.max() - ramp.min()), 1) - 30  # -30..30 grey levels
    pixels += ramp[:, :, None].astype(np.int16)
    return pixels


def _paint(pixels: np.ndarray, mask: np.ndarray, style: _CategoryStyle, rng: np.random.Generator) -> None:
    """Paint one shape in place: its category's colour family and texture, with a dark outline for clear edges."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = mask[y0:y1, x0:x1]
    h, w = crop.shape
    base = np.clip(np.asarray(style.rgb) + rng.integers(-25, 26, size=3), 0, 255).astype(np.int16)
    dark, light = base * 11 // 20, base + (255 - base) * 2 // 5
    yy, xx = np.arange(h)[:, None], np.arange(w)[None, :]
    if style.texture == "solid":
        texture = np.broadcast_to(base, (h, w, 3))
    elif style.texture == "stripes":
        period = int(rng.integers(4, 9))
        dx, dy = (0, 1) if style.name == "bar" else (1, int(rng.integers(-1, 2)))  # bars: horizontal bands
        texture = np.where((((xx * dx + yy * dy) // period) % 2 == 0)[:, :, None], base, dark)
    elif style.texture == "checker":
        period = int(rng.integers(3, 7))
        texture = np.where((((xx // period) + (yy // period)) % 2 == 0)[:, :, None], base, light)
    elif style.texture == "dots":
        period, radius = int(rng.integers(5, 9)), int(rng.integers(1, 3))
        dist2 = (xx % period - period // 2) ** 2 + (yy % period - period // 2) ** 2
        texture = np.where((dist2 <= radius * radius)[:, :, None], light, base)
    elif style.texture == "gradient":
        ramp = xx + yy * int(rng.integers(-2, 3))
        ramp = (ramp - ramp.min()) * 255 // max(int(ramp.max() - ramp.min()), 1)  # 0..255
        texture = base * (510 - ramp[:, :, None]) // 510  # from the base colour down to half its brightness
    else:
        raise ValueError(f"unknown texture {style.texture!r}")
    region = pixels[y0:y1, x0:x1]
    region[crop] = texture[crop]
    # Outline: mask pixels with a 4-neighbour outside the mask, 1 or 2 px thick.
    inner = crop
    for _ in range(int(rng.integers(1, 3))):
        padded = np.pad(inner, 1)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    region[crop & ~inner] = base // 4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m detpretrain.data.synthetic",
        description="Generate (or find in the cache) the embedded default dataset and print its paths.",
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="cache folder (default: $DETPRETRAIN_CACHE or ~/.cache/detpretrain)"
    )
    parser.add_argument("--num-train", type=int, default=64, help="images in the train split")
    parser.add_argument("--num-val", type=int, default=16, help="images in the val split")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dataset = synthetic_coco(args.root, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    print(f"dataset       {dataset.root}  ({time.perf_counter() - start:.1f} s)")
    print(f"train_images  {dataset.train_images}")
    print(f"train_ann     {dataset.train_ann}")
    print(f"val_images    {dataset.val_images}")
    print(f"val_ann       {dataset.val_ann}")
    print("categories    " + ", ".join(f"{cat_id}:{name}" for cat_id, name in dataset.categories))


if __name__ == "__main__":
    main()
