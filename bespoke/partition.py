"""Cut a network into single-input, single-output segments.

The network is traced with torch.fx (timm's own leaf modules and autowrapped functions are
honoured, so ``tf_`` EfficientNets with their same-padding convolutions trace), and shapes are
propagated for one example input. Nodes are ranked in execution order; node ``v`` is a *cut
point* when no edge goes from a node ranked before ``v`` to a node ranked after it, and ``v``
produces a single tensor. Any two cut points ``u < w`` bound a segment: one input (``u``'s
output), one output (``w``'s output), skip connections inside are fine. Cut point 0 is the
model input; the last cut point is the model output.

Strides (input resolution / activation resolution):

- 4-D activations (N, C, H, W): ``input H / H`` (NHWC tensors are recognised when dims 1 and 2
  are equal and dim 3 is not).
- Token activations (N, L, C): the patch size, ``round(input H / sqrt(L - prefix))`` where
  ``prefix`` (class / register tokens, at most 16) is the fewest that leaves a square grid; an
  (N, C, L) layout (patches just flattened) is recognised the same way on its last dimension.
- Anything else (pooled features, logits): the input resolution (one "pixel" covers it all).

To make segments safe to run on shared activations, tracing makes the graph functional: in-place
activations (``nn.ReLU(inplace=True)`` and the like) are switched to out-of-place, which gives the
same numbers, and in-place tensor ops in the graph become their out-of-place forms. The model
passed in is left as it is (it keeps running in place, as deployed): the graph calls out-of-place
copies of its in-place modules and shares every other module, parameter and buffer with it. Each
node so changed carries ``node.meta["bespoke_inplace"]`` (what it was), so that a student can
run in place again where the teacher did (:class:`bespoke.student.Student`).
"""

from __future__ import annotations

import bisect
import copy
import inspect
import math
import operator
import random
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from pydantic import BaseModel
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from bespoke.errors import UsageError
from bespoke.types import SegmentInfo

__all__ = ["CutPoint", "Partition", "trace"]

_COMPUTE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d, nn.Linear, nn.Bilinear)
_COMPUTE_FUNCTIONS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                      torch.nn.functional.conv3d, torch.nn.functional.linear,
                      torch.conv1d, torch.conv2d, torch.conv3d}

# in-place call_function / call_method forms and their out-of-place equivalents
_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div",
                    "relu_": "relu", "sigmoid_": "sigmoid", "clamp_": "clamp",
                    "clamp_min_": "clamp_min", "clamp_max_": "clamp_max", "tanh_": "tanh",
                    "hardtanh_": "hardtanh"}


class CutPoint(BaseModel):
    """A node of the traced graph that nothing jumps over (index 0: the input)."""

    index: int
    name: str
    shape: tuple[int, ...]
    stride: int


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


