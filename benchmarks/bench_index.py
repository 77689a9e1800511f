"""The label index per rank (issue 10, point 5): memory and startup of LabelledImages against rows as Python objects.

train_predet.py and ``python -m detpretrain.proposals`` index their images with
``detpretrain.data.labelled_images.LabelledImages``: numpy arrays plus one path table, built by every rank from the
label source. The targets, each measured here on a synthetic label list (the paths need not exist):

- at most 64 bytes per row (the arrays' ``nbytes / N``; the process's RSS growth per row during the build too);
- startup (building the index from the label file) at most 30 s per rank on this machine;
- RSS growth of 8 forked DataLoader workers after one pass over the whole index (each worker reads ``path(i)`` and
  ``labels(i)`` for every row) at most 10%. RSS alone hides copy-on-write: a forked worker's RSS counts the pages it
  shares with its rank from the start, and a page copied on write stays counted once. So each worker also reports
  its private memory (USS, Private_Clean + Private_Dirty of /proc/self/smaps_rollup) before and after the pass, and
  the target is judged on the larger of RSS growth and USS growth, both in % of the worker's RSS before the pass.

The old representation, a tuple of ``(image path, tuple of label indices)`` rows, is measured the same way as a
baseline: built directly from the same file as the old reader did (one ``json.loads`` per line, paths joined to the
image folder), minus its one ``os.path.isfile`` per row (the synthetic paths do not exist). Each representation is
built and measured in a fresh subprocess, as one rank would: the figures are per rank. The script prints a markdown
block (machine, versions, command, figures) for benchmarks/RESULTS.md.

    python benchmarks/bench_index.py                                  # 5M rows, JSONL, 8 workers
    python benchmarks/bench_index.py --rows 1000000 --format csv --workers 4
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

BYTES_PER_ROW_TARGET = 64
STARTUP_TARGET_S = 30.0
WORKER_GROWTH_TARGET = 0.10
NUM_CLASSES = 1000  # ImageNet's synsets
KINDS = {
    "arrays": "LabelledImages (numpy arrays + one path table)",
    "tuples": "old: tuple of (str, tuple[int, ...]) rows",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Label index benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows of the synthetic label list")
    parser.add_argument("--workers", type=int, default=8, help="forked DataLoader workers that each read every row")
    parser.add_argument("--format", default="jsonl", choices=["jsonl", "csv"], help="label file format")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS), help="representations")
    parser.add_argument("--seed", type=int, default=0)
    # Internal: one measurement in this (fresh) process, printed as JSON.
    parser.add_argument("--child", choices=list(KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--labels-file", type=Path, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------------- data
def write_label_file(path: Path, *, num_rows: int, file_format: str, seed: int) -> None:
    """ImageNet-like rows: "n01440764/n01440764_10026.JPEG", the folder's synset first, then 0-2 more labels."""
    rng = np.random.default_rng(seed)
    synsets = sorted({f"n{n:08d}" for n in rng.integers(1_000_000, 16_000_000, 4 * NUM_CLASSES)})[:NUM_CLASSES]
    with open(path, "w", encoding="utf-8", newline="") as f:
        if file_format == "csv":
            f.write("file,labels\n")
        for start in range(0, num_rows, 100_000):
            size = min(100_000, num_rows - start)
            folder = rng.integers(0, NUM_CLASSES, size).tolist()
            number = rng.integers(1, 100_000, size).tolist()
            count = rng.integers(1, 4, size).tolist()
            extra = rng.integers(0, NUM_CLASSES, (size, 2)).tolist()
            lines = []
            for c, n, k, more in zip(folder, number, count, extra, strict=True):
                labels = [synsets[c], *(synsets[e] for e in more[: k - 1])]
                file = f"{synsets[c]}/{synsets[c]}_{n}.JPEG"
                if file_format == "csv":
                    lines.append(f"{file},{';'.join(labels)}\n")
                else:
                    names = ", ".join(f'"{label}"' for label in labels)  # plain ASCII: no escaping needed
                    lines.append(f'{{"file": "{file}", "labels": [{names}]}}\n')
            f.write("".join(lines))


