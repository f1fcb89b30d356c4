"""``lowrank``: low-rank factorised copies of a segment's 1x1 convolutions and linear layers.

Each eligible layer ``W`` (out x in) becomes two layers, ``in -> r`` (no bias; carries the
original stride) then ``r -> out`` (the original bias). Initialisation (option ``init``):

- ``svd``: the truncated SVD ``W ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``, the best rank-``r``
  approximation of the weights;
- ``data`` (default): the best rank-``r`` approximation of the layer's *outputs* on the
  calibration activations, ``min ||(W - W_r) x||^2``: with ``C = E[x x^T] = L L^T``, the truncated
  SVD of ``W L``, mapped back by ``L^-1``. On EfficientNet-Lite2's stage 3 (real weights, no
  training, 32 held-out images) it cut the stage's relative output error from 2.32 to 0.58
  (rank 25%) and from 1.55 to 0.29 (rank 50%) against plain SVD. A layer is
factorised only when ``r * (in + out) < in * out``, so every alternative has fewer parameters
than the segment. Eligible: ``nn.Linear`` and ``nn.Conv2d`` with a 1x1 kernel, ``groups == 1``
and no padding, called as a module by the segment's graph.

The completed spec stores the rank of every factorised layer by its qualified name;
:meth:`LowRank.rebuild` reapplies them to a fresh copy of the segment.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from bespoke.api import (AlternativeSpec, PluginOptions, PluginRecord, SegmentInfo, UsageError,
                        count_parameters, hookimpl, observe_inputs)

NAME = "lowrank"


class LowRankOptions(PluginOptions):
    fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5],
                                   description="rank as a fraction of min(in, out) of each layer")
    min_features: int = Field(16, ge=1, description="leave layers with fewer input or output features alone")
    init: Literal["data", "svd"] = Field("data", description="data: best rank-r fit of the layer outputs on calibration activations; svd: of the weights")
    calibration_images: int = Field(32, ge=1, description="calibration images used by init 'data'")


def _eligible(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of the factorisable layers the module's graph calls."""
    called = None
    graph = getattr(module, "graph", None)
    if graph is not None:  # an fx GraphModule: only layers called as modules can be swapped
        called = {n.target for n in graph.nodes if n.op == "call_module"}
    out = []
    for name, m in module.named_modules():
        if called is not None and name not in called:
            continue
        if type(m) is nn.Linear or (
                isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
                and m.dilation == (1, 1) and _no_padding(m)):
            out.append((name, m))
    return out


def _no_padding(conv: nn.Conv2d) -> bool:
    pad = conv.padding
    return pad in (0, (0, 0), "valid") or (pad == "same" and conv.stride == (1, 1))


def _features(m: nn.Module) -> tuple[int, int]:
    return (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)


def _rank(m: nn.Module, fraction: float) -> int | None:
    """The rank for ``fraction``, or None when factorising would not save parameters."""
    n_in, n_out = _features(m)
    r = max(1, int(math.ceil(fraction * min(n_in, n_out))))
    return r if r * (n_in + n_out) < n_in * n_out else None


def _factorised(m: nn.Module, r: int) -> nn.Sequential:
    """The two-layer replacement of ``m`` at rank ``r`` (uninitialised)."""
    if isinstance(m, nn.Linear):
        return nn.Sequential(nn.Linear(m.in_features, r, bias=False),
                             nn.Linear(r, m.out_features, bias=m.bias is not None))
    return nn.Sequential(nn.Conv2d(m.in_channels, r, 1, stride=m.stride, bias=False),
                         nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None))


