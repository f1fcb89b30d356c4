"""Training one bunch (:func:`train_bunch`): every step runs one teacher forward pass that returns
the activations at every cut point the bunch needs, and every alternative of the bunch is trained
on its segment's input and output activations; one Adam optimiser steps them all."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from bespoke.data import ImageSet
from bespoke.distill.jobs import (BunchOutOfMemory, Job, Settings, _optimizer, _reason, _restore_optimizer, is_oom,
                                  optimizer_state)
from bespoke.distill.stream import Stream, _steps


def _cache_bytes(partition: Any, indices: Iterable[int], images: int) -> int:
    total = 0
    for i in indices:
        shape = partition.cut_points[i].shape
        total += math.prod(shape[1:]) * 4 * images
    return total


def train_bunch(partition: Any, jobs: list[Job], data: ImageSet, loss_fn: Callable,
                settings: Settings, on_step: Callable[[int, int, float, float], None] | None = None,
                *, stop: int | None = None,
                checkpoint: Callable[[list[Job], torch.optim.Optimizer | None], None] | None = None) -> int:
    """Train ``jobs`` together from their (common) position in the image stream up to step
    ``stop`` (default: its end); each step shares one teacher forward. Updates the jobs in place.

    Raises :class:`BunchOutOfMemory` when the bunch runs out of memory; any other failure of one
    alternative marks that job failed and training of the others continues.
    ``on_step(step, total_steps, mean_loss, images_per_second)`` reports progress;
    ``checkpoint(jobs, optimiser)`` is called at most every ``settings.checkpoint_minutes`` to
    save the jobs' training states. Returns the number of images the bunch trained on.
    """
    device = torch.device(settings.device)
    stream = Stream.of(len(data), settings)
    stop = stream.total if stop is None else stop
    active = [j for j in jobs if j.failed is None]
    if settings.epochs == 0:  # the block sources' own (closed-form) fits, profiled as they are
        for j in active:
            j.module.to(device).eval()
        return 0
    start = min((j.position for j in active), default=stop)
    if any(j.position != start for j in active):
        raise ValueError("a bunch's alternatives must be at the same step of the image stream")
    _to_training(active, device, settings.freeze_batchnorm)
    opt = _bunch_optimizer(active, settings.lr)
    needed = sorted({j.segment.start for j in jobs} | {j.segment.end for j in jobs})
    per = stream.steps_per_epoch
    # first-epoch activations replayed by later epochs, when the whole run is this one call
    use_cache = (settings.cache_activations and start == 0 and stop > per and not settings.halving
                 and _cache_bytes(partition, needed, min(len(data), per * settings.batch_size))
                 <= settings.cache_limit_bytes)
    cache: dict[int, Any] | None = {} if use_cache else None
    seen = 0
    last_save = time.perf_counter()
    for step, item in _steps(data, stream, start, stop, settings.workers, cache):
        t0 = time.perf_counter()
        if step % per == 0 and step > 0:  # a new epoch: the last one's mean loss
            _new_epoch(active, device)
        usable = item is not None and (isinstance(item, dict) or item[0].shape[0] >= 2 or len(data) == 1)
        if usable:  # (BatchNorm cannot train on one image)
            acts = _teacher_activations(partition, item, needed, device, cache if step < per else None, step)
            images = next(iter(acts.values())).shape[0]
            seen += images
            _train_step(active, acts, loss_fn, images, opt)
        for j in active:
            j.position = step + 1
        if on_step is not None and usable:
            _report_step(active, on_step, step + 1 - start, stop - start, images, t0)
        if (checkpoint is not None and step + 1 < stop
                and time.perf_counter() - last_save >= settings.checkpoint_minutes * 60):
            checkpoint(active, opt)
            last_save = time.perf_counter()
    _stream_stopped(active, opt, stop, stream, device)
    return seen


def _to_training(active: list[Job], device: torch.device, freeze_batchnorm: bool) -> None:
    """The jobs' modules on ``device``, in training mode, every parameter trainable."""
    for j in active:
        # every parameter of an alternative trains (copies of teacher pieces come frozen)
        j.module.to(device).train().requires_grad_(True)
        if freeze_batchnorm:  # running statistics stay as fitted; scale and shift still train
            for m in j.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if not isinstance(j.loss_sum, torch.Tensor):
            j.loss_sum = torch.tensor(float(j.loss_sum), device=device)


