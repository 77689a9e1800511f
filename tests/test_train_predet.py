"""train_predet.py end to end on real photos: every loss finite, the total falls, the export loads into timm and
finetune.py's detector, resume is exact, DDP runs, and bad input (no OpenCV, empty label sets, corrupt images) gets
its message."""

import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import train_predet
from detpretrain import engine, proposals
from detpretrain.data.labelled_images import from_coco
from detpretrain.detection.detectors import build_detector
from detpretrain.detection.protocols import PROTOCOLS
from detpretrain.predet.model import LOSS_KEYS
from tests.conftest import REPO_ROOT

# A tiny PreDet: timm's test_resnet, 96-px views, a narrow FPN and box head, fewer proposals and negatives.
TINY = [
    *["--model", "test_resnet", "--view-size", "96", "--device", "cpu", "--num-workers", "0", "--quiet"],
    *["--proposal-workers", "2", "--fpn-channels", "32", "--predet-config", "box_head_dim=128"],
    *["croi_negatives_per_image=64", "crpn_pre_nms_topk=300", "crpn_post_nms_topk=200"],
]
LOSS_TERMS = {"loss_cls", "loss_crpn_cls", "loss_crpn_reg", "loss_info", "loss_croi_reg"}


def coco128_flags(coco128):
    images, ann = coco128 / "images", coco128 / "annotations/instances_train2017.json"
    return ["--train-images", str(images), "--train-ann", str(ann), "--skip-bad-rows"]


@pytest.fixture(scope="module")
def coco128_proposals(tmp_path_factory, coco128):
    """The EdgeBoxes cache of coco128's labelled images, computed once for the module's runs."""
    path = tmp_path_factory.mktemp("proposals") / "coco128.edgeboxes"
    args = train_predet.get_args_parser().parse_args([*TINY, *coco128_flags(coco128), "--proposals", str(path)])
    images = train_predet.read_labelled_images(args)
    train_predet.compute_proposal_cache(images, path, num_workers=2)
    return path


def run(tmp_path, *extra: str, name: str = "run"):
    args = train_predet.get_args_parser().parse_args([*TINY, "--output-dir", str(tmp_path / name), *extra])
    return train_predet.main(args)


def log_rows(output_dir):
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def test_coco128_loss_falls_and_export_loads_strictly_into_timm(tmp_path, coco128, coco128_proposals):
    export = run(
        tmp_path,
        *coco128_flags(coco128),
        *["--proposals", str(coco128_proposals), "--iters", "120", "--warmup-iters", "10", "--batch-size", "8"],
        *["--lr", "2.56", "--clip-grad", "10", "--log-every", "1"],
    )
    rows = log_rows(export.parent)
    assert len(rows) == 120 and LOSS_TERMS | {"loss"} <= rows[0].keys()
    assert all(torch.isfinite(torch.tensor([r[k] for k in LOSS_TERMS])).all() for r in rows)
    first = statistics.mean(r["loss"] for r in rows[:30])
    last = statistics.mean(r["loss"] for r in rows[-30:])
    assert last < 0.96 * first, f"the total loss did not fall: {first:.3f} -> {last:.3f}"
    first_info = statistics.mean(r["loss_info"] for r in rows[:30])
    assert statistics.mean(r["loss_info"] for r in rows[-30:]) < 0.95 * first_info  # the lookup is learnt

    model = timm.create_model(
        "test_resnet",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(export / "model.safetensors")),
    )
    exported = safetensors.torch.load_file(export / "model.safetensors")
    assert set(exported) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
    assert (export / "fpn.safetensors").is_file()

    card = (export / "README.md").read_text()
    for expected in ("image-gradient edges", "config.temperature", "0.07", "detectron2 default", "1/k", "view-2"):
        assert expected in card, expected
    # What trained: the paper's plain dot products (issue 11, item 8) and BN over this process's 8 views.
    assert "| config.scale_dot_products | False: " in card
    assert "the one process normalizes its own 8 views (both views of 4 images)" in card
    args = json.loads((export.parent / "args.json").read_text())
    assert args["losses"] == "cls,crpn,info,croi_reg" and args["lr"] == 2.56


