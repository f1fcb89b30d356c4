"""The plugin contract: every name a plugin needs, importable from one public module.

A plugin (built-in or third-party) imports from here and nowhere else in ``bespoke``::

    from bespoke.api import PluginRecord, SearchProblem, Solution, finalize, hookimpl

Everything listed in ``__all__`` is documented field by field in ``docs/plugins.md`` and stays
stable; the stage modules behind it (``bespoke.search``, ``bespoke.blocks``, ...) may move.

- Registration: :data:`hookimpl`, :class:`PluginRecord`, :class:`PluginOptions`.
- Block sources: :class:`BlockSource`, :class:`BlockContext`, :class:`SegmentInfo`,
  :class:`AlternativeSpec`, and helpers to build alternatives (:func:`fit_linear_adapter`,
  :func:`linear_adapter`, :func:`identity_adapter`, :func:`run_batched`,
  :func:`observe_inputs`, :func:`count_parameters`).
- Distillation losses: :class:`DistillLoss`.
- Latency estimators: :class:`LatencyEstimator`, :class:`LatencyQuery`, :class:`DeviceInfo`; a
  device's lookup table as an estimator (:class:`LutLatency`, :class:`LutLatencyOptions`,
  :func:`parse_lut`, :func:`read_lut`), and the timing helpers measuring estimators share
  (:func:`time_interleaved`, :func:`summarise_samples`, :func:`unique_queries`,
  :func:`steady_allocator`, :func:`cpu_name`).
- Search strategies: :class:`SearchStrategy`, :class:`SearchProblem`, :class:`Candidate`,
  :class:`Solution`, and the helpers that build a strategy's result (:func:`finalize`,
  :func:`make_solution`, :func:`top_k`) or solve parts of the problem (:func:`conflicts`,
  :func:`greedy_solution`, :func:`improve`, :func:`optimum`, :func:`exact_front`,
  :func:`pareto_of`, :func:`problem_fingerprint`).
- Errors: :class:`UsageError` (bad input a user can fix), :class:`BespokeError` (their base).
- :class:`RunConfig`: the run's configuration (read-only for plugins; e.g. its defaults).
"""

from __future__ import annotations

from bespoke.blocks import (count_parameters, fit_linear_adapter, identity_adapter, linear_adapter,
                            observe_inputs, refit_pointwise, run_batched)
from bespoke.config import RunConfig
from bespoke.errors import BespokeError, UsageError
from bespoke.hookspecs import hookimpl
from bespoke.latency import (LutLatency, LutLatencyOptions, cpu_name, parse_lut, read_lut, steady_allocator,
                             summarise_samples, time_interleaved, unique_queries)
from bespoke.search import (conflicts, exact_front, finalize, greedy_solution, improve, make_solution,
                            optimum, pareto_of, problem_fingerprint, top_k)
from bespoke.types import (AlternativeSpec, BlockContext, BlockSource, Candidate, DeviceInfo, DistillLoss,
                           LatencyEstimator, LatencyQuery, PluginOptions, PluginRecord, SearchProblem,
                           SearchStrategy, SegmentInfo, Solution)

__all__ = [
    # registration
    "hookimpl", "PluginRecord", "PluginOptions",
    # block sources
    "BlockSource", "BlockContext", "SegmentInfo", "AlternativeSpec",
    "count_parameters", "fit_linear_adapter", "identity_adapter", "linear_adapter", "observe_inputs",
    "refit_pointwise",
    "run_batched",
    # distillation losses
    "DistillLoss",
    # latency estimators
    "LatencyEstimator", "LatencyQuery", "DeviceInfo",
    "LutLatency", "LutLatencyOptions", "parse_lut", "read_lut",
    "time_interleaved", "summarise_samples", "unique_queries", "steady_allocator", "cpu_name",
    # search strategies
    "SearchStrategy", "SearchProblem", "Candidate", "Solution",
    "finalize", "make_solution", "top_k", "conflicts", "greedy_solution", "improve", "optimum",
    "exact_front", "pareto_of", "problem_fingerprint",
    # errors and configuration
    "BespokeError", "UsageError", "RunConfig",
]
