"""The training engine shared by train_predet.py, train_jigsaw.py and finetune.py.

Mechanisms only (the scripts hold the recipe): torchrun/DDP setup, seeding and a deterministic mode, bf16
autocast and channels_last on CUDA, gradient accumulation, learning-rate schedules that are pure functions of
the step, a data order that is a pure function of (seed, step), an atomic resumable ``checkpoint.pth``,
``log.jsonl`` with a progress bar, and a stop on non-finite losses before any bad checkpoint is written.

Rules a script follows, which together make a run resume exactly and give the same result on 1 process with
batch B x W as on W processes with batch B (up to float summation order):

1. Train by iterations: ``--iters N`` optimizer steps, ``--batch-size`` per process, so the global batch is
   ``batch_size * world_size * accum_steps``.
2. Draw the data order from ``StepBatchSampler``: step ``s`` takes the ``s``-th global batch of a stream made
   of seeded per-epoch permutations; rank ``r`` and micro-step ``m`` take a contiguous slice of it. It can
   start at any step without replaying the earlier ones.
3. Random augmentation draws only from ``sample_generator(seed, step, index)`` (``StepSeededDataset`` applies
   this), never from a global RNG (``torch.rand`` without ``generator=``, ``random``, ``np.random``): in a
   DataLoader worker the global RNG is reseeded per worker and per loader iterator, so what it yields
   depends on ``--num-workers``, on prefetching and on where the run was resumed.
4. Build the loader with ``make_loader``: it gives the DataLoader its own generator, so creating an iterator
   does not consume the main process's torch RNG that the checkpoint restores.
5. Model-side randomness (dropout, proposal sampling) may use the global RNGs of the main process: the
   checkpoint stores them for every rank and ``restore_training_state`` puts them back.

``checkpoint.pth`` (a dict, written by rank 0 with ``save_checkpoint``; loads with ``weights_only=True``):
``model`` (state dict of the unwrapped model), ``optimizer``, ``scaler`` (``{}`` when no GradScaler is in use,
so the format does not depend on the AMP mode), ``step`` (optimizer steps completed = the step index the
run resumes at), ``args`` (JSON-able dict), ``world_size``, ``global_batch_size``, ``rng`` (one dict per rank:
python, numpy, torch, cuda states as tensors and plain types), plus whatever the script adds.

Bad input. ``InputError`` marks an error in the user's data or files, not a bug: ``run_main`` (each script's
``__main__``) prints its message as one line on stderr and exits non-zero, also when a DataLoader worker raised it,
on whichever rank met it (torchrun then stops the other ranks). A sample that cannot be used (``BadSampleError``: an
undecodable, truncated or empty image, or one whose size contradicts its annotations) does not stop a run:
``StepSeededDataset`` replaces it by the first good index of a probe sequence seeded by its ``SampleKey``, so the
replacement is a pure function of the key and the files, whichever worker, rank or resumed run draws it; the
loader of ``make_loader`` hands the skipped samples back to the main process with their batch, and
``BadSampleTracker`` gathers them over the ranks, logs them, checkpoints them and stops the run with one line once
more than ``max_fraction`` of the dataset is bad.

``log.jsonl`` (rank 0, one JSON object per line, every ``log_every`` steps and at the last step): ``step``
(0-based index of the step the values come from), ``lr``, ``loss`` (the total), one ``loss_<name>`` per
term, ``grad_norm``, ``samples_per_s`` (since the previous line), ``elapsed_s`` (training time, continued
across resumes), and the script's extras. On resume the lines with ``step >= start_step`` are dropped, so no
step appears twice.

A script's train loop (see tests/engine_toy_train.py for a complete one)::

    dist_info = engine.setup_distributed(args.device)
    engine.seed_everything(args.seed, rank=dist_info.rank, deterministic=args.deterministic)
    ...  # build model, optimizer, scaler = engine.make_grad_scaler(dist_info.device, amp=args.amp)
    start_step = 0
    if (path := engine.resolve_resume(args.resume, output_dir=args.output_dir)) is not None:
        start_step = engine.restore_training_state(engine.load_checkpoint(path), model=model, ...)
    if dist_info.is_main:
        engine.save_args(args.output_dir, vars(args))  # after the resume check, which may reject these args
    ddp_model = engine.wrap_ddp(model, dist_info)
    sampler = engine.StepBatchSampler(dataset_size=len(dataset), batch_size=args.batch_size, ...)
    batches = iter(engine.make_loader(dataset, batch_sampler=sampler, num_workers=..., seed=args.seed))
    with engine.TrainLogger(output_dir=..., total_steps=args.iters, start_step=start_step, ...) as logger:
        for step in range(start_step, args.iters):
            lr = engine.set_lr(optimizer, engine.warmup_cosine_lr(step, ...))
            stats = engine.train_step(model=ddp_model, batches=batches, compute_losses=..., step=step, ...)
            logger.log(step, lr=lr, stats=stats)
            if (step + 1) % args.save_every == 0 or step + 1 == args.iters:
                state = engine.training_state(model=ddp_model, step=step + 1, ...)  # every rank
                if dist_info.is_main:
                    engine.save_checkpoint(output_dir / engine.CHECKPOINT_NAME, state)
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import functools
import json
import math
import os
import random
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.jsonl"
ARGS_NAME = "args.json"

# Flags that change how a run is executed or recorded but not what it computes. The global batch is checked
# separately (restore_training_state), so batch_size and accum_steps may change together with the number of
# processes as long as batch_size * world_size * accum_steps stays the same.
DEFAULT_RESUME_IGNORE = frozenset(
    {
        "resume",
        "output_dir",
        "device",
        "num_workers",
        "quiet",
        "log_every",
        "save_every",
        "batch_size",
        "accum_steps",
        "dist_timeout",
        "count_flops",
        "max_bad_image_fraction",  # decides only when a run stops: raising it and resuming is the way on
    }
)

# The --dist-timeout default, in minutes. A collective waits at most this long for the slowest rank. In these scripts
# the longest legitimate wait is one preprocessing shard (a rank that finishes its own shards helps with the others',
# detpretrain.sharding) or rank 0's evaluation between fine-tuning steps (minutes for COCO val, ~15 min for LVIS val),
# while a hung job should fail within the hour. torch's own defaults (10 min for NCCL, 30 for gloo) stop
# jobs whose rank 0 evaluates LVIS.
DEFAULT_DIST_TIMEOUT_MINUTES = 60.0
# The --max-bad-image-fraction default: a real dataset has a few broken files (COCO train2017 has none, web crawls
# ~0.1%), while a dataset with more is more likely a wrong folder or a broken copy, which a run should not train on.
DEFAULT_MAX_BAD_IMAGE_FRACTION = 0.01


# ------------------------------------------------------------------------------------------------- bad input


class InputError(Exception):
    """An error in the user's data or files, not a bug: the message says which file and what to do. ``run_main``
    reports it as one line on stderr and a non-zero exit, without a traceback."""


class BadSampleError(InputError, ValueError):
    """One sample that cannot be used (an undecodable, truncated, empty or missing image, or one whose size
    contradicts its annotations): ``StepSeededDataset`` replaces it and reports it instead of stopping the run.

    ``name`` identifies the sample (its file), ``reason`` says what is wrong with it in a few words. Both are optional
    so that the class can be rebuilt from its message alone, as a DataLoader re-raising a worker's exception does.
    """

    def __init__(self, message: str, *, name: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.name, self.reason = name, reason if reason is not None else message

    def __reduce__(self) -> tuple:  # keyword arguments survive pickling (multiprocessing pools)
        return (functools.partial(type(self), name=self.name, reason=self.reason), (str(self),))


class TooManyBadSamplesError(InputError):
    """More of the dataset is bad than ``--max-bad-image-fraction`` allows, or a whole probe sequence was bad."""


def input_error_message(error: BaseException) -> str:
    """``error``'s message as one line. A DataLoader re-raises a worker's exception with the worker's traceback as
    its message ("Caught X in DataLoader worker process N. Original Traceback ..."): its last line holds the original
    message, after the exception's name."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        _, sep, message = last.partition(": ")
        text = message if sep else last
    return " ".join(text.split())


