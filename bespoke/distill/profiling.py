"""Profiling a bunch on the held-out images (:func:`profile_bunch`): each alternative's
distillation error (MSE normalised by the variance of the teacher activation) and its replace-one
scores: the teacher with only this alternative swapped in (the teacher up to the segment, the
alternative, then the teacher's remaining part, :class:`Tails`), scored by agreement with the
teacher's top-1, by KL divergence from the teacher's output and by top-1 accuracy when labels
exist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bespoke.data import ImageSet, collate
from bespoke.distill.jobs import Job, Settings, _reason


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
    tally = _Tally(live)
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            x, y = batch[0].to(device), batch[1].to(device)
            tally.add(partition.activations(x, needed), y, tails)
    return tally.results(results, bool(data.labelled))


class _Tally:
    """The sums a bunch's profile is made of, over the held-out batches seen so far."""

    def __init__(self, live: list[Job]):
        self.live = live
        self.sq = {j.record.id: 0.0 for j in live}
        self.agree = {j.record.id: 0 for j in live}
        self.correct = {j.record.id: 0 for j in live}
        self.kl = {j.record.id: 0.0 for j in live}
        self.errors: dict[str, str] = {}
        # teacher activation statistics per end cut point, for the variance normalisation
        self.t_sum: dict[int, float] = {}
        self.t_sq: dict[int, float] = {}
        self.t_n: dict[int, int] = {}
        self.images = self.teacher_correct = 0

    def add(self, acts: dict[int, torch.Tensor], y: torch.Tensor, tails: Tails) -> None:
        """One batch: the teacher's activations ``acts`` and the labels ``y``."""
        t_pred = acts[tails.last].argmax(-1)
        t_logp = torch.log_softmax(acts[tails.last].double(), -1)
        self.images += y.shape[0]
        self.teacher_correct += int((t_pred == y).sum())
        for end in {j.segment.end for j in self.live}:
            t = acts[end].double()
            self.t_sum[end] = self.t_sum.get(end, 0.0) + float(t.sum())
            self.t_sq[end] = self.t_sq.get(end, 0.0) + float((t * t).sum())
            self.t_n[end] = self.t_n.get(end, 0) + t.numel()
        for j in self.live:
            rid = j.record.id
            if rid in self.errors:
                continue
            try:
                out = j.module(acts[j.segment.start])
                self.sq[rid] += float(((out.double() - acts[j.segment.end].double()) ** 2).sum())
                logits = tails(j.segment.end, out)
                pred = logits.argmax(-1)
                # continuous replace-one score: informative even on a handful of images
                self.kl[rid] += float((t_logp.exp() * (t_logp - torch.log_softmax(logits.double(), -1))).sum())
                self.agree[rid] += int((pred == t_pred).sum())
                self.correct[rid] += int((pred == y).sum())
            except Exception as exc:
                self.errors[rid] = _reason(exc)

    def results(self, results: dict[str, Profile], labelled: bool) -> tuple[dict[str, Profile], TeacherScore]:
        """``results`` filled in (a job whose profiling failed is marked failed and left out)."""
        images = self.images
        for j in self.live:
            rid = j.record.id
            if rid in self.errors:
                j.failed = f"profiling failed: {self.errors[rid]}"
                results.pop(rid)
                continue
            if images == 0:
                continue
            end = j.segment.end
            mean = self.t_sum[end] / self.t_n[end]
            var = max(self.t_sq[end] / self.t_n[end] - mean * mean, 1e-12)
            results[rid] = Profile(distill_error=self.sq[rid] / self.t_n[end] / var,
                                   agreement=self.agree[rid] / images,
                                   top1=self.correct[rid] / images if labelled else None,
                                   kl=self.kl[rid] / images)
        return results, TeacherScore(images, self.teacher_correct / images if (labelled and images) else None)


__all__ = ["Profile", "TeacherScore", "Tails", "profile_bunch"]
