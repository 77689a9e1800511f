"""Tests of detpretrain.engine: DDP equivalence, accumulation, exact resume after SIGKILL, atomic checkpoints,
NaN stops, lr schedules, the step-seeded data order and RNG round trips.

The end-to-end tests drive tests/engine_toy_train.py in this process (single-process runs) or in subprocesses
(torchrun with two gloo processes on the CPU, and runs that get killed), with OMP_NUM_THREADS=1 so that CPU
kernels sum in a fixed order.
"""

import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from detpretrain import engine

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TOY = TESTS_DIR / "engine_toy_train.py"
sys.path.insert(0, str(TESTS_DIR))
import engine_toy_train  # noqa: E402

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
SINGLE_DEVICE = engine.DistInfo(
    rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True, distributed=False
)


def toy_args(output_dir: Path, *extra: str):
    return engine_toy_train.get_args_parser().parse_args(["--output-dir", str(output_dir), "--quiet", *extra])


def run_toy(output_dir: Path, *extra: str, nproc: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """Run the toy script in a subprocess; nproc > 0 launches it with torchrun on that many gloo processes."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, str(TOY), "--output-dir", str(output_dir), "--quiet", *extra]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=240)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
    return result


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(output_dir / "final.safetensors")


def log_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / engine.LOG_NAME).read_text().splitlines()]


def run_toy_in_process(output_dir: Path, *extra: str) -> None:
    """Run the toy script's main here, on one thread like the subprocesses (so results can match bitwise; and
    two threads on a busy 2-core machine are ten times slower), leaving torch's global settings as they were."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        engine_toy_train.main(toy_args(output_dir, *extra))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One process, batch 8, no accumulation: the run the others must reproduce."""
    output_dir = tmp_path_factory.mktemp("reference")
    run_toy_in_process(output_dir, "--batch-size", "8", "--max-grad-norm", "5")
    return output_dir


# ------------------------------------------------------------------------------------- end to end


# Two processes sum the per-sample gradients in a different order than one process does (each rank's mean,
# then DDP's average of the two), so the weights agree to float32 rounding, not bitwise: after the toy's 12 SGD
# steps the largest difference measured was 2e-7 on weights of magnitude up to 0.44.
DDP_ATOL = 1e-6


def test_two_gloo_processes_match_one_process(reference_run, tmp_path):
    run_toy(tmp_path, "--batch-size", "4", "--max-grad-norm", "5", nproc=2)
    expected, actual = final_weights(reference_run), final_weights(tmp_path)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=DDP_ATOL, msg=name)
    # The logged losses are the means over both ranks, i.e. the single process's batch means.
    for got, want in zip(log_rows(tmp_path), log_rows(reference_run), strict=True):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], abs=DDP_ATOL)
    # A different number of processes with the same global batch resumes: the checkpoint records it.
    checkpoint = engine.load_checkpoint(tmp_path / engine.CHECKPOINT_NAME)
    assert (checkpoint["world_size"], checkpoint["global_batch_size"], len(checkpoint["rng"])) == (2, 8, 2)


def test_gradient_accumulation_matches_large_batch(reference_run, tmp_path):
    run_toy_in_process(tmp_path, "--batch-size", "4", "--accum-steps", "2", "--max-grad-norm", "5")
    expected, actual = final_weights(reference_run), final_weights(tmp_path)
    for name in expected:
        # Accumulating two halves sums in another order than one batch of 8: float32 rounding only.
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    torch.manual_seed(0)  # the toy's initial weights (--seed 0): training must have moved them
    initial = engine_toy_train.TinyNet(0.0).state_dict()
    assert all((actual[name] - initial[name]).abs().max() > 1e-3 for name in initial)


