"""Jigsaw sample extraction (§3.1): every rank and worker cuts the planned samples out of the source images into the
shards of one sample directory (format: ``detpretrain.jigsaw.samples``).

``papers/montage_jigsaw.txt`` §3.1: "positive and negative samples will be extracted from the images of D and saved
as classification dataset beforehand". ``extract_samples`` plans every sample (``detpretrain.jigsaw.planning``), then
splits the pixel work, decoding each image and encoding its crops, by shards over the ranks and their worker
processes (``detpretrain.sharding``). A kill costs at most the shards being written; an image that cannot be used is
skipped, counted and named; the directory is byte-identical for any world size, worker count and number of
relaunches.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from detpretrain.data.labelled_images import relative_to_common_folder
from detpretrain.engine import DistInfo, TooManyBadSamplesError, atomic_write
from detpretrain.jigsaw.planning import SamplePlan, plan_samples
from detpretrain.jigsaw.records import BACKGROUND_LABEL, ImageRecord
from detpretrain.jigsaw.samples import (
    INDEX_DTYPE,
    MANIFEST_NAME,
    SAMPLE_FORMAT_VERSION,
    SHARD_MAGIC,
    SKIPPED_NAME,
    SampleDirError,
    read_shard_header,
    shard_name,
)
from detpretrain.sharding import (
    SINGLE_PROCESS,
    WorkerPool,
    gather_by_shard,
    progress_bar,
    rank_shards,
    run_shards,
    shard_ranges,
)

__all__ = ["DEFAULT_JPEG_QUALITY", "DEFAULT_SHARD_SIZE", "JPEG_SUBSAMPLING", "encode_sample", "extract_samples"]

DEFAULT_SHARD_SIZE = 256
"""Images per shard (our choice). On COCO photos (~8 samples and ~195 kB of JPEG per image, coco128) a shard holds
~2,000 samples in ~50 MB and takes ~1.5 core-seconds to cut; train2017 makes 463 shards. A kill loses at most one shard
per rank, and a rank that helps others (``detpretrain.sharding``) finishes its last shard soon after them."""
DEFAULT_JPEG_QUALITY = 95
"""JPEG quality of the stored samples (our choice; ``encode_sample`` gives the measured cost of it)."""
JPEG_SUBSAMPLING = "4:4:4"
"""Chroma resolution of the stored samples: full, as the COCO photos have it (``encode_sample``)."""


def _digest(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _records_digest(records: Sequence[ImageRecord], names: Sequence[str]) -> str:
    """What the plan and the pixels depend on: ids, names, sizes and every box, label and crowd flag, in order."""
    digest = hashlib.sha256()
    for record, name in zip(records, names, strict=True):
        digest.update(json.dumps([record.image_id, name, record.width, record.height]).encode())
        for tensor in (record.gt_boxes, record.gt_labels, record.gt_crowd):
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class _Skip(Exception):
    """An image that cannot be used; ``reason`` is the line the skip report gives (never a path: shards must be
    byte-identical on every node, wherever the dataset is mounted)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow decodes (CMYK, grayscale, palette, alpha) as 8-bit RGB. Pillow's convert("RGB") clips 16-bit
    grayscale at 255, which turns a 16-bit PNG white: integer grayscale ("I;16*", "I") is taken as 16-bit and scaled
    to 8 bits first."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _read_source_image(file_name: str, *, width: int, height: int) -> Image.Image:
    """Decode one source image to RGB at its annotated size; raise ``_Skip`` when it cannot be used."""
    try:
        if os.path.getsize(file_name) == 0:
            raise _Skip("empty file (0 bytes)")
        with Image.open(file_name) as image:
            image.load()  # Image.open reads only the header: a truncated file fails here
            rgb = _to_rgb(image)
    except FileNotFoundError:
        raise _Skip("missing: no such file") from None
    except UnidentifiedImageError:
        raise _Skip("undecodable: not an image format Pillow can identify") from None
    except OSError as error:
        # An errno means the file could not be read; otherwise Pillow's decoder failed ("image file is truncated").
        reason = f"unreadable: {error.strerror}" if error.errno else f"undecodable: {error}"
        raise _Skip(reason) from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as error:  # some plugins' malformed-header errors
        raise _Skip(f"undecodable: {type(error).__name__}: {error}") from None
    if rgb.size != (width, height):
        raise _Skip(f"size mismatch: the file is {rgb.size[0]}x{rgb.size[1]}, the annotations say {width}x{height}")
    return rgb


