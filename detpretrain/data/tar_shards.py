"""WebDataset tar shards of weakly-labelled images, streamed for training and resumable exactly (predet.txt §4.1).

PreDet pre-trains on large weakly-labelled sets (§4.1: IG-50M hashtags mapped to 1209 classes, or ImageNet). At that
size images come as tar shards read front to back, not as millions of files. This module reads such shards with the
``webdataset`` library (``pip install "detpretrain[webdataset]"``) and turns them into training batches under the
engine's rules (``detpretrain.engine``): augmentation drawn from ``sample_generator(seed, step, index)`` only, and a
run killed at any checkpoint continues with exactly the batches the uninterrupted run would have seen.

Shard lists (``expand_shard_urls``): a brace pattern (``data/shard-{000000..000999}.tar``, webdataset's syntax), a
directory (its ``*.tar`` files, sorted by name), a text file listing one tar per line (blank lines and ``#`` comments
skipped; relative paths are relative to the list file), or any comma-separated mix of these. Local shards must exist;
URLs that webdataset opens itself (``pipe:``, ``http(s):``, ``gs:``, ...) are passed through. A shard is a plain or
gzipped tar (``.tar``, ``.tar.gz``, ``.tgz``).

Tar layout (webdataset's): the members of a sample are consecutive and share a key, the member name up to the first
dot of its base name (``train/000123.jpg`` and ``train/000123.json`` are sample ``train/000123``); suffixes are
compared in lower case, and members named ``__*__`` are metadata and skipped. Per sample:

- the image: the first of ``.jpg .jpeg .png .webp .ppm .bmp`` present, decoded by ``labelled_images.read_rgb`` (the
  decoder of the proposal cache too, so boxes and pixels share one frame);
- the label: a ``.json`` object with ``"labels"`` (a list of class names or integer indices) or ``"label"`` /
  ``"cls"`` (one name or index); a ``.json`` with none of these (metadata only) falls back to a ``.cls`` member, which
  holds one integer class index as text. Other members are ignored.

Class names come from a given list (``load_class_names``: a text file, one name per line). It is required: the
classes of a stream cannot be known before every shard has been read. Integer labels index that list.

Bad samples are never fatal in a stream: a sample without an image, without a label, with a malformed label, an
unknown class name, an index outside the class list, an empty label set, or an image that does not decode is skipped
and counted by reason (the constants below); each is reported once, with its shard and key (``SkipRecord``), during
the first pass over the shards. A shard that cannot be read (missing, cut short inside a member, two members with one
name) stops the run with a ``ShardError`` naming it: the data has to be fixed, and the proposal cache, which reads
every shard first, finds it before training starts.

Streaming (``TarShardStream``, the main-process object; ``TarShardDataset``, the IterableDataset its DataLoader
workers run):

- Streams. Rank ``r`` runs ``W = max(1, num_workers)`` streams, one per DataLoader worker (one in the main process
  when ``num_workers=0``); stream ``g = r * W + w`` of ``N = world_size * W``. In epoch ``e`` the shards are permuted
  by a generator seeded from (seed, e), and stream ``g`` reads ``order[g::N]``: every stream gets different shards,
  and together the streams read every shard once per epoch. Fewer shards than streams is refused. A stream moves to
  its next epoch when its own shards are done; epochs repeat forever (training counts iterations, not epochs).
- Shuffling. Inside a shard, a buffer of ``shuffle_buffer`` samples (seeded from (seed, e, shard)) emits a random
  one of its samples each time; it is flushed at the end of the shard, so no sample crosses into another shard's
  read and a stream's position is just (epoch, ordinal of the shard in the stream's list, samples already emitted
  from that shard). The shuffle depends on neither the worker nor the world size.
- Batches are assembled in the worker: ``images_per_batch`` good samples, each through ``transform(sample,
  generator=engine.sample_generator(seed, step, index))``, then ``collate_fn``. The DataLoader hands the main process
  the workers' batches round-robin (batch ``K`` comes from worker ``K mod W``: the streams are endless, so none drops
  out of the cycle), hence stream ``w``'s ``b``-th batch is the rank's micro-batch ``K = b * W + w`` and belongs to
  optimizer step ``K // accum_steps``. The sample ``index`` is ``shard * 2**32 + position``, stable wherever and
  whenever the sample is read.
- Resume. Each batch carries its stream's position after it; the main process keeps, per stream, the position after
  the last batch it handed out (``state_dict``). A checkpoint stores every rank's record; the resumed run restarts
  each stream there (re-reading at most one shard and skipping the samples already emitted, without decoding them),
  and since a new DataLoader iterator starts at worker 0, physical worker ``p`` plays stream ``(p + K) mod W`` where
  ``K`` is the number of batches consumed: the resumed run yields exactly the uninterrupted run's batches. Resuming
  with another world size, worker count (0 and 1 are the same: one stream), batch split or shard list is refused.

Why streams, not an index: a tar shard can only be read front to back, so the index-based order of
``engine.StepBatchSampler`` (a random sample at every position) is not available; the stream's position is saved
instead, and it costs only a few integers per worker.

Glossary:

    S          shards, ``len(shards)``; ``shard`` is an index into that list
    W          streams per rank: ``max(1, num_workers)``
    N          streams in the run: ``world_size * W``; stream ``g = rank * W + w``
    e          a stream's epoch: one pass over its ``order_e[g::N]``
    ordinal    a shard's place in its stream's list for the epoch
    position   a sample's place in its tar (0, 1, ...), bad samples included
    emitted    samples a stream has taken from its current shard's shuffled order, bad ones included
    K          micro-batches the main process of a rank has consumed; step = K // accum_steps
    B          images_per_batch: good samples per batch
    image      (3, H, W) uint8 tensor, RGB
    labels     (k,) int64 tensor of class indices in [0, C), sorted, unique
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from detpretrain import engine
from detpretrain.data.labelled_images import ImageDecodeError, read_class_names, read_rgb

__all__ = [
    "DEFAULT_SHUFFLE_BUFFER",
    "EMPTY_LABELS",
    "IMAGE_SUFFIXES",
    "LABEL_OUT_OF_RANGE",
    "MALFORMED_LABEL",
    "MISSING_IMAGE",
    "MISSING_LABEL",
    "SKIP_REASONS",
    "UNDECODABLE_IMAGE",
    "UNKNOWN_LABEL",
    "BadSampleError",
    "ShardBatch",
    "ShardError",
    "ShardSample",
    "SkipRecord",
    "StreamPosition",
    "TarSample",
    "TarShardDataset",
    "TarShardStream",
    "decode_sample",
    "epoch_shard_order",
    "expand_shard_urls",
    "iter_tar_samples",
    "load_class_names",
    "sample_index",
    "sample_labels",
]

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")  # in order of preference when several are present
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # a file named so is a shard; any other file is a list of shards
DEFAULT_SHUFFLE_BUFFER = 1000

# Reasons a sample is bad: the keys of TarShardStream.skipped.
MISSING_IMAGE = "no image"
MISSING_LABEL = "no label"
MALFORMED_LABEL = "malformed label"
UNKNOWN_LABEL = "unknown label"
LABEL_OUT_OF_RANGE = "label index out of range"
EMPTY_LABELS = "empty label set"
UNDECODABLE_IMAGE = "undecodable image"
SKIP_REASONS = (
    MISSING_IMAGE,
    MISSING_LABEL,
    MALFORMED_LABEL,
    UNKNOWN_LABEL,
    LABEL_OUT_OF_RANGE,
    EMPTY_LABELS,
    UNDECODABLE_IMAGE,
)

STATE_FORMAT = "detpretrain.tar_shards/1"
# Domain tags keep the shard-order and in-shard shuffle seed streams apart (and apart from engine's).
_SHARD_ORDER_STREAM = 0x7A250001
_SHUFFLE_STREAM = 0x7A250002
_POSITION_BITS = 32  # sample index = shard << 32 | position: a tar never holds 2**32 samples


class ShardError(ValueError):
    """A shard list or a shard that cannot be read; the message names it and says what to do."""


class BadSampleError(ValueError):
    """A sample that is skipped in a stream: ``reason`` is one of SKIP_REASONS, ``detail`` says what is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{detail} ({reason})")
        self.reason, self.detail = reason, detail


