"""Latency: module signatures, the lookup-table (LUT) format, additive prediction, calibration,
and profiling a model house into a LUT.

A LUT answers "how long does this piece take on that device" without measuring. Entries are keyed
by :func:`module_signature`: a hash of the architecture and the input shape, independent of the
weights, so the same alternative rebuilt anywhere finds its entry.

Prediction is additive (teacher latency minus the per-segment savings). That ignores fusion and
boundary effects, so a LUT may carry a per-device linear :class:`Calibration` fitted from students
measured end to end: ``calibrated = a * predicted + b``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bespoke.errors import UsageError
from bespoke.types import DeviceInfo, LatencyEstimator, LatencyQuery

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

LUT_SCHEMA_VERSION = 1

Role = Literal["teacher", "segment", "alternative", "student", "other"]


# --------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------


def _qualname(obj: Any) -> str:
    t = obj if isinstance(obj, type) else type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _tensor_desc(t: Any) -> str:
    return f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}"


def _own_tensors(module: "nn.Module") -> list[str]:
    out = [f"p {n} {_tensor_desc(p)}" for n, p in module.named_parameters(recurse=False)]
    out += [f"b {n} {_tensor_desc(b)}" for n, b in module.named_buffers(recurse=False) if b is not None]
    return out


def _describe(module: "nn.Module") -> list[str]:
    """Architecture lines, names relative to ``module``; fx graphs canonicalised."""
    import torch.fx as fx

    if isinstance(module, fx.GraphModule):
        return _describe_graph(module)
    lines: list[str] = []
    skip_prefixes: list[str] = []
    for name, sub in module.named_modules(remove_duplicate=False):
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(sub, fx.GraphModule) and sub is not module:
            lines.append(f"[{name}] graph")
            lines += ["  " + s for s in _describe_graph(sub)]
            skip_prefixes.append(name + ".")
            continue
        try:
            extra = sub.extra_repr()
        except Exception:  # extra_repr of exotic modules may fail; the class name still counts
            extra = ""
        lines.append(f"[{name}] {_qualname(sub)}({extra})")
        lines += ["  " + s for s in _own_tensors(sub)]
    return lines


def _describe_graph(gm: Any) -> list[str]:
    """An fx graph with node and attribute names replaced by positions, so identical
    architectures extracted from different places of a network give identical text."""
    import torch

    node_ids: dict[Any, str] = {}
    module_ids: dict[str, str] = {}
    lines: list[str] = []

    def arg(a: Any) -> str:
        if isinstance(a, torch.fx.Node):
            return node_ids.get(a, "?")
        if isinstance(a, (list, tuple)):
            inner = ", ".join(arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {arg(v)}" for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))) + "}"
        if isinstance(a, torch.Tensor):
            return f"tensor{_tensor_desc(a)}"
        if callable(a):
            return getattr(a, "__qualname__", None) or getattr(a, "__name__", None) or repr(a)
        return repr(a)

    for i, node in enumerate(gm.graph.nodes):
        nid = f"%{i}"
        node_ids[node] = nid
        args = ", ".join(arg(a) for a in node.args)
        kwargs = arg(dict(node.kwargs)) if node.kwargs else ""
        if node.op == "call_module":
            target = str(node.target)
            if target not in module_ids:
                module_ids[target] = f"m{len(module_ids)}"
                sub = gm.get_submodule(target)
                lines.append(f"def {module_ids[target]}:")
                lines += ["  " + s for s in _describe(sub)]
            tgt = module_ids[target]
        elif node.op == "get_attr":
            try:
                obj = gm
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                tgt = f"attr{_tensor_desc(obj)}" if isinstance(obj, torch.Tensor) else "attr"
            except AttributeError:
                tgt = "attr?"
        elif node.op in ("call_function",):
            tgt = f"{getattr(node.target, '__module__', '')}.{arg(node.target)}"
        elif node.op in ("placeholder", "output"):
            tgt = ""
        else:  # call_method: the method name is the architecture
            tgt = str(node.target)
        lines.append(f"{nid} = {node.op} {tgt}({args}{', ' if args and kwargs else ''}{kwargs})")
    return lines


def module_signature(module: "nn.Module", input_shape: Sequence[int]) -> str:
    """A stable key for ``module`` run on ``input_shape``: architecture + shapes, not weights.

    Built from each submodule's class and ``extra_repr`` (kernel sizes, strides, channels...),
    its parameter and buffer shapes, the canonicalised fx graph for ``GraphModule`` pieces, and the
    input shape (batch included). Two modules of identical architecture give the same key wherever
    they come from; any change of shape, layer or wiring gives another.
    """
    text = "\n".join(_describe(module)) + f"\ninput {tuple(int(s) for s in input_shape)}"
    return "sig-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def make_query(module: "nn.Module", input_shape: Sequence[int]) -> LatencyQuery:
    """A :class:`LatencyQuery` for ``module``, keyed by :func:`module_signature`."""
    shape = tuple(int(s) for s in input_shape)
    return LatencyQuery(key=module_signature(module, shape), input_shape=shape, module=module)


def count_flops(module: "nn.Module", input_shape: Sequence[int]) -> float | None:
    """Multiply-accumulate FLOPs of one forward pass (torch's FLOP counter), or None."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else "cpu"
        x = torch.zeros(tuple(input_shape), device=device)
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            module(x)
        return float(counter.get_total_flops())
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# The LUT schema
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LutEntry(_Strict):
    """One measured module: its latency and, for fallbacks and reports, what it was."""

    ms: float = Field(..., ge=0, description="median latency in milliseconds")
    label: str | None = Field(None, description="human-readable name, e.g. 'segment 3-7' or an alternative id")
    role: Role = "other"
    input_shape: list[int] | None = None
    flops: float | None = Field(None, ge=0, description="FLOPs of one forward pass (used by allow_fallback)")


class TeacherLatency(_Strict):
    key: str = Field(..., description="module_signature of the whole teacher")
    ms: float = Field(..., gt=0)
    label: str | None = None


class Calibration(_Strict):
    """Per-device linear correction of additive predictions: ``a * predicted + b``."""

    a: float = 1.0
    b: float = 0.0
    n: int = Field(0, ge=0, description="students the fit used")
    median_abs_rel_error_before: float | None = None
    median_abs_rel_error_after: float | None = None
    fitted: str | None = Field(None, description="UTC time of the fit")

    def apply(self, predicted_ms: float) -> float:
        return self.a * predicted_ms + self.b


class LatencyTable(_Strict):
    """A latency lookup table for one device and runtime (the JSON file a LUT plugin ships)."""

    schema_version: int = LUT_SCHEMA_VERSION
    device: DeviceInfo
    teacher: TeacherLatency | None = None
    entries: dict[str, LutEntry] = Field(default_factory=dict)
    calibration: Calibration | None = None
    created: str | None = None
    bespoke_version: str | None = None
    notes: dict[str, Any] = Field(default_factory=dict)

    # -- lookups ---------------------------------------------------------------------------

    def get_ms(self, key: str) -> float | None:
        if self.teacher is not None and key == self.teacher.key:
            return self.teacher.ms
        entry = self.entries.get(key)
        return None if entry is None else entry.ms

    def predict(self, savings_ms: Iterable[float], *, teacher_ms: float | None = None,
                calibrated: bool = True) -> float:
        """Additive prediction from this table's teacher latency (or ``teacher_ms``)."""
        if teacher_ms is None:
            if self.teacher is None:
                raise UsageError("this latency table has no teacher latency; profile the teacher too, or pass teacher_ms")
            teacher_ms = self.teacher.ms
        pred = predict_latency(teacher_ms, savings_ms)
        if calibrated and self.calibration is not None:
            pred = self.calibration.apply(pred)
        return pred

    def check_device(self, device: DeviceInfo, source: str = "latency table") -> None:
        """Refuse this table when ``device`` (where it is used) is not where it was measured."""
        check_same_device(self.device, device, source)


def check_same_device(have: DeviceInfo, want: DeviceInfo, source: str = "latency table") -> None:
    """Raise a :class:`UsageError` listing every field in which ``have`` differs from ``want``."""
    diffs = []
    for field in ("name", "runtime", "threads", "batch", "precision"):
        a, b = getattr(have, field), getattr(want, field)
        if a != b:
            diffs.append(f"{field}: table has {a!r}, this run uses {b!r}")
    if diffs:
        raise UsageError(
            f"{source} was measured on another device or runtime and cannot be used here:\n  "
            + "\n  ".join(diffs)
            + "\nProfile this device (`bespoke profile HOUSE --plugin measured-latency -o lut.json`) "
            "or pick the latency plugin that matches the table."
        )


def predict_latency(teacher_ms: float, savings_ms: Iterable[float]) -> float:
    """Additive model: teacher latency minus the sum of (teacher segment ms - alternative ms)."""
    return float(teacher_ms) - float(sum(savings_ms))


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid latency table {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        value = err.get("input")
        try:
            shown = json.dumps(value, default=str)
        except Exception:
            shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {key} = {shown}: {err.get('msg')}")
    lines.append("See docs/latency.md for the schema.")
    return "\n".join(lines)


def parse_lut(data: Any, source: str = "(in memory)") -> LatencyTable:
    """Validate a decoded LUT; every problem names the source, the key and the reason."""
    if not isinstance(data, dict):
        raise UsageError(f"invalid latency table {source}: the top level must be a JSON object, not {type(data).__name__}")
    version = data.get("schema_version")
    if version is None:
        raise UsageError(f"invalid latency table {source}: schema_version is missing (this bespoke reads version {LUT_SCHEMA_VERSION})")
    if version != LUT_SCHEMA_VERSION:
        raise UsageError(
            f"invalid latency table {source}: schema_version = {version!r}, but this bespoke reads "
            f"version {LUT_SCHEMA_VERSION}; regenerate the table with `bespoke profile` or upgrade bespoke"
        )
    try:
        return LatencyTable.model_validate(data)
    except ValidationError as exc:
        raise UsageError(_format_errors(exc, source)) from None


def read_lut(path: str | Path, device: DeviceInfo | None = None) -> LatencyTable:
    """Read and validate a LUT file; with ``device``, refuse a table measured elsewhere."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"latency table {str(p)!r} does not exist; write one with `bespoke profile HOUSE -o {p.name}`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"invalid latency table {str(p)!r}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    table = parse_lut(data, repr(str(p)))
    if device is not None:
        table.check_device(device, f"latency table {str(p)!r}")
    return table


def write_lut(table: LatencyTable, path: str | Path) -> Path:
    """Write ``table`` as indented JSON (atomically: a temporary file, then a rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(table.model_dump_json(indent=2, exclude_none=True) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def lut_json_schema() -> dict[str, Any]:
    """The JSON Schema of the LUT format (for documentation and other tools)."""
    return LatencyTable.model_json_schema()


# --------------------------------------------------------------------------------------------
# Calibration and error reports
# --------------------------------------------------------------------------------------------


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class ErrorSummary:
    """How far predictions are from measurements (absolute relative error)."""

    n: int
    median: float
    p95: float
    max: float
    within_5pct: float
    within_10pct: float

    def as_dict(self) -> dict[str, float]:
        return dict(n=self.n, median=self.median, p95=self.p95, max=self.max,
                    within_5pct=self.within_5pct, within_10pct=self.within_10pct)


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    if len(predicted) != len(measured):
        raise ValueError("predicted and measured must have the same length")
    return [abs(p - m) / m for p, m in zip(predicted, measured)]


def error_summary(predicted: Sequence[float], measured: Sequence[float]) -> ErrorSummary:
    errs = relative_errors(predicted, measured)
    n = len(errs)
    return ErrorSummary(
        n=n, median=_median(errs), p95=_quantile(errs, 0.95), max=max(errs) if errs else math.nan,
        within_5pct=sum(e <= 0.05 for e in errs) / n if n else math.nan,
        within_10pct=sum(e <= 0.10 for e in errs) / n if n else math.nan,
    )


def fit_calibration(predicted: Sequence[float], measured: Sequence[float]) -> Calibration:
    """Least-squares ``measured ~ a * predicted + b`` over students measured end to end.

    Relative errors are what users judge, so each point is weighted by 1/measured (the fit
    minimises the squared *relative* residuals). With fewer than three students, predictions all
    alike, or a fitted slope that is not positive, only a scale is fitted (``b = 0``), so the
    correction never reverses the order of two predictions.
    """
    n = len(predicted)
    if n == 0 or n != len(measured):
        raise UsageError("calibration needs at least one student with both a predicted and a measured latency")
    w = [1.0 / (m * m) for m in measured]
    sw = sum(w)
    sx = sum(wi * p for wi, p in zip(w, predicted))
    sy = sum(wi * m for wi, m in zip(w, measured))
    sxx = sum(wi * p * p for wi, p in zip(w, predicted))
    sxy = sum(wi * p * m for wi, p, m in zip(w, predicted, measured))
    det = sw * sxx - sx * sx
    a = b = None
    if n >= 3 and det > 1e-12 * max(1.0, sw * sxx):
        a = (sw * sxy - sx * sy) / det
        b = (sy - a * sx) / sw
    if a is None or a <= 0:  # too few or too alike students (or noise): a scale only, which stays monotonic
        a, b = (sxy / sxx if sxx > 0 else 1.0), 0.0
    cal = Calibration(a=a, b=b, n=n, fitted=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    cal.median_abs_rel_error_before = error_summary(predicted, measured).median
    cal.median_abs_rel_error_after = error_summary([cal.apply(p) for p in predicted], measured).median
    return cal


def calibrate_table(table: LatencyTable, predicted: Sequence[float], measured: Sequence[float],
                    device: DeviceInfo | None = None) -> LatencyTable:
    """A copy of ``table`` with a calibration fitted from students measured end to end.

    ``predicted`` must be *uncalibrated* additive predictions from this table; ``device`` is where
    the students were measured (refused when it is not the table's device).
    """
    if device is not None:
        table.check_device(device, "latency table to calibrate")
    return table.model_copy(update={"calibration": fit_calibration(predicted, measured)})


@dataclass
class StudentLatency:
    label: str
    predicted_ms: float  # additive, uncalibrated
    measured_ms: float
    calibrated_ms: float | None = None

    @property
    def error(self) -> float:
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms


def measure_students(estimator: LatencyEstimator, students: Sequence[tuple[str, "nn.Module", float]],
                     input_shape: Sequence[int], calibration: Calibration | None = None) -> list[StudentLatency]:
    """Measure assembled students end to end (one interleaved batch) beside their predictions.

    ``students``: ``(label, module, predicted_ms)`` with uncalibrated additive predictions. Feed the
    result to :func:`calibrate_table` (``[s.predicted_ms ...]``, ``[s.measured_ms ...]``).
    """
    queries = [make_query(m, input_shape) for _, m, _ in students]
    ms = estimator.latencies(queries)
    return [StudentLatency(label, float(pred), ms[q.key],
                           calibration.apply(pred) if calibration is not None else None)
            for (label, _, pred), q in zip(students, queries)]


# --------------------------------------------------------------------------------------------
# Profiling: measure modules (a house's segments and alternatives, the teacher) into a LUT
# --------------------------------------------------------------------------------------------


@dataclass
class ProfileItem:
    """One module to measure into a LUT."""

    label: str
    module: "nn.Module"
    input_shape: tuple[int, ...]
    role: Role = "other"


def profile_modules(items: Sequence[ProfileItem], estimator: LatencyEstimator, *,
                    teacher: ProfileItem | None = None, count_flops_too: bool = True,
                    notes: dict[str, Any] | None = None) -> LatencyTable:
    """Measure ``items`` (and the ``teacher``) with ``estimator`` in one interleaved batch."""
    import bespoke

    queries: dict[str, LatencyQuery] = {}
    meta: dict[str, ProfileItem] = {}
    all_items = list(items) + ([teacher] if teacher is not None else [])
    for it in all_items:
        q = make_query(it.module, it.input_shape)
        queries.setdefault(q.key, q)
        meta.setdefault(q.key, it)
    if not queries:
        raise UsageError("nothing to profile: no modules were given")
    ms = estimator.latencies(list(queries.values()))
    entries: dict[str, LutEntry] = {}
    for it in items:
        key = module_signature(it.module, it.input_shape)
        if key in entries:
            continue  # identical architecture and shape: one entry answers both
        entries[key] = LutEntry(
            ms=float(ms[key]), label=it.label, role=it.role, input_shape=list(it.input_shape),
            flops=count_flops(it.module, it.input_shape) if count_flops_too else None,
        )
    notes = dict(notes or {})
    options = getattr(estimator, "options", None)
    if isinstance(options, BaseModel):  # how it was measured (runs, statistic, ...), for the record
        notes.setdefault("estimator_options", options.model_dump(mode="json"))
    table = LatencyTable(
        device=estimator.device(), entries=entries,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        bespoke_version=bespoke.__version__, notes=notes,
    )
    if teacher is not None:
        tkey = module_signature(teacher.module, teacher.input_shape)
        table.teacher = TeacherLatency(key=tkey, ms=float(ms[tkey]), label=teacher.label)
    return table


@dataclass
class HouseModules:
    """A house's teacher, segments and alternatives as runnable modules, for timing.

    Latency does not depend on weights, so the teacher is built with random weights and the
    alternatives are rebuilt from their specs through their block sources without loading theirs.
    """

    teacher: ProfileItem
    segments: dict[str, ProfileItem]  # segment id -> the teacher's segment
    alternatives: dict[str, ProfileItem]  # alternative id -> the alternative
    alt_segment: dict[str, str]  # alternative id -> segment id
    skipped: dict[str, str]  # alternative id -> why it could not be rebuilt

    def items(self) -> list[ProfileItem]:
        return list(self.segments.values()) + list(self.alternatives.values())


def house_modules(house: Any, registry: Any, cfg: Any = None, *, batch: int = 1) -> HouseModules:
    """Rebuild everything of ``house`` that has a latency (failed alternatives are skipped)."""
    from bespoke.blocks import Context
    from bespoke.distill import source_for
    from bespoke.models import load_model
    from bespoke.partition import Partition

    if cfg is None:
        from bespoke.config import RunConfig

        cfg = RunConfig()
    t = house.manifest.teacher
    size = t.input_size
    model = load_model(t.name, weights=None).eval()
    partition = Partition.from_model(model, (1, 3, size, size), name=t.name)
    ctx = Context(partition, t.name, (3, size, size), calibration=None, donor_weights=None, seed=cfg.seed)
    segments: dict[str, ProfileItem] = {}
    for seg in house.manifest.segments:
        info = partition.segment(seg.start, seg.end)
        shape = (batch, *tuple(info.in_shape)[1:])
        segments[info.id] = ProfileItem(f"segment {info.id}", partition.extract(info), shape, "segment")
    sources: dict[str, Any] = {}
    alternatives: dict[str, ProfileItem] = {}
    alt_segment: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for rec in house.manifest.alternatives:
        if rec.status == "failed":
            skipped[rec.id] = f"failed in the build: {rec.reason or 'no reason recorded'}"
            continue
        seg = house.segment(rec.segment)
        info = partition.segment(seg.start, seg.end)
        try:
            source = source_for(rec.source, sources, cfg, registry)
            module = source.rebuild(ctx, info, rec.spec).eval()
        except Exception as exc:  # one alternative that cannot be rebuilt must not stop the rest
            skipped[rec.id] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        alternatives[rec.id] = ProfileItem(rec.id, module, segments[info.id].input_shape, "alternative")
        alt_segment[rec.id] = info.id
    teacher = ProfileItem(t.name, model, (batch, 3, size, size), "teacher")
    return HouseModules(teacher, segments, alternatives, alt_segment, skipped)


def profile_house(house: Any, estimator: LatencyEstimator, registry: Any, cfg: Any = None, *,
                  batch: int = 1) -> tuple[LatencyTable, HouseModules]:
    """Measure every alternative and teacher segment of ``house`` (and the teacher) into a LUT."""
    mods = house_modules(house, registry, cfg, batch=batch)
    table = profile_modules(mods.items(), estimator, teacher=mods.teacher,
                            notes={"house": str(getattr(house, "root", "")),
                                   "teacher": house.manifest.teacher.name,
                                   "input_size": house.manifest.teacher.input_size})
    return table, mods


@dataclass
class HouseLatencies:
    """What the search needs: the teacher's, each segment's and each alternative's latency."""

    teacher_ms: float
    segment_ms: dict[str, float]
    alt_ms: dict[str, float]
    device: DeviceInfo
    calibration: Calibration | None = None


def house_latencies(house: Any, estimator: LatencyEstimator, registry: Any, cfg: Any = None, *,
                    batch: int = 1, modules: HouseModules | None = None) -> HouseLatencies:
    """Ask ``estimator`` (measuring, or a LUT) for every latency of ``house`` in one batch."""
    mods = modules or house_modules(house, registry, cfg, batch=batch)
    q_teacher = make_query(mods.teacher.module, mods.teacher.input_shape)
    q_seg = {k: make_query(it.module, it.input_shape) for k, it in mods.segments.items()}
    q_alt = {k: make_query(it.module, it.input_shape) for k, it in mods.alternatives.items()}
    ms = estimator.latencies([q_teacher, *q_seg.values(), *q_alt.values()])
    table = getattr(estimator, "table", None)
    return HouseLatencies(
        teacher_ms=ms[q_teacher.key],
        segment_ms={k: ms[q.key] for k, q in q_seg.items()},
        alt_ms={k: ms[q.key] for k, q in q_alt.items()},
        device=estimator.device(),
        calibration=getattr(table, "calibration", None),
    )


# --------------------------------------------------------------------------------------------
# Helpers for estimators
# --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), for DeviceInfo.name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def interleaved_order(n: int, round_index: int) -> list[int]:
    """Round-robin order for one timing round: each round starts one later, so no query always
    runs right after the same neighbour and drift hits every query alike."""
    if n == 0:
        return []
    s = round_index % n
    return list(range(s, n)) + list(range(0, s))


def time_interleaved(runners: Sequence[Any], *, warmup: int, runs: int, warm_per_visit: int = 1,
                     runs_per_visit: int = 1, sync: Any = None, clock: str = "wall") -> list[list[float]]:
    """Time each ``runners[i]()`` (a zero-argument callable); return every timed run in ms.

    After ``warmup`` untimed rounds, rounds visit the runners round-robin (each round starting one
    later) until each has ``runs`` timed runs. On each visit a runner first runs
    ``warm_per_visit`` times untimed, so its weights are back in the caches as in steady-state
    use (a large model timed right after another one would otherwise run cold), then
    ``runs_per_visit`` timed runs. Drift over the session hits every runner alike.

    ``clock="cpu"`` times the CPU time of the calling thread instead of the wall clock: on a
    machine shared with other work, a single-threaded run's CPU time does not count the time it
    waited for a core. Only meaningful when the work runs on the calling thread (one CPU thread).
    """
    import time

    now = time.thread_time if clock == "cpu" else time.perf_counter
    sync = sync or (lambda: None)
    n = len(runners)
    times: list[list[float]] = [[] for _ in runners]
    for r in range(warmup):
        for i in interleaved_order(n, r):
            runners[i]()
    sync()
    per = max(1, runs_per_visit)
    rounds = -(-runs // per)
    for r in range(rounds):
        for i in interleaved_order(n, r):
            for _ in range(warm_per_visit):
                runners[i]()
            for _ in range(min(per, runs - len(times[i]))):
                sync()
                t0 = now()
                runners[i]()
                sync()
                times[i].append((now() - t0) * 1e3)
    return times


def unique_queries(queries: Sequence[LatencyQuery]) -> list[LatencyQuery]:
    seen: dict[str, LatencyQuery] = {}
    for q in queries:
        if q.module is None:
            raise UsageError(
                f"latency query {q.key!r} (input {tuple(q.input_shape)}) has no module; a measuring "
                "estimator needs the module itself (only lut-latency answers from keys alone)"
            )
        seen.setdefault(q.key, q)
    return list(seen.values())


__all__ = [
    "Calibration", "ErrorSummary", "LUT_SCHEMA_VERSION", "LatencyTable", "LutEntry", "ProfileItem",
    "HouseLatencies", "HouseModules", "TeacherLatency", "calibrate_table", "check_same_device",
    "count_flops", "cpu_name", "error_summary", "fit_calibration", "house_latencies", "house_modules", "interleaved_order", "lut_json_schema", "time_interleaved",
    "make_query", "module_signature", "parse_lut", "predict_latency", "profile_house",
    "profile_modules", "read_lut", "relative_errors", "measure_students", "StudentLatency", "unique_queries", "write_lut",
]
