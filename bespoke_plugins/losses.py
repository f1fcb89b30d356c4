"""Distillation losses: plain MSE (the reference), variance-normalised MSE, cosine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bespoke.api import PluginRecord, hookimpl


class MSELoss:
    """Mean squared error against the teacher segment's output (the Bespoke reference loss)."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher.detach())


class NormalisedMSELoss:
    """MSE divided by the teacher activation's variance, so segments of any scale weigh alike."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = teacher.detach()
        return F.mse_loss(student, t) / (t.var() + self.eps)


class CosineLoss:
    """1 - cosine similarity per sample (flattened): matches direction, ignores scale."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s = student.flatten(1)
        t = teacher.detach().flatten(1)
        return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()


@hookimpl
def register_distill_losses(register):
    register(PluginRecord(name="mse", category="distill-loss", factory=lambda o: MSELoss(),
                          description="Mean squared error on the segment output (reference)"))
    register(PluginRecord(name="nmse", category="distill-loss", factory=lambda o: NormalisedMSELoss(),
                          description="MSE normalised by the teacher activation's variance"))
    register(PluginRecord(name="cosine", category="distill-loss", factory=lambda o: CosineLoss(),
                          description="1 - cosine similarity of flattened outputs"))
