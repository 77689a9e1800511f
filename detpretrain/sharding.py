"""Preprocessing shared by every rank and worker of a job, written shard by shard so that a kill costs nothing.

Both pre-training recipes derive something from every image once, before training: PreDet its EdgeBoxes proposals
(``detpretrain.proposals``), Jigsaw its extracted samples (``detpretrain.jigsaw``). At the papers' scale that is
CPU-hours (EdgeBoxes runs at ~15 images per core-second: ImageNet's 1.28M images take ~24 core-hours, IG-50M ~900),
so every rank of every node takes part, and every worker process of each rank. The rules:

- **Shards fixed by the data.** The items (images, or a dataset's tar shards) are cut into shards whose content
  depends only on the data and the settings, never on the world size or the worker count: every shard is
  byte-identical whoever writes it, and the result is the same whatever world size computed it.
- **Every rank, every worker.** Rank r of W takes shards r, r + W, r + 2W, ... first (``rank_shards``). Within
  a rank, the items of a shard go to a pool of worker processes (``WorkerPool``); results come back in order.
- **A rank with nothing left helps.** A rank whose own shards are done takes every shard that is still missing, in
  an order that starts at its own rank, so that helpers spread out. A shard written twice holds the same bytes
  both times (first rule), so nothing is lost when two ranks meet on one. The barrier at the end then waits
  about one shard for the slowest rank, whatever the imbalance between nodes: no collective waits on a long
  single-rank task, and the default --dist-timeout (``engine.DEFAULT_DIST_TIMEOUT_MINUTES``) is ample.
- **Atomic shards, checked on reuse.** Each shard is written to a temporary name beside its final one, fsynced and
  renamed (``engine.atomic_write``), so a shard file that exists is whole. A relaunched run keeps every shard that
  exists and passes its check (same settings, same images) and computes the others.
- **One filesystem.** Every rank must see every shard: the output folder of a multi-node job lives on a shared
  filesystem. ``run_shards`` checks this first (each rank writes a marker the others must see) and stops with a
  clear message otherwise.

``gather_by_shard`` then reads something small from every shard (its skipped images, its sample index), each rank
reading its own round-robin share, and hands every rank the whole list in shard order.
"""

from __future__ import annotations

import itertools
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from detpretrain.engine import DistInfo

__all__ = [
    "SINGLE_PROCESS",
    "ShardRun",
    "WorkerPool",
    "gather_by_shard",
    "progress_bar",
    "rank_shards",
    "run_shards",
    "shard_ranges",
]

SINGLE_PROCESS = DistInfo(
    rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True, distributed=False
)
"""Where a plain ``python`` process (no torchrun) sits: it computes every shard itself."""

