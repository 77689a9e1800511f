"""The evaluators: COCO and LVIS reproduce the official tools' numbers, VOC matches hand-computed cases.

Reference numbers live in ../shared/data (cocoapi_eval: pycocotools' own stats; lvis_val100: lvis-api 0.5.3's
output); the VOC cases are computed by hand below, on small VOCdevkit folders written into tmp_path.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detpretrain import evaluate
from detpretrain.evaluation import (
    CocoEvaluator,
    EvaluationInputError,
    LvisEvaluator,
    VocAnnotationError,
    VocEvaluator,
    evaluate_coco,
    evaluate_coco_file,
    evaluate_lvis,
    evaluate_lvis_file,
    evaluate_voc,
    load_coco_ground_truth,
    load_lvis_ground_truth,
    load_voc_ground_truth,
    parse_voc_xml,
    voc_ap,
)
from tests.conftest import REPO_ROOT, shared_path

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs@100", "ARm@100", "ARl@100")


def coco_files() -> tuple[Path, Path, Path, dict]:
    folder = shared_path("data", "cocoapi_eval")
    expected = json.loads((folder / "expected_stats.json").read_text())
    return (
        folder / "instances_val2014_100.json",
        folder / "instances_val2014_fakebbox100_results.json",
        folder / "instances_val2014_fakesegm100_results.json",
        expected,
    )


def lvis_files() -> tuple[Path, Path, dict]:
    folder = shared_path("data", "lvis_val100")
    reference = json.loads((folder / "lvis_api_reference_results_seed0.json").read_text())
    return folder / "lvis_val_100.json", folder / "lvis_val_100_fake_bbox_results_seed0.json", reference


def to_outputs(results: list[dict], image_ids, category_to_label: dict[int, int] | None = None, masks: bool = False):
    """COCO results as torchvision outputs, ``{image_id: {"boxes" xyxy, "scores", "labels"(, "masks")}}``."""
    outputs = {}
    for image_id in image_ids:
        mine = [r for r in results if r["image_id"] == image_id]
        if masks:
            boxes = [list(mask_util.toBbox(r["segmentation"])) for r in mine]
        else:
            boxes = [r["bbox"] for r in mine]
        xywh = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        labels = [r["category_id"] if category_to_label is None else category_to_label[r["category_id"]] for r in mine]
        outputs[image_id] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "scores": torch.tensor([r["score"] for r in mine], dtype=torch.float64),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if masks:
            decoded = [mask_util.decode(r["segmentation"]) for r in mine]
            outputs[image_id]["masks"] = torch.from_numpy(
                np.stack(decoded)[:, None] if decoded else np.zeros((0, 1, 1, 1))
            )
    return outputs


# ---------------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_reproduces_pycocotools_reference_stats(iou_type):
    gt, bbox_results, segm_results, expected = coco_files()
    results = bbox_results if iou_type == "bbox" else segm_results
    summary = evaluate_coco_file(gt, results, iou_types=[iou_type])
    assert list(summary) == [iou_type]
    assert [summary[iou_type][name] for name in STAT_NAMES] == pytest.approx(expected[iou_type], abs=1e-6)


# pycocotools' decode, used here to turn results into Mask R-CNN outputs, warns under numpy 2.
def test_coco_evaluator_on_torchvision_outputs_with_a_label_mapping_gives_the_same_numbers():
    gt_path, bbox_results, segm_results, expected = coco_files()
    coco_gt = load_coco_ground_truth(gt_path)
    # A model's contiguous labels 1..80 for COCO's 80 ids between 1 and 90.
    category_to_label = {c: i + 1 for i, c in enumerate(sorted(coco_gt.cats))}
    label_to_category = {label: c for c, label in category_to_label.items()}
    image_ids = sorted(coco_gt.imgs)
    evaluator = CocoEvaluator(coco_gt, iou_types=("bbox", "segm"), label_to_category=label_to_category)
    boxes = to_outputs(json.loads(bbox_results.read_text()), image_ids, category_to_label)
    masks = to_outputs(json.loads(segm_results.read_text()), image_ids, category_to_label, masks=True)
    # The fake bbox and segm results are different detections: feed them as two evaluators would see them.
    bbox_only = CocoEvaluator(coco_gt, iou_types="bbox", label_to_category=label_to_category)
    bbox_only.update({i: boxes[i] for i in image_ids[:50]})
    bbox_only.update({i: boxes[i] for i in image_ids[50:]})
    evaluator.update(masks)
    bbox_only.update({image_ids[0]: masks[image_ids[0]]})  # an image seen twice keeps its first predictions
    bbox_only.synchronize()  # no process group: nothing to gather
    assert bbox_only.image_ids == image_ids
    summary = bbox_only.summarize(per_category=True)
    assert [summary["bbox"][name] for name in STAT_NAMES] == pytest.approx(expected["bbox"], abs=1e-6)
    # Every category has ground truth here, so the mean of the per-category APs is the AP.
    with_objects = {coco_gt.cats[a["category_id"]]["name"] for a in coco_gt.dataset["annotations"] if not a["iscrowd"]}
    assert set(summary["per_category"]["bbox"]) == with_objects and len(with_objects) == 70
    assert np.mean(list(summary["per_category"]["bbox"].values())) == pytest.approx(summary["bbox"]["AP"], abs=1e-12)
    segm = evaluator.summarize()["segm"]
    assert [segm[name] for name in STAT_NAMES] == pytest.approx(expected["segm"], abs=1e-6)


def test_coco_ground_truth_as_detections_scores_1():
    gt_path, *_ = coco_files()
    coco_gt = load_coco_ground_truth(gt_path)
    anns = [a for a in coco_gt.dataset["annotations"] if not a["iscrowd"]]
    bbox = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in anns]
    segm = []
    for a in anns:
        rle = coco_gt.annToRLE(a)
        rle["counts"] = rle["counts"].decode("ascii")
        segm.append({"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": rle, "score": 1.0})
    summary = evaluate_coco(coco_gt, {"bbox": bbox, "segm": segm})
    # pycocotools' precision is tp / (tp + fp + eps): 1 - 2e-16 for a single object, hence the tolerance.
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100"):
            assert summary[iou_type][key] == pytest.approx(1.0, abs=1e-12), (iou_type, key)


def test_coco_rejects_what_it_cannot_evaluate():
    gt_path, *_ = coco_files()
    evaluator = CocoEvaluator(gt_path, iou_types=("bbox", "segm"))
    image_id = next(iter(evaluator.coco_gt.imgs))
    one = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}
    with pytest.raises(EvaluationInputError, match="image id 123456789 is not in the COCO ground truth"):
        evaluator.update({123456789: one})
    with pytest.raises(EvaluationInputError, match="needs 'masks'"):
        evaluator.update({image_id: one})
    with pytest.raises(EvaluationInputError, match="maps to category 12, which is not in the ground truth"):
        CocoEvaluator(gt_path).update({image_id: {**one, "labels": torch.tensor([12])}})  # 12: unused COCO id
    with pytest.raises(EvaluationInputError, match="model label 7 has no entry"):
        CocoEvaluator(gt_path, label_to_category={1: 1}).update({image_id: {**one, "labels": torch.tensor([7])}})
    with pytest.raises(RuntimeError, match="call update"):
        CocoEvaluator(gt_path).summarize()


def test_coco_no_detections_score_0():
    gt_path, *_ = coco_files()
    evaluator = CocoEvaluator(gt_path)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    evaluator.update({i: empty for i in evaluator.coco_gt.imgs})
    assert evaluator.summarize()["bbox"]["AP"] == 0.0


def with_background(output: dict, count: int) -> dict:
    """``output`` with ``count`` detections of label 0 (RetinaNet's background channel) in front, scored highest."""
    extra = {
        "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]], dtype=output["boxes"].dtype).repeat(count, 1),
        "scores": torch.full((count,), 0.99, dtype=output["scores"].dtype),
        "labels": torch.zeros(count, dtype=torch.int64),
    }
    if "masks" in output:
        extra["masks"] = torch.ones((count, *output["masks"].shape[1:]), dtype=output["masks"].dtype)
    return {key: torch.cat([extra[key], value]) for key, value in output.items()}


def test_background_detections_are_dropped_and_counted_not_evaluated(tmp_path):
    """Issue 11, item 17: a detector's label 0 never crashes the evaluator and never changes its numbers."""
    gt_path, bbox_results, segm_results, expected = coco_files()
    coco_gt = load_coco_ground_truth(gt_path)
    image_ids = sorted(coco_gt.imgs)
    for iou_type, results in (("bbox", bbox_results), ("segm", segm_results)):
        outputs = to_outputs(json.loads(results.read_text()), image_ids, masks=iou_type == "segm")
        evaluator = CocoEvaluator(coco_gt, iou_types=iou_type)
        evaluator.update({i: with_background(outputs[i], 2 if k % 3 == 0 else 0) for k, i in enumerate(image_ids)})
        assert evaluator.background_detections == 2 * len(image_ids[::3])
        summary = evaluator.summarize()[iou_type]
        assert [summary[name] for name in STAT_NAMES] == pytest.approx(expected[iou_type], abs=1e-6)
    gt = load_voc_ground_truth(write_voc(tmp_path, DOGS))
    voc = VocEvaluator(gt)
    dogs = [r for r in DOG_DETECTIONS if r["category"] == "dog"]
    for name in gt.image_names:
        mine = [r for r in dogs if r["image_id"] == name]
        output = {
            "boxes": torch.tensor([r["box"] for r in mine]).reshape(-1, 4),
            "scores": torch.tensor([r["score"] for r in mine]),
            "labels": torch.full((len(mine),), 12),  # 12: dog
        }
        voc.update({name: with_background(output, 1)})
    assert voc.background_detections == len(gt.image_names)
    assert voc.summarize() == evaluate_voc(gt, dogs)


# ---------------------------------------------------------------------------------------------------------------------
# LVIS
# ---------------------------------------------------------------------------------------------------------------------


def test_lvis_reproduces_lvis_api_reference_results():
    gt, results, reference = lvis_files()
    summary = evaluate_lvis_file(gt, results, per_category=True)
    assert set(summary["bbox"]) == set(reference)
    for key, value in reference.items():
        assert summary["bbox"][key] == pytest.approx(value, abs=1e-6), key
    per_category = summary["per_category"]["bbox"]
    assert np.mean(list(per_category.values())) == pytest.approx(summary["bbox"]["AP"], abs=1e-12)


def test_lvis_evaluator_on_torchvision_outputs_gives_the_reference_numbers():
    gt_path, results_path, reference = lvis_files()
    gt = load_lvis_ground_truth(gt_path)
    evaluator = LvisEvaluator(gt)
    evaluator.update(to_outputs(json.loads(results_path.read_text()), sorted(gt.images)))
    assert evaluator.summarize()["bbox"] == pytest.approx(reference, abs=1e-6)


def test_lvis_ground_truth_as_detections_scores_1():
    gt_path, _, _ = lvis_files()
    gt = load_lvis_ground_truth(gt_path)
    anns = gt.dataset["annotations"]
    bbox = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in anns]
    segm = []
    for a in anns:
        image = gt.images[a["image_id"]]
        rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], image["height"], image["width"]))
        rle["counts"] = rle["counts"].decode("ascii")
        segm.append({"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": rle, "score": 1.0})
    summary = evaluate_lvis(gt, {"bbox": bbox, "segm": segm})
    # lvis-api's precision is tp / (tp + fp + eps): a category with one object scores 1 - 2e-16, hence the tolerance.
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", "APr", "APc", "APf", "AR@300"):
            assert summary[iou_type][key] == pytest.approx(1.0, abs=1e-12), (iou_type, key)


