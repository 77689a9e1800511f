"""Jigsaw (Montage) pre-training speed: data loading per worker, and the train step against plain classification.

Targets from the Jigsaw issues, each checked here with measured figures (never by timed assertions in tests):

- ``data``: assembled images per second of ONE data-loader worker (this process, one torch thread, as torch gives
  each DataLoader worker) must be at least 312.5, so that 8 workers per GPU feed the ~2,500 images/s an H100
  trains on, and at least that of a plain torchvision RandomResizedCrop(224) + flip pipeline on the same photos.
  The Jigsaw side is exactly what train_jigsaw.py's workers run per item:
  ``StepSeededDataset(AssembledImages)[SampleKey(step, index)]`` -> (uint8 (3, 224, 224), labels (4,)), from a
  sample directory extracted once (untimed) from the photos with train_jigsaw's settings and read through
  ``JigsawSamples`` (torchvision's ``decode_jpeg``). The plain side decodes each photo, then RandomResizedCrop(224)
  + RandomHorizontalFlip -> uint8 (3, 224, 224), in two variants: Pillow's decode, the transforms on the PIL image
  and PILToTensor (the usual torchvision recipe), and ``decode_jpeg`` (the samples' decoder) with the transforms on
  the uint8 tensor (torch's antialiased resampler, the one assembly uses). Neither side normalizes: train_jigsaw
  normalizes on the device after the batch arrives (normalize_jigsaw_image), and so would a plain pipeline.
- ``extract``: sample extraction (decode, crop, JPEG-encode; train_jigsaw's settings) in seconds per image per core
  and in bytes per image and per sample, for 0 extraction workers (this process) and for --workers processes.
- ``storage``: how a sample could be stored, for every sample train_jigsaw plans: bytes, encode and decode time,
  and PSNR against the lossless crop of the decoded photo, for what extraction stores (``encode_sample``: JPEG q95,
  4:4:4 chroma), the JPEG q95 4:2:0 stored before, and lossless PNG, WebP and raw RGB. The figures behind
  ``encode_sample``'s choice (montage_jigsaw.txt §3.1 cuts each sample once).
- ``step``: train_jigsaw.py's step (engine.train_step over JigsawClassifier: the timm backbone with its 1x1-conv
  dense head, erf_adaptive_dense_loss with label weights from a real ERF refresh) must be at most 10% slower than
  a plain timm classification step (timm.create_model(arch, num_classes=C + 1), cross-entropy on the pooled
  logits) through the same engine.train_step, same backbone, batch, input size, optimizer (SGD, momentum, weight
  decay), memory format and AMP, both on random uint8 batches already on the device, normalized the same way.
  The ERF refresh (refresh_label_weights: compute_erf on --erf-images fixed images, then Eq. 2) is timed on its
  own and amortized over --erf-every steps (the paper's 5k). A third row, a bare plain step (zero_grad, forward,
  loss, backward, optimizer.step without the engine's gradient norm and loss statistics), shows what the engine
  itself costs. What Jigsaw adds (its head and loss against pool + FC + CE) is also timed alone on the feature
  map: small ops, so that figure stays precise where whole steps on a busy machine vary by more than 10%. On the
  CPU the target is judged on this process's CPU time (which other processes' load barely changes; wall times are
  printed too), on CUDA on wall time.

Each mode prints a markdown block (machine, versions, command, figures) for benchmarks/RESULTS.md.

    # data loading, one worker, on ../shared/data/coco128 (the default paths)
    python benchmarks/bench_jigsaw.py data
    python benchmarks/bench_jigsaw.py data --train-images DIR --train-ann FILE --num-images 512 --repeats 5 --profile
    # sample extraction on coco128: one process, then 2 worker processes
    python benchmarks/bench_jigsaw.py extract --workers 2
    # how samples are stored: bytes, decode time and PSNR per encoding, on coco128
    python benchmarks/bench_jigsaw.py storage
    # train step on a small CPU: resnet50 and resnet18 at batch 8, 224 px; the ERF refresh timed on 1 image and
    # projected to train_jigsaw's 16 (its cost is linear in (image, position) pairs)
    python benchmarks/bench_jigsaw.py step --model resnet50 --batch-size 8 --threads 1 --steps 6 --warmup-steps 1 \
        --erf-images 1
    python benchmarks/bench_jigsaw.py step --model resnet18 --batch-size 8 --threads 1 --erf-images 2
    # on a GPU, the paper's per-GPU batch, bf16 autocast and channels_last as train_jigsaw.py uses them
    python benchmarks/bench_jigsaw.py step --model resnet50 --batch-size 64 --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image, JpegImagePlugin
from torchvision.io import ImageReadMode, decode_jpeg, decode_png, read_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # train_jigsaw.py lives at the repository root, beside this folder

from machine_info import machine_lines  # noqa: E402  (benchmarks/machine_info.py, beside this script)

import train_jigsaw  # noqa: E402
from detpretrain import engine  # noqa: E402
from detpretrain.jigsaw import (  # noqa: E402
    JigsawClassifier,
    JigsawSamples,
    coco_image_records,
    extract_samples,
    feature_region_index,
    get_template,
    normalize_jigsaw_image,
    plan_samples,
)
from detpretrain.jigsaw.extraction import DEFAULT_JPEG_QUALITY, JPEG_SUBSAMPLING, encode_sample  # noqa: E402
from detpretrain.losses import erf_adaptive_dense_loss  # noqa: E402

COCO128 = REPO_ROOT.parent / "shared" / "data" / "coco128"
DATA_TARGET = 1.0  # assembled images/s per worker >= plain RandomResizedCrop images/s
WORKER_TARGET = 2500 / 8  # assembled images/s per worker: an H100 trains on ~2,500/s, fed by 8 workers
STEP_TARGET = 1.10  # Jigsaw step time (ERF refreshes amortized) <= 1.10 x the plain timm step
CHROMA = {-1: "grayscale", 0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # PIL.JpegImagePlugin.get_sampling's codes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Jigsaw speed benchmarks", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)

    data = modes.add_parser("data", help="assembled images/s per worker vs RandomResizedCrop + flip")
    data.add_argument("--train-images", type=Path, default=COCO128 / "images", help="COCO image directory")
    data.add_argument(
        "--train-ann", type=Path, default=COCO128 / "annotations/instances_train2017.json", help="COCO json"
    )
    data.add_argument("--template", default="split96", help="Jigsaw template (train_jigsaw.py's default)")
    data.add_argument("--num-images", type=int, default=512, help="images produced per side per repeat")
    data.add_argument("--repeats", type=int, default=5, help="timed repeats per side, interleaved; median reported")
    data.add_argument("--threads", type=int, default=1, help="torch threads (1: what a DataLoader worker gets)")
    data.add_argument("--extract-workers", type=int, default=2, help="processes for the untimed sample extraction")
    data.add_argument("--profile", action="store_true", help="print cProfile's top functions of the Jigsaw side")

    extract = modes.add_parser("extract", help="sample extraction: seconds per image per core, bytes per sample")
    extract.add_argument("--train-images", type=Path, default=COCO128 / "images", help="COCO image directory")
    extract.add_argument(
        "--train-ann", type=Path, default=COCO128 / "annotations/instances_train2017.json", help="COCO json"
    )
    extract.add_argument("--workers", type=int, default=2, help="extraction processes of the second run")
    extract.add_argument("--repeats", type=int, default=3, help="timed extractions per setting (median reported)")

    storage = modes.add_parser("storage", help="how samples are stored: bytes, decode time and PSNR per encoding")
    storage.add_argument("--train-images", type=Path, default=COCO128 / "images", help="COCO image directory")
    storage.add_argument(
        "--train-ann", type=Path, default=COCO128 / "annotations/instances_train2017.json", help="COCO json"
    )
    storage.add_argument("--repeats", type=int, default=5, help="timed decodes of every sample per encoding (median)")

    step = modes.add_parser("step", help="train step time vs a plain timm classification step")
    step.add_argument("--model", default="resnet50", help="timm architecture, the same for both sides")
    step.add_argument("--batch-size", type=int, default=8, help="images per step (the paper: 64 per GPU)")
    step.add_argument("--template", default="split96", help="Jigsaw template; its canvas is the input size")
    step.add_argument("--num-classes", type=int, default=81, help="classes incl. background (COCO: 80 + 1)")
    step.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
    step.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per side first")
    step.add_argument(
        "--erf-images",
        type=int,
        default=16,
        help="images of the timed ERF batch (train_jigsaw's default 16; fewer are projected linearly to 16)",
    )
    step.add_argument("--erf-every", type=int, default=5000, help="steps between ERF refreshes (§4.1: 5k)")
    step.add_argument("--erf-repeats", type=int, default=1, help="timed ERF refreshes (median reported)")
    step.add_argument("--head-repeats", type=int, default=50, help="timed calls of the head + loss alone")
    step.add_argument("--threads", type=int, default=0, help="torch threads, the same for every side (0: torch's)")
    step.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    step.add_argument("--amp", default="bf16", choices=["off", "bf16"], help="as train_jigsaw (CUDA only)")
    step.add_argument("--seed", type=int, default=0)
    return parser


# ------------------------------------------------------------------------------------------------- reporting
def load_text() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


# ------------------------------------------------------------------------------------------------------ data
class TimedSamples:
    """A JigsawSamples that adds the CPU time spent reading and decoding samples (``s[i]``) to ``seconds``."""

    def __init__(self, samples: JigsawSamples) -> None:
        self.samples, self.seconds = samples, 0.0

    def __getattr__(self, name: str):
        return getattr(self.samples, name)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        start = time.process_time()
        try:
            return self.samples[i]
        finally:
            self.seconds += time.process_time() - start


def decode_photo_pil(file_name: str) -> Image.Image:
    """Pillow decode to RGB (the usual torchvision recipe)."""
    with Image.open(file_name) as image:
        return image.convert("RGB")


def decode_photo_tensor(file_name: str) -> torch.Tensor:
    """(3, H, W) uint8 decoded as JigsawSamples decodes samples: torchvision's ``decode_jpeg``, a channels-last view
    of the pixels, which torch's uint8 resize takes without repacking (so both sides get the same trick)."""
    return decode_jpeg(read_file(file_name), mode=ImageReadMode.RGB)


