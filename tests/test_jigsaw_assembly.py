"""Jigsaw assembly (§3.2, §4.1): S/T/W groups, the template, stitching, the per-sample augmentation and Tab. 1's fits.

Hand-built samples, plus samples extracted from a few coco128 photos (../shared/data/coco128) for sample_jigsaw.
"""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from detpretrain.jigsaw import (
    FIT_MODES,
    GROUPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JIGSAW_TEMPLATES,
    JigsawSample,
    JigsawSamples,
    JigsawTemplate,
    assemble_jigsaw,
    coco_image_records,
    extract_samples,
    feature_region_index,
    get_template,
    normalize_jigsaw_image,
    sample_group,
    sample_jigsaw,
    seeded_generator,
)


def random_sample(height, width, label, seed):
    image = torch.randint(1, 256, (3, height, width), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return JigsawSample(image=image, label=label)


@pytest.fixture(scope="module")
def sample_dir(coco128, tmp_path_factory):
    """The samples of 12 coco128 photos: 58, every group among them."""
    coco = coco_image_records(coco128 / "annotations" / "instances_train2017.json", coco128 / "images")
    path = tmp_path_factory.mktemp("samples") / "coco12.jigsaw"
    extract_samples(coco.records[:12], class_names=coco.class_names, output_dir=path)
    return path


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


def test_feature_cells_belong_to_the_region_holding_their_centre():
    index = feature_region_index(TEMPLATE, feature_height=7, feature_width=7)
    expected = torch.tensor([[0] * 3 + [1] * 4] * 3 + [[2] * 3 + [3] * 4] * 4)
    assert torch.equal(index, expected)
    index64 = feature_region_index(get_template("split64"), feature_height=7, feature_width=7)
    assert torch.equal(torch.bincount(index64.flatten()), torch.tensor([4, 10, 10, 25]))
    with pytest.raises(ValueError, match=r"\['top_left', 'bottom_left'\] hold no centre of a 7x7 feature cell"):
        feature_region_index(JigsawTemplate(split_x=16, split_y=96), feature_height=7, feature_width=7)


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


def assemble_unscaled(squares, tall, wide, *, flip_prob):
    """The four samples assembled at scale 1 (no scale augmentation), flipped with ``flip_prob``."""
    return assemble_jigsaw(
        squares=squares,
        tall=tall,
        wide=wide,
        template=TEMPLATE,
        generator=torch.Generator().manual_seed(0),
        scale_range=(1.0, 1.0),
        flip_prob=flip_prob,
    )


def test_without_augmentation_pixels_land_unchanged_in_their_regions():
    squares, tall, wide = four_samples()
    jigsaw = assemble_unscaled(squares, tall, wide, flip_prob=0.0)
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
    jigsaw = assemble_unscaled(squares, tall, wide, flip_prob=1.0)
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


@pytest.mark.parametrize("fit", FIT_MODES)
def test_every_fit_scales_by_the_drawn_ratio_and_puts_the_smaller_square_top_left(fit):
    """§4.1's scale draws decide the placement and shape what is placed, in Tab. 1's warp and resize too."""
    a, b = random_sample(52, 52, 1, seed=1), random_sample(56, 56, 2, seed=2)
    tall, wide = random_sample(90, 30, 3, seed=3), random_sample(40, 100, 4, seed=4)
    inputs = [a, b, tall, wide]
    swapped, top_left_sizes = 0, set()
    for seed in range(40):
        jigsaw = assemble_jigsaw(
            squares=(a, b),
            tall=tall,
            wide=wide,
            template=TEMPLATE,
            generator=torch.Generator().manual_seed(seed),
            flip_prob=0.0,
            fit=fit,
        )
        sizes = {0: 52, 1: 56}
        tl, br = int(jigsaw.input_index[0]), int(jigsaw.input_index[3])
        assert round(sizes[tl] * float(jigsaw.scales[0])) <= round(sizes[br] * float(jigsaw.scales[3]))
        swapped += tl == 1
        for r in range(4):
            h, w = inputs[int(jigsaw.input_index[r])].image.shape[1:]
            rx1, ry1, rx2, ry2 = TEMPLATE.region_boxes()[r].tolist()
            region_w, region_h = rx2 - rx1, ry2 - ry1
            fit_x, fit_y = {
                "pad_crop": (1.0, 1.0),
                "warp": (region_w / w, region_h / h),
                "resize": (min(region_w / w, region_h / h),) * 2,
            }[fit]
            scale = float(jigsaw.scales[r])
            x1, y1, x2, y2 = jigsaw.content_boxes[r].tolist()
            # Brought to the region by the fit, scaled by r, then padded or cropped to the region.
            assert x2 - x1 == min(region_w, max(1, round(w * (fit_x * scale))))
            assert y2 - y1 == min(region_h, max(1, round(h * (fit_y * scale))))
        top_left_sizes.add(tuple(jigsaw.content_boxes[0, 2:] - jigsaw.content_boxes[0, :2]))
    assert 0 < swapped < 40  # the raw-larger sample sometimes ends up smaller, and then goes top-left
    assert len(top_left_sizes) > 5  # the drawn ratio changes what lands, whatever the fit


def test_assembly_uses_only_the_given_generator_and_a_fixed_number_of_draws():
    squares, tall, wide = four_samples()
    first = assemble_jigsaw(squares=squares, tall=tall, wide=wide, template=TEMPLATE, generator=seeded_generator(5))
    generator = seeded_generator(5)
    second = assemble_jigsaw(squares=squares, tall=tall, wide=wide, template=TEMPLATE, generator=generator)
    assert torch.equal(first.image, second.image) and torch.equal(first.content_boxes, second.content_boxes)
    reference = seeded_generator(5)
    torch.rand((4, 4), generator=reference, dtype=torch.float64)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_at_scale_one_warp_fills_its_region_and_resize_fits_inside_it():
    squares, tall, wide = four_samples()
    kwargs = {"squares": squares, "tall": tall, "wide": wide, "template": TEMPLATE, "scale_range": (1.0, 1.0)}
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
    samples = JigsawSamples(sample_dir)
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
