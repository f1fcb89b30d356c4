"""The lookup-table latency estimator: answers from a :class:`LatencyTable`, measures nothing.

Public so that a device vendor's plugin builds on it without importing ``bespoke_plugins``: it
constructs :class:`LutLatency` with the table its package ships (see
``examples/bespoke-latency-example`` and docs/latency.md). The built-in ``lut-latency`` plugin
registers it with a table read from a path.
"""

from __future__ import annotations

import statistics
import warnings
from typing import Callable, Sequence

import numpy as np
from pydantic import Field

from bespoke.errors import UsageError
from bespoke.counting import count_flops
from bespoke.latency.table import LatencyTable, read_lut
from bespoke.types import DeviceInfo, LatencyQuery, PluginOptions


class LutLatencyOptions(PluginOptions):
    path: str | None = Field(None, description="latency table (JSON) written by `bespoke profile`")
    allow_fallback: bool = Field(
        False, description="estimate entries missing from the table from FLOPs (with a warning) instead of failing")
    expect_device: str | None = Field(None, description="refuse the table unless its device name is this")
    expect_runtime: str | None = Field(None, description="refuse the table unless its runtime is this (e.g. onnxruntime-cpu)")


class LutLatency:
    """A :class:`bespoke.types.LatencyEstimator` that reads answers from a LUT.

    ``table``: the :class:`LatencyTable` to answer from (default: read from ``options.path``);
    ``source``: where it came from, for messages; ``name``: the plugin name messages tell the
    user to configure (a vendor's plugin passes its own).

    ``table`` is public: the search and reports use its teacher latency, in-context savings and
    calibration. ``estimated`` lists, after each call, the keys that were not in the table and
    were estimated (``allow_fallback``).
    """

    def __init__(self, options: LutLatencyOptions | None = None, *, table: LatencyTable | None = None,
                 source: str | None = None, name: str = "lut-latency"):
        self.options = options or LutLatencyOptions()
        self.name = name
        if table is None:
            if not self.options.path:
                raise UsageError(
                    f"{name} needs a table: set plugin_options.{name}.path to a LUT file "
                    "(write one with `bespoke profile HOUSE --plugin measured-latency -o lut.json`)")
            table = read_lut(self.options.path)
            source = source or self.options.path
        self.table = table
        self.source = source or "(in memory)"
        self.estimated: list[str] = []
        o, d = self.options, table.device
        wrong = []
        if o.expect_device is not None and d.name != o.expect_device:
            wrong.append(f"device name: table has {d.name!r}, expected {o.expect_device!r}")
        if o.expect_runtime is not None and d.runtime != o.expect_runtime:
            wrong.append(f"runtime: table has {d.runtime!r}, expected {o.expect_runtime!r}")
        if wrong:
            raise UsageError(f"latency table {self.source!r} is from another device or runtime:\n  "
                             + "\n  ".join(wrong))

    def device(self) -> DeviceInfo:
        return self.table.device

    def latencies(self, queries: Sequence[LatencyQuery]) -> dict[str, float]:
        out: dict[str, float] = {}
        missing: list[LatencyQuery] = []
        for q in queries:
            ms = self.table.get_ms(q.key)
            if ms is None:
                missing.append(q)
            else:
                out[q.key] = ms
        self.estimated = []
        if not missing:
            return out
        if not self.options.allow_fallback:
            lines = [f"{q.key} ({_what(q)})" for q in missing]
            raise UsageError(
                f"latency table {self.source!r} has no entry for {len(missing)} module(s):\n  "
                + "\n  ".join(lines)
                + "\nProfile them on the device (`bespoke profile HOUSE --plugin measured-latency -o lut.json`), "
                f"or set plugin_options.{self.name}.allow_fallback: true to estimate missing entries from FLOPs."
            )
        out.update(self._fallback(missing))
        return out

    def _fallback(self, missing: Sequence[LatencyQuery]) -> dict[str, float]:
        """Estimate from FLOPs: ms = c + k * flops fitted on the table's entries (k > 0, c >= 0),
        or ms proportional to FLOPs with fewer than three usable entries."""
        known = [(e.flops, e.ms) for e in self.table.entries.values() if e.flops and e.flops > 0]
        if not known:
            raise UsageError(
                f"latency table {self.source!r} records no FLOPs, so the {len(missing)} missing "
                "entries cannot be estimated; profile them on the device instead")
        model, how = flops_model(known)
        out: dict[str, float] = {}
        notes = []
        for q in missing:
            if q.module is None:
                raise UsageError(f"latency table {self.source!r} has no entry for {q.key} and the query "
                                 "carries no module to count FLOPs of; profile it on the device")
            flops = count_flops(q.module, q.input_shape)
            if flops is None:
                raise UsageError(f"latency table {self.source!r} has no entry for {q.key} ({_what(q)}), "
                                 "and its FLOPs could not be counted; profile it on the device")
            ms = model(flops)
            out[q.key] = ms
            self.estimated.append(q.key)
            notes.append(f"{q.key} ({_what(q)}): {flops / 1e6:.2f} MFLOPs -> {ms:.3f} ms")
        warnings.warn(
            f"{self.name}: {len(missing)} latencies are not in {self.source!r} and were ESTIMATED by "
            f"{how} from {len(known)} table entries (allow_fallback is on):\n  " + "\n  ".join(notes),
            stacklevel=2,
        )
        return out


def _what(q: LatencyQuery) -> str:
    kind = type(q.module).__name__ if q.module is not None else "no module"
    return f"{kind} on input {tuple(q.input_shape)}"


def flops_model(points: Sequence[tuple[float, float]]) -> tuple[Callable[[float], float], str]:
    """``(predict(flops) -> ms, how)`` from ``(flops, ms)`` pairs: a least-squares line
    ``c + k * flops`` when there are three or more points and it is plausible (``k > 0``,
    ``c >= 0``), else ms proportional to FLOPs (the median ms per FLOP)."""
    ratio = statistics.median(ms / f for f, ms in points)
    proportional = (lambda f: ratio * f, f"FLOPs-proportional scaling ({ratio * 1e6:.4f} ms per MFLOP, median over entries)")
    if len(points) < 3:
        return proportional
    flops = np.array([f for f, _ in points], dtype=float)
    ms = np.array([m for _, m in points], dtype=float)
    (c, k), _, rank, _ = np.linalg.lstsq(np.column_stack([np.ones_like(flops), flops]), ms, rcond=None)
    if rank < 2 or k <= 0 or c < 0:  # all entries alike, or a line no device follows
        return proportional
    c, k = float(c), float(k)
    return (lambda f: c + k * f,
            f"a linear fit on FLOPs (ms = {c:.4f} + {k * 1e6:.4f} * MFLOPs, least squares over entries)")
