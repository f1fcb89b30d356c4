"""The cost model of ``vendor-npu``: every figure this plugin answers comes from here.

The device is made up (it stands in for an accelerator we cannot reach) but built the way int8
NPUs are, so that its costs differ in kind from a CPU's. A module's latency is the sum over the
operators it runs, at batch 1, of:

* **Dense convolution and matrix multiply** (``aten.convolution`` with one group, ``mm``,
  ``addmm``): a ``lanes x lanes`` int8 MAC array (default 32 x 32 at 1 GHz, 1.02 TMAC/s). Input
  and output channel counts are padded up to multiples of ``lanes``: cycles =
  ``pad(C_in) * pad(C_out) * k_h * k_w * H_out * W_out / lanes**2``. A layer pruned from 144 to
  108 channels costs what one of 128 does.
* **Depthwise (and grouped) convolution**: output channels map to one side of the array, a
  group's input channels to the other, so a depthwise convolution (one input channel a group)
  fills one lane in ``lanes``: cycles = ``pad(C_in/g) * pad(C_out) * k_h * k_w * H_out * W_out /
  lanes**2``, 32 times its MAC count for a depthwise convolution. On this device the depthwise
  convolutions of an inverted-residual block cost about what its two 1x1 convolutions do.
* **Weights** stream from DRAM once per operator (int8, ``dram_gb_s``, default 8 GB/s).
* **Elementwise work** (adds, multiplies, pooling windows, concatenation) runs on a vector unit
  of ``vector_width`` elements per cycle (default 64); sigmoid, hard-sigmoid, SiLU, GELU and
  softmax go through a lookup table, ``lut_activation_slowdown`` (4) times slower. ReLU, ReLU6
  and clamps are fused into the operator before them (free), as is batch normalisation in
  inference (folded into the convolution's weights by the compiler).
* **Global pooling** (a mean over H and W, adaptive average pooling) adds ``global_pool_us``
  (20 us): a reduction across the array and a round trip. Squeeze-and-excitation blocks pay it.
* **A fixed cost per compute operator**, ``op_overhead_us`` (4 us: dispatch and DMA set-up), for
  every convolution, matrix multiply, pooling and vector operation. Removing a layer saves it;
  narrowing one does not.

Views, reshapes, flattening and other operators that move no data cost nothing. The model is
evaluated by running the module once on zeros under a ``TorchDispatchMode`` that sees every
ATen operator with its shapes, so it covers modules, functional calls and ``torch.fx`` graphs
alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


@dataclass(frozen=True)
class NpuSpec:
    mac_lanes: int = 32
    clock_ghz: float = 1.0
    vector_width: int = 64
    lut_activation_slowdown: float = 4.0
    op_overhead_us: float = 4.0
    global_pool_us: float = 20.0
    dram_gb_s: float = 8.0


FREE = {aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.expand,
        aten.squeeze, aten.unsqueeze, aten.flatten, aten.detach, aten.alias, aten.slice, aten.select,
        aten.clone, aten.contiguous, aten.empty_like, aten.zeros_like, aten.ones_like, aten.zeros, aten.empty,
        aten.relu, aten.relu_, aten.hardtanh, aten.hardtanh_, aten.clamp, aten.clamp_, aten.clamp_min,
        aten.clamp_max, aten._native_batch_norm_legit_no_training, aten.native_batch_norm, aten.batch_norm,
        aten.dropout, aten.native_dropout, aten.lift_fresh, aten.lift_fresh_copy, aten._to_copy,
        aten.copy_, aten.new_empty, aten.new_zeros, aten.sym_size, aten.stride, aten.size, aten.split,
        aten.split_with_sizes, aten.unbind, aten.as_strided}
LUT_ACTIVATIONS = {aten.sigmoid, aten.sigmoid_, aten.hardsigmoid, aten.hardsigmoid_, aten.silu, aten.silu_,
                   aten.gelu, aten.gelu_, aten._softmax, aten.softmax, aten.hardswish, aten.hardswish_,
                   aten.tanh, aten.tanh_, aten.exp, aten._log_softmax}
GLOBAL_POOLS = {aten._adaptive_avg_pool2d, aten.adaptive_avg_pool2d, aten.mean}


def _pad(n: int, lanes: int) -> int:
    return int(math.ceil(max(int(n), 1) / lanes) * lanes)


def _numel(x) -> int:
    return int(x.numel()) if isinstance(x, torch.Tensor) else 0


@dataclass
class _Tally:
    spec: NpuSpec
    seconds: float = 0.0
    ops: dict = field(default_factory=dict)

    def add(self, kind: str, seconds: float) -> None:
        self.seconds += seconds
        self.ops[kind] = self.ops.get(kind, 0.0) + seconds


class _CostMode(TorchDispatchMode):
    def __init__(self, tally: _Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet not in FREE:
            self._cost(packet, args, out)
        return out

    def _cost(self, packet, args, out) -> None:
        s, t = self.tally.spec, self.tally
        array = s.mac_lanes ** 2 * s.clock_ghz * 1e9  # MAC slots per second
        vector = s.vector_width * s.clock_ghz * 1e9
        overhead = s.op_overhead_us * 1e-6
        weights = lambda w: _numel(w) / (s.dram_gb_s * 1e9)  # int8: one byte a weight
        if packet in (aten.convolution, aten._convolution):
            x, w = args[0], args[1]
            groups = int(args[8]) if len(args) > 8 else 1
            c_in, c_out = int(x.shape[1]), int(w.shape[0])
            spatial = math.prod(int(d) for d in out.shape[2:]) * int(out.shape[0])
            kernel = math.prod(int(d) for d in w.shape[2:])
            slots = _pad(c_in // groups, s.mac_lanes) * _pad(c_out, s.mac_lanes) * kernel * spatial
            t.add("depthwise" if groups > 1 else "conv", slots / array + weights(w) + overhead)
        elif packet in (aten.mm, aten.addmm, aten.bmm, aten.matmul, aten.linear):
            a, b = (args[1], args[2]) if packet is aten.addmm else (args[0], args[1])
            m = math.prod(int(d) for d in a.shape[:-1])
            slots = m * _pad(int(a.shape[-1]), s.mac_lanes) * _pad(int(b.shape[-1]), s.mac_lanes)
            t.add("matmul", slots / array + weights(b) + overhead)
        elif packet in GLOBAL_POOLS:
            t.add("global-pool", _numel(args[0]) / vector + s.global_pool_us * 1e-6 + overhead)
        elif packet in LUT_ACTIVATIONS:
            t.add("lut-activation", _numel(out) * s.lut_activation_slowdown / vector + overhead)
        else:  # adds, multiplies, windowed pooling, concatenation, padding: the vector unit
            moved = max(_numel(out), max((_numel(a) for a in args if isinstance(a, torch.Tensor)), default=0))
            t.add("vector", moved / vector + overhead)


@torch.no_grad()
def module_costs(module: torch.nn.Module, input_shape: tuple[int, ...], spec: NpuSpec | None = None) -> dict:
    """Seconds per operator kind (conv, depthwise, matmul, vector, lut-activation, global-pool)
    of ``module`` on an input of ``input_shape``, batch included."""
    tally = _Tally(spec or NpuSpec())
    was = module.training
    module.eval()
    try:
        x = torch.zeros(input_shape)
        with _CostMode(tally):
            module(x)
    finally:
        module.train(was)
    return tally.ops


def module_cost_ms(module: torch.nn.Module, input_shape: tuple[int, ...], spec: NpuSpec | None = None) -> float:
    """Latency of ``module`` on ``vendor-npu`` in milliseconds, by the cost model above."""
    return 1000.0 * sum(module_costs(module, input_shape, spec).values())
