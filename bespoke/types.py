"""Public types shared by the core and every plugin: the contracts of the four plugin families.

Plugins import these from :mod:`bespoke.api` (the one public module, with the helpers a plugin
needs; :mod:`bespoke` re-exports the types too). Everything here is small and stable: records,
protocols and plain data, documented field by field in ``docs/plugins.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

Category = Literal["block-source", "distill-loss", "latency", "search"]
CATEGORIES: tuple[str, ...] = ("block-source", "distill-loss", "latency", "search")


@dataclass(frozen=True)
class PluginRecord:
    """One named implementation a plugin registers through a hook.

    ``factory(options)`` builds the implementation; ``options`` is an instance of
    ``options_model`` validated from the user's configuration (``plugin_options.<name>``), or
    ``None`` when ``options_model`` is ``None``.
    """

    name: str
    category: Category
    factory: Callable[[Any], Any]
    description: str = ""
    options_model: type[BaseModel] | None = None
    # Filled in by the plugin manager, not by plugins.
    distribution: str = ""
    version: str = ""
    plugin: str = ""


class PluginOptions(BaseModel):
    """Base for plugins' options models: unknown keys are errors, so typos are caught."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Segments and alternatives
# --------------------------------------------------------------------------------------------


class SegmentInfo(BaseModel):
    """A single-input, single-output piece of the teacher between two cut points.

    ``start`` and ``end`` are cut-point indices (see :mod:`bespoke.partition`): the segment
    consumes the output of cut point ``start`` and produces the output of cut point ``end``.
    Strides are the input resolution divided by the activation's spatial size (1 at the input;
    for token tensors, the patch size).
    """

    model_config = ConfigDict(frozen=True)

    start: int
    end: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_stride: int
    out_stride: int

    @property
    def id(self) -> str:
        return f"{self.start}-{self.end}"

    @property
    def reduction(self) -> int:
        return max(1, self.out_stride // max(1, self.in_stride))

    def overlaps(self, other: "SegmentInfo") -> bool:
        return self.start < other.end and other.start < self.end


class AlternativeSpec(BaseModel):
    """How to rebuild one alternative's architecture, stored in the model house as JSON.

    ``options`` holds everything the source needs to rebuild the exact architecture (never
    pickled code); the weights live beside it as safetensors. ``source`` is the block-source
    plugin name that produced it.
    """

    source: str
    kind: str
    label: str
    options: dict[str, Any] = Field(default_factory=dict)
    max_images: int | None = Field(None, ge=1, description="distil it on at most about this many images (it stops at the first step past them, as successive halving stops one, profiled and kept as far as it got); None: as many as the build gives every alternative")
    lr_scale: float = Field(1.0, gt=0, description="its block-level distillation learning rate as a multiple of build.lr: a pretrained whole network (timm-donors on build.whole_sources) wants a fine-tuning rate, not a fresh block's")


@runtime_checkable
class BlockContext(Protocol):
    """What the core hands a block source (see :class:`bespoke.blocks.Context`)."""

    teacher: Any  # bespoke.partition.Partition of the teacher
    teacher_name: str
    input_size: tuple[int, int, int]
    seed: int

    def donor(self, name: str) -> Any:
        """The donor model ``name`` partitioned at the teacher's input size (cached)."""

    def calibration_inputs(self) -> "torch.Tensor":
        """A small batch of real, preprocessed teacher inputs (N, C, H, W) for initialisation."""

    def teacher_activation(self, cut_index: int) -> "torch.Tensor":
        """The teacher's activation at cut point ``cut_index`` on :meth:`calibration_inputs`."""


@runtime_checkable
class BlockSource(Protocol):
    """Produces alternatives for teacher segments."""

    def propose(self, ctx: BlockContext, segment: SegmentInfo) -> list[AlternativeSpec]:
        """Alternatives this source offers for ``segment`` (possibly none). Cheap: no training."""

    def create(
        self, ctx: BlockContext, segment: SegmentInfo, spec: AlternativeSpec
    ) -> tuple["nn.Module", AlternativeSpec]:
        """Build and initialise the alternative (e.g. fit adapters, choose channels).

        Returns the module, mapping the segment's input activation to its output activation, and
        the spec completed with every decision :meth:`rebuild` needs (e.g. kept channel indices).
        """

    def rebuild(self, ctx: BlockContext, segment: SegmentInfo, spec: AlternativeSpec) -> "nn.Module":
        """The same architecture as :meth:`create` returned, from the completed spec.

        Weights are then loaded from the house, so initialisation does not matter here.
        """


@runtime_checkable
class DistillLoss(Protocol):
    """``loss(student_out, teacher_out)`` -> scalar tensor; the teacher side is detached."""

    def __call__(self, student: "torch.Tensor", teacher: "torch.Tensor") -> "torch.Tensor": ...


# --------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------


class DeviceInfo(BaseModel):
    """Where a latency was measured; lookup tables from another device are refused."""

    name: str
    runtime: str  # e.g. "torch-eager", "onnxruntime-cpu"
    threads: int
    batch: int = 1
    precision: str = "fp32"


@dataclass
class LatencyQuery:
    """One thing to time: ``module`` on an input of ``input_shape`` (batch included).

    ``key`` is a stable signature of the architecture and input shape (independent of weights):
    lookup tables answer from it. ``module`` may be ``None`` for table-only queries.
    ``as_shipped``: ``module`` is a whole network as it ships (a student or the teacher timed for a
    budget): an estimator that converts what it times (exports ONNX, compiles) should convert it
    the way ``bespoke export`` does. Pieces of a network (a profile's blocks) leave it ``False``,
    and such an estimator may take a faster path for them, the same for every query of one call.
    """

    key: str
    input_shape: tuple[int, ...]
    module: "nn.Module | None" = None
    as_shipped: bool = False


@runtime_checkable
class LatencyEstimator(Protocol):
    """Answers latencies in milliseconds for one device and runtime.

    Every answer must be finite and >= 0, one per query key; the core refuses others, naming the
    estimator. Optional: ``table`` (a lookup table it answers from), ``latency_samples(queries)``
    (every timed run per key), ``options``.
    """

    def device(self) -> DeviceInfo: ...

    def latencies(self, queries: Sequence[LatencyQuery]) -> dict[str, float]:
        """Latency in ms for each query, keyed by ``query.key``.

        Measuring estimators interleave the queries so drift affects all alike.
        """


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One (segment, alternative) pair the search may choose.

    ``saving_ms`` = teacher segment latency - alternative latency (may be negative).
    ``loss`` is the accuracy-loss proxy of replacing this segment alone (>= 0 is typical).
    """

    segment: str  # SegmentInfo.id
    start: int
    end: int
    alternative: str  # alternative id in the house
    saving_ms: float
    loss: float


@dataclass
class SearchProblem:
    """Choose non-overlapping candidates; latency is additive, loss is additive.

    predicted latency = ``teacher_ms - sum(saving_ms)``; budgets are in milliseconds.
    """

    teacher_ms: float
    candidates: list[Candidate]
    lam: float = 0.1  # weight of the loss term in the annealing-style scalar score

    def latency(self, chosen: Sequence[int]) -> float:
        return self.teacher_ms - sum(self.candidates[i].saving_ms for i in chosen)

    def loss(self, chosen: Sequence[int]) -> float:
        return sum(self.candidates[i].loss for i in chosen)

    def compatible(self, chosen: Sequence[int], i: int) -> bool:
        c = self.candidates[i]
        return all(
            not (c.start < self.candidates[j].end and self.candidates[j].start < c.end)
            for j in chosen
        )

    def feasible(self, chosen: Sequence[int], budget_ms: float) -> bool:
        return self.latency(chosen) <= budget_ms + 1e-9

    def score(self, chosen: Sequence[int], budget_ms: float) -> float:
        """The reference scalar score to minimise: max(L/L*, 1) + lambda * loss."""
        return max(self.latency(chosen) / budget_ms, 1.0) + self.lam * self.loss(chosen)


@dataclass
class Solution:
    """A strategy's answer for one budget (build it with :func:`bespoke.api.finalize`).

    ``meta`` is JSON-able; the core reads ``feasible`` (``False`` when nothing meets the budget),
    ``fastest_ms``, ``top`` (the few best distinct chosen sets, best first, handed to re-ranking;
    without it re-ranking has only ``chosen`` to score) and ``front`` (Pareto points).
    """

    chosen: list[int]  # indices into SearchProblem.candidates
    latency_ms: float
    loss: float
    budget_ms: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class SearchStrategy(Protocol):
    """Picks candidates under each budget."""

    def search(self, problem: SearchProblem, budgets_ms: Sequence[float], *, seed: int = 0,
               workdir: str | None = None) -> list[Solution]:
        """One solution per budget, in the order of ``budgets_ms``.

        Returns the best feasible solution found for each budget (the empty solution, i.e. the
        teacher, when nothing is feasible is *not* allowed to pass silently: mark
        ``meta["feasible"] = False``), with the few best sets in ``meta["top"]`` for re-ranking;
        :func:`bespoke.api.finalize` does both. ``budgets_ms`` are milliseconds. ``workdir`` is
        where a strategy may keep state (e.g. an Optuna SQLite study) so a killed search resumes.
        """
