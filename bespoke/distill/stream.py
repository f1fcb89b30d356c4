"""The training images as one seeded stream of steps (:class:`Stream`), the same for every
alternative, bunch, rank and restart, and the batches of a stretch of it (:func:`_steps`), each
image's augmentation seeded by its key (:class:`_Seeded`)."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from bespoke.data import ImageSet, collate
from bespoke.distill.jobs import Settings


@dataclass(frozen=True)
class Stream:
    """The training images as one seeded stream of steps, the same for every alternative, bunch,
    rank and restart: epoch ``e`` visits the images in its own seeded order, ``batch_size`` at a
    time, and step ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``. Each
    image's augmentation is seeded by (seed, epoch, image), so a step's batch does not depend on
    which process decodes it or on where training resumed."""

    images: int
    batch_size: int
    steps_per_epoch: int
    epochs: int
    seed: int

    @classmethod
    def of(cls, images: int, settings: Settings) -> "Stream":
        per_epoch = max(1, math.ceil(images / settings.batch_size))
        if settings.steps_per_epoch is not None:
            per_epoch = min(per_epoch, settings.steps_per_epoch)
        return cls(images, settings.batch_size, per_epoch, settings.epochs, settings.seed)

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs

    def keys(self, step: int) -> list[tuple[int, int]]:
        """``(image index, augmentation seed)`` of each image of step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = _order(self.images, self.seed, epoch)
        return [(i, (self.seed * 1_000_003 + epoch) * 1_000_033 + i)
                for i in order[k * self.batch_size:(k + 1) * self.batch_size]]

    def rounds(self, first_images: int, eta: float) -> list[int]:
        """The steps at which successive halving decides: slices of ``first_images``,
        ``eta`` times as many, ... until the stream ends (its last step ends the last round)."""
        if not first_images:
            return [self.total]
        bounds, pos, size = [], 0, max(1, math.ceil(first_images / self.batch_size))
        while pos + size < self.total:
            pos += size
            bounds.append(pos)
            size = math.ceil(size * eta)
        return [*bounds, self.total]


@functools.lru_cache(maxsize=4)
def _order(images: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(images, generator=torch.Generator().manual_seed(seed * 1009 + epoch)).tolist()


class _Seeded(Dataset):
    """``data[i]`` under a fixed seed per ``(i, seed)`` key: the augmentation of an image is the
    same in the main process and in any worker, before and after a restart."""

    def __init__(self, data: ImageSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed % 2**63)
            try:
                return self.data[index]
            finally:
                random.setstate(state)


def _steps(data: ImageSet, stream: Stream, start: int, stop: int, workers: int,
           cache: dict[int, Any] | None = None) -> Iterable[tuple[int, Any]]:
    """``(step, batch)`` for the steps ``start .. stop - 1``; a batch is ``(images, labels)``, or
    None when every image of it failed to decode, or (from ``cache``, epochs after the first)
    the teacher activations of a first-epoch batch in a seeded order of batches."""
    per = stream.steps_per_epoch
    step = start
    while step < stop:
        epoch, end = step // per, min(stop, (step // per + 1) * per)
        if cache is not None and epoch > 0 and len(cache) == per:
            order = torch.randperm(per, generator=torch.Generator().manual_seed(stream.seed * 1009 + epoch)).tolist()
            for s in range(step, end):
                yield s, cache[order[s % per]]
        else:
            keys = [stream.keys(s) for s in range(step, end)]
            loader = DataLoader(_Seeded(data), batch_sampler=keys, collate_fn=collate,
                                num_workers=workers if len(keys) > 1 else 0,
                                generator=torch.Generator().manual_seed(stream.seed))
            for s, batch in zip(range(step, end), loader):
                yield s, batch
        step = end


__all__ = ["Stream"]