_START_METHOD = "fork" if sys.platform == "linux" else "spawn"
_BLOCK_PER_WORKER = 64  # tasks in flight per worker process


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Items ``[k * shard_size, (k + 1) * shard_size)`` for each shard k, the last one shorter: fixed by the data."""
    if shard_size < 1 or num_items < 0:
        raise ValueError(f"shard_size {shard_size} must be >= 1 and num_items {num_items} >= 0")
    return [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def rank_shards(num_shards: int, *, rank: int, world_size: int) -> range:
    """The shards rank ``rank`` of ``world_size`` computes first: ``rank, rank + W, ...`` (equal shares, +-1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return range(rank, num_shards, world_size)


class WorkerPool:
    """``pool.map(fn, tasks)``: ``fn`` over ``tasks`` in order, in ``num_workers`` processes (0: this process).

    One pool serves every shard of a rank, so workers start once. Results come back in task order whatever the
    worker count, so what a caller writes does not depend on it. By default the pool forks on Linux, as torch's
    DataLoader does, which spares each worker a fresh import of torch; a forked ``fn`` must then use only Pillow and
    numpy: a library with its own thread pool (torch, OpenCV) can hang in a child forked after the parent used that
    pool. Pass ``start_method="spawn"`` for such an ``fn``. ``initializer`` runs once in each worker process.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        initializer: Callable[[], None] | None = None,
        start_method: str = _START_METHOD,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers {num_workers} is negative; pass 0 (this process) or more")
        self.num_workers = num_workers
        self._executor = (
            ProcessPoolExecutor(num_workers, mp_context=get_context(start_method), initializer=initializer)
            if num_workers
            else None
        )

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        """``fn`` of each task, in task order. Tasks are taken a block at a time, so that a stream of large tasks
        (the images of a tar shard) never sits in memory whole."""
        if self._executor is None:
            return map(fn, tasks)
        return self._map_in_blocks(fn, iter(tasks))

    def _map_in_blocks(self, fn: Callable[[Any], Any], tasks: Iterator[Any]) -> Iterator[Any]:
        while block := list(itertools.islice(tasks, _BLOCK_PER_WORKER * self.num_workers)):
            # Chunks amortize the inter-process round trip; results still arrive in order.
            yield from self._executor.map(fn, block, chunksize=max(1, len(block) // (4 * self.num_workers)))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class ShardRun:
    """What ``run_shards`` did on this rank: the shards it found whole and kept, and those it computed."""

    kept: tuple[int, ...]
    computed: tuple[int, ...]


def _check_shared_filesystem(directory: Path, dist_info: DistInfo) -> None:
    """Every rank writes a marker in ``directory``; each must see all of them, or the shards would not meet."""
    token = [secrets.token_hex(6) if dist_info.is_main else None]
    dist.broadcast_object_list(token, src=0)
    markers = directory / f".ranks-{token[0]}"
    markers.mkdir(parents=True, exist_ok=True)
    (markers / str(dist_info.rank)).touch()
    dist.barrier()
    missing = [r for r in range(dist_info.world_size) if not (markers / str(r)).exists()]
    dist.barrier()  # every rank has looked before the markers go
    if dist_info.is_main:
        for r in range(dist_info.world_size):
            (markers / str(r)).unlink(missing_ok=True)
        markers.rmdir()
    if missing:
        raise SystemExit(
            f"{directory}: rank {dist_info.rank} cannot see the files of ranks {missing[:8]}: the shards of a "
            "multi-node job must be written to a filesystem every node shares; pass such a path, or compute them "
            "beforehand and copy them to every node"
        )


def run_shards(
    num_shards: int,
    *,
    is_complete: Callable[[int], bool],
    compute: Callable[[int], None],
    directory: str | Path,
    dist_info: DistInfo = SINGLE_PROCESS,
    exists: Callable[[int], bool] | None = None,
) -> ShardRun:
    """Make every shard ``0 .. num_shards - 1`` exist, sharing the work with every other rank (module docstring).

    ``is_complete(k)`` says whether shard k's file exists and checks out (same settings, same items: a shard that
    fails it is computed again); it runs on the rank that owns shard k. ``compute(k)`` computes shard k and writes it
    atomically. ``exists(k)`` (default: ``is_complete``) is the cheaper test of the other ranks' shards, for helping
    and for the final check: a file that exists is whole, and its owner checks it. Every rank must call this, and
    each returns once every shard exists (a barrier under the job's --dist-timeout).
    """
    exists = exists or is_complete
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if dist_info.distributed:
        _check_shared_filesystem(directory, dist_info)
    kept, computed = [], []
    own = rank_shards(num_shards, rank=dist_info.rank, world_size=dist_info.world_size)
    for k in own:
        if is_complete(k):
            kept.append(k)
        else:
            compute(k)
            computed.append(k)
    # Help: the others' shards not yet written, starting after this rank's own position so that helpers spread.
    others = [(dist_info.rank + offset) % num_shards for offset in range(num_shards)] if num_shards else []
    for k in others:
        if k % dist_info.world_size != dist_info.rank and not exists(k):
            compute(k)
            computed.append(k)
    if dist_info.distributed:
        dist.barrier()
    missing = [k for k in range(num_shards) if not exists(k)]
    if missing:
        raise RuntimeError(f"{directory}: shards {missing[:8]} are still missing after every rank finished")
    return ShardRun(kept=tuple(kept), computed=tuple(computed))


def gather_by_shard(num_shards: int, read: Callable[[int], Any], *, dist_info: DistInfo = SINGLE_PROCESS) -> list[Any]:
    """``[read(0), ..., read(num_shards - 1)]`` on every rank; each rank reads its round-robin share, then one
    all-gather. ``read`` returns something small and picklable (a shard's skipped images, its sample index)."""
    mine = {k: read(k) for k in rank_shards(num_shards, rank=dist_info.rank, world_size=dist_info.world_size)}
    if not dist_info.distributed:
        return [mine[k] for k in range(num_shards)]
    parts: list[dict[int, Any] | None] = [None] * dist_info.world_size
    dist.all_gather_object(parts, mine)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part or {})
    return [merged[k] for k in range(num_shards)]


@contextmanager
def progress_bar(*, total: int | None, desc: str, unit: str = "img", enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar over this rank's share of the work (``bar.update(n)``), or None when not ``enabled`` (ranks other
    than 0, --quiet)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit) as bar:
        yield bar
