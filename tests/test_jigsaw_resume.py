"""A kill costs nothing (§3.1 extraction): a killed extraction continues where it stopped, keeping every finished
shard, in one process and at scale (two torchrun "nodes" of two gloo ranks each on 127.0.0.1), and the result is
byte for byte what one uninterrupted process writes."""

import pytest

import train_jigsaw
from detpretrain.jigsaw import JigsawSamples, SampleDirError, coco_image_records, extract_samples, extraction
from tests.conftest import REPO_ROOT
from tests.torchrun_nodes import kill_node, launch_nodes, node_logs, wait_nodes, wait_until


def directory_files(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def shard_stats(directory):
    return {path.name: path.stat() for path in directory.glob("shard-*.jigsaw")}


class Killed(BaseException):
    """What a SIGKILL does to the extraction, as far as its files can tell: it stops in the middle of a write."""


def test_a_killed_extraction_continues_and_keeps_finished_shards(coco128, tmp_path, monkeypatch):
    coco = coco_image_records(coco128 / "annotations" / "instances_train2017.json", coco128 / "images")
    records, kwargs = coco.records[:40], {"class_names": coco.class_names, "shard_size": 5}  # 8 shards
    extract_samples(records, output_dir=tmp_path / "reference", **kwargs)

    real_atomic_write = extraction.atomic_write

    def killed_on_the_fourth_shard(path, write):
        if path.name == "shard-00003.jigsaw":
            (path.parent / f".{path.name}.0123456789ab.tmp").write_bytes(b"half a shard")  # the temp file it leaves
            raise Killed
        real_atomic_write(path, write)

    monkeypatch.setattr(extraction, "atomic_write", killed_on_the_fourth_shard)
    with pytest.raises(Killed):
        extract_samples(records, output_dir=tmp_path / "samples", **kwargs)
    monkeypatch.setattr(extraction, "atomic_write", real_atomic_write)
    before = shard_stats(tmp_path / "samples")
    assert sorted(before) == [f"shard-0000{k}.jigsaw" for k in range(3)]
    assert not (tmp_path / "samples" / "manifest.json").exists()  # unfinished: the reader refuses it
    with pytest.raises(SampleDirError, match="not a finished Jigsaw sample directory"):
        JigsawSamples(tmp_path / "samples")
    shard = tmp_path / "samples" / "shard-00001.jigsaw"
    shard.write_bytes(shard.read_bytes()[:-100])  # a damaged shard (a disk error, a careless copy) is computed again

    extract_samples(records, output_dir=tmp_path / "samples", **kwargs)
    after = shard_stats(tmp_path / "samples")
    for name in ("shard-00000.jigsaw", "shard-00002.jigsaw"):  # checked and kept, not written again
        assert (after[name].st_ino, after[name].st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    assert after["shard-00001.jigsaw"].st_ino != before["shard-00001.jigsaw"].st_ino
    assert directory_files(tmp_path / "samples") == directory_files(tmp_path / "reference")  # no temp file left


def test_two_nodes_killed_and_relaunched_equal_one_process(coco128, tmp_path):
    data = [
        "--train-images",
        str(coco128 / "images"),
        "--train-ann",
        str(coco128 / "annotations/instances_train2017.json"),
    ]
    # 2 images per shard, cut in each rank's own process: 64 shards of ~15 ms, so the kill lands mid-way.
    flags = [*data, "--extract-only", "--device", "cpu", "--shard-size", "2", "--extract-workers", "0", "--quiet"]
    reference = train_jigsaw.main(
        train_jigsaw.get_args_parser().parse_args([*flags, "--samples", str(tmp_path / "reference")])
    )

    samples = tmp_path / "samples"
    command = [str(REPO_ROOT / "train_jigsaw.py"), *flags, "--samples", str(samples), "--dist-timeout", "2"]
    nodes = launch_nodes(command, nnodes=2, nproc_per_node=2, cwd=tmp_path)
    try:
        wait_until(lambda: len(shard_stats(samples)) >= 4, nodes=nodes, timeout=240)
    finally:
        kill_node(nodes[1])  # node 1 (ranks 2 and 3) dies mid-way
        kill_node(nodes[0])  # and node 0 with it, before its ranks finish node 1's shards
    before = shard_stats(samples)
    assert 4 <= len(before) < 64, "the kill came mid-way"

    nodes = launch_nodes(command, nnodes=2, nproc_per_node=2, cwd=tmp_path)
    assert wait_nodes(nodes, cwd=tmp_path, timeout=240) == [0, 0], node_logs(tmp_path)
    after = shard_stats(samples)
    for name, stat in before.items():  # finished shards were checked and kept, not written again
        assert (after[name].st_ino, after[name].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert len(after) == 64
    assert directory_files(samples) == directory_files(reference)