def lvis_dataset(*, neg_of_image_1=(2,), not_exhaustive_of_image_1=(4,)) -> dict:
    """Two 100x100 images, four categories (1 frequent, 2 and 4 common, 3 rare), one 10x10 object each.

    Image 1 holds category 1 and 4; image 2 holds 2 and 3.
    """
    images = [
        {"id": 1, "height": 100, "width": 100, "neg_category_ids": list(neg_of_image_1)},
        {"id": 2, "height": 100, "width": 100, "neg_category_ids": []},
    ]
    images[0]["not_exhaustive_category_ids"] = list(not_exhaustive_of_image_1)
    images[1]["not_exhaustive_category_ids"] = []
    categories = [{"id": c, "name": f"c{c}", "frequency": f} for c, f in ((1, "f"), (2, "c"), (3, "r"), (4, "c"))]
    anns = [(1, 1, [0, 0, 10, 10]), (1, 4, [50, 50, 10, 10]), (2, 2, [0, 0, 10, 10]), (2, 3, [50, 50, 10, 10])]
    annotations = [
        {"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": 100.0, "segmentation": []}
        for i, (im, c, b) in enumerate(anns)
    ]
    return {"images": images, "categories": categories, "annotations": annotations}


LVIS_DETECTIONS = [
    # category 1: a better-scored false positive before the true positive: precision 1/2 at recall 1.
    {"image_id": 1, "category_id": 1, "bbox": [80, 0, 10, 10], "score": 0.95},
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
    # category 2: known absent from image 1 (negative), so a detection there is a false positive.
    {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.99},
    {"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.5},
    # category 3: nothing is known of it in image 1, so a detection there is dropped.
    {"image_id": 1, "category_id": 3, "bbox": [20, 20, 10, 10], "score": 0.99},
    {"image_id": 2, "category_id": 3, "bbox": [50, 50, 10, 10], "score": 0.5},
    # category 4: not exhaustively annotated in image 1, so an unmatched detection there is ignored.
    {"image_id": 1, "category_id": 4, "bbox": [0, 80, 10, 10], "score": 0.99},
    {"image_id": 1, "category_id": 4, "bbox": [50, 50, 10, 10], "score": 0.5},
]


def test_lvis_federated_rules_by_hand():
    summary = evaluate_lvis(lvis_dataset(), {"bbox": LVIS_DETECTIONS}, per_category=True)
    assert summary["per_category"]["bbox"] == pytest.approx({"c1": 0.5, "c2": 0.5, "c3": 1.0, "c4": 1.0}, abs=1e-12)
    bbox = summary["bbox"]
    assert (bbox["AP"], bbox["APr"], bbox["APc"], bbox["APf"]) == pytest.approx((0.75, 1.0, 0.75, 0.5), abs=1e-12)
    assert bbox["AR@300"] == 1.0 and bbox["APs"] == pytest.approx(0.75) and bbox["APm"] == bbox["APl"] == -1.0

    # Without the negative label, category 2's detection in image 1 is dropped; with category 4 exhaustive, the
    # unmatched detection is a false positive.
    dataset = lvis_dataset(neg_of_image_1=(), not_exhaustive_of_image_1=())
    plain = evaluate_lvis(dataset, {"bbox": LVIS_DETECTIONS}, per_category=True)
    assert plain["per_category"]["bbox"] == pytest.approx({"c1": 0.5, "c2": 1.0, "c3": 1.0, "c4": 0.5}, abs=1e-12)


def test_lvis_keeps_the_best_300_detections_of_each_image():
    dataset = lvis_dataset()
    # 300 false positives of category 1 in image 1, all scored above its true positive: the true positive is the
    # 301st and is cut; with one false positive fewer it is kept, at precision 1/300.
    false_positives = [
        {"image_id": 1, "category_id": 1, "bbox": [80, 80, 10, 10], "score": 0.95 - i * 1e-4} for i in range(300)
    ]
    hit = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}
    cut = evaluate_lvis(dataset, {"bbox": [hit, *false_positives]}, per_category=True)
    kept = evaluate_lvis(dataset, {"bbox": [hit, *false_positives[:299]]}, per_category=True)
    assert cut["per_category"]["bbox"]["c1"] == 0.0 and cut["bbox"]["AR@300"] < 1.0
    assert kept["per_category"]["bbox"]["c1"] == pytest.approx(1 / 300, abs=1e-9)
    limited = evaluate_lvis(dataset, {"bbox": [hit, *false_positives[:2]]}, max_dets_per_image=2)
    assert "AR@2" in limited["bbox"] and limited["bbox"]["APf"] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------------------------------


