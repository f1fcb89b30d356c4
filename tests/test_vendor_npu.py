"""The vendor-npu example plugin: its documented cost model, checked by hand on small modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "bespoke-latency-vendor-npu"))

from bespoke_latency_vendor_npu import VendorNpuLatency, VendorNpuOptions  # noqa: E402
from bespoke_latency_vendor_npu.cost_model import NpuSpec, module_cost_ms, module_costs  # noqa: E402

from bespoke.api import LatencyQuery, UsageError  # noqa: E402

SPEC = NpuSpec()


def conv_ms(c_in, c_out, k=1, groups=1, hw=16, spec=SPEC):
    return module_cost_ms(nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False), (1, c_in, hw, hw),
                          spec)


def test_channels_pad_to_the_array_width():
    # 100 and 128 output channels fill the same four lane groups; 129 needs a fifth (the
    # weights, streamed at their real size, are left out here)
    compute = NpuSpec(dram_gb_s=1e12, op_overhead_us=0.0)
    assert conv_ms(64, 100, spec=compute) == pytest.approx(conv_ms(64, 128, spec=compute), rel=1e-9)
    assert conv_ms(64, 129, spec=compute) == pytest.approx(conv_ms(64, 160, spec=compute), rel=1e-9)
    assert conv_ms(64, 160, spec=compute) == pytest.approx(1.25 * conv_ms(64, 128, spec=compute), rel=1e-9)


def test_a_dense_convolution_costs_its_padded_macs_plus_weights_and_overhead():
    ms = conv_ms(32, 32, k=3, hw=16)
    slots = 32 * 32 * 9 * 16 * 16
    expected = slots / (32 * 32 * 1e9) + 32 * 32 * 9 / 8e9 + 4e-6
    assert ms == pytest.approx(1000 * expected, rel=1e-6)


def test_depthwise_uses_one_lane_in_32():
    dw = module_costs(nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), (1, 64, 32, 32))
    assert set(dw) == {"depthwise"}
    macs = 64 * 9 * 32 * 32
    assert dw["depthwise"] == pytest.approx(macs * 32 / (1024 * 1e9) + 64 * 9 / 8e9 + 4e-6, rel=1e-6)


def test_relu_and_batchnorm_are_fused_but_sigmoid_and_global_pooling_are_not():
    conv = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()).eval()
    assert module_cost_ms(conv, (1, 32, 8, 8)) == pytest.approx(conv_ms(32, 32, hw=8), rel=1e-6)
    gated = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.Sigmoid()).eval()
    assert module_cost_ms(gated, (1, 32, 8, 8)) > conv_ms(32, 32, hw=8)
    costs = module_costs(nn.AdaptiveAvgPool2d(1), (1, 32, 8, 8))
    assert costs["global-pool"] > SPEC.global_pool_us * 1e-6


def test_fx_graphs_and_functional_ops_are_counted():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.relu(self.conv(x)) + x

    m = Residual().eval()
    gm = torch.fx.symbolic_trace(m)
    a, b = module_costs(m, (1, 16, 8, 8)), module_costs(gm, (1, 16, 8, 8))
    assert a == pytest.approx(b)
    assert "vector" in a  # the residual add


def test_the_estimator_answers_modules_and_refuses_keys_alone():
    est = VendorNpuLatency(VendorNpuOptions(op_overhead_us=0.0))
    assert est.device().precision == "int8"
    q = LatencyQuery(key="k", input_shape=(1, 8, 8, 8), module=nn.Conv2d(8, 8, 1))
    assert est.latencies([q])["k"] > 0
    with pytest.raises(UsageError, match="profile the house"):
        est.latencies([LatencyQuery(key="k", input_shape=(1, 8, 8, 8))])
