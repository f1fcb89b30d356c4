"""The latency lookup-table (LUT) format: its pydantic models, and reading, writing and
validating it.

A LUT stores absolute milliseconds per module (each teacher segment and alternative timed alone,
keyed by :func:`bespoke.latency.module_signature`) and, optionally, **in-context savings**
(:class:`SavingEntry`): the whole teacher timed with one segment replaced ("replace-one"), which
captures what timing a piece alone misses (boundary and cache effects, per op overhead).
Prediction is additive (teacher latency minus the per-segment savings), corrected by a
per-device :class:`Calibration` fitted from students measured end to end:
``calibrated = a * predicted + b + c * n_replaced``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bespoke.errors import UsageError
from bespoke.types import DeviceInfo

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
