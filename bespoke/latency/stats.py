"""Statistics over latencies: one figure from timed runs, how far predictions are from
measurements, and the weighted least squares the calibration fits with."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np


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
    if not n:  # nothing to summarise: every figure is undefined rather than an error
        return ErrorSummary(n=0, median=math.nan, p95=math.nan, max=math.nan,
                            within_5pct=math.nan, within_10pct=math.nan)
    return ErrorSummary(
        # numpy's default quantile interpolates linearly between order statistics
        n=n, median=float(statistics.median(errs)), p95=float(np.quantile(errs, 0.95)), max=max(errs),
        within_5pct=sum(e <= 0.05 for e in errs) / n, within_10pct=sum(e <= 0.10 for e in errs) / n,
    )


def summarise_samples(samples: dict[str, list[float]], statistic: str = "median") -> dict[str, float]:
    """One latency per key from its timed runs: the median (robust) or the minimum."""
    summary = min if statistic == "min" else statistics.median
    return {k: float(summary(t)) for k, t in samples.items()}


def per_round_means(samples: Sequence[float], rounds: int) -> list[float]:
    """Mean of each round's timed runs (``samples`` in round order, equally many per round)."""
    per = max(1, len(samples) // max(1, rounds))
    return [sum(samples[i:i + per]) / len(samples[i:i + per]) for i in range(0, per * rounds, per)]


def weighted_lstsq(rows: Sequence[Sequence[float]], ys: Sequence[float],
                   ws: Sequence[float]) -> list[float] | None:
    """Minimise ``sum w * (row . x - y)^2``; None when the columns are linearly dependent (no
    unique solution, e.g. predictions all alike)."""
    X = np.asarray(rows, dtype=float)
    sw = np.sqrt(np.asarray(ws, dtype=float))
    sol, _, rank, _ = np.linalg.lstsq(X * sw[:, None], np.asarray(ys, dtype=float) * sw, rcond=None)
    if rank < X.shape[1]:
        return None
    return [float(v) for v in sol]