def old_rows(images_dir: Path, labels_file: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The old in-memory form, built as the old reader built it (without its isfile per row)."""
    if labels_file.suffix == ".jsonl":
        with open(labels_file, encoding="utf-8") as f:
            parsed = [(row["file"], row["labels"]) for row in map(json.loads, f)]
    else:
        with open(labels_file, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            next(reader)
            parsed = [(file, labels.split(";")) for file, labels in reader]
    index = {name: i for i, name in enumerate(sorted({name for _, names in parsed for name in names}))}
    return tuple((str(images_dir / file), tuple(sorted({index[name] for name in names}))) for file, names in parsed)


def deep_size(rows: tuple[tuple[str, tuple[int, ...]], ...]) -> int:
    """Bytes of the Python objects of ``rows`` (the label ints are the class index's, shared: not counted)."""
    return sys.getsizeof(rows) + sum(sys.getsizeof(r) + sys.getsizeof(r[0]) + sys.getsizeof(r[1]) for r in rows)


# ---------------------------------------------------------------------------------------------------- memory
def load_text() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def memory_kib() -> dict[str, int]:
    """This process's RSS and USS (private pages) in KiB, from /proc/self/smaps_rollup."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return {"rss": fields["Rss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


# ------------------------------------------------------------------------------------------------ one rank
def run_child(kind: str, labels_file: Path, num_workers: int) -> dict:
    """Build the index as a rank would, then let ``num_workers`` forked DataLoader workers read every row once."""
    import torch

    from detpretrain.data.labelled_images import from_label_file

    images_dir = labels_file.parent
    gc.collect()
    before = memory_kib()
    start, start_cpu = time.perf_counter(), time.process_time()
    if kind == "arrays":
        index = from_label_file(images_dir, labels_file)
        num_rows = len(index)
        read_row = lambda i: (index.path(i), index.labels(i))  # noqa: E731  (what LabelledImageDataset reads)
    else:
        index = old_rows(images_dir, labels_file)
        num_rows = len(index)

        def read_row(i: int) -> tuple[str, tuple[int, ...]]:
            path, labels = index[i]  # the old dataset's unpacking: a reference to the row, its path and its labels
            return path, labels

    startup_s, startup_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    built = memory_kib()
    peak = peak_rss_kib()

    class OnePass(torch.utils.data.Dataset):
        """Item w: worker w reads every row once, and reports its memory before and after."""

        def __len__(self) -> int:
            return num_workers

        def __getitem__(self, worker: int) -> dict:
            first = memory_kib()
            start = time.perf_counter()
            for i in range(num_rows):
                read_row(i)
            return {"before": first, "after": memory_kib(), "pass_s": time.perf_counter() - start}

    # One item per worker (the sampler deals indices round-robin), forked as torch's DataLoader does on Linux.
    loader = torch.utils.data.DataLoader(
        OnePass(), batch_size=None, num_workers=num_workers, multiprocessing_context="fork", collate_fn=lambda x: x
    )
    workers = list(loader)
    index_bytes = index.nbytes if kind == "arrays" else deep_size(index)
    return {
        "rows": num_rows,
        "startup_s": startup_s,
        "startup_cpu_s": startup_cpu_s,
        "index_bytes": index_bytes,
        "rss_growth_kib": built["rss"] - before["rss"],
        "peak_growth_kib": peak - before["rss"],
        "parent_rss_kib": built["rss"],
        "workers": workers,
    }


def measure(kind: str, labels_file: Path, num_workers: int) -> dict:
    """``run_child`` in a fresh interpreter: nothing of an earlier build or of this process is in its memory."""
    command = [sys.executable, __file__, "--child", kind, "--labels-file", str(labels_file)]
    command += ["--workers", str(num_workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{kind}: the measuring process failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- report
def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def worker_figures(figures: dict) -> dict[str, float]:
    workers = figures["workers"]
    rss_before = [w["before"]["rss"] for w in workers]
    rss_growth = [(w["after"]["rss"] - w["before"]["rss"]) / w["before"]["rss"] for w in workers]
    uss_growth = [(w["after"]["uss"] - w["before"]["uss"]) / w["before"]["rss"] for w in workers]
    return {
        "rss_before": float(np.mean(rss_before)),
        "rss_after": float(np.mean([w["after"]["rss"] for w in workers])),
        "uss_before": float(np.mean([w["before"]["uss"] for w in workers])),
        "uss_after": float(np.mean([w["after"]["uss"] for w in workers])),
        "max_rss_growth": max(rss_growth),
        "max_uss_growth": max(uss_growth),
        "uss_growth_kib_total": float(sum(w["after"]["uss"] - w["before"]["uss"] for w in workers)),
        "pass_s": float(np.median([w["pass_s"] for w in workers])),
    }


def main(args: argparse.Namespace) -> None:
    if args.workers < 1 or args.rows < 1:
        raise SystemExit(f"--rows {args.rows} and --workers {args.workers} must be at least 1")
    if args.child:
        print(json.dumps(run_child(args.child, args.labels_file, args.workers)))
        return

    from machine_info import machine_lines  # benchmarks/machine_info.py, beside this script

    with tempfile.TemporaryDirectory() as tmp:
        labels_file = Path(tmp) / f"labels.{args.format}"
        start = time.perf_counter()
        write_label_file(labels_file, num_rows=args.rows, file_format=args.format, seed=args.seed)
        write_s = time.perf_counter() - start
        file_mib = labels_file.stat().st_size / 2**20
        results, loads = {}, [load_text()]
        for kind in args.kinds:
            if kind == "tuples":
                # Every worker ends up with its own copy of the old rows (~300 bytes each): refuse rather than
                # let the kernel kill a process of someone else on a shared machine.
                need = (args.workers + 1) * 350 * args.rows / 1024
                if need > mem_available_kib():
                    raise SystemExit(
                        f"the baseline needs ~{mib(need)} MiB for its {args.workers} workers' copies, more than is "
                        "available; pass fewer --rows or --workers, or --kinds arrays"
                    )
            results[kind] = measure(kind, labels_file, args.workers)
            loads.append(load_text())

    lines = [
        f"### Label index per rank: {args.rows:,} rows, {args.workers} forked loader workers",
        "",
        *machine_lines(),
        f"- data: synthetic {args.format.upper()} label file, {args.rows:,} rows, {file_mib:,.0f} MiB (written in "
        f"{write_s:.0f} s, untimed): ImageNet-like relative paths (`n01440764/n01440764_10026.JPEG`), 1-3 labels per "
        f"row from {NUM_CLASSES} class names; the files do not exist",
        "- per rank: each representation built and measured in a fresh process (imports excluded from startup); "
        f"then {args.workers} workers forked by a torch DataLoader each read every row once (`path(i)`, `labels(i)`; "
        "the old rows: `path, labels = samples[i]`); worker memory from /proc/self/smaps_rollup (USS = Private_Clean + "
        "Private_Dirty), mean over the workers, growth the largest worker's, in % of its RSS before the pass",
        f"- load average (1/5/15 min) before and after each representation: {', '.join(loads)}; the build is one "
        "thread, so its CPU time is its uncontended wall time, and the startup target is judged on it",
        "",
        "| index | startup s, wall (CPU) | index bytes/row | RSS growth/row after build (peak) "
        "| worker RSS MiB before -> after (growth) | worker USS MiB before -> after (growth) | worker pass s "
        "| MiB per rank per 1M images (rank + workers' private copies) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, figures in results.items():
        rows, w = figures["rows"], worker_figures(figures)
        per_million = 1e6 / rows / 2**20
        rank_mib = figures["rss_growth_kib"] * 1024 * per_million
        with_workers_mib = (figures["rss_growth_kib"] + w["uss_growth_kib_total"]) * 1024 * per_million
        lines.append(
            f"| {KINDS[kind]} | {figures['startup_s']:.1f} ({figures['startup_cpu_s']:.1f}) | "
            f"{figures['index_bytes'] / rows:.1f} | "
            f"{figures['rss_growth_kib'] * 1024 / rows:.1f} ({figures['peak_growth_kib'] * 1024 / rows:.1f}) | "
            f"{mib(w['rss_before'])} -> {mib(w['rss_after'])} ({w['max_rss_growth']:+.1%}) | "
            f"{mib(w['uss_before'])} -> {mib(w['uss_after'])} ({w['max_uss_growth']:+.1%}) | {w['pass_s']:.1f} | "
            f"{rank_mib:,.0f} ({with_workers_mib:,.0f}) |"
        )
    if "arrays" in results:
        figures, w = results["arrays"], worker_figures(results["arrays"])
        bytes_per_row = figures["index_bytes"] / figures["rows"]
        growth = max(w["max_rss_growth"], w["max_uss_growth"])
        startup = figures["startup_cpu_s"]
        verdicts = [
            f"bytes per row <= {BYTES_PER_ROW_TARGET}: {'met' if bytes_per_row <= BYTES_PER_ROW_TARGET else 'MISSED'} "
            f"({bytes_per_row:.1f})",
            f"startup <= {STARTUP_TARGET_S:.0f} s: {'met' if startup <= STARTUP_TARGET_S else 'MISSED'} "
            f"({startup:.1f} s CPU, {figures['startup_s']:.1f} s wall)",
            f"worker growth <= {WORKER_GROWTH_TARGET:.0%}: {'met' if growth <= WORKER_GROWTH_TARGET else 'MISSED'} "
            f"({growth:+.1%}, the larger of RSS and USS growth)",
        ]
        lines += ["", "Targets (LabelledImages): " + "; ".join(verdicts) + "."]
    print("\n".join(lines))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