def test_sigkill_mid_run_then_resume_auto_is_bitwise_identical(tmp_path):
    # Dropout draws from the global RNG, so this also checks that the checkpoint restores it; the three runs
    # use 0, 2 and 1 DataLoader workers, which must not change a bit. The reference runs in this process: the
    # same code on one thread computes the same bits.
    flags = ["--iters", "16", "--save-every", "3", "--dropout", "0.2", "--deterministic"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run_toy_in_process(reference_dir, *flags, "--num-workers", "0")

    command = [sys.executable, str(TOY), "--output-dir", str(killed_dir), "--quiet", *flags]
    command += ["--num-workers", "2", "--sleep-per-step", "0.3"]
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, start_new_session=True, stderr=subprocess.PIPE)
    checkpoint_path, log_path = killed_dir / engine.CHECKPOINT_NAME, killed_dir / engine.LOG_NAME
    loads = 0
    try:
        deadline = time.monotonic() + 120
        while not (log_path.exists() and any(json.loads(x)["step"] >= 7 for x in log_path.read_text().splitlines())):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the run did not reach step 7 in time"
            # Whenever checkpoint.pth exists it is complete: a reader never sees a half-written file.
            if checkpoint_path.exists():
                engine.load_checkpoint(checkpoint_path)
                loads += 1
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its DataLoader workers (its own session)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert loads > 0
    killed_at = engine.load_checkpoint(checkpoint_path)["step"]
    assert 6 <= killed_at < 16
    assert max(row["step"] for row in log_rows(killed_dir)) >= 7  # rows past the checkpoint, to be dropped

    run_toy(killed_dir, *flags, "--num-workers", "1", "--resume", "auto")
    expected, actual = final_weights(reference_dir), final_weights(killed_dir)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    resumed_rows, reference_rows = log_rows(killed_dir), log_rows(reference_dir)
    assert [row["step"] for row in resumed_rows] == list(range(16))
    for got, want in zip(resumed_rows, reference_rows, strict=True):
        assert {k: v for k, v in got.items() if k.startswith("loss") or k in ("lr", "grad_norm")} == {
            k: v for k, v in want.items() if k.startswith("loss") or k in ("lr", "grad_norm")
        }


def test_nan_on_one_rank_stops_every_rank_before_a_checkpoint(tmp_path):
    # Checkpoints after steps 1 and 3 (resume at 2 and 4); the NaN at step 5 on rank 1 only must stop both ranks
    # before step 5's checkpoint (which --save-every 2 would write) and name the term, step and checkpoint.
    result = run_toy(
        tmp_path,
        "--iters",
        "8",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--nan-at-step",
        "5",
        "--nan-rank",
        "1",
        nproc=2,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "non-finite loss_color=nan at step 5" in output
    assert f"last good checkpoint: {tmp_path / engine.CHECKPOINT_NAME} (resumes at step 4)" in output
    assert engine.load_checkpoint(tmp_path / engine.CHECKPOINT_NAME)["step"] == 4
    assert [row["step"] for row in log_rows(tmp_path)] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "final.safetensors").exists()