def run_main(main: Callable[[Any], Any], args: Any) -> Any:
    """``main(args)``, with an ``InputError`` (raised here, or in a DataLoader worker) turned into one line on stderr
    and exit status 1: what each script's ``if __name__ == "__main__":`` calls. Bugs keep their traceback.

    Under torchrun the line says which rank met the error; its exit makes torchrun stop the other ranks at once,
    instead of leaving them at their next collective until ``--dist-timeout``.
    """
    try:
        return main(args)
    except InputError as error:
        message = input_error_message(error)
        if os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE", "1") != "1":
            message = f"rank {os.environ['RANK']}: {message}"
        raise SystemExit(message) from None


# --------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run. ``distributed`` is False for a plain ``python script.py``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    distributed: bool


def setup_distributed(device: str = "cuda", *, timeout_minutes: float = DEFAULT_DIST_TIMEOUT_MINUTES) -> DistInfo:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU), or run as one process without torchrun.

    ``timeout_minutes`` (the scripts' --dist-timeout) bounds every collective, and the rendezvous: a rank waiting
    longer for the others fails with torch's timeout error instead of hanging.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; pass --device cpu or --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible; pass --device cpu")
    env = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if all(value is None for value in env.values()):
        single = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=single, is_main=True, distributed=False)
    if any(value is None for value in env.values()):
        raise RuntimeError(f"incomplete torchrun environment {env}; launch with torchrun, or unset all three")
    rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if not timeout_minutes > 0:
        raise ValueError(f"--dist-timeout {timeout_minutes} must be a positive number of minutes")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but {torch.cuda.device_count()} CUDA devices are visible; "
                "pass --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        this_device = torch.device("cuda", local_rank)
        # device_id binds the communicator to this GPU at once (no guessing in barrier()).
        dist.init_process_group("nccl", device_id=this_device, timeout=timeout)
    else:
        this_device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, device=this_device, is_main=rank == 0, distributed=True
    )


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which job schedulers set), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_per_local_rank() -> int:
    """The cores of this node shared among its local ranks (torchrun's LOCAL_WORLD_SIZE), at least one."""
    return max(1, available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_num_workers() -> int:
    """Data-loader workers per process by default: this rank's share of the node's cores, one left for the process
    itself (it feeds the device and runs the step), at least one."""
    return max(1, cores_per_local_rank() - 1)


def cleanup_distributed() -> None:
    """Leave the process group (a no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, dist_info: DistInfo, *, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself. Broadcasts rank 0's weights."""
    if not dist_info.distributed:
        return model
    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP and torch.compile wrappers, whose state_dict keys carry no ``module.`` prefix."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def all_reduce_mean(values: Mapping[str, float | torch.Tensor], dist_info: DistInfo) -> dict[str, float]:
    """Mean of each scalar over all ranks (identity on one process), in one collective and one device sync."""
    if not values:
        return {}
    stacked = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=dist_info.device).detach().reshape(()) for v in values.values()]
    )
    if dist_info.distributed:
        dist.all_reduce(stacked)
        stacked /= dist_info.world_size
    return dict(zip(values, stacked.tolist(), strict=True))


