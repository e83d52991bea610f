"""Data order as a pure function of the step: resumable, sharded per rank.

Step s (0-based) of a run with global batch G = batch_size * world_size reads
positions [p * G, (p + 1) * G) of epoch e's permutation, where
(e, p) = divmod(s, steps_per_epoch); rank r takes its slice of batch_size.
Each item is requested as (index, seed) with the seed derived from
(seed, epoch, index), so a resumed run reads exactly the data the
uninterrupted run would have read, whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .augment import MultiCropDataset
from .folder import ImageFolderDataset
from .shapes import ShapesDataset


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the non-negative integers `parts`."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of item `index` in epoch `epoch`."""
    return derive_seed(seed, 2, epoch, index)


class StepBatchSampler:
    """Yields the batches (lists of (index, seed)) of this rank from step `start_step` on, forever."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError("the data set is empty")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = max(1, num_items // self.global_batch)
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 1, epoch))
            need = self.steps_per_epoch * self.global_batch
            parts, have = [], 0
            while have < need:  # a data set smaller than one global batch repeats
                parts.append(torch.randperm(self.num_items, generator=g))
                have += self.num_items
            self._epoch, self._perm = epoch, torch.cat(parts)[:need]
        return self._perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        start = pos * self.global_batch + self.rank * self.batch_size
        idx = perm[start : start + self.batch_size].tolist()
        return [(i, sample_seed(self.seed, epoch, i)) for i in idx]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def build_base_dataset(data_cfg: dict, warn_dir: str | Path | None = None):
    """The embedded scenes (data.source == "shapes") or the image folder at data.source."""
    source = data_cfg.get("source", "shapes")
    if source == "shapes":
        return ShapesDataset(
            num_images=data_cfg["num_images"],
            size=data_cfg["image_size"],
            seed=data_cfg.get("shapes_seed", 0),
            with_masks=False,
        )
    return ImageFolderDataset(source, warn_dir=warn_dir)


def num_global_crops(data_cfg: dict) -> int:
    """Global-scale crops per image: the student's and the teacher's view, and with
    data.masked_views=crops one per masked view (crop v is masked view v, as in the public
    code: the first is the student's view, the second the teacher's)."""
    if data_cfg.get("masked_views", "copies") == "crops":
        return max(2, int(data_cfg["num_masked_views"]))
    return 2


def build_loader(
    data_cfg: dict,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    warn_dir: str | Path | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader of multi-crop batches starting at step `start_step`."""
    base = build_base_dataset(data_cfg, warn_dir)
    dataset = MultiCropDataset(
        base,
        global_size=data_cfg["global_size"],
        local_size=data_cfg["local_size"],
        num_local=data_cfg["num_local_crops"],
        global_scale=tuple(data_cfg["global_scale"]),
        local_scale=tuple(data_cfg["local_scale"]),
        num_global=num_global_crops(data_cfg),
    )
    sampler = StepBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_step)
    workers = int(data_cfg.get("num_workers", 0))
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        # A private generator: creating the loader's iterator must not consume the
        # global torch RNG (that would make a resumed run differ from an uninterrupted one).
        generator=torch.Generator().manual_seed(seed),
    )
