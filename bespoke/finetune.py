"""Student fine-tuning: BatchNorm recalibration, then a short distillation fine-tune that resumes.

Loss (see docs DESIGN "Student fine-tuning")::

    CE(student, label; smoothing 0.1)          -- only on samples that carry a label
    + beta * ( sum over replaced segments of D(student segment output, teacher activation at the
               segment's end cut point)        -- D: the configured distill-loss plugin (MSE)
             + KL(teacher || student) on the logits )

The KL is the usual knowledge-distillation direction (teacher distribution as the target), which
is what "KL between student and teacher outputs" means in the reference method.

The teacher is frozen and runs once per step through :meth:`Partition.activations`, which returns
every needed cut-point activation *and* its logits (the last cut point) from one forward pass.
Batches are flipped at random and, when configured, cropped and mixed (:func:`mix_batch`); the
teacher sees the same augmented images as the student.

BatchNorm: the replaced parts' statistics are recalibrated after assembly (cumulative average
over training batches, forward in train mode without gradients), held fixed while fine-tuning
(small CPU batches give noisy batch statistics), and recalibrated once more at the end because
the weights moved.

Checkpoints (:mod:`bespoke.checkpoint`) are atomic directories: ``model.safetensors`` (student weights),
``optimizer.safetensors`` (optimizer tensors and the torch RNG state) and ``state.json``
(step, optimizer hyper-parameters, fingerprint). Nothing is pickled; a killed run resumes from
the last checkpoint and, with the same data, ends bit-for-bit where an uninterrupted run would.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bespoke.checkpoint import (CHECKPOINT_SCHEMA_VERSION, CheckpointState, fingerprint,  # noqa: F401 (re-exported)
                                load_checkpoint, save_checkpoint, unflatten_optimizer)
from bespoke.data import fast_layout
from bespoke.errors import UsageError

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


# --------------------------------------------------------------------------------------------
# Data: anything indexable that yields an image tensor, or (image, label) with label -1 = none
# --------------------------------------------------------------------------------------------


def _item(dataset: Any, i: int) -> tuple[torch.Tensor, int] | None:
    it = dataset[i]
    if it is None:  # an image that failed to decode (the data set counts it)
        return None
    if isinstance(it, (tuple, list)):
        x, y = it[0], it[1] if len(it) > 1 else -1
        y = -1 if y is None else int(y)
        return x, y
    return it, -1


def _stack(items: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    items = [it for it in items if it is not None]
    if not items:
        return None
    return (fast_layout(torch.stack([it[0] for it in items])),
            torch.tensor([it[1] for it in items], dtype=torch.long))


def batch_at(dataset: Any, batch_size: int, step: int, seed: int, augment: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch for global ``step``: a per-epoch permutation seeded by (seed, epoch).

    A pure function of ``step``, so a resumed run sees exactly the batches it would have seen.
    """
    n = len(dataset)
    per_epoch = max(1, n // batch_size)  # drop the last partial batch, as training loaders do
    epoch, b = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    idx = order[b * batch_size:(b + 1) * batch_size].tolist()
    flip = torch.rand(len(idx), generator=g) < 0.5
    items = [_item(dataset, i) for i in idx]
    keep = [k for k, it in enumerate(items) if it is not None]
    batch = _stack(items)
    if batch is None:
        return None
    x, y = batch
    if augment:  # horizontal flip, drawn from the same generator: deterministic per step
        f = flip[keep]
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x, y


def mix_batch(x: torch.Tensor, y: torch.Tensor, step: int, seed: int, *, mixup: float = 0.0,
              crop_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Function-matching augmentation of one batch: random resized crops, then mixup.

    ``crop_scale`` < 1: each image is replaced by a random crop of at least that fraction of its
    area (aspect ratio 3/4 to 4/3), resized back to its size. ``mixup`` > 0: the batch is blended
    with a shuffled copy of itself, ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(mixup,
    mixup)``. The teacher sees the same augmented images, so its output stays a consistent target
    (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and consistent"); with
    500 images and flips alone, a longer fine-tune fits the images instead of the teacher.
    Returns ``(x, y, y_other, lam)``: the label loss is ``lam * CE(y) + (1 - lam) * CE(y_other)``
    (``y_other`` None without mixup). A pure function of ``(step, seed)``, so a resumed run
    draws the same augmentations.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + 13)
    if crop_scale < 1.0 and x.dim() == 4:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        out = []
        for img in x:
            area = h * w * float(torch.empty(1).uniform_(crop_scale, 1.0, generator=g))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)))
            ch = max(1, min(h, int(round(math.sqrt(area / ratio)))))
            cw = max(1, min(w, int(round(math.sqrt(area * ratio)))))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            crop = img[None, :, top:top + ch, left:left + cw]
            out.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0])
        x = fast_layout(torch.stack(out))
    if mixup > 0 and x.shape[0] > 1:
        lam = random.Random(seed * 1_000_003 + step).betavariate(mixup, mixup)
        perm = torch.randperm(x.shape[0], generator=g)
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    return x, y, None, 1.0