def test_train_step_nan_leaves_weights_untouched(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def losses(batch):
        return {"fit": model(batch).mean(), "loss_bad": model(batch).pow(2).sum() * float("inf")}

    with pytest.raises(engine.NonFiniteLossError, match=r"non-finite loss_bad=inf at step 3: .* none \(nothing"):
        engine.train_step(
            model=model,
            optimizer=optimizer,
            scaler=engine.make_grad_scaler(torch.device("cpu")),
            batches=iter([torch.ones(4, 2)]),
            compute_losses=losses,
            accum_steps=1,
            step=3,
            dist_info=SINGLE_DEVICE,
            checkpoint_path=tmp_path / engine.CHECKPOINT_NAME,
        )
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_train_step_means_clipping_and_a_term_named_loss():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = engine.make_grad_scaler(torch.device("cpu"))
    micro_batches = iter([torch.ones(1, 2), 3 * torch.ones(1, 2)])  # outputs 2 and 6
    stats = engine.train_step(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        batches=micro_batches,
        compute_losses=lambda x: {"a": model(x).sum(), "loss_b": torch.tensor(1.0)},
        accum_steps=2,
        step=0,
        dist_info=SINGLE_DEVICE,
        max_grad_norm=1.0,
    )
    # Means over the two micro-steps; d(mean of outputs)/dw = mean of inputs = (2, 2), norm 2*sqrt(2) (logged
    # before clipping), clipped to norm 1: w = 1 - 0.1 * (2, 2) / (2*sqrt(2)).
    assert stats == pytest.approx({"loss": 5.0, "loss_a": 4.0, "loss_b": 1.0, "grad_norm": 2 * math.sqrt(2)})
    torch.testing.assert_close(model.weight, torch.full((1, 2), 1 - 0.1 / math.sqrt(2)))
    with pytest.raises(ValueError, match="'loss' is the total"):
        engine.train_step(
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            batches=iter([torch.ones(1, 2)]),
            compute_losses=lambda x: {"loss": model(x).sum()},
            accum_steps=1,
            step=0,
            dist_info=SINGLE_DEVICE,
        )


def test_ddp_accumulation_all_reduces_gradients_only_on_the_last_micro_step(tmp_path):
    # A one-process gloo group is enough to run DDP's reducer; a comm hook counts its gradient all-reduces.
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        dist_info = engine.DistInfo(
            rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True, distributed=True
        )
        model = engine.wrap_ddp(torch.nn.Linear(2, 1), dist_info)
        reduces = []

        def counting_hook(state, bucket):
            reduces.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        model.register_comm_hook(None, counting_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            engine.train_step(
                model=model,
                optimizer=optimizer,
                scaler=engine.make_grad_scaler(dist_info.device),
                batches=iter([torch.ones(2, 2)] * 3),
                compute_losses=lambda x: {"out": model(x).mean()},
                accum_steps=3,
                step=step,
                dist_info=dist_info,
            )
            assert reduces == [0] * (step + 1)  # one bucket, once per step, not once per micro-step
        state = engine.training_state(
            model=model,
            optimizer=optimizer,
            scaler=engine.make_grad_scaler(dist_info.device),
            step=2,
            args={},
            global_batch_size=6,
            dist_info=dist_info,
        )
        assert len(state["rng"]) == 1 and not any(key.startswith("module.") for key in state["model"])
    finally:
        engine.cleanup_distributed()
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------- schedules


def test_warmup_multistep_lr_by_hand():
    kwargs = dict(base_lr=0.2, warmup_iters=100, warmup_start_lr=0.2 * 0.001, milestones=[1000, 2000])
    assert engine.warmup_multistep_lr(0, **kwargs) == pytest.approx(0.0002)  # warmup start
    assert engine.warmup_multistep_lr(50, **kwargs) == pytest.approx(0.0002 + (0.2 - 0.0002) * 0.5)
    assert engine.warmup_multistep_lr(100, **kwargs) == pytest.approx(0.2)  # end of warmup
    assert engine.warmup_multistep_lr(999, **kwargs) == pytest.approx(0.2)
    assert engine.warmup_multistep_lr(1000, **kwargs) == pytest.approx(0.02)  # drop at the milestone itself
    assert engine.warmup_multistep_lr(2999, **kwargs) == pytest.approx(0.002)  # last step, after two drops


def test_warmup_cosine_lr_jigsaw_recipe_by_hand():
    kwargs = dict(base_lr=0.8, total_iters=64000, warmup_iters=1250, warmup_start_lr=0.2)
    assert engine.warmup_cosine_lr(0, **kwargs) == pytest.approx(0.2)
    assert engine.warmup_cosine_lr(625, **kwargs) == pytest.approx(0.5)
    assert engine.warmup_cosine_lr(1250, **kwargs) == pytest.approx(0.8)
    assert engine.warmup_cosine_lr((1250 + 64000) // 2 + 1, **kwargs) == pytest.approx(0.4, abs=1e-4)  # midpoint
    assert engine.warmup_cosine_lr(63999, **kwargs) == pytest.approx(
        0.8 * 0.5 * (1 + math.cos(math.pi * 62749 / 62750))
    )
    assert engine.warmup_cosine_lr(64000, **kwargs) == 0.0


def test_scale_lr_and_set_lr_with_group_scale():
    assert engine.scale_lr(0.02, global_batch_size=4, reference_batch_size=16) == pytest.approx(0.005)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr_scale": 4.0}], lr=1.0)
    assert engine.set_lr(optimizer, 0.1) == 0.1
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.1, 0.4])


# -------------------------------------------------------------------------------------- data order


def test_rank_slices_union_is_the_single_process_batch():
    common = dict(dataset_size=37, seed=5, start_step=0, total_steps=6)
    single = list(engine.StepBatchSampler(batch_size=8, **common))
    for world_size, batch_size, accum_steps in [(2, 4, 1), (4, 2, 1), (2, 2, 2), (1, 4, 2)]:
        per_rank = [
            list(
                engine.StepBatchSampler(
                    batch_size=batch_size, rank=r, world_size=world_size, accum_steps=accum_steps, **common
                )
            )
            for r in range(world_size)
        ]
        for step in range(6):
            union = [
                key
                for rank_batches in per_rank
                for key in sum(rank_batches[step * accum_steps : (step + 1) * accum_steps], [])
            ]
            assert sorted(union) == sorted(single[step]), (world_size, batch_size, accum_steps, step)
            assert all(key.step == step for key in union)


def test_sampler_resume_matches_and_each_epoch_is_a_permutation():
    common = dict(dataset_size=24, batch_size=4, seed=0, total_steps=30, world_size=2, accum_steps=1)
    for rank in range(2):
        full = list(engine.StepBatchSampler(start_step=0, rank=rank, **common))
        resumed = list(engine.StepBatchSampler(start_step=11, rank=rank, **common))
        assert resumed == full[11:]
    # Global batch 8 over 24 samples: steps 0-2 are epoch 0, steps 3-5 epoch 1; batches may span epochs.
    epoch_0 = sum((engine.global_batch_indices(s, dataset_size=24, global_batch_size=8, seed=0) for s in range(3)), [])
    epoch_1 = sum(
        (engine.global_batch_indices(s, dataset_size=24, global_batch_size=8, seed=0) for s in range(3, 6)), []
    )
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(24))
    assert epoch_0 != epoch_1
    # Global batch 8 over 20 samples: step 2 holds positions 16..23, the last 4 of epoch 0 and the first 4 of 1.
    first_two = sum(
        (engine.global_batch_indices(s, dataset_size=20, global_batch_size=8, seed=0) for s in range(2)), []
    )
    spanning = engine.global_batch_indices(2, dataset_size=20, global_batch_size=8, seed=0)
    assert sorted(first_two + spanning[:4]) == list(range(20))
    assert len(set(spanning[4:])) == 4 and set(spanning[4:]) != set(spanning[:4])