def write_voc(root: Path, images: dict[str, list[tuple]], *, year: int = 2007, image_set: str = "test") -> Path:
    """A VOCdevkit folder: ``images`` maps names to objects ``(class, (xmin, ymin, xmax, ymax), difficult)``."""
    year_dir = root / f"VOC{year}"
    (year_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    (year_dir / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (year_dir / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{n}\n" for n in images))
    for name, objects in images.items():
        xml = [f"<annotation><filename>{name}.jpg</filename><size><width>100</width><height>80</height></size>"]
        for cls, (x1, y1, x2, y2), difficult in objects:
            xml.append(
                f"<object><name>{cls}</name><pose>Left</pose><truncated>0</truncated><difficult>{int(difficult)}"
                f"</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
                "</object>"
            )
        (year_dir / "Annotations" / f"{name}.xml").write_text("".join(xml) + "</annotation>")
    return root


def det(image: str, box, score: float, category: str = "dog") -> dict:
    """A VOC result; ``box`` in XML coordinates, moved to the 0-based frame that results use."""
    x1, y1, x2, y2 = box
    return {"image_id": image, "category": category, "box": [x1 - 1, y1 - 1, x2, y2], "score": score}


# Four dogs and one difficult dog in three images; six detections, in score order:
# TP, FP, TP, (on the difficult dog: ignored), TP, FP (a duplicate). The fourth dog is missed.
DOGS = {
    "a": [("dog", (1, 1, 10, 10), False), ("dog", (31, 1, 40, 10), False)],
    "b": [("dog", (1, 1, 10, 10), False), ("dog", (51, 51, 60, 60), True)],
    "c": [("dog", (1, 1, 10, 10), False), ("cat", (1, 1, 10, 10), False)],
}
DOG_DETECTIONS = [
    det("a", (1, 1, 10, 10), 0.9),
    det("b", (71, 1, 80, 10), 0.8),
    det("b", (1, 1, 10, 10), 0.7),
    det("b", (51, 51, 60, 60), 0.6),
    det("c", (1, 1, 10, 10), 0.5),
    det("a", (1, 1, 10, 10), 0.4),
    det("c", (1, 1, 10, 10), 0.95, category="cat"),
]


def test_voc_11_point_ap_by_hand_with_difficult_ignored(tmp_path):
    gt = load_voc_ground_truth(write_voc(tmp_path, DOGS), year=2007, image_set="test")
    summary = evaluate_voc(gt, DOG_DETECTIONS, per_category=True)
    # recall / precision: .25/1, .25/.5, .5/.667, (ignored), .75/.75, .75/.6. The best precision at recall >= t is 1
    # for t = 0, .1, .2, .75 for t = .3 ... .7, and 0 for t = .8, .9, 1.
    dog = (3 * 1.0 + 5 * 0.75) / 11
    assert summary["per_category"]["bbox"] == pytest.approx({"dog": dog, "cat": 1.0}, abs=1e-12)
    # Every match has IoU 1, so each threshold gives the same AP.
    assert summary["bbox"] == pytest.approx({"AP": (dog + 1) / 2, "AP50": (dog + 1) / 2, "AP75": (dog + 1) / 2})
    assert summary["voc07"]["mAP"] == pytest.approx((dog + 1) / 2, abs=1e-12)


def test_voc2012_uses_the_area_under_the_curve_and_voc07_stays_11_point(tmp_path):
    gt = load_voc_ground_truth(write_voc(tmp_path, DOGS, year=2012, image_set="val"), year=2012, image_set="val")
    summary = evaluate_voc(gt, DOG_DETECTIONS, per_category=True)
    # envelope 1 up to recall .25, .75 up to .75, nothing beyond: .25 * 1 + .5 * .75
    assert summary["per_category"]["bbox"]["dog"] == pytest.approx(0.25 + 0.5 * 0.75, abs=1e-12)
    assert summary["voc07"]["mAP"] == pytest.approx(((3 + 5 * 0.75) / 11 + 1) / 2, abs=1e-12)


def test_voc_ap_at_several_iou_thresholds(tmp_path):
    gt = load_voc_ground_truth(write_voc(tmp_path, {"a": [("dog", (1, 1, 10, 10), False)]}))
    # 10x8 of a 10x10 object: IoU exactly 0.8, a true positive at 0.50 ... 0.75 and not at 0.80 (VOC's ">").
    summary = evaluate_voc(gt, [det("a", (1, 1, 10, 8), 0.9)])
    assert summary["bbox"] == {"AP": pytest.approx(0.6, abs=1e-12), "AP50": 1.0, "AP75": 1.0}
    # VOC's +1 pixel convention: columns 1..10 and 4..13 share 7 of 13 columns, IoU 7/13 > 0.5, a true positive;
    # the corners' plain IoU would be 54/108 = 0.5, not above. Columns 7..16 share 4 of 16: a false positive.
    assert evaluate_voc(gt, [det("a", (4, 1, 13, 10), 0.9)])["bbox"]["AP50"] == 1.0
    assert evaluate_voc(gt, [det("a", (7, 1, 16, 10), 0.9)])["bbox"]["AP50"] == 0.0


def test_voc_a_detection_whose_best_object_is_taken_is_a_false_positive(tmp_path):
    # Two overlapping dogs; the second detection overlaps the taken first dog most (IoU 1) and the second dog with
    # IoU 8/12: VOC makes it a false positive where COCO would match it to the second dog.
    gt = load_voc_ground_truth(write_voc(tmp_path, {"a": [("dog", (1, 1, 10, 10), 0), ("dog", (3, 1, 12, 10), 0)]}))
    summary = evaluate_voc(gt, [det("a", (1, 1, 10, 10), 0.9), det("a", (1, 1, 10, 10), 0.8)])
    assert summary["voc07"]["mAP"] == pytest.approx(6 / 11, abs=1e-12)  # recall .5 at precision 1, then nothing


def test_voc_ap_function_by_hand():
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11, abs=1e-12)
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=True) == 0.0
    # detectron2's recall points come from np.arange(0, 1.1, 0.1), whose fourth is 0.30000000000000004: a recall of
    # exactly 3/10 reaches 3 points, not 4.
    assert voc_ap(np.array([0.1, 0.2, 0.3]), np.ones(3), use_07_metric=True) == pytest.approx(3 / 11, abs=1e-12)


def test_voc_evaluator_ground_truth_as_detections_scores_1_and_skips_classes_without_objects(tmp_path):
    objects = {
        "000001": [("dog", (12, 20, 60, 70), False), ("person", (1, 1, 100, 80), False), ("dog", (5, 5, 9, 9), True)],
        "000002": [("dog", (40, 30, 90, 75), False), ("dog", (45, 33, 88, 79), False)],
        "000003": [],
    }
    gt = load_voc_ground_truth(write_voc(tmp_path, objects))
    evaluator = VocEvaluator(gt)
    label_of = {name: i + 1 for i, name in enumerate(gt.class_names)}
    for position, image in enumerate(gt.image_names):
        objs = gt.images[image].objects
        key = image if position != 1 else position  # images by name, or by their position in the image set
        evaluator.update(
            {
                key: {
                    "boxes": torch.tensor([o.box for o in objs]).reshape(-1, 4),
                    "scores": torch.ones(len(objs)),
                    "labels": torch.tensor([label_of[o.name] for o in objs], dtype=torch.int64),
                }
            }
        )
    summary = evaluator.summarize(per_category=True)
    assert summary["bbox"] == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0} and summary["voc07"] == {"mAP": 1.0}
    # Only dog and person have objects: the 18 other classes are left out of the means.
    assert summary["per_category"]["bbox"] == {"dog": 1.0, "person": 1.0}
    assert evaluator.results("bbox")[0] == {
        "image_id": "000001",
        "category": "dog",
        "box": [11, 19, 60, 70],
        "score": 1,
    }
    with pytest.raises(EvaluationInputError, match="neither an image name"):
        evaluator.update({7: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}})
    with pytest.raises(EvaluationInputError, match="model label 21 has no entry"):
        evaluator.update(
            {"000003": {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([21])}}
        )