def test_export_initializes_finetune_detectors_backbone_and_fpn(tmp_path, coco128, coco128_proposals):
    """At finetune.py's FPN width (256), the export's backbone and FPN both load into a Faster R-CNN."""
    export = run(
        tmp_path,
        *coco128_flags(coco128),
        *["--proposals", str(coco128_proposals), "--iters", "2", "--warmup-iters", "1", "--batch-size", "4"],
        *["--fpn-channels", "256", "--view-size", "64", "--predet-config", "box_head_dim=1024", "--tag", "predet_test"],
    )
    model, record = build_detector(
        "fasterrcnn",
        backbone="test_resnet",
        num_classes=3,
        protocol=PROTOCOLS["predet"],
        backbone_weights=export,
    )
    assert record["loaded"]["fpn"]["from"] != "none", record["loaded"]
    fpn = safetensors.torch.load_file(export / "fpn.safetensors")
    loaded = model.backbone.fpn.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in fpn.items())
    # By default the export holds the heads fine-tuning starts from, and the detector starts from them.
    heads = safetensors.torch.load_file(export / "heads.safetensors")
    assert {k.rsplit(".", 1)[0] for k in heads} == {
        "crpn.head.conv",
        *(f"croi.head.box_head.{fc}" for fc in ("fc6", "fc7")),
    }
    assert record["loaded"]["heads"]["initialized"] == {
        "rpn.head.conv": "crpn.head.conv",
        "roi_heads.box_head": "croi.head.box_head",
    }
    state = model.state_dict()
    assert torch.equal(state["rpn.head.conv.0.0.weight"], heads["crpn.head.conv.weight"])
    assert torch.equal(state["roi_heads.box_head.fc7.weight"], heads["croi.head.box_head.fc7.weight"])


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch, coco128, coco128_proposals):
    """Killed right after the step-4 checkpoint, resumed with --resume auto: the same log and export."""
    common = [*coco128_flags(coco128), "--proposals", str(coco128_proposals), "--iters", "7", "--warmup-iters", "2"]
    common += ["--batch-size", "4", "--save-every", "2", "--log-every", "1", "--lr", "1.0"]
    reference = run(tmp_path, *common, name="reference")
    with killed_at_step(monkeypatch, 5):
        run(tmp_path, *common, name="resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["step"] == 4
    resumed = run(tmp_path, *common, "--resume", "auto", name="resumed")
    assert_same_run(reference, resumed)


@contextlib.contextmanager
def killed_at_step(monkeypatch, step: int):
    """The run inside dies as it starts ``step`` (after the checkpoint before it), as a kill would."""
    real_train_step = engine.train_step

    def crash(**kwargs):
        if kwargs["step"] == step:
            raise Crash("simulated kill")
        return real_train_step(**kwargs)

    monkeypatch.setattr(engine, "train_step", crash)
    with pytest.raises(Crash):
        yield
    monkeypatch.setattr(engine, "train_step", real_train_step)


def assert_same_run(reference, resumed):
    """Bitwise the same exported weights and logged losses."""
    a = safetensors.torch.load_file(reference / "model.safetensors")
    b = safetensors.torch.load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    loss_keys = sorted(LOSS_TERMS | {"loss"})
    assert [[r[k] for k in loss_keys] for r in log_rows(reference.parent)] == [
        [r[k] for k in loss_keys] for r in log_rows(resumed.parent)
    ]


@pytest.fixture(scope="module")
def coco128_tar_shards(tmp_path_factory, coco128):
    """24 coco128 photos (long side shrunk to 160 px) as 4 WebDataset tar shards, an image and a .json with its
    COCO category names per sample, and the class list."""
    webdataset = pytest.importorskip("webdataset")
    images = from_coco(coco128 / "annotations/instances_train2017.json", coco128 / "images", on_bad_row="skip")
    root = tmp_path_factory.mktemp("tar_shards")
    for shard in range(4):
        with webdataset.TarWriter(str(root / f"train-{shard:06d}.tar")) as writer:
            for i in range(6 * shard, 6 * shard + 6):
                with Image.open(images.path(i)) as image:
                    image = image.convert("RGB")
                    image.thumbnail((160, 160))
                    encoded = io.BytesIO()
                    image.save(encoded, format="JPEG", quality=90)
                writer.write(
                    {"__key__": f"img{i:04d}", "jpg": encoded.getvalue(), "json": {"labels": images.label_names(i)}}
                )
    (root / "classes.txt").write_text("".join(name + "\n" for name in images.class_names))
    return root


def test_tar_shards_train_and_resume_exactly(tmp_path, monkeypatch, coco128_tar_shards):
    """WebDataset shards streamed with two workers, the EdgeBoxes cache keyed by tar: killed after the step-4
    checkpoint and resumed, the run ends as the uninterrupted one did."""
    common = ["--train-shards", str(coco128_tar_shards), "--class-names", str(coco128_tar_shards / "classes.txt")]
    common += ["--num-workers", "2", "--edge-image-size", "160", "--iters", "7", "--warmup-iters", "2"]
    common += ["--batch-size", "4", "--save-every", "2", "--log-every", "1", "--lr", "1.0"]
    common += ["--proposals", str(tmp_path / "shards.edgeboxes")]
    reference = run(tmp_path, *common, name="reference")
    cache = proposals.ProposalCache(tmp_path / "shards.edgeboxes")
    assert cache.layout == {"kind": "tars", "tars": [f"train-{k:06d}.tar" for k in range(4)]}
    assert cache.shard(2).names() == [f"img{i:04d}" for i in range(12, 18)]

    with killed_at_step(monkeypatch, 5):
        run(tmp_path, *common, name="resumed")
    resumed = run(tmp_path, *common, "--resume", "auto", name="resumed")
    assert_same_run(reference, resumed)
    assert "4 tar shards" in (reference / "README.md").read_text()


@pytest.mark.parametrize("losses", ["cls,info,croi_reg", "crpn,info,croi_reg", "cls"])
def test_table1_ablations_train(tmp_path, losses, coco128, coco128_proposals):
    """Tab. 1's rows: without crpn the CROI head trains on random boxes; cls alone needs no proposals at all."""
    proposals = [] if losses == "cls" else ["--proposals", str(coco128_proposals)]
    export = run(
        tmp_path,
        *coco128_flags(coco128),
        *proposals,
        *["--losses", losses, "--iters", "2", "--warmup-iters", "1", "--batch-size", "4", "--log-every", "1"],
    )
    rows = log_rows(export.parent)
    expected = {k for name in losses.split(",") for k in LOSS_KEYS[name]}
    assert {k for k in rows[0] if k.startswith("loss_")} == expected
    if losses == "cls":
        assert not (export.parent / "proposals.edgeboxes").exists()


def test_options_train_and_are_recorded(tmp_path, monkeypatch, coco128, coco128_proposals):
    """The options that are not the paper's: each view taking each role (PAPER_NOTES.md "Views and batch"), the
    1/sqrt(D) dot products and SyncBatchNorm (one process on a CPU: the same numbers as BatchNorm). The
    --predet-config flags add to TINY's."""
    built = []

    def create_predet(*args, **kwargs):
        built.append(real_create_predet(*args, **kwargs))
        return built[-1]

    real_create_predet = train_predet.create_predet
    monkeypatch.setattr(train_predet, "create_predet", create_predet)
    export = run(
        tmp_path,
        *coco128_flags(coco128),
        *["--proposals", str(coco128_proposals), "--predet-config", "symmetric_views=true", "scale_dot_products=true"],
        *["--sync-bn", "--iters", "2", "--warmup-iters", "1", "--batch-size", "4", "--log-every", "1"],
        "--export-heads",  # alone: every head, not only those fine-tuning starts from
    )
    rows = log_rows(export.parent)
    assert all(math.isfinite(row[k]) for row in rows for k in LOSS_TERMS)
    card = (export / "README.md").read_text()
    assert "| config.symmetric_views | True: " in card and "symmetric (our option" in card
    assert "| config.scale_dot_products | True: " in card
    (model,) = built
    assert model.config.scale_dot_products and model.config.symmetric_views
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert "SyncBatchNorm (--sync-bn)" in card and "one process, statistics over its own 4 views, as BatchNorm" in card
    assert "| config.box_head_dim | 128: " in card  # TINY's --predet-config still applies
    assert json.loads((export.parent / "args.json").read_text())["sync_bn"] is True
    heads = safetensors.torch.load_file(export / "heads.safetensors")
    assert heads.keys() == {k for k in model.state_dict() if not k.startswith("fpn.")}


def test_batch_norm_record_says_what_bn_normalizes_and_refuses_syncbn_off_gpu():
    def record(*flags, world_size=8, device="cuda"):
        args = train_predet.get_args_parser().parse_args(["--batch-size", "16", *flags])
        dist_info = engine.DistInfo(
            rank=0,
            world_size=world_size,
            local_rank=0,
            device=torch.device(device),
            is_main=True,
            distributed=world_size > 1,
        )
        return train_predet.batch_norm_record(args, dist_info)

    assert "each of 8 processes normalizes its own 16 views (both views of 8 images)" in record()
    accumulated = record("--accum-steps", "4")
    assert "16 views (both views of 8 images) per micro-step (--accum-steps 4 does not enlarge it)" in accumulated
    assert "8 processes, statistics over the 128 views" in record("--sync-bn")
    with pytest.raises(SystemExit, match="--sync-bn with 2 processes on cpu: .*drop --sync-bn"):
        record("--sync-bn", world_size=2, device="cpu")


def test_two_gloo_processes(tmp_path, coco128, coco128_proposals):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(REPO_ROOT / "train_predet.py"),
        *TINY,
        *coco128_flags(coco128),
        *["--proposals", str(coco128_proposals), "--output-dir", str(out)],
        *["--iters", "3", "--warmup-iters", "1", "--batch-size", "4", "--log-every", "1"],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(LOSS_TERMS <= r.keys() for r in rows)
    # Each process holds 2 images (4 views); the step's global batch is 8 views.
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["batch_size"] == 4 and recorded["dist_timeout"] == engine.DEFAULT_DIST_TIMEOUT_MINUTES == 60
    assert "each of 2 processes normalizes its own 4 views" in (out / "export" / "README.md").read_text()
    timm.create_model(
        "test_resnet",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(out / "export" / "model.safetensors")),
    )


