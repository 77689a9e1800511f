"""The Jigsaw sample directory (§3.1: samples "saved as classification dataset beforehand"): its format and its
reader, ``JigsawSamples``. ``detpretrain.jigsaw.extraction`` writes it.

A sample directory (train_jigsaw.py: OUTPUT_DIR/samples.jigsaw/) holds

    shard-KKKKK.jigsaw  the samples of images [K * shard_size, (K + 1) * shard_size) of the records, in plan order
    skipped.jsonl       one JSON object per line for each image that could not be used: path, id and reason
    manifest.json       written last, so its presence marks a finished extraction: the extraction parameters, class
                        names, category ids, the reader's cleaning report, statistics and the table of shards

A shard (little-endian):

    SHARD_MAGIC (8 bytes) | header length (uint64) | header (UTF-8 JSON) | index (n records of INDEX_DTYPE) | JPEG bytes

The header names what the shard is (its images, the extraction parameters, a digest of its part of the plan), what
it holds (samples, JPEG bytes) and which of its images were skipped and why. Index offsets count from the first
JPEG byte. Each sample is one JPEG at the native resolution of its source image (``extraction.encode_sample`` says
how it is encoded, and why). Nothing in a shard depends on who wrote it or when, so a shard is byte-identical
whatever the world size, worker count or number of relaunches.

Glossary:

    S              samples in a sample directory
    sample boxes   (S, 4) int64 xyxy: the crop window of each sample in its source image (integer pixel edges)
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from detpretrain.engine import InputError
from detpretrain.jigsaw.template import GROUPS, sample_group

__all__ = [
    "INDEX_DTYPE",
    "MANIFEST_NAME",
    "SAMPLE_FORMAT_VERSION",
    "SHARD_MAGIC",
    "SKIPPED_NAME",
    "JigsawSample",
    "JigsawSamples",
    "SampleDirError",
    "read_shard_header",
    "shard_name",
]

SAMPLE_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"
SHARD_MAGIC = b"DPJIGSW\n"
INDEX_DTYPE = np.dtype(
    [
        ("offset", "<u8"),
        ("length", "<u4"),
        ("label", "<i4"),
        ("image_index", "<u4"),  # into the records of the whole dataset
        ("box", "<i4", (4,)),
        ("gt_box", "<f4", (4,)),
    ]
)


class SampleDirError(InputError, ValueError):
    """A sample directory that cannot be used as it is: unfinished, damaged, or made from other images or settings.
    The message names the directory, what is wrong and what to do."""


def shard_name(k: int) -> str:
    """The file name of shard k."""
    return f"shard-{k:05d}.jigsaw"


def read_shard_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the index) of a shard file; SampleDirError when it is not a whole shard of this version."""
    try:
        with open(path, "rb") as f:
            if f.read(len(SHARD_MAGIC)) != SHARD_MAGIC:
                raise SampleDirError(f"{path}: not a Jigsaw sample shard; extract the samples again")
            (header_length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_length))
            index_start = f.tell()
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise SampleDirError(f"{path}: the shard header is damaged; delete the file and extract again") from None
    version = header.get("format_version")
    if version != SAMPLE_FORMAT_VERSION:
        raise SampleDirError(
            f"{path}: sample format version {version}, this detpretrain reads version {SAMPLE_FORMAT_VERSION}; "
            "extract the samples again into a new directory"
        )
    expected_size = index_start + header["num_samples"] * INDEX_DTYPE.itemsize + header["jpeg_bytes"]
    if path.stat().st_size != expected_size:
        raise SampleDirError(f"{path}: the file size does not match its header (truncated?); delete it, extract again")
    return header, index_start


class JigsawSample(NamedTuple):
    """One sample: its pixels at the native resolution of its source image, and its class (0: background)."""

    image: Tensor  # (3, h, w) uint8; from JigsawSamples a channels-last view (strides (1, 3w, 3))
    label: int


