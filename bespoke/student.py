"""Assemble a student from the teacher's traced graph and chosen alternatives; save and reload it.

:func:`assemble` copies the teacher's fx graph, and for every chosen segment drops the nodes in
``(start, end]`` and calls the alternative on the start cut point's activation instead; what is
left dead is eliminated. Adjacent choices (one's end is the next one's start) chain naturally.
The student owns deep copies of everything it uses (teacher pieces and alternatives), so training
it never moves the teacher.

On disk a student is ``recipe.json`` (:class:`StudentRecipe`: the teacher reference, its input
size and each choice's segment and alternative spec) and ``model.safetensors`` (every weight).
:func:`load_student` rebuilds the teacher architecture (random weights), partitions it, asks each
choice's block source to ``rebuild`` the alternative, assembles, then loads the weights strictly:
nothing is pickled, and bespoke plus the plugins that made the alternatives is all it needs.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from pydantic import BaseModel, Field
from torch import nn

from bespoke.errors import UsageError
from bespoke.partition import Partition, _fixed_argument, with_inplace
from bespoke.types import AlternativeSpec, SegmentInfo

__all__ = ["Student", "StudentChoice", "StudentRecipe", "assemble", "deployed", "export_onnx", "load_student",
           "save_student", "RECIPE_FILE", "WEIGHTS_FILE", "SCHEMA_VERSION"]

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
SCHEMA_VERSION = 1


class StudentChoice(BaseModel):
    """One replaced segment and the alternative that replaces it."""

    segment: SegmentInfo
    spec: AlternativeSpec
    alternative_id: str | None = None  # the alternative's id in the model house, when from one


class StudentRecipe(BaseModel):
    """Everything needed to rebuild a student's architecture (weights live beside it)."""

    schema_version: int = SCHEMA_VERSION
    teacher: str  # model reference: timm name or package.module:attribute
    teacher_weights: str | None = None  # what the teacher was loaded with (informational)
    input_size: tuple[int, int, int]  # (C, H, W)
    num_classes: int | None = None  # the teacher's classes when not its architecture's default (fine-tuned)
    choices: list[StudentChoice] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)


class _Tap:
    """Forward hook storing a replaced segment's output on the student (a class, not a closure,
    so that deep copies of the student tap into the copy)."""

    def __init__(self, student: "Student", segment_id: str):
        self.student = student
        self.segment_id = segment_id

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.student._tapping():
            self.student.replaced_outputs[self.segment_id] = output


def _module_name(segment: SegmentInfo) -> str:
    return f"seg_{segment.start}_{segment.end}"


class Student(nn.Module):
    """The assembled student: ``forward(x)`` returns the teacher's kind of output (logits).

    After each forward, ``replaced_outputs`` maps each replaced segment's id (``"start-end"``)
    to that segment's output, for distillation at every replaced segment. Tapping is off while
    exporting (torch.export, ONNX, tracing) and inside :meth:`taps` ``(False)``.
    """

    def __init__(self, net: fx.GraphModule, segments: Sequence[SegmentInfo]):
        super().__init__()
        self.net = net
        self.segments: list[SegmentInfo] = list(segments)
        self.replaced_outputs: dict[str, torch.Tensor] = {}
        self.taps_enabled = True
        self.recipe: StudentRecipe | None = None
        for seg in self.segments:
            net.get_submodule(f"alternatives.{_module_name(seg)}").register_forward_hook(_Tap(self, seg.id))
        # not registered (object.__setattr__): the same modules under flat names, built on the
        # first forward and again after any module anywhere is (re)assigned, see _flat_view
        object.__setattr__(self, "_flat", {})
        object.__setattr__(self, "_flat_at", -1)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "Student":
        # .to() / .half() may put new tensors into net that the flat views would not see
        out = super()._apply(fn, *args, **kwargs)
        object.__setattr__(self, "_flat_at", -1)
        return out

    @property
    def replaced_segments(self) -> list[str]:
        """Ids (``"start-end"``) of the replaced segments, in graph order."""
        return [s.id for s in self.segments]

    def alternative(self, segment_id: str) -> nn.Module:
        """The module that replaces segment ``segment_id``."""
        for s in self.segments:
            if s.id == segment_id:
                return self.net.get_submodule(f"alternatives.{_module_name(s)}")
        raise KeyError(segment_id)

    def _tapping(self) -> bool:
        if not self.taps_enabled:
            return False
        return not (torch.compiler.is_exporting() or torch.compiler.is_compiling()
                    or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())

    @contextlib.contextmanager
    def taps(self, enabled: bool) -> Iterator["Student"]:
        before = self.taps_enabled
        self.taps_enabled = enabled
        try:
            yield self
        finally:
            self.taps_enabled = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tapping = self._tapping()
        if tapping:
            self.replaced_outputs = {}
        if self._flat_at != _REGISTRATIONS[0]:
            views = {inplace: _flat_view(self.net, inplace=inplace) for inplace in (False, True)}
            object.__setattr__(self, "_flat", views)
            object.__setattr__(self, "_flat_at", _REGISTRATIONS[0])  # after: building registers modules
        # Tapped outputs must survive the ops after them, so a tapping forward runs the graph
        # out of place; otherwise it runs in place wherever the teacher did, op for op.
        return self._flat[not tapping](x)