def _svd_init(seq: nn.Sequential, m: nn.Module, r: int, moment: torch.Tensor | None = None) -> None:
    """Initialise ``seq`` as the rank-``r`` approximation of ``m``; with ``moment`` (E[x x^T] of
    the layer's inputs) the one minimising the output error on those inputs."""
    w = m.weight.detach().reshape(m.weight.shape[0], -1).double()  # (out, in)
    chol = None
    if moment is not None:
        c = moment.double()
        c = c + torch.eye(c.shape[0], dtype=c.dtype) * (1e-4 * torch.diagonal(c).mean().clamp_min(1e-12))
        chol = torch.linalg.cholesky(c)  # C = L L^T
        w = w @ chol
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    first = root[:, None] * vh[:r]  # (r, in)
    if chol is not None:  # first @ L^-1
        first = torch.linalg.solve_triangular(chol, first, upper=False, left=False)
    first, second = first.float(), (u[:, :r] * root[None, :]).float()  # (r, in), (out, r)
    with torch.no_grad():
        seq[0].weight.copy_(first.reshape(seq[0].weight.shape))
        seq[1].weight.copy_(second.reshape(seq[1].weight.shape))
        if m.bias is not None:
            seq[1].bias.copy_(m.bias.detach())


def _input_moments(module: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """E[x x^T] of the inputs of the layers ``names`` while ``module`` runs on ``x``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def recorder(name: str):
        def record(layer: nn.Module, h: torch.Tensor) -> None:
            if isinstance(layer, nn.Conv2d):
                h = h[:, :, ::layer.stride[0], ::layer.stride[1]]  # the pixels a 1x1 conv reads
                rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
            else:
                rows = h.reshape(-1, h.shape[-1])
            rows = rows.double()
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return record

    observe_inputs(module, {module.get_submodule(n): recorder(n) for n in names}, x)
    return {n: sums[n] / max(1, counts[n]) for n in sums}


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class LowRank:
    """Block source ``lowrank`` (see the module docstring)."""

    def __init__(self, options: LowRankOptions | None = None) -> None:
        self.options = options or LowRankOptions()

    def _layers(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        k = self.options.min_features
        return [(n, m) for n, m in _eligible(module) if min(_features(m)) >= k]

    def _ranks(self, module: nn.Module, fraction: float) -> dict[str, int]:
        ranks = {}
        for name, m in self._layers(module):
            r = _rank(m, fraction)
            if r is not None:
                ranks[name] = r
        return ranks

    def propose(self, ctx: Any, segment: SegmentInfo) -> list[AlternativeSpec]:
        module = ctx.teacher.extract(segment)
        specs, seen = [], set()
        for fraction in self.options.fractions:
            ranks = self._ranks(module, fraction)
            key = tuple(sorted(ranks.items()))
            if not ranks or key in seen:
                continue
            seen.add(key)
            specs.append(AlternativeSpec(source=NAME, kind="lowrank",
                                         label=f"lowrank-{int(round(fraction * 100))}",
                                         options={"fraction": fraction}))
        return specs

    def create(self, ctx: Any, segment: SegmentInfo, spec: AlternativeSpec) -> tuple[nn.Module, AlternativeSpec]:
        module = copy.deepcopy(ctx.teacher.extract(segment)).cpu().eval()
        ranks = self._ranks(module, float(spec.options["fraction"]))
        if not ranks:
            raise UsageError(f"lowrank: segment {segment.id} has no layer worth factorising "
                             f"at fraction {spec.options['fraction']}")
        moments: dict[str, torch.Tensor] = {}
        if self.options.init == "data":
            x = ctx.teacher_activation(segment.start)[: self.options.calibration_images]
            moments = _input_moments(module, list(ranks), x)
        for name, r in ranks.items():
            m = module.get_submodule(name)
            seq = _factorised(m, r)
            _svd_init(seq, m, r, moments.get(name))
            _replace(module, name, seq)
        done = spec.model_copy(update={"options": {**spec.options, "ranks": ranks, "init": self.options.init,
                                                   "params": count_parameters(module)}})
        return module, done

    def rebuild(self, ctx: Any, segment: SegmentInfo, spec: AlternativeSpec) -> nn.Module:
        module = copy.deepcopy(ctx.teacher.extract(segment)).cpu().eval()
        for name, r in spec.options["ranks"].items():
            _replace(module, name, _factorised(module.get_submodule(name), int(r)))
        return module


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name=NAME, category="block-source", factory=LowRank, options_model=LowRankOptions,
                          description="Low-rank factorised copies of a segment's 1x1 convolutions and linear layers"))
