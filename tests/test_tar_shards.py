"""WebDataset tar shards (detpretrain.data.tar_shards): shard lists, reading, labels and bad samples, the per-rank and
per-worker split, determinism, and exact resume through DataLoader workers. Shards are written in tmp_path from
coco128 photos, shrunk so that the whole file runs in seconds."""

import io
import json
import tarfile

import pytest
import torch
import webdataset
from PIL import Image

from detpretrain import engine
from detpretrain.data.labelled_images import read_rgb
from detpretrain.data.tar_shards import (
    EMPTY_LABELS,
    LABEL_OUT_OF_RANGE,
    MALFORMED_LABEL,
    MISSING_IMAGE,
    MISSING_LABEL,
    UNDECODABLE_IMAGE,
    UNKNOWN_LABEL,
    BadSampleError,
    ShardError,
    ShardSample,
    TarSample,
    TarShardStream,
    _ShardShuffle,
    expand_shard_urls,
    iter_tar_samples,
    load_class_names,
    sample_index,
    sample_labels,
)

CLASSES = ("person", "bicycle", "car", "dog", "cat")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
NUM_SHARDS, PER_SHARD = 8, 4
CROP = 16


def _write_tar(path, samples):
    """A tar with exactly these members, in this order: ``samples`` is [(key, {suffix: bytes}), ...]."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def photos(coco128):
    """32 real photos as small JPEG bytes (at most 64 px a side, at least CROP)."""
    paths = sorted((coco128 / "images").glob("*.jpg"))[: NUM_SHARDS * PER_SHARD]
    encoded = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((64, 64))
            image = image.resize((max(image.width, CROP), max(image.height, CROP)))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, photos):
    """NUM_SHARDS shards of PER_SHARD photos written with webdataset's own TarWriter, in the three label forms; returns
    (shard urls, {(shard, position): expected labels})."""
    root = tmp_path_factory.mktemp("shards")
    urls, expected = [], {}
    for shard in range(NUM_SHARDS):
        url = str(root / f"train-{shard:06d}.tar")
        with webdataset.TarWriter(url) as writer:
            for position in range(PER_SHARD):
                n = shard * PER_SHARD + position
                sample = {"__key__": f"img{n:04d}", "jpg": photos[n]}
                first, second = n % len(CLASSES), (3 * n + 1) % len(CLASSES)
                if n % 3 == 0:  # class names
                    sample["json"] = {"labels": [CLASSES[second], CLASSES[first]]}
                    labels = tuple(sorted({first, second}))
                elif n % 3 == 1:  # integer indices, with metadata beside them
                    sample["json"] = {"labels": [first], "caption": "a photo"}
                    labels = (first,)
                else:  # .cls; the json is metadata only, so the label falls back to .cls
                    sample["cls"] = second
                    sample["json"] = {"source": "coco128"}
                    labels = (second,)
                writer.write(sample)
                expected[(shard, position)] = labels
        urls.append(url)
    return urls, expected


def _crop_flip(sample, *, generator):
    """A random crop and flip: augmentation that shows which generator each sample got."""
    _, height, width = sample.image.shape
    top = int(torch.randint(height - CROP + 1, (), generator=generator))
    left = int(torch.randint(width - CROP + 1, (), generator=generator))
    crop = sample.image[:, top : top + CROP, left : left + CROP]
    if torch.rand((), generator=generator) < 0.5:
        crop = crop.flip(-1)
    return {"image": crop, "labels": sample.labels, "where": (sample.epoch, sample.shard, sample.position, sample.key)}


def _collate(outputs):
    return {
        "images": torch.stack([o["image"] for o in outputs]),
        "labels": [o["labels"] for o in outputs],
        "where": [o["where"] for o in outputs],
    }


def _stream(urls, **overrides):
    settings = dict(
        class_names=CLASSES,
        transform=_crop_flip,
        collate_fn=_collate,
        images_per_batch=3,
        seed=7,
        num_workers=0,
        shuffle_buffer=3,
    )
    return TarShardStream(urls, **{**settings, **overrides})


def _take(stream, count, *, capture_at=None):
    """``count`` batches of ``stream``; with ``capture_at=k``, also its state_dict after k batches (k < count)."""
    batches, captured = [], None
    iterator = iter(stream)
    for i in range(count):
        if i == capture_at:
            captured = stream.state_dict()
        batches.append(next(iterator))
    iterator.close()  # shuts the DataLoader workers down now, not at garbage collection
    return (batches, captured) if capture_at is not None else batches


def _assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a["where"] == e["where"]
        assert torch.equal(a["images"], e["images"])
        assert all(torch.equal(x, y) for x, y in zip(a["labels"], e["labels"], strict=True))


def _checkpoint_round_trip(value, tmp_path):
    """``value`` saved and loaded as engine checkpoints are (weights_only=True accepts plain types only)."""
    path = tmp_path / "state.pth"
    torch.save(value, path)
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------------- shard lists


def test_expand_shard_urls_forms(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    names = [f"a-{i:03d}.tar" for i in range(4)]
    for name in reversed(names):
        _write_tar(shard_dir / name, [])
    (shard_dir / "README.txt").write_text("not a shard")
    every = [str(shard_dir / name) for name in names]

    assert expand_shard_urls(f"{shard_dir}/a-{{000..003}}.tar") == every
    assert expand_shard_urls(shard_dir) == every  # a directory: its .tar files sorted by name
    assert expand_shard_urls(f"{shard_dir}/a-{{000,002}}.tar,{shard_dir}/a-003.tar") == [every[0], every[2], every[3]]
    listing = tmp_path / "train.txt"
    listing.write_text(f"# training shards\nshards/a-001.tar\n\n{shard_dir / 'a-000.tar'}\n")
    assert expand_shard_urls(listing) == [str(tmp_path / "shards/a-001.tar"), every[0]]  # relative to the list
    assert expand_shard_urls([every[3], str(listing)]) == [every[3], str(tmp_path / "shards/a-001.tar"), every[0]]
    # URLs that webdataset opens itself are not checked here.
    assert expand_shard_urls("https://host/s-{0..1}.tar") == ["https://host/s-0.tar", "https://host/s-1.tar"]


def test_expand_shard_urls_errors_name_the_problem(tmp_path):
    _write_tar(tmp_path / "a-000.tar", [])
    with pytest.raises(ShardError, match=r"shard .*a-001\.tar does not exist") as error:
        expand_shard_urls(f"{tmp_path}/a-{{000..001}}.tar")
    assert "\n" not in str(error.value)
    with pytest.raises(ShardError, match="more than once"):
        expand_shard_urls(f"{tmp_path}/a-000.tar,{tmp_path}/a-000.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no .tar files"):
        expand_shard_urls(tmp_path / "empty")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ShardError, match="names no shard"):
        expand_shard_urls(tmp_path / "empty.txt")


def test_class_names_are_required_and_unique(tmp_path):
    with pytest.raises(ValueError, match="need a class list"):
        load_class_names(None)
    (tmp_path / "classes.txt").write_text("dog\n\ncat\n")
    assert load_class_names(tmp_path / "classes.txt") == ("dog", "cat")
    with pytest.raises(ValueError, match="more than once"):
        load_class_names(["dog", "cat", "dog"])


# -------------------------------------------------------------------------------------------------- reading a tar


def test_iter_tar_samples_yields_stored_order_and_members(tmp_path, photos):
    png = io.BytesIO()
    Image.new("RGB", (20, 18), (10, 200, 30)).save(png, format="PNG")
    url = _write_tar(
        tmp_path / "s.tar",
        [
            ("zeta", {"jpg": photos[0], "json": b'{"labels": ["dog"]}'}),
            ("alpha", {"png": png.getvalue(), "cls": b"3\n"}),
            ("sub/mid", {"JPG": photos[1], "json": b'{"label": 2}'}),  # suffixes compare in lower case
            ("both", {"png": png.getvalue(), "jpg": photos[2], "txt": b"ignored"}),
        ],
    )
    samples = list(iter_tar_samples(str(url)))
    assert [s.position for s in samples] == list(range(len(samples)))
    assert [s.key for s in samples][:4] == ["zeta", "alpha", "sub/mid", "both"]
    assert samples[0].image == photos[0] and samples[0].image_suffix == "jpg"
    assert samples[0].json == b'{"labels": ["dog"]}' and samples[0].cls is None
    assert samples[1].image == png.getvalue() and samples[1].image_suffix == "png" and samples[1].cls == b"3\n"
    assert samples[2].image == photos[1] and samples[2].json == b'{"label": 2}'
    assert samples[3].image == photos[2] and samples[3].image_suffix == "jpg"  # jpg is preferred over png
    assert list(iter_tar_samples(str(url))) == samples  # deterministic: the proposal cache relies on it


def test_a_tar_cut_short_is_a_clear_error(tmp_path, photos):
    url = _write_tar(tmp_path / "cut.tar", [(f"k{i}", {"jpg": photos[i], "cls": b"1"}) for i in range(3)])
    data = url.read_bytes()
    url.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"cut\.tar: cannot read the tar after 1 samples") as error:
        list(iter_tar_samples(str(url)))
    assert "\n" not in str(error.value)
    with pytest.raises(ShardError, match="does not exist"):
        next(iter_tar_samples(str(tmp_path / "gone.tar")))


# ---------------------------------------------------------------------------------------------------------- labels


def _sample(json_bytes=None, cls=None):
    return TarSample(position=0, key="k", image=b"", image_suffix="jpg", json=json_bytes, cls=cls)


@pytest.mark.parametrize(
    ("json_bytes", "cls", "labels"),
    [
        (b'{"labels": ["cat", "dog", "cat"]}', None, (3, 4)),
        (b'{"labels": [4, 0, "car"]}', None, (0, 2, 4)),
        (b'{"label": "bicycle"}', None, (1,)),
        (b'{"cls": 3}', None, (3,)),
        (None, b" 2\n", (2,)),
        (b'{"caption": "metadata only"}', b"1", (1,)),  # no label in the json: the .cls counts
        (b'{"labels": ["dog"]}', b"1", (3,)),  # the json's label wins over .cls
    ],
)
def test_sample_labels_forms(json_bytes, cls, labels):
    assert sample_labels(_sample(json_bytes, cls), CLASS_INDEX) == labels


@pytest.mark.parametrize(
    ("json_bytes", "cls", "reason"),
    [
        (b'{"labels": ["unicorn"]}', None, UNKNOWN_LABEL),
        (b'{"labels": [5]}', None, LABEL_OUT_OF_RANGE),
        (b'{"label": -1}', None, LABEL_OUT_OF_RANGE),
        (None, b"9", LABEL_OUT_OF_RANGE),
        (b'{"labels": []}', None, EMPTY_LABELS),
        (b'{"source": "web"}', None, MISSING_LABEL),
        (None, None, MISSING_LABEL),
        (b"{not json", None, MALFORMED_LABEL),
        (b'["dog"]', None, MALFORMED_LABEL),
        (b'{"labels": "dog"}', None, MALFORMED_LABEL),
        (b'{"labels": [true]}', None, MALFORMED_LABEL),
        (b'{"label": ["dog"]}', None, MALFORMED_LABEL),
        (None, b"dog", MALFORMED_LABEL),
    ],
)
def test_sample_labels_bad_reasons(json_bytes, cls, reason):
    with pytest.raises(BadSampleError) as error:
        sample_labels(_sample(json_bytes, cls), CLASS_INDEX)
    assert error.value.reason == reason


def test_bad_samples_are_skipped_counted_and_reported_once(tmp_path, photos):
    def names(*labels):
        return json.dumps({"labels": list(labels)}).encode()

    url = str(
        _write_tar(
            tmp_path / "mixed.tar",
            [
                ("good0", {"jpg": photos[0], "json": names("dog")}),
                ("unknown", {"jpg": photos[1], "json": names("unicorn")}),
                ("index7", {"jpg": photos[2], "json": names(7)}),
                ("cls9", {"jpg": photos[3], "cls": b"9"}),
                ("empty", {"jpg": photos[4], "json": names()}),
                ("metadata", {"jpg": photos[5], "json": b'{"source": "web"}'}),
                ("noimage", {"json": names("dog"), "txt": b"caption"}),
                ("truncated", {"jpg": photos[6][: len(photos[6]) // 3], "json": names("cat")}),
                ("notjson", {"jpg": photos[7], "json": b"{oops"}),
                ("good1", {"jpg": photos[8], "cls": b"2"}),
            ],
        )
    )
    stream = _stream([url], images_per_batch=1, shuffle_buffer=1)  # buffer 1: the stored order
    batches = _take(stream, 2)
    assert [b["where"][0][3] for b in batches] == ["good0", "good1"]
    assert stream.skipped == {
        UNKNOWN_LABEL: 1,
        LABEL_OUT_OF_RANGE: 2,
        EMPTY_LABELS: 1,
        MISSING_LABEL: 1,
        MISSING_IMAGE: 1,
        UNDECODABLE_IMAGE: 1,
        MALFORMED_LABEL: 1,
    }
    records = stream.take_skipped()
    assert [r.key for r in records] == [
        "unknown",
        "index7",
        "cls9",
        "empty",
        "metadata",
        "noimage",
        "truncated",
        "notjson",
    ]
    assert [r.position for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    truncated = records[6].describe()
    assert truncated.startswith(f"{url}:truncated (sample 7): cannot decode the image (")
    assert truncated.endswith(f"({UNDECODABLE_IMAGE})") and "\n" not in truncated
    assert stream.take_skipped() == []
    assert stream.state_dict()["skipped"] == stream.skipped  # the counts travel with the checkpoint

    # Later epochs skip the same samples without reporting them again.
    again = _stream([url], images_per_batch=1, shuffle_buffer=1)
    _take(again, 6)
    assert again.skipped == stream.skipped and len(again.take_skipped()) == 8


def test_a_stream_without_any_usable_sample_stops(tmp_path, photos):
    url = _write_tar(tmp_path / "bad.tar", [("a", {"jpg": photos[0], "json": b'{"labels": ["unicorn"]}'})])
    with pytest.raises(ShardError, match="without a usable sample"):
        _take(_stream([str(url)], images_per_batch=1), 1)


# ------------------------------------------------------------------------------------------------------- streaming


def test_shuffle_buffer_is_flushed_at_the_end_of_the_shard():
    import random

    for size, n in [(1, 5), (3, 7), (10, 4)]:
        shuffle = _ShardShuffle(iter(range(n)), size=size, rng=random.Random(0))
        emitted = []
        while not shuffle.exhausted:
            emitted.append(next(shuffle))
        assert sorted(emitted) == list(range(n))  # every sample once, none kept for another shard
        assert next(shuffle, None) is None
        if size == 1:
            assert emitted == list(range(n))


def test_every_sample_once_per_epoch_across_ranks_and_workers(dataset):
    urls, expected = dataset
    # 2 ranks x 2 workers = 4 streams of 2 shards x 4 samples per epoch; 2 images per batch: 4 batches per stream.
    seen = []
    for rank in range(2):
        stream = _stream(urls, rank=rank, world_size=2, num_workers=2, images_per_batch=2, shuffle_buffer=1000)
        for batch in _take(stream, 8):
            for (epoch, shard, position, _), labels in zip(batch["where"], batch["labels"], strict=True):
                assert epoch == 0
                assert tuple(labels.tolist()) == expected[(shard, position)]
                seen.append((rank, shard, position))
        assert stream.skipped == {}
    assert sorted((shard, position) for _, shard, position in seen) == sorted(expected)
    ranks_of_shard = {}
    for rank, shard, _ in seen:
        ranks_of_shard.setdefault(shard, set()).add(rank)
    assert all(len(ranks) == 1 for ranks in ranks_of_shard.values())  # a shard is read by one rank per epoch


def test_same_seed_same_batches_and_augmentation_from_seed_step_index(dataset):
    urls, _ = dataset
    first = _take(_stream(urls, accum_steps=2), 6)
    _assert_same_batches(_take(_stream(urls, accum_steps=2), 6), first)
    # num_workers=1 is the same single stream as num_workers=0, read in a worker process.
    _assert_same_batches(_take(_stream(urls, accum_steps=2, num_workers=1), 6), first)
    other = _take(_stream(urls, accum_steps=2, seed=8), 6)
    assert [b["where"] for b in other] != [b["where"] for b in first]

    # Each crop is the one sample_generator(seed, step, index) gives, with step = micro-batch // accum_steps.
    images = {(shard, s.position): read_rgb(s.image) for shard, url in enumerate(urls) for s in iter_tar_samples(url)}
    for k, batch in enumerate(first):
        for (_, shard, position, key), crop in zip(batch["where"], batch["images"], strict=True):
            index = sample_index(shard, position)
            pixels = torch.from_numpy(images[(shard, position)]).permute(2, 0, 1)
            sample = ShardSample(pixels, torch.zeros(0), index, shard, position, key, epoch=0)
            generator = engine.sample_generator(7, k // 2, index)
            assert torch.equal(_crop_flip(sample, generator=generator)["image"], crop)


@pytest.mark.parametrize(
    ("num_workers", "accum_steps", "resume_at", "total"),
    [(2, 1, 5, 12), (2, 3, 3, 12), (0, 1, 3, 12)],
)
def test_resume_yields_exactly_the_uninterrupted_batches(dataset, tmp_path, num_workers, accum_steps, resume_at, total):
    urls, _ = dataset
    settings = dict(num_workers=num_workers, accum_steps=accum_steps)
    # 3 images per batch and a buffer of 3 in shards of 4: positions inside shards, across shards and epochs.
    uninterrupted = _stream(urls, **settings)
    batches, state = _take(uninterrupted, total, capture_at=resume_at)
    assert max(epoch for b in batches for epoch, *_ in b["where"]) >= 1
    checkpoint = _checkpoint_round_trip({"tar_shards": [state]}, tmp_path)

    resumed = _stream(urls, **settings, start_step=resume_at // accum_steps, resume_state=checkpoint["tar_shards"])
    assert resumed.consumed_batches == resume_at
    _assert_same_batches(_take(resumed, total - resume_at), batches[resume_at:])
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_resume_refuses_another_split_or_data(dataset):
    urls, _ = dataset
    stream = _stream(urls, num_workers=2)
    _, state = _take(stream, 3, capture_at=2)
    with pytest.raises(ValueError, match=r"read by 2 data-loader workers per process, this run has 3"):
        _stream(urls, num_workers=3, start_step=2, resume_state=[state])
    with pytest.raises(ValueError, match=r"read by 1 processes, this run has 2"):
        _stream(urls, num_workers=2, world_size=2, start_step=2, resume_state=[state])
    with pytest.raises(ValueError, match=r"handed out 2 micro-batches, but step 1"):
        _stream(urls, num_workers=2, start_step=1, resume_state=[state])
    with pytest.raises(ValueError, match="read 8 shards, this run lists 7"):
        _stream(urls[:7], num_workers=2, start_step=2, resume_state=[state])
    with pytest.raises(ValueError, match=r"images_per_batch: 3 -> 2"):
        _stream(urls, num_workers=2, images_per_batch=2, start_step=2, resume_state=[state])
    with pytest.raises(ValueError, match="holds no tar-shard stream state"):
        _stream(urls, num_workers=2, start_step=2)
    with pytest.raises(RuntimeError, match="iterated once"):
        iter(stream)


def test_fewer_shards_than_streams_is_refused(dataset):
    urls, _ = dataset
    with pytest.raises(ShardError, match=r"8 shards cannot feed 3 processes x 3 data-loader workers = 9 streams"):
        _stream(urls, world_size=3, num_workers=3)