def test_sample_generator_is_a_pure_function_of_seed_step_index():
    def draw(seed, step, index):
        return torch.rand(4, generator=engine.sample_generator(seed, step, index))

    torch.manual_seed(0)
    first = draw(1, 2, 3)
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(draw(1, 2, 3), first)
    assert not torch.equal(draw(1, 2, 4), first)
    assert not torch.equal(draw(1, 3, 3), first)
    assert not torch.equal(draw(2, 2, 3), first)


def test_loader_workers_do_not_change_batches_nor_consume_the_global_rng():
    dataset = engine.StepSeededDataset(engine_toy_train.ToyImages(10), transform=engine_toy_train.augment, seed=3)

    def batches(num_workers):
        sampler = engine.StepBatchSampler(dataset_size=10, batch_size=4, seed=3, start_step=2, total_steps=5)
        return list(engine.make_loader(dataset, batch_sampler=sampler, num_workers=num_workers, seed=3))

    state = torch.get_rng_state()
    in_process = batches(0)
    assert torch.equal(torch.get_rng_state(), state)
    with_workers = batches(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(in_process) == len(with_workers) == 3
    for a, b in zip(in_process, with_workers, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    with pytest.raises(TypeError, match="batch_sampler=StepBatchSampler"):
        dataset[0]


# -------------------------------------------------------------------------------------- checkpoints


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()
    engine.save_checkpoint(tmp_path / "rng.pth", {"rng": engine.capture_rng_state()})
    expected = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3),
    )
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    engine.restore_rng_state(engine.load_checkpoint(tmp_path / "rng.pth")["rng"])  # weights_only=True
    actual = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3),
    )
    assert actual[:4] == expected[:4]
    assert torch.equal(actual[4], expected[4])