def _timm_leaves() -> tuple[list[type], list[Any]]:
    try:
        import timm.models  # noqa: F401  (registers every model's leaf modules)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency, but stay usable without it
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class _Tracer(fx.Tracer):
    """torch.fx tracer with timm's (and the caller's) leaf modules, remembering which module
    was being traced when tracing failed."""

    def __init__(self, leaf_modules: Sequence[type], autowrap_functions: Sequence[Any]):
        fns = tuple(f for f in autowrap_functions if callable(f))
        super().__init__(autowrap_functions=fns)
        self.leaf_types = tuple(leaf_modules)
        self.stack: list[tuple[str, type]] = []
        self.failed_at: list[tuple[str, type]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {first[:300].rstrip('.')}"


def trace(model: nn.Module, leaf_modules: Iterable[type] = ()) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, treating timm's no-trace modules, torch.nn's modules and
    ``leaf_modules`` as leaves. Raises :class:`UsageError` naming the failing module."""
    timm_modules, timm_functions = _timm_leaves()
    tracer = _Tracer(list(timm_modules) + list(leaf_modules), timm_functions)
    name = type(model).__name__
    concrete = _optional_args(model)
    model, switched = _out_of_place_root(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:
        where = tracer.failed_at or []
        if where:
            path, cls = where[-1]
            mod = f"module {path or '(root)'!r} ({cls.__module__}.{cls.__qualname__})"
            fix = (f"declare it a leaf module: Partition.from_model(model, input_shape, "
                   f"leaf_modules=[{cls.__qualname__}]) (or decorate the class with "
                   f"timm.layers.register_notrace_module); a leaf is kept whole, so no cut "
                   f"point falls inside it")
        else:
            mod = f"the forward of {name}"
            fix = ("make forward traceable by torch.fx (no Python control flow on tensor values "
                   "or shapes), or move the untraceable part into a submodule and declare that "
                   "class a leaf module (leaf_modules=[...])")
        raise UsageError(f"cannot trace {name} with torch.fx: {mod} failed: {_reason(exc)}. "
                         f"Fix: {fix}") from None
    _drop_specialization_guards(graph)
    gm = fx.GraphModule(tracer.root, graph, name)
    _make_functional(gm, switched)
    return gm


def _drop_specialization_guards(graph: fx.Graph) -> None:
    """Optional forward arguments were fixed to their defaults (see :func:`_optional_args`); fx
    guards each with an assert on the placeholder. Drop guards and placeholders: the traced
    model then takes the one input, so segments and students do too."""
    from torch.fx._symbolic_trace import _assert_is_none

    for ph in [n for n in graph.nodes if n.op == "placeholder" and n.args]:
        for user in list(ph.users):
            if user.users:
                if not (user.op == "call_function" and user.target is operator.eq and all(
                        u.op == "call_function" and u.target is torch._assert and not u.users
                        for u in user.users)):
                    continue
                for u in list(user.users):
                    graph.erase_node(u)
            if user.op == "call_function" and user.target in (_assert_is_none, operator.eq, torch._assert):
                graph.erase_node(user)
        if not ph.users:
            graph.erase_node(ph)


def _optional_args(model: nn.Module) -> dict[str, Any]:
    """forward's arguments after the first that have defaults (masks, flags): fixed to them."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[1:]
            if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _is_inplace_module(m: nn.Module) -> bool:
    return isinstance(getattr(m, "inplace", None), bool) and m.inplace


def _out_of_place_root(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """``model`` with each in-place module (``inplace=True``) replaced by an out-of-place copy,
    on shallow copies of its ancestors only; and the paths of the modules replaced. Every other
    module, parameter and buffer is the model's own object (no weight is copied, and moving the
    model to a device moves what the graph uses), while the model itself keeps running in place."""
    paths = [name for name, m in model.named_modules() if name and _is_inplace_module(m)]
    if not paths:
        return model, set()
    return with_inplace(model, paths, False), set(paths)


def with_inplace(module: nn.Module, paths: Iterable[str], inplace: bool) -> nn.Module:
    """A copy of ``module`` whose submodules at ``paths`` (``""``: the module itself) have
    ``inplace`` set; only they and their ancestors are copied (shallowly), so every other
    module, parameter and buffer stays the original object."""

    def shallow(m: nn.Module) -> nn.Module:
        new = copy.copy(m)
        new.__dict__["_modules"] = dict(m._modules)
        return new

    root = shallow(module)
    copied = {id(root)}
    for path in paths:
        if not path:
            root.inplace = inplace
            continue
        parent, parts = root, path.split(".")
        for part in parts[:-1]:
            child = parent._modules[part]
            if id(child) not in copied:
                child = shallow(child)
                copied.add(id(child))
                parent._modules[part] = child
            parent = child
        leaf = shallow(parent._modules[parts[-1]])
        leaf.inplace = inplace
        parent._modules[parts[-1]] = leaf
    return root


def _make_functional(gm: fx.GraphModule, switched_modules: set[str] = frozenset()) -> None:
    """Replace in-place ops by out-of-place ones (same numbers) so activations can be shared;
    each node changed (or calling a module switched to out-of-place) records in
    ``node.meta["bespoke_inplace"]`` what it was."""
    for m in gm.modules():  # modules the root copy did not reach (none, for modules it traced)
        if _is_inplace_module(m):
            m.inplace = False
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_module":  # the module, or modules inside a leaf, switched
            inside = sorted(p[len(node.target) + 1:] if p != node.target else "" for p in switched_modules
                            if p == node.target or p.startswith(node.target + "."))
            if inside:
                node.meta["bespoke_inplace"] = {"modules": inside}
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        was = {"target": node.target, "kwargs": dict(node.kwargs)}
        if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
            node.target = _INPLACE_OPERATORS[node.target]
        elif node.op == "call_method" and node.target in _INPLACE_METHODS:
            node.target = _INPLACE_METHODS[node.target]
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        if node.target != was["target"] or node.kwargs != was["kwargs"]:
            node.meta["bespoke_inplace"] = was
            changed = True
    if changed:
        gm.recompile()


# --------------------------------------------------------------------------------------------
# Strides
# --------------------------------------------------------------------------------------------


def _stride(shape: Sequence[int], input_hw: int) -> int:
    if len(shape) == 4:
        n, a, b, c = shape
        h = a if (a == b and b != c) else b  # NHWC when dims 1 and 2 match and 3 does not
        return max(1, round(input_hw / h)) if h else input_hw
    if len(shape) == 3:
        # (N, L, C) tokens, or (N, C, L) just after flattening patches: take the dimension that
        # is a square grid plus the fewest prefix tokens (class / register tokens, at most 16).
        best: tuple[int, int] | None = None
        for length in (shape[1], shape[2]):
            for prefix in range(0, min(17, length)):
                side = math.isqrt(length - prefix)
                if side > 0 and side * side == length - prefix:
                    if best is None or prefix < best[0]:
                        best = (prefix, side)
                    break
        return max(1, round(input_hw / best[1])) if best else input_hw
    return input_hw


def _fixed_argument(node: fx.Node) -> bool:
    """A placeholder for an optional forward argument, fixed to its default when tracing."""
    return node.op == "placeholder" and bool(node.args) and not node.users


def _single_tensor(node: fx.Node) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


# --------------------------------------------------------------------------------------------
# Partition
# --------------------------------------------------------------------------------------------


class Partition:
    """A traced model with its cut points; see the module docstring."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, input_shape: tuple[int, ...],
                 name: str | None = None):
        self.model = model
        self.gm = gm
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = name or type(model).__name__
        self._nodes: list[fx.Node] = list(gm.graph.nodes)
        self._rank = {n: i for i, n in enumerate(self._nodes)}
        self.cut_nodes: list[fx.Node] = []
        self.cut_points: list[CutPoint] = []
        self._find_cut_points()
        self._compute_prefix = self._count_compute()
        self._activation_modules: dict[tuple[int, ...], fx.GraphModule] = {}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, input_shape: Sequence[int],
                   leaf_modules: Iterable[type] = (), name: str | None = None) -> "Partition":
        """Trace ``model`` (put in eval mode), propagate shapes for a random input of
        ``input_shape`` (batch first, e.g. ``(1, 3, 224, 224)``) and find the cut points."""
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) < 2:
            raise UsageError(f"input_shape {input_shape} must include the batch, e.g. (1, 3, 224, 224)")
        model.eval()
        gm = trace(model, leaf_modules)
        gm.eval()
        example = torch.randn(input_shape)
        try:
            with torch.no_grad():
                gm(example)  # fails cleanly (ShapeProp would print a traceback first)
                ShapeProp(gm).propagate(example)
        except Exception as exc:
            native = _native_size(model)
            hint = f" The model's own input size is {native}." if native else ""
            raise UsageError(
                f"{name or type(model).__name__} does not run on an input of shape "
                f"{input_shape}: {_reason(exc)}.{hint} Pass a size the model accepts "
                f"(--input-size).") from None
        return cls(model, gm, input_shape, name=name)

    def resized(self, size: int) -> "Partition":
        """The same model traced at a square ``size`` px input (what a student that runs at another
        resolution is cut from). Its cut points are the same nodes, so segment indices carry over;
        a model whose graph depends on the input size is a clear error."""
        if len(self.input_shape) != 4:
            raise UsageError(f"{self.name or 'the model'} takes {tuple(self.input_shape)} inputs, not images: "
                             "it has no input resolution to change")
        size = int(size)
        if (self.input_shape[-2], self.input_shape[-1]) == (size, size):
            return self
        other = Partition.from_model(self.model, (self.input_shape[0], self.input_shape[1], size, size),
                                     name=self.name)
        if [c.name for c in other.cut_points] != [c.name for c in self.cut_points]:
            raise UsageError(f"{self.name or 'the model'} traces to a different graph at {size} px than at "
                             f"{self.input_shape[-1]} px; its students cannot change input size")
        return other

    def _find_cut_points(self) -> None:
        nodes = self._nodes
        rank = self._rank
        input_hw = self.input_shape[-2] if len(self.input_shape) == 4 else 1  # input H
        reach = -1  # furthest rank used by any node ranked before the current one
        for i, node in enumerate(nodes):
            if node.op == "output":
                break
            if node.op == "get_attr":
                continue  # free to use anywhere: parameters and buffers are not activations
            meta = _single_tensor(node)
            if reach <= i and meta is not None and (node.op == "placeholder" or node.users):
                shape = tuple(int(s) for s in meta.shape)
                stride = 1 if node.op == "placeholder" else _stride(shape, input_hw)
                self.cut_points.append(CutPoint(index=len(self.cut_nodes), name=node.name,
                                                shape=shape, stride=stride))
                self.cut_nodes.append(node)
            elif node.op == "placeholder" and not self.cut_nodes:
                raise UsageError(f"{self.name}: the first input is not a single tensor; "
                                 f"bespoke needs a model with one tensor input")
            reach = max(reach, max((rank[u] for u in node.users), default=i))
        placeholders = [n for n in nodes if n.op == "placeholder" and not n.args]
        if len(placeholders) != 1:
            raise UsageError(f"{self.name} takes {len(placeholders)} inputs; bespoke needs a "
                             f"model with a single tensor input")
        result = next(n for n in reversed(nodes) if n.op == "output").args[0]
        if not isinstance(result, fx.Node) or _single_tensor(result) is None:
            what = "a non-tensor" if isinstance(result, fx.Node) else f"a {type(result).__name__}"
            raise UsageError(f"{self.name} returns {what}; bespoke needs a model whose forward "
                             f"returns a single tensor (wrap it in a module returning the logits)")
        if len(self.cut_nodes) < 2 or self.cut_nodes[-1] is not result:
            raise UsageError(f"{self.name}: the output is not a cut point; bespoke needs a "
                             f"model whose forward returns a single tensor")

    def _count_compute(self) -> list[int]:
        prefix = [0]
        for node in self._nodes:
            prefix.append(prefix[-1] + (1 if self._is_compute(node) else 0))
        return prefix

    def _is_compute(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            return any(isinstance(m, _COMPUTE_MODULES) for m in mod.modules())
        if node.op == "call_function":
            return node.target in _COMPUTE_FUNCTIONS
        return False

    # -- segments ------------------------------------------------------------------------------

    def _check(self, start: int, end: int) -> None:
        k = len(self.cut_points)
        if not (0 <= start < end < k):
            raise UsageError(f"segment {start}-{end}: need 0 <= start < end < {k} "
                             f"(cut points of {self.name})")

    def segment(self, start: int, end: int) -> SegmentInfo:
        """The segment between cut points ``start`` and ``end`` (indices, start < end)."""
        self._check(start, end)
        a, b = self.cut_points[start], self.cut_points[end]
        return SegmentInfo(start=start, end=end, in_shape=a.shape, out_shape=b.shape,
                           in_stride=a.stride, out_stride=b.stride)

    def whole_segment(self) -> SegmentInfo:
        """The whole network as one segment: the first cut point (the input) to the last."""
        return self.segment(0, len(self.cut_points) - 1)

    def stitch_points(self) -> list[int]:
        """Where the stages meet: per stride but the last, the cut point of the smallest activation
        at that stride (a block's output, not an expanded one inside a block; the last on a tie)."""
        last = len(self.cut_points) - 1
        by_stride: dict[int, list[int]] = {}
        for k in range(1, last):
            by_stride.setdefault(self.cut_points[k].stride, []).append(k)
        size = lambda k: math.prod(self.cut_points[k].shape[1:])  # noqa: E731
        return [max(ks, key=lambda k: (-size(k), k)) for _, ks in sorted(by_stride.items())[:-1]]

    def stitched_segments(self, span: tuple[float, float] = (0.0, 1.0)) -> list[SegmentInfo]:
        """Input to each stitch point, and each stitch point to the output (stitched stages), of
        those spanning ``span`` (low, high) of the cut points."""
        last = len(self.cut_points) - 1
        segs = [seg for b in self.stitch_points() for seg in (self.segment(0, b), self.segment(b, last))]
        return [s for s in segs if span[0] * last <= s.end - s.start <= span[1] * last and self.has_compute(s)]

    def is_stitched(self, segment: Any) -> bool:
        """Whether ``segment`` is a stitched stage: the input to a stitch point, or one to the output."""
        points, last = self.stitch_points(), len(self.cut_points) - 1
        return (segment.start == 0 and segment.end in points) or (segment.end == last and segment.start in points)

    def is_whole(self, segment: Any) -> bool:
        """Whether ``segment`` is the whole network (the input to the last cut point)."""
        return segment.start == 0 and segment.end == len(self.cut_points) - 1

    def segment_nodes(self, segment: SegmentInfo) -> list[fx.Node]:
        """The graph nodes computing the segment: ranked in (start, end], get_attr excluded."""
        self._check(segment.start, segment.end)
        lo = self._rank[self.cut_nodes[segment.start]]
        hi = self._rank[self.cut_nodes[segment.end]]
        return [n for n in self._nodes[lo + 1:hi + 1] if n.op not in ("get_attr", "placeholder")]

    def has_compute(self, segment: SegmentInfo) -> bool:
        """Whether the segment holds a convolution or linear layer."""
        lo = self._rank[self.cut_nodes[segment.start]]
        hi = self._rank[self.cut_nodes[segment.end]]
        return self._compute_prefix[hi + 1] - self._compute_prefix[lo + 1] > 0

    def enumerate_segments(self, max_len: int) -> list[SegmentInfo]:
        """Every segment spanning at most ``max_len`` cut points that holds a conv or linear."""
        k = len(self.cut_points)
        out = []
        for s in range(k - 1):
            for e in range(s + 1, min(k, s + max_len + 1)):
                seg = self.segment(s, e)
                if self.has_compute(seg):
                    out.append(seg)
        return out

    def sample_segments(self, n: int, max_fraction: float = 0.3, seed: int = 0) -> list[SegmentInfo]:
        """Up to ``n`` distinct segments drawn as the method does: a random start cut point, an
        end at most ``max_fraction`` of the remaining cut points further on, holding a conv or
        linear layer. Deterministic for a seed; sorted by (start, end)."""
        if not 0 < max_fraction <= 1:
            raise UsageError(f"max_fraction {max_fraction} must be in (0, 1]")
        rng = random.Random(seed)
        k = len(self.cut_points)
        seen: set[tuple[int, int]] = set()
        out: list[SegmentInfo] = []
        attempts = 0
        while len(out) < n and attempts < 50 * max(n, 1) + 100:
            attempts += 1
            start = rng.randrange(0, k - 1)
            remaining = k - 1 - start
            max_len = max(1, int(max_fraction * remaining))
            end = start + rng.randint(1, max_len)
            if (start, end) in seen:
                continue
            seen.add((start, end))
            seg = self.segment(start, end)
            if self.has_compute(seg):
                out.append(seg)
        return sorted(out, key=lambda s: (s.start, s.end))

    def tile_segments(self, n: int) -> list[SegmentInfo]:
        """About ``n`` consecutive, non-overlapping segments that together cover the whole network
        (each holding a conv or linear layer), split at evenly spaced cut points.

        Random sampling alone may leave parts of the network without any segment, which caps
        how fast a student can get; adding a tiling guarantees one non-overlapping set covers it.
        """
        if n < 1:
            raise UsageError(f"tiles {n} must be >= 1")
        last = len(self.cut_points) - 1
        n = min(n, last)
        bounds = sorted({round(i * last / n) for i in range(n + 1)})
        out: list[SegmentInfo] = []
        start = bounds[0]
        for end in bounds[1:]:
            seg = self.segment(start, end)
            if self.has_compute(seg):
                out.append(seg)
                start = end
        if start != last:  # a compute-free tail joins the last tile
            if out:
                out[-1] = self.segment(out[-1].start, last)
            else:
                out.append(self.segment(0, last))
        return out

    def module_segments(self, max_fraction: float = 1.0) -> list[SegmentInfo]:
        """One segment per submodule of the model that maps a cut point to a cut point: the
        network's own blocks and stages (timm's ``blocks.1.0`` and ``blocks.1`` in EfficientNet,
        ``layer2.1`` in ResNet, ``stages.2`` in ConvNeXt, ``blocks.3`` in ViT), whatever the family.

        These are where architectures put their seams: a residual block is exactly the unit a
        ``skip`` can drop, and a stage the unit a donor of the same family replaces. Single layers
        (leaf modules) are not segments here; modules spanning more than ``max_fraction`` of the
        cut points, or holding no conv or linear layer, are left out. Sorted by (start, end).

        A module's segment starts at the last cut point before its first node (its input) and ends
        at its last node, which must be a cut point (else something jumps out of the module, e.g.
        a block whose output feeds a later skip connection, and it is not a segment).
        """
        if not 0 < max_fraction <= 1:
            raise UsageError(f"max_fraction {max_fraction} must be in (0, 1]")
        spans: dict[str, list[int]] = {}
        leaf_targets: set[str] = set()
        for i, node in enumerate(self._nodes):
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op == "call_module":
                leaf_targets.add(str(node.target))
            for value in (node.meta.get("nn_module_stack") or {}).values():
                path = value[0] if isinstance(value, tuple) else str(value)
                if not path:
                    continue
                span = spans.setdefault(path, [i, i])
                span[1] = i
        cut_index = {self._rank[n]: k for k, n in enumerate(self.cut_nodes)}
        cut_ranks = sorted(cut_index)
        last = len(self.cut_points) - 1
        out: dict[tuple[int, int], SegmentInfo] = {}
        for path, (first, final) in spans.items():
            if path in leaf_targets or final not in cut_index:
                continue
            k = bisect.bisect_left(cut_ranks, first)  # the last cut point ranked before ``first``
            if k == 0:
                continue
            start, end = cut_index[cut_ranks[k - 1]], cut_index[final]
            if start >= end or (start, end) == (0, last) or (end - start) > max_fraction * last:
                continue
            seg = self.segment(start, end)
            if self.has_compute(seg):
                out[(start, end)] = seg
        return [out[k] for k in sorted(out)]

    # -- running pieces ------------------------------------------------------------------------

    def extract(self, segment: SegmentInfo) -> fx.GraphModule:
        """A runnable module mapping the activation at ``segment.start`` to the one at
        ``segment.end``. It shares the teacher's parameters: deepcopy it before modifying."""
        self._check(segment.start, segment.end)
        start_node = self.cut_nodes[segment.start]
        end_node = self.cut_nodes[segment.end]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        env[start_node] = graph.placeholder("x")

        def arg(n: fx.Node) -> fx.Node:
            if n not in env:
                if n.op != "get_attr":  # the cut-point rule guarantees this does not happen
                    raise AssertionError(f"node {n.name} jumps into segment {segment.id}")
                env[n] = graph.node_copy(n)
            return env[n]

        for node in self.segment_nodes(segment):
            env[node] = graph.node_copy(node, arg)
        graph.output(env[end_node])
        gm = fx.GraphModule(self.gm, graph, f"{self.name}_segment_{segment.start}_{segment.end}")
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm.eval()

    def activations(self, x: torch.Tensor, indices: Iterable[int]) -> dict[int, torch.Tensor]:
        """The activations at cut points ``indices`` (0 is ``x`` itself), from one forward pass
        that stops after the last one requested. Runs under the caller's grad mode."""
        idx = tuple(sorted(set(int(i) for i in indices)))
        for i in idx:
            if not 0 <= i < len(self.cut_points):
                raise UsageError(f"cut point {i} does not exist (0..{len(self.cut_points) - 1})")
        want = tuple(i for i in idx if i != 0)
        out: dict[int, torch.Tensor] = {0: x} if 0 in idx else {}
        if not want:
            return out
        gm = self._activation_modules.get(want)
        if gm is None:
            graph = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            last = self._rank[self.cut_nodes[want[-1]]]
            for node in self._nodes[:last + 1]:
                if _fixed_argument(node):
                    continue
                env[node] = graph.node_copy(node, lambda n: env[n])
            graph.output(tuple(env[self.cut_nodes[i]] for i in want))
            gm = fx.GraphModule(self.gm, graph, f"{self.name}_activations")
            gm.graph.eliminate_dead_code()
            gm.recompile()
            self._activation_modules[want] = gm
        values = gm(x)
        out.update(zip(want, values))
        return out

    def inspect(self) -> dict:
        cuts = [{"index": c.index, "name": c.name, "shape": list(c.shape), "stride": c.stride} for c in self.cut_points]
        return {"model": self.name, "input_shape": list(self.input_shape), "cut_points": cuts}

    def __repr__(self) -> str:
        return f"Partition({self.name}, input {self.input_shape}, {len(self.cut_points)} cut points)"


def _native_size(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) the model was built for: a fixed patch embedding's size (set when a ViT is
    created at another size) wins over timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    chw = tuple(cfg["input_size"]) if isinstance(cfg, dict) and cfg.get("input_size") else None
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
        return ((chw[0] if chw else 3), int(img[0]), int(img[1]))
    return chw