# --------------------------------------------------------------------------------------------------- bad input
def test_missing_opencv_says_how_to_install(tmp_path, monkeypatch, coco128):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(SystemExit, match=r"pip install.*detpretrain\[proposals\]"):
        run(tmp_path, *coco128_flags(coco128), "--iters", "2", "--warmup-iters", "1")


def test_images_without_labels_are_skipped_and_counted_by_default(coco128):
    """Issue 12 item 3: a COCO json's images without annotations are left out and counted, not a bad row."""
    ann = str(coco128 / "annotations/instances_train2017.json")
    args = train_predet.get_args_parser().parse_args(["--train-images", str(coco128 / "images"), "--train-ann", ann])
    images = train_predet.read_labelled_images(args)
    assert len(images) == 126 and images.skipped == {"image without labels": 2}


@pytest.fixture()
def labelled_folder_with_a_corrupt_image(tmp_path, coco128):
    """Six coco128 photos with hand-written labels (a .jsonl file) and one truncated JPEG."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i, photo in enumerate(sorted((coco128 / "images").glob("*.jpg"))[:6]):
        shutil.copy(photo, folder / photo.name)
        rows.append({"file": photo.name, "labels": ["animal" if i % 2 else "vehicle"]})
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(photo.read_bytes()[:300])
    rows.append({"file": corrupt.name, "labels": ["animal"]})
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder, labels, corrupt


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, labelled_folder_with_a_corrupt_image, capsys):
    """The EdgeBoxes pass decodes every image: the corrupt one is named with its reason, or left out and counted."""
    folder, labels, corrupt = labelled_folder_with_a_corrupt_image
    data = ["--train-images", str(folder), "--train-ann", str(labels), "--iters", "2", "--warmup-iters", "1"]
    with pytest.raises(SystemExit, match="undecodable image .*--skip-bad-rows") as error:
        run(tmp_path, *data, name="fails")
    assert str(corrupt) in str(error.value)
    # The cache was kept: the second run reuses it and trains on the six good photos.
    export = run(tmp_path, *data, "--skip-bad-rows", "--batch-size", "4", name="fails")
    out = capsys.readouterr().out
    assert "7 images, 2 classes" in out and "skipped 1 bad images: {'undecodable image': 1}" in out
    assert "skipped 1 bad images" in (export / "README.md").read_text()
    report = (export.parent / "proposals.edgeboxes" / "skipped.jsonl").read_text()
    assert json.loads(report) == {"shard": 0, "row": 6, "image": "corrupt.jpg", "reason": "undecodable image"}


def test_classification_alone_checks_that_files_exist(tmp_path, labelled_folder_with_a_corrupt_image):
    """No EdgeBoxes pass with --losses cls: a missing file is found by the existence check before training, a
    corrupt one by --verify-images."""
    folder, labels, corrupt = labelled_folder_with_a_corrupt_image
    data = ["--train-images", str(folder), "--train-ann", str(labels), "--losses", "cls", "--iters", "2"]
    data += ["--warmup-iters", "1", "--batch-size", "4"]
    with pytest.raises(SystemExit, match="undecodable image .*--skip-bad-rows"):
        run(tmp_path, *data, "--verify-images", name="verify")
    corrupt.unlink()
    with pytest.raises(SystemExit, match=f"{corrupt}: missing file"):
        run(tmp_path, *data, name="missing")
    run(tmp_path, *data, "--skip-bad-rows", name="skips")


def test_a_cache_built_with_other_settings_is_used_as_it_is(tmp_path, labelled_folder_with_a_corrupt_image, capsys):
    """Settings travel with the cache: no flag is needed to use one built with non-default settings, and only a flag
    that contradicts it is refused, naming the field."""
    folder, labels, corrupt = labelled_folder_with_a_corrupt_image
    corrupt.unlink()
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines() if corrupt.name not in line))
    cache = tmp_path / "custom.edgeboxes"
    data = ["--train-images", str(folder), "--train-ann", str(labels)]
    proposals.main([*data, "--output", str(cache), "--num-workers", "0", "--edge-max-boxes", "50"])
    assert json.loads(capsys.readouterr().out)["shards_computed"] == 1
    proposals.main([*data, "--output", str(cache), "--num-workers", "0", "--edge-alpha", "0.5"])  # agrees: kept
    report = json.loads(capsys.readouterr().out)
    assert (report["shards_kept"], report["shards_computed"], report["settings"]["max_boxes"]) == (1, 0, 50)
    flags = [*data, "--proposals", str(cache), "--iters", "2", "--warmup-iters", "1", "--batch-size", "4"]
    export = run(tmp_path, *flags, name="used")
    assert '"max_boxes": 50' in (export / "README.md").read_text()
    with pytest.raises(SystemExit, match=r"computed with max_boxes=50, but --edge-max-boxes 100 was passed"):
        run(tmp_path, *flags, "--edge-max-boxes", "100", name="refused")


def test_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="even"):
        run(tmp_path, "--batch-size", "5", "--iters", "2", "--warmup-iters", "1")
    with pytest.raises(SystemExit, match="--losses"):
        run(tmp_path, "--losses", "cls,boxes", "--iters", "2", "--warmup-iters", "1")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        run(tmp_path, "--predet-config", "temprature=0.1", "--iters", "2", "--warmup-iters", "1")


def test_lr_drops_at_four_uniform_steps():
    args = train_predet.get_args_parser().parse_args([])
    assert (args.iters, args.lr, args.warmup_iters) == (540_000, 0.2, 1000)
    assert train_predet.lr_milestones(args) == [108_000, 216_000, 324_000, 432_000]  # §4.1
    assert train_predet.PAPER_GLOBAL_BATCH == 1024


def test_norm_layers_get_no_weight_decay():
    model = train_predet.create_predet("test_resnet", num_classes=3, losses=("cls",))
    groups = train_predet.param_groups(model, weight_decay=1e-4, norm_weight_decay=0.0)
    norm = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in groups[0]["params"]} == norm and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