def test_parse_voc_xml(tmp_path):
    path = tmp_path / "000009.xml"
    path.write_text(
        "<annotation><filename>000009.jpg</filename><size><width>500</width><height>375</height><depth>3</depth>"
        "</size><object><name> horse </name><bndbox><xmin>69</xmin><ymin>172.5</ymin><xmax>270</xmax>"
        "<ymax>330</ymax></bndbox></object><object><name>person</name><truncated>1</truncated><difficult>1"
        "</difficult><bndbox><xmin>150</xmin><ymin>141</ymin><xmax>229</xmax><ymax>284</ymax></bndbox></object>"
        "</annotation>"
    )
    image = parse_voc_xml(path)
    assert (image.name, image.filename, image.width, image.height) == ("000009", "000009.jpg", 500, 375)
    horse, person = image.objects
    assert (horse.name, horse.bndbox, horse.box, horse.difficult) == (
        "horse",
        (69, 172.5, 270, 330),
        (68, 171.5, 270, 330),
        False,
    )
    assert person.difficult and person.truncated


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<annotation><object><name>dog</name>", "is malformed XML"),
        ("<annotation><object><bndbox/></object></annotation>", "object 0 has no <name>"),
        ("<annotation><object><name>dog</name></object></annotation>", r"object 0 \(dog\) has no <bndbox>"),
        (
            "<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>x</xmax><ymax>5</ymax>"
            "</bndbox></object></annotation>",
            "<xmax> is 'x'",
        ),
        (
            "<annotation><object><name>dog</name><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
            "</bndbox></object></annotation>",
            "inverted box",
        ),
    ],
)
def test_parse_voc_xml_names_the_file_of_a_broken_annotation(tmp_path, text, message):
    path = tmp_path / "broken.xml"
    path.write_text(text)
    with pytest.raises(VocAnnotationError, match=message) as error:
        parse_voc_xml(path)
    assert str(path) in str(error.value)


