"""Block-level distillation: train every alternative to mimic its teacher segment, then profile it.

The teacher is frozen. Alternatives are trained in *bunches*: each step runs one teacher forward
pass that returns the activations at every cut point the bunch needs
(:meth:`bespoke.partition.Partition.activations`), and every alternative in the bunch takes its
segment's input activation and is trained against the segment's output activation, with the loss
of the selected distill-loss plugin. One optimiser steps all alternatives of a bunch at once
(per-parameter Adam, so results do not depend on who else is in the bunch).

- **Activation cache**: with ``cache_activations`` the first epoch keeps the teacher activations
  the bunch needs (when they fit in :data:`CACHE_LIMIT_BYTES`), so later epochs skip the teacher.
- **Out of memory**: the bunch is halved and retried from the initial weights; an alternative that
  runs out of memory alone, or fails in any other way, is marked failed with the reason, and the
  run goes on.
- **Determinism**: data order and augmentation are seeded per epoch, independent of the bunch, and
  every alternative starts from the initial weights stored in the house. A bunch retrained after
  an interruption gives the same result, whoever shares it.
- **Profiling** (held-out images, after training): the distillation error (MSE normalised by the
  variance of the teacher activation) and the replace-one score: the teacher with only this
  alternative swapped in, i.e. the teacher up to the segment, the alternative, then the teacher's
  remaining part (equal to :func:`bespoke.student.assemble` with one choice, but reusing the
  teacher's head activations), scored by agreement with the teacher's top-1 and top-1 accuracy
  when labels exist.
- **Durability**: results (weights, then the manifest) are written after every bunch, so a kill
  loses at most the bunch in progress. Under ``torchrun`` the pending alternatives are shared
  out across ranks; each rank writes its results to its own shard file, and rank 0 merges them
  into the manifest (see :class:`DistEnv`).
"""

from __future__ import annotations

import copy
import gc
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from bespoke.data import ImageSet, collate
from bespoke.house import AlternativeRecord, House, segment_info
from bespoke.types import SegmentInfo

# Activation caches larger than this are not kept (the teacher then runs every epoch).
CACHE_LIMIT_BYTES = int(os.environ.get("BESPOKE_CACHE_LIMIT_MB", "2048")) * 2**20


class BunchOutOfMemory(Exception):
    """A bunch ran out of memory; the caller halves it."""


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError))


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:300]}"


# --------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    initialised_here: bool = False

    @classmethod
    def from_env(cls, device: str = "cpu") -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        here = False
        if not dist.is_initialized():
            backend = "nccl" if str(device).startswith("cuda") and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend=backend)
            here = True
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), initialised_here=here)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Training one bunch
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One alternative being trained: its record, segment and module (initial weights loaded)."""

    record: AlternativeRecord
    segment: SegmentInfo
    module: nn.Module
    failed: str | None = None
    loss_sum: Any = 0.0
    loss_count: int = 0
    last_epoch_loss: float | None = None
    steps: int = 0
    seconds: float = 0.0

    @property
    def trainable(self) -> list[nn.Parameter]:
        return list(self.module.parameters())


@dataclass
class Settings:
    epochs: int = 1
    steps_per_epoch: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    cache_activations: bool = True
    seed: int = 0
    device: str = "cpu"
    cache_limit_bytes: int = CACHE_LIMIT_BYTES

    @classmethod
    def from_build(cls, build: Any, seed: int, device: str) -> "Settings":
        return cls(epochs=build.epochs, steps_per_epoch=build.steps_per_epoch,
                   batch_size=build.batch_size, lr=build.lr,
                   cache_activations=build.cache_activations, seed=seed, device=device)


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed the global RNGs (timm's augmentations use them) and return a loader generator."""
    s = seed * 1009 + epoch
    random.seed(s)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def _batches(data: ImageSet, settings: Settings, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    gen = _seed_epoch(settings.seed, epoch)
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=gen,
                        collate_fn=collate, num_workers=0)
    n = 0
    for batch in loader:
        if batch is None:
            continue
        if batch[0].shape[0] < 2 and len(data) > 1:  # BatchNorm cannot train on one image
            continue
        yield batch
        n += 1
        if settings.steps_per_epoch is not None and n >= settings.steps_per_epoch:
            return