def _webdataset() -> tuple[Callable[..., Any], Any, Callable[[str], list[str]]]:
    """webdataset's (gopen, tariterators, expand_urls), imported on first use: it is an optional dependency and takes
    about two seconds to import, which the runs on class folders or COCO json need not pay."""
    try:
        from webdataset import tariterators
        from webdataset.gopen import gopen
        from webdataset.shardlists import expand_urls
    except ImportError as error:
        raise ImportError(
            f"reading tar shards needs the webdataset library ({error}); pip install 'detpretrain[webdataset]'"
        ) from None
    return gopen, tariterators, expand_urls


# --------------------------------------------------------------------------------------------------- shard lists

# A scheme has two letters or more, so that a Windows drive ("C:") reads as a local path.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def _is_local(url: str) -> bool:
    return url.startswith("file:") or not _URL_SCHEME.match(url)


def _local_path(url: str) -> str:
    return re.sub(r"^file://?", "", url)  # as webdataset's gopen_file reads file: URLs


def _split_outside_braces(spec: str) -> list[str]:
    """``spec`` split at the commas that are not inside a brace pattern (``{a,b}`` is one alternative list)."""
    parts, current, depth = [], [], 0
    for char in spec:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += (char == "{") - (char == "}")
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _read_list_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ShardError(
            f"{path}: neither a tar shard (named {', '.join(TAR_SUFFIXES)}) nor a text list of shards, one per line"
        ) from None
    urls = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Relative paths are relative to the list, so the list and its shards can move together.
        urls.append(str(path.parent / line) if _is_local(line) and not os.path.isabs(_local_path(line)) else line)
    if not urls:
        raise ShardError(f"{path}: the shard list names no shard; write one tar path or URL per line")
    return urls


