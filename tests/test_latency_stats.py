"""bespoke.latency's statistics and fits (library code now) give the figures the hand-written
medians, quantiles and Gauss-Jordan gave; lookup tables are written atomically."""

from __future__ import annotations

import math
import os

import pytest
from torch import nn

from bespoke.latency import (
    LatencyTable, LutEntry, LutLatency, LutLatencyOptions, error_summary, fit_calibration, flops_model,
    make_query, read_lut, weighted_lstsq, write_lut,
)
from test_latency import device, small_table

# Eight students, noisy: every term of the fit matters. The expected figures are what the
# hand-written weighted normal equations (Gauss-Jordan) gave before numpy replaced them.
PRED = [20.0, 18.0, 15.0, 17.0, 12.0, 19.0, 14.0, 16.0]
REPS = [1, 2, 4, 3, 6, 1, 5, 2]
MEAS = [18.7, 18.2, 16.9, 17.1, 15.6, 18.9, 15.8, 17.0]


def test_calibration_fit_matches_the_known_fit():
    cal = fit_calibration(PRED, MEAS, REPS)
    assert (cal.a, cal.b, cal.c) == pytest.approx((0.33311155424174754, 12.295414873358673, -0.16218963183533805),
                                                  rel=1e-9)
    assert cal.median_abs_rel_error_before == pytest.approx(0.06417112299465243, rel=1e-12)
    assert cal.median_abs_rel_error_after == pytest.approx(0.01783433632100958, rel=1e-9)
    two = fit_calibration(PRED[:4], MEAS[:4])  # a and b only
    assert (two.a, two.b, two.c) == pytest.approx((0.3858853418510315, 10.963610864007881, 0.0), rel=1e-9)
    scale = fit_calibration(PRED[:2], MEAS[:2])  # too few: a scale only
    assert (scale.a, scale.b) == pytest.approx((0.9700834465846331, 0.0), rel=1e-12)


def test_weighted_least_squares_weights_rows_and_refuses_dependent_columns():
    rows = [(1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]
    assert weighted_lstsq(rows, [1.0, 2.0, 4.0], [1.0, 1.0, 1.0]) == pytest.approx([1.5, -2 / 3])
    # the third point weighted heavily pulls the line through it
    heavy = weighted_lstsq(rows, [1.0, 2.0, 4.0], [1.0, 1.0, 1e6])
    assert heavy[0] * 3 + heavy[1] == pytest.approx(4.0, abs=1e-5)
    assert weighted_lstsq([(5.0, 1.0)] * 3, [1.0, 2.0, 3.0], [1.0] * 3) is None  # predictions all alike


def test_error_summary_median_and_95th_percentile():
    s = error_summary(PRED, MEAS)
    assert s.n == 8 and s.median == pytest.approx(0.06417112299465243, rel=1e-12)
    assert s.p95 == pytest.approx(0.18987341772151894, rel=1e-12)  # linear between order statistics
    assert s.max == pytest.approx(0.23076923076923075) and (s.within_5pct, s.within_10pct) == (0.375, 0.625)
    assert error_summary([1.0, 3.0], [2.0, 2.0]).median == 0.5  # even count: the mean of the middle two
    empty = error_summary([], [])
    assert empty.n == 0 and all(math.isnan(v) for k, v in empty.as_dict().items() if k != "n")


def test_flops_model_fits_a_line_or_falls_back_to_proportional():
    predict, how = flops_model([(100.0, 1.5), (300.0, 3.5), (500.0, 5.5)])
    assert "linear fit" in how and predict(200.0) == pytest.approx(2.5)
    predict, how = flops_model([(100.0, 1.0), (300.0, 3.0)])  # two points: proportional
    assert "proportional" in how and predict(200.0) == pytest.approx(2.0)
    predict, how = flops_model([(100.0, 1.0), (100.0, 2.0), (100.0, 3.0)])  # all alike: no line
    assert "proportional" in how and predict(100.0) == pytest.approx(2.0)
    predict, how = flops_model([(100.0, 5.0), (300.0, 3.0), (500.0, 1.0)])  # slower when smaller: no line
    assert "proportional" in how


def test_lut_fallback_estimates_a_missing_module_from_the_fitted_line():
    table = LatencyTable(device=device(), entries={
        "sig-a": LutEntry(ms=1.5, flops=100.0), "sig-b": LutEntry(ms=3.5, flops=300.0),
        "sig-c": LutEntry(ms=5.5, flops=500.0)})
    est = LutLatency(LutLatencyOptions(allow_fallback=True), table=table, name="myboard-latency")
    q = make_query(nn.Linear(10, 10), (1, 10))  # 2 * 10 * 10 = 200 FLOPs
    with pytest.warns(UserWarning, match="myboard-latency(.|\n)*linear fit"):
        assert est.latencies([q])[q.key] == pytest.approx(2.5)
    assert est.estimated == [q.key]


def test_lut_is_written_atomically(tmp_path, monkeypatch):
    path = write_lut(small_table(), tmp_path / "lut.json")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)  # dies between writing the new table and renaming it
    changed = small_table().model_copy(update={"notes": {"run": 2}})
    with pytest.raises(OSError, match="disk gone"):
        write_lut(changed, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and read_lut(path) == small_table()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lut.json"]  # no temporary file left
    write_lut(changed, path)
    assert read_lut(path).notes == {"run": 2}
