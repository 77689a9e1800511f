"""Jigsaw sample extraction (§3.1): records, planning the samples, the sample directory and how samples are stored.

Runs on the real coco128 photos (../shared/data/coco128) and on hand-built records.
"""

import dataclasses
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision.ops import box_iou

from detpretrain.jigsaw import (
    GROUPS,
    SAMPLE_FORMAT_VERSION,
    ImageRecord,
    JigsawSamples,
    SampleDirError,
    coco_image_records,
    encode_sample,
    extract_samples,
    plan_negative_samples,
    plan_positive_samples,
    plan_samples,
    seeded_generator,
)

# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(coco128):
    return coco_image_records(coco128 / "annotations" / "instances_train2017.json", coco128 / "images")


@pytest.fixture(scope="module")
def plan(coco):
    return plan_samples(coco.records, seed=0)


@pytest.fixture(scope="module")
def sample_dir(coco, tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "coco128.jigsaw"
    stats = extract_samples(
        coco.records,
        class_names=coco.class_names,
        category_ids=coco.category_ids,
        cleaning_report=coco.cleaning_report,
        output_dir=path,
        shard_size=32,
    )
    return path, stats


def make_record(boxes, *, crowd=None, labels=None, width=200, height=100, image_id=1, file_name="synthetic.jpg"):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return ImageRecord(
        image_id=image_id,
        file_name=file_name,
        width=width,
        height=height,
        gt_boxes=boxes,
        gt_labels=torch.tensor(labels or [1] * len(boxes), dtype=torch.int64),
        gt_crowd=torch.tensor(crowd or [False] * len(boxes), dtype=torch.bool),
    )


def write_coco(tmp_path, *, bbox, category_id=1, size=(64, 48)):
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": size[0], "height": size[1]}],
        "annotations": [{"id": 3, "image_id": 7, "category_id": category_id, "bbox": bbox, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    Image.new("RGB", size).save(tmp_path / "a.jpg")  # the reader checks that every image file exists
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------------------------
# §3.1 records
# ---------------------------------------------------------------------------------------------------------------


def test_coco_records_read_the_real_annotations(coco, coco128):
    assert len(coco.records) == 128
    assert sum(len(r.gt_boxes) for r in coco.records) == 939
    assert sum(int(r.gt_crowd.sum()) for r in coco.records) == 10
    assert coco.class_names[0] == "background" and len(coco.class_names) == 81
    assert coco.category_ids[:3] == [1, 2, 3] and coco.category_ids[-1] == 90
    assert coco.cleaning_report["kept"] == 939 and coco.cleaning_report["crowd_excluded"] == 0
    data = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    ann = next(a for a in data["annotations"] if a["image_id"] == 9)
    record = next(r for r in coco.records if r.image_id == 9)
    x, y, w, h = ann["bbox"]
    torch.testing.assert_close(record.gt_boxes[0], torch.tensor([x, y, x + w, y + h], dtype=torch.float32))
    assert coco.class_names[int(record.gt_labels[0])] == next(
        c["name"] for c in data["categories"] if c["id"] == ann["category_id"]
    )
    assert record.file_name.endswith("images/000000000009.jpg")


@pytest.mark.parametrize(
    ("bbox", "kept", "counted"),
    [
        ([10, 10, 54.5, 20], [[10.0, 10.0, 64.0, 30.0]], "clipped_to_image"),  # rounding overshoot
        ([10, 10, 60, 20], [[10.0, 10.0, 64.0, 30.0]], "clipped_to_image"),  # far out, but overlapping the image
        ([70, 10, 5, 5], [], "dropped_outside_image"),  # nothing of it inside the 64x48 image
        ([10, 10, 0, 5], [], "dropped_nonpositive_size"),
    ],
)
def test_coco_reader_cleans_boxes_as_the_coco_dataset_does(tmp_path, bbox, kept, counted):
    # One policy with CocoDataset (detpretrain.data.coco): clip what overlaps the image, drop the rest, count both.
    if not kept:  # nothing left to cut a positive from: refused, with the count that led there (issue 13)
        with pytest.raises(ValueError, match=rf"has no box to train on after cleaning: .* 1 dropped .*{counted}"):
            coco_image_records(write_coco(tmp_path, bbox=bbox), tmp_path)
        return
    coco = coco_image_records(write_coco(tmp_path, bbox=bbox), tmp_path)
    (record,) = coco.records
    assert record.gt_boxes.tolist() == kept and record.gt_labels.tolist() == [1] * len(kept)
    report = coco.cleaning_report
    assert report[counted] == 1 and report["annotations"] == 1 and report["kept"] == len(kept)
    others = {"clipped_to_image", "dropped_outside_image", "dropped_nonpositive_size"} - {counted}
    assert all(report[key] == 0 for key in others)
    assert report["images_without_annotations"] == (not kept)


def test_coco_reader_keeps_crowd_regions_flagged(tmp_path):
    path = write_coco(tmp_path, bbox=[1, 1, 5, 5])
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 4, "image_id": 7, "category_id": 1, "bbox": [20, 20, 10, 10], "iscrowd": 1})
    path.write_text(json.dumps(data))
    coco = coco_image_records(path, tmp_path)
    assert coco.records[0].gt_crowd.tolist() == [False, True]
    assert coco.cleaning_report["crowd_excluded"] == 0 and coco.cleaning_report["kept"] == 2


def test_coco_reader_rejects_an_unknown_category(tmp_path):
    with pytest.raises(ValueError, match=r"ann\.json: annotation 3 has category_id 5, which 'categories' does not"):
        coco_image_records(write_coco(tmp_path, bbox=[1, 1, 5, 5], category_id=5), tmp_path)


def test_image_record_rejects_a_box_outside_the_image():
    with pytest.raises(ValueError, match=r"synthetic\.jpg: box \[150\.0, 10\.0, 201\.0, 20\.0\] .* 200x100 image"):
        make_record([[150, 10, 201, 20]])


# ---------------------------------------------------------------------------------------------------------------
# §3.1 planning: positives, negatives, the 10:1 ratio
# ---------------------------------------------------------------------------------------------------------------


def test_positives_contain_their_box_and_lie_inside_the_image(coco, plan):
    positive = plan.labels > 0
    boxes, gt = plan.boxes[positive].double(), plan.gt_boxes[positive].double()
    assert (boxes[:, :2] <= gt[:, :2]).all() and (boxes[:, 2:] >= gt[:, 2:]).all()
    sizes = torch.tensor([[coco.records[i].width, coco.records[i].height] for i in plan.image_index[positive]])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= sizes).all()
    # Up to 2x the width and height (plus the outward rounding of each edge), and really enlarged at random.
    box_size, gt_size = boxes[:, 2:] - boxes[:, :2], gt[:, 2:] - gt[:, :2]
    assert (box_size <= 2 * gt_size + 2).all()
    growth = box_size / gt_size.clamp_min(1)
    assert growth.min() < 1.2 and growth.max() > 1.8
    assert (box_size >= 8).all()


