"""A tiny but complete training script on detpretrain.engine, used by tests/test_engine.py.

It trains the way train_predet.py, train_jigsaw.py and finetune.py do (iterations, per-process batch,
accumulation, seeded per-sample augmentation, DDP, atomic checkpoints, --resume auto, log.jsonl), on a fixed
seeded tensor dataset with a small conv net, and writes OUTPUT_DIR/final.safetensors for the tests to compare.

    python tests/engine_toy_train.py --output-dir /tmp/toy --device cpu
    torchrun --standalone --nproc_per_node=2 tests/engine_toy_train.py --output-dir /tmp/toy2 --batch-size 4
    python tests/engine_toy_train.py --output-dir /tmp/toy --resume auto

The model has no BatchNorm: per-rank batch statistics would make 2 processes with batch 4 differ from one
with batch 8 by design, not by a bug.
"""

import argparse
import functools
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from detpretrain import engine

NUM_CLASSES = 10


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("engine toy training", add_help=True)
    parser.add_argument("--iters", type=int, default=12, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="images per process per micro-step")
    parser.add_argument("--accum-steps", type=int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--lr", type=float, default=0.05, help="base lr of SGD with momentum 0.9")
    parser.add_argument("--schedule", choices=["multistep", "cosine"], default="multistep")
    parser.add_argument("--warmup-iters", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm to this")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout before the heads (uses the global RNG)")
    parser.add_argument("--dataset-size", type=int, default=40, help="samples in the seeded toy dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast dtype on CUDA")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint.pth path")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--quiet", action="store_true")
    # Fault injection for the tests.
    parser.add_argument("--nan-at-step", type=int, default=-1, help="make loss_color NaN at this step index")
    parser.add_argument("--nan-rank", type=int, default=-1, help="only on this rank (-1: every rank)")
    parser.add_argument("--sleep-per-step", type=float, default=0.0, help="seconds; gives SIGKILL a window")
    return parser


class ToyImages(torch.utils.data.Dataset):
    """``size`` random 3x16x16 images with a class label; fixed by its own seed, not the run's."""

    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.images = torch.rand(size, 3, 16, 16, generator=generator)
        self.labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def augment(sample: tuple[torch.Tensor, torch.Tensor], *, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random flip and pixel noise drawn from the per-sample generator; the target colour is the mean of the
    augmented image, so a wrong generator shows up in the loss."""
    image, label = sample
    if torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
    image = image + 0.05 * torch.randn(image.shape, generator=generator)
    return image, label, image.mean(dim=(1, 2))


class TinyNet(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.dropout = nn.Dropout(dropout)
        self.cls_head = nn.Linear(16, NUM_CLASSES)
        self.color_head = nn.Linear(16, 3)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.features(images).mean(dim=(2, 3)))  # (N, 16)
        return self.cls_head(x), self.color_head(x)


def toy_losses(batch, *, model, device, memory_format, inject_nan: bool) -> dict[str, torch.Tensor]:
    images, labels, colors = batch
    images = images.to(device, memory_format=memory_format, non_blocking=True)
    pred_logits, pred_colors = model(images)
    loss_color = F.mse_loss(pred_colors, colors.to(device))
    if inject_nan:
        loss_color = loss_color * float("nan")
    return {"loss_cls": F.cross_entropy(pred_logits, labels.to(device)), "loss_color": loss_color}


def main(args: argparse.Namespace) -> None:
    # ------------------------------------------------------------------ setup
    dist_info = engine.setup_distributed(args.device)
    engine.seed_everything(args.seed, rank=dist_info.rank, deterministic=args.deterministic)
    device = dist_info.device
    output_dir = args.output_dir
    checkpoint_path = output_dir / engine.CHECKPOINT_NAME
    global_batch_size = args.batch_size * dist_info.world_size * args.accum_steps

    # ------------------------------------------------------------------ model
    memory_format = engine.memory_format(device)
    model = TinyNet(args.dropout).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scaler = engine.make_grad_scaler(device, amp=args.amp)

    # ------------------------------------------------------------------ resume
    start_step = 0
    resume_path = engine.resolve_resume(args.resume, output_dir=output_dir)
    if resume_path is not None:
        start_step = engine.restore_training_state(
            engine.load_checkpoint(resume_path),
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            args=vars(args),
            global_batch_size=global_batch_size,
            dist_info=dist_info,
            ignore_args=engine.DEFAULT_RESUME_IGNORE | {"sleep_per_step"},
        )
    if dist_info.is_main:
        engine.save_args(output_dir, vars(args))  # after the resume check, which may reject these args
    ddp_model = engine.wrap_ddp(model, dist_info)

    # ------------------------------------------------------------------ data
    dataset = engine.StepSeededDataset(ToyImages(args.dataset_size), transform=augment, seed=args.seed)
    sampler = engine.StepBatchSampler(
        dataset_size=len(dataset),
        batch_size=args.batch_size,
        seed=args.seed,
        start_step=start_step,
        total_steps=args.iters,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        accum_steps=args.accum_steps,
    )
    batches = iter(engine.make_loader(dataset, batch_sampler=sampler, num_workers=args.num_workers, seed=args.seed))

    # ------------------------------------------------------------------ train
    milestones = [args.iters * 2 // 3]
    logger = engine.TrainLogger(
        output_dir=output_dir,
        total_steps=args.iters,
        start_step=start_step,
        samples_per_step=global_batch_size,
        log_every=args.log_every,
        is_main=dist_info.is_main,
        quiet=args.quiet,
    )
    with logger:
        for step in range(start_step, args.iters):
            if args.schedule == "multistep":
                lr = engine.warmup_multistep_lr(
                    step,
                    base_lr=args.lr,
                    warmup_iters=args.warmup_iters,
                    warmup_start_lr=0.1 * args.lr,
                    milestones=milestones,
                )
            else:
                lr = engine.warmup_cosine_lr(
                    step,
                    base_lr=args.lr,
                    total_iters=args.iters,
                    warmup_iters=args.warmup_iters,
                    warmup_start_lr=0.1 * args.lr,
                )
            engine.set_lr(optimizer, lr)
            inject_nan = step == args.nan_at_step and args.nan_rank in (-1, dist_info.rank)
            stats = engine.train_step(
                model=ddp_model,
                optimizer=optimizer,
                scaler=scaler,
                batches=batches,
                compute_losses=functools.partial(
                    toy_losses, model=ddp_model, device=device, memory_format=memory_format, inject_nan=inject_nan
                ),
                accum_steps=args.accum_steps,
                step=step,
                dist_info=dist_info,
                amp=args.amp,
                max_grad_norm=args.max_grad_norm,
                checkpoint_path=checkpoint_path,
            )
            logger.log(step, lr=lr, stats=stats)
            if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.iters:
                state = engine.training_state(
                    model=ddp_model,
                    optimizer=optimizer,
                    scaler=scaler,
                    step=step + 1,
                    args=vars(args),
                    global_batch_size=global_batch_size,
                    dist_info=dist_info,
                )
                if dist_info.is_main:
                    engine.save_checkpoint(checkpoint_path, state)
            if args.sleep_per_step:
                time.sleep(args.sleep_per_step)

    # ------------------------------------------------------------------ export
    if dist_info.is_main:
        weights = {name: tensor.contiguous() for name, tensor in engine.unwrap_model(model).state_dict().items()}
        safetensors.torch.save_file(weights, output_dir / "final.safetensors")
    engine.cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