def _expand_part(part: str, expand_urls: Callable[[str], list[str]]) -> list[str]:
    path = Path(_local_path(part)) if _is_local(part) else None
    if path is not None and path.is_dir():
        tars = sorted(p.name for p in path.iterdir() if p.name.endswith(".tar") and p.is_file())
        if not tars:
            raise ShardError(f"{part}: the directory holds no .tar files; pass the folder of the shards, or a pattern")
        return [str(path / name) for name in tars]
    if path is not None and path.is_file() and not path.name.endswith(TAR_SUFFIXES):
        return _read_list_file(path)
    return expand_urls(part)


def expand_shard_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The shards of ``spec``, in order: brace patterns expanded, directories listed, list files read (forms in the
    module docstring); a sequence is the concatenation of its items. Every local shard must exist, and no shard may
    appear twice (it would be read twice per epoch and break the per-shard proposal cache)."""
    _, _, expand_urls = _webdataset()
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    urls = [
        url
        for item in items
        for part in _split_outside_braces(os.fspath(item))
        for url in _expand_part(part, expand_urls)
    ]
    if not urls:
        raise ShardError(f"shard list {spec!r} is empty; pass a pattern, a directory or a list file of tar shards")
    repeated = sorted(url for url, count in Counter(urls).items() if count > 1)
    if repeated:
        raise ShardError(f"shard list {spec!r} names {repeated[:3]} more than once; list each shard once")
    for url in urls:
        if _is_local(url) and not os.path.isfile(_local_path(url)):
            raise ShardError(f"shard {url} does not exist (from {spec!r}); check the path or pattern, or drop it")
    return urls


def load_class_names(source: str | os.PathLike | Sequence[str] | None) -> tuple[str, ...]:
    """The class list of tar shards: a text file with one name per line (blank lines skipped), or the names."""
    if source is None:
        raise ValueError(
            "tar shards need a class list (a text file with one class name per line): the classes of a stream "
            "cannot be known before every shard has been read"
        )
    return tuple(read_class_names(source))


# ------------------------------------------------------------------------------------------------ reading a tar


class TarSample(NamedTuple):
    """One sample of a tar as stored, undecoded (what ``iter_tar_samples`` yields)."""

    position: int  # 0, 1, ... in the tar's order, bad samples included
    key: str  # webdataset's __key__
    image: bytes | None  # the first of IMAGE_SUFFIXES present
    image_suffix: str | None
    json: bytes | None  # the .json member, unparsed
    cls: bytes | None  # the .cls member, unparsed


def _error_text(error: BaseException) -> str:
    # webdataset appends the stream and URL to an exception's args and " @ <stream>" to its message: keep the message.
    message = str(error.args[0]) if error.args else ""
    return f"{type(error).__name__}: {message.split(' @ ')[0]}"


def iter_tar_samples(url: str) -> Iterator[TarSample]:
    """The samples of one tar shard in stored order, grouped by key with webdataset's own tar iterators.

    Deterministic and cheap (one sequential read, nothing decoded): the proposal cache keys its rows by it. A missing
    local shard, or a tar that cannot be read, raises ShardError naming the shard.
    """
    gopen, tariterators, _ = _webdataset()
    if _is_local(url) and not os.path.isfile(_local_path(url)):
        raise ShardError(f"shard {url} does not exist; check the shard list")
    stream = gopen(url)
    position = 0
    try:
        # tar_file_expander ends each tar with an end-of-shard marker, so group_by_keys never joins two tars' samples.
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for members in tariterators.group_by_keys(files):
            image_suffix = next((suffix for suffix in IMAGE_SUFFIXES if suffix in members), None)
            yield TarSample(
                position=position,
                key=members["__key__"],
                image=members.get(image_suffix),
                image_suffix=image_suffix,
                json=members.get("json"),
                cls=members.get("cls"),
            )
            position += 1
    except (tarfile.TarError, OSError, ValueError) as error:
        raise ShardError(
            f"{url}: cannot read the tar after {position} samples ({_error_text(error)}); re-create the shard, or "
            "drop it from the shard list"
        ) from None
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------------------- labels


def _json_labels(data: bytes) -> list[Any] | None:
    """The labels a .json member gives, or None when it has none of "labels", "label", "cls" (metadata only)."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadSampleError(MALFORMED_LABEL, f".json is not JSON ({error})") from None
    if not isinstance(record, dict):
        raise BadSampleError(MALFORMED_LABEL, f".json must be an object, got {type(record).__name__}")
    if "labels" in record:
        if not isinstance(record["labels"], list):
            raise BadSampleError(MALFORMED_LABEL, f'.json "labels" must be a list, got {record["labels"]!r:.60}')
        return record["labels"]
    for member in ("label", "cls"):
        if member in record:
            if isinstance(record[member], list | dict):
                raise BadSampleError(MALFORMED_LABEL, f'.json "{member}" must be one class name or index; use "labels"')
            return [record[member]]
    return None


