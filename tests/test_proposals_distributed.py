"""The EdgeBoxes cache at scale, simulated: two torchrun "nodes" of two gloo ranks each on 127.0.0.1 share the
work, one node is killed mid-way, both are relaunched, and the folder equals a single process's byte for byte."""

import json
import shutil

import pytest

from detpretrain import proposals
from tests.torchrun_nodes import kill_node, launch_nodes, node_logs, wait_nodes, wait_until

# Two images per shard (~0.15 s of EdgeBoxes each): 42 shards, enough to kill a node in the middle.
FLAGS = ["--shard-size", "2", "--num-workers", "0"]
BAD = {"truncated.jpg": "undecodable image", "text.jpg": "undecodable image", "empty.jpg": "undecodable image"}


@pytest.fixture()
def class_folders(tmp_path, coco128):
    """coco128's photos as a class-folder tree (two classes), plus three damaged files among them."""
    root = tmp_path / "images"
    photos = sorted((coco128 / "images").glob("*.jpg"))[:80]
    for i, photo in enumerate(photos):
        (root / ("even" if i % 2 == 0 else "odd")).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, root / ("even" if i % 2 == 0 else "odd") / photo.name)
    (root / "odd" / "truncated.jpg").write_bytes(photos[0].read_bytes()[:3000])
    (root / "odd" / "text.jpg").write_text("this is not an image")
    (root / "even" / "empty.jpg").write_bytes(b"")
    return root


def folder_files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_two_nodes_killed_and_relaunched_equal_one_process(tmp_path, class_folders, capsys):
    reference = tmp_path / "reference"
    proposals.main(["--train-images", str(class_folders), "--output", str(reference), *FLAGS])
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 83 and report["shards"] == 42 and report["skipped_images"] == 3
    skipped = proposals.ProposalCache(reference).skipped_images()
    assert {entry["image"].split("/")[-1]: entry["reason"] for entry in skipped} == BAD

    cache = tmp_path / "cache"
    command = ["-m", "detpretrain.proposals", "--train-images", str(class_folders), "--output", str(cache), *FLAGS]
    command += ["--dist-timeout", "2"]
    nodes = launch_nodes(command, nnodes=2, nproc_per_node=2, cwd=tmp_path)
    try:
        wait_until(lambda: len(list(cache.glob("shard-*"))) >= 2, nodes=nodes, timeout=240)
    finally:
        kill_node(nodes[1])  # node 1 (ranks 2 and 3) dies mid-way
        # A static torchrun job cannot go on without a node: its scheduler ends the other one (left alone, node 0's
        # ranks would compute the remaining shards, then fail at the barrier).
        kill_node(nodes[0])
    before = {path.name: path.stat() for path in cache.glob("shard-*")}
    assert 2 <= len(before) < 42, "the kill came mid-way"

    nodes = launch_nodes(command, nnodes=2, nproc_per_node=2, cwd=tmp_path)
    codes = wait_nodes(nodes, cwd=tmp_path, timeout=240)
    assert codes == [0, 0], node_logs(tmp_path)
    for name, stat in before.items():  # finished shards were checked and kept, not written again
        now = (cache / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert folder_files(cache) == folder_files(reference)