def test_crowd_boxes_never_become_positives_and_small_ones_are_counted(coco, plan):
    for record in coco.records:
        _, gt_index, _ = plan_positive_samples(record, generator=seeded_generator(0, record.image_id, 0))
        assert not record.gt_crowd[gt_index].any()
    non_crowd = plan.stats["num_gt_boxes"] - plan.stats["num_crowd_boxes"]
    assert plan.stats["num_positives"] + plan.stats["num_dropped_too_small"] == non_crowd
    assert plan.stats["num_dropped_too_small"] > 0  # coco128 has boxes of 1-2 px
    record = make_record([[10, 10, 12, 13], [20, 20, 90, 80], [100, 10, 180, 90]], crowd=[False, False, True])
    boxes, gt_index, dropped = plan_positive_samples(record, generator=torch.Generator().manual_seed(0))
    assert gt_index.tolist() == [1] and dropped == 1


def test_negatives_have_zero_iou_with_every_positive_and_every_box(coco, plan):
    negative = (plan.labels == 0).nonzero().flatten()
    assert len(negative) > 0
    assert plan.gt_boxes[negative].isnan().all()
    for k in negative.tolist():
        i = int(plan.image_index[k])
        record, box = coco.records[i], plan.boxes[k : k + 1].double()
        positives = plan.boxes[(plan.image_index == i) & (plan.labels > 0)].double()
        assert (box_iou(box, positives) == 0).all()
        assert (box_iou(box, record.gt_boxes.double()) == 0).all()  # crowd regions included
        assert box[0, 0] >= 0 and box[0, 1] >= 0 and box[0, 2] <= record.width and box[0, 3] <= record.height
        assert ((box[0, 2:] - box[0, :2]) >= 8).all()


