"""The README is a promise: every path it names exists, and every flag its commands pass is one the command takes."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SCRIPTS = {
    "train_jigsaw.py": "train_jigsaw.py",
    "train_predet.py": "train_predet.py",
    "finetune.py": "finetune.py",
    "experiments/study.py": "experiments/study.py",
}
MODULES = ("detpretrain.proposals", "detpretrain.evaluate", "detpretrain.analysis", "detpretrain.data")
MODULES += ("detpretrain.hub",)


def layout_paths() -> list[str]:
    """The first word of each line of the README's Layout block, as a path from the checkout's root."""
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    paths, parent = [], ""
    for line in block.splitlines()[1:]:
        if not line.strip() or line.startswith(" " * 4):
            continue  # a continuation line of a description
        indented = line.startswith("  ")
        word = line.split()[0]
        if not indented:
            parent = word if word.endswith("/") else ""
            paths.append(word)
        else:
            paths.append(parent + word)
    return paths


def test_layout_names_existing_paths():
    paths = layout_paths()
    assert "detpretrain/convert.py" in paths and "experiments/" in paths
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"README's Layout names paths that do not exist: {missing}"


def test_every_repository_path_in_backticks_exists():
    # files (an extension) and folders (a trailing slash); `detpretrain/resnet50.jigsaw` is a Hub repo, not a path
    named = set(re.findall(r"`((?:detpretrain|tests|benchmarks|experiments)/[\w/-]*(?:\.(?:py|md|json)|/))`", README))
    named |= set(re.findall(r"\b((?:benchmarks|experiments)/\w+\.(?:py|md))\b", README))
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"README names paths that do not exist: {missing}"


def commands() -> list[list[str]]:
    """Every command line of the README's bash blocks (continuations joined, comments and `&&` split off)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines += [part.strip() for part in line.split("&&")]
    return [shlex.split(line.replace("...", "")) for line in lines]


def parser_of(target: str) -> argparse.ArgumentParser:
    if target in MODULES:  # a package's command line lives in its __main__
        is_package = importlib.util.find_spec(target).submodule_search_locations is not None
        module = importlib.import_module(target + ".__main__" if is_package else target)
    else:
        name = f"readme_{Path(target).stem}"
        spec = importlib.util.spec_from_file_location(name, ROOT / target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # a script's dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return module.get_args_parser()


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= option_strings(sub)
    return options


def readme_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for words in commands():
        for i, word in enumerate(words):
            if word in SCRIPTS or any(word.endswith("/" + s) for s in SCRIPTS if "/" not in s):
                found.append((SCRIPTS.get(word, Path(word).name), words[i + 1 :]))
                break
            if word == "-m" and i + 1 < len(words) and words[i + 1] in MODULES:
                found.append((words[i + 1], words[i + 2 :]))
                break
    return found


def test_readme_commands_are_found():
    targets = {target for target, _ in readme_invocations()}
    assert {"train_jigsaw.py", "train_predet.py", "finetune.py", "experiments/study.py"} <= targets


@pytest.mark.parametrize("target,words", readme_invocations(), ids=lambda value: str(value)[:60])
def test_readme_command_flags_exist(target, words):
    known = option_strings(parser_of(target))
    flags = [word.split("=", 1)[0] for word in words if word.startswith("--")]
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"README passes {unknown} to {target}, which does not take them"


def backbone_rows() -> list[list[str]]:
    """The rows of the README's table of backbone families that finetune.py takes."""
    table = README.split("| family | example | level indices |", 1)[1].split("\n\n", 1)[0]
    return [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.mark.parametrize("row", backbone_rows(), ids=lambda row: row[1])
def test_backbone_table_rows_are_what_finetune_chooses(row):
    from detpretrain.backbone import choose_levels, feature_levels

    _, name, indices, strides, channels, *_ = row
    chosen = choose_levels(name)
    assert ", ".join(map(str, chosen)) == indices
    by_index = {level["index"]: level for level in feature_levels(name)}
    assert ", ".join(str(by_index[i]["stride"]) for i in chosen) == strides
    assert ", ".join(str(by_index[i]["channels"]) for i in chosen) == channels
