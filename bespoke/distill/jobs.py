"""What a bunch trains: one :class:`Job` per alternative (its module and where it is in the image
stream), the run's :class:`Settings`, the Adam optimiser of a bunch and each job's share of its
state, and what running out of memory looks like (:func:`is_oom`, :class:`BunchOutOfMemory`)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bespoke.house import AlternativeRecord
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


def _free_memory(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


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


__all__ = ["BunchOutOfMemory", "CACHE_LIMIT_BYTES", "Job", "Settings", "is_oom", "optimizer_state"]