def _bunch_optimizer(active: list[Job], lr: float) -> torch.optim.Optimizer | None:
    """One Adam over the bunch, with the jobs' saved states put back."""
    # one param group per learning rate: an alternative's spec may scale build.lr (lr_scale)
    groups: dict[float, list[nn.Parameter]] = {}
    for j in active:
        groups.setdefault(j.lr_scale, []).extend(j.trainable)
    opt = _optimizer([{"params": ps, "lr": lr * scale} for scale, ps in sorted(groups.items())], lr)
    if opt is not None:
        for j in active:
            _restore_optimizer(opt, j)
    return opt


def _new_epoch(active: list[Job], device: torch.device) -> None:
    """Inside the stream, at an epoch's first step: the last epoch's mean loss, and a fresh sum."""
    for j in active:
        if j.failed is None and j.loss_count:
            j.last_epoch_loss = float(j.loss_sum) / j.loss_count
        j.loss_sum, j.loss_count = torch.zeros((), device=device), 0


def _teacher_activations(partition: Any, item: Any, needed: list[int], device: torch.device,
                         cache: dict[int, Any] | None, step: int) -> dict[int, torch.Tensor]:
    """The teacher's activations at ``needed`` for one batch (``item`` itself when it holds them,
    replayed from the cache); kept in ``cache`` under ``step`` when one is given."""
    try:
        if isinstance(item, dict):
            return item
        x = item[0].to(device, non_blocking=True)
        with torch.no_grad():
            acts = partition.activations(x, needed)
        if cache is not None:
            cache[step] = {i: acts[i] for i in needed}
        return acts
    except Exception as exc:
        if is_oom(exc):
            raise BunchOutOfMemory(str(exc)) from None
        raise


def _train_step(active: list[Job], acts: dict[int, torch.Tensor], loss_fn: Callable, images: int,
                opt: torch.optim.Optimizer | None) -> None:
    """One step of every job still training, on the teacher activations ``acts``."""
    for j in active:
        if j.failed is not None:
            continue
        try:
            out = j.module(acts[j.segment.start])
            loss = loss_fn(out, acts[j.segment.end])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()}; lower build.lr")
            if loss.requires_grad:
                loss.backward()
            j.loss_sum = j.loss_sum + loss.detach()
            j.loss_count += 1
            j.steps += 1
            j.images += images
        except Exception as exc:
            if is_oom(exc):
                raise BunchOutOfMemory(str(exc)) from None
            j.failed = _reason(exc)
            for p in j.module.parameters():
                p.grad = None
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _report_step(active: list[Job], on_step: Callable[[int, int, float, float], None], step: int, total: int,
                 images: int, t0: float) -> None:
    """``on_step`` with the mean loss of the epoch so far over the jobs, and this step's speed."""
    live = [j for j in active if j.failed is None and j.loss_count]
    mean = (float(torch.stack([j.loss_sum / j.loss_count for j in live]).mean())
            if live else float("nan"))  # one device sync per step
    dt = time.perf_counter() - t0
    on_step(step, total, mean, images / dt if dt > 0 else 0.0)


def _stream_stopped(active: list[Job], opt: torch.optim.Optimizer | None, stop: int, stream: Stream,
                    device: torch.device) -> None:
    """Bookkeeping where the bunch stopped in the stream: an epoch's end, a round's end, its end."""
    if stop % stream.steps_per_epoch == 0:  # the stream stopped at an epoch's end
        for j in active:
            if j.failed is None and j.loss_count:
                j.last_epoch_loss = float(j.loss_sum) / j.loss_count
                j.loss_sum, j.loss_count = torch.zeros((), device=device), 0
    if stop < stream.total and opt is not None:  # a round's end: Adam's state goes on with the job
        for j in active:
            j.optim_state = optimizer_state(opt, j)
    for j in active:
        j.module.eval()
        if j.failed is None and j.steps == 0 and stop == stream.total:
            j.failed = "no training step ran: every training image failed to decode"


__all__ = ["train_bunch"]
