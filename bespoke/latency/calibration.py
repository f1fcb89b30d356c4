"""Calibration: fitting, per device, the correction from additive predictions to what students
measure end to end (``a * predicted + b + c * n_replaced``), storing it in a lookup table, and
folding it into the search problem."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from bespoke.errors import UsageError
from bespoke.latency.signature import make_query
from bespoke.latency.stats import error_summary, weighted_lstsq
from bespoke.latency.table import Calibration, CalibrationPoint, LatencyTable, read_lut, write_lut
from bespoke.types import DeviceInfo, LatencyEstimator


def fit_calibration(predicted: Sequence[float], measured: Sequence[float],
                    n_replaced: Sequence[int] | None = None, *,
                    labels: Sequence[str | None] | None = None) -> Calibration:
    """Least-squares ``measured ~ a * predicted + b + c * n_replaced`` over students measured end
    to end (``predicted``: uncalibrated additive predictions).

    Relative errors are what users judge, so each point is weighted by 1/measured (the fit
    minimises the squared *relative* residuals). The per-replacement term ``c`` is fitted when
    ``n_replaced`` is given, there are at least six students and they replace different numbers of
    segments; otherwise ``c = 0``. With fewer than three students, predictions all alike, or a
    fitted slope that is not positive, or offsets that would take more than half of a point's
    scaled prediction (noise on small models; it could predict a negative latency), only a scale
    is fitted (``b = c = 0``), so the correction never reverses the order of two predictions with
    the same number of replacements.
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
    def sane(a: float, b: float, c: float) -> bool:
        # positive slope, and offsets that never take more than half of any point's scaled
        # prediction (noisy timings of small models can fit a large negative intercept, which
        # would predict a negative latency for the teacher or a cheap student)
        return a > 0 and all(b + c * k >= -0.5 * a * p for p, k in zip([*predicted, min(predicted)], [*reps, 0]))

    if n >= 6 and len(set(reps)) >= 2:
        sol = weighted_lstsq([(p, 1.0, k) for p, k in zip(predicted, reps)], measured, w)
        if sol is not None and sane(*sol):
            a, b, c = sol
    if a is None and n >= 3:
        sol = weighted_lstsq([(p, 1.0) for p in predicted], measured, w)
        if sol is not None and sane(sol[0], sol[1], 0.0):
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
    queries = [make_query(st[1], input_shape, as_shipped=True) for st in students]
    ms = estimator.latencies(queries)
    out = []
    for st, q in zip(students, queries):
        label, _, pred = st[:3]
        k = int(st[3]) if len(st) > 3 else 0
        out.append(StudentLatency(label, float(pred), ms[q.key],
                                  calibration.apply(pred, k) if calibration is not None else None, k))
    return out
