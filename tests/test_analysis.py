"""The IoU / feature-similarity analysis of PreDet §5.5, Fig. 5(b): sampler, statistics, pooling, command line."""

import json
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import detpretrain
from detpretrain import analysis
from detpretrain.analysis.__main__ import main
from detpretrain.backbone import TimmFPN, create_body
from detpretrain.engine import sample_generator

TINY = ["--backbone", "test_resnet", "--no-pretrained", "--features", "backbone", "--pairs-per-image", "64"]
TINY += ["--device", "cpu"]


def sizes(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 2) width and height."""
    return boxes[:, 2:] - boxes[:, :2]


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of a[i] with b[i], computed here independently of the package (float64)."""
    a, b = a.double(), b.double()
    width = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    height = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = width * height
    return inter / (sizes(a).prod(dim=1) + sizes(b).prod(dim=1) - inter)


# ---------------------------------------------------------------------------------------------------------- sampler
def test_pairs_have_the_drawn_iou_uniform_in_range_and_lie_inside_the_image():
    height, width, n = 480, 640, 9000
    boxes_a, boxes_b, ious = analysis.sample_box_pairs((height, width), n, generator=torch.Generator().manual_seed(0))
    achieved = paired_iou(boxes_a, boxes_b)
    assert torch.allclose(achieved, ious.double(), atol=1e-4)
    assert achieved.min() >= 0.05 - 1e-4 and achieved.max() <= 0.95 + 1e-4
    counts, _ = np.histogram(achieved.numpy(), bins=9, range=(0.05, 0.95))
    assert np.all(np.abs(counts - n / 9) < 0.15 * n / 9), counts  # 1000 per bin; 15% is > 4 standard deviations
    for boxes in (boxes_a, boxes_b):
        assert boxes[:, 0].min() >= -1e-3 and boxes[:, 1].min() >= -1e-3
        assert boxes[:, 2].max() <= width + 1e-3 and boxes[:, 3].max() <= height + 1e-3
    # b is a translated a: same size, so a pair has one area and one size bucket.
    assert torch.allclose(sizes(boxes_a), sizes(boxes_b), atol=1e-3)
    scale = torch.sqrt(sizes(boxes_a).prod(dim=1))
    assert scale.min() >= 16 - 1e-3 and scale.max() <= analysis.max_box_scale((height, width)) + 1e-3
    # The scale is drawn independently of the IoU: the IoU is uniform within every size bucket too.
    areas = scale**2
    for low, high in analysis.AREA_BUCKETS.values():
        in_bucket = achieved[(areas >= low) & (areas < high)]
        assert len(in_bucket) > 1000 and abs(float(in_bucket.mean()) - 0.5) < 0.02


