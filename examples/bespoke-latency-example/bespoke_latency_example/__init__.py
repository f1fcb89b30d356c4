"""An example bespoke device plugin: latencies of one board, read from a packaged lookup table.

A device vendor copies this package, replaces ``lut.json`` with the table that
``bespoke profile HOUSE --plugin measured-latency -o lut.json`` wrote on their board, renames the
estimator, and publishes it (e.g. as ``bespoke-latency-<device>`` on PyPI). Users then run
``bespoke run --plugin example-board-latency``.

It builds on :class:`bespoke.api.LutLatency`, bespoke's public lookup-table estimator, and
needs nothing from ``bespoke_plugins``.
"""

from __future__ import annotations

from importlib import resources

from pydantic import Field

from bespoke.api import PluginOptions, PluginRecord, hookimpl
from bespoke.api import LutLatency, LutLatencyOptions, parse_lut

NAME = "example-board-latency"
LUT_FILE = "lut.json"


class ExampleBoardOptions(PluginOptions):
    allow_fallback: bool = Field(False, description="estimate modules missing from the table from FLOPs, with a warning")


def packaged_table():
    """The LUT shipped inside this package, validated."""
    import json

    text = resources.files(__name__).joinpath(LUT_FILE).read_text(encoding="utf-8")
    return parse_lut(json.loads(text), f"{__name__}/{LUT_FILE}")


def _factory(options: ExampleBoardOptions | None):
    opts = options or ExampleBoardOptions()
    return LutLatency(LutLatencyOptions(allow_fallback=opts.allow_fallback),
                      table=packaged_table(), source=f"{__name__}/{LUT_FILE}", name=NAME)


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(
        name=NAME, category="latency", factory=_factory, options_model=ExampleBoardOptions,
        description="Example board: latencies from the lookup table this package ships",
    ))
