"""``pruned-self``: dependency-aware channel-pruned copies of the teacher's own segment.

Torch-Pruning's ``DependencyGraph`` finds which channels are coupled (a conv's outputs, the
batch norm after it, a depthwise conv, squeeze-excite, the next layer's inputs). A group is
pruned only when none of its channels reach the segment's boundary: the segment's input and
output keep every channel, so the pruned copy plugs in where the segment was. Groups that go
through reshapes, splits or raw parameters (e.g. attention heads, layer scale) are left alone:
they are rarely safe to prune channel-wise without model-specific knowledge.

Importance:

- ``magnitude``: group L1 norm of the coupled weights (Torch-Pruning's
  ``GroupMagnitudeImportance(p=1)``).
- ``error``: the measured output error of removing each channel at the layers consuming it,
  ``sum over positions of h_c^2 * ||W[:, c]||^2``, on the calibration activations at the
  segment's input (exact for 1x1 convs and linear layers; an approximation for larger kernels).

The completed spec stores, per pruned group, the root layer's name and the removed channel
indices; :meth:`PrunedSelf.rebuild` replays them through a fresh dependency graph on a fresh
copy of the segment, so the architecture (and the state-dict keys) come out identical.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from bespoke import AlternativeSpec, PluginOptions, PluginRecord, SegmentInfo, UsageError, hookimpl
from bespoke.blocks import count_parameters

NAME = "pruned-self"


class PrunedSelfOptions(PluginOptions):
    ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5],
                                description="fractions of each prunable group's channels to remove")
    importance: Literal["magnitude", "error"] = Field(
        "error", description="magnitude: group L1 norm; error: measured output error on calibration activations")
    min_channels: int = Field(4, ge=1, description="never keep fewer channels than this in a group")
    round_to: int = Field(1, ge=1, description="round kept channel counts to a multiple of this (hardware-friendly sizes)")
    calibration_images: int = Field(32, ge=1, description="calibration images used by importance 'error'")


# Dummy node types whose channel mapping Torch-Pruning can get wrong without model knowledge.
def _unsafe_types() -> set:
    from torch_pruning import ops

    return {ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND,
            ops.OPTYPE.SLICE, ops.OPTYPE.PARAMETER, ops.OPTYPE.MHA, ops.OPTYPE.EMBED,
            ops.OPTYPE.LSTM, ops.OPTYPE.CUSTOMIZED}


class _Graph:
    """A dependency graph over ``module`` with its input and output marked as boundaries."""

    def __init__(self, module: nn.Module, example: torch.Tensor) -> None:
        import torch_pruning as tp

        self.module = module
        marks: dict[str, Any] = {}

        def forward_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            x = x.detach().clone().requires_grad_(True) * 1.0  # an input node tp can see
            marks["input"] = x.grad_fn
            return model(x) * 1.0  # the output always gets its own output node

        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            self.dg = tp.DependencyGraph().build_dependency(
                module, example_inputs=example, forward_fn=forward_fn, verbose=False)
        self.input_nodes = {n for n in self.dg.module2node.values() if n.grad_fn is marks["input"]}
        self.tp = tp

    def prunable_groups(self, allow_reshape: bool = True) -> list[tuple[str, Any]]:
        """(root layer name, group with all of its channels) for every group safe to prune.

        Reshapes are allowed by default because ``nn.Linear`` on token tensors shows up as one
        (a flatten around the matmul); :meth:`PrunedSelf.propose` checks by a trial run and
        falls back to ``allow_reshape=False`` when a reshape really mixes channels.
        """
        tp = self.tp
        unsafe = _unsafe_types()
        if not allow_reshape:
            unsafe.add(tp.ops.OPTYPE.RESHAPE)
        out = []
        names = {m: n for n, m in self.module.named_modules()}
        for group in self.dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
            ok = True
            for dep, _ in group:
                node = dep.target
                if node in self.input_nodes or node.type == tp.ops.OPTYPE.OUTPUT or node.type in unsafe:
                    ok = False
                    break
            root = group[0].dep.target.module
            if ok and root in names and self.dg.get_out_channels(root):
                out.append((names[root], group))
        return out

    def prune(self, root_name: str, idxs: list[int]) -> None:
        root = self.module.get_submodule(root_name)
        pruner = self.dg.get_pruner_of_module(root)
        group = self.dg.get_pruning_group(root, pruner.prune_out_channels, sorted(idxs))
        group.prune(record_history=False)


def _magnitude(group: Any) -> torch.Tensor:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="mean")(group)


def _error_importance(module: nn.Module, groups: list[tuple[str, Any]], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per group, per channel: squared output change at its consumer layers if it were removed."""
    import torch_pruning as tp

    consumers: dict[nn.Module, None] = {}
    plan = []  # (group name, consumer, plain idxs, root idxs)
    for name, group in groups:
        n_root = len(group[0].idxs)
        items = []
        for item in group:
            layer = item.dep.target.module
            fn = item.dep.handler
            if fn in (tp.prune_conv_in_channels, tp.prune_linear_in_channels) and isinstance(layer, (nn.Conv2d, nn.Linear)):
                if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                    continue
                consumers[layer] = None
                items.append((layer, list(item.idxs), list(item.root_idxs)))
        plan.append((name, n_root, items))
    energy: dict[nn.Module, torch.Tensor] = {}

    def hook(layer: nn.Module, inputs: tuple, _out: Any) -> None:
        h = inputs[0].detach()
        e = h.pow(2).sum(dim=(0, 2, 3)) if h.dim() == 4 else h.reshape(-1, h.shape[-1]).pow(2).sum(0)
        energy[layer] = energy.get(layer, 0) + e.double()

    handles = [m.register_forward_hook(hook) for m in consumers]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], 16):
                module(x[i:i + 16])
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for name, n_root, items in plan:
        s = torch.zeros(n_root, dtype=torch.float64)
        for layer, idxs, root_idxs in items:
            w = layer.weight.detach().double()
            wn = w.pow(2).sum(dim=(0, 2, 3)) if w.dim() == 4 else w.pow(2).sum(0)
            e = energy.get(layer)
            if e is None:
                continue
            idx = torch.tensor(idxs)
            s.index_add_(0, torch.tensor(root_idxs), e[idx] * wn[idx])
        scores[name] = s
    return scores


