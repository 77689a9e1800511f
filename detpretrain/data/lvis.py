"""LVIS v1 datasets (``--format lvis --train-images COCO_ROOT --train-ann lvis_v1_train.json``) and repeat-factor
sampling (Gupta et al., "LVIS", appendix B.2; detectron2's ``RepeatFactorTrainingSampler``).

Images. LVIS annotates COCO 2017 images, and its v1 json names each image by ``coco_url`` only
(``http://images.cocodataset.org/train2017/000000391895.jpg``); LVIS v1 val draws from COCO train2017 and val2017
both. For an image whose url ends in ``<split>/<file>``, the reader looks for ``IMAGE_ROOT/<split>/<file>`` and then
``IMAGE_ROOT/<file>``: pass the COCO root that holds ``train2017/`` and ``val2017/`` (what detectron2 expects), or
one folder holding all the images. An image without ``coco_url`` uses its ``file_name`` (LVIS v0.5 names them
``COCO_val2014_000000391895.jpg``: the ``COCO_<split>2014_`` prefix is removed, which leaves the 2017 file name,
as detectron2 does) under ``IMAGE_ROOT``.

Targets follow ``detpretrain.data.detection`` (LVIS has no crowd annotations; ``iscrowd`` is all false). Federated
evaluation needs, per image, the categories verified absent (``neg_category_ids``) and those not exhaustively
annotated (``not_exhaustive_category_ids``): the evaluator reads them from the json; the dataset exposes them too
(``neg_category_ids(index)``, ``not_exhaustive_category_ids(index)``) with each category's ``frequency``
(r / c / f), for federated losses or per-frequency analysis.

Our recorded choices for LVIS (not from the PreDet paper, which defers to detectron2's LVIS recipe; these are
detectron2's LVISv1 configs): repeat-factor sampling with threshold t = 0.001, and at test time up to 300 detections
per image (lvis-api's default; the evaluator's ``LVIS_MAX_DETS_PER_IMAGE``; the detector's
``box_detections_per_img=300``) at a score threshold of 0.0001 (``LVIS_SCORE_THRESH``; ROI_HEADS.SCORE_THRESH_TEST),
where COCO's 0.05 would drop the low-scoring detections that rare categories mostly get.

Repeat-factor sampling: category c has frequency f(c) = (images annotated with c) / (images in the dataset, those
without annotations included) and factor r(c) = max(1, sqrt(t / f(c))); an image repeats r(I) = max over its
categories of r(c) times per epoch (1 for an image without annotations). Fractional factors are rounded
stochastically each epoch (floor(r) + 1 with probability r - floor(r)), from a generator seeded by (seed, epoch),
and the epoch is shuffled (``repeat_factor_epoch_order``). ``RepeatFactorBatchSampler`` is the engine's
``StepBatchSampler`` over that stream: the data of step s is a pure function of (seed, s), so a resumed run
continues exactly and W processes of batch B see what one of batch W*B sees. Grouped by aspect ratio, the same stream
feeds ``detpretrain.data.detection.GroupedBatchSampler``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detpretrain.data.coco import parse_coco_json
from detpretrain.data.detection import DatasetError, DetectionDataset, read_json, stream_generator
from detpretrain.engine import SampleKey, StepBatchSampler

__all__ = [
    "LVIS_REPEAT_THRESHOLD",
    "LvisDataset",
    "RepeatFactorBatchSampler",
    "lvis_image_file",
    "repeat_factor_epoch_indices",
    "repeat_factor_epoch_order",
    "repeat_factors_from_category_frequency",
]

LVIS_REPEAT_THRESHOLD = 0.001
"""t of repeat-factor sampling: LVIS appendix B.2 and detectron2's LVIS configs (our choice, recorded)."""

# Domain tags keep the rounding and permutation streams apart even when (seed, epoch) coincide.
_ROUNDING_STREAM = 0x4C565301
_PERMUTATION_STREAM = 0x4C565302


def lvis_image_file(image: dict[str, Any]) -> tuple[str | None, str]:
    """(COCO split folder or None, file name) of an LVIS image entry (module docstring)."""
    url = image.get("coco_url")
    if isinstance(url, str) and url:
        split, name = url.rstrip("/").split("/")[-2:]
        return split, name
    file_name = image.get("file_name")
    if isinstance(file_name, str) and file_name:
        name = Path(file_name).name
        # LVIS v0.5: "COCO_val2014_000000391895.jpg" -> "000000391895.jpg", the COCO 2017 name of the same image.
        if name.startswith("COCO_") and name.count("_") >= 2:
            name = name.split("_", 2)[2]
        return None, name
    raise DatasetError(f"LVIS image {image.get('id')} has neither 'coco_url' nor 'file_name'; add one")