def iter_batches(dataset: Any, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential batches (no shuffling, no augmentation), for evaluation and calibration."""
    for s in range(0, len(dataset), batch_size):
        batch = _stack([_item(dataset, i) for i in range(s, min(len(dataset), s + batch_size))])
        if batch is not None:
            yield batch


# --------------------------------------------------------------------------------------------
# BatchNorm recalibration
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: str = "cpu",
                          *, mode: str = "eval", passes: int = 2,
                          within: Sequence[nn.Module] | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches``; returns images seen.

    ``mode="eval"`` (default): the model runs in eval mode and a hook on each BN layer
    accumulates the mean and variance of its input over all images; the statistics are then
    replaced at once, and a second pass re-estimates them under the updated upstream layers.
    Each layer's statistics are those of the activations it sees at inference, whatever the batch
    size. ``mode="train"``: the textbook procedure (reset, ``momentum=None`` for a cumulative
    average, forward with BN layers in train mode). With small batches the train-mode numbers
    drift from what inference sees (every layer normalises by batch statistics while they are
    taken): on the ImageNet sample it cost the EfficientNet-Lite2 teacher itself a third of its
    top-1 at batch 16, where the eval-mode estimate keeps it.

    ``within``: only BN layers inside these submodules (e.g. a student's alternatives) are
    re-estimated; the rest keep their statistics.

    The fine-tune recalibrates a student's *alternatives* in ``mode="train"``: they were
    distilled with batch statistics, and the eval-mode estimate destroyed them. Measured on the
    Lite2 benchmark: a student with two Lite0 donor segments at 0.84 top-1 as assembled fell to
    0.01 after the eval-mode estimate (1 or 6 passes) and kept 0.82 after the train-mode one. The
    eval-mode estimates there put exactly zero variance on channels that are dead on the
    calibration images; that is where to look next.
    """
    scope = [m for part in within for m in part.modules()] if within is not None else list(model.modules())
    bns = list({id(m): m for m in scope if isinstance(m, _BN_TYPES) and m.track_running_stats}.values())
    if not bns:
        return 0
    batches = [x[0] if isinstance(x, (tuple, list)) else x for x in batches]
    seen = sum(int(x.shape[0]) for x in batches)
    if not seen:  # nothing to estimate from (bn_recalibration_batches 0): keep what they have
        return 0
    was_training = model.training
    try:
        if mode == "train":
            saved = [(m, m.momentum) for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.eval()
            for m in bns:
                m.train()
            try:
                for x in batches:
                    model(x.to(device))
            finally:
                for m, momentum in saved:
                    m.momentum = momentum
            return seen
        model.eval()
        for _ in range(max(1, passes)):
            stats: dict[nn.Module, list] = {}

            def hook(mod, args, _stats=stats):
                x = args[0].detach().double()
                dims = [d for d in range(x.dim()) if d != 1]
                acc = _stats.setdefault(mod, [0.0, 0.0, 0])
                acc[0] = acc[0] + x.sum(dims)
                acc[1] = acc[1] + (x * x).sum(dims)
                acc[2] += x.numel() // x.shape[1]

            handles = [m.register_forward_pre_hook(hook) for m in bns]
            try:
                for x in batches:
                    model(x.to(device))
            finally:
                for h in handles:
                    h.remove()
            for m, (s1, s2, n) in stats.items():
                if n < 2:
                    continue
                mean = s1 / n
                var = (s2 / n - mean * mean).clamp_min(0) * (n / (n - 1))
                m.running_mean.copy_(mean.to(m.running_mean.dtype))
                m.running_var.copy_(var.to(m.running_var.dtype))
    finally:
        model.train(was_training)
    return seen


def _bn_scope(student: nn.Module) -> list[nn.Module] | None:
    """The replaced segments' modules, when the student names them (a Student does).

    Only their statistics are re-estimated: the teacher's own layers keep the statistics they
    were trained with. Re-estimating those from a few hundred images, in either mode, cost the
    EfficientNet-Lite2 teacher on the ImageNet sample a third or more of its top-1 at 128 px.
    """
    ids = getattr(student, "replaced_segments", None)
    if ids is None or not hasattr(student, "alternative"):
        return None
    return [student.alternative(i) for i in ids]


def bn_batches(dataset: Any, cfg: Any, seed: int) -> Iterable[torch.Tensor]:
    """``cfg.bn_recalibration_batches`` batches drawn at random (seeded), without flips.

    Random, not the first images: folders are usually sorted by class, and statistics of late
    layers taken on a few classes are badly biased (they cost the teacher itself a third of
    its top-1 on the ImageNet sample).
    """
    n = min(cfg.bn_recalibration_batches, max(1, math.ceil(len(dataset) / cfg.batch_size)))
    for step in range(n):
        batch = batch_at(dataset, cfg.batch_size, step, seed + 7919, augment=False)
        if batch is not None:
            yield batch[0]


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, _BN_TYPES):
            m.eval()


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def segment_targets(segment_ids: Iterable[str]) -> dict[str, int]:
    """Segment id ``"start-end"`` -> the teacher cut point whose activation it must match."""
    out = {}
    for sid in segment_ids:
        try:
            out[sid] = int(str(sid).rsplit("-", 1)[1])
        except (IndexError, ValueError):
            raise ValueError(f"segment id {sid!r} is not of the form 'start-end'") from None
    return out


@dataclass
class LossParts:
    total: torch.Tensor
    ce: float = 0.0
    mse: float = 0.0
    kl: float = 0.0


def student_loss(logits: torch.Tensor, labels: torch.Tensor | None, replaced: dict[str, torch.Tensor],
                 teacher_acts: dict[int, torch.Tensor], teacher_logits: torch.Tensor,
                 targets: dict[str, int], *, beta: float, label_smoothing: float,
                 distill_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 mixed_labels: torch.Tensor | None = None, lam: float = 1.0,
                 label_weight: float = 1.0,
                 ) -> LossParts:
    """CE (labelled samples only) + beta * (segment distillation + KL(teacher || student)).

    ``mixed_labels`` and ``lam`` (mixup, :func:`mix_batch`): the label term is ``lam * CE(labels)
    + (1 - lam) * CE(mixed_labels)``, each over the samples whose label it has; ``label_weight``
    scales it (0: no label term)."""
    dl = distill_loss or (lambda s, t: F.mse_loss(s, t.detach()))
    total = logits.new_zeros(())
    parts = LossParts(total=total)
    ce = logits.new_zeros(())
    if label_weight <= 0:
        labels = mixed_labels = None
    for lab, weight in ((labels, lam), (mixed_labels, 1.0 - lam)):
        if lab is None or weight <= 0:
            continue
        mask = lab >= 0
        if bool(mask.any()):
            ce = ce + weight * F.cross_entropy(logits[mask], lab[mask], label_smoothing=label_smoothing)
    if labels is not None or mixed_labels is not None:
        total = total + label_weight * ce
        parts.ce = float(ce.detach())
    mse = logits.new_zeros(())
    for sid, out in replaced.items():
        cut = targets.get(sid)
        if cut is None or cut not in teacher_acts:
            continue
        mse = mse + dl(out, teacher_acts[cut].detach())
    kl = F.kl_div(F.log_softmax(logits.float(), dim=-1),
                  F.log_softmax(teacher_logits.detach().float(), dim=-1),
                  reduction="batchmean", log_target=True)
    total = total + beta * (mse + kl)
    parts.total, parts.mse, parts.kl = total, float(mse.detach()), float(kl.detach())
    return parts


def resize_input(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """A batch of images resized to ``size`` px square (antialiased), or as is when it has that
    size already or no size is given."""
    if size is None or x.dim() != 4 or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# --------------------------------------------------------------------------------------------
# The fine-tune
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    student: nn.Module  # the fine-tuned student (a copy when it shared tensors with the teacher)
    steps: int
    resumed_from: int
    bn_images: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def total_steps(n_images: int, cfg: Any) -> int:
    per_epoch = max(1, n_images // cfg.batch_size)
    steps = cfg.epochs * per_epoch
    if cfg.steps is not None:
        steps = min(steps, cfg.steps) if cfg.epochs else cfg.steps
    return steps


def _lr(base: float, step: int, total: int) -> float:
    """Short linear warm-up then cosine decay; a pure function of the step (nothing to save)."""
    warm = max(1, min(20, total // 10))
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def finetune_student(
    student: nn.Module,
    teacher: Any,
    dataset: Any,
    cfg: Any,
    workdir: str | Path,
    *,
    targets: dict[str, int] | None = None,
    distill_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    device: str = "cpu",
    fingerprint_extra: Any = None,
    console: Any = None,
    on_step: Callable[[int, LossParts], None] | None = None,
    checkpoint_every: int | None = None,
    input_size: int | None = None,
) -> FinetuneResult:
    """Recalibrate BN, then fine-tune ``student`` in place against the frozen ``teacher``.

    ``teacher`` is a :class:`bespoke.partition.Partition` (``activations(x, indices)`` with the
    last cut point being the logits). ``student`` exposes ``replaced_outputs`` after each forward.
    ``dataset[i]`` is an image tensor or ``(image, label)`` (label -1: none). ``cfg`` is a
    :class:`bespoke.config.FinetuneConfig`. ``workdir/checkpoint`` holds the resumable state.
    ``input_size``: the student runs at that square resolution; each batch (at the teacher's
    size) is resized for it, so the KL target stays the teacher at its own size. Segment targets
    are dropped then (``targets`` is ignored): features computed at another resolution do not
    align with the teacher's, and matching them resized cost a Lite2 student at 224 px 8 points
    of held-out agreement where distilling the logits alone cost 2.
    """
    if len(dataset) == 0:
        raise UsageError("fine-tuning needs at least one training image; the data set is empty")
    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "checkpoint"
    every = checkpoint_every or getattr(cfg, "checkpoint_every", None) or 50
    steps = total_steps(len(dataset), cfg)
    if getattr(student, "taps_enabled", None) is False:  # a loaded student: distillation needs its taps
        student.taps_enabled = True
    if input_size is not None:
        targets = {}
    elif targets is None:  # segment ids are "start-end": the keys of replaced_outputs
        targets = segment_targets(_replaced_ids(student, dataset, device))
    last_cut = len(teacher.cut_points) - 1
    wanted = sorted(set(targets.values()) | {last_cut})
    schedule = cfg.model_dump(exclude={"checkpoint_every", "keep_best"}) if hasattr(cfg, "model_dump") else cfg
    fp = fingerprint(schedule, seed, len(dataset),
                     sorted(targets.items()), fingerprint_extra, *([input_size] if input_size else []))

    student.to(device)
    teacher_model = teacher.gm if hasattr(teacher, "gm") else teacher.model
    student = untie(student, teacher_model)
    freeze(teacher_model)
    frozen = set()
    if getattr(cfg, "freeze_classifier", False):  # the last linear layer keeps the teacher's weights
        linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
        frozen = {id(p) for p in (linears[-1].parameters() if linears else [])}
    params = [p for p in student.parameters() if id(p) not in frozen]
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-5)

    resumed_from, bn_images, history = 0, 0, []
    loaded = load_checkpoint(ckpt)
    if loaded is not None and loaded[0].fingerprint == fp:
        state, model_t, opt_t = loaded
        student.load_state_dict(model_t, strict=True)
        opt.load_state_dict(unflatten_optimizer(opt_t, state.param_groups, state.optimizer_keys))
        if "rng.torch" in opt_t:
            torch.set_rng_state(opt_t["rng.torch"])
        resumed_from, history = state.step, list(state.history)
        if console is not None:
            what = "already finished" if state.finished else f"resuming at step {state.step}/{steps}"
            console.print(f"  fine-tune checkpoint found in {ckpt}: {what}")
        if state.finished:
            student.eval()
            return FinetuneResult(student=student, steps=state.step, resumed_from=state.step, bn_images=0,
                                  seconds=time.perf_counter() - t0, history=history)
    else:
        torch.manual_seed(seed)
        bn_images = recalibrate_batchnorm(student, (resize_input(b, input_size) for b in bn_batches(dataset, cfg, seed)), device, mode="train",
                                          within=_bn_scope(student))

    def checkpoint(step: int, finished: bool) -> None:
        save_checkpoint(ckpt, student, opt, CheckpointState(
            fingerprint=fp, step=step, total_steps=steps, finished=finished,
            param_groups=[], optimizer_keys={}, history=history[-200:]))

    progress = _progress(console)
    student.train()
    _freeze_bn(student)
    with progress:
        task = progress.add_task("fine-tune", total=steps, completed=resumed_from) if progress else None
        for step in range(resumed_from, steps):
            batch = batch_at(dataset, cfg.batch_size, step, seed)
            if batch is None:  # every image of this batch failed to decode
                continue
            x, y, y_other, lam = mix_batch(batch[0], batch[1], step, seed, mixup=getattr(cfg, "mixup", 0.0),
                                           crop_scale=getattr(cfg, "crop_scale", 1.0))
            x, y = x.to(device), y.to(device)
            y_other = None if y_other is None or not bool((y_other >= 0).any()) else y_other.to(device)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg.lr, step, steps)
            with torch.no_grad():
                acts = teacher.activations(x, wanted)
            logits = student(resize_input(x, input_size))
            parts = student_loss(logits, y if bool((y >= 0).any()) else None,
                                 dict(getattr(student, "replaced_outputs", {}) or {}), acts,
                                 acts[last_cut], targets, beta=cfg.beta,
                                 label_smoothing=cfg.label_smoothing, distill_loss=distill_loss,
                                 mixed_labels=y_other, lam=lam, label_weight=cfg.label_weight)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            history.append({"step": step + 1, "loss": float(parts.total.detach()), "ce": parts.ce,
                            "mse": parts.mse, "kl": parts.kl})
            if progress:
                progress.update(task, advance=1, description=f"fine-tune loss {history[-1]['loss']:.3f}")
            if on_step is not None:
                on_step(step + 1, parts)
            if (step + 1) % every == 0 and step + 1 < steps:
                checkpoint(step + 1, finished=False)

    # Weights moved: the frozen statistics are stale; re-estimate them once more.
    if steps > resumed_from:
        bn_images += recalibrate_batchnorm(student, (resize_input(b, input_size) for b in bn_batches(dataset, cfg, seed)), device, mode="train",
                                           within=_bn_scope(student))
    checkpoint(steps, finished=True)
    student.eval()
    return FinetuneResult(student=student, steps=steps, resumed_from=resumed_from, bn_images=bn_images,
                          seconds=time.perf_counter() - t0, history=history)


@torch.no_grad()
def _replaced_ids(student: nn.Module, dataset: Any, device: str) -> list[str]:
    batch = next(iter(iter_batches(_Prefix(dataset, min(len(dataset), 2)), 2)), None)
    if batch is None:
        return []
    was = student.training
    student.eval()
    student(batch[0].to(device))
    student.train(was)
    return list((getattr(student, "replaced_outputs", None) or {}).keys())


class _Prefix:
    """The first ``n`` items of a data set (BN recalibration uses a fixed subset)."""

    def __init__(self, dataset: Any, n: int):
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]


def _progress(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from bespoke.console import progress

    return progress(console, TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), line="  {description}: step {completed}/{total}, {elapsed:.0f} s")


def untie(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """``student`` itself, or a deep copy of it when it shares any tensor with ``teacher``.

    Assembled students reuse the teacher's unreplaced pieces, tensors (and often module objects)
    included; training them or recalibrating their BatchNorm in place would move the frozen
    teacher too.
    """
    shared = {t.data_ptr() for t in list(teacher.parameters()) + list(teacher.buffers()) if t.numel()}
    mine = list(student.parameters()) + list(student.buffers())
    if any(t.numel() and t.data_ptr() in shared for t in mine):
        return copy.deepcopy(student)
    return student


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__: Sequence[str] = [
    "CheckpointState", "FinetuneResult", "LossParts", "batch_at", "finetune_student", "freeze",
    "iter_batches", "load_checkpoint", "untie", "recalibrate_batchnorm", "resize_input", "save_checkpoint",
    "segment_targets",
    "student_loss", "total_steps",
]