def sample_labels(sample: TarSample, class_index: Mapping[str, int]) -> tuple[int, ...]:
    """The sorted unique class indices of ``sample`` (``class_index`` maps each name to its index in the class list);
    raises BadSampleError with the reason when the label is missing, malformed, unknown, out of range or empty."""
    labels = _json_labels(sample.json) if sample.json is not None else None
    if labels is None and sample.cls is not None:
        text = sample.cls.decode("utf-8", errors="replace").strip()
        try:
            labels = [int(text)]
        except ValueError:
            raise BadSampleError(MALFORMED_LABEL, f".cls must hold one integer class index, got {text!r:.40}") from None
    if labels is None:
        raise BadSampleError(MISSING_LABEL, 'neither a .json with "labels", "label" or "cls", nor a .cls member')
    indices = set()
    for label in labels:
        if isinstance(label, str):
            if label not in class_index:
                raise BadSampleError(UNKNOWN_LABEL, f"class {label!r} is not in the class list")
            indices.add(class_index[label])
        elif isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(class_index):
                raise BadSampleError(LABEL_OUT_OF_RANGE, f"class index {label} is outside [0, {len(class_index)})")
            indices.add(label)
        else:
            raise BadSampleError(MALFORMED_LABEL, f"a label is a class name or an integer index, got {label!r:.40}")
    if not indices:
        raise BadSampleError(EMPTY_LABELS, "the label list is empty")
    return tuple(sorted(indices))


def sample_index(shard: int, position: int) -> int:
    """The stable id of sample ``position`` of shard ``shard``: the ``index`` of its augmentation seed."""
    if not 0 <= position < 2**_POSITION_BITS:
        raise ValueError(f"sample position {position} is outside [0, 2**{_POSITION_BITS})")
    return shard << _POSITION_BITS | position


class ShardSample(NamedTuple):
    """A decoded sample: the fields of ``labelled_images.LabelledSample`` first, then where it came from."""

    image: torch.Tensor  # (3, H, W) uint8 RGB
    labels: torch.Tensor  # (k,) int64 class indices, sorted, unique
    index: int  # sample_index(shard, position)
    shard: int  # index into the shard list (the proposal cache's shard)
    position: int  # place in the tar (the proposal cache's row)
    key: str  # webdataset's __key__ (the proposal cache checks it)
    epoch: int  # the reading stream's epoch


def decode_sample(
    sample: TarSample, *, url: str, shard: int, class_index: Mapping[str, int], epoch: int = 0
) -> ShardSample:
    """``sample`` with its image decoded and its labels mapped; raises BadSampleError when it is a bad sample."""
    if sample.image is None:
        raise BadSampleError(MISSING_IMAGE, f"no image member (one of .{', .'.join(IMAGE_SUFFIXES)})")
    labels = sample_labels(sample, class_index)  # before decoding: it is far cheaper
    name = f"{url}:{sample.key}"
    try:
        pixels = read_rgb(sample.image, name=name)  # (H, W, 3)
    except ImageDecodeError as error:
        # The SkipRecord names the shard and key itself; read_rgb's advice after "; " is about image files.
        raise BadSampleError(UNDECODABLE_IMAGE, str(error).removeprefix(f"{name}: ").split("; ")[0]) from None
    return ShardSample(
        image=torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),  # (3, H, W)
        labels=torch.tensor(labels, dtype=torch.int64),
        index=sample_index(shard, sample.position),
        shard=shard,
        position=sample.position,
        key=sample.key,
        epoch=epoch,
    )


