"""PreDet's two views with queries carried into both (predet.txt §3.2, §3.3, §4.1; PAPER_NOTES.md "Queries that
leave a view"): box tracking against painted pixels, the visibility rule, flips, determinism, batching."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from detpretrain.data.labelled_images import LabelledSample
from detpretrain.engine import sample_generator
from detpretrain.predet.views import (
    CropBox,
    PreDetViews,
    ViewSettings,
    collate_two_views,
    images_per_batch,
    map_boxes_to_view,
    sample_crop,
    select_queries,
    two_views,
    visible_fraction,
)
from detpretrain.proposals import EdgeBoxesSettings, compute_proposal_cache

# Geometry only: no photometric change and no normalization, so a view's pixels are the resized crop's.
GEOMETRY_ONLY = ViewSettings(
    output_size=96, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Views are made in DataLoader workers, which run torch on one thread; on a busy machine the thread pool's
    wake-ups would dominate these small images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _noise_image(height, width, seed=0):
    """Background whose green channel is never below 120, so paint with green 0 is unique."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (3, height, width), dtype=np.uint8)
    pixels[1] = rng.integers(120, 256, (height, width), dtype=np.uint8)
    return torch.from_numpy(pixels)


# --------------------------------------------------------------------------------------------------- box tracking


def test_query_box_covers_the_painted_region_in_both_views():
    height, width = 150, 200
    image = _noise_image(height, width)
    region = torch.tensor([[70.0, 40.0, 150.0, 100.0]])  # xyxy, pixel edges
    image[:, 40:100, 70:150] = torch.tensor([255, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    settings = dataclasses.replace(GEOMETRY_ONLY, min_queries=1)
    checked = flipped = partial = 0
    for seed in range(40):
        views = two_views(image, region, generator=_generator(seed), settings=settings)
        if not views.query_valid[0]:
            continue
        checked += 1
        for view, boxes, params in (
            (views.view1, views.queries_view1, views.params1),
            (views.view2, views.queries_view2, views.params2),
        ):
            flipped += params.flip
            partial += bool(visible_fraction(region, params.crop)[0] < 1)
            x1, y1, x2, y2 = boxes[0].tolist()
            # Resampling blends paint and background symmetrically about the region's border (bilinear ramps of
            # +-half a source pixel, antialias kernels of +-1 view pixel): a pixel more than half painted has its
            # centre inside the box, and one further inside than the blend reaches is wholly painted.
            scale = max(settings.output_size / params.crop.width, settings.output_size / params.crop.height)
            blend = max(0.5 * scale, 1.0) + 0.25
            painted = view[1] < 60 / 255  # background green >= 120: more than half paint
            rows, cols = torch.nonzero(painted, as_tuple=True)
            assert len(rows) > 0, f"seed {seed}: the query is visible but no painted pixel is"
            centres_x, centres_y = cols + 0.5, rows + 0.5
            slack = 0.25
            assert centres_x.min() >= x1 - slack and centres_x.max() <= x2 + slack, (seed, boxes[0])
            assert centres_y.min() >= y1 - slack and centres_y.max() <= y2 + slack, (seed, boxes[0])
            ys, xs = torch.meshgrid(torch.arange(96) + 0.5, torch.arange(96) + 0.5, indexing="ij")
            inner = (xs > x1 + blend) & (xs < x2 - blend) & (ys > y1 + blend) & (ys < y2 - blend)
            assert (view[1][inner] < 10 / 255).all(), f"seed {seed}: the box holds unpainted pixels"
    assert checked >= 30 and flipped >= 10 and partial >= 5, (checked, flipped, partial)


def test_flip_mirrors_x():
    whole = CropBox(top=0, left=0, height=100, width=100)
    box = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert map_boxes_to_view(box, whole, output_size=100, flip=True).tolist() == [[70.0, 20.0, 90.0, 40.0]]
    assert map_boxes_to_view(box, whole, output_size=200, flip=False).tolist() == [[20.0, 40.0, 60.0, 80.0]]
    crop = CropBox(top=10, left=5, height=50, width=100)  # scales x by 1, y by 2
    assert map_boxes_to_view(box, crop, output_size=100, flip=True).tolist() == [[75.0, 20.0, 95.0, 60.0]]


# ----------------------------------------------------------------------------------------------- visibility rule


def test_visibility_rule_drops_mostly_hidden_queries_and_clips_the_rest():
    whole = CropBox(top=0, left=0, height=100, width=200)
    left_half = CropBox(top=0, left=0, height=100, width=100)
    boxes = torch.tensor(
        [
            [40.0, 10.0, 140.0, 30.0],  # 60% inside left_half: kept, clipped
            [60.0, 40.0, 160.0, 60.0],  # 40% inside: dropped
            [50.0, 70.0, 150.0, 90.0],  # exactly half inside: kept ("at least half")
            [120.0, 10.0, 180.0, 90.0],  # outside: dropped
        ]
    )
    torch.testing.assert_close(visible_fraction(boxes, left_half), torch.tensor([0.6, 0.4, 0.5, 0.0]))
    order = torch.arange(4)
    kept = select_queries(boxes, left_half, whole, order=order, num_queries=16, min_visible=0.5, nms_iou=0.5)
    assert kept.tolist() == [0, 2]
    # The rule holds in both views: the same crops the other way round give the same answer.
    kept = select_queries(boxes, whole, left_half, order=order, num_queries=16, min_visible=0.5, nms_iou=0.5)
    assert kept.tolist() == [0, 2]
    clipped = map_boxes_to_view(boxes[kept], left_half, output_size=100, flip=False)
    assert clipped.tolist() == [[40.0, 10.0, 100.0, 30.0], [50.0, 70.0, 100.0, 90.0]]


def test_two_views_keep_only_queries_visible_in_both_crops():
    image = _noise_image(120, 160)
    rng = np.random.default_rng(0)
    xy = torch.from_numpy(rng.uniform(0, 120, (60, 2))).float()
    wh = torch.from_numpy(rng.uniform(10, 50, (60, 2))).float()
    boxes = torch.cat([xy, xy + wh], dim=1)
    settings = dataclasses.replace(GEOMETRY_ONLY, output_size=64)
    valid_total = 0
    for seed in range(20):
        views = two_views(image, boxes, generator=_generator(seed), settings=settings)
        valid = views.query_valid
        valid_total += int(valid.sum())
        chosen = boxes.clamp(max=torch.tensor([160.0, 120.0, 160.0, 120.0]))[views.query_index[valid]]
        for params in (views.params1, views.params2):
            assert (visible_fraction(chosen, params.crop) >= 0.5).all()
        for queries in (views.queries_view1, views.queries_view2):
            assert (queries[valid] >= 0).all() and (queries[valid] <= 64).all()
            assert (queries[~valid] == 0).all()
        iou = box_iou(views.queries_view1[valid], views.queries_view1[valid]).fill_diagonal_(0)
        assert (iou <= 0.5 + 1e-6).all(), "queries do not share positives in view-1"
        assert views.query_index[valid].unique().numel() == int(valid.sum()), "sampled without replacement"
    assert valid_total > 20 * 4


def test_queries_are_sampled_without_replacement_and_padded():
    image = _noise_image(100, 100)
    grid = torch.tensor([[x, y, x + 10.0, y + 10.0] for x in range(0, 100, 12) for y in range(0, 100, 12)])
    whole_image = dataclasses.replace(GEOMETRY_ONLY, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    views = two_views(image, grid, generator=_generator(0), settings=whole_image)
    assert views.query_valid.all() and views.query_index.unique().numel() == 16
    other = two_views(image, grid, generator=_generator(1), settings=whole_image)
    assert set(views.query_index.tolist()) != set(other.query_index.tolist()), "a random sample, not the first 16"
    few = two_views(image, grid[:5], generator=_generator(0), settings=whole_image)
    assert few.query_valid.tolist() == [True] * 5 + [False] * 11
    assert sorted(few.query_index[:5].tolist()) == [0, 1, 2, 3, 4] and (few.query_index[5:] == -1).all()
    assert (few.queries_view1[5:] == 0).all()
    none = two_views(image, torch.zeros(0, 4), generator=_generator(0), settings=whole_image)
    assert not none.query_valid.any() and none.crop_draws == 1


def test_crops_are_drawn_again_a_bounded_number_of_times():
    image = _noise_image(100, 100)
    box = torch.tensor([[20.0, 20.0, 50.0, 50.0]])  # often less than half inside one of two small crops
    settings = dataclasses.replace(GEOMETRY_ONLY, output_size=16, crop_scale=(0.2, 0.2), max_resample=3, min_queries=1)
    resampled = [two_views(image, box, generator=_generator(s), settings=settings) for s in range(30)]
    assert max(v.crop_draws for v in resampled) == 4, "at most 1 + max_resample draws"
    assert all(v.query_valid[0] for v in resampled if v.crop_draws < 4), "it stops as soon as enough queries survive"
    once = dataclasses.replace(settings, max_resample=0)
    drawn_once = [two_views(image, box, generator=_generator(s), settings=once) for s in range(30)]
    assert all(v.crop_draws == 1 for v in drawn_once)
    assert sum(bool(v.query_valid[0]) for v in resampled) > sum(bool(v.query_valid[0]) for v in drawn_once) + 5


# ---------------------------------------------------------------------------------------------- MoCo v2 recipe


def test_sample_crop_follows_random_resized_crop():
    g = _generator(0)
    for _ in range(200):
        crop = sample_crop(300, 400, generator=g)
        assert 0 <= crop.top and crop.top + crop.height <= 300 and 0 <= crop.left and crop.left + crop.width <= 400
        area = crop.height * crop.width / (300 * 400)
        assert 0.19 <= area <= 1.01 and 3 / 4 - 0.02 <= crop.width / crop.height <= 4 / 3 + 0.02
    # An extreme aspect ratio falls back to a centred crop at the nearest allowed ratio, as torchvision does.
    assert sample_crop(10, 400, generator=g, scale=(0.9, 1.0)) == CropBox(top=0, left=193, height=10, width=13)


def test_views_are_normalized_augmented_and_deterministic():
    image = _noise_image(120, 160)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [80.0, 20.0, 150.0, 110.0]])
    settings = ViewSettings(output_size=64)
    first = two_views(image, boxes, generator=sample_generator(0, 5, 7), settings=settings)
    again = two_views(image, boxes, generator=sample_generator(0, 5, 7), settings=settings)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    other = two_views(image, boxes, generator=sample_generator(0, 6, 7), settings=settings)
    assert not torch.equal(first.view1, other.view1)
    assert first.view1.shape == first.view2.shape == (3, 64, 64) and first.view1.dtype == torch.float32
    # Over many draws each photometric step appears at about MoCo v2's rate (p = 0.8, 0.2, 0.5, 0.5).
    tiny = dataclasses.replace(settings, output_size=8)
    draws = [two_views(image, boxes[:0], generator=_generator(s), settings=tiny).params1 for s in range(120)]
    assert 0.65 < np.mean([p.color is not None for p in draws]) < 0.95
    assert 0.08 < np.mean([p.grayscale for p in draws]) < 0.32
    assert 0.35 < np.mean([p.blur_sigma is not None for p in draws]) < 0.65
    assert 0.35 < np.mean([p.flip for p in draws]) < 0.65
    assert all(0.6 <= c <= 1.4 for p in draws if p.color for c in (p.color.brightness, p.color.saturation))
    assert all(-0.1 <= p.color.hue <= 0.1 and sorted(p.color.order) == [0, 1, 2, 3] for p in draws if p.color)
    assert all(0.1 <= p.blur_sigma <= 2.0 for p in draws if p.blur_sigma)
    grey = next(s for s in range(120) if draws[s].grayscale)
    view = two_views(image, boxes[:0], generator=_generator(grey), settings=settings).view1
    mean, std = torch.tensor(settings.mean).view(3, 1, 1), torch.tensor(settings.std).view(3, 1, 1)
    pixels = view * std + mean
    torch.testing.assert_close(pixels[0], pixels[1])
    torch.testing.assert_close(pixels[1], pixels[2])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"\(3, H, W\) uint8"):
        two_views(torch.zeros(3, 10, 10), torch.zeros(0, 4), generator=_generator(0))
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        two_views(torch.zeros(3, 10, 10, dtype=torch.uint8), torch.zeros(4), generator=_generator(0))
    with pytest.raises(ValueError, match="counts views, two per image"):
        images_per_batch(1023)
    assert images_per_batch(1024) == 512


