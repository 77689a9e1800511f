"""Precise BN: BatchNorm statistics recomputed with the weights of the evaluated step (detectron2's PreciseBN hook).

During training a BN layer's running mean and variance are an exponential average over steps whose weights kept
changing, so they lag behind the weights being evaluated. detectron2's ``hooks.PreciseBN`` (fvcore's
``update_bn_stats``; TEST.PRECISE_BN.NUM_ITER 200, enabled in detectron2's SyncBN configs and in MoCo's BN detection
configs) runs that many training batches forward in train mode, without gradients, and replaces each running
statistic by the plain average of the per-batch statistics: the BN layer's own batch mean and (unbiased) variance,
read with momentum 1. Only BatchNorm layers in training mode count (trained BN, SyncBN); frozen BN and GroupNorm
have no running statistics to recompute.

``precise_batch_norm`` does that around an evaluation and then puts every BN buffer and momentum back, so that
training continues from exactly the state it had (a resumed run, which never saw this evaluation, continues the
same way). With several processes each averages its own batches, then the averages are averaged over processes
(equal already under SyncBN). The forward passes draw model-side randomness (proposal sampling) from a torch RNG
seeded by ``seed``, inside ``torch.random.fork_rng``: the training RNG streams are untouched, and the same step
recomputes the same statistics, so ``finetune.py --eval-only`` reproduces a run's numbers.

``batch_norm_record`` says how many images trained BN normalizes over per forward, for eval.json: gradient
accumulation keeps the gradient of the global batch but not its BN statistics.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batch_norm_record", "precise_batch_norm", "trained_batch_norms"]


def trained_batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers (SyncBatchNorm and timm's BatchNormAct2d included) that are in training mode and keep
    running statistics: what Precise BN recomputes."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]


@contextlib.contextmanager
def precise_batch_norm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[Any], Any],
    num_batches: int,
    seed: int,
    device: torch.device,
) -> Iterator[int]:
    """Inside the block, every trained BN layer of ``model`` holds the average batch statistics of ``num_batches``
    batches from ``batches`` (each passed to ``forward``, which runs ``model`` in train mode); on exit, every BN
    buffer and momentum is restored. Yields the number of BN layers recomputed (0: nothing to do, no batch read).

    Call it on every process of a distributed run (SyncBN and the final average are collectives).
    """
    norms = trained_batch_norms(model)
    if not norms or num_batches < 1:
        yield 0
        return
    saved = [(bn.momentum, {name: buffer.clone() for name, buffer in bn.named_buffers()}) for bn in norms]
    try:
        means = [torch.zeros_like(bn.running_mean) for bn in norms]
        variances = [torch.zeros_like(bn.running_var) for bn in norms]
        for bn in norms:
            bn.momentum = 1.0  # the running statistics become this batch's own
        devices = (
            [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
        )
        seen = 0
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in itertools.islice(batches, num_batches):
                forward(batch)
                seen += 1
                for bn, mean, variance in zip(norms, means, variances, strict=True):
                    mean += (bn.running_mean - mean) / seen
                    variance += (bn.running_var - variance) / seen
        if seen != num_batches:
            raise RuntimeError(f"precise BN: the batch iterator ran out after {seen} of {num_batches} batches")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([*means, *variances])
            dist.all_reduce(flat)
            parts = (flat / dist.get_world_size()).split([t.numel() for t in (*means, *variances)])
            means, variances = parts[: len(norms)], parts[len(norms) :]
        for bn, mean, variance in zip(norms, means, variances, strict=True):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(variance)
        yield len(norms)
    finally:
        with torch.no_grad():
            for bn, (momentum, buffers) in zip(norms, saved, strict=True):
                bn.momentum = momentum
                for name, buffer in bn.named_buffers():
                    buffer.copy_(buffers[name])


def batch_norm_record(model: nn.Module, *, batch_size: int, world_size: int, global_batch: int) -> dict[str, Any]:
    """How many images each trained BN layer normalizes over per forward, against the global batch.

    The protocols' numbers come from BN over the global batch (PreDet: SyncBN over 8 GPUs x 2 = 16 images): with
    gradient accumulation, or several processes without SyncBN, the gradient is the same but BN sees fewer images
    per forward, which is another protocol under trained BN. Frozen BN is unaffected.
    """
    layers = trained_batch_norms(model)
    if not layers:
        return {"trained_layers": 0, "images_per_forward": None, "global_batch_size": global_batch}
    # SyncBN spans the processes of one micro-step, never the micro-steps of gradient accumulation.
    per_forward = batch_size * world_size if isinstance(layers[0], nn.SyncBatchNorm) else batch_size
    out: dict[str, Any] = {
        "trained_layers": len(layers),
        "images_per_forward": per_forward,
        "global_batch_size": global_batch,
    }
    if per_forward != global_batch:
        out["note"] = (
            f"trained BatchNorm normalizes over {per_forward} images per forward, not the global batch of "
            f"{global_batch} (gradient accumulation, or processes without SyncBN): not the protocol's BN batch "
            "(PreDet: SyncBN over 16 images); frozen-BN protocols do not depend on it"
        )
    return out