def encode_sample(crop: Image.Image, *, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """One sample as the sample directory stores it: a JPEG at ``quality`` with full-resolution chroma (4:4:4).

    §3.1 cuts each sample once, at native resolution; storing it as a JPEG trades a little fidelity for size and
    decoding speed. Measured on the 1,008 samples of coco128 against the lossless crop (benchmarks/bench_jigsaw.py
    storage, benchmarks/RESULTS.md): q95 4:4:4 keeps a PSNR of 41.3 dB (worst sample 35.8 dB) in 24.6 kB, decoded in
    0.30 ms. Lossless storage costs 65.6 kB and 0.83 ms per sample as PNG (the four samples of an assembled image
    would take 3.3 ms to decode, more than a data-loader worker's whole 3.2 ms budget), or 104 kB uncompressed (97 GB
    for train2017, 4x). Pillow's default 4:2:0 chroma would halve the colour resolution that the COCO photos have
    (they are JPEGs of quality ~97 with 4:4:4 chroma) for 28% fewer bytes and 27% less decoding: 35.2 dB, worst
    sample 24.4 dB. Huffman tables are not optimized: Pillow's optimizing encoder needs the whole JPEG to fit in 2
    bytes per pixel, which a noise-like 4:4:4 crop exceeds (the encoder fails), to save 6% of the bytes.
    """
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    return buffer.getvalue()


def _cut_samples(task: tuple[str, int, int, list[list[int]], int]) -> tuple[list[bytes] | None, str | None]:
    """Decode one source image and encode its crops (``encode_sample``; runs in extraction workers: Pillow only,
    fork-safe).

    Returns (crops, None), or (None, reason) for an image that cannot be used: a bad image is skipped, never fatal.
    """
    file_name, width, height, boxes, quality = task
    try:
        rgb = _read_source_image(file_name, width=width, height=height)
    except _Skip as skip:
        return None, skip.reason
    return [encode_sample(rgb.crop(tuple(box)), quality=quality) for box in boxes], None


def _differences(found: dict, expected: dict) -> list[str]:
    return [
        f"{key}: {found.get(key)!r} there, {value!r} now" for key, value in expected.items() if found.get(key) != value
    ]


@dataclass
class _ShardedExtraction:
    """The shards of one extraction: what each must hold (its identity), checking, computing and summarizing it."""

    directory: Path
    records: Sequence[ImageRecord]
    names: list[str]
    plan: SamplePlan
    params: dict
    pool: WorkerPool

    @property
    def shard_size(self) -> int:
        return self.params["shard_size"]

    @property
    def num_shards(self) -> int:
        return len(shard_ranges(len(self.records), self.shard_size))

    def images(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self.records)))

    def rows(self, k: int) -> slice:
        """The plan rows of shard k's images (the plan lists samples image by image)."""
        images = self.images(k)
        start, stop = np.searchsorted(self.plan.image_index.numpy(), [images.start, images.stop])
        return slice(int(start), int(stop))

    def identity(self, k: int) -> dict:
        """What shard k must be: its images, the parameters and a digest of its part of the plan (which depends on
        every image: the negatives' sizes and counts are dataset-wide)."""
        images, rows = self.images(k), self.rows(k)
        return {
            "shard": k,
            "images": [images.start, images.stop],
            "extraction": self.params,
            "image_ids": [self.records[i].image_id for i in images],
            "file_names": self.names[images.start : images.stop],
            "plan_sha256": _digest(
                self.plan.image_index[rows], self.plan.boxes[rows], self.plan.labels[rows], self.plan.gt_boxes[rows]
            ),
        }

    def is_complete(self, k: int) -> bool:
        """Shard k exists, is whole (magic, version, size) and is the shard this extraction would write."""
        path = self.directory / shard_name(k)
        if not path.is_file():
            return False
        try:
            header, _ = read_shard_header(path)
        except SampleDirError:
            return False  # damaged: computed again
        expected = self.identity(k)
        return {key: header.get(key) for key in expected} == expected

    def compute(self, k: int) -> None:
        """Decode shard k's images, cut and encode their samples, write the shard atomically. An image that cannot
        be used loses its samples and is named in the header's ``skipped`` list, with the reason."""
        images, rows = self.images(k), self.rows(k)
        image_index, boxes = self.plan.image_index[rows], self.plan.boxes[rows]
        counts = torch.bincount(image_index - images.start, minlength=len(images)).tolist()
        starts = np.cumsum([0, *counts]).tolist()
        owners, tasks = [], []
        for i, start, stop in zip(images, starts[:-1], starts[1:], strict=True):
            if stop > start:  # an image without planned samples is not decoded: if bad, it costs nothing
                record = self.records[i]
                owners.append(i)
                tasks.append(
                    (
                        record.file_name,
                        record.width,
                        record.height,
                        boxes[start:stop].tolist(),
                        self.params["jpeg_quality"],
                    )
                )
        results = self.pool.map(_cut_samples, tasks)
        keep = torch.ones(len(image_index), dtype=torch.bool)
        blobs: list[bytes] = []
        skipped = []
        for i, (crops, reason) in zip(owners, results, strict=True):
            if reason is not None:
                skipped.append({"image_index": i, "reason": reason})
                keep[image_index == i] = False
            else:
                blobs += crops
        labels = self.plan.labels[rows][keep]
        index = np.zeros(int(keep.sum()), dtype=INDEX_DTYPE)
        index["length"] = [len(b) for b in blobs]
        index["offset"] = np.cumsum(index["length"], dtype=np.uint64) - index["length"]
        index["label"] = labels.numpy()
        index["image_index"] = image_index[keep].numpy()
        index["box"] = boxes[keep].numpy()
        index["gt_box"] = self.plan.gt_boxes[rows][keep].numpy()
        lost = self.plan.labels[rows][~keep]
        header = {
            "format": "detpretrain.jigsaw_samples.shard",
            "format_version": SAMPLE_FORMAT_VERSION,
            **self.identity(k),
            "num_samples": len(index),
            "jpeg_bytes": sum(len(b) for b in blobs),
            "stats": {
                "num_positives": int((labels != BACKGROUND_LABEL).sum()),
                "num_negatives": int((labels == BACKGROUND_LABEL).sum()),
                "skipped_images": len(skipped),
                "skipped_positives": int((lost != BACKGROUND_LABEL).sum()),
                "skipped_negatives": int((lost == BACKGROUND_LABEL).sum()),
            },
            "skipped": skipped,
        }
        encoded = json.dumps(header).encode()

        def write(f) -> None:
            f.write(SHARD_MAGIC + struct.pack("<Q", len(encoded)) + encoded)
            f.write(index.tobytes())
            for blob in blobs:
                f.write(blob)

        atomic_write(self.directory / shard_name(k), write)

    def summary(self, k: int) -> dict:
        """What the manifest and the skip report need of shard k (read by ``gather_by_shard``)."""
        path = self.directory / shard_name(k)
        header, _ = read_shard_header(path)
        return {
            "file": path.name,
            "num_samples": header["num_samples"],
            "bytes": path.stat().st_size,
            "stats": header["stats"],
            "skipped": header["skipped"],
        }

    def check_reuse(self, *, class_names: Sequence[str], records_sha256: str) -> None:
        """Refuse a directory that holds another extraction, finished (its manifest) or not (its shards), naming
        what differs. Shards that are merely damaged are left to ``is_complete``, which has them computed again."""
        manifest_path = self.directory / MANIFEST_NAME
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        if manifest is not None:
            differences = _differences(manifest["extraction"], self.params)
            if manifest["class_names"] != list(class_names):
                differences.append("other class names")
            if manifest["num_images"] != len(self.records):
                differences.append(f"{manifest['num_images']} images there, {len(self.records)} now")
            if differences:
                raise SampleDirError(
                    f"{self.directory} holds samples extracted from other images or with other settings "
                    f"({'; '.join(differences)}); delete it, or extract into another directory"
                )
        for path in sorted(self.directory.glob("shard-*.jigsaw")):  # each names the first image that differs
            try:
                header, _ = read_shard_header(path)
            except SampleDirError:
                continue
            differences = self._shard_differences(header)
            if differences:
                raise SampleDirError(
                    f"{path} was extracted from other images or with other settings ({'; '.join(differences)}); "
                    f"delete {self.directory}, or extract into another directory"
                )
        if manifest is not None and manifest["records_sha256"] != records_sha256:
            raise SampleDirError(
                f"{self.directory} holds samples extracted from other images or annotations; delete it, or extract "
                "into another directory"
            )

    def _shard_differences(self, header: dict) -> list[str]:
        k = header["shard"]
        if not 0 <= k < self.num_shards:
            return [f"shard {k}, but {len(self.records)} images make {self.num_shards} shards"]
        expected = self.identity(k)
        differences = _differences(header["extraction"], self.params)
        theirs, ours = header["file_names"], expected["file_names"]
        if header["image_ids"] != expected["image_ids"] or theirs != ours:
            i = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), len(ours))
            there, now = (names[i] if i < len(names) else "nothing" for names in (theirs, ours))
            differences.append(f"image {k * self.shard_size + i}: {there} there, {now} now")
        elif header["plan_sha256"] != expected["plan_sha256"]:
            differences.append("the same images with other annotations")
        return differences