# How many submodule assignments (``parent.name = module``) torch has seen in this process: a
# student whose view was built at another count rebuilds it, so a module swapped into ``net``
# after assembly (fusion, quantisation, a new alternative) is never bypassed by a stale view.
_REGISTRATIONS = [0]


def _count_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _flat_view(net: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """``net``'s graph calling the very same module objects under flat names; with ``inplace``,
    the teacher's in-place operations and modules that tracing made out of place
    (:mod:`bespoke.partition`, ``node.meta["bespoke_inplace"]``) run in place again, as in the
    teacher: out of place, a ReLU6 or a residual add writes a new activation on every call.

    fx's generated code reaches ``blocks.1.2.conv_pw`` through a chain of ``getattr`` calls on
    every forward; on EfficientNet-Lite2 at 240 px (200 calls) that made the reassembled
    teacher 4.1 % slower than timm's eager module, the flat view 1.3 % (2 CPU threads). ``net``
    keeps the hierarchy (state dict, saving, hooks); both call the same modules, so training,
    ``load_state_dict`` and hooks act on both; a module assigned anew into ``net``, or a
    ``.to()``/``.float()`` (which may replace buffers and tensors the graph reads directly,
    ``get_attr``, in ``net`` only), makes :class:`Student` rebuild the view.
    """
    graph = copy.deepcopy(net.graph)
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            flat = "a_" + node.target.replace(".", "__")
            root[flat] = _fetch(net, node.target)
            node.target = flat
            continue
        was = node.meta.get("bespoke_inplace") if inplace else None
        if node.op == "call_module":
            flat = "m_" + node.target.replace(".", "__")
            module = net.get_submodule(node.target)
            if was and "modules" in was:  # (modules inside) a copy that runs in place
                flat += "__inplace"
                module = with_inplace(module, was["modules"], True)
            root[flat] = module
            node.target = flat
        elif was:
            node.target, node.kwargs = was["target"], dict(was["kwargs"])
    view = fx.GraphModule(root, graph, "StudentGraphFlat")
    view.recompile()
    return view


def assemble(partition: Partition, choices: Sequence[tuple[SegmentInfo, nn.Module]]) -> Student:
    """Build the student: the teacher with each chosen segment replaced by its module.

    ``choices`` must not overlap (sharing an end cut point is fine: they chain). Teacher pieces
    and alternatives are deep-copied into the student.
    """
    chosen = sorted(choices, key=lambda c: (c[0].start, c[0].end))
    for (a, _), (b, _) in zip(chosen, chosen[1:]):
        if a.overlaps(b):
            raise UsageError(f"segments {a.id} and {b.id} overlap; a student replaces "
                             f"non-overlapping segments")
    cuts = partition.cut_nodes
    nodes = list(partition.gm.graph.nodes)
    rank = {n: i for i, n in enumerate(nodes)}
    for seg, mod in chosen:
        expected = partition.segment(seg.start, seg.end)
        if (tuple(expected.in_shape), tuple(expected.out_shape)) != (tuple(seg.in_shape), tuple(seg.out_shape)):
            raise UsageError(f"segment {seg.id} has shapes {seg.in_shape} -> {seg.out_shape}, but "
                             f"the teacher's is {expected.in_shape} -> {expected.out_shape}; was it "
                             f"made for another teacher or input size?")
        if not isinstance(mod, nn.Module):
            raise UsageError(f"the alternative for segment {seg.id} is a {type(mod).__name__}, "
                             f"not an nn.Module")

    removed: set[int] = set()
    at_end: dict[int, tuple[SegmentInfo, str]] = {}
    for seg, _ in chosen:
        lo, hi = rank[cuts[seg.start]], rank[cuts[seg.end]]
        removed.update(range(lo + 1, hi + 1))
        at_end[hi] = (seg, f"alternatives.{_module_name(seg)}")

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(nodes):
        if i in at_end:
            seg, target = at_end[i]
            env[node] = graph.call_module(target, (env[cuts[seg.start]],))
            continue
        if (i in removed and node.op != "get_attr") or _fixed_argument(node):
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])

    # Every teacher module and attribute the new graph still uses, plus the alternatives,
    # copied in one go (one memo: ties between them survive).
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and not node.target.startswith("alternatives."):
            root[node.target] = _fetch(partition.gm, node.target)
    for seg, mod in chosen:
        root[f"alternatives.{_module_name(seg)}"] = mod
    root = copy.deepcopy(root)
    net = fx.GraphModule(root, graph, "StudentGraph")
    net.graph.eliminate_dead_code()
    net.graph.lint()
    net.recompile()
    student = Student(net, [seg for seg, _ in chosen])
    return student.eval()


