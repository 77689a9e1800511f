"""Jigsaw (Montage) mechanisms: sample extraction (§3.1), assembly (§3.2), ERF and Eq. 2 weights (§3.3).

Extraction runs on the real coco128 photos (../shared/data/coco128); assembly and Eq. 2 run on hand-built cases.
"""

import dataclasses
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from torchvision.ops import box_iou

from detpretrain.jigsaw import (
    GROUPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JIGSAW_TEMPLATES,
    REGION_COLORS,
    SAMPLE_FORMAT_VERSION,
    ImageRecord,
    JigsawClassifier,
    JigsawSample,
    JigsawSamples,
    JigsawTemplate,
    SampleDirError,
    assemble_jigsaw,
    coco_image_records,
    compute_erf,
    erf_label_weights,
    erf_region_shares,
    extract_samples,
    feature_region_index,
    get_template,
    label_weights_from_shares,
    normalize_jigsaw_image,
    plan_negative_samples,
    plan_positive_samples,
    plan_samples,
    render_erf,
    render_jigsaw,
    sample_group,
    sample_jigsaw,
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


def random_sample(height, width, label, seed):
    image = torch.randint(1, 256, (3, height, width), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return JigsawSample(image=image, label=label)


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
            crop = torch.from_numpy(np.array(source.convert("RGB").crop((x1, y1, x2, y2)))).permute(2, 0, 1)
        assert (sample.image.float() - crop.float()).abs().mean() < 3.0  # JPEG quality 95 at native resolution
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
# §3.2 groups and the template
# ---------------------------------------------------------------------------------------------------------------


def test_groups_by_width_over_height():
    width = torch.tensor([50, 150, 49, 151, 10, 100])
    height = torch.tensor([100, 100, 100, 100, 100, 10])
    assert [GROUPS[g] for g in sample_group(width, height).tolist()] == ["S", "S", "T", "W", "T", "W"]


@pytest.mark.parametrize("name", sorted(JIGSAW_TEMPLATES))
def test_template_regions_tile_the_canvas(name):
    template = get_template(name)
    masks = template.region_masks()
    size = (template.canvas_height, template.canvas_width)
    assert masks.shape == (4, *size) and torch.equal(masks.sum(0), torch.ones(size, dtype=torch.long))
    assert math.isclose(float(template.region_area_fractions().sum()), 1.0, rel_tol=1e-6)
    w, h = (template.region_boxes()[:, 2:] - template.region_boxes()[:, :2]).unbind(1)
    assert w[1] >= h[1] and h[2] >= w[2]  # top right holds W-samples, bottom left T-samples


def test_default_template_splits_at_96():
    boxes = get_template("split96").region_boxes()
    assert boxes.tolist() == [[0, 0, 96, 96], [96, 0, 224, 96], [0, 96, 96, 224], [96, 96, 224, 224]]
    with pytest.raises(ValueError, match="unknown Jigsaw template 'split80'"):
        get_template("split80")
    with pytest.raises(ValueError, match="at least as wide as tall"):
        JigsawTemplate(split_x=96, split_y=150)
    with pytest.raises(ValueError, match="strictly inside"):
        JigsawTemplate(split_x=0)


# ---------------------------------------------------------------------------------------------------------------
# §3.2 assembly
# ---------------------------------------------------------------------------------------------------------------

TEMPLATE = get_template("split96")


def four_samples():
    """Two S-samples (the larger one is also larger than its region), one T, one W; labels 1..4."""
    return (
        (random_sample(150, 140, 1, seed=1), random_sample(50, 60, 2, seed=2)),
        random_sample(90, 30, 3, seed=3),
        random_sample(40, 100, 4, seed=4),
    )


def test_without_augmentation_pixels_land_unchanged_in_their_regions():
    squares, tall, wide = four_samples()
    jigsaw = assemble_jigsaw(
        squares=squares,
        tall=tall,
        wide=wide,
        template=TEMPLATE,
        generator=torch.Generator().manual_seed(0),
        scale_range=(1.0, 1.0),
        flip_prob=0.0,
    )
    # The smaller S top-left, W top-right, T bottom-left, the larger S bottom-right; labels follow.
    assert jigsaw.input_index.tolist() == [1, 3, 2, 0]
    assert jigsaw.labels.tolist() == [2, 4, 3, 1]
    placed = [squares[1], wide, tall, squares[0]]
    for r, sample in enumerate(placed):
        x1, y1, x2, y2 = jigsaw.content_boxes[r].tolist()
        sx1, sy1, sx2, sy2 = jigsaw.source_boxes[r].tolist()
        assert torch.equal(jigsaw.image[:, y1:y2, x1:x2], sample.image[:, sy1:sy2, sx1:sx2])
        rx1, ry1, rx2, ry2 = TEMPLATE.region_boxes()[r].tolist()
        assert rx1 <= x1 and ry1 <= y1 and x2 <= rx2 and y2 <= ry2
        h, w = sample.image.shape[1:]
        # Smaller than the region: padded, whole sample; larger: cropped to exactly the region.
        assert (x2 - x1, y2 - y1) == (min(w, rx2 - rx1), min(h, ry2 - ry1))
    assert jigsaw.source_boxes[3].tolist()[2] - jigsaw.source_boxes[3].tolist()[0] == 128  # 140 px cropped to 128
    covered = torch.zeros(224, 224, dtype=torch.bool)
    for x1, y1, x2, y2 in jigsaw.content_boxes.tolist():
        covered[y1:y2, x1:x2] = True
    assert (jigsaw.image[:, ~covered] == 0).all() and (jigsaw.image[:, covered] > 0).all()


def test_flip_mirrors_the_sample():
    squares, tall, wide = four_samples()
    jigsaw = assemble_jigsaw(
        squares=squares,
        tall=tall,
        wide=wide,
        template=TEMPLATE,
        generator=torch.Generator().manual_seed(0),
        scale_range=(1.0, 1.0),
        flip_prob=1.0,
    )
    assert jigsaw.flipped.all()
    x1, y1, x2, y2 = jigsaw.content_boxes[1].tolist()  # the W-sample, 100 wide: fits whole
    assert torch.equal(jigsaw.image[:, y1:y2, x1:x2], wide.image.flip(-1))


def test_scaling_keeps_the_aspect_ratio_then_only_pads_or_crops():
    squares, tall, wide = four_samples()
    inputs = [*squares, tall, wide]
    crop_starts = set()
    for seed in range(20):
        jigsaw = assemble_jigsaw(
            squares=squares, tall=tall, wide=wide, template=TEMPLATE, generator=torch.Generator().manual_seed(seed)
        )
        for r in range(4):
            sample = inputs[int(jigsaw.input_index[r])]
            scale = float(jigsaw.scales[r])
            assert 0.8 <= scale <= 1.5
            x1, y1, x2, y2 = jigsaw.content_boxes[r].tolist()
            sx1, sy1, sx2, sy2 = jigsaw.source_boxes[r].tolist()
            rx1, ry1, rx2, ry2 = TEMPLATE.region_boxes()[r].tolist()
            h, w = sample.image.shape[1:]
            for length, placed, region, start, stop in (
                (w, x2 - x1, rx2 - rx1, sx1, sx2),
                (h, y2 - y1, ry2 - ry1, sy1, sy2),
            ):
                assert placed == min(round(length * scale), region)  # padded whole, or cropped to fill the region
                assert 0 <= start < stop <= length
                if round(length * scale) <= region:
                    assert (start, stop) == (0, length)
                else:  # the cropped window is scaled by r up to rounding (_fit_axis's bound)
                    assert abs(placed - (stop - start) * scale) <= 0.5 * max(1.0, scale) + 1e-9
                    crop_starts.add((int(jigsaw.input_index[r]), start))
            expected = TF.resize(sample.image[:, sy1:sy2, sx1:sx2], [y2 - y1, x2 - x1], antialias=True)
            if jigsaw.flipped[r]:
                expected = expected.flip(-1)
            assert torch.equal(jigsaw.image[:, y1:y2, x1:x2], expected)
    assert len(crop_starts) > 10  # crops start at random offsets


def test_smaller_square_is_decided_after_scaling():
    a, b = random_sample(52, 52, 1, seed=1), random_sample(56, 56, 2, seed=2)
    tall, wide = random_sample(90, 30, 3, seed=3), random_sample(40, 100, 4, seed=4)
    swapped = 0
    for seed in range(40):
        jigsaw = assemble_jigsaw(
            squares=(a, b), tall=tall, wide=wide, template=TEMPLATE, generator=torch.Generator().manual_seed(seed)
        )
        sizes = {0: 52, 1: 56}
        tl, br = int(jigsaw.input_index[0]), int(jigsaw.input_index[3])
        assert round(sizes[tl] * float(jigsaw.scales[0])) <= round(sizes[br] * float(jigsaw.scales[3]))
        swapped += tl == 1
    assert 0 < swapped < 40  # the raw-larger sample sometimes ends up smaller, and then goes top-left


def test_assembly_uses_only_the_given_generator_and_a_fixed_number_of_draws():
    squares, tall, wide = four_samples()
    first = assemble_jigsaw(squares=squares, tall=tall, wide=wide, template=TEMPLATE, generator=seeded_generator(5))
    generator = seeded_generator(5)
    second = assemble_jigsaw(squares=squares, tall=tall, wide=wide, template=TEMPLATE, generator=generator)
    assert torch.equal(first.image, second.image) and torch.equal(first.content_boxes, second.content_boxes)
    reference = seeded_generator(5)
    torch.rand((4, 4), generator=reference, dtype=torch.float64)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_warp_and_resize_ablations():
    squares, tall, wide = four_samples()
    kwargs = {"squares": squares, "tall": tall, "wide": wide, "template": TEMPLATE}
    warp = assemble_jigsaw(**kwargs, generator=torch.Generator().manual_seed(0), fit="warp", flip_prob=0.0)
    assert torch.equal(warp.content_boxes, TEMPLATE.region_boxes())
    torch.testing.assert_close(warp.image[:, 96:224, 0:96], TF.resize(tall.image, [128, 96], antialias=True))
    resize = assemble_jigsaw(**kwargs, generator=torch.Generator().manual_seed(0), fit="resize", flip_prob=0.0)
    inputs = [*squares, tall, wide]
    for r in range(4):
        h, w = inputs[int(resize.input_index[r])].image.shape[1:]
        x1, y1, x2, y2 = resize.content_boxes[r].tolist()
        rx1, ry1, rx2, ry2 = TEMPLATE.region_boxes()[r].tolist()
        assert x2 - x1 == rx2 - rx1 or y2 - y1 == ry2 - ry1  # scaled to touch the region on one axis
        assert abs((x2 - x1) / (y2 - y1) - w / h) < 0.05  # keeping the aspect ratio
    with pytest.raises(ValueError, match="unknown fit 'stretch'"):
        assemble_jigsaw(**kwargs, generator=torch.Generator(), fit="stretch")


def test_assembly_rejects_a_sample_of_the_wrong_group():
    squares, tall, wide = four_samples()
    with pytest.raises(ValueError, match=r"input 2 \(100x40, width/height 2\.50\) is group W, expected T"):
        assemble_jigsaw(squares=squares, tall=wide, wide=wide, template=TEMPLATE, generator=torch.Generator())


def test_normalization_after_stitching_turns_padding_into_minus_mean_over_std():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)  # §4.1
    canvas = torch.zeros((2, 3, 4, 4), dtype=torch.uint8)
    canvas[:, :, 0, 0] = 255
    normalized = normalize_jigsaw_image(canvas)
    expected_pad = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(normalized[0, :, 1, 1], torch.tensor(expected_pad))
    expected_white = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(normalized[1, :, 0, 0], torch.tensor(expected_white))


def test_sample_jigsaw_draws_each_region_from_its_group(sample_dir):
    samples = JigsawSamples(sample_dir[0])
    generator = seeded_generator(0, 7, 1)  # as the engine would seed (seed, step, index)
    for _ in range(3):
        jigsaw, indices = sample_jigsaw(samples, template=TEMPLATE, generator=generator)
        groups = sample_group(samples.sizes[indices, 0], samples.sizes[indices, 1])
        assert [GROUPS[g] for g in groups.tolist()] == ["S", "W", "T", "S"]
        assert torch.equal(jigsaw.labels, samples.labels[indices])
        areas = [
            (samples.sizes[i, 0] * samples.sizes[i, 1]).item() * float(s) ** 2
            for i, s in zip(indices[[0, 3]], jigsaw.scales[[0, 3]], strict=True)
        ]
        assert areas[0] <= areas[1] * 1.05  # up to rounding of the scaled sides


# ---------------------------------------------------------------------------------------------------------------
# §3.3 cells, regions, Eq. 2
# ---------------------------------------------------------------------------------------------------------------


def test_feature_cells_belong_to_the_region_holding_their_centre():
    index = feature_region_index(TEMPLATE, feature_height=7, feature_width=7)
    expected = torch.tensor([[0] * 3 + [1] * 4] * 3 + [[2] * 3 + [3] * 4] * 4)
    assert torch.equal(index, expected)
    index64 = feature_region_index(get_template("split64"), feature_height=7, feature_width=7)
    assert torch.equal(torch.bincount(index64.flatten()), torch.tensor([4, 10, 10, 25]))
    with pytest.raises(ValueError, match=r"\['top_left', 'bottom_left'\] hold no centre of a 7x7 feature cell"):
        feature_region_index(JigsawTemplate(split_x=16, split_y=96), feature_height=7, feature_width=7)


def hand_built_erf():
    """A 4x4 canvas split at 2 (four 2x2 regions), a 2x2 feature map: one cell per region."""
    template = JigsawTemplate(canvas_height=4, canvas_width=4, split_x=2, split_y=2)
    erf = torch.zeros(2, 2, 4, 4)
    erf[0, 0, 0, 0], erf[0, 0, 1, 1] = 4.0, 2.0  # top-left cell: mass 6 in TL,
    erf[0, 0, 0, 3], erf[0, 0, 3, 0], erf[0, 0, 3, 3] = 2.0, 1.0, 1.0  # 2 in TR, 1 in BL, 1 in BR
    erf[0, 1, 0, 3], erf[0, 1, 0, 0], erf[0, 1, 2, 1], erf[0, 1, 3, 2] = 16.0, 2.0, 1.0, 1.0  # TR cell: 0.8 own
    erf[1, 0, 2:, :2] = 1.0  # BL cell: everything inside its own region (rho_r = 1, the 0/0 case)
    return template, erf  # BR cell: all zero (a dead unit)


def test_eq2_on_a_hand_built_erf():
    template, erf = hand_built_erf()
    shares = erf_region_shares(erf, template=template)
    torch.testing.assert_close(shares[0, 0], torch.tensor([0.6, 0.2, 0.1, 0.1]))
    torch.testing.assert_close(shares[0, 1], torch.tensor([0.1, 0.8, 0.05, 0.05]))
    weights = erf_label_weights(erf, template=template, erf_threshold=0.7)
    # TL: rho_r = 0.6 < 0.7, so w_r = 0.7 and the other 0.3 is split 2:1:1 as rho is.
    torch.testing.assert_close(weights[0, 0], torch.tensor([0.7, 0.15, 0.075, 0.075]))
    torch.testing.assert_close(weights[0, 1], torch.tensor([0.1, 0.8, 0.05, 0.05]))  # rho_r >= tau: w = rho
    assert weights[1, 0].tolist() == [0.0, 0.0, 1.0, 0.0]  # rho_r = 1: no 0/0
    assert weights[1, 1].tolist() == [0.0, 0.0, 0.0, 1.0]  # dead unit: its own label
    one_hot = erf_label_weights(erf, template=template, erf_threshold=1.0)
    assert torch.equal(one_hot, torch.eye(4).view(2, 2, 4))


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.7, 0.95, 1.0])
def test_eq2_properties_on_random_erfs(tau):
    generator = torch.Generator().manual_seed(0)
    erf = torch.rand((7, 7, 224, 224), generator=generator) ** 8  # peaky, so shares range widely
    shares = erf_region_shares(erf, template=TEMPLATE)
    region_index = feature_region_index(TEMPLATE, feature_height=7, feature_width=7)
    weights = label_weights_from_shares(shares, region_index=region_index, erf_threshold=tau)
    own = nn.functional.one_hot(region_index, 4).bool()
    torch.testing.assert_close(weights.sum(-1), torch.ones(7, 7))
    assert (weights[own] >= tau - 1e-6).all()
    dominant = (shares * own).sum(-1) >= tau
    torch.testing.assert_close(weights[dominant], shares[dominant])
    # The others keep their ERF proportions.
    ratio = weights[~own].view(7, 7, 3) / shares[~own].view(7, 7, 3)
    torch.testing.assert_close(ratio, ratio[..., :1].expand(7, 7, 3))
    if tau == 1.0:
        assert torch.equal(weights, own.float())
    with pytest.raises(ValueError, match="erf_threshold must be in"):
        label_weights_from_shares(shares, region_index=region_index, erf_threshold=1.5)