class SkipRecord(NamedTuple):
    """A skipped bad sample, as reported to the main process."""

    url: str
    shard: int
    position: int
    key: str
    reason: str  # one of SKIP_REASONS
    detail: str
    epoch: int

    def describe(self) -> str:
        """One line for logs: which sample, what is wrong."""
        return f"{self.url}:{self.key} (sample {self.position}): {self.detail} ({self.reason})"


# ------------------------------------------------------------------------------------------------------- streaming


def _mixed_seed(*values: int) -> int:
    # SeedSequence hashes all its words, as engine's seeds do: neighbouring (epoch, shard) pairs give unrelated streams.
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0])


def epoch_shard_order(num_shards: int, *, seed: int, epoch: int) -> list[int]:
    """The shards of epoch ``epoch`` in reading order: a permutation seeded by (seed, epoch); stream ``g`` of ``N``
    reads ``epoch_shard_order(...)[g::N]``."""
    order = list(range(num_shards))
    # A local Random, never the global one (engine rule 3); shuffle's algorithm has been stable since Python 3.2.
    random.Random(_mixed_seed(_SHARD_ORDER_STREAM, seed, epoch)).shuffle(order)
    return order


class _ShardShuffle:
    """The samples of one shard through a seeded shuffle buffer of ``size``, flushed at the end of the shard.

    Each step emits a uniformly chosen sample of the buffer, then refills it from the shard; the refill reads one
    sample ahead, so ``exhausted`` is known as soon as the shard's last sample has been emitted.
    """

    def __init__(self, samples: Iterator[TarSample], *, size: int, rng: random.Random) -> None:
        self._samples, self._size, self._rng = samples, size, rng
        self._buffer: list[TarSample] = []
        self._source_done = False
        self._fill()

    def _fill(self) -> None:
        while not self._source_done and len(self._buffer) < self._size:
            try:
                self._buffer.append(next(self._samples))
            except StopIteration:
                self._source_done = True

    @property
    def exhausted(self) -> bool:
        return self._source_done and not self._buffer

    def __iter__(self) -> _ShardShuffle:
        return self

    def __next__(self) -> TarSample:
        if not self._buffer:
            raise StopIteration
        k = self._rng.randrange(len(self._buffer))
        self._buffer[k], self._buffer[-1] = self._buffer[-1], self._buffer[k]
        sample = self._buffer.pop()
        self._fill()
        return sample


class StreamPosition(NamedTuple):
    """Where a stream stands between two batches: its next sample is the ``emitted``-th of the shuffled order of the
    ``ordinal``-th shard of its list for ``epoch``; it has produced ``batches`` batches."""

    epoch: int
    ordinal: int
    emitted: int
    batches: int


_START = StreamPosition(epoch=0, ordinal=0, emitted=0, batches=0)


class ShardBatch(NamedTuple):
    """What a worker sends the main process: the collated batch, and what the main process records about it."""

    data: Any  # collate_fn's output
    stream: int  # the logical stream w in [0, W) that produced it
    position: StreamPosition  # the stream's position after this batch
    skipped: tuple[SkipRecord, ...]  # bad samples met while assembling it, in the first epoch only


