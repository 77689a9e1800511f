"""``python -m detpretrain.hub``: push an export folder to the Hugging Face Hub, or convert it for another framework.

The command line lives apart from ``detpretrain.hub`` so that ``python -m`` runs it without importing the module
twice (``import detpretrain`` already imports ``detpretrain.hub`` to install the timm load hook).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detpretrain import convert as converters
from detpretrain.hub import push_to_hub, read_weights


def _arch_of(source: Path, arch: str | None) -> str:
    if arch:
        return arch
    config = (source if source.is_dir() else source.parent) / "config.json"
    if not config.is_file():
        raise ValueError(f"no config.json beside {source}: pass --arch (the timm architecture of the weights)")
    return json.loads(config.read_text())["architecture"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detpretrain.hub", description=__doc__.split("\n")[0].split(": ", 1)[1]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="validate an export folder and upload it to the Hugging Face Hub")
    push.add_argument("out_dir", type=Path, help="the export folder written by save_pretrained")
    push.add_argument("--repo", required=True, help="the Hub repo, org/name (created if it does not exist)")
    push.add_argument("--revision", default=None, help="branch to commit to (created if needed); default main")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--commit-message", default=None, help="the commit message")
    conv = commands.add_parser("convert", help="write an export in the key layout of another framework")
    conv.add_argument("source", type=Path, help="an export folder, or a .safetensors / .pth file")
    conv.add_argument("--to", required=True, choices=converters.TARGETS, help="the target framework's layout")
    conv.add_argument("--out", required=True, type=Path, help="the file to write (.pth, or .pkl for detectron2)")
    conv.add_argument("--arch", default=None, help="timm architecture; default: read from the export's config.json")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.command == "push":
        commit = push_to_hub(
            args.out_dir, args.repo, revision=args.revision, private=args.private, commit_message=args.commit_message
        )
        print(f"pushed {args.out_dir} to {args.repo} at commit {commit}")
        print(f'pin it in detpretrain/zoo.py: revision="{commit}"')
    elif args.command == "convert":
        arch = _arch_of(args.source, args.arch)
        converted = converters.convert(read_weights(args.source), arch, args.to)
        out = converters.save_converted(converted, args.to, args.out)
        print(f"wrote {out} ({args.to} layout of {arch})")
        print(f"use it with: {converters.framework_config(arch, args.to).replace('FILE', str(out))}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