def test_pairs_are_deterministic_and_a_too_small_image_is_refused():
    first = analysis.sample_box_pairs((64, 96), 32, generator=torch.Generator().manual_seed(3))
    again = analysis.sample_box_pairs((64, 96), 32, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    with pytest.raises(analysis.AnalysisInputError, match=r"use larger images \(--image-size\)"):
        analysis.sample_box_pairs((32, 96), 4, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------- statistics
def test_pearson_matches_a_hand_case_and_numpy():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    # deviations (-2, -1, 0, 1, 2) and (-1, -2, 1, 0, 2): sum of products 8, sums of squares 10 and 10
    assert analysis.pearson(x, y) == pytest.approx(0.8, abs=1e-12)
    assert analysis.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    rng = np.random.default_rng(0)
    u = rng.normal(size=50)
    v = 0.3 * u + rng.normal(size=50)
    assert analysis.pearson(u, v) == pytest.approx(np.corrcoef(u, v)[0, 1], abs=1e-12)
    assert analysis.pearson([1.0], [2.0]) is None  # fewer than two pairs
    assert analysis.pearson([1, 2, 3], [4, 4, 4]) is None  # a constant sample


def test_correlation_table_uses_coco_area_buckets():
    ious = np.array([0.1, 0.5, 0.9, 0.2, 0.6, 0.3, 0.8])
    cosines = np.array([0.2, 0.4, 0.9, 0.5, 0.7, 0.1, 0.3])
    areas = np.array([100.0, 500.0, 1023.9, 1024.0, 5000.0, 9216.0, 20000.0])  # 32² = 1024 and 96² = 9216 start buckets
    table = analysis.correlation_table(ious, cosines, areas)
    assert {k: v["pairs"] for k, v in table.items()} == {"small": 3, "medium": 2, "large": 2, "all": 7}
    assert table["small"]["pearson"] == pytest.approx(np.corrcoef(ious[:3], cosines[:3])[0, 1])
    assert table["medium"]["pearson"] == pytest.approx(1.0)  # two points always lie on a line
    assert table["all"]["pearson"] == pytest.approx(np.corrcoef(ious, cosines)[0, 1])
    assert table["all"]["mean_cosine"] == pytest.approx(cosines.mean())
    assert analysis.area_bucket(1024.0) == "medium" and analysis.area_bucket(9215.9) == "medium"


# ---------------------------------------------------------------------------------------------------------- pooling
def linear_map(height: int, width: int, stride: int) -> torch.Tensor:
    """(1, 3, h, w): channels 1, x and y of each cell's centre in image pixels. Bilinear sampling of an affine map is
    exact, so ROIAlign (aligned=True) of a bin gives (1, bin centre x, bin centre y) away from the map's border."""
    ys, xs = torch.meshgrid(torch.arange(height // stride), torch.arange(width // stride), indexing="ij")
    centres = torch.stack((torch.ones_like(xs), xs, ys)).float()
    centres[1:] = (centres[1:] + 0.5) * stride
    return centres[None]


def expected_pooled(box, size: int) -> np.ndarray:
    """(3 * size * size,) the exact ROIAlign of linear_map over a box: each bin's centre."""
    x1, y1, x2, y2 = box
    bin_x = x1 + (np.arange(size) + 0.5) * (x2 - x1) / size
    bin_y = y1 + (np.arange(size) + 0.5) * (y2 - y1) / size
    grid_y, grid_x = np.meshgrid(bin_y, bin_x, indexing="ij")
    return np.stack((np.ones_like(grid_x), grid_x, grid_y)).ravel()


def expected_cosine(box_a, box_b, size: int) -> float:
    a, b = expected_pooled(box_a, size), expected_pooled(box_b, size)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("size", [1, 7])
def test_roi_cosine_similarity_is_exact_on_a_hand_built_map(size):
    stride = 8
    feature_map = linear_map(128, 128, stride)
    # Inside [stride / 2, 128 - stride / 2]: every ROIAlign sample falls between cell centres.
    boxes_a = torch.tensor([[8.0, 8.0, 40.0, 56.0], [20.0, 30.0, 100.0, 90.0], [50.0, 50.0, 60.0, 70.0]])
    boxes_b = torch.tensor([[24.0, 8.0, 56.0, 56.0], [30.0, 35.0, 110.0, 95.0], [50.0, 50.0, 60.0, 70.0]])
    cosines = analysis.roi_cosine_similarity(feature_map, boxes_a, boxes_b, stride=stride, output_size=size)
    expected = [expected_cosine(a, b, size) for a, b in zip(boxes_a.tolist(), boxes_b.tolist(), strict=True)]
    assert cosines.tolist() == pytest.approx(expected, abs=1e-6)
    assert cosines[2] == pytest.approx(1.0)
    assert cosines[0] < cosines[1] < 1  # a shift by half the box is less similar than a shift by an eighth


class StubBackbone(torch.nn.Module):
    """A backbone whose level 1 is linear_map (stride 8) and level 0 a constant that must not be pooled."""

    def forward(self, images):
        height, width = images.shape[-2:]
        return [torch.full((1, 3, height // 4, width // 4), 7.0), linear_map(height, width, 8)]


def test_measure_image_pools_the_requested_level_at_its_stride():
    image = torch.zeros(3, 128, 160, dtype=torch.uint8)
    out = analysis.measure_image(
        analysis.backbone_map_pooler(StubBackbone(), level=1, stride=8, output_size=7),
        image,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        num_pairs=16,
        generator=torch.Generator().manual_seed(0),
    )
    # The same generator state gives the same pairs: rebuild them to know which boxes were pooled.
    boxes_a, boxes_b, ious = analysis.sample_box_pairs((128, 160), 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["ious"], ious) and torch.equal(out["boxes"], boxes_a)
    assert out["areas"].tolist() == pytest.approx(sizes(boxes_a).prod(dim=1).tolist(), rel=1e-5)
    # Boxes touching the map's border are clamped by ROIAlign (not linear there): compare the interior ones only.
    interior = ((torch.cat((boxes_a, boxes_b), 1) >= 4) & (torch.cat((boxes_a, boxes_b), 1) <= 124)).all(1)
    assert interior.sum() >= 4
    expected = [expected_cosine(a, b, 7) for a, b in zip(boxes_a.tolist(), boxes_b.tolist(), strict=True)]
    assert out["cosines"][interior].tolist() == pytest.approx(np.array(expected)[interior.numpy()], abs=1e-6)


def test_fpn_pooler_pools_each_box_at_the_level_its_size_assigns():
    """FPN Eq. 1 with PreDet's canonical 224 px at P4, clamped to P2-P5: a map per level filled with its number."""

    def stub_fpn(pixels):
        height, width = pixels.shape[-2:]
        names = ("0", "1", "2", "3", "pool")  # TimmFPN's names of P2..P6
        return {
            name: torch.full((1, 1, height >> level, width >> level), float(level))
            for name, level in zip(names, range(2, 7), strict=True)
        }

    pool = analysis.fpn_pooler(stub_fpn, strides=(4, 8, 16, 32), output_size=7)
    scales = torch.tensor([16.0, 111.0, 112.0, 223.0, 224.0, 448.0, 1000.0])
    boxes = torch.stack((torch.zeros(7), torch.zeros(7), scales, scales), dim=1)
    pooled = pool(torch.zeros(1, 3, 1024, 1024), boxes)
    assert pooled.shape == (7, 1, 7, 7)
    assert pooled.mean(dim=(1, 2, 3)).tolist() == [2.0, 2.0, 3.0, 3.0, 4.0, 5.0, 5.0]  # P6 is never pooled


@pytest.fixture(scope="module")
def fpn_export(tmp_path_factory):
    """A test_resnet export as train_predet.py writes it, with a (random) 16-channel FPN in fpn.safetensors; returns
    the folder and the FPN it holds (eval mode)."""
    torch.manual_seed(7)
    fpn = TimmFPN(create_body("test_resnet"), out_channels=16).eval()
    folder = tmp_path_factory.mktemp("fpn_export") / "export"
    detpretrain.save_pretrained(
        fpn.body, folder, arch="test_resnet", tag="unit", license="mit", extra_state_dicts={"fpn": fpn.fpn.state_dict()}
    )
    return folder, fpn


def test_cli_fpn_features_pool_each_pair_at_its_level_of_the_exported_fpn(coco128, fpn_export, tmp_path, capsys):
    """The default features: P2-P5 of the export's FPN. The cosines equal a computation written out here: the export's
    own modules, each pair's level by FPN Eq. 1, ROIAlignV2 on that level."""
    folder, fpn = fpn_export
    flags = ["--backbone", "test_resnet", "--backbone-weights", folder, "--images", coco128 / "images"]
    flags += ["--max-images", 1, "--image-size", 512, "--pairs-per-image", 48, "--device", "cpu"]
    code, out, _ = run_cli(*flags, "--output", tmp_path / "fpn.json", capsys=capsys)
    assert code == 0
    result = json.loads((tmp_path / "fpn.json").read_text())
    features = result["features"]
    assert features["kind"] == "fpn" and features["levels"] == ["P2", "P3", "P4", "P5"]
    assert features["strides"] == [4, 8, 16, 32] and features["channels"] == 16
    assert features["weights"] == str(folder / "fpn.safetensors") and "floor(4 + log2" in features["assignment"]
    assert f"features: {features['description']}" in out and "FPN P2-P5 (16 channels)" in out
    # At 512 px the largest box scale is 0.37 x 512 = 190 px: P2 below 112 px, P3 above, never P4 or P5.
    counts = features["pairs_per_level"]
    assert counts["P2"] > 0 and counts["P3"] > 0 and counts["P4"] == counts["P5"] == 0 and sum(counts.values()) == 48

    path = analysis.find_images(coco128 / "images")[0]  # --max-images 1: the first image by path
    image = analysis.load_resized(path, short_side=512, max_size=result["input"]["max_size"])
    boxes_a, boxes_b, _ = analysis.sample_box_pairs(tuple(image.shape[-2:]), 48, generator=sample_generator(0, 0, 0))
    mean = torch.tensor(result["input"]["mean"]).view(3, 1, 1)
    std = torch.tensor(result["input"]["std"]).view(3, 1, 1)
    with torch.no_grad():
        maps = list(fpn(((image.float() / 255 - mean) / std)[None]).values())  # P2..P6
    levels = torch.floor(4 + torch.log2(sizes(boxes_a).prod(dim=1).sqrt() / 224) + 1e-6).clamp(2, 5).long()
    assert result["pairs"]["level"] == [f"P{k}" for k in levels.tolist()]
    expected = [
        analysis.roi_cosine_similarity(maps[k - 2], a[None], b[None], stride=2**k).item()
        for a, b, k in zip(boxes_a, boxes_b, levels.tolist(), strict=True)
    ]
    assert result["pairs"]["cosine"] == pytest.approx(expected, abs=1e-5)


def test_cli_fpn_features_need_an_export_with_its_fpn(fpn_export, tmp_path, capsys):
    write_noise_png(tmp_path / "a.png")
    common = ["--backbone", "test_resnet", "--images", tmp_path, "--image-size", 96, "--device", "cpu"]
    code, _, err = run_cli(*common, capsys=capsys)
    assert code == 1 and err.count("\n") == 1
    assert "there is no --backbone-weights" in err and "--features backbone" in err
    folder, _ = fpn_export
    backbone_only = tmp_path / "backbone_only"
    backbone_only.mkdir()
    (backbone_only / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    code, _, err = run_cli(*common, "--backbone-weights", backbone_only, capsys=capsys)
    assert code == 1 and "holds no fpn.safetensors" in err
    code, _, err = run_cli(*common, "--backbone-weights", folder, "--feature-level", 2, capsys=capsys)
    assert code == 1 and "pass --features backbone with --feature-level" in err


# ----------------------------------------------------------------------------------------------------- command line
def run_cli(*argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in ("iou-similarity", *argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_end_to_end_on_coco128_photos(coco128, tmp_path, capsys):
    images, output = coco128 / "images", tmp_path / "r.json"
    flags = [*TINY, "--images", images, "--max-images", 2, "--image-size", 272, "--pairs-per-image", 128]
    code, out, _ = run_cli(*flags, "--output", output, capsys=capsys)
    assert code == 0
    result = json.loads(output.read_text())
    assert result["features"] == {
        "kind": "backbone",
        "index": 4,
        "module": "layer4",
        "stride": 32,
        "channels": 96,
        "description": "layer4 (feature level 4, stride 32, 96 channels)",
    }
    assert "layer4 (feature level 4, stride 32, 96 channels)" in out and "Pearson r" in out
    assert result["pooling"]["spatial_scale"] == 1 / 32
    assert result["images"]["measured"] == 2 and result["backbone"]["weights"] == "random init"
    table = result["correlation"]
    assert list(table) == ["small", "medium", "large", "all"]
    assert table["all"]["pairs"] == 2 * 128 == sum(table[b]["pairs"] for b in ("small", "medium", "large"))
    assert all(table[b]["pairs"] >= 2 for b in table)  # at 272 px a few pairs are large (>= 96²)
    # Each bucket's r is numpy's on the pairs the JSON lists (rounded to 1e-6 there).
    pairs = {k: np.array(v) for k, v in result["pairs"].items()}
    for bucket, (low, high) in analysis.AREA_BUCKETS.items():
        mask = (pairs["area"] >= low) & (pairs["area"] < high)
        r = np.corrcoef(pairs["iou"][mask], pairs["cosine"][mask])[0, 1]
        assert table[bucket]["pearson"] == pytest.approx(r, abs=1e-4)
    assert (tmp_path / "r.png").stat().st_size > 0


def test_cli_is_deterministic_with_seed(coco128, tmp_path, capsys):
    flags = [*TINY, "--images", coco128 / "images", "--max-images", 1, "--image-size", 96]
    records = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert run_cli(*flags, "--seed", seed, "--output", tmp_path / f"{name}.json", capsys=capsys)[0] == 0
        records.append(json.loads((tmp_path / f"{name}.json").read_text()))
    assert records[0] == records[1]
    assert records[0]["pairs"]["iou"] != records[2]["pairs"]["iou"]


def test_cli_loads_an_export_folder_and_pools_another_level(coco128, tmp_path, capsys):
    torch.manual_seed(123)
    model = timm.create_model("test_resnet", num_classes=0)
    export = detpretrain.save_pretrained(model, tmp_path / "export", arch="test_resnet", tag="unit", license="mit")
    images = coco128 / "images"
    common = [*TINY, "--images", images, "--max-images", 1, "--image-size", 96, "--feature-level", 2]
    code, out, _ = run_cli(*common, "--backbone-weights", export, "--output", tmp_path / "w.json", capsys=capsys)
    assert code == 0
    loaded = json.loads((tmp_path / "w.json").read_text())
    assert loaded["backbone"]["weights"] == str(export)
    assert loaded["features"]["module"] == "layer2" and loaded["features"]["stride"] == 8
    assert "layer2 (feature level 2, stride 8, 48 channels)" in out
    run_cli(*common, "--output", tmp_path / "init.json", capsys=capsys)
    init = json.loads((tmp_path / "init.json").read_text())
    assert init["pairs"]["iou"] == loaded["pairs"]["iou"]  # the same boxes ...
    assert init["pairs"]["cosine"] != loaded["pairs"]["cosine"]  # ... measured with other weights


def write_noise_png(path, size=(96, 128)):
    pixels = np.random.default_rng(0).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_cli_names_a_corrupt_image_in_one_line_or_skips_it(tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    write_noise_png(folder / "good.png")
    (folder / "sub" / "bad.JPG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    flags = [*TINY, "--images", folder, "--image-size", 96, "--output", tmp_path / "r.json"]
    code, _, err = run_cli(*flags, capsys=capsys)
    assert code == 1 and not (tmp_path / "r.json").exists()
    assert err.count("\n") == 1 and "sub/bad.JPG" in err and "--skip-bad-images" in err
    code, out, _ = run_cli(*flags, "--skip-bad-images", capsys=capsys)
    assert code == 0 and "skipped 1 undecodable images" in out
    images = json.loads((tmp_path / "r.json").read_text())["images"]
    assert images["measured"] == 1 and images["skipped"] == 1 and images["skipped_files"][0].endswith("bad.JPG")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--feature-level", "9"],
            "feature level 9 does not exist: this backbone's feature maps are 0 (act1, stride 2)",
        ),
        (["--backbone", "no_such_net"], "'no_such_net' is not a timm model"),
        (["--backbone-weights", "missing_export"], "missing_export does not exist"),
    ],
)
def test_cli_bad_inputs_end_with_one_line(tmp_path, capsys, extra, message):
    write_noise_png(tmp_path / "a.png")
    code, _, err = run_cli(*TINY, "--images", tmp_path, "--image-size", 96, *extra, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and message in err


def test_cli_empty_folder(tmp_path, capsys):
    code, _, err = run_cli(*TINY, "--images", tmp_path, capsys=capsys)
    assert code == 1 and "holds no image file" in err


def test_cli_without_matplotlib_still_writes_the_json(tmp_path, capsys, monkeypatch):
    write_noise_png(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as without matplotlib
    output = tmp_path / "out" / "r.json"
    code, out, _ = run_cli(*TINY, "--images", tmp_path, "--image-size", 96, "--output", output, capsys=capsys)
    assert code == 0 and json.loads(output.read_text())["correlation"]["all"]["pairs"] == 64
    assert [line for line in out.splitlines() if line.startswith("matplotlib")] == [
        "matplotlib is not installed (pip install 'detpretrain[plots]'): no r.png; the numbers are in " + str(output)
    ]
    assert not output.with_suffix(".png").exists()