class JigsawSamples:
    """Reads a sample directory written by ``extract_samples``: ``len(s)`` samples, ``s[i]`` decodes one JigsawSample.

    Opening checks the manifest and every shard it lists (magic, version, size) and reads their indexes: the whole
    index is held in memory (48 bytes per sample) as ``labels``, ``boxes`` (crop windows in the source images),
    ``gt_boxes``, ``image_index``, ``sizes`` and ``group_indices``; ``header`` is the manifest. Dataset-like and safe
    in DataLoader workers: each process opens a shard when it first reads from it and reads with ``os.preadv``
    (no shared file position, so forked workers may share descriptors; pickling drops them). Every shard may stay
    open, so opening raises this process's soft limit on open files to fit them, within the hard limit (``ulimit
    -Hn``). Samples are decoded by torchvision's libjpeg-turbo decoder (``decode_jpeg``), which gives Pillow's
    pixels in ~70% of Pillow's time (benchmarks/bench_jigsaw.py extract); torchvision 0.29 deprecates it in favour of
    TorchCodec's ``decode_jpeg``, the same call.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        manifest = self.path / MANIFEST_NAME
        if not manifest.is_file():
            raise SampleDirError(
                f"{self.path}: no {MANIFEST_NAME}, so not a finished Jigsaw sample directory; extract the samples "
                "into it (a killed extraction continues where it stopped)"
            )
        self.header = json.loads(manifest.read_text())
        version = self.header.get("format_version")
        if version != SAMPLE_FORMAT_VERSION:
            raise SampleDirError(
                f"{self.path}: sample format version {version}, this detpretrain reads version "
                f"{SAMPLE_FORMAT_VERSION}; extract the samples again into a new directory"
            )
        self._shard_files = [self.path / shard["file"] for shard in self.header["shards"]]
        indexes, blob_starts = [], []
        for path, listed in zip(self._shard_files, self.header["shards"], strict=True):
            if not path.is_file():
                raise SampleDirError(f"{path}: missing; extract the samples into {self.path} again to restore it")
            header, index_start = read_shard_header(path)
            if header["num_samples"] != listed["num_samples"] or path.stat().st_size != listed["bytes"]:
                raise SampleDirError(f"{path} is not the shard the manifest lists; extract the samples again")
            with open(path, "rb") as f:
                f.seek(index_start)
                indexes.append(np.frombuffer(f.read(header["num_samples"] * INDEX_DTYPE.itemsize), INDEX_DTYPE))
            blob_starts.append(index_start + header["num_samples"] * INDEX_DTYPE.itemsize)
        self.index = np.concatenate(indexes) if indexes else np.zeros(0, INDEX_DTYPE)
        counts = [len(index) for index in indexes]
        # Per sample: its shard, and where its JPEG bytes start in that shard's file.
        self._shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self._start = self.index["offset"] + np.repeat(np.array(blob_starts, dtype=np.uint64), counts)
        self.class_names: list[str] = self.header["class_names"]
        self.labels = torch.from_numpy(self.index["label"].astype(np.int64))
        self.boxes = torch.from_numpy(self.index["box"].astype(np.int64))  # (S, 4) crop window in the source image
        self.gt_boxes = torch.from_numpy(self.index["gt_box"].copy())  # (S, 4), NaN for negatives
        self.image_index = torch.from_numpy(self.index["image_index"].astype(np.int64))
        self.sizes = self.boxes[:, 2:] - self.boxes[:, :2]  # (S, 2): width, height
        groups = sample_group(self.sizes[:, 0], self.sizes[:, 1])
        self.group_indices = {g: (groups == code).nonzero().flatten() for code, g in enumerate(GROUPS)}
        self.borrowed_groups: dict[str, str] = {}  # empty group -> the group it draws from (borrow_empty_groups)
        _allow_open_files(len(self._shard_files), path=self.path)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def empty_groups(self) -> list[str]:
        return [g for g in GROUPS if len(self.group_indices[g]) == 0]

    def borrow_empty_groups(self) -> dict[str, str]:
        """Let a shape group without samples draw from the nearest group that has some; returns {empty: lender}.

        Not the paper's: §3.2 fills each region from its own group, which a detection dataset of COCO's size always
        has. A small one may have no tall sample at all (raccoon's 160 training images give none: its animals are
        seldom twice as tall as wide). The nearest group in aspect ratio is S for T and W (then the other one), and
        any non-empty group for S; the template's fit (pad & crop) then places the borrowed sample as it places any.
        """
        nearest = {"T": ("S", "W"), "W": ("S", "T"), "S": ("T", "W")}
        for group in self.empty_groups():
            lender = next((g for g in nearest[group] if len(self.group_indices[g]) > 0), None)
            if lender is None:
                raise SampleDirError(f"{self.path}: no sample in any shape group; extract from more images")
            self.group_indices[group] = self.group_indices[lender]
            self.borrowed_groups[group] = lender
        return dict(self.borrowed_groups)

    def skipped_images(self) -> list[dict]:
        """The source images extraction skipped, as ``skipped.jsonl`` lists them: file_name, image_id, reason."""
        path = self.path / SKIPPED_NAME
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line) for line in lines if line.strip()]

    def encoded(self, i: int) -> Tensor:
        """Sample i as stored: its JPEG bytes, (length,) uint8."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        k = int(self._shard[i])
        if k not in self._fds:
            self._fds[k] = os.open(self._shard_files[k], os.O_RDONLY)
        data = torch.empty(int(self.index["length"][i]), dtype=torch.uint8)
        os.preadv(self._fds[k], [data.numpy()], int(self._start[i]))
        return data

    def __getitem__(self, i: int) -> JigsawSample:
        data = self.encoded(i)
        entry = self.index[i]
        try:
            # (3, h, w) as a view of (h, w, 3) pixels: torch's uint8 resize (assembly) takes this layout as it is.
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise SampleDirError(
                f"{self.path}: sample {i} does not decode ({error}); extract the samples again"
            ) from None
        width, height = (entry["box"][2:] - entry["box"][:2]).tolist()
        if tuple(image.shape) != (3, height, width):
            raise SampleDirError(
                f"{self.path}: sample {i} decodes to {tuple(image.shape)}, expected (3, {height}, {width})"
            )
        return JigsawSample(image=image, label=int(entry["label"]))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()


def _allow_open_files(num_shards: int, *, path: Path) -> None:
    """Raise the soft limit on open files (RLIMIT_NOFILE) so that every shard may stay open beside the files a
    training process has open anyway; fail with what to do when the hard limit is too low."""
    if os.name != "posix":
        return
    import resource

    needed = num_shards + 512  # headroom for the process's own files, sockets and libraries
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SampleDirError(
            f"{path} has {num_shards} shards, more than this process may keep open (ulimit -Hn {hard}); raise the "
            "limit, or extract with a larger shard size"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
