"""Cost figures of a module: parameters and FLOPs, counted one way everywhere.

The house (segments and alternatives), the evaluation (teachers, students, reference models), the
latency tables and the block sources all use these two functions, so their figures compare.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_flops(module: nn.Module, input_shape: Sequence[int] | torch.Tensor) -> float | None:
    """FLOPs of one forward pass of ``module`` in eval mode on a zero input of ``input_shape``
    (or of an example input's shape), by torch's FlopCounterMode: matmuls and convolutions, 2 per
    multiply-accumulate. ``None`` when the counter cannot follow the module. The module's
    train/eval mode is restored."""
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(input_shape, torch.Tensor):
        input_shape = input_shape.shape
    was_training = module.training
    try:
        param = next(module.parameters(), None)
        x = torch.zeros(tuple(int(s) for s in input_shape), device=param.device if param is not None else "cpu")
        module.eval()
        counter = FlopCounterMode(display=False)
        # no_grad, not inference_mode: a module that caches a tensor in forward is trained later
        with torch.no_grad(), counter:
            module(x)
        return float(counter.get_total_flops())
    except Exception:  # a module the counter cannot follow: unknown, not fatal
        return None
    finally:
        module.train(was_training)


__all__ = ["count_flops", "count_params"]