def extraction_settings(recipe: argparse.Namespace) -> dict:
    """train_jigsaw.py's extraction settings (its prepare_samples passes these)."""
    return {
        "seed": recipe.seed,
        "max_enlarge": recipe.max_enlarge,
        "positives_per_negative": recipe.pos_neg_ratio,
        "min_sample_size": recipe.min_sample_size,
        "shard_size": recipe.shard_size,
    }


def run_data(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    records = coco_image_records(args.train_ann, args.train_images)
    photos = [r.file_name for r in records.records]
    # train_jigsaw.py's own defaults for the per-sample augmentation (scale range, flip, fit).
    recipe = train_jigsaw.get_args_parser().parse_args(["--template", args.template])
    template = get_template(args.template)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jigsaw"
        start = time.perf_counter()
        stats = extract_samples(
            records.records,
            class_names=records.class_names,
            category_ids=records.category_ids,
            output_dir=path,
            num_workers=args.extract_workers,
            **extraction_settings(recipe),
        )
        extract_s = time.perf_counter() - start
        samples = JigsawSamples(path)
        timed_samples = TimedSamples(samples)
        assembled = train_jigsaw.AssembledImages(timed_samples, template=template, args=recipe)
        # Exactly a DataLoader worker's per-item call in train_jigsaw.py (the per-item generator included).
        items = engine.StepSeededDataset(assembled, transform=assembled, seed=recipe.seed)

        size = (template.canvas_height, template.canvas_width)
        flip_and_crop = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
        on_pil = T.Compose([*flip_and_crop, T.PILToTensor()])
        on_tensor = T.Compose(flip_and_crop)

        def jigsaw_item(k: int) -> torch.Tensor:
            image, _labels = items[engine.SampleKey(k, k % len(assembled))]  # uint8 (3, H, W), (R,)
            return image

        def plain_pil_item(k: int) -> torch.Tensor:
            return on_pil(decode_photo_pil(photos[k % len(photos)]))

        def plain_tensor_item(k: int) -> torch.Tensor:
            return on_tensor(decode_photo_tensor(photos[k % len(photos)]))

        sides: dict[str, Callable[[int], torch.Tensor]] = {
            "Jigsaw assembly (AssembledImages)": jigsaw_item,
            "plain Pillow decode, RRC + flip on PIL, PILToTensor": plain_pil_item,
            "plain decode_jpeg to uint8 tensor, RRC + flip on tensor": plain_tensor_item,
        }
        for fn in sides.values():  # warm the page cache and the allocators; check the output contract
            for k in range(len(photos)):
                out = fn(k)
            if out.dtype != torch.uint8 or tuple(out.shape) != (3, *size):
                raise RuntimeError(f"a side produced {out.dtype} {tuple(out.shape)}, not uint8 (3, {size})")

        # images/s by wall time and by this process's CPU time (what other processes' load barely changes).
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        loads = [load_text()]
        torch.manual_seed(0)
        for repeat in range(args.repeats):
            for name, fn in sides.items():  # interleaved, so a change of machine load hits every side alike
                wall, cpu = time.perf_counter(), time.process_time()
                for k in range(repeat * args.num_images, (repeat + 1) * args.num_images):
                    fn(k)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                rates[name].append((args.num_images / wall, args.num_images / cpu))
            loads.append(load_text())

        # Where the time goes (CPU time): one more pass of each side, split into its parts.
        timed_samples.seconds = 0.0
        start = time.process_time()
        for k in range(args.num_images):
            jigsaw_item(k)
        jigsaw_total = time.process_time() - start
        jigsaw_decode = timed_samples.seconds
        decode_s = transform_s = 0.0
        for k in range(args.num_images):
            start = time.process_time()
            image = decode_photo_tensor(photos[k % len(photos)])
            middle = time.process_time()
            on_tensor(image)
            decode_s, transform_s = decode_s + middle - start, transform_s + time.process_time() - middle

        picked_sizes = samples.sizes.double()
        profile_text = ""
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for k in range(args.num_images):
                jigsaw_item(k)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
            profile_text = out.getvalue()

    jigsaw_name = next(iter(sides))

    def median_rate(name: str, which: int) -> float:
        return statistics.median(r[which] for r in rates[name])

    photo_sizes = torch.tensor([[r.width, r.height] for r in records.records], dtype=torch.float64)
    per_image_ms = 1000 / args.num_images
    lines = [
        "### Jigsaw data loading: assembled images/s per data-loader worker",
        "",
        *machine_lines(),
        f"- torch threads: {torch.get_num_threads()}",
        f"- data: {args.train_images} ({len(photos)} photos, median {photo_sizes.prod(1).median() / 1e6:.2f} MP); "
        f"{len(samples)} samples extracted once in {extract_s:.1f} s (untimed; {stats['num_positives']} positives, "
        f"{stats['num_negatives']} negatives; median sample {picked_sizes.prod(1).median() / 1e3:.1f} kpx, "
        f"mean {picked_sizes.prod(1).mean() / 1e3:.1f} kpx)",
        f"- output: uint8 (3, {size[0]}, {size[1]}) per item, no normalization on either side; decoders: "
        "torchvision decode_jpeg (JigsawSamples for the samples, and the second plain variant), Pillow "
        f"{PIL.__version__} (the first plain variant)",
        f"- {args.repeats} repeats x {args.num_images} images per side, interleaved; load average (1/5/15 min) "
        f"before and after each repeat: {', '.join(loads)}",
        "",
        "| pipeline | images/s, wall (median, min, max) | images/s, CPU time (median) | Jigsaw / this, wall "
        "| Jigsaw / this, CPU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in sides:
        lines.append(
            f"| {name} | {spread([r[0] for r in rates[name]])} | {median_rate(name, 1):.1f} | "
            f"{median_rate(jigsaw_name, 0) / median_rate(name, 0):.2f} | "
            f"{median_rate(jigsaw_name, 1) / median_rate(name, 1):.2f} |"
        )
    worst = {
        which: min(median_rate(jigsaw_name, which) / median_rate(name, which) for name in sides if name != jigsaw_name)
        for which in (0, 1)
    }
    lines += [
        "",
        f"Target (assembled images/s per worker >= {WORKER_TARGET:.1f}, CPU time): "
        f"{'met' if median_rate(jigsaw_name, 1) >= WORKER_TARGET else 'MISSED'} ({median_rate(jigsaw_name, 1):.1f}; "
        f"by wall time {median_rate(jigsaw_name, 0):.1f}).",
        f"Target (assembled images/s >= plain, against every plain variant, CPU time): "
        f"{'met' if worst[1] >= DATA_TARGET else 'MISSED'} (lowest ratio {worst[1]:.2f}; by wall time {worst[0]:.2f}).",
        "",
        f"Where the time goes (CPU time, one more pass of {args.num_images} images): Jigsaw "
        f"{jigsaw_total * per_image_ms:.2f} ms per assembled image, of which reading + decoding its 4 samples "
        f"{jigsaw_decode * per_image_ms:.2f} ms ({jigsaw_decode / jigsaw_total:.0%}) and drawing, scaling, "
        f"flipping and placing them {(jigsaw_total - jigsaw_decode) * per_image_ms:.2f} ms; plain (decode_jpeg): "
        f"decode {decode_s * per_image_ms:.2f} ms + RandomResizedCrop/flip {transform_s * per_image_ms:.2f} ms "
        "per image.",
    ]
    print("\n".join(lines))
    if profile_text:
        print("\n```\n" + profile_text.strip() + "\n```")


# --------------------------------------------------------------------------------------------------- extract
def process_tree_cpu() -> float:
    """CPU seconds of this process and of its waited-for children (the extraction workers, once their pool closed)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_extract(args: argparse.Namespace) -> None:
    records = coco_image_records(args.train_ann, args.train_images)
    num_images = len(records.records)
    recipe = train_jigsaw.get_args_parser().parse_args([])
    settings = extraction_settings(recipe)
    plan_settings = {k: v for k, v in settings.items() if k != "shard_size"}
    plan_cpu = []
    for _ in range(args.repeats):  # what every rank does for the whole dataset before the pixel work is split
        start = time.process_time()
        plan_samples(records.records, **plan_settings)
        plan_cpu.append(time.process_time() - start)

    lines_by_workers = []
    for workers in dict.fromkeys((0, args.workers)):
        walls, cpus = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "samples.jigsaw"
                wall, cpu = time.perf_counter(), process_tree_cpu()
                stats = extract_samples(
                    records.records, class_names=records.class_names, output_dir=path, num_workers=workers, **settings
                )
                walls.append(time.perf_counter() - wall)
                cpus.append(process_tree_cpu() - cpu)
                shard_bytes = sum(p.stat().st_size for p in path.glob("shard-*.jigsaw"))
                samples = JigsawSamples(path)
                jpeg_bytes = int(samples.index["length"].sum())
        cores = min(max(1, workers), os.cpu_count() or 1)
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        lines_by_workers.append(
            f"| {workers} ({cores} core{'s' if cores > 1 else ''}) | {wall:.2f} | "
            f"{1000 * wall * cores / num_images:.2f} | {1000 * cpu / num_images:.2f} |"
        )

    # Decoding one stored sample: what a data-loader worker pays per sample (JigsawSamples) against Pillow.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jigsaw"
        extract_samples(records.records, class_names=records.class_names, output_dir=path, **settings)
        samples = JigsawSamples(path)
        blobs = [samples.encoded(i) for i in range(len(samples))]
    quality = samples.header["extraction"]["jpeg_quality"]
    subsampling = samples.header["extraction"]["jpeg_subsampling"]
    torch.set_num_threads(1)
    decode_ms = {}
    for name, decode in {
        "decode_jpeg": lambda data: decode_jpeg(data, mode=ImageReadMode.RGB),
        "Pillow": lambda data: np.asarray(Image.open(io.BytesIO(data.numpy().tobytes()))),  # the v1 reader's way
    }.items():
        start = time.process_time()
        for data in blobs:
            decode(data)
        decode_ms[name] = 1000 * (time.process_time() - start) / len(blobs)

    lines = [
        "### Jigsaw sample extraction: seconds per image per core, bytes per image and per sample",
        "",
        *machine_lines(),
        f"- data: {args.train_images} ({num_images} photos); train_jigsaw's settings {settings}; median of "
        f"{args.repeats} extractions into a fresh directory each",
        f"- result: {stats['num_samples']} samples ({stats['num_positives']} positives, {stats['num_negatives']} "
        f"negatives, {stats['num_samples'] / num_images:.2f} per image), {stats['skipped_images']} images skipped",
        "",
        "| extraction workers | wall s | wall ms per image x cores | CPU ms per image (all processes) |",
        "| --- | --- | --- | --- |",
        *lines_by_workers,
        "",
        f"Planning (plan_samples, box math; every rank plans the whole dataset): "
        f"{1000 * statistics.median(plan_cpu) / num_images:.2f} ms CPU per image.",
        "",
        f"Storage: {shard_bytes / num_images / 1e3:.1f} kB per image and {shard_bytes / len(samples) / 1e3:.1f} kB per "
        f"sample on disk (JPEG quality {quality}, {subsampling} chroma, native resolution; headers and indexes "
        f"{(shard_bytes - jpeg_bytes) / shard_bytes:.1%} of it). Decoding one sample: decode_jpeg "
        f"{decode_ms['decode_jpeg']:.3f} ms, Pillow {decode_ms['Pillow']:.3f} ms (CPU, one thread, mean over "
        f"{len(blobs)} samples).",
    ]
    print("\n".join(lines))


# --------------------------------------------------------------------------------------------------- storage
def encode_with_pillow(**save_kwargs) -> Callable[[Image.Image], bytes]:
    def encode(crop: Image.Image) -> bytes:
        buffer = io.BytesIO()
        crop.save(buffer, **save_kwargs)
        return buffer.getvalue()

    return encode


def decode_raw(data: bytes, height: int, width: int) -> torch.Tensor:
    """Uncompressed RGB: (3, h, w) uint8, a channels-last view of a copy of the bytes, as a reader would hand it on."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


def as_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    return image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)


def psnr_against(reference: list[np.ndarray], decoded: list[np.ndarray]) -> tuple[float, float, float] | None:
    """PSNR in dB over all pixels, of the median sample and of the worst sample; None when every pixel is equal."""
    errors = [((d.astype(np.float64) - r) ** 2).sum() for r, d in zip(reference, decoded, strict=True)]
    if sum(errors) == 0:
        return None
    sizes = [r.size for r in reference]
    per_sample = [10 * np.log10(255**2 * n / e) if e else float("inf") for e, n in zip(errors, sizes, strict=True)]
    overall = 10 * np.log10(255**2 * sum(sizes) / sum(errors))
    return overall, float(np.median(per_sample)), min(per_sample)


def estimated_jpeg_quality(image: Image.Image) -> float:
    """The IJG quality whose luminance table has the sum of this JPEG's (its scale, and the order, do not matter)."""
    ijg_luminance_sum = 5357  # sum of the IJG base luminance table (Annex K of the JPEG standard)
    scale = 100 * sum(image.quantization[0]) / ijg_luminance_sum
    return (200 - scale) / 2 if scale <= 100 else 5000 / scale


def run_storage(args: argparse.Namespace) -> None:
    records = coco_image_records(args.train_ann, args.train_images)
    recipe = train_jigsaw.get_args_parser().parse_args([])
    settings = extraction_settings(recipe)
    plan = plan_samples(records.records, **{k: v for k, v in settings.items() if k != "shard_size"})
    # Every planned sample, lossless: its window of the decoded source image, as extraction crops it.
    crops, qualities, chroma = [], [], []
    for i, record in enumerate(records.records):
        with Image.open(record.file_name) as source:
            qualities.append(estimated_jpeg_quality(source))
            chroma.append(JpegImagePlugin.get_sampling(source))
            rgb = source.convert("RGB")
        crops += [rgb.crop(tuple(box)) for box in plan.boxes[plan.image_index == i].tolist()]
    pixels = [np.asarray(crop) for crop in crops]
    torch.set_num_threads(1)

    def decode_jpeg_bytes(data: bytes, height: int, width: int) -> torch.Tensor:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def decode_png_bytes(data: bytes, height: int, width: int) -> torch.Tensor:
        return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def decode_pillow(data: bytes, height: int, width: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    stored = f"JPEG q{DEFAULT_JPEG_QUALITY}, {JPEG_SUBSAMPLING} chroma (encode_sample: what extraction stores)"
    codecs = {
        "JPEG q95, 4:2:0 chroma, optimized Huffman tables (stored until now)": (
            encode_with_pillow(format="JPEG", quality=95, optimize=True),
            decode_jpeg_bytes,
        ),
        stored: (encode_sample, decode_jpeg_bytes),
        "PNG, zlib level 6 (lossless)": (encode_with_pillow(format="PNG"), decode_png_bytes),
        "WebP lossless": (encode_with_pillow(format="WEBP", lossless=True), decode_pillow),
        "raw RGB (lossless, uncompressed)": (lambda crop: crop.tobytes(), decode_raw),
    }
    encoded, encode_ms = {}, {}
    for name, (encode, _) in codecs.items():
        start = time.process_time()
        encoded[name] = [encode(crop) for crop in crops]
        encode_ms[name] = 1000 * (time.process_time() - start) / len(crops)
    decode_times: dict[str, list[float]] = {name: [] for name in codecs}
    fidelity = {}
    for repeat in range(args.repeats):
        for name, (_, decode) in codecs.items():  # interleaved, so a change of machine load hits every one alike
            start = time.process_time()
            decoded = [decode(data, *p.shape[:2]) for data, p in zip(encoded[name], pixels, strict=True)]
            decode_times[name].append(1000 * (time.process_time() - start) / len(crops))
            if repeat == 0:
                fidelity[name] = psnr_against(pixels, [as_hwc(image) for image in decoded])

    num_images = len(records.records)
    coco_train2017_images = 118_287
    lines = [
        "### Jigsaw sample storage: bytes, decode time and fidelity per encoding",
        "",
        *machine_lines(),
        f"- data: {args.train_images} ({num_images} photos: JPEG, estimated IJG quality median "
        f"{statistics.median(qualities):.0f} (min {min(qualities):.0f}), chroma "
        f"{', '.join(f'{CHROMA[c]} x{chroma.count(c)}' for c in sorted(set(chroma)))}); the {len(crops)} samples "
        f"train_jigsaw plans ({sum(p.shape[0] * p.shape[1] for p in pixels) / len(crops) / 1e3:.1f} kpx mean), each "
        "cut from the decoded photo (Pillow, RGB): the lossless reference",
        f"- decode: CPU time of one thread, median of {args.repeats} passes over every sample (torchvision decode_jpeg "
        "or decode_png; Pillow for WebP; a copy for raw)",
        "",
        "| encoding | kB per sample | GB for COCO train2017 | encode ms per sample | decode ms per sample "
        "| decode ms per assembled image (4 samples) | PSNR dB vs lossless: all pixels, median sample, worst sample |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in codecs:
        kb = sum(len(data) for data in encoded[name]) / len(crops) / 1e3
        gb = kb * 1e3 * len(crops) / num_images * coco_train2017_images / 1e9
        decode_ms = statistics.median(decode_times[name])
        psnr = "lossless" if fidelity[name] is None else " / ".join(f"{v:.1f}" for v in fidelity[name])
        lines.append(
            f"| {name} | {kb:.1f} | {gb:.1f} | {encode_ms[name]:.2f} | {decode_ms:.3f} | {4 * decode_ms:.2f} | {psnr} |"
        )
    lines += [
        "",
        f"GB for COCO train2017: kB per sample x samples per image here x {coco_train2017_images:,} images. An "
        f"assembled image may take {1000 / WORKER_TARGET:.1f} ms of one worker ({WORKER_TARGET:.1f} per second, the "
        "data target).",
    ]
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------------------ step
def time_calls(fn: Callable[[], None], *, num_calls: int, device: torch.device) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each of ``num_calls`` calls, the device synchronized around each.

    On a shared CPU the wall time grows with other processes' load; the CPU time of this process does much
    less (with one thread it is the uncontended wall time, up to cache effects), so both are reported.
    """
    times = []
    for _ in range(num_calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def median_ms(times: list[tuple[float, float]], which: int) -> float:
    return 1000 * statistics.median(t[which] for t in times)


def run_step(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dist_info = engine.setup_distributed(args.device)
    device = dist_info.device
    torch.manual_seed(args.seed)
    template = get_template(args.template)
    height, width = template.canvas_height, template.canvas_width
    memory_format = engine.memory_format(device)
    recipe = train_jigsaw.get_args_parser().parse_args(["--template", args.template])
    images = torch.randint(0, 256, (args.batch_size, 3, height, width), dtype=torch.uint8, device=device)
    region_labels = torch.randint(0, args.num_classes, (args.batch_size, 4), device=device)  # (B, R)
    image_labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)  # (B,)

    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=recipe.momentum, weight_decay=recipe.weight_decay)

    # Jigsaw: train_jigsaw.py's model, ERF refresh and compute_losses, line for line. Plain: the same backbone
    # with timm's global pool + FC, one label per image. Both start from the same backbone weights.
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, global_pool="")
    plain_model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    backbone.load_state_dict({k: v for k, v in plain_model.state_dict().items() if k in backbone.state_dict()})
    jigsaw_model = JigsawClassifier(backbone, num_classes=args.num_classes).to(device, memory_format=memory_format)
    plain_model = plain_model.to(device, memory_format=memory_format)
    jigsaw_optimizer, plain_optimizer = sgd(jigsaw_model), sgd(plain_model)
    # The ERF batch: pixel values do not change the refresh's cost (a fixed number of passes), so random ones.
    erf_uint8 = torch.randint(0, 256, (args.erf_images, 3, height, width), dtype=torch.uint8)
    erf_images = normalize_jigsaw_image(erf_uint8).to(device, memory_format=memory_format)
    with torch.no_grad():
        feature_height, feature_width = jigsaw_model.forward_features(erf_images[:1]).shape[2:]
    region_index = feature_region_index(template, feature_height=feature_height, feature_width=feature_width)
    region_index = region_index.to(device)
    erf_args = argparse.Namespace(erf_threshold=recipe.erf_threshold)
    label_weights = None

    def refresh() -> None:
        nonlocal label_weights
        label_weights = train_jigsaw.refresh_label_weights(
            jigsaw_model, erf_images, template=template, args=erf_args, dist_info=dist_info
        )

    erf_times = time_calls(refresh, num_calls=args.erf_repeats, device=device)

    def jigsaw_head_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = jigsaw_model.classifier(features)  # (B, C + 1, h, w): the FC as a 1x1 convolution (§3.3)
        return erf_adaptive_dense_loss(logits, labels, label_weights=label_weights, region_index=region_index)

    def jigsaw_losses(batch) -> dict[str, torch.Tensor]:
        batch_images, labels = batch
        batch_images = normalize_jigsaw_image(batch_images).contiguous(memory_format=memory_format)
        with engine.autocast(device, amp=args.amp):
            logits = jigsaw_model(batch_images)  # (B, C + 1, h, w)
        return {
            "jigsaw": erf_adaptive_dense_loss(logits, labels, label_weights=label_weights, region_index=region_index)
        }

    def plain_head_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(plain_model.forward_head(features).float(), labels)  # (B, C + 1) pooled logits

    def plain_losses(batch) -> dict[str, torch.Tensor]:
        batch_images, labels = batch
        batch_images = normalize_jigsaw_image(batch_images).contiguous(memory_format=memory_format)
        with engine.autocast(device, amp=args.amp):
            logits = plain_model(batch_images)  # (B, C + 1)
        return {"cls": F.cross_entropy(logits.float(), labels)}

    scaler = engine.make_grad_scaler(device, amp=args.amp)

    def engine_step(model, optimizer, compute_losses, batch) -> Callable[[], None]:
        def step() -> None:
            engine.train_step(
                model=model,
                optimizer=optimizer,
                scaler=scaler,
                batches=iter([batch]),
                compute_losses=compute_losses,
                accum_steps=1,
                step=0,
                dist_info=dist_info,
                amp=args.amp,
            )

        return step

    def bare_plain_step() -> None:
        plain_optimizer.zero_grad(set_to_none=True)
        plain_losses((images, image_labels))["cls"].backward()
        plain_optimizer.step()

    jigsaw_model.train()
    plain_model.train()
    sides = {
        "Jigsaw: train_jigsaw's step (dense head, ERF-adaptive dense loss)": engine_step(
            jigsaw_model, jigsaw_optimizer, jigsaw_losses, (images, region_labels)
        ),
        "plain timm classification (pool + FC + CE), engine.train_step": engine_step(
            plain_model, plain_optimizer, plain_losses, (images, image_labels)
        ),
        "plain timm classification, bare loop (no engine)": bare_plain_step,
    }
    for fn in sides.values():
        time_calls(fn, num_calls=args.warmup_steps, device=device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    loads = [load_text()]
    # Interleaved in rounds of a few steps, so a change of machine load hits every side alike.
    rounds = max(1, min(args.steps, 5))
    per_round = [args.steps // rounds + (r < args.steps % rounds) for r in range(rounds)]
    for count in per_round:
        for name, fn in sides.items():
            times[name] += time_calls(fn, num_calls=count, device=device)
        loads.append(load_text())

    # What Jigsaw adds, measured alone: the head and the loss, forward and backward, on the last feature map
    # (everything else in the step is the same backbone doing the same work). Small ops, so many repeats.
    features = torch.randn(
        (args.batch_size, jigsaw_model.backbone.num_features, feature_height, feature_width), device=device
    )
    features = features.contiguous(memory_format=memory_format).requires_grad_(True)

    def head_call(head_loss, labels) -> Callable[[], None]:
        def call() -> None:
            features.grad = None
            with engine.autocast(device, amp=args.amp):
                loss = head_loss(features, labels)
            loss.backward()

        return call

    heads = {"jigsaw": head_call(jigsaw_head_loss, region_labels), "plain": head_call(plain_head_loss, image_labels)}
    head_times: dict[str, list[tuple[float, float]]] = {name: [] for name in heads}
    for fn in heads.values():
        time_calls(fn, num_calls=2, device=device)  # warmup
    for start in range(0, args.head_repeats, 10):  # interleaved rounds of 10
        for name, fn in heads.items():
            head_times[name] += time_calls(fn, num_calls=min(10, args.head_repeats - start), device=device)

    names = list(sides)
    clock = 1 if device.type == "cpu" else 0  # the figure the target is judged on: CPU time on a shared CPU
    clock_name = "process CPU time" if clock else "wall time"
    jigsaw_ms, plain_ms = median_ms(times[names[0]], clock), median_ms(times[names[1]], clock)
    erf_ms, erf_wall_ms = median_ms(erf_times, clock), median_ms(erf_times, 0)
    # compute_erf runs one input gradient per (image, position) pair, 32 pairs per pass: linear in the pairs.
    pairs = feature_height * feature_width * args.erf_images
    recipe_pairs = feature_height * feature_width * recipe.erf_images
    recipe_erf_ms = erf_ms * recipe_pairs / pairs
    amortized_ms = recipe_erf_ms / args.erf_every
    ratio = (jigsaw_ms + amortized_ms) / plain_ms
    head_extra_ms = median_ms(head_times["jigsaw"], clock) - median_ms(head_times["plain"], clock)
    structural = 1 + (head_extra_ms + amortized_ms) / plain_ms
    measured = f"{erf_ms / 1000:.1f} s {clock_name}" + (f" ({erf_wall_ms / 1000:.1f} s wall)" if clock else "")
    if args.erf_images != recipe.erf_images:
        measured += (
            f" on {args.erf_images} image(s) ({pairs} pairs), projected linearly to train_jigsaw's "
            f"{recipe.erf_images} images: {recipe_erf_ms / 1000:.1f} s"
        )

    lines = [
        f"### Jigsaw train step vs plain timm classification: {args.model}, batch {args.batch_size}, "
        f"{height}x{width}, {device.type}",
        "",
        *machine_lines(device.type),
        f"- torch threads: {torch.get_num_threads()}",
        f"- setup: {args.num_classes} classes, SGD momentum {recipe.momentum} wd {recipe.weight_decay}, "
        f"AMP {args.amp if device.type == 'cuda' else 'off (CPU)'}, {memory_format}; random uint8 batches on "
        f"{device.type}, normalized on the device on both sides; {args.warmup_steps} warmup steps excluded, "
        f"{args.steps} timed steps per side in {rounds} interleaved rounds",
        f"- load average (1/5/15 min) before and after each round: {', '.join(loads)}",
        "",
        "| step | wall ms (median, min, max) | CPU ms (median) | vs plain, wall | vs plain, CPU |",
        "| --- | --- | --- | --- | --- |",
    ]
    plain_wall, plain_cpu = median_ms(times[names[1]], 0), median_ms(times[names[1]], 1)
    for name in names:
        wall = [1000 * t[0] for t in times[name]]
        cpu = median_ms(times[name], 1)
        lines.append(
            f"| {name} | {spread(wall)} | {cpu:.1f} | {statistics.median(wall) / plain_wall:.3f} | "
            f"{cpu / plain_cpu:.3f} |"
        )
    jig_wall, jig_cpu = median_ms(times[names[0]], 0), median_ms(times[names[0]], 1)
    amortized_wall_ms, amortized_cpu_ms = (
        median_ms(erf_times, which) * recipe_pairs / pairs / args.erf_every for which in (0, 1)
    )
    lines += [
        f"| Jigsaw + ERF refresh ({recipe.erf_images} images) amortized over {args.erf_every} steps | "
        f"{jig_wall + amortized_wall_ms:.1f} | {jig_cpu + amortized_cpu_ms:.1f} | "
        f"{(jig_wall + amortized_wall_ms) / plain_wall:.3f} | {(jig_cpu + amortized_cpu_ms) / plain_cpu:.3f} |",
        "",
        f"ERF refresh (refresh_label_weights: compute_erf, one input gradient per (image, position) pair, "
        f"{feature_height}x{feature_width} positions, then Eq. 2; median of {args.erf_repeats} run(s)): "
        f"{measured}, {recipe_erf_ms / jigsaw_ms:.0f} Jigsaw steps' worth; amortized over {args.erf_every} steps: "
        f"{amortized_ms:.2f} ms per step ({amortized_ms / plain_ms:.2%} of the plain step). The refresh does not "
        "depend on the batch size, so its share shrinks as the batch grows.",
        "",
        f"Head + loss alone, forward + backward on a ({args.batch_size}, {jigsaw_model.backbone.num_features}, "
        f"{feature_height}, {feature_width}) feature map ({clock_name}, median of {len(head_times['jigsaw'])}): "
        f"Jigsaw 1x1 conv + dense loss {median_ms(head_times['jigsaw'], clock):.3f} ms, plain pool + FC + CE "
        f"{median_ms(head_times['plain'], clock):.3f} ms: Jigsaw adds {head_extra_ms:.3f} ms per step "
        f"({head_extra_ms / plain_ms:.2%} of the plain step). With the amortized refresh: {structural:.3f} x plain.",
        "",
        f"Target (Jigsaw step with the ERF refresh amortized <= {STEP_TARGET:.2f} x plain, {clock_name}): "
        f"{'met' if ratio <= STEP_TARGET else 'MISSED'} ({ratio:.3f} from whole steps; {structural:.3f} from the "
        "parts Jigsaw adds, measured alone).",
    ]
    print("\n".join(lines))


def main(args: argparse.Namespace) -> None:
    if args.mode == "data":
        run_data(args)
    elif args.mode == "extract":
        run_extract(args)
    elif args.mode == "storage":
        run_storage(args)
    else:
        run_step(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