# ------------------------------------------------------------------------------------------------- dataset glue


@pytest.fixture()
def cached_images(tmp_path):
    paths = []
    for i in range(3):
        pixels = _noise_image(90, 120, seed=i).permute(1, 2, 0).numpy().copy()
        pixels[20:60, 30:90] = (40 * i, 0, 200)
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    settings = EdgeBoxesSettings(image_size=120, min_box_area=100, max_boxes=20)
    return paths, compute_proposal_cache(paths, tmp_path / "cache", settings=settings).cache


def test_transform_and_collate_keep_both_views_of_an_image_together(cached_images):
    paths, cache = cached_images
    transform = PreDetViews(cache, settings=ViewSettings(output_size=48))
    samples = []
    for index, path in enumerate(paths):
        image = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).contiguous()
        sample = LabelledSample(image=image, labels=torch.tensor([index, 5]), index=index)
        samples.append(transform(sample, generator=sample_generator(0, 0, index)))
    assert any(s.views.query_valid.any() for s in samples)
    batch = collate_two_views(samples)
    assert batch.images.shape == (6, 3, 48, 48) and batch.num_images == 3
    for i, sample in enumerate(samples):
        assert torch.equal(batch.view1[i], sample.views.view1) and torch.equal(batch.images[i], sample.views.view1)
        assert torch.equal(batch.view2[i], sample.views.view2) and torch.equal(batch.images[3 + i], sample.views.view2)
        assert torch.equal(batch.queries_view1[i], sample.views.queries_view1)
        assert torch.equal(batch.query_valid[i], sample.views.query_valid)
        assert batch.labels[i].tolist() == [i, 5]
    assert batch.queries_view2.shape == (3, 16, 4) and batch.index.tolist() == [0, 1, 2]


def test_transform_rejects_an_image_the_cache_does_not_describe(cached_images):
    _, cache = cached_images
    transform = PreDetViews(cache)
    wrong = LabelledSample(image=torch.zeros(3, 50, 50, dtype=torch.uint8), labels=torch.tensor([0]), index=1)
    with pytest.raises(ValueError, match="image 'img1.png' decodes to 50x50, but the proposal cache .* recorded"):
        transform(wrong, generator=_generator(0))