def _tiny_training_objects():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # momentum buffers exist
    return model, optimizer, engine.make_grad_scaler(torch.device("cpu"))


def test_training_state_restores_and_checks_args_and_global_batch(tmp_path):
    model, optimizer, scaler = _tiny_training_objects()
    args = {"lr": 0.1, "batch_size": 4, "output_dir": tmp_path, "resume": None}
    state = engine.training_state(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        step=7,
        args=args,
        global_batch_size=8,
        dist_info=SINGLE_DEVICE,
        extra={"ema": {"decay": 0.9}},
    )
    engine.save_checkpoint(tmp_path / engine.CHECKPOINT_NAME, state)
    checkpoint = engine.load_checkpoint(tmp_path / engine.CHECKPOINT_NAME)
    assert checkpoint["args"]["output_dir"] == str(tmp_path) and checkpoint["ema"] == {"decay": 0.9}

    new_model, new_optimizer, new_scaler = _tiny_training_objects()
    torch.nn.init.zeros_(new_model.weight)
    # A resumed run may change its bookkeeping flags and split the same global batch differently.
    step = engine.restore_training_state(
        checkpoint,
        model=new_model,
        optimizer=new_optimizer,
        scaler=new_scaler,
        args={**args, "batch_size": 2, "resume": "auto"},
        global_batch_size=8,
        dist_info=SINGLE_DEVICE,
    )
    assert step == 7
    assert torch.equal(new_model.weight, model.weight)
    assert torch.equal(
        new_optimizer.state_dict()["state"][0]["momentum_buffer"], optimizer.state_dict()["state"][0]["momentum_buffer"]
    )
    restore = dict(model=new_model, optimizer=new_optimizer, scaler=new_scaler, dist_info=SINGLE_DEVICE)
    with pytest.raises(ValueError, match=r"lr: 0.1 -> 0.2.*new --output-dir"):
        engine.restore_training_state(checkpoint, args={**args, "lr": 0.2}, global_batch_size=8, **restore)
    with pytest.raises(ValueError, match="global batch is 8, this run's is 16"):
        engine.restore_training_state(checkpoint, args=args, global_batch_size=16, **restore)


def test_save_checkpoint_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / engine.CHECKPOINT_NAME
    engine.save_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint(path, {"step": 2})
    assert engine.load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [engine.CHECKPOINT_NAME]  # no temp file left


def _save_then_hang(path: str, ready) -> None:
    """In a forked child: write a good checkpoint, then hang halfway through writing the next one."""
    engine.save_checkpoint(path, {"step": 1})

    def hanging_save(obj, f):
        f.write(b"half a checkpoint")
        f.flush()
        ready.set()
        time.sleep(60)

    torch.save = hanging_save
    engine.save_checkpoint(path, {"step": 2})