def test_negative_sizes_come_from_the_positives(coco, plan):
    positive = plan.labels > 0
    pool = {tuple(s) for s in (plan.boxes[positive, 2:] - plan.boxes[positive, :2]).tolist()}
    for k in (plan.labels == 0).nonzero().flatten().tolist():
        w, h = (plan.boxes[k, 2:] - plan.boxes[k, :2]).tolist()
        record = coco.records[int(plan.image_index[k])]
        # Either a positive's size, or one shrunk (aspect kept) to fit the image: then a side fills the image.
        assert (w, h) in pool or w == record.width or h == record.height


def test_positives_to_negatives_is_10_to_1_over_the_dataset(plan):
    num_positives, num_negatives = int((plan.labels > 0).sum()), int((plan.labels == 0).sum())
    assert num_positives == plan.stats["num_positives"] == 916
    assert num_negatives == plan.stats["num_negatives"] == round(num_positives / 10)
    assert plan.stats["negative_shortfall"] == 0


def test_negatives_stay_off_crowd_regions_and_shortfalls_are_counted():
    crowd = make_record([[0, 0, 150, 100], [160, 10, 190, 60]], crowd=[True, False])
    boxes = plan_negative_samples(
        crowd,
        num_negatives=5,
        positive_boxes=torch.tensor([[155, 5, 195, 70]]),
        size_pool=torch.tensor([[20, 20], [30, 10]]),
        generator=torch.Generator().manual_seed(0),
    )
    assert len(boxes) == 5
    assert (box_iou(boxes.double(), torch.tensor([[0.0, 0, 150, 100], [155, 5, 195, 70]]).double()) == 0).all()
    full = make_record([[0, 0, 200, 100]], image_id=2)
    stats = plan_samples([full], seed=0, positives_per_negative=1.0).stats
    assert stats["num_positives"] == 1 and stats["num_negatives"] == 0 and stats["negative_shortfall"] == 1


def test_plan_is_deterministic_per_seed(coco, plan):
    again = plan_samples(coco.records, seed=0)
    for a, b in zip(plan[:4], again[:4], strict=True):
        assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))
    other = plan_samples(coco.records, seed=1)
    assert not torch.equal(plan.boxes, other.boxes)
    # An image's positives depend only on (seed, image_id): planning a subset gives the same ones.
    subset = plan_samples(coco.records[5:9], seed=0)
    in_subset = (subset.image_index == 0) & (subset.labels > 0)
    assert torch.equal(subset.boxes[in_subset], plan.boxes[(plan.image_index == 5) & (plan.labels > 0)])


# ---------------------------------------------------------------------------------------------------------------
# §3.1 the sample directory
# ---------------------------------------------------------------------------------------------------------------