class PrunedSelf:
    """Block source ``pruned-self`` (see the module docstring)."""

    def __init__(self, options: PrunedSelfOptions | None = None) -> None:
        self.options = options or PrunedSelfOptions()

    def _segment_module(self, ctx: Any, segment: SegmentInfo) -> nn.Module:
        return copy.deepcopy(ctx.teacher.extract(segment)).cpu().eval()  # pruned on the CPU

    def _example(self, segment: SegmentInfo) -> torch.Tensor:
        # Its own generator: proposing must not move the global RNG (training reproducibility).
        return torch.randn(*segment.in_shape, generator=torch.Generator().manual_seed(0))

    def _kept(self, n: int, ratio: float) -> int:
        o = self.options
        keep = int(round(n * (1.0 - ratio)))
        keep = max(o.round_to, int(round(keep / o.round_to)) * o.round_to)
        return min(n, max(keep, min(o.min_channels, n)))

    def _groups(self, module: nn.Module, example: torch.Tensor, allow_reshape: bool) -> tuple[_Graph, list]:
        graph = _Graph(module, example)
        return graph, graph.prunable_groups(allow_reshape=allow_reshape)

    def _trial(self, ctx: Any, segment: SegmentInfo, allow_reshape: bool) -> list[int] | None:
        """Prune every candidate group by the largest ratio on a copy; the group sizes if the
        result still maps the segment's input shape to its output shape, else None."""
        module = self._segment_module(ctx, segment)
        example = self._example(segment)
        graph, groups = self._groups(module, example, allow_reshape)
        if not groups:
            return []
        ratio = max(self.options.ratios)
        sizes = []
        for name, group in groups:
            n = len(group[0].idxs)
            sizes.append(n)
            keep = self._kept(n, ratio)
            if keep < n:
                graph.prune(name, list(range(keep, n)))
        try:
            _check(module, segment, example)
        except Exception:
            return None
        return sizes

    def propose(self, ctx: Any, segment: SegmentInfo) -> list[AlternativeSpec]:
        sizes = None
        allow_reshape = True
        for allow_reshape in (True, False):
            try:
                sizes = self._trial(ctx, segment, allow_reshape)
            except Exception:  # not traceable by autograd: nothing to offer, never a crash
                sizes = None
            if sizes is not None:
                break
        if not sizes:
            return []
        specs = []
        for ratio in self.options.ratios:
            if not any(self._kept(n, ratio) < n for n in sizes):
                continue
            imp = self.options.importance
            specs.append(AlternativeSpec(
                source=NAME, kind="pruned", label=f"pruned-{imp}-{int(round(ratio * 100))}",
                options={"ratio": ratio, "importance": imp, "allow_reshape": allow_reshape}))
        return specs

    def create(self, ctx: Any, segment: SegmentInfo, spec: AlternativeSpec) -> tuple[nn.Module, AlternativeSpec]:
        ratio = float(spec.options["ratio"])
        importance = spec.options.get("importance", self.options.importance)
        module = self._segment_module(ctx, segment)
        example = self._example(segment)
        graph, groups = self._groups(module, example, bool(spec.options.get("allow_reshape", True)))
        if not groups:
            raise UsageError(f"pruned-self: segment {segment.id} has no prunable channel group")
        if importance == "error":
            x = ctx.teacher_activation(segment.start)[: self.options.calibration_images]
            scores = _error_importance(module, groups, x)
            for name, group in groups:  # no measurable consumer (e.g. grouped convs only)
                if not bool((scores[name] > 0).any()):
                    scores[name] = _magnitude(group).double()
        else:
            scores = {name: _magnitude(g).double() for name, g in groups}
        plan = []
        for name, group in groups:
            n = len(group[0].idxs)
            keep = self._kept(n, ratio)
            if keep >= n:
                continue
            order = torch.argsort(scores[name], descending=True)  # most important first
            removed = sorted(int(i) for i in order[keep:])
            plan.append([name, removed])
        for name, removed in plan:
            graph.prune(name, removed)
        _check(module, segment, example)
        done = spec.model_copy(update={"options": {**spec.options, "importance": importance, "pruned": plan,
                                                   "params": count_parameters(module)}})
        return module, done

    def rebuild(self, ctx: Any, segment: SegmentInfo, spec: AlternativeSpec) -> nn.Module:
        module = self._segment_module(ctx, segment)
        example = self._example(segment)
        graph = _Graph(module, example)
        for name, removed in spec.options["pruned"]:
            graph.prune(name, list(removed))
        _check(module, segment, example)
        return module


def _check(module: nn.Module, segment: SegmentInfo, example: torch.Tensor) -> None:
    with torch.no_grad():
        out = module(example)
    if tuple(out.shape) != tuple(segment.out_shape):
        raise UsageError(
            f"pruned-self: the pruned segment {segment.id} gives shape {tuple(out.shape)} instead of "
            f"{tuple(segment.out_shape)}; this model's channel coupling is not supported, disable "
            f"pruned-self for it (plugins.block_sources)")


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name=NAME, category="block-source", factory=PrunedSelf,
                          options_model=PrunedSelfOptions,
                          description="Dependency-aware channel-pruned copies of teacher segments (torch-pruning)"))