def test_voc_ground_truth_errors(tmp_path):
    root = write_voc(tmp_path, {"a": [("unicorn", (1, 1, 5, 5), False)]})
    with pytest.raises(VocAnnotationError, match="class 'unicorn' is not one of the 20 classes"):
        load_voc_ground_truth(root)
    assert load_voc_ground_truth(root / "VOC2007", class_names=("unicorn",)).class_names == ("unicorn",)
    with pytest.raises(VocAnnotationError, match="trainval.txt does not exist"):
        load_voc_ground_truth(root, image_set="trainval")
    with pytest.raises(VocAnnotationError, match="neither a VOCdevkit folder holding VOC2012"):
        load_voc_ground_truth(root, year=2012)


# ---------------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_the_eval_json_of_each_format(capsys, tmp_path):
    gt, bbox_results, segm_results, expected = coco_files()
    both = tmp_path / "both.json"  # detectron2 writes bbox and segmentation into one file
    both.write_text(json.dumps([{**r, "bbox": [0, 0, 1, 1]} for r in json.loads(segm_results.read_text())]))
    code, out, _ = run_cli(capsys, "--format", "coco", "--gt", gt, "--results", both, "--iou-type", "segm")
    assert code == 0
    summary = json.loads(out)  # stdout is the JSON alone: pycocotools' table went to stderr
    assert [summary["segm"][name] for name in STAT_NAMES] == pytest.approx(expected["segm"], abs=1e-6)

    lvis_gt, lvis_results, reference = lvis_files()
    code, out, _ = run_cli(capsys, "--format", "lvis", "--gt", lvis_gt, "--results", lvis_results)
    assert code == 0 and json.loads(out)["bbox"]["APc"] == pytest.approx(reference["APc"], abs=1e-6)

    write_voc(tmp_path / "VOCdevkit", DOGS)
    (tmp_path / "voc.json").write_text(json.dumps(DOG_DETECTIONS))
    code, out, _ = run_cli(
        capsys, "--format", "voc", "--gt", tmp_path / "VOCdevkit", "--results", tmp_path / "voc.json"
    )
    assert code == 0 and set(json.loads(out)) == {"bbox", "voc07"}
    assert json.loads(out)["voc07"]["mAP"] == pytest.approx(((3 + 5 * 0.75) / 11 + 1) / 2, abs=1e-12)


