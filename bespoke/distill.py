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
import functools
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
from torch.utils.data import DataLoader, Dataset

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
    """One alternative being trained: its record, segment and module, and where it is in the
    image stream (restored from its saved training state after a kill or between rounds)."""

    record: AlternativeRecord
    segment: SegmentInfo
    module: nn.Module
    failed: str | None = None
    loss_sum: Any = 0.0
    loss_count: int = 0
    last_epoch_loss: float | None = None
    steps: int = 0
    seconds: float = 0.0
    position: int = 0  # steps of the image stream trained on (Stream)
    images: int = 0  # training images seen
    kl_history: list[float] = field(default_factory=list)  # held-out KL at each round's end
    best: dict[str, Any] | None = None  # the round's end that scored best so far (keep-best)
    optim_state: list[dict[str, Any]] | None = None  # Adam's state per trainable parameter

    @property
    def trainable(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    @property
    def lr_scale(self) -> float:
        """Its learning rate as a multiple of build.lr (the spec's ``lr_scale``)."""
        return float(getattr(getattr(self.record, "spec", None), "lr_scale", 1.0))

    @property
    def train_loss(self) -> float | None:
        """Mean loss of the last whole epoch; of the epoch so far when it stopped inside one."""
        return float(self.loss_sum) / self.loss_count if self.loss_count else self.last_epoch_loss

    def info(self) -> dict[str, Any]:
        """What a saved training state records besides tensors (JSON)."""
        return {"position": self.position, "images": self.images, "steps": self.steps,
                "loss_sum": float(self.loss_sum), "loss_count": self.loss_count,
                "last_epoch_loss": self.last_epoch_loss, "kl_history": self.kl_history, "best": self.best}

    def restore(self, tensors: dict[str, Any], info: dict[str, Any]) -> None:
        self.module.load_state_dict(tensors["module"])
        self.optim_state = tensors.get("optim")
        self.position, self.images, self.steps = int(info["position"]), int(info["images"]), int(info["steps"])
        self.loss_sum, self.loss_count = float(info["loss_sum"]), int(info["loss_count"])
        self.last_epoch_loss = info.get("last_epoch_loss")
        self.kl_history = [float(v) for v in info.get("kl_history", [])]
        self.best = info.get("best")


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
    workers: int = 0
    checkpoint_minutes: float = 5.0
    halving: int = 0
    halving_eta: float = 3.0
    halving_margin: float = 0.2
    halving_stall: float = 0.05
    freeze_batchnorm: bool = True

    @classmethod
    def from_build(cls, build: Any, seed: int, device: str) -> "Settings":
        return cls(epochs=build.epochs, steps_per_epoch=build.steps_per_epoch,
                   batch_size=build.batch_size, lr=build.lr,
                   cache_activations=build.cache_activations, seed=seed, device=device,
                   workers=build.workers, checkpoint_minutes=build.checkpoint_minutes,
                   halving=build.halving, halving_eta=build.halving_eta, halving_margin=build.halving_margin,
                   halving_stall=build.halving_stall,
                   freeze_batchnorm=build.freeze_batchnorm)


# --------------------------------------------------------------------------------------------
# The image stream
# --------------------------------------------------------------------------------------------


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


def _optimizer(params: list[nn.Parameter] | list[dict[str, Any]], lr: float) -> torch.optim.Optimizer | None:
    """Adam over ``params``: parameters, or param groups (each alternative's own learning rate)."""
    if not params or (isinstance(params[0], dict) and not any(g["params"] for g in params)):
        return None
    for kwargs in ({"fused": True}, {"foreach": True}, {}):
        try:
            return torch.optim.Adam(params, lr=lr, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            continue
    return torch.optim.Adam(params, lr=lr)


def _restore_optimizer(opt: torch.optim.Optimizer, job: Job) -> None:
    """Put a job's saved per-parameter Adam state back (Adam is per parameter: whoever else is in
    the bunch does not matter)."""
    if not job.optim_state:
        return
    fused = bool(opt.defaults.get("fused"))
    for p, state in zip(job.trainable, job.optim_state):
        if state:
            opt.state[p] = {k: (v.to(p.device) if isinstance(v, torch.Tensor) and (k != "step" or fused) else v)
                            for k, v in state.items()}
    job.optim_state = None


def optimizer_state(opt: torch.optim.Optimizer | None, job: Job) -> list[dict[str, Any]]:
    """Adam's state of each of ``job``'s parameters (empty dicts before its first step)."""
    if opt is None:
        return []
    return [dict(opt.state.get(p, {})) for p in job.trainable]


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
    for j in active:
        # every parameter of an alternative trains (copies of teacher pieces come frozen)
        j.module.to(device).train().requires_grad_(True)
        if settings.freeze_batchnorm:  # running statistics stay as fitted; scale and shift still train
            for m in j.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if not isinstance(j.loss_sum, torch.Tensor):
            j.loss_sum = torch.tensor(float(j.loss_sum), device=device)
    # one param group per learning rate: an alternative's spec may scale build.lr (lr_scale)
    groups: dict[float, list[nn.Parameter]] = {}
    for j in active:
        groups.setdefault(j.lr_scale, []).extend(j.trainable)
    opt = _optimizer([{"params": ps, "lr": settings.lr * scale} for scale, ps in sorted(groups.items())],
                     settings.lr)
    if opt is not None:
        for j in active:
            _restore_optimizer(opt, j)
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
            for j in active:
                if j.failed is None and j.loss_count:
                    j.last_epoch_loss = float(j.loss_sum) / j.loss_count
                j.loss_sum, j.loss_count = torch.zeros((), device=device), 0
        usable = item is not None and (isinstance(item, dict) or item[0].shape[0] >= 2 or len(data) == 1)
        if usable:  # (BatchNorm cannot train on one image)
            try:
                if isinstance(item, dict):
                    acts = item
                else:
                    x = item[0].to(device, non_blocking=True)
                    with torch.no_grad():
                        acts = partition.activations(x, needed)
                    if cache is not None and step < per:
                        cache[step] = {i: acts[i] for i in needed}
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
        for j in active:
            j.position = step + 1
        if on_step is not None and usable:
            live = [j for j in active if j.failed is None and j.loss_count]
            mean = (float(torch.stack([j.loss_sum / j.loss_count for j in live]).mean())
                    if live else float("nan"))  # one device sync per step
            dt = time.perf_counter() - t0
            on_step(step + 1 - start, stop - start, mean, images / dt if dt > 0 else 0.0)
        if (checkpoint is not None and step + 1 < stop
                and time.perf_counter() - last_save >= settings.checkpoint_minutes * 60):
            checkpoint(active, opt)
            last_save = time.perf_counter()
    if stop % per == 0:  # the stream stopped at an epoch's end
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
    stopped: list[str] = field(default_factory=list)  # trained, stopped early by successive halving


def _free_memory(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def distill_house(house: House, partition: Any, make_module: Callable[[AlternativeRecord], nn.Module],
                  train: ImageSet, val: ImageSet, loss_fn: Callable, settings: Settings, *,
                  bunch_size: int = 64, dist: DistEnv | None = None, console: Any = None
                  ) -> DistillReport:
    """Train and profile every pending alternative of ``house`` (this rank's share of them).

    ``make_module(record)`` rebuilds an alternative with its *initial* weights. Finished results
    are written after every bunch: to the manifest in a single process, to this rank's shard file
    under ``torchrun`` (rank 0 merges the shards at the end; see :meth:`House.merge_shards`).
    While a bunch trains, each alternative's training state is saved every
    ``settings.checkpoint_minutes`` (:meth:`House.save_state`), so a killed build resumes where
    its alternatives were in the image stream. With ``settings.halving`` the stream is cut into
    rounds (:meth:`Stream.rounds`); after each, every alternative still training is profiled on
    the held-out images and those :func:`halving_stops` names stop, trained as far as they got.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from bespoke.console import progress as make_progress

    dist = dist or DistEnv()
    report = DistillReport()
    pending = [a for a in house.manifest.alternatives if a.status == "pending"]
    halving = bool(settings.halving and settings.epochs)
    if halving and dist.world > 1:  # a segment's alternatives on one rank: halving compares them
        seg_rank = {s.id: i % dist.world for i, s in enumerate(house.manifest.segments)}
        mine = [a for a in pending if seg_rank.get(a.segment, 0) == dist.rank]
    else:
        mine = pending[dist.rank::dist.world]
    if not mine:
        return report
    for p in partition.model.parameters():  # the teacher is frozen
        p.requires_grad_(False)
    teacher_params = {id(p) for p in partition.model.parameters()}
    tails = Tails(partition)
    stream = Stream.of(len(train), settings)
    # halving decides first on the untrained alternatives (step 0), then after every round
    bounds = ([0] if halving else []) + (stream.rounds(settings.halving, settings.halving_eta) if halving
                                         else [stream.total])
    halving_bounds = set(bounds) if halving else set()
    # an alternative's image cap (its spec's max_images) ends a round of its own there
    caps = {min(stream.total, math.ceil(cap / settings.batch_size))
            for cap in (_max_images(rec) for rec in mine) if cap and settings.epochs}
    bounds = sorted(set(bounds) | caps)
    info = {rec.id: house.state_info(rec.id) or {} for rec in mine}
    resumed = {k: v["position"] for k, v in info.items() if v.get("position")}
    show = console is not None and dist.main
    if show and resumed:
        console.print(f"resuming {len(resumed)} alternative(s) inside the image stream, at step(s) "
                      f"{', '.join(str(s) for s in sorted(set(resumed.values())))} of {stream.total}")
    live = list(mine)
    finished: list[AlternativeRecord] = []
    total_images = 0
    train_seconds = 0.0
    t_start = time.perf_counter()
    # no distillation epochs (the few-image recipe): nothing to show progress of but profiling
    progress = make_progress(console if show and settings.epochs else None, TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4g}"),
                             TextColumn("{task.fields[ips]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                             line="{description}: step {completed}/{total}, loss {loss:.4g}, {ips:.1f} img/s, "
                                  "{elapsed:.0f} s, {eta} left")
    bunch_no = 0

    def save_states(jobs: list[Job], opt: Any = None, profiles: dict[str, Profile] | None = None,
                    at: int | None = None) -> None:
        for j in jobs:
            if j.failed is not None:
                continue
            state = optimizer_state(opt, j) if opt is not None else (j.optim_state or [])
            extra = {}
            if at is not None:
                prof = (profiles or {}).get(j.record.id, Profile())
                extra = {"profiled_at": at, "profile": prof.__dict__}
                if prof.kl is not None and (j.best is None or prof.kl < j.best["kl"]):  # keep-best
                    house.save_best(j.record.id, j.module, at)
                    j.best = {"step": at, "kl": prof.kl, "images": j.images, "profile": prof.__dict__}
            house.save_state(j.record.id, {"module": j.module.state_dict(), "optim": state}, j.info() | extra)
            if at is not None and j.best is not None:
                house.prune_best(j.record.id, j.best["step"])

    def finish(job: Job, prof: Profile, seconds: float | None, stopped: str | None = None) -> AlternativeRecord:
        """Save a job's weights and give its finished record: the weights of the round's end that
        scored best on the held-out images when one scored better than the last (keep-best)."""
        kept = None
        best = job.best
        if (best is not None and prof.kl is not None and best["kl"] < prof.kl
                and house.load_best(job.record.id, job.module, best["step"])):
            kept = (f"the weights after {best['images']:,} images (KL {best['kl']:.3g}; "
                    f"{prof.kl:.3g} after {job.images:,})")
            prof = Profile(**best["profile"])
        house.save_weights(job.record.id, job.module)
        return _trained(job.record, job, prof, seconds, stopped=stopped, kept=kept)

    def make_job(rec: AlternativeRecord) -> Job:
        module = make_module(rec)
        if any(id(p) in teacher_params for p in module.parameters()):
            module = copy.deepcopy(module)  # never train the teacher's own weights
        job = Job(rec, segment_info(house.segment(rec.segment)), module)
        saved = house.load_state(rec.id) if info.get(rec.id) else None
        if saved is not None:
            job.restore(*saved)
        return job

    with progress:
        for r, bound in enumerate(bounds):
            final = bound == stream.total and r == len(bounds) - 1
            todo = [rec for rec in live if final or info[rec.id].get("position", 0) < bound
                    or info[rec.id].get("profiled_at") != bound]
            groups: dict[int, list[AlternativeRecord]] = {}
            for rec in todo:
                groups.setdefault(int(info[rec.id].get("position", 0)), []).append(rec)
            size = max(1, min(bunch_size, len(todo) or 1))
            queue: deque[list[AlternativeRecord]] = deque(
                g[i:i + size] for _, g in sorted(groups.items()) for i in range(0, len(g), size))
            while queue:
                bunch = queue.popleft()
                bunch_no += 1
                jobs: list[Job] = []
                done: list[AlternativeRecord] = []
                for rec in bunch:
                    try:
                        jobs.append(make_job(rec))
                    except Exception as exc:
                        done.append(rec.model_copy(update={"status": "failed",
                                                           "reason": f"could not rebuild: {_reason(exc)}"}))
                positions = {j.position for j in jobs}
                if len(positions) > 1:  # a saved state that could not be read: start those again
                    late = [j.record for j in jobs if j.position != max(positions)]
                    for rec in late:
                        house.remove_state(rec.id)
                        info[rec.id] = {}
                    queue.append(late)
                    jobs = [j for j in jobs if j.position == max(positions)]
                rounds_left = f"round {r + 1 - bool(halving)}/{len(bounds) - bool(halving)} " if halving and bound else ""
                label = (f"{rounds_left}bunch {bunch_no} ({len(jobs)} alt.)"
                         + (f" rank {dist.rank}" if dist.world > 1 else ""))
                trains = bool(jobs) and (bound > jobs[0].position or final)
                task = progress.add_task(label, total=None, loss=float("nan"), ips=0.0) if trains else None
                started = time.perf_counter()

                def on_step(step: int, total: int, loss: float, ips: float, _task=task) -> None:
                    progress.update(_task, completed=step, total=total, loss=loss, ips=ips)

                try:
                    if trains:
                        total_images += train_bunch(partition, jobs, train, loss_fn, settings, on_step,
                                                    stop=bound, checkpoint=save_states)
                        train_seconds += time.perf_counter() - started
                except BunchOutOfMemory as exc:
                    del jobs
                    _free_memory(settings.device)
                    if task is not None:
                        progress.remove_task(task)
                    if len(bunch) == 1:
                        house.remove_state(bunch[0].id)
                        done.append(bunch[0].model_copy(update={
                            "status": "failed",
                            "reason": f"out of memory even when trained alone at batch size "
                                      f"{settings.batch_size}; lower build.batch_size ({str(exc)[:200]})"}))
                        live = [rec for rec in live if rec.id != bunch[0].id]
                        _commit(house, done, finished, dist)
                        continue
                    half = max(1, len(bunch) // 2)
                    rest = [rec for b in [bunch, *queue] for rec in b]
                    by_pos: dict[int, list[AlternativeRecord]] = {}
                    for rec in rest:  # the halved bunches resume from their saved states
                        info[rec.id] = house.state_info(rec.id) or {}
                        by_pos.setdefault(int(info[rec.id].get("position", 0)), []).append(rec)
                    queue = deque(g[i:i + half] for _, g in sorted(by_pos.items()) for i in range(0, len(g), half))
                    if console is not None:
                        console.print(f"[yellow]out of memory with {len(bunch)} alternatives in a bunch; "
                                      f"retrying in bunches of {half}[/yellow]")
                    continue
                for j in jobs:
                    j.module.to(settings.device).eval()
                profiles, teacher_score = profile_bunch(partition, jobs, val, tails, settings)
                if teacher_score.images:
                    report.teacher = teacher_score
                elapsed = time.perf_counter() - started
                if not final:  # the round's end: profiled, saved, on to the next round (or stopped)
                    for j in jobs:
                        prof = profiles.get(j.record.id)
                        # halving's stall test compares its rounds: a cap's extra round is not one
                        if prof is not None and prof.kl is not None and bound in halving_bounds:
                            j.kl_history.append(prof.kl)
                    save_states(jobs, profiles=profiles, at=bound)
                    for j in jobs:
                        info[j.record.id] = house.state_info(j.record.id) or {}
                for j in jobs:
                    rec = j.record
                    if j.failed is not None:
                        done.append(rec.model_copy(update={"status": "failed", "reason": j.failed,
                                                           "steps": j.steps, "images": j.images}))
                        continue
                    if final:
                        done.append(finish(j, profiles.get(rec.id, Profile()), elapsed / max(1, len(jobs))))
                _commit(house, done, finished, dist)
                for rec in done:
                    house.remove_state(rec.id)
                gone = {rec.id for rec in done}
                live = [rec for rec in live if rec.id not in gone]
                del jobs
                _free_memory(settings.device)
            if final or not live:
                continue
            profiled = [rec for rec in live if info[rec.id].get("profiled_at") == bound]
            # successive halving: stop the alternatives clearly not worth more images
            stops = (halving_stops(house, profiled, info, settings, first=bound == 0)
                     if bound in halving_bounds else {})
            for rec in profiled:  # and those at their image cap
                cap, seen = _max_images(rec), int(info[rec.id].get("images", 0))
                if cap and seen >= cap and rec.id not in stops:
                    stops[rec.id] = f"after {seen:,} images: reached its image cap ({cap:,}, max_images)"
            if not stops and bound not in halving_bounds:
                continue
            done = []
            for rec in live:
                if rec.id not in stops:
                    continue
                job = make_job(rec)
                done.append(finish(job, Profile(**(info[rec.id].get("profile") or {})), None, stopped=stops[rec.id]))
            _commit(house, done, finished, dist)
            for rec in done:
                house.remove_state(rec.id)
            live = [rec for rec in live if rec.id not in stops]
            if show:
                images = min(bound * settings.batch_size, stream.total * settings.batch_size)
                nxt = bounds[r + 1] * settings.batch_size if r + 1 < len(bounds) else None
                console.print(f"{'halving' if bound in halving_bounds else 'image caps'} after {images:,} images: "
                              f"{len(stops)} stopped, {len(live)} go on" + (f" to {nxt:,}" if nxt else ""),
                              highlight=False)
    report.seconds = time.perf_counter() - t_start
    report.images_per_second = total_images / train_seconds if train_seconds else 0.0
    report.trained = [r.id for r in finished if r.status == "trained"]
    report.failed = [r.id for r in finished if r.status == "failed"]
    report.stopped = [r.id for r in finished if r.stopped]
    return report


def _max_images(rec: Any) -> int | None:
    """An alternative's image cap (its spec's ``max_images``), if it has one."""
    return getattr(getattr(rec, "spec", None), "max_images", None)


def _trained(rec: AlternativeRecord, job: Job, prof: Profile, seconds: float | None,
             stopped: str | None = None, kept: str | None = None) -> AlternativeRecord:
    return rec.model_copy(update={
        "status": "trained", "reason": None, "train_loss": job.train_loss, "steps": job.steps,
        "images": job.images, "stopped": stopped, "kept": kept,
        "distill_error": prof.distill_error, "kl": prof.kl,
        "agreement": prof.agreement, "top1": prof.top1,
        "seconds": None if seconds is None else round(seconds, 4)})


def halving_stops(house: House, candidates: list[AlternativeRecord], info: dict[str, dict],
                  settings: Settings, *, first: bool = False) -> dict[str, str]:
    """Which ``candidates`` (profiled at the same step of the stream; ``info`` holds their saved
    states' JSON: ``profile``, ``kl_history``, ``images``) stop training, and why.

    - **No cheaper than the teacher's segment** (FLOPs and parameters both at least the
      segment's): the teacher's own block is better at no more cost; decided before training.
    - **Dominated**: another alternative of the same segment (still training, or finished) has no
      more FLOPs and no more parameters and a replace-one KL lower by more than
      ``settings.halving_margin`` of this one's. Not decided on untrained alternatives
      (``first``): their initialisations differ in kind.
    - **Stalled**: its KL improved by less than ``settings.halving_stall`` (relative) over the last
      round: more images of the same kind will not change its rank much.
    """
    stops: dict[str, str] = {}
    kl: dict[str, float] = {}
    for rec in candidates:
        value = (info.get(rec.id, {}).get("profile") or {}).get("kl")
        if value is not None:
            kl[rec.id] = float(value)
    peers: dict[str, list[tuple[AlternativeRecord, float]]] = {}
    for rec in house.manifest.alternatives:
        value = kl.get(rec.id, rec.kl if rec.status == "trained" else None)
        if value is not None:
            peers.setdefault(rec.segment, []).append((rec, value))
    for rec in candidates:
        if rec.id not in kl:
            continue
        mine, seen = kl[rec.id], int(info.get(rec.id, {}).get("images", 0))
        seg = house.segment(rec.segment)
        after = f"after {seen:,} images: " if seen else "untrained: "
        if seg.flops and seg.params and seg.flops <= rec.flops and seg.params <= rec.params:
            stops[rec.id] = f"{after}no cheaper than the teacher's segment in FLOPs and parameters"
            continue
        if first:
            continue
        better = [(other, v) for other, v in peers.get(rec.segment, []) if other.id != rec.id
                  and other.flops <= rec.flops and other.params <= rec.params
                  and v < mine * (1 - settings.halving_margin)]
        if better:
            other, v = min(better, key=lambda t: t[1])
            stops[rec.id] = f"{after}dominated by {other.id} (KL {v:.3g} against {mine:.3g}, no more FLOPs or parameters)"
            continue
        history = info.get(rec.id, {}).get("kl_history") or []
        if len(history) >= 2 and history[-1] > history[-2] * (1 - settings.halving_stall):
            stops[rec.id] = (f"{after}stalled (KL {history[-2]:.3g} -> {history[-1]:.3g} over the last round, "
                             f"less than {settings.halving_stall:.0%} better)")
    return stops


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


HOUSE_LEGEND = ("params: millions; MFLOPs: per image; stopped: successive halving stopped its training (the "
                "reason is in the manifest); loss: mean distillation loss of the last epoch; err: "
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
        if a.status == "trained" and a.stopped:
            status = f"stopped at {a.images:,} img." if a.images else "stopped untrained"
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
