"""Bad images cost nothing (§3.1 extraction): damaged copies of coco128 photos are skipped, counted and reported,
oddly-encoded ones are converted to RGB and used, and training runs on what was extracted."""

import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

import train_jigsaw
from detpretrain.jigsaw import (
    ImageRecord,
    JigsawSamples,
    coco_image_records,
    encode_sample,
    extract_samples,
    plan_samples,
)

BAD = {
    "truncated.jpg": "undecodable: image file is truncated",
    "text.jpg": "undecodable: not an image format Pillow can identify",
    "empty.jpg": "empty file (0 bytes)",
    "wrong_size.jpg": "size mismatch: the file is {w}x{h}, the annotations say {w_json}x{h}",
}
# How each damaged or oddly-encoded file is made from a photo: write(photo path, its RGB pixels, target path).
WRITERS = {
    "truncated.jpg": lambda photo, picture, target: target.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2]),
    "text.jpg": lambda photo, picture, target: target.write_text("this is not an image"),
    "empty.jpg": lambda photo, picture, target: target.write_bytes(b""),
    "wrong_size.jpg": lambda photo, picture, target: shutil.copy(photo, target),  # the json says 16 px wider
    "cmyk.jpg": lambda photo, picture, target: picture.convert("CMYK").save(target, quality=95),
    "gray.jpg": lambda photo, picture, target: picture.convert("L").save(target, quality=95),
    "palette.png": lambda photo, picture, target: picture.convert("P", palette=Image.Palette.ADAPTIVE).save(target),
    # 16-bit grayscale, 0..65535: Pillow's own convert("RGB") would clip it to white
    "gray16.png": lambda photo, picture, target: Image.fromarray(
        np.asarray(picture.convert("L")).astype(np.uint16) * 257
    ).save(target),
    "png_named.jpg": lambda photo, picture, target: picture.save(target, format="PNG"),
}
ODD = ("cmyk.jpg", "gray.jpg", "palette.png", "gray16.png", "png_named.jpg")


def rgb(path):
    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def damaged_coco(coco128, tmp_path_factory):
    """40 coco128 photos, plus 9 entries made from the photos with the most boxes: 4 that cannot be used (BAD) and 5
    in modes other than 8-bit RGB JPEG (ODD). Returns (image dir, json, {name: expected RGB pixels} for ODD)."""
    root = tmp_path_factory.mktemp("damaged")
    data = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    images = sorted(data["images"], key=lambda image: image["file_name"])[:40]
    boxes = defaultdict(list)
    for ann in data["annotations"]:
        boxes[ann["image_id"]].append(ann)
    (root / "images").mkdir()
    for image in images:
        shutil.copy(coco128 / "images" / image["file_name"], root / "images")
    sources = sorted(images, key=lambda image: -sum(not a["iscrowd"] for a in boxes[image["id"]]))[:9]
    expected = {}
    entries, annotations = list(images), [a for image in images for a in boxes[image["id"]]]
    for k, (name, source) in enumerate(zip([*BAD, *ODD], sources, strict=True)):
        photo, target = coco128 / "images" / source["file_name"], root / "images" / name
        picture = rgb(photo)
        WRITERS[name](photo, picture, target)
        if name == "gray16.png":
            expected[name] = np.asarray(picture.convert("L").convert("RGB"))  # its top 8 bits
        elif name in ODD:
            expected[name] = np.asarray(rgb(target))  # what Pillow decodes, as RGB
        image_id = 10**6 + k
        width = source["width"] + 16 if name == "wrong_size.jpg" else source["width"]
        entries.append({"id": image_id, "file_name": name, "width": width, "height": source["height"]})
        annotations += [
            {**a, "id": 10**7 + 100 * k + j, "image_id": image_id} for j, a in enumerate(boxes[source["id"]])
        ]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({**data, "images": entries, "annotations": annotations}))
    return root / "images", ann_file, expected