class LvisDataset(DetectionDataset):
    """An LVIS json (v1, or v0.5) on COCO images; ``image_root`` as the module docstring explains.

    ``with_masks`` decodes instance masks (Mask R-CNN). Labels are 1..C in the order of sorted category ids.
    """

    format = "lvis"
    flag_key = "iscrowd"

    def __init__(self, ann_file: str | Path, image_root: str | Path, *, with_masks: bool = False) -> None:
        ann_file, image_root = Path(ann_file), Path(image_root)
        if not image_root.is_dir():
            raise DatasetError(
                f"image folder {image_root} does not exist; pass the COCO root holding train2017/ and val2017/, "
                "or a folder holding the images"
            )
        data = read_json(ann_file, what="LVIS annotation file")
        category_ids = _check_lvis(data, ann_file=ann_file)

        def candidates(image: dict[str, Any]) -> list[Path]:
            split, name = lvis_image_file(image)
            return ([image_root / split / name] if split else []) + [image_root / name]

        def federated_lists(image: dict[str, Any]) -> dict[str, Any]:
            lists = {}
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                unknown = sorted(set(image[key]) - category_ids)
                if unknown:
                    raise DatasetError(
                        f"{ann_file}: image {image['id']} has {key} {unknown[:5]} that 'categories' does not list; "
                        "is this json from another LVIS version than its categories?"
                    )
                lists[key] = list(image[key])
            return lists

        entries, categories, report = parse_coco_json(
            data,
            ann_file=ann_file,
            image_dir=image_root,
            image_paths=candidates,
            with_masks=with_masks,
            include_crowd=False,
            image_extra=federated_lists,
        )
        self.ann_file, self.image_root = ann_file, image_root
        self.category_frequency: dict[int, str] = {c["id"]: c["frequency"] for c in data["categories"]}
        super().__init__(
            entries,
            categories=categories,
            with_masks=with_masks,
            cleaning_report=report,
            source={"ann_file": str(ann_file), "image_root": str(image_root)},
        )

    def neg_category_ids(self, index: int) -> list[int]:
        """Categories verified absent from image ``index``: its detections of them are false positives."""
        return self.entry(index).extra["neg_category_ids"]

    def not_exhaustive_category_ids(self, index: int) -> list[int]:
        """Categories of image ``index`` whose instances are not all annotated: unmatched detections are ignored."""
        return self.entry(index).extra["not_exhaustive_category_ids"]

    def repeat_factors(self, *, threshold: float = LVIS_REPEAT_THRESHOLD) -> torch.Tensor:
        """Per-image repeat factors r(I) of this dataset's images (module docstring), float64 (N,)."""
        return repeat_factors_from_category_frequency(self.image_category_ids(), threshold=threshold)


def _check_lvis(data: Any, *, ann_file: Path) -> set[int]:
    """What makes a COCO-format json an LVIS one: frequencies and the federated lists. Returns the category ids."""
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise DatasetError(f"{ann_file} is not an LVIS file: it has no 'categories' list")
    for category in data["categories"]:
        if not isinstance(category, dict) or category.get("frequency") not in ("r", "c", "f"):
            raise DatasetError(
                f"{ann_file}: category {category.get('id') if isinstance(category, dict) else category!r} has no "
                "frequency r/c/f: not an LVIS file (use --format coco for COCO-format files)"
            )
    for image in data.get("images", []) if isinstance(data.get("images"), list) else []:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(image, dict) or not isinstance(image.get(key), list):
                raise DatasetError(
                    f"{ann_file}: image {image.get('id') if isinstance(image, dict) else image!r} has no {key!r} "
                    "list: not an LVIS file (use --format coco for COCO-format files)"
                )
    return {c["id"] for c in data["categories"]}


# ---------------------------------------------------------------------------------------- repeat-factor sampling


def repeat_factors_from_category_frequency(
    image_category_ids: Sequence[Collection[int | str]], *, threshold: float = LVIS_REPEAT_THRESHOLD
) -> torch.Tensor:
    """r(I) = max(1, max over c in I of sqrt(t / f(c))), f(c) the fraction of the images annotated with c.

    ``image_category_ids[i]`` holds the categories annotated in image i (empty for a negative image, which counts
    in the denominator of f and gets r = 1). float64, where detectron2 returns float32.
    """
    if not threshold > 0:
        raise ValueError(f"repeat threshold {threshold} must be > 0 (LVIS uses 0.001)")
    num_images = len(image_category_ids)
    if num_images == 0:
        raise ValueError("repeat factors need at least one image")
    images_with = Counter(c for categories in image_category_ids for c in set(categories))
    category_factor = {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in images_with.items()}
    return torch.tensor(
        [max((category_factor[c] for c in categories), default=1.0) for categories in image_category_ids],
        dtype=torch.float64,
    )