# ------------------------------------------------------------------------------------- seeds, determinism


def seed_everything(seed: int, *, rank: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every GPU) with ``seed + rank``; optionally force determinism.

    Ranks get different seeds so that dropout masks and the like are independent across processes; the model
    is still identical everywhere because DDP broadcasts rank 0's weights. ``deterministic=True`` sets
    ``torch.use_deterministic_algorithms(True)``: an op without a deterministic implementation then raises
    instead of silently varying (on CUDA, e.g. torchvision's roi_align backward), so a run either reproduces
    bit for bit or says which op stops it. It also turns off cudnn autotuning (which may pick different
    kernels per run) and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS needs for reproducible
    matmuls; that variable only counts before the first CUDA matmul, so call this first thing in ``main``.
    """
    if seed < 0:
        raise ValueError(f"seed {seed} is negative; pass --seed >= 0")
    process_seed = seed + rank
    random.seed(process_seed)
    np.random.seed(process_seed % 2**32)
    torch.manual_seed(process_seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic


# --------------------------------------------------------------------------------------------- data order

# Domain tags keep the seed streams for permutations and for samples apart even when the numbers coincide.
_PERMUTATION_STREAM = 0x5EED0001
_SAMPLE_STREAM = 0x5EED0002
_REPLACEMENT_STREAM = 0x5EED0003


def _mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints, stable across platforms and Python versions."""
    if any(v < 0 for v in values):
        raise ValueError(f"seed components {values} must be >= 0")
    # SeedSequence hashes all its entropy words, so neighbouring (step, index) pairs give unrelated streams.
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_seed(seed: int, step: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation at ``step``: a pure function, whichever process draws it."""
    return _mix_seed(_SAMPLE_STREAM, seed, step, index)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A CPU torch.Generator for the random augmentation of sample ``index`` at ``step`` (rule 3 above)."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, step, index))
    return generator


@functools.lru_cache(maxsize=4)
def _epoch_permutation(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    # Cached: consecutive steps read the same permutation; callers only slice it.
    generator = torch.Generator()
    generator.manual_seed(_mix_seed(_PERMUTATION_STREAM, seed, epoch))
    return torch.randperm(dataset_size, generator=generator)


def global_batch_indices(step: int, *, dataset_size: int, global_batch_size: int, seed: int) -> list[int]:
    """Dataset indices of the global batch at ``step``: positions ``[step*G, (step+1)*G)`` of the stream
    ``perm(epoch 0) ++ perm(epoch 1) ++ ...``, each a seeded permutation, so a batch may span two epochs."""
    if step < 0 or dataset_size < 1 or global_batch_size < 1:
        raise ValueError(
            f"need step >= 0, dataset_size >= 1, global_batch_size >= 1; got {step}, {dataset_size}, "
            f"{global_batch_size}"
        )
    position, end = step * global_batch_size, (step + 1) * global_batch_size
    indices: list[int] = []
    while position < end:
        epoch, offset = divmod(position, dataset_size)
        take = min(end - position, dataset_size - offset)
        indices.extend(_epoch_permutation(dataset_size, seed, epoch)[offset : offset + take].tolist())
        position += take
    return indices


class SampleKey(NamedTuple):
    """What StepBatchSampler hands to the dataset: the step (seeds the augmentation) and the dataset index."""

    step: int
    index: int


class StepBatchSampler(torch.utils.data.Sampler):
    """Batch sampler yielding, for each step from ``start_step`` to ``total_steps``, this rank's ``accum_steps``
    micro-batches as lists of ``SampleKey``.

    Micro-step ``m`` of rank ``r`` takes slice ``[(m*W + r)*B, (m*W + r + 1)*B)`` of the global batch, so the
    union over ranks of micro-step ``m`` is micro-step ``m`` of one process with batch ``W*B``.
    """

    def __init__(
        self,
        *,
        dataset_size: int,
        batch_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
    ) -> None:
        if min(dataset_size, batch_size, world_size, accum_steps) < 1:
            raise ValueError("dataset_size, batch_size, world_size and accum_steps must all be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step {start_step} is outside [0, total_steps={total_steps}]")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[SampleKey]]:
        global_batch_size = self.batch_size * self.world_size * self.accum_steps
        for step in range(self.start_step, self.total_steps):
            indices = global_batch_indices(
                step, dataset_size=self.dataset_size, global_batch_size=global_batch_size, seed=self.seed
            )
            for micro_step in range(self.accum_steps):
                start = (micro_step * self.world_size + self.rank) * self.batch_size
                yield [SampleKey(step, index) for index in indices[start : start + self.batch_size]]


MAX_SAMPLE_PROBES = 64
"""Replacements ``StepSeededDataset`` tries for one bad sample before it gives up: with 1% of the images bad, 64 bad
draws in a row happen once in 10^128."""


class SkippedSample(NamedTuple):
    """A sample ``StepSeededDataset`` skipped: ``name`` (its file) and ``reason`` (``BadSampleError``'s)."""

    name: str
    reason: str


class SampleWithSkipped(NamedTuple):
    """What ``StepSeededDataset`` returns for a key whose own sample was bad: the replacement and what it skipped."""

    sample: Any
    skipped: tuple[SkippedSample, ...]


class StepSeededDataset(torch.utils.data.Dataset):
    """``dataset[SampleKey(step, index)] = transform(base[index], generator=sample_generator(seed, step, index))``.

    The transform draws all its randomness from ``generator``; the same sample at the same step is then
    augmented the same way in any process, worker or resumed run. A sample drawn twice within one step (only
    when the dataset is smaller than the global batch) gets the same augmentation both times.

    A sample that raises ``BadSampleError`` (reading it, or in the transform) is replaced by the first good one of a
    probe sequence of indices drawn from a generator seeded by (seed, step, index), transformed with the key's own
    generator: the replacement depends only on the key and the files, so every worker, rank and resumed run makes
    the same one, and no state is kept about which files were bad. The result is then a ``SampleWithSkipped``,
    which ``make_loader``'s collate unwraps and reports; after ``MAX_SAMPLE_PROBES`` bad draws in a row it raises
    ``TooManyBadSamplesError``.
    """

    def __init__(self, base: torch.utils.data.Dataset, *, transform: Callable[..., Any], seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: SampleKey) -> Any:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(
                f"StepSeededDataset is indexed by SampleKey(step, index), got {key!r}; "
                "build the DataLoader with batch_sampler=StepBatchSampler(...)"
            )
        step, index = key
        skipped: list[SkippedSample] = []
        probes: torch.Generator | None = None
        candidate = index
        while len(skipped) <= MAX_SAMPLE_PROBES:
            try:
                sample = self.transform(self.base[candidate], generator=sample_generator(self.seed, step, index))
            except BadSampleError as error:
                skipped.append(SkippedSample(error.name or f"sample {candidate}", error.reason))
                if probes is None:
                    probes = torch.Generator().manual_seed(_mix_seed(_REPLACEMENT_STREAM, self.seed, step, index))
                candidate = int(torch.randint(len(self.base), (), generator=probes))
                continue
            return SampleWithSkipped(sample, tuple(skipped)) if skipped else sample
        raise TooManyBadSamplesError(
            f"{len(skipped)} samples in a row cannot be used (e.g. {skipped[0].name}: {skipped[0].reason}); most of "
            "the dataset is bad: check the files"
        )


class _ReportedBatch(NamedTuple):
    batch: Any
    skipped: tuple[SkippedSample, ...]


def _collate_reporting(samples: list[Any], *, collate_fn: Callable[[list[Any]], Any]) -> Any:
    # Runs in the loader's workers: the skipped samples travel to the main process with their batch.
    skipped: list[SkippedSample] = []
    plain = []
    for sample in samples:
        if isinstance(sample, SampleWithSkipped):
            skipped += sample.skipped
            sample = sample.sample
        plain.append(sample)
    batch = collate_fn(plain)
    return _ReportedBatch(batch, tuple(skipped)) if skipped else batch


class ReportingLoader(torch.utils.data.DataLoader):
    """``make_loader``'s DataLoader: it yields the batches as its ``collate_fn`` makes them, and keeps the samples
    ``StepSeededDataset`` skipped for them, in the order their batches were yielded, for ``take_skipped``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skipped: list[SkippedSample] = []

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, _ReportedBatch):
                self._skipped += batch.skipped
                batch = batch.batch
            yield batch

    def take_skipped(self) -> list[SkippedSample]:
        """The samples skipped for the batches yielded since the last call (this process's only)."""
        taken, self._skipped = self._skipped, []
        return taken


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_sampler: StepBatchSampler,
    num_workers: int,
    seed: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
) -> ReportingLoader:
    """A DataLoader over ``batch_sampler`` whose worker seeds come from its own generator (rule 4 above); the samples
    a ``StepSeededDataset`` skipped come back with their batch (``ReportingLoader.take_skipped``)."""
    if num_workers < 0:
        raise ValueError(f"num_workers {num_workers} is negative; pass --num-workers >= 0")
    return ReportingLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(_collate_reporting, collate_fn=collate_fn or torch.utils.data.default_collate),
        pin_memory=pin_memory,
        # Without it, iter(loader) draws the workers' base seed from the global torch RNG, so a resumed run
        # (which creates its iterator after restoring that RNG) would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )


class BadSampleTracker:
    """The distinct bad samples a run has skipped (``ReportingLoader.take_skipped``), the same on every rank, and
    the stop once more than ``max_fraction`` of the ``dataset_size`` samples are bad (``--max-bad-image-fraction``).

    ``update`` (a collective, once per step) gathers every rank's skips of the step; rank 0 prints each new one on
    stderr. ``TrainLogger(bad_samples=...)`` writes the count and the samples found since the previous row into each
    log.jsonl row (``bad_images``, ``new_bad_images``); ``state_dict`` goes into the checkpoint, so a resumed run
    reports the same; ``summary()`` is for eval.json and model cards.
    """

    def __init__(
        self, *, dataset_size: int, max_fraction: float, dist_info: DistInfo, source: str = "the training set"
    ) -> None:
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"--max-bad-image-fraction {max_fraction} must be in [0, 1], e.g. 0.01")
        self.dataset_size, self.max_fraction, self.dist_info, self.source = (
            dataset_size,
            max_fraction,
            dist_info,
            source,
        )
        self.found: dict[str, str] = {}  # name -> reason, in the order found
        self._unlogged = 0  # the last ones of ``found`` that no log.jsonl row has named yet

    def update(self, skipped: Iterable[SkippedSample], *, step: int) -> list[SkippedSample]:
        """Add the samples every rank skipped at ``step`` (collective); return the new ones. Raises
        ``TooManyBadSamplesError`` on every rank once more than ``max_fraction`` of the dataset is bad."""
        met = list(skipped)
        if self.dist_info.distributed:
            count = torch.tensor([len(met)], dtype=torch.int64, device=self.dist_info.device)
            dist.all_reduce(count)
            if int(count.item()):  # names are gathered only at a step where some rank skipped a sample
                parts: list[Any] = [None] * self.dist_info.world_size
                dist.all_gather_object(parts, met)
                met = [SkippedSample(*sample) for part in parts for sample in part]
        new = []
        for sample in met:
            if sample.name not in self.found:
                self.found[sample.name] = sample.reason
                new.append(sample)
        self._unlogged += len(new)
        if self.dist_info.is_main:
            for sample in new:
                print(
                    f"step {step}: skipped bad image {sample.name} ({sample.reason}); {len(self.found)} of "
                    f"{self.dataset_size} so far, limit {self.max_fraction:g} of them",
                    file=sys.stderr,
                    flush=True,
                )
        if len(self.found) > self.max_fraction * self.dataset_size:
            name, reason = next(iter(self.found.items()))
            others = list(self.found)[1:6]
            also = f"; also {', '.join(others)}{', ...' if len(self.found) > 6 else ''}" if others else ""
            raise TooManyBadSamplesError(
                f"{len(self.found)} of the {self.dataset_size} images of {self.source} cannot be used "
                f"({len(self.found) / self.dataset_size:.2%}, above --max-bad-image-fraction {self.max_fraction:g}) "
                f"at step {step}: {name}: {reason}{also}; replace or remove them, or raise the limit and continue "
                "with --resume auto"
            )
        return new

    def row_fields(self) -> dict[str, Any]:
        """log.jsonl fields: the count so far and the samples found since the previous row (then marked logged)."""
        fields: dict[str, Any] = {"bad_images": len(self.found)}
        if self._unlogged:
            names = list(self.found)[len(self.found) - self._unlogged :]
            fields["new_bad_images"] = [{"file": name, "reason": self.found[name]} for name in names]
            self._unlogged = 0
        return fields

    def summary(self) -> dict[str, Any]:
        """For eval.json and model cards: the count, the limit, and every skipped sample with its reason."""
        return {
            "count": len(self.found),
            "of": self.dataset_size,
            "max_fraction": self.max_fraction,
            "images": [{"file": name, "reason": reason} for name, reason in self.found.items()],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"found": [[name, reason] for name, reason in self.found.items()], "unlogged": self._unlogged}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore ``state_dict()`` (None: a checkpoint from before bad samples were tracked: nothing found)."""
        state = state or {"found": [], "unlogged": 0}
        self.found = {str(name): str(reason) for name, reason in state["found"]}
        self._unlogged = int(state["unlogged"])


# -------------------------------------------------------------------------------------------------- AMP

_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _amp_dtype(amp: str) -> torch.dtype | None:
    if amp not in _AMP_DTYPES:
        raise ValueError(f"amp {amp!r} is not one of {', '.join(_AMP_DTYPES)}; pass --amp bf16 (or off)")
    return _AMP_DTYPES[amp]


def autocast(device: torch.device, *, amp: str = "off") -> contextlib.AbstractContextManager:
    """Mixed-precision autocast on CUDA for ``amp`` in {bf16, fp16}; a no-op for ``off`` and on CPU (where
    autocast is slower than float32), so a CPU smoke run of a GPU recipe needs no flag changes."""
    dtype = _amp_dtype(amp)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_grad_scaler(device: torch.device, *, amp: str = "off") -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 on CUDA. bf16 has float32's exponent range, so its gradients
    do not underflow and need no scaling; a disabled scaler passes everything through and saves ``{}``, which
    keeps the checkpoint's ``scaler`` slot (and so its format) the same in every AMP mode."""
    enabled = _amp_dtype(amp) is torch.float16 and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def memory_format(device: torch.device, *, channels_last: bool = True) -> torch.memory_format:
    """channels_last on CUDA (tensor-core convolutions prefer NHWC), contiguous elsewhere. Apply it to both the
    model (``model.to(memory_format=...)``) and the input images."""
    return torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format


# ------------------------------------------------------------------------------------ learning-rate schedules


def _warmup_factor(step: int, *, base_lr: float, warmup_iters: int, warmup_start_lr: float) -> float:
    if step < 0 or warmup_iters < 0 or base_lr <= 0:
        raise ValueError(f"need step >= 0, warmup_iters >= 0 and base_lr > 0; got {step}, {warmup_iters}, {base_lr}")
    if step >= warmup_iters:
        return 1.0
    start = warmup_start_lr / base_lr
    return start + (1.0 - start) * step / warmup_iters


def warmup_multistep_lr(
    step: int,
    *,
    base_lr: float,
    warmup_iters: int,
    warmup_start_lr: float,
    milestones: Iterable[int],
    gamma: float = 0.1,
) -> float:
    """detectron2's WarmupMultiStepLR: ``base_lr * gamma**(milestones <= step)``, times a linear warmup factor
    that goes from ``warmup_start_lr / base_lr`` at step 0 to 1 at ``warmup_iters``. detectron2's
    WARMUP_FACTOR ``f`` is ``warmup_start_lr = f * base_lr``. PreDet and fine-tuning use it."""
    decay = gamma ** bisect.bisect_right(sorted(milestones), step)
    return (
        base_lr
        * decay
        * _warmup_factor(step, base_lr=base_lr, warmup_iters=warmup_iters, warmup_start_lr=warmup_start_lr)
    )


def warmup_cosine_lr(
    step: int,
    *,
    base_lr: float,
    total_iters: int,
    warmup_iters: int,
    warmup_start_lr: float,
    final_lr: float = 0.0,
) -> float:
    """Linear warmup from ``warmup_start_lr`` to ``base_lr`` over ``warmup_iters``, then a half cosine from
    ``base_lr`` to ``final_lr`` at ``total_iters`` (clamped after it). Jigsaw (Sec. 4.1): 0.2 -> 0.8 over
    1250 iterations, then cosine to 0 at 64k."""
    if total_iters <= warmup_iters:
        raise ValueError(f"total_iters ({total_iters}) must exceed warmup_iters ({warmup_iters})")
    if step < warmup_iters:
        return base_lr * _warmup_factor(
            step, base_lr=base_lr, warmup_iters=warmup_iters, warmup_start_lr=warmup_start_lr
        )
    progress = min(1.0, (step - warmup_iters) / (total_iters - warmup_iters))
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scale_lr(base_lr: float, *, global_batch_size: int, reference_batch_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``base_lr * global_batch_size / reference_batch_size``, the lr
    for a run whose global batch differs from the one ``base_lr`` was tuned for (e.g. 1 GPU instead of 8)."""
    if global_batch_size < 1 or reference_batch_size < 1:
        raise ValueError("global_batch_size and reference_batch_size must be >= 1")
    return base_lr * global_batch_size / reference_batch_size


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every param group's lr to ``lr * group.get("lr_scale", 1.0)`` and return ``lr`` (for logging)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


# ---------------------------------------------------------------------------------------------- train step


class NonFiniteLossError(RuntimeError):
    """A loss term (or, without a GradScaler, the gradient norm) was NaN or inf on some rank."""

    def __init__(self, message: str, *, step: int, terms: dict[str, float]) -> None:
        super().__init__(message)
        self.step, self.terms = step, terms


def _named_terms(losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(losses, Mapping) or not losses:
        raise TypeError(f"compute_losses must return a non-empty dict of named scalar losses, got {type(losses)}")
    terms: dict[str, torch.Tensor] = {}
    for name, value in losses.items():
        key = name if name.startswith("loss_") else f"loss_{name}"
        if name == "loss" or key in terms:
            raise ValueError(f"loss term {name!r} collides with another name; 'loss' is the total, name terms loss_<x>")
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise TypeError(f"loss term {name!r} must be a scalar tensor, got {type(value).__name__}")
        terms[key] = value.reshape(())
    return terms


def _describe_checkpoint(checkpoint_path: str | Path | None) -> str:
    if checkpoint_path is None or not Path(checkpoint_path).is_file():
        return "none (nothing was saved before this step)"
    # mmap: only the 'step' entry is needed, not a copy of the weights.
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    return f"{checkpoint_path} (resumes at step {state['step']})"


def train_step(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: Iterator[Any],
    compute_losses: Callable[[Any], Mapping[str, torch.Tensor]],
    accum_steps: int,
    step: int,
    dist_info: DistInfo,
    amp: str = "off",
    max_grad_norm: float | None = None,
    checkpoint_path: str | Path | None = None,
    count_flops: bool = False,
) -> dict[str, float]:
    """One optimizer step over ``accum_steps`` micro-batches taken from ``batches``.

    ``compute_losses(batch)`` runs the (DDP-wrapped) ``model`` and returns named scalar losses; their sum is the
    total. Each micro-step's total is divided by ``accum_steps`` so the gradient is the mean over the global
    batch, and DDP's gradient all-reduce runs only on the last micro-step (``no_sync`` before it). The gradient
    norm is computed (and clipped to ``max_grad_norm`` when given), then the loss terms and the norm are
    averaged over micro-steps and ranks; if any is NaN/inf on any rank, every rank raises NonFiniteLossError
    before the optimizer step, so the weights stay good and no checkpoint is written after it.

    With ``count_flops``, the forward and backward passes run under ``torch.utils.flop_counter.FlopCounterMode``
    and ``"flops"`` is the step's floating-point operations summed over micro-steps and ranks (what that counter
    counts: convolutions, matrix products and attention, forward and backward, the bulk of a CNN's work; custom
    kernels such as RoIAlign and NMS are not counted). The unit of the study's compute budget
    (experiments/study.py); it slows a step by a few percent, so it is off by default.

    Returns ``{"loss": total, "loss_<name>": ..., "grad_norm": ...}`` (and ``"flops"``) as floats, equal on every rank.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps {accum_steps} must be >= 1")
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    flop_counter = FlopCounterMode(display=False) if count_flops else None
    flops = 0  # the counter restarts at each entry: summed over micro-steps here
    for micro_step in range(accum_steps):
        try:
            batch = next(batches)
        except StopIteration:
            raise RuntimeError(
                f"the batch iterator ran out at step {step}; build StepBatchSampler with total_steps=--iters"
            ) from None
        last = micro_step == accum_steps - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync, flop_counter or contextlib.nullcontext():
            with autocast(dist_info.device, amp=amp):
                terms = _named_terms(compute_losses(batch))
            total = sum(terms.values())
            scaler.scale(total / accum_steps).backward()
        if flop_counter is not None:
            flops += flop_counter.get_total_flops()
        for name, value in {"loss": total, **terms}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / accum_steps

    scaler.unscale_(optimizer)  # true gradients for the norm and for clipping (a no-op without fp16)
    parameters = [p for p in model.parameters() if p.grad is not None]
    # With max_norm=inf the clip coefficient clamps to exactly 1.0: the norm is measured, the grads unchanged.
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm is not None else math.inf)
    counted = {} if flop_counter is None else {"flops": float(flops)}
    stats = all_reduce_mean({**sums, "grad_norm": grad_norm, **counted}, dist_info)
    if counted:
        stats["flops"] *= dist_info.world_size  # the mean over ranks back to the job's total

    # Name the loss terms that went bad (the total follows them); only when every loss is finite can the
    # gradient norm be the culprit. An fp16 GradScaler expects inf gradients now and then and skips them itself.
    bad = {name: value for name, value in stats.items() if name != "grad_norm" and not math.isfinite(value)}
    if not bad and not scaler.is_enabled() and not math.isfinite(stats["grad_norm"]):
        bad = {"grad_norm": stats["grad_norm"]}
    if bad:
        named = {name: value for name, value in bad.items() if name != "loss"} or bad
        terms_text = ", ".join(f"{name}={value}" for name, value in named.items())
        raise NonFiniteLossError(
            f"non-finite {terms_text} at step {step}: stopped before the optimizer step, no checkpoint is written "
            f"after it; last good checkpoint: {_describe_checkpoint(checkpoint_path)}. "
            "Check the data and the learning rate, then resume with --resume auto",
            step=step,
            terms=named,
        )
    scaler.step(optimizer)
    scaler.update()
    return stats


# ----------------------------------------------------------------------------------------------- checkpoint


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable (POSIX); without it a power loss can bring back the old directory entry.
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(file)`` (a binary file) to a temp file beside ``path``, fsync, rename over ``path``:
    whoever opens ``path`` finds the previous file or the whole new one, never a part, whenever the writer dies."""
    path = Path(path)
    # Same directory, so os.replace is a rename within one filesystem: readers see the old or the new file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, os.replace); call it on rank 0 only.

    A crash at any moment leaves either the previous checkpoint or the new one, never a partial file. Temp
    files left by a process killed mid-save are removed after the next successful save.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(dict(state), f))
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``: tensors and plain types only, no code runs."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass an existing checkpoint.pth")
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and (if initialised) CUDA RNG states as tensors and plain types,
    so that ``torch.load(weights_only=True)`` accepts them."""
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "algorithm": algorithm,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state`` for this process (the CUDA state goes to the current device)."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["algorithm"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def to_jsonable(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` as plain JSON types (paths become strings, tuples lists), as args.json and checkpoints store them."""

    def default(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, set | frozenset):
            return sorted(value)
        raise TypeError(
            f"argument value {value!r} of type {type(value).__name__} is not JSON-serialisable; "
            "convert it to a str, number, bool, list or dict in the script"
        )

    return json.loads(json.dumps(dict(args), default=default))


def training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    args: Mapping[str, Any],
    global_batch_size: int,
    dist_info: DistInfo,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a resumed run needs, with ``step`` = optimizer steps completed. Collective: call it on every
    rank (it gathers each rank's RNG state), then save it on rank 0. ``extra`` adds top-level entries."""
    rng = [capture_rng_state()]
    if dist_info.distributed:
        rng = [None] * dist_info.world_size
        dist.all_gather_object(rng, capture_rng_state())
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "args": to_jsonable(args),
        "world_size": dist_info.world_size,
        "global_batch_size": global_batch_size,
        "rng": rng,
    }
    clash = set(state) & set(extra or {})
    if clash:
        raise ValueError(f"extra checkpoint entries {sorted(clash)} clash with the engine's; rename them")
    return {**state, **(extra or {})}


def resolve_resume(resume: str | None, *, output_dir: str | Path | None) -> Path | None:
    """The checkpoint to resume from: None/"" -> None; "auto" -> OUTPUT_DIR/checkpoint.pth if it exists, else
    None (a fresh start); anything else -> that file, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        if output_dir is None:
            raise ValueError("--resume auto looks for OUTPUT_DIR/checkpoint.pth; pass --output-dir too")
        candidate = Path(output_dir) / CHECKPOINT_NAME
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume {resume}: no such file; pass an existing checkpoint.pth, or 'auto' for OUTPUT_DIR's own"
        )
    return path


def check_resume_args(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Iterable[str] = DEFAULT_RESUME_IGNORE
) -> None:
    """Fail when the resumed run's arguments differ from the checkpoint's in anything outside ``ignore``."""
    current = to_jsonable(current)
    ignored = set(ignore)
    missing = "<absent>"
    changed = [
        f"{key}: {saved.get(key, missing)!r} -> {current.get(key, missing)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in ignored and saved.get(key, missing) != current.get(key, missing)
    ]
    if changed:
        raise ValueError(
            f"--resume: the checkpoint was trained with other settings ({'; '.join(changed)}); pass the same "
            "values to continue that run, or a new --output-dir to start another"
        )


def restore_training_state(
    checkpoint: Mapping[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    args: Mapping[str, Any],
    global_batch_size: int,
    dist_info: DistInfo,
    ignore_args: Iterable[str] = DEFAULT_RESUME_IGNORE,
) -> int:
    """Check the run matches the checkpoint, load model/optimizer/scaler, restore this rank's RNG states, and
    return the step to resume at. Call it on every rank after building model, optimizer and scaler; nothing
    may draw random numbers between it and the first step."""
    missing = {"model", "optimizer", "scaler", "step", "args", "world_size", "global_batch_size", "rng"} - set(
        checkpoint
    )
    if missing:
        raise KeyError(f"checkpoint lacks {sorted(missing)}; resume only from a checkpoint.pth the engine wrote")
    check_resume_args(checkpoint["args"], args, ignore=ignore_args)
    if checkpoint["global_batch_size"] != global_batch_size:
        raise ValueError(
            f"--resume: the checkpoint's global batch is {checkpoint['global_batch_size']}, this run's is "
            f"{global_batch_size} (batch_size x processes x accum_steps); choose --batch-size/--accum-steps "
            "so the product matches"
        )
    unwrap_model(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    if checkpoint["world_size"] == dist_info.world_size:
        restore_rng_state(checkpoint["rng"][dist_info.rank])
    else:
        warnings.warn(
            f"resuming on {dist_info.world_size} processes from a checkpoint written by {checkpoint['world_size']}: "
            "the data order is unchanged, but model-side randomness (dropout, sampling) continues from this "
            "run's seeds instead of the checkpoint's",
            stacklevel=2,
        )
    return int(checkpoint["step"])


def save_args(output_dir: str | Path, args: Mapping[str, Any]) -> Path:
    """Write OUTPUT_DIR/args.json (atomically); call it on rank 0 at the start of a run."""
    path = Path(output_dir) / ARGS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(args), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


# -------------------------------------------------------------------------------------------------- logging


def _truncate_log(path: Path, start_step: int) -> float:
    """Keep the lines of ``path`` with step < start_step; return the last kept ``elapsed_s`` (0 if none)."""
    if not path.exists():
        return 0.0
    # A last line without its newline is a write cut short by a crash: dropped with the split below.
    lines = path.read_text().split("\n")[:-1]
    kept, elapsed = [], 0.0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON ({error}); repair or delete the line to resume") from None
        if row["step"] < start_step:
            kept.append(line)
            elapsed = row.get("elapsed_s", elapsed)
    atomic_write(path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))
    return float(elapsed)


def _append_line(path: Path, line: str) -> None:
    # One write() on an O_APPEND descriptor: a line lands whole or not at all, even if the process is killed.
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, data)
    finally:
        os.close(fd)
    if written != len(data):
        raise OSError(f"short write to {path} ({written} of {len(data)} bytes); check the free disk space")


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN/inf; they appear only as an fp16 GradScaler's skipped-step grad_norm, logged as null.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class TrainLogger:
    """``log.jsonl`` rows and a tqdm bar (ETA, samples/s, loss) on rank 0; silent on other ranks.

    The bar shows when stderr is a terminal; otherwise (batch jobs) each log row is also printed as one line,
    and ``quiet=True`` silences both. On construction, rows with ``step >= start_step`` are dropped from an
    existing log.jsonl, so a resumed run appends each step exactly once. With ``bad_samples``, each row also holds
    its ``row_fields()``.
    """

    def __init__(
        self,
        *,
        output_dir: str | Path,
        total_steps: int,
        start_step: int,
        samples_per_step: int,
        log_every: int,
        is_main: bool,
        quiet: bool = False,
        bad_samples: BadSampleTracker | None = None,
    ) -> None:
        if log_every < 1:
            raise ValueError(f"log_every {log_every} must be >= 1; pass --log-every 1 or more")
        self.path = Path(output_dir) / LOG_NAME
        self.total_steps, self.samples_per_step, self.log_every = total_steps, samples_per_step, log_every
        self.enabled = is_main
        self.bad_samples = bad_samples
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._elapsed_before = _truncate_log(self.path, start_step) if is_main else 0.0
        interactive = sys.stderr.isatty()
        self._print_rows = is_main and not quiet and not interactive
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (is_main and not quiet and interactive),
        )
        self._start = self._window_start = time.perf_counter()
        self._window_steps = 0

    def log(self, step: int, *, lr: float, stats: Mapping[str, float], **extra: Any) -> None:
        """Record the step with index ``step``: always the bar, and a log.jsonl row every ``log_every`` steps."""
        if not self.enabled:
            return
        now = time.perf_counter()
        self._window_steps += 1
        window_rate = self.samples_per_step * self._window_steps / max(now - self._window_start, 1e-9)
        postfix = {"loss": f"{stats['loss']:.4g}", "lr": f"{lr:.3g}", "samples/s": f"{window_rate:.1f}"}
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)
        if (step + 1) % self.log_every != 0 and step + 1 != self.total_steps:
            return
        elapsed = self._elapsed_before + now - self._start
        row = {"step": step, "lr": lr, **stats, "samples_per_s": window_rate, "elapsed_s": elapsed}
        row.update(self.bad_samples.row_fields() if self.bad_samples is not None else {}, **extra)
        _append_line(self.path, json.dumps({key: _finite_or_none(value) for key, value in row.items()}))
        if self._print_rows:
            steps_left = self.total_steps - step - 1
            eta = steps_left * (now - self._window_start) / self._window_steps
            terms = " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k.startswith("loss"))
            print(
                f"step {step + 1}/{self.total_steps} lr={lr:.4g} {terms} {window_rate:.1f} samples/s "
                f"eta {_format_duration(eta)}",
                flush=True,
            )
        self._window_start, self._window_steps = now, 0

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> TrainLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