def test_bad_images_are_skipped_counted_and_reported_and_training_runs(damaged_coco, tmp_path):
    image_dir, ann_file, expected = damaged_coco
    flags = ["--train-images", str(image_dir), "--train-ann", str(ann_file), "--shard-size", "8"]
    flags += ["--max-bad-image-fraction", "0.1"]  # 4 of 49 bad: above the default 1%
    flags += ["--model", "test_resnet", "--template", "tiny96", "--device", "cpu", "--num-workers", "0", "--quiet"]
    flags += ["--iters", "2", "--warmup-iters", "1", "--batch-size", "4", "--erf-images", "1", "--log-every", "1"]
    export = train_jigsaw.main(train_jigsaw.get_args_parser().parse_args([*flags, "--output-dir", str(tmp_path)]))
    assert (export / "model.safetensors").is_file()
    assert all(np.isfinite(json.loads(line)["loss"]) for line in (tmp_path / "log.jsonl").read_text().splitlines())

    records = coco_image_records(ann_file, image_dir).records
    index = {r.file_name.rsplit("/", 1)[-1]: i for i, r in enumerate(records)}
    samples = JigsawSamples(tmp_path / "samples.jigsaw")
    skipped = [json.loads(line) for line in (tmp_path / "samples.jigsaw" / "skipped.jsonl").read_text().splitlines()]
    assert [entry["file_name"] for entry in skipped] == [str(image_dir / name) for name in BAD]
    wrong = records[index["wrong_size.jpg"]]
    for entry, (name, reason) in zip(skipped, BAD.items(), strict=True):
        assert entry["image_id"] == records[index[name]].image_id
        assert entry["reason"].startswith(reason.format(w=wrong.width - 16, w_json=wrong.width, h=wrong.height))
    # Counted: the skipped images' planned samples are gone, everything else is there.
    planned = plan_samples(records, seed=0)
    lost = torch.isin(planned.image_index, torch.tensor([index[name] for name in BAD]))
    stats = samples.header["stats"]
    assert stats["skipped_images"] == 4 and stats["num_samples"] == len(samples) == int((~lost).sum())
    assert stats["skipped_positives"] + stats["skipped_negatives"] == int(lost.sum()) > 0
    assert torch.equal(samples.boxes, planned.boxes[~lost])
    # Converted and used: each oddly-encoded image's samples are its RGB pixels, cropped and stored as a sample is.
    for name in ODD:
        mine = (samples.image_index == index[name]).nonzero().flatten().tolist()
        assert mine, name
        for i in mine:
            x1, y1, x2, y2 = samples.boxes[i].tolist()
            stored = encode_sample(Image.fromarray(expected[name][y1:y2, x1:x2]))
            assert samples.encoded(i).numpy().tobytes() == stored, name


def test_a_missing_image_is_skipped_and_named(coco128, tmp_path):
    photo = coco128 / "images" / "000000000009.jpg"
    with Image.open(photo) as image:
        width, height = image.size
    records = [
        ImageRecord(
            image_id=i,
            file_name=str(path),
            width=width,
            height=height,
            gt_boxes=torch.tensor([[10.0, 20.0, 200.0, 300.0], [300.0, 40.0, 400.0, 100.0]]),
            gt_labels=torch.tensor([1, 2]),
            gt_crowd=torch.tensor([False, False]),
        )
        for i, path in enumerate([photo, tmp_path / "gone.jpg"])
    ]
    stats = extract_samples(records, class_names=["background", "a", "b"], output_dir=tmp_path / "s")
    assert stats["skipped_images"] == 1 and stats["skipped_positives"] == 2 and stats["num_samples"] >= 2
    line = json.loads((tmp_path / "s" / "skipped.jsonl").read_text())
    assert line == {"file_name": str(tmp_path / "gone.jpg"), "image_id": 1, "reason": "missing: no such file"}
    assert (JigsawSamples(tmp_path / "s").image_index == 0).all()
