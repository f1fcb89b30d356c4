"""Latency: module signatures, the lookup-table (LUT) format and its estimator, additive
prediction, calibration, and profiling a model house into a LUT.

A LUT answers "how long does this piece take on that device" without measuring. Entries are keyed
by :func:`module_signature`: a hash of the architecture and the input shape, independent of the
weights, so the same alternative rebuilt anywhere finds its entry. Prediction is additive
(teacher latency minus the per-segment savings), preferring in-context (replace-one) savings,
then corrected by a per-device :class:`Calibration`.

Everything public is imported from here; the modules each hold one concern:

- ``signature``: :func:`module_signature`, :func:`make_query` (FLOPs: :mod:`bespoke.counting`)
- ``table``: the LUT's pydantic models, :func:`read_lut` / :func:`write_lut` / :func:`parse_lut`
- ``lut_estimator``: :class:`LutLatency`, the estimator a device plugin builds on
- ``stats``: error summaries, per-round means, weighted least squares
- ``calibration``: fitting and applying the per-device calibration
- ``timing``: interleaved timing and steady conditions for measuring estimators
- ``measure``: modules measured into a LUT, in-context (replace-one) savings
- ``house``: a model house's modules, profiled; :func:`house_latencies` for the search
"""

from bespoke.latency.calibration import (
    MAX_CALIBRATION_POINTS,
    StudentLatency,
    calibrate_problem,
    calibrate_table,
    fit_calibration,
    measure_students,
    recalibrate_lut,
)
from bespoke.latency.house import (
    HouseLatencies,
    HouseModules,
    house_latencies,
    house_modules,
    house_replace_one,
    in_context_alt_ms,
    profile_house,
    table_latencies,
)
from bespoke.latency.lut_estimator import LutLatency, LutLatencyOptions, flops_model
from bespoke.latency.measure import ProfileItem, measure_replace_one, profile_modules
from bespoke.counting import count_flops
from bespoke.latency.signature import make_query, module_signature
from bespoke.latency.stats import (
    ErrorSummary,
    error_summary,
    per_round_means,
    relative_errors,
    summarise_samples,
    weighted_lstsq,
)
from bespoke.latency.table import (
    LUT_SCHEMA_VERSION,
    Calibration,
    CalibrationPoint,
    LatencyTable,
    LutEntry,
    Role,
    SavingEntry,
    TeacherLatency,
    check_same_device,
    lut_json_schema,
    parse_lut,
    predict_latency,
    read_lut,
    saving_key,
    write_lut,
)
from bespoke.latency.timing import cpu_name, interleaved_order, steady_allocator, time_interleaved, unique_queries

_per_round = per_round_means  # the name bespoke.evaluate imports

__all__ = [
    "Calibration", "CalibrationPoint", "ErrorSummary", "HouseLatencies", "HouseModules", "LUT_SCHEMA_VERSION",
    "LatencyTable", "LutEntry", "LutLatency", "LutLatencyOptions", "MAX_CALIBRATION_POINTS", "ProfileItem",
    "Role", "SavingEntry", "StudentLatency", "TeacherLatency",
    "calibrate_problem", "calibrate_table", "check_same_device", "count_flops", "cpu_name", "error_summary",
    "fit_calibration", "flops_model", "house_latencies", "house_modules", "house_replace_one",
    "in_context_alt_ms", "interleaved_order", "lut_json_schema", "make_query", "measure_replace_one",
    "measure_students", "module_signature", "parse_lut", "per_round_means", "predict_latency",
    "profile_house", "profile_modules", "read_lut", "recalibrate_lut", "relative_errors",
    "saving_key", "steady_allocator", "summarise_samples", "table_latencies", "time_interleaved",
    "unique_queries", "weighted_lstsq", "write_lut",
]