def directory_files(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_sample_directory_holds_every_planned_sample(sample_dir, plan, coco):
    path, stats = sample_dir
    samples = JigsawSamples(path)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        *(f"shard-0000{k}.jigsaw" for k in range(4)),  # 128 images, 32 per shard
        "skipped.jsonl",
    ]
    assert (path / "skipped.jsonl").read_text() == ""  # every coco128 photo decodes
    no_skips = {"num_samples": 1008, "skipped_images": 0, "skipped_positives": 0, "skipped_negatives": 0}
    assert stats == samples.header["stats"] == plan.stats | no_skips
    assert len(samples) == plan.stats["num_positives"] + plan.stats["num_negatives"] == 1008
    assert torch.equal(samples.labels, plan.labels) and torch.equal(samples.boxes, plan.boxes)
    assert torch.equal(samples.image_index, plan.image_index)
    assert samples.header["format_version"] == SAMPLE_FORMAT_VERSION
    assert samples.header["extraction"] == {
        "seed": 0,
        "max_enlarge": 2.0,
        "positives_per_negative": 10.0,
        "min_sample_size": 8,
        "negative_tries": 64,
        "jpeg_quality": 95,
        "jpeg_subsampling": "4:4:4",
        "shard_size": 32,
    }
    assert [s["num_samples"] for s in samples.header["shards"]] == [
        int(((plan.image_index >= 32 * k) & (plan.image_index < 32 * (k + 1))).sum()) for k in range(4)
    ]
    assert samples.class_names == coco.class_names and samples.header["category_ids"] == coco.category_ids
    assert samples.header["cleaning_report"] == coco.cleaning_report
    for i in [0, 1, len(samples) // 2, len(samples) - 1]:
        sample = samples[i]
        x1, y1, x2, y2 = samples.boxes[i].tolist()
        assert sample.image.shape == (3, y2 - y1, x2 - x1) and sample.label == int(plan.labels[i])
        record = coco.records[int(samples.image_index[i])]
        with Image.open(record.file_name) as source:
            crop = source.convert("RGB").crop((x1, y1, x2, y2))
        assert samples.encoded(i).numpy().tobytes() == encode_sample(crop)  # cut once, at native resolution
    counts = {g: len(samples.group_indices[g]) for g in GROUPS}
    assert sum(counts.values()) == len(samples) and min(counts.values()) > 0
    restored = pickle.loads(pickle.dumps(samples))  # DataLoader workers receive a pickled reader
    assert torch.equal(restored[3].image, samples[3].image) and torch.equal(restored[900].image, samples[900].image)
    samples.close()


def test_samples_are_the_same_for_any_worker_count_and_shard_size(coco, tmp_path):
    records = coco.records[:12]
    kwargs = {"class_names": coco.class_names, "seed": 3, "shard_size": 5}
    extract_samples(records, output_dir=tmp_path / "serial", num_workers=0, **kwargs)
    extract_samples(records, output_dir=tmp_path / "pool", num_workers=2, **kwargs)
    serial = directory_files(tmp_path / "serial")
    assert serial == directory_files(tmp_path / "pool") and len(serial) == 5  # 3 shards, manifest, report
    # Other shards, the same samples: shard size cuts the same plan, nothing else.
    extract_samples(records, output_dir=tmp_path / "one_shard", **{**kwargs, "shard_size": 64})
    a, b = JigsawSamples(tmp_path / "serial"), JigsawSamples(tmp_path / "one_shard")
    assert len(a.header["shards"]) == 3 and len(b.header["shards"]) == 1
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert all(torch.equal(a[i].image, b[i].image) for i in range(len(a)))
    extract_samples(records, output_dir=tmp_path / "other", **{**kwargs, "seed": 4})
    assert directory_files(tmp_path / "other") != serial


def test_a_reused_directory_must_hold_the_same_extraction(coco, tmp_path):
    records, names = coco.records[:12], coco.class_names
    extract_samples(records, class_names=names, output_dir=tmp_path / "s", shard_size=5)
    before = directory_files(tmp_path / "s")
    extract_samples(records, class_names=names, output_dir=tmp_path / "s", shard_size=5)  # the same: reused
    assert directory_files(tmp_path / "s") == before
    with pytest.raises(SampleDirError, match=r"s holds samples .*\(seed: 0 there, 1 now\); delete it"):
        extract_samples(records, class_names=names, output_dir=tmp_path / "s", shard_size=5, seed=1)
    with pytest.raises(SampleDirError, match=r"12 images there, 11 now"):
        extract_samples(records[1:], class_names=names, output_dir=tmp_path / "s", shard_size=5)
    with pytest.raises(SampleDirError, match=r"shard_size: 5 there, 6 now"):
        extract_samples(records, class_names=names, output_dir=tmp_path / "s", shard_size=6)
    swapped = [*records[:3], coco.records[20], *records[4:]]
    with pytest.raises(
        SampleDirError, match=r"shard-00000\.jigsaw .*\(image 3: 000000000034\.jpg there, 0+\d+\.jpg now\)"
    ):
        extract_samples(swapped, class_names=names, output_dir=tmp_path / "s", shard_size=5)
    # An unfinished directory (no manifest yet) is checked shard by shard.
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(SampleDirError, match=r"shard-00000\.jigsaw was extracted .*image 0: 000000000009\.jpg there, "):
        extract_samples(records[1:], class_names=names, output_dir=tmp_path / "s", shard_size=5)
    moved = [dataclasses.replace(r, gt_boxes=r.gt_boxes * 0.5) for r in records]
    with pytest.raises(SampleDirError, match=r"shard-00000\.jigsaw .*the same images with other annotations"):
        extract_samples(moved, class_names=names, output_dir=tmp_path / "s", shard_size=5)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(set(before) - {"manifest.json"})
    (tmp_path / "old.jigsaw").write_bytes(b"DPJIGSW\n")  # a sample file of format version 1
    with pytest.raises(SampleDirError, match=r"old\.jigsaw is a file \(a sample file of format version 1\?\)"):
        extract_samples(records, class_names=names, output_dir=tmp_path / "old.jigsaw")


def test_damaged_or_unfinished_directories_are_refused_by_the_reader(sample_dir, tmp_path):
    source, _ = sample_dir
    shutil.copytree(source, tmp_path / "s")
    shard = tmp_path / "s" / "shard-00001.jigsaw"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(SampleDirError, match=r"shard-00001\.jigsaw: the file size does not match its header"):
        JigsawSamples(tmp_path / "s")
    shard.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(SampleDirError, match=r"shard-00001\.jigsaw: not a Jigsaw sample shard"):
        JigsawSamples(tmp_path / "s")
    shard.write_bytes(data)
    manifest = tmp_path / "s" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"format_version": 2', '"format_version": 9', 1))
    with pytest.raises(SampleDirError, match="format version 9, this detpretrain reads version 2; extract"):
        JigsawSamples(tmp_path / "s")
    manifest.unlink()
    with pytest.raises(SampleDirError, match=r"no manifest\.json, so not a finished Jigsaw sample directory"):
        JigsawSamples(tmp_path / "s")


def test_extraction_rejects_labels_outside_the_class_list(tmp_path):
    record = make_record([[10, 10, 60, 50]], file_name=str(tmp_path / "a.jpg"))
    with pytest.raises(ValueError, match=r"a\.jpg: label 1 is not a known category"):
        extract_samples([record], class_names=["background"], output_dir=tmp_path / "s")
    with pytest.raises(ValueError, match=r"class_names\[0\] must be 'background'"):
        extract_samples([record], class_names=["thing", "other"], output_dir=tmp_path / "s")


# ---------------------------------------------------------------------------------------------------------------
# §3.1 how a sample is stored
# ---------------------------------------------------------------------------------------------------------------


def psnr(decoded, reference):
    error = np.mean((np.asarray(decoded, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2)
    return 10 * np.log10(255**2 / error)


def test_samples_are_stored_as_jpeg_q95_with_full_resolution_chroma():
    # One-pixel columns of saturated red and blue: 4:2:0 chroma (Pillow's default) averages each pair into purple.
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, 0::2, 0] = 255
    stripes[:, 1::2, 2] = 255
    crop = Image.fromarray(stripes)
    with Image.open(io.BytesIO(encode_sample(crop))) as stored:
        assert stored.format == "JPEG" and JpegImagePlugin.get_sampling(stored) == 0  # 0: 4:4:4
        reference = io.BytesIO()
        crop.save(reference, format="JPEG", quality=95, subsampling=0)
        with Image.open(reference) as q95:
            assert stored.quantization == q95.quantization
        assert psnr(stored.convert("RGB"), stripes) > 30
    halved = io.BytesIO()
    crop.save(halved, format="JPEG", quality=95)
    with Image.open(halved) as default:
        assert JpegImagePlugin.get_sampling(default) == 2 and psnr(default.convert("RGB"), stripes) < 15
    # Noise-like crops need more than 2 bytes per pixel at 4:4:4, where Pillow's optimizing encoder fails.
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    assert len(encode_sample(Image.fromarray(noise))) > 2 * 300 * 300