def test_compute_erf_is_exact_on_a_linear_network():
    conv = nn.Conv2d(3, 1, kernel_size=3, stride=2, padding=1, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    bn = nn.BatchNorm2d(1)
    bn.running_var.fill_(4.0)
    bn.weight.data.fill_(3.0)
    model = nn.Sequential(conv, bn).train()
    images = torch.randn(2, 3, 8, 8)
    erf = compute_erf(model, images, chunk_size=5)
    assert erf.shape == (4, 4, 8, 8) and model.training  # the train/eval state is restored
    assert conv.weight.grad is None and bn.weight.grad is None
    scale = 3 * 3.0 / math.sqrt(4.0 + bn.eps)  # 3 channels, eval-mode BN: gamma / sqrt(running_var + eps)
    for j in range(4):
        for k in range(4):
            expected = torch.zeros(8, 8)
            expected[max(0, 2 * j - 1) : 2 * j + 2, max(0, 2 * k - 1) : 2 * k + 2] = scale
            torch.testing.assert_close(erf[j, k], expected)
    torch.testing.assert_close(compute_erf(model, images, chunk_size=1), erf)


@pytest.fixture(scope="module")
def tiny_backbone_erf():
    """The ERF of a real timm ResNet (resnet10t, narrowed to 16..128 channels) on a 160 canvas: a 5 x 5 map.

    zero_init_last=False: timm zero-initializes each block's last BN, which leaves an untrained network with
    only its shortcut path and a tiny receptive field; a trained network is closer to this.
    """
    torch.manual_seed(0)
    backbone = timm.create_model(
        "resnet10t", channels=(16, 32, 64, 128), zero_init_last=False, num_classes=0, global_pool=""
    )
    model = JigsawClassifier(backbone, num_classes=5)
    template = JigsawTemplate(canvas_height=160, canvas_width=160, split_x=64, split_y=64)
    images = normalize_jigsaw_image(torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8))
    return template, compute_erf(model, images, chunk_size=50)