def test_cli_fails_with_one_line_for_bad_input(capsys, tmp_path):
    gt, bbox_results, _, _ = coco_files()
    lvis_gt, lvis_results, _ = lvis_files()
    expected = {
        "missing.json": "results file .*missing.json does not exist",
        "malformed.json": "results file .*malformed.json is not valid JSON",
        "not_a_list.json": "must be a JSON list",
        "unknown_category.json": "entry 0: category_id 99999 is not in the ground truth",
        "unknown_image.json": "entry 0: image_id 1 is not in the ground truth",
        "bad_box.json": r"entry 0: 'bbox' must be \[x, y, w, h\]",
    }
    for fmt, gt_path, results in (("coco", gt, bbox_results), ("lvis", lvis_gt, lvis_results)):
        first = json.loads(results.read_text())[0]
        (tmp_path / "malformed.json").write_text("[{")
        (tmp_path / "not_a_list.json").write_text(json.dumps(first))
        (tmp_path / "unknown_category.json").write_text(json.dumps([{**first, "category_id": 99999}]))
        (tmp_path / "unknown_image.json").write_text(json.dumps([{**first, "image_id": 1}]))
        (tmp_path / "bad_box.json").write_text(json.dumps([{**first, "bbox": [1, 2, 3]}]))
        for name, message in expected.items():
            code, out, err = run_cli(capsys, "--format", fmt, "--gt", gt_path, "--results", tmp_path / name)
            assert code == 1 and out == "", (fmt, name)
            assert len(err.strip().splitlines()) == 1 and re.search(message, err), (fmt, name, err)
    code, _, err = run_cli(capsys, "--format", "coco", "--gt", tmp_path / "nothing.json", "--results", bbox_results)
    assert code == 1 and "COCO ground truth" in err and "does not exist" in err
    code, _, err = run_cli(capsys, "--format", "lvis", "--gt", gt, "--results", lvis_results)
    assert code == 1 and "has frequency None" in err and "not an LVIS file" in err

    write_voc(tmp_path / "VOCdevkit", DOGS)
    (tmp_path / "voc.json").write_text(json.dumps([det("zzz", (1, 1, 2, 2), 0.5)]))
    code, _, err = run_cli(
        capsys, "--format", "voc", "--gt", tmp_path / "VOCdevkit", "--results", tmp_path / "voc.json"
    )
    assert code == 1 and "image_id 'zzz' is not in the image set 'test'" in err
    (tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "b.xml").write_text("<annotation>")
    code, _, err = run_cli(
        capsys, "--format", "voc", "--gt", tmp_path / "VOCdevkit", "--results", tmp_path / "voc.json"
    )
    assert code == 1 and "b.xml is malformed XML" in err and len(err.strip().splitlines()) == 1


