"""Bad and unusual COCO-format input, made from real coco128 photos, through each script as a user's data reaches it
(issue 13): an image that cannot be used is skipped, counted and named, and the run goes on (deterministically, so
--resume auto stays exact) up to --max-bad-image-fraction; a dataset with nothing to learn is refused before any
work; every input error is one line on stderr and a non-zero exit, also from a DataLoader worker; each message names
the real fault (an image id listed twice)."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import finetune
import train_jigsaw
import train_predet
from detpretrain import engine
from detpretrain.data.coco import CocoDataset
from detpretrain.data.detection import BadImageError, DatasetError, GroupedBatchSampler, uniform_epoch_order
from detpretrain.data.labelled_images import from_coco
from tests.conftest import REPO_ROOT
from tests.test_finetune import CHEAP_RCNN
from tests.test_finetune import TINY as FINETUNE_TINY

NUM_IMAGES = 6  # coco128 photos in a small training set (all with non-crowd boxes)
DAMAGE = {
    "truncated": lambda path, image: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "not_an_image": lambda path, image: path.write_text("this is not an image"),
    "empty": lambda path, image: path.write_bytes(b""),
    "wrong_size": lambda path, image: image.update(width=image["width"] + 16),  # the json says 16 px wider
}
REASONS = {
    "truncated": "undecodable: image file is truncated",
    "not_an_image": "undecodable: cannot identify image file",
    "empty": "empty file (0 bytes)",
    "wrong_size": "size mismatch: the file is",
}


def make_coco(coco128, root, *, num_images=NUM_IMAGES, damage=None, edit=None):
    """A COCO-format training set of the first ``num_images`` coco128 photos with non-crowd boxes, copied under
    ``root``; ``damage`` {position: kind} damages the copies (DAMAGE), ``edit(data)`` changes the json. Returns (image
    folder, json)."""
    data = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    usable = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    images = [dict(i) for i in sorted(data["images"], key=lambda i: i["file_name"]) if i["id"] in usable][:num_images]
    ids = {i["id"] for i in images}
    data = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    (root / "images").mkdir(parents=True)
    for image in images:
        shutil.copy(coco128 / "images" / image["file_name"], root / "images")
    for position, kind in (damage or {}).items():
        DAMAGE[kind](root / "images" / images[position]["file_name"], images[position])
    if edit is not None:
        edit(data)
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return root / "images", ann_file


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in ("samples_per_s", "elapsed_s")} for row in rows]


def one_line_exit(script, flags) -> str:
    """Run ``script`` as its ``__main__`` does; it must exit non-zero with one line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        engine.run_main(script.main, script.get_args_parser().parse_args(flags))
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ the engine


class Images(torch.utils.data.Dataset):
    """Index i is "image i"; the ones in ``bad`` raise BadSampleError as an undecodable file does."""

    def __init__(self, size, bad):
        self.size, self.bad = size, set(bad)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if index in self.bad:
            raise engine.BadSampleError(f"image {index} is bad", name=f"img{index}", reason="undecodable")
        return torch.tensor(index)


def tag_with_draw(index, *, generator):
    return torch.stack([index, torch.randint(1000, (), generator=generator)])


