"""A bespoke device plugin for ``vendor-npu``, an int8 neural accelerator we cannot reach.

A vendor that cannot let users time their board publishes what its compiler knows instead: a
cost model. This package is that, for a made-up but plausible NPU, and it is documented in full
in :mod:`bespoke_latency_vendor_npu.cost_model` so its figures can be checked by hand. Its
costs differ in kind from a CPU's: a 32x32 int8 MAC array that pads every channel count to a
multiple of 32 (pruning 144 channels to 108 saves what 160 -> 128 saves), depthwise
convolutions that use one lane in 32, sigmoid-like activations and global pooling paid on a
slow vector unit with a round trip, and a fixed cost per operator.

The workflow it stands in for (docs/latency.md, "One house, several devices")::

    bespoke profile HOUSE --plugin vendor-npu -o npu.lut.json     # the vendor's table
    bespoke search HOUSE --plugin lut-latency ...                  # any number of searches on it

It registers one latency estimator, ``vendor-npu``, built on bespoke's public API only.
"""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from bespoke.api import DeviceInfo, LatencyQuery, PluginOptions, PluginRecord, UsageError, hookimpl

from bespoke_latency_vendor_npu.cost_model import NpuSpec, module_cost_ms

NAME = "vendor-npu"


class VendorNpuOptions(PluginOptions):
    mac_lanes: int = Field(32, ge=1, description="the MAC array is mac_lanes x mac_lanes int8 lanes; channel counts pad to multiples of it")
    clock_ghz: float = Field(1.0, gt=0, description="array and vector-unit clock")
    vector_width: int = Field(64, ge=1, description="elements per cycle of the vector unit (adds, multiplies, pooling)")
    lut_activation_slowdown: float = Field(4.0, ge=1, description="sigmoid, hard-sigmoid, SiLU, GELU, softmax: this many times an add per element")
    op_overhead_us: float = Field(4.0, ge=0, description="fixed cost of each compute operator (dispatch, DMA set-up), microseconds")
    global_pool_us: float = Field(20.0, ge=0, description="extra cost of each global pooling (a reduction and a round trip), microseconds")
    dram_gb_s: float = Field(8.0, gt=0, description="DRAM bandwidth for weights (int8; streamed once per operator at batch 1), GB/s")


class VendorNpuLatency:
    """Latencies of ``vendor-npu`` from its cost model: deterministic, no device needed."""

    def __init__(self, options: VendorNpuOptions | None = None):
        self.options = options or VendorNpuOptions()
        self.spec = NpuSpec(**self.options.model_dump())

    def device(self) -> DeviceInfo:
        return DeviceInfo(name="vendor-npu (cost model)", runtime="vendor-npu-int8", threads=1, batch=1,
                          precision="int8")

    def latencies(self, queries: Sequence[LatencyQuery]) -> dict[str, float]:
        out = {}
        for q in queries:
            if q.module is None:
                raise UsageError(f"{NAME}: query {q.key!r} has no module; the cost model reads a module's "
                                 "operators, so it cannot answer from a key alone (profile the house with "
                                 "`bespoke profile HOUSE --plugin vendor-npu -o npu.lut.json`, then search "
                                 "with --plugin lut-latency)")
            out[q.key] = module_cost_ms(q.module, tuple(q.input_shape), self.spec)
        return out


def _factory(options: VendorNpuOptions | None):
    return VendorNpuLatency(options)


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(
        name=NAME, category="latency", factory=_factory, options_model=VendorNpuOptions,
        description="vendor-npu (int8 accelerator): latencies from its documented cost model",
    ))