class TarShardDataset(torch.utils.data.IterableDataset):
    """The batches of one rank's streams, forever, as ``ShardBatch``: DataLoader worker ``p`` (or the main process
    when ``num_workers=0``) runs logical stream ``(p + shift) % W`` from position ``starts[w]``.

    Build it through ``TarShardStream``, which also records the positions and builds the DataLoader.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        class_names: Sequence[str],
        transform: Callable[..., Any],
        collate_fn: Callable[[list[Any]], Any],
        images_per_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        streams_per_rank: int,
        accum_steps: int,
        shuffle_buffer: int,
        starts: Sequence[StreamPosition],
        shift: int,
    ) -> None:
        super().__init__()
        self.shards = tuple(shards)
        self.class_index = {name: i for i, name in enumerate(class_names)}
        self.transform, self.collate_fn = transform, collate_fn
        self.images_per_batch, self.seed = images_per_batch, seed
        self.rank, self.world_size, self.streams_per_rank = rank, world_size, streams_per_rank
        self.accum_steps, self.shuffle_buffer = accum_steps, shuffle_buffer
        self.starts, self.shift = tuple(starts), shift

    def __iter__(self) -> Iterator[ShardBatch]:
        info = torch.utils.data.get_worker_info()
        workers = 1 if info is None else info.num_workers
        if workers != self.streams_per_rank:
            raise RuntimeError(
                f"TarShardDataset was built for {self.streams_per_rank} streams per rank but runs in {workers} "
                "DataLoader workers; iterate the TarShardStream, which builds the DataLoader"
            )
        physical = 0 if info is None else info.id
        return self.stream_batches((physical + self.shift) % self.streams_per_rank)

    def stream_batches(self, logical: int) -> Iterator[ShardBatch]:
        """The batches of logical stream ``logical`` of this rank, from its start position on."""
        start = self.starts[logical]
        items = self._stream_items(self.rank * self.streams_per_rank + logical, start)
        for batch_number in itertools.count(start.batches):
            # The rank's micro-batch number under the DataLoader's round-robin over workers, and its step.
            step = (batch_number * self.streams_per_rank + logical) // self.accum_steps
            outputs, skipped = [], []
            while len(outputs) < self.images_per_batch:
                item, after = next(items)
                if isinstance(item, SkipRecord):
                    # Reported once per bad sample: in the first epoch, the streams together read every shard once.
                    if item.epoch == 0:
                        skipped.append(item)
                    continue
                generator = engine.sample_generator(self.seed, step, item.index)
                outputs.append(self.transform(item, generator=generator))
            yield ShardBatch(
                data=self.collate_fn(outputs),
                stream=logical,
                position=after._replace(batches=batch_number + 1),
                skipped=tuple(skipped),
            )

    def _stream_items(
        self, stream: int, start: StreamPosition
    ) -> Iterator[tuple[ShardSample | SkipRecord, StreamPosition]]:
        """Each sample of the stream from ``start`` on, decoded (or its SkipRecord), with the position after it."""
        num_streams = self.world_size * self.streams_per_rank
        epoch, ordinal, emitted = start.epoch, start.ordinal, start.emitted
        shards_without_sample = 0  # guards against an endless loop over shards that hold no usable sample
        while True:
            order = epoch_shard_order(len(self.shards), seed=self.seed, epoch=epoch)[stream::num_streams]
            while ordinal < len(order):
                shard = order[ordinal]
                url = self.shards[shard]
                shards_without_sample += 1
                if shards_without_sample > len(self.shards):
                    raise ShardError(
                        f"stream {stream} read {len(self.shards)} shards in a row without a usable sample (last: "
                        f"{url}); check the class list and the shards' labels and images"
                    )
                shuffled = _ShardShuffle(
                    iter_tar_samples(url),
                    size=self.shuffle_buffer,
                    rng=random.Random(_mixed_seed(_SHUFFLE_STREAM, self.seed, epoch, shard)),
                )
                # Resuming inside this shard: replay the shuffle past the samples already emitted, undecoded.
                for skipped_so_far in range(emitted):
                    if next(shuffled, None) is None:
                        raise ShardError(
                            f"{url} holds {skipped_so_far} samples, but the checkpoint's stream had taken {emitted} "
                            "from it; the shards changed since the checkpoint: resume only over the same shards"
                        )
                for raw in shuffled:
                    emitted += 1
                    if shuffled.exhausted:  # record the next shard directly: a resume then skips no whole tar
                        last = ordinal + 1 == len(order)
                        after = StreamPosition(epoch + last, 0 if last else ordinal + 1, 0, 0)
                    else:
                        after = StreamPosition(epoch, ordinal, emitted, 0)
                    try:
                        item = decode_sample(raw, url=url, shard=shard, class_index=self.class_index, epoch=epoch)
                        shards_without_sample = 0
                    except BadSampleError as error:
                        item = SkipRecord(url, shard, raw.position, raw.key, error.reason, error.detail, epoch)
                    yield item, after
                ordinal, emitted = ordinal + 1, 0
            epoch, ordinal = epoch + 1, 0


def _as_is(batch: Any) -> Any:
    # The DataLoader's collate_fn with batch_size=None: the worker has collated already. Its default (default_convert)
    # would rebuild every NamedTuple it meets; a module-level function so that spawned workers can pickle it.
    return batch


def _shards_fingerprint(shards: Sequence[str]) -> str:
    """A short hash of the shards' base names in order: the same data moved to another folder keeps it."""
    names = "\n".join(url.rstrip("/").rsplit("/", 1)[-1] for url in shards)
    return hashlib.sha256(names.encode()).hexdigest()[:16]