def _check_factors(repeat_factors: torch.Tensor | Sequence[float]) -> torch.Tensor:
    factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
    if factors.ndim != 1 or len(factors) == 0:
        raise ValueError(f"repeat factors must be a non-empty 1-D sequence, got shape {tuple(factors.shape)}")
    if not torch.isfinite(factors).all() or (factors < 1).any():
        raise ValueError("repeat factors must be finite and >= 1 (every image appears at least once per epoch)")
    return factors


def repeat_factor_epoch_indices(
    repeat_factors: torch.Tensor | Sequence[float], *, seed: int, epoch: int
) -> torch.Tensor:
    """The dataset indices of one epoch, in dataset order, image i repeated floor(r_i) or floor(r_i) + 1 times
    (the latter with probability r_i - floor(r_i)): int64 (L,), deterministic in (repeat_factors, seed, epoch)."""
    factors = _check_factors(repeat_factors)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed {seed} and epoch {epoch} must be >= 0")
    whole = torch.floor(factors)
    draws = torch.rand(len(factors), generator=stream_generator(_ROUNDING_STREAM, seed, epoch), dtype=torch.float64)
    counts = (whole + (draws < factors - whole).double()).long()
    # numpy's repeat: torch.repeat_interleave with a tensor of counts costs milliseconds even for tiny inputs.
    return torch.from_numpy(np.repeat(np.arange(len(factors), dtype=np.int64), counts.numpy()))


def repeat_factor_epoch_order(repeat_factors: torch.Tensor | Sequence[float], *, seed: int, epoch: int) -> torch.Tensor:
    """Epoch ``epoch`` of the repeat-factor stream: ``repeat_factor_epoch_indices`` shuffled; int64 (L,)."""
    indices = repeat_factor_epoch_indices(repeat_factors, seed=seed, epoch=epoch)
    return indices[torch.randperm(len(indices), generator=stream_generator(_PERMUTATION_STREAM, seed, epoch))]


class RepeatFactorBatchSampler(StepBatchSampler):
    """``engine.StepBatchSampler`` with repeat-factor sampling: the same steps, ranks and micro-batches of
    ``SampleKey(step, index)``, over the stream ``shuffle(expand(epoch 0)) ++ shuffle(expand(epoch 1)) ++ ...``,
    where ``expand`` is ``repeat_factor_epoch_indices``. Use it in place of ``StepBatchSampler``::

        sampler = RepeatFactorBatchSampler(repeat_factors=dataset.repeat_factors(), batch_size=..., seed=...,
                                           start_step=start_step, total_steps=args.iters, rank=..., world_size=...)
    """

    def __init__(
        self,
        *,
        repeat_factors: torch.Tensor | Sequence[float],
        batch_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
    ) -> None:
        factors = _check_factors(repeat_factors)
        super().__init__(
            dataset_size=len(factors),
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            total_steps=total_steps,
            rank=rank,
            world_size=world_size,
            accum_steps=accum_steps,
        )
        self.repeat_factors = factors
        self._epoch_lengths: list[int] = []
        self._cache: dict[int, torch.Tensor] = {}

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The shuffled, repeated dataset indices of ``epoch``."""
        if epoch not in self._cache:
            # A batch spans at most two epochs: keep the last few only.
            if len(self._cache) >= 3:
                del self._cache[min(self._cache)]
            self._cache[epoch] = repeat_factor_epoch_order(self.repeat_factors, seed=self.seed, epoch=epoch)
        return self._cache[epoch]

    def _epoch_length(self, epoch: int) -> int:
        while len(self._epoch_lengths) <= epoch:
            next_epoch = len(self._epoch_lengths)
            count = len(repeat_factor_epoch_indices(self.repeat_factors, seed=self.seed, epoch=next_epoch))
            self._epoch_lengths.append(count)
        return self._epoch_lengths[epoch]

    def global_batch_indices(self, step: int) -> list[int]:
        """Dataset indices of the global batch at ``step``: positions [step*G, (step+1)*G) of the stream."""
        global_batch_size = self.batch_size * self.world_size * self.accum_steps
        position, end = step * global_batch_size, (step + 1) * global_batch_size
        epoch, epoch_start = 0, 0
        while epoch_start + self._epoch_length(epoch) <= position:
            epoch_start += self._epoch_length(epoch)
            epoch += 1
        indices: list[int] = []
        while position < end:
            offset = position - epoch_start
            take = min(end - position, self._epoch_length(epoch) - offset)
            indices.extend(self.epoch_order(epoch)[offset : offset + take].tolist())
            position += take
            epoch_start += self._epoch_length(epoch)
            epoch += 1
        return indices

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.start_step, self.total_steps):
            indices = self.global_batch_indices(step)
            for micro_step in range(self.accum_steps):
                start = (micro_step * self.world_size + self.rank) * self.batch_size
                yield [SampleKey(step, index) for index in indices[start : start + self.batch_size]]