def test_erf_of_a_tiny_timm_backbone_peaks_at_its_position(tiny_backbone_erf):
    template, erf = tiny_backbone_erf
    assert erf.shape == (5, 5, 160, 160) and (erf >= 0).all()
    # The 32 x 32 tile with the most ERF mass is the position's own tile or a neighbour.
    tile_mass = nn.functional.avg_pool2d(erf.view(25, 1, 160, 160), 32).view(25, 25)
    peak, own = tile_mass.argmax(1), torch.arange(25)
    assert (torch.maximum((peak // 5 - own // 5).abs(), (peak % 5 - own % 5).abs()) <= 1).all()
    # The ERF's centre of mass moves down with j and right with k.
    coords = torch.arange(160.0) + 0.5
    mass = erf.sum((2, 3))
    centre_y, centre_x = (erf.sum(3) * coords).sum(2) / mass, (erf.sum(2) * coords).sum(2) / mass
    assert (centre_y.diff(dim=0) > 0).all() and (centre_x.diff(dim=1) > 0).all()


def test_weights_from_a_real_erf_obey_eq2(tiny_backbone_erf):
    template, erf = tiny_backbone_erf
    shares = erf_region_shares(erf, template=template)
    weights = erf_label_weights(erf, template=template, erf_threshold=0.7)
    own = nn.functional.one_hot(feature_region_index(template, feature_height=5, feature_width=5), 4).bool()
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, 5))
    assert (weights[own] >= 0.7 - 1e-6).all()
    dominant = (shares * own).sum(-1) >= 0.7  # (h, w): positions whose own region holds >= tau of the ERF
    assert dominant.any() and not dominant.all()  # both cases of Eq. 2 occur
    torch.testing.assert_close(weights[dominant], shares[dominant])
    assert (weights[~own] > 0).any()  # positions near a border see their neighbours' labels


def test_dense_head_is_the_fc_applied_everywhere():
    backbone = timm.create_model("resnet10t", channels=(8, 16, 32, 64), num_classes=0, global_pool="")
    model = JigsawClassifier(backbone, num_classes=4).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits, features = model(images), model.forward_features(images)
    assert logits.shape == (2, 4, 3, 3)
    fc = nn.Linear(64, 4)
    fc.weight.data, fc.bias.data = model.classifier.weight.data.view(4, 64), model.classifier.bias.data
    # Pooling the dense logits equals classifying pooled features (why "global"/"block-wise" pool logits).
    torch.testing.assert_close(logits.mean((2, 3)), fc(features.mean((2, 3))), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, :, 1, 2], fc(features[:, :, 1, 2]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_features"):
        JigsawClassifier(nn.Conv2d(3, 3, 1), num_classes=4)


# ---------------------------------------------------------------------------------------------------------------
# visualization
# ---------------------------------------------------------------------------------------------------------------


def test_render_jigsaw_outlines_regions_and_writes_labels():
    squares, tall, wide = four_samples()
    jigsaw = assemble_jigsaw(squares=squares, tall=tall, wide=wide, template=TEMPLATE, generator=torch.Generator())
    names = ["background", "cat", "dog", "bus", "kite"]
    picture = render_jigsaw(jigsaw.image, jigsaw.labels, template=TEMPLATE, class_names=names, scale=2)
    assert picture.size == (448, 448)
    pixels = np.asarray(picture)
    for r, (x1, y1, _, y2) in enumerate(TEMPLATE.region_boxes().tolist()):
        assert tuple(pixels[(y1 + y2), 2 * x1]) == REGION_COLORS[r]  # left edge, halfway down
        label_area = pixels[2 * y1 + 3 : 2 * y1 + 20, 2 * x1 + 3 : 2 * x1 + 40].astype(int)
        # The label text in the region's colour (anti-aliased: close to it).
        assert (np.abs(label_area - REGION_COLORS[r]).sum(-1) < 30).any()
    other = np.asarray(render_jigsaw(jigsaw.image, jigsaw.labels.flip(0), template=TEMPLATE, class_names=names))
    assert (other[3:20, 3:40] != pixels[3:20, 3:40]).any()
    with pytest.raises(ValueError, match="uint8 canvas"):
        render_jigsaw(jigsaw.image.float(), jigsaw.labels, template=TEMPLATE, class_names=names)


def test_render_erf_is_brightest_where_the_erf_peaks():
    erf = torch.zeros(32, 48)
    erf[20, 30], erf[5, 5] = 4.0, 1.0
    picture = np.asarray(render_erf(erf))
    assert picture.shape == (32, 48, 3)
    assert tuple(picture[20, 30]) == (255, 255, 255) and tuple(picture[0, 0]) == (0, 0, 0)
    assert picture[5, 5, 0] > 0 and picture[5, 5, 2] == 0  # a quarter of the peak: dark red
    overlay = np.asarray(render_erf(erf, image=torch.full((3, 32, 48), 200, dtype=torch.uint8), alpha=0.5))
    assert tuple(overlay[0, 0]) == (100, 100, 100)
