"""Answers from a published latency lookup table; measures nothing.

The estimator is :class:`bespoke.latency.LutLatency`; this plugin registers it as
``lut-latency``, reading the table from ``plugin_options.lut-latency.path``. Device plugins
build on the same public class with their own packaged table (see
``examples/bespoke-latency-example`` and docs/latency.md).
"""

from __future__ import annotations

from bespoke.api import PluginRecord, hookimpl
from bespoke.api import LutLatency, LutLatencyOptions

NAME = "lut-latency"


def _factory(options: LutLatencyOptions | None) -> LutLatency:
    return LutLatency(options, name=NAME)


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(name=NAME, category="latency", factory=_factory,
                          options_model=LutLatencyOptions,
                          description="Answers from a published latency lookup table; measures nothing"))
