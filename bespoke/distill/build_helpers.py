"""Helpers of the build stage (:func:`bespoke.pipeline.build`, :mod:`bespoke.stages.build`) and of
the stages that rebuild alternatives: a block source by name (:func:`source_for`), the calibration
images of the closed-form fits (:func:`calibration_batch`), the teacher's own top-1
(:func:`teacher_top1`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from bespoke.data import ImageSet, collate
from bespoke.distill.jobs import Settings


def source_for(name: str, sources: dict[str, Any], cfg: Any, registry: Any) -> Any:
    """The block source ``name`` (for rebuilding) from ``sources``, made through the plugin
    facade (:meth:`bespoke.plugins.Registry.block_source`) and kept there if not enabled now."""
    if name not in sources:
        sources[name] = registry.block_source(name, cfg.plugin_options.get(name), donors=cfg.donors)
    return sources[name]


def calibration_batch(data: ImageSet, count: int, views: ImageSet | None = None, seed: int = 0) -> torch.Tensor | None:
    """The first ``count`` decodable images, preprocessed, as one tensor (or None if none).
    With ``views`` (the same images under a random, train-time transform) and fewer images than
    ``count``, the rest are augmented views of them, drawn in turn with a fixed seed: the
    closed-form fits of the few-image recipe then see many crops of each image."""
    import random

    xs: list[torch.Tensor] = []
    for i in range(len(data)):
        item = data[i]
        if item is not None:
            xs.append(item[0])
        if len(xs) >= count:
            break
    if views is not None and xs and len(xs) < count and len(views):
        with torch.random.fork_rng(devices=[]):
            state = random.getstate()
            try:
                torch.manual_seed(seed)
                random.seed(seed)
                i = 0
                while len(xs) < count and i < 4 * count:
                    item = views[i % len(views)]
                    if item is not None:
                        xs.append(item[0])
                    i += 1
            finally:
                random.setstate(state)
    return torch.stack(xs) if xs else None


def teacher_top1(partition: Any, data: ImageSet, settings: Settings) -> float | None:
    """The teacher's own top-1 on labelled held-out images."""
    last = len(partition.cut_points) - 1
    correct = n = 0
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            logits = partition.activations(batch[0].to(settings.device), [last])[last]
            correct += int((logits.argmax(-1).cpu() == batch[1]).sum())
            n += batch[0].shape[0]
    return correct / n if n else None


__all__ = ["calibration_batch", "source_for", "teacher_top1"]
