"""What a benchmark's figures were measured on: the lines every benchmark prints above its table."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import timm
import torch
import torchvision

REPO_ROOT = Path(__file__).resolve().parents[1]


def machine_lines(device_type: str = "cpu") -> list[str]:
    """The processor, memory and GPU (when ``device_type`` is "cuda"), the library versions, and the command that
    was run (relative to the repository root), as markdown list items."""
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [f"- machine: {cpu}, {os.cpu_count()} logical cores, {ram_gib:.0f} GiB RAM"]
    if device_type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    lines.append(
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, timm {timm.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}"
    )
    script = os.path.relpath(Path(sys.argv[0]).resolve(), REPO_ROOT)
    lines.append(f"- command (from the repository root): `python {shlex.join([script, *sys.argv[1:]])}`")
    return lines