def deployed(network: Partition | nn.Module, input_shape: Sequence[int] | None = None) -> Student:
    """``network`` as bespoke ships a network: its traced graph, flat, in place where the
    network is, taps off -- a student with nothing replaced. Latencies compare like with like
    only when the teacher and the reference models are timed in this form too: on a 2-core x86
    CPU the flat graph of EfficientNet-Lite2 ran 3.5 % faster than timm's eager module (the
    nested modules' Python calls), which would otherwise count as a saving of the replacements.
    ``network``: a :class:`Partition`, or a module and its ``input_shape`` (batch first)."""
    part = network if isinstance(network, Partition) else Partition.from_model(network, input_shape)
    student = assemble(part, [])
    student.taps_enabled = False
    return student


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def save_student(student: Student, recipe: StudentRecipe, path: str | Path) -> Path:
    """Write ``path/recipe.json`` and ``path/model.safetensors``."""
    from safetensors.torch import save_file

    from bespoke.files import atomic_write, atomic_write_text

    have = sorted(s.id for s in student.segments)
    want = sorted(c.segment.id for c in recipe.choices)
    if have != want:
        raise UsageError(f"the recipe's segments {want} are not the student's {have}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    # each file atomically: a kill mid-save leaves the previous student's file whole, never a torn one
    atomic_write(out / WEIGHTS_FILE,
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "bespoke": "student"}))
    atomic_write_text(out / RECIPE_FILE, recipe.model_dump_json(indent=2) + "\n")
    student.recipe = recipe
    return out


def read_recipe(path: str | Path) -> StudentRecipe:
    p = Path(path)
    file = p / RECIPE_FILE if p.is_dir() else p
    if not file.is_file():
        raise UsageError(f"{str(p)!r} is not a saved student: {RECIPE_FILE} is missing")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{str(file)!r} is not valid JSON: {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UsageError(f"{str(file)!r} has schema_version {version!r}; this bespoke reads "
                         f"versions up to {SCHEMA_VERSION} (upgrade bespoke)")
    try:
        return StudentRecipe.model_validate(data)
    except Exception as exc:
        raise UsageError(f"{str(file)!r} is not a valid student recipe: {exc}") from None


def build_student(recipe: StudentRecipe, registry: Any = None,
                  teacher: Partition | None = None) -> Student:
    """The student's architecture from ``recipe`` (weights are whatever rebuild gives)."""
    from bespoke.models import load_model
    from bespoke.plugins import get_registry

    registry = registry if registry is not None else get_registry()
    if teacher is None:
        model = load_model(recipe.teacher, weights=None, classes=recipe.num_classes)
        teacher = Partition.from_model(model, (1, *recipe.input_size), name=recipe.teacher)
    try:
        from bespoke.blocks import Context
    except ImportError:  # pragma: no cover - blocks lands with the block sources
        Context = None  # type: ignore[assignment]
    ctx = (Context(teacher, recipe.teacher, recipe.input_size, calibration=None, donor_weights=None)
           if Context is not None else None)
    choices = []
    for choice in recipe.choices:
        seg = choice.segment
        source = registry.block_source(choice.spec.source)
        module = source.rebuild(ctx, teacher.segment(seg.start, seg.end), choice.spec)
        choices.append((seg, module))
    return assemble(teacher, choices)


def load_student(path: str | Path, registry: Any = None) -> Student:
    """Reload a student written by :func:`save_student` (see the module docstring), in eval mode
    with its taps off (``student.taps_enabled = True`` to distil at its replaced segments)."""
    from safetensors.torch import load_file

    p = Path(path)
    recipe = read_recipe(p)
    weights = (p if p.is_dir() else p.parent) / WEIGHTS_FILE
    if not weights.is_file():
        raise UsageError(f"{str(p)!r} is not a saved student: {WEIGHTS_FILE} is missing")
    student = build_student(recipe, registry)
    state = load_file(str(weights))
    result = student.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(
            f"{str(weights)!r} does not fit the architecture its recipe rebuilds: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}; was a block "
            f"source upgraded since it was saved?")
    student.recipe = recipe
    # What ships runs for inference: no taps, so it runs in place where the teacher does (the
    # module that was timed). Fine-tuning switches the taps back on.
    student.taps_enabled = False
    return student.eval()


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_onnx(student: nn.Module, path: str | Path, input_shape: Sequence[int],
                check: bool = True, seed: int = 0) -> float | None:
    """Write ``student`` as ONNX to ``path`` (static ``input_shape``, batch included); with
    ``check``, run it with onnxruntime and return the max absolute difference to PyTorch."""
    from bespoke.export import export_onnx as _export, onnx_max_abs_diff

    example = torch.randn(tuple(int(s) for s in input_shape),
                          generator=torch.Generator().manual_seed(seed))
    taps = student.taps(False) if isinstance(student, Student) else contextlib.nullcontext()
    with taps:
        _export(student, example, Path(path))
        return onnx_max_abs_diff(student, Path(path), example) if check else None
