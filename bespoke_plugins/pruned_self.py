"""``pruned-self``: dependency-aware channel-pruned copies of the teacher's own segment.

Torch-Pruning's ``DependencyGraph`` finds which channels are coupled (a conv's outputs, the
batch norm after it, a depthwise conv, squeeze-excite, the next layer's inputs). A group is
pruned only when none of its channels reach the segment's boundary: the segment's input and
output keep every channel, so the pruned copy plugs in where the segment was. Groups that go
through reshapes, splits or raw parameters (e.g. attention heads, layer scale) are left alone:
they are rarely safe to prune channel-wise without model-specific knowledge.

Grouped convolutions (RegNet, ResNeXt) and group norms split a group's channels into equal
blocks, and every block must keep the same number of channels: Torch-Pruning's layer pruners
slice a grouped conv's weight as if the same positions went from every block (its
``MetaPruner`` does this with ``in/out_channel_groups``; the low-level ``DependencyGraph`` we use
does not). So such a group is pruned position-wise: the same positions are removed from every
block, chosen by the importance summed over blocks (depthwise convs are coupled in and out by
Torch-Pruning itself and need nothing). A group whose channels reach a grouped layer through an
index remapping (concat, split) is left alone.

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
import math
import warnings
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from bespoke.api import (AlternativeSpec, PluginOptions, PluginRecord, SegmentInfo, UsageError,
                        count_parameters, hookimpl, observe_inputs, refit_pointwise)

NAME = "pruned-self"


class PrunedSelfOptions(PluginOptions):
    ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5],
                                description="fractions of each prunable group's channels to remove")
    importance: Literal["magnitude", "error"] = Field(
        "error", description="magnitude: group L1 norm; error: measured output error on calibration activations")
    min_channels: int = Field(4, ge=1, description="never keep fewer channels than this in a group")
    round_to: int = Field(16, ge=1, description=(
        "round kept channel counts to a multiple of this (groups narrower than twice it, and grouped convs, are not rounded). "
        "CPU and GPU kernels work on blocks of channels, so a count off the block can run slower than the "
        "unpruned layer (docs/plugins.md has a measurement); 8 suits AVX2 CPUs; 1: no rounding"))
    calibration_images: int = Field(32, ge=1, description="calibration images used by importance 'error' and by refit")
    refit: bool = Field(True, description=(
        "after pruning, refit by least squares each 1x1 conv or linear layer that lost input channels, so that it "
        "reproduces the teacher layer's output on the calibration activations (ThiNet-style reconstruction; "
        "closed form, no training): a far better start for distillation, and the whole fit when images are few"))


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
        self.blocks: dict[str, int] = {}  # root layer name -> equal channel blocks (grouped layers)

    def channel_blocks(self, group: Any) -> int | None:
        """Into how many equal blocks the group's channels fall (grouped convs, group norms):
        every block must lose the same positions. ``None`` when that cannot be honoured (the
        channels reach a grouped layer through an index remapping, or do not divide evenly)."""
        n = len(group[0].idxs)
        blocks = 1
        for item in group:
            dep = item.dep
            layer = dep.target.module
            if layer is None or not isinstance(layer, nn.Module):
                continue
            pruner = self.dg.get_pruner_of_module(layer)
            if pruner is None:
                continue
            if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == layer.out_channels:
                continue  # depthwise: Torch-Pruning couples its input and output channels
            out_fn = self.dg.is_out_channel_pruning_fn(dep.handler)
            try:
                g = int(pruner.get_out_channel_groups(layer) if out_fn else pruner.get_in_channel_groups(layer))
                count = int(pruner.get_out_channels(layer) if out_fn else pruner.get_in_channels(layer))
            except Exception:
                continue
            if g <= 1:
                continue
            plain = [int(i) for i in item.idxs]
            roots = [int(i) for i in getattr(item, "root_idxs", item.idxs)]
            if count != n or plain != roots or sorted(plain) != list(range(n)):
                return None
            blocks = blocks * g // math.gcd(blocks, g)
        if n % blocks:
            return None
        return blocks

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
                blocks = self.channel_blocks(group)
                if blocks is None:
                    continue
                self.blocks[names[root]] = blocks
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
                consumers[layer] = None
                items.append((layer, list(item.idxs), list(item.root_idxs)))
        plan.append((name, n_root, items))
    energy: dict[nn.Module, torch.Tensor] = {}

    def record(layer: nn.Module, h: torch.Tensor) -> None:
        e = h.pow(2).sum(dim=(0, 2, 3)) if h.dim() == 4 else h.reshape(-1, h.shape[-1]).pow(2).sum(0)
        energy[layer] = energy.get(layer, 0) + e.double()

    observe_inputs(module, {m: record for m in consumers}, x)
    scores = {}
    for name, n_root, items in plan:
        s = torch.zeros(n_root, dtype=torch.float64)
        for layer, idxs, root_idxs in items:
            w = layer.weight.detach().double()
            if w.dim() == 4:  # (out, in / groups, kh, kw): input channel c feeds its group's outputs only
                g = layer.groups
                wn = w.reshape(g, w.shape[0] // g, w.shape[1], -1).pow(2).sum(dim=(1, 3)).reshape(-1)
            else:
                wn = w.pow(2).sum(0)
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

    def _kept(self, n: int, ratio: float, blocks: int = 1) -> int:
        o = self.options
        keep = int(round(n * (1.0 - ratio)))
        # a narrow group's width does not decide its speed, and a grouped conv's width must stay a
        # multiple of its groups: those keep the ratio as it is
        if blocks == 1 and n >= 2 * o.round_to:
            keep = max(o.round_to, int(round(keep / o.round_to)) * o.round_to)
        return min(n, max(keep, min(o.min_channels, n)))

    def _groups(self, module: nn.Module, example: torch.Tensor, allow_reshape: bool) -> tuple[_Graph, list]:
        graph = _Graph(module, example)
        return graph, graph.prunable_groups(allow_reshape=allow_reshape)

    def _removed(self, n: int, blocks: int, ratio: float, scores: torch.Tensor | None = None) -> list[int]:
        """The channels of an ``n``-channel group to remove at ``ratio``: the least important
        by ``scores`` (``None``: the last ones). With ``blocks`` > 1 (grouped convs, group norms)
        the same positions go from every block, ranked by their importance summed over blocks."""
        per = n // blocks
        keep = self._kept(n, ratio, blocks)
        keep_per = min(per, max(1, -(-keep // blocks)))
        if keep_per >= per:
            return []
        if scores is None:
            drop = list(range(keep_per, per))
        else:
            order = torch.argsort(scores.double().reshape(blocks, per).sum(0), descending=True, stable=True)
            drop = sorted(int(i) for i in order[keep_per:])  # most important positions kept
        return sorted(b * per + p for b in range(blocks) for p in drop)

    # -- pruning any module (the teacher's segment here; a donor's segment in timm-donors) ------

    def trial(self, module: nn.Module, example: torch.Tensor, out_shape: tuple[int, ...]) -> tuple[list, bool] | None:
        """Whether ``module`` (left unchanged; copies are pruned) can be pruned at the largest ratio
        and still map ``example``'s shape to ``out_shape``: ``(group sizes and blocks,
        allow_reshape)``, or ``None`` when it cannot be pruned at all. Never raises."""
        for allow_reshape in (True, False):
            trial = copy.deepcopy(module)
            try:
                graph, groups = self._groups(trial, example, allow_reshape)
                if not groups:
                    return None
                ratio = max(self.options.ratios)
                sizes = []
                for name, group in groups:
                    n, blocks = len(group[0].idxs), graph.blocks.get(name, 1)
                    sizes.append((n, blocks))
                    removed = self._removed(n, blocks, ratio)
                    if removed:
                        graph.prune(name, removed)
                with torch.no_grad():
                    out = trial(example)
                if tuple(out.shape) != tuple(out_shape):
                    continue
            except Exception:  # not traceable by autograd, or coupling tp gets wrong
                continue
            if not any(self._removed(n, b, r) for n, b in sizes for r in self.options.ratios):
                return None
            return sizes, allow_reshape
        return None

    def prune(self, module: nn.Module, example: torch.Tensor, ratio: float, importance: str,
              calibration: torch.Tensor | None, allow_reshape: bool = True) -> list:
        """Prune ``module`` in place at ``ratio``; the plan (``[[root layer, removed channels],
        ...]``) that :meth:`replay` applies to a fresh copy. ``calibration``: inputs of the
        module for importance ``error``."""
        graph, groups = self._groups(module, example, allow_reshape)
        if not groups:
            raise UsageError("pruned-self: no prunable channel group")
        if importance == "error" and calibration is not None:
            scores = _error_importance(module, groups, calibration)
            for name, group in groups:  # no measurable consumer
                if not bool((scores[name] > 0).any()):
                    scores[name] = _magnitude(group).double()
        else:
            scores = {name: _magnitude(g).double() for name, g in groups}
        plan = []
        for name, group in groups:
            removed = self._removed(len(group[0].idxs), graph.blocks.get(name, 1), ratio, scores[name])
            if removed:
                plan.append([name, removed])
        for name, removed in plan:
            graph.prune(name, removed)
        return plan

    @staticmethod
    def replay(module: nn.Module, example: torch.Tensor, plan: list) -> nn.Module:
        """Apply a plan from :meth:`prune` to a fresh copy of the same module (in place)."""
        graph = _Graph(module, example)
        for name, removed in plan:
            graph.prune(name, [int(i) for i in removed])
        return module

    # -- the block source ------------------------------------------------------------------------

    def propose(self, ctx: Any, segment: SegmentInfo) -> list[AlternativeSpec]:
        found = self.trial(self._segment_module(ctx, segment), self._example(segment), segment.out_shape)
        if found is None:
            return []
        sizes, allow_reshape = found
        specs = []
        for ratio in self.options.ratios:
            if not any(self._removed(n, blocks, ratio) for n, blocks in sizes):
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
        refit = bool(spec.options.get("refit", self.options.refit))
        wants = importance == "error" or refit
        x = ctx.teacher_activation(segment.start)[: self.options.calibration_images] if wants else None
        try:
            plan = self.prune(module, example, ratio, importance, x, bool(spec.options.get("allow_reshape", True)))
        except UsageError:
            raise UsageError(f"pruned-self: segment {segment.id} has no prunable channel group") from None
        _check(module, segment, example)
        refitted = refit_pointwise(module, self._segment_module(ctx, segment), x) if refit and x is not None else []
        done = spec.model_copy(update={"options": {**spec.options, "importance": importance, "pruned": plan,
                                                   "refit": refitted, "params": count_parameters(module)}})
        return module, done

    def rebuild(self, ctx: Any, segment: SegmentInfo, spec: AlternativeSpec) -> nn.Module:
        module = self.replay(self._segment_module(ctx, segment), self._example(segment), spec.options["pruned"])
        _check(module, segment, self._example(segment))
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