class TarShardStream:
    """This rank's endless stream of training batches from tar shards, and the record that resumes it exactly.

    ``iter(stream)`` (once) yields ``collate_fn([transform(sample, generator=...) for B good samples])``; each
    ``sample`` is a ``ShardSample``. ``state_dict()`` is this rank's position after the batches handed out so far;
    ``all_ranks_state_dict()`` gathers every rank's (a collective) for the checkpoint, and ``resume_state=`` takes that
    list back. ``skipped`` counts the bad samples met so far by reason; ``take_skipped()`` returns the new ones.

    ``shards``: the shard URLs (``expand_shard_urls``), the same list on every rank. ``class_names``: the class list
    (``load_class_names``). ``images_per_batch``: good samples per batch. ``accum_steps``: micro-batches per optimizer
    step (it maps a batch to its step for the augmentation seed). ``start_step``: the step the run starts at, 0 or the
    checkpoint's (checked against ``resume_state``).
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        class_names: Sequence[str],
        transform: Callable[..., Any],
        collate_fn: Callable[[list[Any]], Any],
        images_per_batch: int,
        seed: int,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        start_step: int = 0,
        resume_state: Sequence[Mapping[str, Any]] | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if min(images_per_batch, world_size, accum_steps, shuffle_buffer) < 1:
            raise ValueError("images_per_batch, world_size, accum_steps and shuffle_buffer must all be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers {num_workers} is negative; pass --num-workers >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if seed < 0:
            raise ValueError(f"seed {seed} is negative; pass --seed >= 0")
        self.shards = tuple(shards)
        self.class_names = load_class_names(class_names)
        self.images_per_batch, self.seed, self.num_workers = images_per_batch, seed, num_workers
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.shuffle_buffer, self.pin_memory, self.prefetch_factor = shuffle_buffer, pin_memory, prefetch_factor
        self.streams_per_rank = max(1, num_workers)  # num_workers=0: one stream, in the main process
        num_streams = world_size * self.streams_per_rank
        if len(self.shards) < num_streams:
            fewer_workers = (
                f"pass --num-workers {len(self.shards) // world_size} or fewer, or "
                if len(self.shards) >= world_size
                else ""
            )
            raise ShardError(
                f"{len(self.shards)} shards cannot feed {world_size} processes x {self.streams_per_rank} data-loader "
                f"workers = {num_streams} streams, each of which needs a shard of its own every epoch; "
                f"{fewer_workers}write the data into at least {num_streams} shards"
            )
        self.fingerprint = _shards_fingerprint(self.shards)
        if resume_state is None:
            if start_step != 0:
                raise ValueError(
                    f"the run resumes at step {start_step}, but the checkpoint holds no tar-shard stream state; "
                    "resume from a checkpoint written by a run over the same tar shards"
                )
            positions, consumed, skipped = [_START] * self.streams_per_rank, 0, {}
        else:
            positions, consumed, skipped = self._restore(resume_state, start_step=start_step)
        self._positions: list[StreamPosition] = list(positions)
        self._consumed = consumed  # micro-batches this rank has handed out, over the whole run
        self._skipped: Counter[str] = Counter(skipped)
        self._new_skips: list[SkipRecord] = []
        self._iterated = False
        self.dataset = TarShardDataset(
            self.shards,
            class_names=self.class_names,
            transform=transform,
            collate_fn=collate_fn,
            images_per_batch=images_per_batch,
            seed=seed,
            rank=rank,
            world_size=world_size,
            streams_per_rank=self.streams_per_rank,
            accum_steps=accum_steps,
            shuffle_buffer=shuffle_buffer,
            starts=positions,
            # A new DataLoader iterator asks worker 0 first; the next batch due is from stream consumed % W.
            shift=consumed % self.streams_per_rank,
        )

    # ------------------------------------------------------------------------------------------------- iterating

    def __iter__(self) -> Iterator[Any]:
        if self._iterated:
            raise RuntimeError(
                "a TarShardStream is iterated once (a second iterator would restart from its first position); "
                "build a new one with resume_state=... to restart"
            )
        self._iterated = True
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,  # the workers batch: a batch is one stream's, with that stream's position
            collate_fn=_as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            # As engine.make_loader: creating the iterator must not draw from the global torch RNG (engine rule 4).
            generator=torch.Generator().manual_seed(self.seed),
        )
        return self._record(loader)

    def _record(self, loader: torch.utils.data.DataLoader) -> Iterator[Any]:
        for batch in loader:
            due = self._consumed % self.streams_per_rank
            if batch.stream != due:
                raise RuntimeError(
                    f"the DataLoader returned a batch of stream {batch.stream} where stream {due} was due; the "
                    "workers' batches must arrive round-robin (in_order=True, the default) for an exact resume"
                )
            self._positions[batch.stream] = batch.position
            self._consumed += 1
            self._skipped.update(record.reason for record in batch.skipped)
            self._new_skips.extend(batch.skipped)
            yield batch.data

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def consumed_batches(self) -> int:
        """Micro-batches this rank has handed out over the whole run (resumes included)."""
        return self._consumed

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples this rank's streams met so far, by reason (each counted once: in the first epoch). Summed over
        ranks once every stream has finished its first epoch: the bad samples of the data set."""
        return dict(self._skipped)

    def take_skipped(self) -> list[SkipRecord]:
        """The bad samples reported since the last call, with shard and key (``SkipRecord.describe()`` for logs)."""
        records, self._new_skips = self._new_skips, []
        return records

    # ---------------------------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """This rank's stream record after the batches handed out so far, as plain types (loads with
        ``torch.load(weights_only=True)``)."""
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "streams_per_rank": self.streams_per_rank,
            "num_shards": len(self.shards),
            "shards_fingerprint": self.fingerprint,
            "seed": self.seed,
            "images_per_batch": self.images_per_batch,
            "accum_steps": self.accum_steps,
            "shuffle_buffer": self.shuffle_buffer,
            "consumed_batches": self._consumed,
            "streams": [position._asdict() for position in self._positions],
            "skipped": dict(self._skipped),
        }

    def all_ranks_state_dict(self) -> list[dict[str, Any]]:
        """Every rank's ``state_dict()`` in rank order; a collective under torch.distributed: call it on every rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return [self.state_dict()]
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state_dict())
        return states

    def _restore(
        self, states: Sequence[Mapping[str, Any]], *, start_step: int
    ) -> tuple[list[StreamPosition], int, dict[str, int]]:
        """This rank's positions, consumed count and skip counts from all ranks' records, after checking that this
        run reads the same streams."""
        if len(states) != self.world_size:
            raise ValueError(
                f"--resume: the checkpoint's tar-shard streams were read by {len(states)} processes, this run has "
                f"{self.world_size}; resume on {len(states)} processes (a stream's position cannot be split)"
            )
        state = states[self.rank]
        if state.get("format") != STATE_FORMAT or state.get("rank") != self.rank:
            raise ValueError(
                f"--resume: the checkpoint's tar-shard state for rank {self.rank} is not a {STATE_FORMAT} record of "
                "that rank; resume only from a checkpoint this version wrote"
            )
        if state["streams_per_rank"] != self.streams_per_rank:
            raise ValueError(
                f"--resume: the checkpoint's tar shards were read by {state['streams_per_rank']} data-loader workers "
                f"per process, this run has {self.streams_per_rank} (--num-workers {self.num_workers}); pass "
                f"--num-workers {state['streams_per_rank']} (0 and 1 both mean one stream)"
            )
        if (state["num_shards"], state["shards_fingerprint"]) != (len(self.shards), self.fingerprint):
            raise ValueError(
                f"--resume: the checkpoint's stream read {state['num_shards']} shards, this run lists "
                f"{len(self.shards)} (or other names); pass the same shards to continue that run"
            )
        ours = {"seed": self.seed, "images_per_batch": self.images_per_batch, "accum_steps": self.accum_steps}
        ours["shuffle_buffer"] = self.shuffle_buffer
        changed = [f"{name}: {state[name]} -> {value}" for name, value in ours.items() if state[name] != value]
        if changed:
            raise ValueError(
                f"--resume: the tar-shard stream was read with other settings ({'; '.join(changed)}); a stream's "
                "position only holds for the same batch split, seed and shuffle buffer: pass the checkpoint's values"
            )
        positions = [StreamPosition(**position) for position in state["streams"]]
        consumed = int(state["consumed_batches"])
        # Round-robin: after K batches, stream w has produced ceil((K - w) / W) of them.
        expected = [(consumed - w + self.streams_per_rank - 1) // self.streams_per_rank for w in range(len(positions))]
        if len(positions) != self.streams_per_rank or [p.batches for p in positions] != expected:
            raise ValueError(
                f"--resume: the tar-shard state of rank {self.rank} is inconsistent ({consumed} batches consumed, "
                f"streams at {[p.batches for p in positions]}); the checkpoint is damaged: resume from another"
            )
        if consumed != start_step * self.accum_steps:
            raise ValueError(
                f"--resume: the tar-shard stream had handed out {consumed} micro-batches, but step {start_step} x "
                f"{self.accum_steps} accumulation steps needs {start_step * self.accum_steps}; save the stream state "
                "in the same checkpoint as the step"
            )
        return positions, consumed, dict(state["skipped"])