def _optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
    if not params:
        return None
    for kwargs in ({"fused": True}, {"foreach": True}, {}):
        try:
            return torch.optim.Adam(params, lr=lr, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            continue
    return torch.optim.Adam(params, lr=lr)


def _cache_bytes(partition: Any, indices: Iterable[int], images: int) -> int:
    total = 0
    for i in indices:
        shape = partition.cut_points[i].shape
        total += math.prod(shape[1:]) * 4 * images
    return total


def train_bunch(partition: Any, jobs: list[Job], data: ImageSet, loss_fn: Callable,
                settings: Settings, on_step: Callable[[int, int, float, float], None] | None = None
                ) -> int:
    """Train ``jobs`` together; each step shares one teacher forward. Updates the jobs in place.

    Raises :class:`BunchOutOfMemory` when the bunch runs out of memory; any other failure of one
    alternative marks that job failed and training of the others continues.
    ``on_step(step, total_steps, mean_loss, images_per_second)`` reports progress. Returns the
    number of images the bunch trained on.
    """
    device = torch.device(settings.device)
    needed = sorted({j.segment.start for j in jobs} | {j.segment.end for j in jobs})
    active = [j for j in jobs if j.failed is None]
    if settings.epochs == 0:  # the block sources' own (closed-form) fits, profiled as they are
        for j in active:
            j.module.to(device).eval()
        return 0
    for j in active:
        # every parameter of an alternative trains (copies of teacher pieces come frozen)
        j.module.to(device).train().requires_grad_(True)
    trainable = [p for j in active for p in j.trainable]
    opt = _optimizer(trainable, settings.lr)
    per_epoch = math.ceil(len(data) / settings.batch_size)
    if settings.steps_per_epoch is not None:
        per_epoch = min(per_epoch, settings.steps_per_epoch)
    total = max(1, per_epoch * settings.epochs)
    use_cache = settings.cache_activations and settings.epochs > 1 and (
        _cache_bytes(partition, needed, len(data)) <= settings.cache_limit_bytes)
    cache: list[dict[int, torch.Tensor]] = []
    step = seen = 0
    for epoch in range(settings.epochs):
        for j in active:
            j.loss_sum, j.loss_count = torch.zeros((), device=device), 0
        if use_cache and epoch > 0:
            order = torch.randperm(len(cache), generator=_seed_epoch(settings.seed, epoch)).tolist()
            source: Iterable[Any] = (cache[i] for i in order)
        else:
            source = _batches(data, settings, epoch)
        for item in source:
            t0 = time.perf_counter()
            try:
                if isinstance(item, dict):
                    acts = item
                else:
                    x = item[0].to(device, non_blocking=True)
                    with torch.no_grad():
                        acts = partition.activations(x, needed)
                    if use_cache and epoch == 0:
                        cache.append({i: acts[i] for i in needed})
            except Exception as exc:
                if is_oom(exc):
                    raise BunchOutOfMemory(str(exc)) from None
                raise
            images = next(iter(acts.values())).shape[0]
            seen += images
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
                except Exception as exc:
                    if is_oom(exc):
                        raise BunchOutOfMemory(str(exc)) from None
                    j.failed = _reason(exc)
                    for p in j.module.parameters():
                        p.grad = None
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None:
                live = [j for j in active if j.failed is None and j.loss_count]
                mean = (float(torch.stack([j.loss_sum / j.loss_count for j in live]).mean())
                        if live else float("nan"))  # one device sync per step
                dt = time.perf_counter() - t0
                on_step(step, total, mean, images / dt if dt > 0 else 0.0)
        for j in active:
            if j.failed is None and j.loss_count:
                j.last_epoch_loss = float(j.loss_sum) / j.loss_count
    for j in active:
        j.module.eval()
        if j.failed is None and j.loss_count == 0:
            j.failed = "no training step ran: every training image failed to decode"
    return seen


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------


class Tails:
    """The teacher from cut point ``end`` to its output, per ``end`` (cached)."""

    def __init__(self, partition: Any):
        self.partition = partition
        self.last = len(partition.cut_points) - 1
        self._mods: dict[int, nn.Module] = {}

    def __call__(self, end: int, x: torch.Tensor) -> torch.Tensor:
        if end == self.last:
            return x
        mod = self._mods.get(end)
        if mod is None:
            mod = self._mods[end] = self.partition.extract(self.partition.segment(end, self.last)).eval()
        return mod(x)


@dataclass
class Profile:
    distill_error: float | None = None
    agreement: float | None = None
    top1: float | None = None
    kl: float | None = None


@dataclass
class TeacherScore:
    images: int = 0
    top1: float | None = None


def profile_bunch(partition: Any, jobs: list[Job], data: ImageSet, tails: Tails,
                  settings: Settings) -> tuple[dict[str, Profile], TeacherScore]:
    """Distillation error and replace-one scores of each job on the held-out images."""
    device = torch.device(settings.device)
    live = [j for j in jobs if j.failed is None]
    results = {j.record.id: Profile() for j in live}
    if not live or len(data) == 0:
        return results, TeacherScore()
    needed = sorted({j.segment.start for j in live} | {j.segment.end for j in live} | {tails.last})
    sq = {j.record.id: 0.0 for j in live}
    agree = {j.record.id: 0 for j in live}
    correct = {j.record.id: 0 for j in live}
    kl = {j.record.id: 0.0 for j in live}
    errors: dict[str, str] = {}
    # teacher activation statistics per end cut point, for the variance normalisation
    t_sum: dict[int, float] = {}
    t_sq: dict[int, float] = {}
    t_n: dict[int, int] = {}
    images = teacher_correct = 0
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            x, y = batch[0].to(device), batch[1].to(device)
            acts = partition.activations(x, needed)
            t_pred = acts[tails.last].argmax(-1)
            t_logp = torch.log_softmax(acts[tails.last].double(), -1)
            images += x.shape[0]
            teacher_correct += int((t_pred == y).sum())
            for end in {j.segment.end for j in live}:
                t = acts[end].double()
                t_sum[end] = t_sum.get(end, 0.0) + float(t.sum())
                t_sq[end] = t_sq.get(end, 0.0) + float((t * t).sum())
                t_n[end] = t_n.get(end, 0) + t.numel()
            for j in live:
                rid = j.record.id
                if rid in errors:
                    continue
                try:
                    out = j.module(acts[j.segment.start])
                    sq[rid] += float(((out.double() - acts[j.segment.end].double()) ** 2).sum())
                    logits = tails(j.segment.end, out)
                    pred = logits.argmax(-1)
                    # continuous replace-one score: informative even on a handful of images
                    kl[rid] += float((t_logp.exp() * (t_logp - torch.log_softmax(logits.double(), -1))).sum())
                    agree[rid] += int((pred == t_pred).sum())
                    correct[rid] += int((pred == y).sum())
                except Exception as exc:
                    errors[rid] = _reason(exc)
    labelled = bool(data.labelled)
    for j in live:
        rid = j.record.id
        if rid in errors:
            j.failed = f"profiling failed: {errors[rid]}"
            results.pop(rid)
            continue
        if images == 0:
            continue
        end = j.segment.end
        mean = t_sum[end] / t_n[end]
        var = max(t_sq[end] / t_n[end] - mean * mean, 1e-12)
        results[rid] = Profile(distill_error=sq[rid] / t_n[end] / var,
                               agreement=agree[rid] / images,
                               top1=correct[rid] / images if labelled else None,
                               kl=kl[rid] / images)
    return results, TeacherScore(images, teacher_correct / images if (labelled and images) else None)


# --------------------------------------------------------------------------------------------
# The whole house
# --------------------------------------------------------------------------------------------


@dataclass
class DistillReport:
    trained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    images_per_second: float = 0.0  # training only (teacher forward + every alternative's step)
    seconds: float = 0.0
    teacher: TeacherScore = field(default_factory=TeacherScore)


def _free_memory(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def distill_house(house: House, partition: Any, make_module: Callable[[AlternativeRecord], nn.Module],
                  train: ImageSet, val: ImageSet, loss_fn: Callable, settings: Settings, *,
                  bunch_size: int = 64, dist: DistEnv | None = None, console: Any = None
                  ) -> DistillReport:
    """Train and profile every pending alternative of ``house`` (this rank's share of them).

    ``make_module(record)`` rebuilds an alternative with its *initial* weights. Results are
    written after every bunch: to the manifest in a single process, to this rank's shard file
    under ``torchrun`` (rank 0 merges the shards at the end; see :meth:`House.merge_shards`).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from bespoke.console import progress as make_progress

    dist = dist or DistEnv()
    report = DistillReport()
    pending = [a for a in house.manifest.alternatives if a.status == "pending"]
    mine = pending[dist.rank::dist.world]
    if not mine:
        return report
    for p in partition.model.parameters():  # the teacher is frozen
        p.requires_grad_(False)
    teacher_params = {id(p) for p in partition.model.parameters()}
    tails = Tails(partition)
    size = max(1, min(bunch_size, len(mine)))
    queue: deque[list[AlternativeRecord]] = deque(mine[i:i + size] for i in range(0, len(mine), size))
    finished: list[AlternativeRecord] = []
    total_images = 0
    train_seconds = 0.0
    t_start = time.perf_counter()
    show = console is not None and dist.main
    # no distillation epochs (the few-image recipe): nothing to show progress of but profiling
    progress = make_progress(console if show and settings.epochs else None, TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4g}"),
                             TextColumn("{task.fields[ips]:.1f} img/s"), TimeElapsedColumn(),
                             line="{description}: step {completed}/{total}, loss {loss:.4g}, {ips:.1f} img/s, "
                                  "{elapsed:.0f} s")
    bunch_no = 0
    with progress:
        while queue:
            bunch = queue.popleft()
            bunch_no += 1
            jobs: list[Job] = []
            done: list[AlternativeRecord] = []
            for rec in bunch:
                try:
                    module = make_module(rec)
                    if any(id(p) in teacher_params for p in module.parameters()):
                        module = copy.deepcopy(module)  # never train the teacher's own weights
                    jobs.append(Job(rec, segment_info(house.segment(rec.segment)), module))
                except Exception as exc:
                    done.append(rec.model_copy(update={"status": "failed",
                                                       "reason": f"could not rebuild: {_reason(exc)}"}))
            label = f"bunch {bunch_no} ({len(jobs)} alt.)" + (f" rank {dist.rank}" if dist.world > 1 else "")
            task = progress.add_task(label, total=None, loss=float("nan"), ips=0.0)
            started = time.perf_counter()

            def on_step(step: int, total: int, loss: float, ips: float, _task=task) -> None:
                progress.update(_task, completed=step, total=total, loss=loss, ips=ips)

            try:
                total_images += train_bunch(partition, jobs, train, loss_fn, settings, on_step)
                train_seconds += time.perf_counter() - started
            except BunchOutOfMemory as exc:
                del jobs
                _free_memory(settings.device)
                progress.remove_task(task)
                if len(bunch) == 1:
                    done.append(bunch[0].model_copy(update={
                        "status": "failed",
                        "reason": f"out of memory even when trained alone at batch size "
                                  f"{settings.batch_size}; lower build.batch_size ({str(exc)[:200]})"}))
                    _commit(house, done, finished, dist)
                    continue
                size = max(1, len(bunch) // 2)
                rest = [r for b in [bunch, *queue] for r in b]
                queue = deque(rest[i:i + size] for i in range(0, len(rest), size))
                if console is not None:
                    console.print(f"[yellow]out of memory with {len(bunch)} alternatives in a bunch; "
                                  f"retrying in bunches of {size}[/yellow]")
                continue
            profiles, teacher_score = profile_bunch(partition, jobs, val, tails, settings)
            if teacher_score.images:
                report.teacher = teacher_score
            elapsed = time.perf_counter() - started
            for j in jobs:
                rec = j.record
                if j.failed is not None:
                    done.append(rec.model_copy(update={"status": "failed", "reason": j.failed,
                                                       "steps": j.steps}))
                    continue
                house.save_weights(rec.id, j.module)
                prof = profiles.get(rec.id, Profile())
                done.append(rec.model_copy(update={
                    "status": "trained", "reason": None, "train_loss": j.last_epoch_loss,
                    "steps": j.steps, "distill_error": prof.distill_error, "kl": prof.kl,
                    "agreement": prof.agreement, "top1": prof.top1,
                    "seconds": round(elapsed / max(1, len(jobs)), 4)}))
            _commit(house, done, finished, dist)
            del jobs
            _free_memory(settings.device)
    report.seconds = time.perf_counter() - t_start
    report.images_per_second = total_images / train_seconds if train_seconds else 0.0
    report.trained = [r.id for r in finished if r.status == "trained"]
    report.failed = [r.id for r in finished if r.status == "failed"]
    return report


def _commit(house: House, done: list[AlternativeRecord], finished: list[AlternativeRecord],
            dist: DistEnv) -> None:
    """Make a bunch's results durable: weights are already written; now the records."""
    finished.extend(done)
    if dist.world > 1:
        house.write_shard(dist.rank, finished)
        return
    for rec in done:
        house.update(rec)
    house.save()
    for rec in done:
        if rec.status == "trained":
            house.remove_initial(rec.id)


HOUSE_LEGEND = ("params: millions; MFLOPs: per image; loss: mean distillation loss of the last epoch; err: "
                "held-out MSE over the variance of the teacher's activation; agree, top-1: the teacher with only "
                "this block swapped in, % of held-out images on which it agrees with the teacher / is right")


def summary_table(house: House, title: str = "model house") -> Any:
    """A table of every alternative: cost, status, training loss and profile (the legend,
    :data:`HOUSE_LEGEND`, goes under it)."""
    from bespoke.console import table as make_table

    table = make_table(title, ("alternative", "left"), "params", "MFLOPs", ("status", "left"), "loss", "err",
                       "agree", "top-1")  # an alternative's id names its segment and its source

    def num(v: float | None, fmt: str = "{:.3g}") -> str:
        return "-" if v is None else fmt.format(v)

    for a in house.manifest.alternatives:
        status = a.status if a.status != "failed" else f"failed: {(a.reason or '')[:60]}"
        table.add_row(a.id, f"{a.params / 1e6:.3f}", f"{a.flops / 1e6:.1f}", status,
                      num(a.train_loss), num(a.distill_error), num(a.agreement and 100 * a.agreement, "{:.1f}"),
                      num(a.top1 and 100 * a.top1, "{:.1f}"))
    return table


# --------------------------------------------------------------------------------------------
# Build-stage helpers (used by bespoke.pipeline.build)
# --------------------------------------------------------------------------------------------


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