def extract_samples(
    records: Sequence[ImageRecord],
    *,
    class_names: Sequence[str],
    output_dir: str | Path,
    seed: int = 0,
    max_enlarge: float = 2.0,
    positives_per_negative: float = 10.0,
    min_sample_size: int = 8,
    negative_tries: int = 64,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_workers: int = 0,
    category_ids: Sequence[int] | None = None,
    cleaning_report: dict[str, int] | None = None,
    dist_info: DistInfo = SINGLE_PROCESS,
    progress: bool = False,
    max_bad_image_fraction: float | None = None,
) -> dict[str, int]:
    """Extract the positive and negative samples of a dataset (§3.1) into a sample directory; returns the statistics.

    Every rank calls this with the same records (under torchrun; ``dist_info`` from ``engine.setup_distributed``).
    Each plans every sample itself (``plan_samples``: box math, ~0.5 ms per image on COCO, a minute for train2017;
    the 10:1 negatives need dataset-wide counts, so planning is not split). The pixel work, decoding each image and
    encoding its crops (``encode_sample``; ~6 ms per COCO image on one core), is split by shards of ``shard_size``
    images with ``detpretrain.sharding.run_shards`` across the ranks, and within a rank over ``num_workers``
    processes (0: this process). Shards are written atomically; a shard that already exists and is the one this
    extraction would write is kept, so a killed extraction continues where it stopped. The directory is
    byte-identical for any world size, worker count and number of relaunches.

    An image that is missing, empty, undecodable, truncated or of another size than its annotation is skipped: its
    planned samples are dropped, it is counted (``skipped_*`` in the statistics) and named with the reason in
    ``skipped.jsonl``. Modes Pillow decodes (CMYK, grayscale, palette, 16-bit) are converted to RGB and used.
    Samples are stored at native resolution as JPEGs of ``jpeg_quality`` with 4:4:4 chroma (``encode_sample``: our
    choice, and what it costs; the paper stores "samples").
    With ``max_bad_image_fraction`` (``--max-bad-image-fraction``), more skipped images than that share of
    ``records`` raise ``engine.TooManyBadSamplesError`` on every rank once the directory is complete (a rerun with a
    higher limit reuses it): one line with the count, the first images and where the list is.
    ``category_ids`` and ``cleaning_report`` (``DetectionRecords``'s) are recorded in the manifest as they are.
    A directory holding another extraction raises ``SampleDirError`` naming what differs.
    """
    if class_names[0] != "background":
        raise ValueError(f"class_names[0] must be 'background' (label {BACKGROUND_LABEL}), got {class_names[0]!r}")
    for record in records:
        if len(record.gt_labels) and int(record.gt_labels.max()) >= len(class_names):
            raise ValueError(
                f"{record.file_name}: label {int(record.gt_labels.max())} is not a known category "
                f"(class_names has {len(class_names) - 1}); fix the annotation or the class list"
            )
    params = {
        "seed": seed,
        "max_enlarge": max_enlarge,
        "positives_per_negative": positives_per_negative,
        "min_sample_size": min_sample_size,
        "negative_tries": negative_tries,
        "jpeg_quality": jpeg_quality,
        "jpeg_subsampling": JPEG_SUBSAMPLING,
        "shard_size": shard_size,
    }
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be at least 1 image")
    plan = plan_samples(
        records,
        seed=seed,
        max_enlarge=max_enlarge,
        positives_per_negative=positives_per_negative,
        min_sample_size=min_sample_size,
        negative_tries=negative_tries,
    )
    names = relative_to_common_folder([r.file_name for r in records])
    records_sha256 = _records_digest(records, names)
    directory = Path(output_dir)
    if directory.is_file():
        raise SampleDirError(
            f"{directory} is a file (a sample file of format version 1?), not a sample directory; delete it and "
            "extract again, or extract into another directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    own = len(
        rank_shards(len(shard_ranges(len(records), shard_size)), rank=dist_info.rank, world_size=dist_info.world_size)
    )
    with (
        WorkerPool(num_workers) as pool,
        progress_bar(total=own, desc="extracting samples", unit="shard", enabled=progress) as bar,
    ):
        shards = _ShardedExtraction(
            directory=directory, records=records, names=names, plan=plan, params=params, pool=pool
        )
        shards.check_reuse(class_names=class_names, records_sha256=records_sha256)

        def compute(k: int) -> None:
            shards.compute(k)
            if bar is not None:
                bar.update()

        run_shards(
            shards.num_shards,
            is_complete=shards.is_complete,
            exists=lambda k: (directory / shard_name(k)).is_file(),
            compute=compute,
            directory=directory,
            dist_info=dist_info,
        )
    summaries = gather_by_shard(shards.num_shards, shards.summary, dist_info=dist_info)

    skipped = ("skipped_images", "skipped_positives", "skipped_negatives")
    stats = plan.stats | {
        "num_samples": sum(s["num_samples"] for s in summaries),
        **{key: sum(s["stats"][key] for s in summaries) for key in skipped},
    }
    manifest = {
        "format": "detpretrain.jigsaw_samples",
        "format_version": SAMPLE_FORMAT_VERSION,
        "extraction": params,
        "num_images": len(records),
        "num_samples": stats["num_samples"],
        "records_sha256": records_sha256,
        "stats": stats,
        "class_names": list(class_names),
        "category_ids": list(category_ids) if category_ids is not None else None,
        "cleaning_report": dict(cleaning_report) if cleaning_report is not None else None,
        "shards": [{key: s[key] for key in ("file", "num_samples", "bytes")} for s in summaries],
    }
    if dist_info.is_main:
        # After run_shards' barrier no rank writes a shard: what a killed writer left behind can go.
        for leftover in directory.glob(".shard-*.tmp"):
            leftover.unlink(missing_ok=True)
        report = "".join(
            json.dumps({"file_name": records[i].file_name, "image_id": records[i].image_id, "reason": reason}) + "\n"
            for i, reason in ((skip["image_index"], skip["reason"]) for s in summaries for skip in s["skipped"])
        )
        _write_text_if_changed(directory / SKIPPED_NAME, report)
        _write_text_if_changed(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")  # last: the end mark
    if dist_info.distributed:
        dist.barrier()  # every rank may open the directory once the manifest is there
    if max_bad_image_fraction is not None and stats["skipped_images"] > max_bad_image_fraction * len(records):
        bad = [(records[skip["image_index"]].file_name, skip["reason"]) for s in summaries for skip in s["skipped"]]
        others = ", ".join(name for name, _ in bad[1:6]) + (", ..." if len(bad) > 6 else "")
        raise TooManyBadSamplesError(
            f"{len(bad)} of the {len(records)} images cannot be used ({len(bad) / len(records):.2%}, above "
            f"--max-bad-image-fraction {max_bad_image_fraction:g}): {bad[0][0]}: {bad[0][1]}"
            f"{'; also ' + others if others else ''}; all listed in {directory / SKIPPED_NAME}; replace or remove "
            "them, or raise the limit (the extracted samples are reused)"
        )
    return stats


def _write_text_if_changed(path: Path, text: str) -> None:
    """Atomically, and not at all when the file already holds ``text`` (a relaunch of a finished extraction)."""
    if not path.is_file() or path.read_text() != text:
        atomic_write(path, lambda f: f.write(text.encode()))