def test_a_bad_sample_is_replaced_by_a_pure_function_of_its_key():
    dataset = engine.StepSeededDataset(Images(10, bad={3, 4}), transform=tag_with_draw, seed=0)
    clean = engine.StepSeededDataset(Images(10, bad=()), transform=tag_with_draw, seed=0)
    assert torch.equal(dataset[engine.SampleKey(5, 2)], clean[engine.SampleKey(5, 2)])  # good samples: unchanged
    replaced = dataset[engine.SampleKey(5, 3)]
    assert isinstance(replaced, engine.SampleWithSkipped) and replaced.skipped[0] == ("img3", "undecodable")
    assert int(replaced.sample[0]) not in (3, 4)
    # The same key gives the same replacement, augmented with the key's own generator; another step another one.
    again = engine.StepSeededDataset(Images(10, bad={3, 4}), transform=tag_with_draw, seed=0)[engine.SampleKey(5, 3)]
    assert torch.equal(again.sample, replaced.sample) and again.skipped == replaced.skipped
    assert int(replaced.sample[1]) == int(clean[engine.SampleKey(5, 3)][1])
    others = {int(dataset[engine.SampleKey(step, 3)].sample[0]) for step in range(20)}
    assert len(others) > 1 and not others & {3, 4}
    with pytest.raises(engine.TooManyBadSamplesError, match="in a row cannot be used"):
        engine.StepSeededDataset(Images(4, bad=range(4)), transform=tag_with_draw, seed=0)[engine.SampleKey(0, 1)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_workers_report_skipped_samples_with_their_batch(num_workers):
    dataset = engine.StepSeededDataset(Images(8, bad={2, 6}), transform=tag_with_draw, seed=1)
    sampler = engine.StepBatchSampler(dataset_size=8, batch_size=4, seed=1, start_step=0, total_steps=4)
    loader = engine.make_loader(dataset, batch_sampler=sampler, num_workers=num_workers, seed=1)
    for step, batch in enumerate(loader):
        assert batch.shape == (4, 2) and not set(batch[:, 0].tolist()) & {2, 6}
        met = loader.take_skipped()
        drawn_bad = {f"img{k.index}" for k in list(sampler)[step] if k.index in (2, 6)}
        # Each bad key is named first; a probe that lands on a bad image again is named too.
        assert drawn_bad <= {name for name, _ in met} <= {"img2", "img6"} and bool(met) == bool(drawn_bad)
        assert all(reason == "undecodable" for _, reason in met)


def test_tracker_counts_distinct_images_logs_them_once_and_stops_past_the_limit(tmp_path, capsys):
    single = engine.DistInfo(0, 1, 0, torch.device("cpu"), True, False)
    tracker = engine.BadSampleTracker(dataset_size=100, max_fraction=0.02, dist_info=single, source="train.json")
    with engine.TrainLogger(
        output_dir=tmp_path,
        total_steps=4,
        start_step=0,
        samples_per_step=2,
        log_every=2,
        is_main=True,
        quiet=True,
        bad_samples=tracker,
    ) as logger:
        for step, skipped in enumerate([[("a.jpg", "empty file (0 bytes)")], [("a.jpg", "empty file (0 bytes)")]]):
            tracker.update([engine.SkippedSample(*s) for s in skipped], step=step)
            logger.log(step, lr=0.1, stats={"loss": 1.0})
        state = tracker.state_dict()
        tracker.update([engine.SkippedSample("b.jpg", "size mismatch")], step=2)
        logger.log(2, lr=0.1, stats={"loss": 1.0})
        with pytest.raises(engine.TooManyBadSamplesError, match=r"3 of the 100 images of train.json .* a.jpg"):
            tracker.update([engine.SkippedSample("c.jpg", "undecodable")], step=3)
    rows = read_jsonl(tmp_path / "log.jsonl")
    assert rows[0]["bad_images"] == 1 and rows[0]["new_bad_images"] == [
        {"file": "a.jpg", "reason": "empty file (0 bytes)"}
    ]
    assert "step 0: skipped bad image a.jpg (empty file (0 bytes))" in capsys.readouterr().err
    restored = engine.BadSampleTracker(dataset_size=100, max_fraction=0.02, dist_info=single)
    restored.load_state_dict(state)
    assert restored.summary()["images"] == [{"file": "a.jpg", "reason": "empty file (0 bytes)"}]


def test_an_input_error_from_a_loader_worker_keeps_its_one_line_message():
    dataset = engine.StepSeededDataset(Images(2, bad={0, 1}), transform=tag_with_draw, seed=0)
    sampler = engine.StepBatchSampler(dataset_size=2, batch_size=1, seed=0, start_step=0, total_steps=1)
    loader = engine.make_loader(dataset, batch_sampler=sampler, num_workers=1, seed=0)
    with pytest.raises(engine.TooManyBadSamplesError) as error:
        next(iter(loader))
    assert "Original Traceback" in str(error.value)  # how the DataLoader re-raises it
    message = engine.input_error_message(error.value)
    assert message.startswith("65 samples in a row cannot be used (e.g. img") and "\n" not in message

    def fails(args):
        raise error.value

    with pytest.raises(SystemExit, match=r"^65 samples in a row cannot be used"):
        engine.run_main(fails, None)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        engine.run_main(lambda args: 1 / 0, None)


# ------------------------------------------------------------------------------------------- dataset checks


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_load_image_names_the_file_and_the_reason(coco128, tmp_path, kind):
    image_dir, ann_file = make_coco(coco128, tmp_path, num_images=2, damage={0: kind})
    dataset = CocoDataset(ann_file, image_dir)
    with pytest.raises(BadImageError) as error:
        dataset[0]
    assert error.value.name == dataset.entry(0).path and error.value.reason.startswith(REASONS[kind])
    assert isinstance(error.value, engine.BadSampleError) and isinstance(error.value, DatasetError)
    dataset[1]


def all_crowd(data):
    for ann in data["annotations"]:
        ann["iscrowd"] = 1


def no_annotations(data):
    data["annotations"] = []


def duplicate_id(data):
    data["images"][3]["id"] = data["images"][1]["id"]


def test_duplicate_image_ids_are_named_by_both_coco_readers(coco128, tmp_path):
    image_dir, ann_file = make_coco(coco128, tmp_path, edit=duplicate_id)
    image_id = json.loads(ann_file.read_text())["images"][1]["id"]
    expected = f"image id {image_id} is listed twice (images[1] and images[3]) in {ann_file}"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        CocoDataset(ann_file, image_dir)
    with pytest.raises(ValueError, match=re.escape(expected)):
        from_coco(ann_file, image_dir)


# --------------------------------------------------------------------------------------------------- finetune


def finetune_flags(image_dir, ann_file, val, output_dir, *extra):
    data = ["--train-images", str(image_dir), "--train-ann", str(ann_file)]
    data += ["--val-images", str(val[0]), "--val-ann", str(val[1]), "--val-subset", "2"]
    model = ["--no-pretrained", "--arch", "fasterrcnn", *CHEAP_RCNN, "--output-dir", str(output_dir)]
    return [*FINETUNE_TINY, *data, *model, *extra]


def run_finetune(*flags):
    return finetune.main(finetune.get_args_parser().parse_args(list(flags)))


def first_step_met(ann_file, image_dir, position, *, iters):
    """The first step at which finetune.py's sampler (2 images a step, grouped by aspect ratio) draws the image at
    ``position`` of the json."""
    train = CocoDataset(ann_file, image_dir)
    sampler = GroupedBatchSampler(
        epoch_order=functools.partial(uniform_epoch_order, len(train), seed=0),
        groups=train.aspect_ratio_groups(),
        batch_size=2,
        seed=0,
        start_step=0,
        total_steps=iters,
    )
    return next((s for s in range(iters) if position in sampler.global_batch_indices(s)), None)


@pytest.fixture(scope="module")
def clean_coco(coco128, tmp_path_factory):
    return make_coco(coco128, tmp_path_factory.mktemp("clean"))


@pytest.mark.parametrize("kind", ["truncated", "wrong_size"])
def test_finetune_skips_a_bad_image_met_at_the_first_step_in_a_worker(coco128, clean_coco, tmp_path, kind):
    probe_dir, probe_ann = make_coco(coco128, tmp_path / "probe")
    position = next(p for p in range(NUM_IMAGES) if first_step_met(probe_ann, probe_dir, p, iters=2) == 0)
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", damage={position: kind})
    name = str(image_dir / json.loads(ann_file.read_text())["images"][position]["file_name"])
    flags = ["--iters", "2", "--num-workers", "1", "--max-bad-image-fraction", "0.5"]
    eval_path = run_finetune(*finetune_flags(image_dir, ann_file, clean_coco, tmp_path / "run", *flags))
    rows = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert rows[0]["bad_images"] == 1 and rows[0]["new_bad_images"][0]["file"] == name
    assert rows[0]["new_bad_images"][0]["reason"].startswith(REASONS[kind])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    bad = json.loads(eval_path.read_text())["train"]["bad_images"]
    assert bad["count"] == 1 and bad["images"][0]["file"] == name and bad["max_fraction"] == 0.5
    assert json.loads((tmp_path / "run" / "args.json").read_text())["max_bad_image_fraction"] == 0.5


def test_finetune_meets_a_bad_image_mid_run_and_resumes_exactly(coco128, clean_coco, tmp_path, monkeypatch):
    probe_dir, probe_ann = make_coco(coco128, tmp_path / "probe")
    position = next(p for p in range(NUM_IMAGES) if first_step_met(probe_ann, probe_dir, p, iters=4) in (2, 3))
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", damage={position: "not_an_image"})
    flags = ["--iters", "4", "--save-every", "2", "--max-bad-image-fraction", "0.5"]
    reference = run_finetune(*finetune_flags(image_dir, ann_file, clean_coco, tmp_path / "a", *flags)).parent
    rows = read_jsonl(reference / "log.jsonl")
    met = first_step_met(ann_file, image_dir, position, iters=4)
    assert [r["bad_images"] for r in rows] == [int(r["step"] >= met) for r in rows]
    assert [bool(r.get("new_bad_images")) for r in rows] == [r["step"] == met for r in rows]

    real_train_step = engine.train_step

    def killed_at_step_3(**kwargs):
        if kwargs["step"] == 3:
            raise KeyboardInterrupt
        return real_train_step(**kwargs)

    monkeypatch.setattr(engine, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(*finetune_flags(image_dir, ann_file, clean_coco, tmp_path / "b", *flags))
    monkeypatch.setattr(engine, "train_step", real_train_step)
    run_finetune(*finetune_flags(image_dir, ann_file, clean_coco, tmp_path / "b", *flags, "--resume", "auto"))

    assert without_timing(read_jsonl(tmp_path / "b" / "log.jsonl")) == without_timing(rows)
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (reference, tmp_path / "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["bad_images"] == b["bad_images"]
    summaries = [json.loads((d / "eval.json").read_text())["train"]["bad_images"] for d in (reference, tmp_path / "b")]
    assert summaries[0] == summaries[1] and summaries[0]["count"] == 1


def test_finetune_stops_with_one_line_past_the_bad_image_limit(coco128, clean_coco, tmp_path):
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", damage={k: "empty" for k in range(NUM_IMAGES - 1)})
    flags = finetune_flags(image_dir, ann_file, clean_coco, tmp_path / "run", "--iters", "3")
    message = one_line_exit(finetune, flags)
    assert f"of the {NUM_IMAGES} images of {ann_file}" in message and "above --max-bad-image-fraction 0.01" in message
    assert "empty file (0 bytes)" in message


@pytest.mark.parametrize(
    ("edit", "extra", "expected"),
    [
        (
            all_crowd,
            [],
            r"\(training set\) has no box to train on after cleaning: \d+ annotations on 6 images, of "
            r"which \d+ crowd, 0 dropped \{\}; 6 images without a usable box",
        ),
        (no_annotations, [], r"has no box to train on after cleaning: 0 annotations on 6 images, of which 0 crowd"),
        (no_annotations, ["--no-filter-empty-images"], r"\(training set\) has no box to train on"),
        (duplicate_id, [], r"image id \d+ is listed twice \(images\[1\] and images\[3\]\) in "),
    ],
)
def test_finetune_refuses_data_without_boxes_in_one_line(coco128, clean_coco, tmp_path, edit, extra, expected):
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", edit=edit)
    message = one_line_exit(finetune, finetune_flags(image_dir, ann_file, clean_coco, tmp_path / "run", *extra))
    assert str(ann_file) in message
    assert re.search(expected, message), message
    assert not (tmp_path / "run" / "log.jsonl").exists()  # refused before any training


def test_finetune_refuses_an_evaluation_set_without_ground_truth(coco128, clean_coco, tmp_path):
    image_dir, val_ann = make_coco(coco128, tmp_path / "val", edit=all_crowd)
    message = one_line_exit(finetune, finetune_flags(*clean_coco, (image_dir, val_ann), tmp_path / "run"))
    assert f"{val_ann}, {image_dir} (evaluation set) has no ground-truth box to score against" in message


# ----------------------------------------------------------------------------------------------------- Jigsaw


def jigsaw_flags(image_dir, ann_file, output_dir, *extra):
    flags = ["--train-images", str(image_dir), "--train-ann", str(ann_file), "--output-dir", str(output_dir)]
    flags += ["--model", "test_resnet", "--template", "tiny96", "--device", "cpu", "--num-workers", "0", "--quiet"]
    flags += ["--iters", "2", "--warmup-iters", "1", "--batch-size", "4", "--erf-images", "1", "--extract-workers"]
    return [*flags, "2", *extra]


def test_jigsaw_skips_bad_images_in_extraction_workers_and_names_them_in_the_card(coco128, tmp_path):
    kinds = dict(enumerate(DAMAGE))
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", num_images=12, damage=kinds)
    flags = jigsaw_flags(image_dir, ann_file, tmp_path / "run", "--max-bad-image-fraction", "0.5")
    export = train_jigsaw.main(train_jigsaw.get_args_parser().parse_args(flags))
    card = (export / "README.md").read_text()
    assert "4 of 12 source images skipped (limit --max-bad-image-fraction 0.5)" in card
    for position in kinds:
        assert str(image_dir / json.loads(ann_file.read_text())["images"][position]["file_name"]) in card


def test_jigsaw_stops_with_one_line_past_the_bad_image_limit(coco128, tmp_path):
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", num_images=12, damage={0: "truncated"})
    message = one_line_exit(train_jigsaw, jigsaw_flags(image_dir, ann_file, tmp_path / "run"))
    assert message.startswith("1 of the 12 images cannot be used")
    assert "above --max-bad-image-fraction 0.01" in message and "skipped.jsonl" in message
    # Raising the limit reuses the extracted samples and trains.
    flags = jigsaw_flags(image_dir, ann_file, tmp_path / "run", "--max-bad-image-fraction", "0.2")
    assert (train_jigsaw.main(train_jigsaw.get_args_parser().parse_args(flags)) / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (all_crowd, r"\(training set\) has no box to train on after cleaning: \d+ annotations on 6 images, of which"),
        (no_annotations, r"has no box to train on after cleaning: 0 annotations on 6 images"),
        (duplicate_id, r"image id \d+ is listed twice \(images\[1\] and images\[3\]\)"),
    ],
)
def test_jigsaw_refuses_data_without_boxes_in_one_line(coco128, tmp_path, edit, expected):
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", edit=edit)
    message = one_line_exit(train_jigsaw, jigsaw_flags(image_dir, ann_file, tmp_path / "run"))
    assert str(ann_file) in message and re.search(expected, message), message


def test_jigsaw_min_sample_size_that_leaves_no_positive_is_one_line(coco128, tmp_path):
    image_dir, ann_file = make_coco(coco128, tmp_path / "data")
    flags = jigsaw_flags(image_dir, ann_file, tmp_path / "run", "--min-sample-size", "100000")
    message = one_line_exit(train_jigsaw, flags)
    assert message.startswith("no positive samples in 6 images") and "--min-sample-size" in message


# ----------------------------------------------------------------------------------------------------- PreDet


PREDET_TINY = [
    *["--model", "test_resnet", "--view-size", "96", "--device", "cpu", "--quiet", "--batch-size", "4"],
    *["--proposal-workers", "1", "--fpn-channels", "32", "--predet-config", "box_head_dim=128"],
    *["croi_negatives_per_image=64", "crpn_pre_nms_topk=300", "crpn_post_nms_topk=200"],
    *["--iters", "3", "--warmup-iters", "1", "--save-every", "1", "--log-every", "1"],
]


def run_predet(*flags):
    return train_predet.main(train_predet.get_args_parser().parse_args([*PREDET_TINY, *flags]))


def test_predet_skips_an_image_that_goes_bad_during_training_and_resumes_exactly(coco128, tmp_path, monkeypatch):
    """--losses cls checks only that files exist: a truncated file is met in training, skipped and counted."""
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", damage={2: "truncated"})
    data = ["--train-images", str(image_dir), "--train-ann", str(ann_file), "--losses", "cls", "--num-workers", "1"]
    data += ["--max-bad-image-fraction", "0.5"]
    export = run_predet(*data, "--output-dir", str(tmp_path / "a"))
    rows = read_jsonl(tmp_path / "a" / "log.jsonl")
    name = str(image_dir / json.loads(ann_file.read_text())["images"][2]["file_name"])
    assert rows[-1]["bad_images"] == 1 and [b["file"] for r in rows for b in r.get("new_bad_images", [])] == [name]
    assert name in (export / "README.md").read_text()

    real_train_step = engine.train_step
    monkeypatch.setattr(
        engine,
        "train_step",
        lambda **kw: (_ for _ in ()).throw(KeyboardInterrupt) if kw["step"] == 2 else real_train_step(**kw),
    )
    with pytest.raises(KeyboardInterrupt):
        run_predet(*data, "--output-dir", str(tmp_path / "b"))
    monkeypatch.setattr(engine, "train_step", real_train_step)
    run_predet(*data, "--output-dir", str(tmp_path / "b"), "--resume", "auto")
    assert without_timing(read_jsonl(tmp_path / "b" / "log.jsonl")) == without_timing(rows)
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_predet_skips_an_image_changed_after_the_edgeboxes_cache_was_built(coco128, tmp_path):
    pytest.importorskip("cv2")
    import cv2

    if not hasattr(cv2, "ximgproc"):
        pytest.skip("EdgeBoxes needs opencv-contrib-python-headless (cv2.ximgproc)")
    image_dir, ann_file = make_coco(coco128, tmp_path / "data")
    data = ["--train-images", str(image_dir), "--train-ann", str(ann_file), "--num-workers", "0"]
    data += ["--proposals", str(tmp_path / "cache")]  # 3 steps of 2 images: every image is met
    run_predet(*data, "--iters", "2", "--output-dir", str(tmp_path / "first"))  # builds the cache
    name = json.loads(ann_file.read_text())["images"][4]["file_name"]
    with Image.open(image_dir / name) as picture:  # replaced by a smaller copy: it contradicts the cache now
        picture.resize((picture.width // 2, picture.height // 2)).save(image_dir / name)
    message = one_line_exit(train_predet, [*PREDET_TINY, *data, "--output-dir", str(tmp_path / "second")])
    assert message.startswith(f"1 of the {NUM_IMAGES} images of {ann_file} cannot be used (16.67%, above ")
    assert f"{name}: size mismatch: the file is" in message and "the proposal cache recorded" in message
    run_predet(*data, "--max-bad-image-fraction", "0.2", "--output-dir", str(tmp_path / "second"))
    assert read_jsonl(tmp_path / "second" / "log.jsonl")[-1]["bad_images"] == 1


def test_two_gloo_processes_gather_bad_images_and_stop_together_with_one_line(coco128, clean_coco, tmp_path):
    """Both ranks see the same bad images (gathered at each step) and stop at the same step: one line each, non-zero
    exit, no traceback, no rank left waiting."""
    image_dir, ann_file = make_coco(coco128, tmp_path / "data", damage={k: "truncated" for k in range(NUM_IMAGES - 2)})
    flags = finetune_flags(image_dir, ann_file, clean_coco, tmp_path / "run", "--iters", "3", "--batch-size", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += [str(REPO_ROOT / "finetune.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # the two ranks write to one stderr: their lines may interleave, so each rank's message is found, not each line
    ranks = re.findall(r"rank ([01]): \d+ of the \d+ images .*? above --max-bad-image-fraction 0\.01", result.stderr)
    assert set(ranks) == {"0", "1"}, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("above --max-bad-image-fraction")[0], result.stderr[-3000:]