def test_sigkill_during_save_leaves_a_loadable_checkpoint_and_a_harmless_temp(tmp_path):
    path = tmp_path / engine.CHECKPOINT_NAME
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_save_then_hang, args=(str(path), ready))
    child.start()
    assert ready.wait(30), "the child never started its second save"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    stale = [p for p in tmp_path.iterdir() if p.name != engine.CHECKPOINT_NAME]
    assert len(stale) == 1 and stale[0].read_bytes() == b"half a checkpoint"

    assert engine.resolve_resume("auto", output_dir=tmp_path) == path
    assert engine.load_checkpoint(path) == {"step": 1}
    engine.save_checkpoint(path, {"step": 3})  # the next save clears the stale temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == [engine.CHECKPOINT_NAME]
    assert engine.load_checkpoint(path) == {"step": 3}


def test_resolve_resume(tmp_path):
    assert engine.resolve_resume(None, output_dir=tmp_path) is None
    assert engine.resolve_resume("auto", output_dir=tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(FileNotFoundError, match="no such file; pass an existing checkpoint.pth"):
        engine.resolve_resume(str(tmp_path / "missing.pth"), output_dir=tmp_path)
    with pytest.raises(ValueError, match="pass --output-dir"):
        engine.resolve_resume("auto", output_dir=None)
    (tmp_path / "other.pth").write_bytes(b"")
    assert engine.resolve_resume(str(tmp_path / "other.pth"), output_dir=None) == tmp_path / "other.pth"


# -------------------------------------------------------------------------------------------- logging


def test_logger_truncates_to_the_resumed_step_and_drops_a_cut_line(tmp_path):
    log = tmp_path / engine.LOG_NAME
    rows = "".join(json.dumps({"step": s, "loss": 1.0, "elapsed_s": 10.0 * s}) + "\n" for s in range(6))
    log.write_text(rows + '{"step": 6, "lo')  # the last write was cut by a crash
    with engine.TrainLogger(
        output_dir=tmp_path, total_steps=8, start_step=4, samples_per_step=2, log_every=2, is_main=True, quiet=True
    ) as logger:
        for step in range(4, 8):
            logger.log(step, lr=0.1, stats={"loss": 0.5, "loss_a": 0.5}, epoch=1)
    written = log_rows(tmp_path)
    assert [row["step"] for row in written] == [0, 1, 2, 3, 5, 7]
    assert list(written[-1])[:4] == ["step", "lr", "loss", "loss_a"]
    assert written[-1]["epoch"] == 1 and written[-1]["elapsed_s"] >= 30.0  # continues the kept rows' time

    silent = engine.TrainLogger(
        output_dir=tmp_path / "rank1", total_steps=2, start_step=0, samples_per_step=2, log_every=1, is_main=False
    )
    silent.log(0, lr=0.1, stats={"loss": 1.0})
    silent.close()
    assert not (tmp_path / "rank1").exists()


def test_args_json_and_bad_input_messages(tmp_path):
    path = engine.save_args(tmp_path, {"output_dir": tmp_path, "sets": ("a", "b")})
    assert json.loads(path.read_text()) == {"output_dir": str(tmp_path), "sets": ["a", "b"]}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        engine.save_args(tmp_path, {"fn": print})
    with pytest.raises(ValueError, match="pass --amp bf16"):
        engine.autocast(torch.device("cpu"), amp="fp8")
    with pytest.raises(ValueError, match="pass --device cpu or --device cuda"):
        engine.setup_distributed("tpu")
    assert not engine.make_grad_scaler(torch.device("cpu"), amp="fp16").is_enabled()  # fp16 scaling is CUDA's
    assert engine.make_grad_scaler(torch.device("cpu")).state_dict() == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without a GPU")
def test_cuda_without_a_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match="no CUDA device is visible; pass --device cpu"):
        engine.setup_distributed("cuda")


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert engine.setup_distributed("cpu") == SINGLE_DEVICE
    assert engine.all_reduce_mean({"a": torch.tensor(2.0), "b": 3}, SINGLE_DEVICE) == {"a": 2.0, "b": 3.0}
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="incomplete torchrun environment"):
        engine.setup_distributed("cpu")