def test_cli_runs_as_a_module():
    gt, bbox_results, _, expected = coco_files()
    command = [sys.executable, "-m", "detpretrain.evaluate", "--format", "coco", "--gt", gt, "--results", bbox_results]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True)
    summary = json.loads(done.stdout)
    assert [summary["bbox"][name] for name in STAT_NAMES] == pytest.approx(expected["bbox"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed evaluation
# ---------------------------------------------------------------------------------------------------------------------


def _distributed_worker(rank: int, world_size: int, store: str, voc_root: str, out_dir: str) -> None:
    """One of two gloo ranks: evaluate its share of the images and gather; rank 0 also summarizes."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        coco_gt, coco_results, _, _ = coco_files()
        coco = CocoEvaluator(coco_gt)
        images = sorted(coco.coco_gt.imgs)
        # DistributedSampler's split, with the padding that repeats the first image on the last rank.
        mine = images[rank::world_size] + (images[:1] if rank == world_size - 1 else [])
        outputs = to_outputs(json.loads(Path(coco_results).read_text()), mine)
        coco.update({image_id: with_background(output, 1) for image_id, output in outputs.items()})
        coco.synchronize()

        voc = VocEvaluator(load_voc_ground_truth(voc_root))
        names = sorted(voc.gt.images)[rank::world_size]
        dogs = [r for r in DOG_DETECTIONS if r["category"] == "dog"]
        voc.update(
            {
                n: {
                    "boxes": torch.tensor([r["box"] for r in dogs if r["image_id"] == n]).reshape(-1, 4),
                    "scores": torch.tensor([r["score"] for r in dogs if r["image_id"] == n]),
                    "labels": torch.full((sum(r["image_id"] == n for r in dogs),), 12),  # 12: dog
                }
                for n in names
            }
        )
        voc.synchronize()
        gathered = {"coco": coco.results("bbox"), "voc": voc.results("bbox"), "background": coco.background_detections}
        if rank == 0:
            gathered["summaries"] = {"coco": coco.summarize(), "voc": voc.summarize()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_gathers_every_rank(tmp_path):
    coco_gt, coco_results, _, expected = coco_files()
    voc_root = write_voc(tmp_path / "VOCdevkit", DOGS)
    mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "store"), str(voc_root), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    # Every rank holds every image's detections once, the padded duplicate included only once.
    assert rank0["coco"] == rank1["coco"] and len(rank0["coco"]) == len(json.loads(coco_results.read_text()))
    assert rank0["background"] == rank1["background"] == 100  # one per image, the padded duplicate counted once
    assert rank0["voc"] == rank1["voc"] and len(rank0["voc"]) == 6
    coco = rank0["summaries"]["coco"]["bbox"]
    assert [coco[name] for name in STAT_NAMES] == pytest.approx(expected["bbox"], abs=1e-6)
    dogs = [r for r in DOG_DETECTIONS if r["category"] == "dog"]
    assert rank0["summaries"]["voc"] == evaluate_voc(load_voc_ground_truth(voc_root), dogs)
