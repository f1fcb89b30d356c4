"""Latency: module signatures, the lookup-table (LUT) format, additive prediction, calibration,
and profiling a model house into a LUT.

A LUT answers "how long does this piece take on that device" without measuring. Entries are keyed
by :func:`module_signature`: a hash of the architecture and the input shape, independent of the
weights, so the same alternative rebuilt anywhere finds its entry.

Prediction is additive (teacher latency minus the per-segment savings). A LUT stores absolute
milliseconds per module (each teacher segment and alternative timed alone) and, optionally,
**in-context savings** (:class:`SavingEntry`): the whole teacher timed with one segment replaced
("replace-one"), which captures what timing a piece alone misses (boundary and cache effects, per
op overhead). Predictions use an in-context saving where the table has one. What is still off is
corrected by a per-device :class:`Calibration` fitted from students measured end to end:
``calibrated = a * predicted + b + c * n_replaced``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bespoke.errors import UsageError
from bespoke.types import DeviceInfo, LatencyEstimator, LatencyQuery

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

LUT_SCHEMA_VERSION = 2
# What changed between versions. Version 2 only added optional fields (in-context `savings`, the
# per-replacement calibration term `calibration.c` and `calibration.points`), so a version-1 table
# means exactly what it meant and is read as version 2 (device plugins published with version 1
# keep working); any other version is refused with a clear message.
_SCHEMA_HISTORY = {
    1: "version 2 added in-context savings (`savings`) and the per-replacement calibration term "
       "(`calibration.c`, `calibration.points`)",
}
_UPGRADABLE = {1}

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


class SavingEntry(_Strict):
    """An in-context saving: the whole teacher minus the teacher with this one segment replaced
    by this alternative, both measured end to end in the same interleaved call ("replace-one")."""

    ms: float = Field(..., description="saving in milliseconds (teacher - teacher with this replacement); may be negative")
    segment: str = Field(..., description="module_signature of the teacher segment replaced")
    alternative: str = Field(..., description="module_signature of the alternative put in its place")
    label: str | None = None
    reference_ms: float | None = Field(None, ge=0, description="the teacher measured end to end in the same call")
    how: Literal["replace-one"] = "replace-one"


def saving_key(segment_key: str, alternative_key: str) -> str:
    """The key of an in-context saving in :attr:`LatencyTable.savings`."""
    return f"{segment_key}>{alternative_key}"


class CalibrationPoint(_Strict):
    """One student measured end to end: its uncalibrated prediction and its measurement."""

    predicted: float = Field(..., description="uncalibrated additive prediction (ms)")
    measured: float = Field(..., gt=0, description="measured end to end (ms)")
    n_replaced: int = Field(0, ge=0, description="segments the student replaces")
    label: str | None = None


class Calibration(_Strict):
    """Per-device correction of additive predictions: ``a * predicted + b + c * n_replaced``.

    ``c`` is a per-replacement term: each replaced segment adds a boundary (an op that no longer
    fuses, a layout change, a module call) that neither the teacher's segment nor the alternative
    timed alone shows. ``points`` keeps the students the fit used, so later measurements refine it.
    """

    a: float = 1.0
    b: float = 0.0
    c: float = Field(0.0, description="ms added per replaced segment")
    n: int = Field(0, ge=0, description="students the fit used")
    median_abs_rel_error_before: float | None = None
    median_abs_rel_error_after: float | None = None
    fitted: str | None = Field(None, description="UTC time of the fit")
    points: list[CalibrationPoint] = Field(default_factory=list, description="the students the fit used")

    def apply(self, predicted_ms: float, n_replaced: int = 0) -> float:
        return self.a * predicted_ms + self.b + self.c * n_replaced

    def raw_budget(self, budget_ms: float, n_replaced: int = 0) -> float:
        """The uncalibrated prediction a student must stay under to meet ``budget_ms`` once
        calibrated: ``apply(raw) <= budget  <=>  raw <= raw_budget(budget)`` (``a > 0``)."""
        return (budget_ms - self.b - self.c * n_replaced) / self.a


class LatencyTable(_Strict):
    """A latency lookup table for one device and runtime (the JSON file a LUT plugin ships)."""

    schema_version: int = LUT_SCHEMA_VERSION
    device: DeviceInfo
    teacher: TeacherLatency | None = None
    entries: dict[str, LutEntry] = Field(default_factory=dict)
    savings: dict[str, SavingEntry] = Field(
        default_factory=dict, description="in-context savings (replace-one), keyed by saving_key(segment, alternative)")
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

    def saving_ms(self, segment_key: str, alternative_key: str, *, in_context: bool = True) -> float | None:
        """The saving of putting the alternative in the segment's place: the in-context
        (replace-one) saving when the table has one (and ``in_context``), else segment ms -
        alternative ms; None when the table lacks what it needs."""
        if in_context:
            entry = self.savings.get(saving_key(segment_key, alternative_key))
            if entry is not None:
                return entry.ms
        seg, alt = self.get_ms(segment_key), self.get_ms(alternative_key)
        return None if seg is None or alt is None else seg - alt

    def predict(self, savings_ms: Iterable[float], *, teacher_ms: float | None = None,
                calibrated: bool = True, n_replaced: int | None = None) -> float:
        """Additive prediction from this table's teacher latency (or ``teacher_ms``); one saving
        per replaced segment (``n_replaced`` defaults to their number)."""
        savings_ms = list(savings_ms)
        if teacher_ms is None:
            if self.teacher is None:
                raise UsageError("this latency table has no teacher latency; profile the teacher too, or pass teacher_ms")
            teacher_ms = self.teacher.ms
        pred = predict_latency(teacher_ms, savings_ms)
        if calibrated and self.calibration is not None:
            pred = self.calibration.apply(pred, len(savings_ms) if n_replaced is None else n_replaced)
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
    from bespoke.config import format_validation_error

    text = format_validation_error(exc, source).replace("invalid configuration in", "invalid latency table", 1)
    return text + "\nSee docs/latency.md for the schema."


def parse_lut(data: Any, source: str = "(in memory)") -> LatencyTable:
    """Validate a decoded LUT; every problem names the source, the key and the reason."""
    if not isinstance(data, dict):
        raise UsageError(f"invalid latency table {source}: the top level must be a JSON object, not {type(data).__name__}")
    version = data.get("schema_version")
    if version is None:
        raise UsageError(f"invalid latency table {source}: schema_version is missing (this bespoke reads version {LUT_SCHEMA_VERSION})")
    if version in _UPGRADABLE:  # an older version this one is a strict superset of: same meaning, upgraded
        data = {**data, "schema_version": LUT_SCHEMA_VERSION}
        version = LUT_SCHEMA_VERSION
    if version != LUT_SCHEMA_VERSION:
        why = _SCHEMA_HISTORY.get(version) if isinstance(version, int) else None
        raise UsageError(
            f"invalid latency table {source}: schema_version = {version!r}, but this bespoke reads "
            f"version {LUT_SCHEMA_VERSION}" + (f" ({why})" if why else "")
            + "; regenerate the table with `bespoke profile` or upgrade bespoke"
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
    """Write ``table`` as indented JSON, atomically (temporary file, fsync, rename)."""
    from bespoke.files import atomic_write_text

    return atomic_write_text(path, table.model_dump_json(indent=2, exclude_none=True) + "\n")


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


def _weighted_lstsq(rows: Sequence[Sequence[float]], ys: Sequence[float], ws: Sequence[float]) -> list[float] | None:
    """Solve the weighted least-squares normal equations (tiny systems, no numpy); None when singular."""
    k = len(rows[0])
    A = [[sum(w * r[i] * r[j] for r, w in zip(rows, ws)) for j in range(k)] for i in range(k)]
    v = [sum(w * r[i] * y for r, y, w in zip(rows, ys, ws)) for i in range(k)]
    scale = max(abs(A[i][i]) for i in range(k)) or 1.0
    for col in range(k):  # Gauss-Jordan with partial pivoting
        piv = max(range(col, k), key=lambda r: abs(A[r][col]))
        if abs(A[piv][col]) <= 1e-12 * scale:
            return None
        A[col], A[piv] = A[piv], A[col]
        v[col], v[piv] = v[piv], v[col]
        for r in range(k):
            if r != col:
                f = A[r][col] / A[col][col]
                A[r] = [x - f * y for x, y in zip(A[r], A[col])]
                v[r] -= f * v[col]
    return [v[i] / A[i][i] for i in range(k)]


def fit_calibration(predicted: Sequence[float], measured: Sequence[float],
                    n_replaced: Sequence[int] | None = None, *,
                    labels: Sequence[str | None] | None = None) -> Calibration:
    """Least-squares ``measured ~ a * predicted + b + c * n_replaced`` over students measured end
    to end (``predicted``: uncalibrated additive predictions).

    Relative errors are what users judge, so each point is weighted by 1/measured (the fit
    minimises the squared *relative* residuals). The per-replacement term ``c`` is fitted when
    ``n_replaced`` is given, there are at least six students and they replace different numbers of
    segments; otherwise ``c = 0``. With fewer than three students, predictions all alike, or a
    fitted slope that is not positive, only a scale is fitted (``b = c = 0``), so the correction
    never reverses the order of two predictions with the same number of replacements.
    """
    n = len(predicted)
    if n == 0 or n != len(measured) or (n_replaced is not None and len(n_replaced) != n):
        raise UsageError("calibration needs at least one student with both a predicted and a measured latency")
    if any(not m > 0 for m in measured):
        raise UsageError(f"measured latencies must be > 0 ms, got {list(measured)}")
    reps = [int(k) for k in n_replaced] if n_replaced is not None else [0] * n
    w = [1.0 / (m * m) for m in measured]
    a = b = None
    c = 0.0
    if n >= 6 and len(set(reps)) >= 2:
        sol = _weighted_lstsq([(p, 1.0, k) for p, k in zip(predicted, reps)], measured, w)
        if sol is not None and sol[0] > 0:
            a, b, c = sol
    if a is None and n >= 3:
        sol = _weighted_lstsq([(p, 1.0) for p in predicted], measured, w)
        if sol is not None and sol[0] > 0:
            a, b = sol
            c = 0.0
    if a is None:  # too few or too alike students (or noise): a scale only, which stays monotonic
        sxx = sum(wi * p * p for wi, p in zip(w, predicted))
        sxy = sum(wi * p * m for wi, p, m in zip(w, predicted, measured))
        a, b, c = (sxy / sxx if sxx > 0 else 1.0), 0.0, 0.0
    labels = list(labels) if labels is not None else [None] * n
    cal = Calibration(a=a, b=b, c=c, n=n, fitted=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      points=[CalibrationPoint(predicted=float(p), measured=float(m), n_replaced=k, label=lab)
                              for p, m, k, lab in zip(predicted, measured, reps, labels)])
    cal.median_abs_rel_error_before = error_summary(predicted, measured).median
    cal.median_abs_rel_error_after = error_summary([cal.apply(p, k) for p, k in zip(predicted, reps)], measured).median
    return cal


MAX_CALIBRATION_POINTS = 500


def calibrate_table(table: LatencyTable, predicted: Sequence[float], measured: Sequence[float],
                    device: DeviceInfo | None = None, *, n_replaced: Sequence[int] | None = None,
                    labels: Sequence[str | None] | None = None, keep_points: bool = False) -> LatencyTable:
    """A copy of ``table`` with a calibration fitted from students measured end to end.

    ``predicted`` must be *uncalibrated* additive predictions from this table; ``n_replaced`` how
    many segments each student replaces (enables the per-replacement term); ``device`` is where
    the students were measured (refused when it is not the table's device). ``keep_points``: fit
    over the students of the table's current calibration too (newest last; at most
    ``MAX_CALIBRATION_POINTS``), so each run refines the fit instead of replacing it.
    """
    if device is not None:
        table.check_device(device, "latency table to calibrate")
    reps = list(n_replaced) if n_replaced is not None else [0] * len(predicted)
    labs = list(labels) if labels is not None else [None] * len(predicted)
    preds, meas = list(predicted), list(measured)
    if keep_points and table.calibration is not None and table.calibration.points:
        old = table.calibration.points
        preds = [pt.predicted for pt in old] + preds
        meas = [pt.measured for pt in old] + meas
        reps = [pt.n_replaced for pt in old] + reps
        labs = [pt.label for pt in old] + labs
    keep = slice(-MAX_CALIBRATION_POINTS, None)
    cal = fit_calibration(preds[keep], meas[keep], reps[keep] if (n_replaced is not None or keep_points) else None,
                          labels=labs[keep])
    return table.model_copy(update={"calibration": cal})


def recalibrate_lut(path: str | Path, device: DeviceInfo, students: Sequence[tuple[str, float, int, float | None]],
                    teacher_measured_ms: float | None = None) -> LatencyTable:
    """Refit the calibration of the LUT at ``path`` from models measured end to end, and write it.

    ``students``: ``(label, predicted_ms, n_replaced, measured_ms)`` where ``predicted_ms`` is what
    the search predicted from this table (calibrated with the table's current calibration, if it
    has one: it is inverted here to recover the additive prediction); students without a
    measurement are left out. ``teacher_measured_ms``: the whole teacher measured in the same
    call, a point with nothing replaced. Earlier points stay (see ``keep_points``), so each run
    refines the fit. ``device`` is where they were measured (a table from elsewhere is refused).
    """
    table = read_lut(path, device=device)
    old = table.calibration
    preds, meas, reps, labels = [], [], [], []
    for label, pred, n, measured in students:
        if measured is None or not measured > 0:
            continue
        preds.append(old.raw_budget(pred, n) if old is not None else float(pred))
        meas.append(float(measured))
        reps.append(int(n))
        labels.append(label)
    if teacher_measured_ms and table.teacher is not None:
        preds.append(table.teacher.ms)
        meas.append(float(teacher_measured_ms))
        reps.append(0)
        labels.append("teacher")
    if not preds:
        raise UsageError(f"nothing to calibrate {str(path)!r} with: no model was measured end to end")
    table = calibrate_table(table, preds, meas, device=device, n_replaced=reps, labels=labels, keep_points=True)
    write_lut(table, path)
    return table


def calibrate_problem(problem: Any, calibration: Calibration | None) -> Any:
    """The search problem in calibrated milliseconds.

    ``a * (T - sum s_i) + b + c * n  =  (a * T + b) - sum (a * s_i - c)``: the calibrated teacher
    is ``a * T + b`` and each candidate saves ``a * s_i - c``, so the model stays additive and
    every strategy, budget and report works in calibrated (measured-like) milliseconds unchanged.
    """
    from dataclasses import replace

    from bespoke.types import SearchProblem

    if calibration is None:
        return problem
    a, b, c = calibration.a, calibration.b, calibration.c
    cands = [replace(cd, saving_ms=a * cd.saving_ms - c) for cd in problem.candidates]
    return SearchProblem(teacher_ms=a * problem.teacher_ms + b, candidates=cands, lam=problem.lam)


@dataclass
class StudentLatency:
    label: str
    predicted_ms: float  # additive, uncalibrated
    measured_ms: float
    calibrated_ms: float | None = None
    n_replaced: int = 0

    @property
    def error(self) -> float:
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms


def measure_students(estimator: LatencyEstimator, students: Sequence[tuple],
                     input_shape: Sequence[int], calibration: Calibration | None = None) -> list[StudentLatency]:
    """Measure assembled students end to end (one interleaved batch) beside their predictions.

    ``students``: ``(label, module, predicted_ms)`` or ``(label, module, predicted_ms, n_replaced)``
    with uncalibrated additive predictions. Feed the result to :func:`calibrate_table`
    (``[s.predicted_ms ...]``, ``[s.measured_ms ...]``, ``n_replaced=[s.n_replaced ...]``).
    """
    queries = [make_query(st[1], input_shape) for st in students]
    ms = estimator.latencies(queries)
    out = []
    for st, q in zip(students, queries):
        label, _, pred = st[:3]
        k = int(st[3]) if len(st) > 3 else 0
        out.append(StudentLatency(label, float(pred), ms[q.key],
                                  calibration.apply(pred, k) if calibration is not None else None, k))
    return out


def _per_round(samples: Sequence[float], rounds: int) -> list[float]:
    """Mean of each round's timed runs (``samples`` in round order, equally many per round)."""
    per = max(1, len(samples) // max(1, rounds))
    return [sum(samples[i:i + per]) / len(samples[i:i + per]) for i in range(0, per * rounds, per)]


def measure_replace_one(reference: "nn.Module", replaced: Sequence[tuple[str, str, str, Any]],
                        estimator: LatencyEstimator, input_shape: Sequence[int], *,
                        chunk: int = 16) -> tuple[dict[str, SavingEntry], list[float]]:
    """In-context savings: the whole ``reference`` (the teacher) against the teacher with one
    segment replaced, all measured end to end.

    ``replaced``: ``(label, segment_key, alternative_key, build)`` where ``build()`` returns the
    whole model with that one replacement (built lazily, ``chunk`` at a time, to bound memory).
    Each chunk is one interleaved call of ``estimator`` that includes the reference. When the
    estimator gives every timed run (``latency_samples``), a saving is the median over rounds of
    the *paired* relative difference ``(ref - alt) / ref`` within one round (drift between rounds
    cancels); otherwise the relative difference of the two medians. Relative savings are turned
    into ms with the reference's median over all chunks, so a chunk timed while the machine was
    slower does not inflate its savings. Returns the savings (keyed by :func:`saving_key`) and
    the reference's median latency in each chunk.
    """
    import statistics

    shape = tuple(int(s) for s in input_shape)
    ref_q = make_query(reference, shape)
    rel: dict[str, tuple[float, str, str, str]] = {}
    refs: list[float] = []
    todo = list(replaced)
    paired = callable(getattr(estimator, "latency_samples", None))
    step = max(1, chunk)
    for lo in range(0, len(todo), step):
        part = todo[lo:lo + step]
        mods = [build() for *_, build in part]
        for m in mods:
            if hasattr(m, "taps_enabled"):
                m.taps_enabled = False
        qs = [make_query(m, shape) for m in mods]
        if paired:
            samples = estimator.latency_samples([ref_q, *qs])
            ref_s = samples[ref_q.key]
            ref = float(statistics.median(ref_s))
        else:
            ms = estimator.latencies([ref_q, *qs])
            ref = float(ms[ref_q.key])
        refs.append(ref)
        for (label, seg_key, alt_key, _), q in zip(part, qs):
            if paired:
                alt_s = samples[q.key]
                rounds = min(len(ref_s), len(alt_s))
                r_ref, r_alt = _per_round(ref_s[:rounds], rounds), _per_round(alt_s[:rounds], rounds)
                value = float(statistics.median((a - b) / a for a, b in zip(r_ref, r_alt) if a > 0))
            else:
                value = (ref - float(ms[q.key])) / ref if ref > 0 else 0.0
            rel[saving_key(seg_key, alt_key)] = (value, seg_key, alt_key, label)
        del mods, qs
    overall = float(statistics.median(refs)) if refs else 0.0
    savings = {k: SavingEntry(ms=v * overall, segment=sk, alternative=ak, label=label, reference_ms=overall)
               for k, (v, sk, ak, label) in rel.items()}
    return savings, refs


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
    partition: Any = None  # the teacher's Partition (to assemble replace-one models)
    segment_infos: dict[str, Any] | None = None  # segment id -> SegmentInfo

    def items(self) -> list[ProfileItem]:
        return list(self.segments.values()) + list(self.alternatives.values())


def house_modules(house: Any, registry: Any, cfg: Any = None, *, batch: int = 1,
                  size: int | None = None) -> HouseModules:
    """Rebuild everything of ``house`` that has a latency (failed alternatives are skipped), at
    input resolution ``size`` (default: the teacher's own)."""
    from bespoke.blocks import Context
    from bespoke.distill import source_for
    from bespoke.models import load_model
    from bespoke.partition import Partition

    if cfg is None:
        from bespoke.config import RunConfig

        cfg = RunConfig()
    t = house.manifest.teacher
    size = int(size or t.input_size)
    model = load_model(t.name, weights=None).eval()
    partition = Partition.from_model(model, (1, 3, t.input_size, t.input_size), name=t.name)
    if size != t.input_size:
        partition = partition.resized(size)
    ctx = Context(partition, t.name, (3, size, size), calibration=None, donor_weights=None, seed=cfg.seed)
    segments: dict[str, ProfileItem] = {}
    infos: dict[str, Any] = {}
    for seg in house.manifest.segments:
        info = partition.segment(seg.start, seg.end)
        shape = (batch, *tuple(info.in_shape)[1:])
        segments[info.id] = ProfileItem(f"segment {info.id}", partition.extract(info), shape, "segment")
        infos[info.id] = info
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
    return HouseModules(teacher, segments, alternatives, alt_segment, skipped, partition, infos)


def house_replace_one(mods: HouseModules, estimator: LatencyEstimator, *, chunk: int = 16) -> dict[str, SavingEntry]:
    """In-context (replace-one) savings of every alternative of a house: the teacher assembled
    with nothing replaced against the teacher assembled with each alternative in place."""
    from bespoke.student import assemble

    part = mods.partition
    if part is None or not mods.segment_infos:
        raise UsageError("replace-one savings need the house's partition (build the modules with house_modules)")
    shape = mods.teacher.input_shape
    reference = assemble(part, [])
    reference.taps_enabled = False
    todo = []
    for alt_id, item in mods.alternatives.items():
        seg_id = mods.alt_segment[alt_id]
        seg_item = mods.segments[seg_id]
        info = mods.segment_infos[seg_id]
        todo.append((alt_id, module_signature(seg_item.module, seg_item.input_shape),
                     module_signature(item.module, item.input_shape),
                     lambda info=info, m=item.module: assemble(part, [(info, m)])))
    savings, _ = measure_replace_one(reference, todo, estimator, shape, chunk=chunk)
    return savings


def profile_house(house: Any, estimator: LatencyEstimator, registry: Any, cfg: Any = None, *,
                  batch: int = 1, in_context: bool | None = None,
                  size: int | None = None) -> tuple[LatencyTable, HouseModules]:
    """Measure every alternative and teacher segment of ``house`` (and the teacher) into a LUT,
    at input resolution ``size`` (default: the teacher's own).

    ``in_context`` (default: the estimator's ``in_context`` option, else off) also measures each
    alternative's replace-one saving end to end (:func:`house_replace_one`): one whole-model
    timing per alternative, which is what makes predictions match measured students.
    """
    mods = house_modules(house, registry, cfg, batch=batch, size=size)
    table = profile_modules(mods.items(), estimator, teacher=mods.teacher,
                            notes={"house": str(getattr(house, "root", "")),
                                   "teacher": house.manifest.teacher.name,
                                   "input_size": int(size or house.manifest.teacher.input_size)})
    if in_context is None:
        in_context = bool(getattr(getattr(estimator, "options", None), "in_context", False))
    if in_context and mods.alternatives:
        table.savings = house_replace_one(mods, estimator)
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
    segment_ms = {k: ms[q.key] for k, q in q_seg.items()}
    alt_ms = {k: ms[q.key] for k, q in q_alt.items()}
    if table is not None and getattr(table, "savings", None):
        alt_ms = in_context_alt_ms(table, segment_ms, alt_ms, {k: q_seg[mods.alt_segment[k]].key for k in q_alt},
                                   {k: q.key for k, q in q_alt.items()}, mods.alt_segment)
    return HouseLatencies(
        teacher_ms=ms[q_teacher.key], segment_ms=segment_ms, alt_ms=alt_ms, device=estimator.device(),
        calibration=getattr(table, "calibration", None),
    )


def table_latencies(table: LatencyTable, teacher_ms: float, segment_ms: dict[str, float],
                    alt_ms: dict[str, float], *, segment_key: dict[str, str], alt_key: dict[str, str],
                    alt_segment: dict[str, str], calibrate: bool = True) -> tuple[float, dict[str, float]]:
    """``(teacher_ms, alt_ms)`` as an additive search should see a LUT's answers: the table's
    in-context savings where it has them, then its calibration folded in (see
    :func:`calibrate_problem`): the teacher becomes ``a*T + b`` and each alternative's latency is
    set so that its saving becomes ``a*s - c``. Budgets and reported latencies are then calibrated.

    ``segment_key``: segment id -> signature; ``alt_key``: alternative id -> signature;
    ``alt_segment``: alternative id -> segment id.
    """
    alt = dict(alt_ms)
    if table.savings:
        alt = in_context_alt_ms(table, segment_ms, alt, {k: segment_key[alt_segment[k]] for k in alt_key},
                                alt_key, alt_segment)
    cal = table.calibration if calibrate else None
    if cal is None:
        return teacher_ms, alt
    out = {}
    for k, v in alt.items():
        seg = segment_ms[alt_segment[k]]
        out[k] = seg - (cal.a * (seg - v) - cal.c)
    return cal.apply(teacher_ms, 0), out


def in_context_alt_ms(table: LatencyTable, segment_ms: dict[str, float], alt_ms: dict[str, float],
                      alt_segment_key: dict[str, str], alt_key: dict[str, str],
                      alt_segment: dict[str, str]) -> dict[str, float]:
    """Alternative latencies that make ``segment ms - alternative ms`` equal the table's
    in-context (replace-one) saving wherever it has one, so additive consumers (the search)
    use in-context savings unchanged. Alternatives without one keep their own latency."""
    out = dict(alt_ms)
    for alt, key in alt_key.items():
        entry = table.savings.get(saving_key(alt_segment_key[alt], key))
        if entry is not None:
            out[alt] = segment_ms[alt_segment[alt]] - entry.ms
    return out


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


_STEADY_ALLOCATOR: bool | None = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def steady_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process, once; True where applied.

    With glibc's default *dynamic* thresholds, what a model's forward pass costs on the CPU
    depends on what the process did before: freed activation buffers above the trim threshold
    go back to the OS and every run faults them in again (measured here, EfficientNet-Lite2 at
    260 px, batch 1: 1.5 million minor page faults in one timing call, 35 ms per run; 4 thousand
    faults and 22 ms once the thresholds are fixed). A process that has trained something
    with large batches has raised the thresholds and runs fast; a fresh one runs slow, so
    latencies measured before and after the model house is built disagree, and large
    models (more activation memory) are hit harder than small ones. Fixed thresholds keep
    freed buffers for reuse, as a long-running server with a tuned allocator (jemalloc,
    tcmalloc) does. Process-wide and not undone (glibc has no getter for the old values).
    Elsewhere (macOS, Windows, musl) it does nothing and returns False.
    """
    global _STEADY_ALLOCATOR
    if _STEADY_ALLOCATOR is not None:
        return _STEADY_ALLOCATOR
    _STEADY_ALLOCATOR = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
            _STEADY_ALLOCATOR = bool(ok)
        except (OSError, AttributeError):
            pass
    return _STEADY_ALLOCATOR


def interleaved_order(n: int, round_index: int) -> list[int]:
    """Round-robin order for one timing round: each round starts one later, so no query always
    runs right after the same neighbour and drift hits every query alike."""
    if n == 0:
        return []
    s = round_index % n
    return list(range(s, n)) + list(range(0, s))


def time_interleaved(runners: Sequence[Any], *, warmup: int, runs: int, warm_per_visit: int = 1,
                     runs_per_visit: int = 1, sync: Any = None, clock: str = "wall",
                     gc_off: bool = True) -> list[list[float]]:
    """Time each ``runners[i]()`` (a zero-argument callable); return every timed run in ms.

    After ``warmup`` untimed rounds, rounds visit the runners round-robin (each round starting one
    later) until each has ``runs`` timed runs. On each visit a runner first runs
    ``warm_per_visit`` times untimed, so its weights are back in the caches as in steady-state
    use (a large model timed right after another one would otherwise run cold), then
    ``runs_per_visit`` timed runs. Drift over the session hits every runner alike.

    ``clock="cpu"`` times the CPU time of the calling thread instead of the wall clock: on a
    machine shared with other work, a single-threaded run's CPU time does not count the time it
    waited for a core. Only meaningful when the work runs on the calling thread (one CPU thread).

    Python's garbage collector is collected once and then off while timing (as :mod:`timeit`
    does): in a process holding millions of objects (a built model house, a data set), its
    collections land inside timed runs and add a fixed cost per run, which inflates the
    latency of small models relative to large ones (``gc_off=False`` keeps it on).
    """
    import gc
    import time

    now = time.thread_time if clock == "cpu" else time.perf_counter
    sync = sync or (lambda: None)
    n = len(runners)
    times: list[list[float]] = [[] for _ in runners]
    was_enabled = gc.isenabled()
    if gc_off:
        gc.collect()
        gc.disable()
    try:
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
    finally:
        if was_enabled:
            gc.enable()
    return times


def summarise_samples(samples: dict[str, list[float]], statistic: str = "median") -> dict[str, float]:
    """One latency per key from its timed runs: the median (robust) or the minimum."""
    summary = min if statistic == "min" else statistics.median
    return {k: float(summary(t)) for k, t in samples.items()}


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
    "HouseLatencies", "HouseModules", "TeacherLatency", "calibrate_table", "calibrate_problem",
    "CalibrationPoint", "SavingEntry", "saving_key", "measure_replace_one", "house_replace_one", "in_context_alt_ms", "table_latencies", "recalibrate_lut", "check_same_device",
    "count_flops", "cpu_name", "error_summary", "fit_calibration", "house_latencies", "house_modules", "interleaved_order", "lut_json_schema", "time_interleaved",
    "make_query", "module_signature", "parse_lut", "predict_latency", "profile_house",
    "profile_modules", "read_lut", "relative_errors", "measure_students", "StudentLatency", "unique_queries", "write_lut",
]
