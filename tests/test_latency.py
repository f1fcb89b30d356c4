"""Latency: signatures, the LUT format (round trip, validation, device refusal), calibration, the
measured / ONNX Runtime / LUT estimators, `bespoke profile`, and the example device plugin.

Tiny modules, few timed runs; no timing is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from bespoke import DeviceInfo, LatencyQuery, UsageError
from bespoke.latency import (
    LatencyTable, LutEntry, ProfileItem, TeacherLatency, calibrate_table, error_summary,
    fit_calibration, house_latencies, house_modules, make_query, module_signature, predict_latency,
    profile_modules, read_lut, write_lut,
)
from bespoke.plugins import load_registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bespoke-latency-example"
FAST = {"runs": 3, "warmup": 1}

TEACHER_SOURCE = '''
from torch import nn

def block(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())

class LatTiny(nn.Module):
    """Two identical residual-free blocks (b2, b3): their segments share one LUT entry."""
    def __init__(self):
        super().__init__()
        self.stem = block(3, 8, 2)
        self.b1 = block(8, 16, 2)
        self.b2 = block(16, 16)
        self.b3 = block(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.head(x.mean((2, 3)))

def make():
    return LatTiny()
'''


def block(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU()).eval()


def device(**over) -> DeviceInfo:
    base = dict(name="Test CPU", runtime="torch-eager-cpu", threads=1, batch=1, precision="fp32")
    base.update(over)
    return DeviceInfo(**base)


def small_table() -> LatencyTable:
    return LatencyTable(
        device=device(),
        teacher=TeacherLatency(key="sig-teacher", ms=10.0, label="teacher"),
        entries={"sig-a": LutEntry(ms=2.0, label="segment 1-2", role="segment", flops=2e6),
                 "sig-b": LutEntry(ms=0.5, label="alt", role="alternative", flops=4e5),
                 "sig-c": LutEntry(ms=1.0, label="alt2", role="alternative", flops=9e5)},
    )


# ---- signatures -----------------------------------------------------------------------------


def test_signature_is_weight_independent_and_shape_dependent():
    a, b = block(8, 8), block(8, 8)
    with torch.no_grad():
        b[0].weight.mul_(3.0)
    assert module_signature(a, (1, 8, 16, 16)) == module_signature(b, (1, 8, 16, 16))
    assert module_signature(a, (1, 8, 16, 16)) != module_signature(a, (1, 8, 8, 8))
    assert module_signature(a, (1, 8, 16, 16)) != module_signature(block(8, 16), (1, 8, 16, 16))
    strided = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
    assert module_signature(a, (1, 8, 16, 16)) != module_signature(strided, (1, 8, 16, 16))
    assert module_signature(a, (1, 8, 16, 16)).startswith("sig-")


def test_identical_segments_extracted_from_different_places_share_a_key(tmp_path, monkeypatch):
    from bespoke.partition import Partition

    model = _teacher_module(tmp_path, monkeypatch)
    part = Partition.from_model(model, (1, 3, 32, 32))
    segs = [s for s in part.enumerate_segments(1)]
    keys = [module_signature(part.extract(s), s.in_shape) for s in segs]
    # b2 and b3 are the same architecture on the same shape: their pieces share keys.
    assert len(set(keys)) < len(keys)


# ---- the LUT format -------------------------------------------------------------------------


def test_lut_write_read_round_trip(tmp_path):
    table = small_table()
    path = write_lut(table, tmp_path / "lut.json")
    again = read_lut(path)
    assert again == table
    assert again.get_ms("sig-teacher") == 10.0 and again.get_ms("sig-b") == 0.5
    assert again.predict([2.0 - 0.5]) == pytest.approx(8.5)


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d.pop("device"), "device"),
    (lambda d: d["entries"]["sig-a"].update(ms=-1), "entries.sig-a.ms"),
    (lambda d: d["entries"]["sig-a"].update(millis=3), "entries.sig-a.millis"),
    (lambda d: d["device"].update(threads="many"), "device.threads"),
    (lambda d: d.update(schema_version=99), "schema_version = 99"),
    (lambda d: d.pop("schema_version"), "schema_version is missing"),
])
def test_lut_validation_errors_name_file_key_and_reason(tmp_path, mutate, expect):
    data = json.loads(small_table().model_dump_json())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError) as err:
        read_lut(path)
    msg = str(err.value)
    assert "bad.json" in msg and expect in msg


def test_lut_that_is_not_json_or_missing_is_clear(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 1,\n "device": ')
    with pytest.raises(UsageError, match=r"broken.json.*not valid JSON \(line 2"):
        read_lut(path)
    with pytest.raises(UsageError, match="does not exist"):
        read_lut(tmp_path / "nope.json")


def test_lut_from_another_device_or_runtime_is_refused(tmp_path):
    path = write_lut(small_table(), tmp_path / "lut.json")
    read_lut(path, device=device())  # same device: fine
    with pytest.raises(UsageError, match=r"another device or runtime(.|\n)*runtime: table has 'torch-eager-cpu', this run uses 'onnxruntime-cpu'"):
        read_lut(path, device=device(runtime="onnxruntime-cpu"))
    with pytest.raises(UsageError, match="name: table has 'Test CPU'"):
        read_lut(path, device=device(name="Jetson Orin"))
    with pytest.raises(UsageError, match="another device"):
        calibrate_table(small_table(), [9.0, 8.0], [9.5, 8.3], device=device(threads=4))
    reg = load_registry()
    with pytest.raises(UsageError, match="expected 'onnxruntime-cpu'"):
        reg.instantiate("lut-latency", {"path": str(path), "expect_runtime": "onnxruntime-cpu"})


# ---- prediction and calibration -------------------------------------------------------------


def test_additive_prediction_and_calibration_fit():
    assert predict_latency(10.0, [1.0, 2.5]) == pytest.approx(6.5)
    pred = [5.0, 6.0, 7.0, 8.0, 9.0]
    meas = [0.9 * p + 0.4 for p in pred]
    cal = fit_calibration(pred, meas)
    assert cal.a == pytest.approx(0.9) and cal.b == pytest.approx(0.4)
    assert cal.median_abs_rel_error_after == pytest.approx(0.0, abs=1e-9)
    table = calibrate_table(small_table(), pred, meas, device=device())
    assert table.predict([1.5]) == pytest.approx(0.9 * 8.5 + 0.4)
    assert table.predict([1.5], calibrated=False) == pytest.approx(8.5)
    one = fit_calibration([4.0], [5.0])  # one student: a scale only
    assert one.a == pytest.approx(1.25) and one.b == 0.0
    s = error_summary([1.0, 2.0], [1.0, 2.5])
    assert s.median == pytest.approx(0.1) and s.within_5pct == 0.5
    noisy = fit_calibration([5.0, 6.0, 7.0], [9.0, 6.0, 5.0])  # a negative slope is never kept
    assert noisy.a > 0 and noisy.b == 0.0
    # steep and offset far below zero (noisy timings of tiny models): it would predict a negative
    # latency for a prediction of 1 ms, so only a scale is kept
    steep = fit_calibration([1.0, 1.2, 1.4], [0.05, 0.45, 0.85])
    assert steep.b == 0.0 and steep.apply(1.0, 0) > 0


def test_students_measured_end_to_end_beside_predictions():
    from bespoke.latency import measure_students

    est = load_registry().instantiate("measured-latency", FAST)
    students = [("s1", nn.Sequential(block(3, 8), block(8, 8)), 1.0), ("s2", block(3, 8), 0.5)]
    out = measure_students(est, students, (1, 3, 16, 16), calibration=fit_calibration([1.0], [2.0]))
    assert [s.label for s in out] == ["s1", "s2"] and all(s.measured_ms > 0 for s in out)
    assert out[0].calibrated_ms == pytest.approx(2.0) and out[1].error >= 0


# ---- estimators -----------------------------------------------------------------------------


def _queries():
    return [make_query(block(3, 8), (1, 3, 16, 16)), make_query(block(8, 8), (1, 8, 16, 16)),
            make_query(block(8, 8), (1, 8, 16, 16))]  # a duplicate key: measured once


def test_timing_is_interleaved_with_a_warm_run_per_turn():
    from bespoke.latency import time_interleaved

    log = []
    runners = [lambda i=i: log.append(i) for i in range(3)]
    times = time_interleaved(runners, warmup=1, runs=4, warm_per_visit=1, runs_per_visit=2)
    assert [len(t) for t in times] == [4, 4, 4]
    assert log[:3] == [0, 1, 2]  # the warm-up round
    # then turns of (1 untimed + 2 timed) runs, each round starting one module later
    assert log[3:] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2, 0, 0, 0]


_CHURN = """
import ctypes, resource, sys
from bespoke.latency import steady_allocator
if sys.argv[1] == "steady":
    assert steady_allocator() and steady_allocator()  # applied, and a second call is a no-op
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def forward():  # a forward pass: buffers of a few MiB, held together, then all freed
    bufs = [libc.malloc(4 << 20) for _ in range(8)]
    for b in bufs:
        libc.memset(b, 1, 4 << 20)
    for b in bufs:
        libc.free(b)

for _ in range(3):
    forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"),
                    reason="glibc malloc only")
def test_steady_allocator_stops_freed_buffers_being_faulted_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, steady = faults("default"), faults("steady")
    # default glibc: the 32 MiB freed at the top of the heap goes back to the OS, and each of
    # the 20 passes faults its 8192 pages in again; fixed thresholds keep them
    assert default > 20 * 4096
    assert steady < default / 20


def test_measured_latency_fixes_the_allocator_unless_told_not_to(monkeypatch):
    import bespoke.api as api  # where the built-in estimators take it from

    calls = []
    monkeypatch.setattr(api, "steady_allocator", lambda *a, **k: calls.append(1) or True)
    reg = load_registry()
    q = make_query(nn.Conv2d(3, 4, 3), (1, 3, 8, 8))
    reg.instantiate("measured-latency", {"warmup": 0, "runs": 1}, category="latency").latencies([q])
    assert calls == [1]
    reg.instantiate("measured-latency", {"warmup": 0, "runs": 1, "steady_allocator": False},
                    category="latency").latencies([q])
    assert calls == [1]


def test_timing_turns_the_garbage_collector_off_and_back_on():
    import gc

    from bespoke.latency import time_interleaved

    seen = []
    time_interleaved([lambda: seen.append(gc.isenabled())], warmup=1, runs=2)
    assert seen == [False] * 5 and gc.isenabled()  # 1 warm-up, then 2 turns of 1 untimed + 1 timed
    seen.clear()
    time_interleaved([lambda: seen.append(gc.isenabled())], warmup=0, runs=2, gc_off=False)
    assert seen == [True] * 4
    gc.disable()
    try:  # a caller that had it off keeps it off
        time_interleaved([lambda: None], warmup=0, runs=1)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_measured_latency_runs_on_tiny_modules():
    est = load_registry().instantiate("measured-latency", {**FAST, "threads": 1})
    qs = _queries()
    ms = est.latencies(qs)
    assert set(ms) == {q.key for q in qs} and all(v > 0 for v in ms.values())
    d = est.device()
    assert d.runtime == "torch-eager-cpu" and d.threads == 1 and d.batch == 1
    with pytest.raises(UsageError, match="needs the module"):
        est.latencies([LatencyQuery(key="sig-x", input_shape=(1, 3, 8, 8))])
    cpu_clock = load_registry().instantiate("measured-latency", {**FAST, "clock": "cpu", "statistic": "min"})
    assert all(v > 0 for v in cpu_clock.latencies(qs[:1]).values())
    with pytest.raises(UsageError, match="threads: 1"):
        load_registry().instantiate("measured-latency", {"clock": "cpu", "threads": 2})
    with pytest.raises(UsageError, match=r"plugin_options.measured-latency(.|\n)*runs"):
        load_registry().instantiate("measured-latency", {"runs": 0})


def test_onnxruntime_latency_runs_on_tiny_modules(tmp_path):
    pytest.importorskip("onnxruntime")
    est = load_registry().instantiate("onnxruntime-latency", {**FAST, "cache_dir": str(tmp_path)})
    qs = _queries()
    ms = est.latencies(qs)
    assert set(ms) == {q.key for q in qs} and all(v > 0 for v in ms.values())
    assert est.device().runtime == "onnxruntime-cpu"
    assert len(list(tmp_path.glob("*.onnx"))) == 2  # exported once per signature, cached
    est.latencies(qs[:1])
    assert len(list(tmp_path.glob("*.onnx"))) == 2


def test_lut_latency_answers_from_the_table_and_names_missing_entries(tmp_path):
    items = [ProfileItem("a", block(3, 8), (1, 3, 16, 16), "segment"),
             ProfileItem("b", block(8, 8), (1, 8, 16, 16), "alternative"),
             ProfileItem("c", block(8, 16), (1, 8, 16, 16), "alternative")]
    measured = load_registry().instantiate("measured-latency", FAST)
    table = profile_modules(items, measured, teacher=ProfileItem("t", nn.Sequential(block(3, 8), block(8, 8)), (1, 3, 16, 16), "teacher"))
    path = write_lut(table, tmp_path / "lut.json")
    est = load_registry().instantiate("lut-latency", {"path": str(path)})
    assert est.device() == measured.device()
    qs = [make_query(i.module, i.input_shape) for i in items]
    assert est.latencies(qs) == {q.key: table.entries[q.key].ms for q in qs}
    missing = make_query(block(8, 4), (1, 8, 16, 16))
    with pytest.raises(UsageError, match=rf"no entry for 1 module(.|\n)*{missing.key} \(Sequential on input \(1, 8, 16, 16\)\)(.|\n)*allow_fallback"):
        est.latencies(qs + [missing])
    lenient = load_registry().instantiate("lut-latency", {"path": str(path), "allow_fallback": True})
    with pytest.warns(UserWarning, match=rf"ESTIMATED(.|\n)*{missing.key}"):
        ms = lenient.latencies(qs + [missing])
    assert ms[missing.key] > 0 and lenient.estimated == [missing.key]
    with pytest.raises(UsageError, match="needs a table"):
        load_registry().instantiate("lut-latency", {})


# ---- bespoke profile on a tiny house --------------------------------------------------------


def _teacher_module(tmp_path, monkeypatch):
    (tmp_path / "lat_tiny_teacher.py").write_text(TEACHER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("lat_tiny_teacher")
    return mod.make().eval()


def _tiny_house(tmp_path, monkeypatch):
    from bespoke.house import AlternativeRecord, House, SegmentRecord, TeacherInfo
    from bespoke.partition import Partition
    from bespoke.types import AlternativeSpec

    model = _teacher_module(tmp_path, monkeypatch)
    part = Partition.from_model(model, (1, 3, 32, 32))
    house = House.create(tmp_path / "house", TeacherInfo(name="lat_tiny_teacher:make", weights=None, input_size=32))
    for seg in part.enumerate_segments(2):
        house.manifest.segments.append(SegmentRecord(**seg.model_dump()))
        if tuple(seg.in_shape[1:]) == tuple(seg.out_shape[1:]):
            spec = AlternativeSpec(source="skip", kind="skip", label="skip")
            house.manifest.alternatives.append(AlternativeRecord(id=f"{seg.id}.skip", segment=seg.id, source="skip",
                                                                 spec=spec, status="trained"))
    house.save()
    assert house.manifest.alternatives, "the tiny teacher should offer skippable segments"
    return house


def test_profile_house_round_trip_gives_the_same_answers(tmp_path, monkeypatch):
    from bespoke import pipeline
    from bespoke.config import RunConfig

    house = _tiny_house(tmp_path, monkeypatch)
    reg = load_registry()
    cfg = RunConfig(house=str(house.root), plugins={"latency": "measured-latency"},
                    plugin_options={"measured-latency": FAST})
    out = tmp_path / "lut.json"
    from rich.console import Console

    table = pipeline.profile(cfg, reg, out, console=Console(file=open(os.devnull, "w")))
    again = read_lut(out)
    assert again == table and again.teacher is not None
    assert {e.role for e in again.entries.values()} == {"segment", "alternative"}
    # The LUT plugin answers every latency of the house exactly as profiled.
    lut = reg.instantiate("lut-latency", {"path": str(out)})
    mods = house_modules(house, reg, cfg)  # what profile timed: random weights, rebuilt from specs
    lat = house_latencies(house, mods.partition, lut, lambda rec: mods.alternatives[rec.id].module)
    assert lat.teacher_ms == table.teacher.ms
    assert set(lat.segment_ms) == {s.id for s in house.manifest.segments}
    assert set(lat.alt_ms) == {a.id for a in house.manifest.alternatives}
    for ms in list(lat.segment_ms.values()) + list(lat.alt_ms.values()):
        assert ms in {e.ms for e in table.entries.values()}
    # A table-only estimator cannot profile.
    cfg_lut = cfg.model_copy(update={"plugins": cfg.plugins.model_copy(update={"latency": "lut-latency"}),
                                     "plugin_options": {"lut-latency": {"path": str(out)}}})
    with pytest.raises(UsageError, match="measures"):
        pipeline.profile(cfg_lut, reg, tmp_path / "other.json")


def test_cli_profile(tmp_path, monkeypatch, cli):
    house = _tiny_house(tmp_path, monkeypatch)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = cli("profile", "--help")
    assert r.returncode == 0 and "--output" in r.stdout
    out = tmp_path / "cli-lut.json"
    r = cli("profile", str(house.root), "-o", str(out), "--plugin", "measured-latency", "--threads", "1", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert read_lut(out).device.threads == 1
    r = cli("profile", str(tmp_path / "no-house"), "-o", str(out), env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr


# ---- the example device plugin --------------------------------------------------------------


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    """pip-installs examples/bespoke-latency-example into a private target directory (the shared
    venv stays untouched); subprocesses see it through PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("example-plugin")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"pip could not install the example plugin here: {r.stderr.strip()[-300:]}")
    return {"PYTHONPATH": os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_example_plugin_is_discovered(example_installed, cli):
    r = cli("plugins", "--json", env=example_installed)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    row = rows["example-board-latency"]
    assert row["category"] == "latency" and row["distribution"] == "bespoke-latency-example"
    assert row["version"] == "0.1.0"


def test_example_plugin_answers_through_plugin_selection(example_installed, tmp_path):
    code = textwrap.dedent(f"""
        import importlib.util, json
        from bespoke.config import load_config, apply_plugin_flags, check_plugin_selection
        from bespoke.latency import make_query
        from bespoke.plugins import load_registry
        spec = importlib.util.spec_from_file_location("make_lut", {str(EXAMPLE / "make_lut.py")!r})
        make_lut = importlib.util.module_from_spec(spec); spec.loader.exec_module(make_lut)
        reg = load_registry()
        cfg = apply_plugin_flags(load_config(None), ["example-board-latency"], reg)
        check_plugin_selection(cfg, reg)
        est = reg.instantiate(cfg.plugins.latency, cfg.plugin_options.get(cfg.plugins.latency), category="latency")
        items, teacher = make_lut.demo_items()
        qs = [make_query(i.module, i.input_shape) for i in items + [teacher]]
        print(json.dumps({{"selected": cfg.plugins.latency, "device": est.device().name,
                          "ms": est.latencies(qs), "teacher": qs[-1].key}}))
    """)
    env = dict(os.environ, **example_installed)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    packaged = read_lut(EXAMPLE / "bespoke_latency_example" / "lut.json")
    assert out["selected"] == "example-board-latency"
    assert out["device"] == packaged.device.name
    assert out["ms"][out["teacher"]] == packaged.teacher.ms
    assert all(v == packaged.get_ms(k) for k, v in out["ms"].items())
    # The CLI takes it with --plugin too: `profile` refuses it by name, since a table cannot measure.
    r = subprocess.run([sys.executable, "-m", "bespoke", "profile", str(tmp_path), "-o", str(tmp_path / "x.json"),
                        "--plugin", "example-board-latency"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "example-board-latency" in r.stderr and "lookup table" in r.stderr


# ---- in-context savings, the per-replacement calibration, calibration in use -------------------


def test_calibration_with_a_per_replacement_term_and_its_inverse():
    from bespoke.latency import Calibration

    pred = [20.0, 18.0, 15.0, 17.0, 12.0, 19.0, 14.0, 16.0]
    reps = [1, 2, 4, 3, 6, 1, 5, 2]
    meas = [0.9 * p + 1.5 + 0.25 * k for p, k in zip(pred, reps)]
    cal = fit_calibration(pred, meas, reps)
    assert (cal.a, cal.b, cal.c) == pytest.approx((0.9, 1.5, 0.25))
    assert cal.median_abs_rel_error_after == pytest.approx(0.0, abs=1e-9) and len(cal.points) == 8
    assert cal.apply(10.0, 2) == pytest.approx(0.9 * 10 + 1.5 + 0.5)
    # calibrated <= budget  <=>  raw <= raw_budget(budget)
    assert cal.apply(cal.raw_budget(12.0, 3), 3) == pytest.approx(12.0)
    # without n_replaced, or with every student replacing as many segments: no c
    assert fit_calibration(pred, meas).c == 0.0
    assert fit_calibration(pred, meas, [2] * 8).c == 0.0
    table = calibrate_table(small_table(), pred, meas, device=device(), n_replaced=reps)
    assert table.predict([1.5, 0.5]) == pytest.approx(0.9 * 8.0 + 1.5 + 0.25 * 2)
    assert table.predict([1.5, 0.5], n_replaced=0) == pytest.approx(0.9 * 8.0 + 1.5)
    assert Calibration().apply(7.0) == 7.0


def test_calibrate_table_keeps_earlier_points_when_asked():
    first = calibrate_table(small_table(), [8.0, 9.0, 7.0], [9.0, 10.0, 8.0], n_replaced=[1, 1, 2])
    again = calibrate_table(first, [6.0], [7.0], n_replaced=[3], keep_points=True)
    assert again.calibration.n == 4 and [p.predicted for p in again.calibration.points] == [8.0, 9.0, 7.0, 6.0]
    fresh = calibrate_table(first, [6.0], [7.0], n_replaced=[3])
    assert fresh.calibration.n == 1


def test_in_context_savings_are_preferred_and_round_trip(tmp_path):
    from bespoke.latency import SavingEntry, saving_key

    table = small_table()
    assert table.saving_ms("sig-a", "sig-b") == pytest.approx(1.5)  # alone: 2.0 - 0.5
    table.savings[saving_key("sig-a", "sig-b")] = SavingEntry(ms=1.2, segment="sig-a", alternative="sig-b",
                                                              reference_ms=10.1, label="a->b")
    assert table.saving_ms("sig-a", "sig-b") == pytest.approx(1.2)
    assert table.saving_ms("sig-a", "sig-b", in_context=False) == pytest.approx(1.5)
    assert table.saving_ms("sig-a", "sig-c") == pytest.approx(1.0)  # no in-context entry: alone
    assert table.saving_ms("sig-a", "sig-zz") is None
    write_lut(table, tmp_path / "t.json")
    assert read_lut(tmp_path / "t.json") == table


def test_version_1_tables_are_read_and_other_versions_refused(tmp_path):
    data = json.loads(small_table().model_dump_json(exclude_none=True))
    data["schema_version"] = 1
    data["calibration"] = {"a": 0.9, "b": 0.5, "n": 4}
    (tmp_path / "v1.json").write_text(json.dumps(data))
    t = read_lut(tmp_path / "v1.json")
    assert t.schema_version == 2 and t.calibration.c == 0.0 and t.predict([1.0]) == pytest.approx(0.9 * 9 + 0.5)
    data["schema_version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="schema_version = 3.*reads version 2.*regenerate"):
        read_lut(tmp_path / "v3.json")


class _FakeEstimator:
    """Latency = a fixed number per module class count: deterministic, nothing timed."""

    def __init__(self, ms_of):
        self.ms_of = ms_of
        self.calls = []

    def device(self):
        return device()

    def latencies(self, queries):
        self.calls.append(len(queries))
        return {q.key: self.ms_of(q.module) for q in queries}


def test_replace_one_savings_are_differences_measured_beside_the_teacher():
    from bespoke.latency import measure_replace_one, saving_key

    def ms_of(m):  # 1 ms per conv
        return float(sum(isinstance(x, nn.Conv2d) for x in m.modules()))

    teacher = nn.Sequential(block(3, 8), block(8, 8), block(8, 8), block(8, 8))
    todo = [(f"drop{i}", f"sig-seg{i}", "sig-id", (lambda i=i: nn.Sequential(*[b for j, b in enumerate(teacher) if j != i])))
            for i in range(1, 4)]
    est = _FakeEstimator(ms_of)
    savings, refs = measure_replace_one(teacher, todo, est, (1, 3, 16, 16), chunk=2)
    assert est.calls == [3, 2]  # the teacher in every chunk
    assert refs == [4.0, 4.0]
    assert savings[saving_key("sig-seg2", "sig-id")].ms == pytest.approx(1.0)
    assert savings[saving_key("sig-seg2", "sig-id")].reference_ms == 4.0


def test_calibration_folded_into_the_search_problem_is_exact():
    import itertools

    from bespoke.latency import Calibration, calibrate_problem
    from bespoke.search import build_problem

    problem = build_problem(20.0, {"0-1": 3.0, "1-2": 4.0, "2-3": 2.0},
                            {"x": "0-1", "y": "1-2", "z": "2-3"}, {"x": 1.0, "y": 1.5, "z": 0.5},
                            {"x": 0.1, "y": 0.2, "z": 0.1})
    cal = Calibration(a=0.8, b=2.0, c=0.3)
    calp = calibrate_problem(problem, cal)
    for k in range(4):
        for chosen in itertools.combinations(range(3), k):
            assert calp.latency(chosen) == pytest.approx(cal.apply(problem.latency(chosen), k))
    assert calibrate_problem(problem, None) is problem


def test_table_latencies_apply_in_context_savings_and_calibration():
    import itertools

    from bespoke.latency import Calibration, SavingEntry, saving_key, table_latencies

    table = small_table()
    table.savings[saving_key("sig-a", "sig-b")] = SavingEntry(ms=1.2, segment="sig-a", alternative="sig-b")
    seg_ms = {"0-1": 2.0, "1-2": 2.0}
    alt_ms = {"b": 0.5, "c": 1.0}
    kw = dict(segment_key={"0-1": "sig-a", "1-2": "sig-a"}, alt_key={"b": "sig-b", "c": "sig-c"},
              alt_segment={"b": "0-1", "c": "1-2"})
    t, alt = table_latencies(table, 10.0, seg_ms, alt_ms, **kw)
    assert t == 10.0 and alt == {"b": pytest.approx(0.8), "c": 1.0}
    table.calibration = Calibration(a=0.9, b=1.0, c=0.2)
    t, alt = table_latencies(table, 10.0, seg_ms, alt_ms, **kw)
    raw_save = {"b": 1.2, "c": 1.0}
    for k in range(3):
        for chosen in itertools.combinations("bc", k):
            cal_pred = t - sum(seg_ms[kw["alt_segment"][x]] - alt[x] for x in chosen)
            raw = 10.0 - sum(raw_save[x] for x in chosen)
            assert cal_pred == pytest.approx(table.calibration.apply(raw, k))


def test_recalibrate_lut_inverts_the_calibration_the_search_used(tmp_path):
    from bespoke.latency import Calibration, recalibrate_lut

    table = small_table()
    table.calibration = Calibration(a=2.0, b=1.0, c=0.0, n=1)
    path = write_lut(table, tmp_path / "lut.json")
    # the search predicted 2 * raw + 1; raw predictions 8 and 7, measured 9 and 8; the teacher 11
    got = recalibrate_lut(path, device(), [("s1", 17.0, 1, 9.0), ("s2", 15.0, 2, 8.0), ("s3", 15.0, 2, None)],
                          teacher_measured_ms=11.0)
    pts = got.calibration.points
    assert [(p.label, p.predicted, p.n_replaced) for p in pts] == [("s1", 8.0, 1), ("s2", 7.0, 2), ("teacher", 10.0, 0)]
    assert got.calibration.apply(8.0, 1) == pytest.approx(9.0)  # measured = raw + 1
    assert read_lut(path) == got
    with pytest.raises(UsageError, match="another device"):
        recalibrate_lut(path, device(runtime="onnxruntime-cpu"), [("s1", 17.0, 1, 9.0)])


def test_profile_in_context_and_calibration_reach_the_search(tmp_path, monkeypatch):
    """`bespoke profile` with in_context measures replace-one savings; the run stage's calibration
    lands in the LUT; the search then reads in-context, calibrated latencies."""
    from types import SimpleNamespace

    from rich.console import Console

    from bespoke import pipeline
    from bespoke.config import RunConfig
    from bespoke.stages.profile import calibrate_lut
    from bespoke.stages.search import house_latencies as search_latencies

    house = _tiny_house(tmp_path, monkeypatch)
    for rec in house.manifest.alternatives:  # the search loads trained alternatives' weights
        house.save_weights(rec.id, nn.Identity())
    reg = load_registry()
    quiet = Console(file=open(os.devnull, "w"))
    cfg = RunConfig(house=str(house.root), plugins={"latency": "measured-latency"},
                    plugin_options={"measured-latency": {**FAST, "in_context": True}})
    out = tmp_path / "latency.json"
    table = pipeline.profile(cfg, reg, out, console=quiet)
    # one saving per distinct (segment, alternative) architecture pair: identical pairs share one
    assert 0 < len(table.savings) <= len(house.manifest.alternatives)
    assert all(s.how == "replace-one" and s.reference_ms > 0 for s in table.savings.values())
    search_cfg = cfg.model_copy(update={"plugins": cfg.plugins.model_copy(update={"latency": "lut-latency"}),
                                        "plugin_options": {"lut-latency": {"path": str(out)}}})
    t0, seg0, alt0, _ = search_latencies(search_cfg, reg, house.root, quiet)
    in_context = sorted(s.ms for s in table.savings.values())
    for rec in house.manifest.alternatives:  # the search's savings are the in-context ones
        assert min(abs(seg0[rec.segment] - alt0[rec.id] - ms) for ms in in_context) < 1e-9
    # The run stage measured two students and the teacher: the LUT gets calibrated...
    alts = [a.id for a in house.manifest.alternatives]
    made = [SimpleNamespace(name="student-0.5", plan={"latency_ms": t0 - 1.0, "choices": [{"alternative": alts[0]}]}),
            SimpleNamespace(name="student-0.8", plan={"latency_ms": t0 - 0.5, "choices": []})]
    measured = {"teacher": 1.1 * t0, "student-0.5": 1.1 * (t0 - 1.0), "student-0.8": 1.1 * (t0 - 0.5)}
    stage = SimpleNamespace(latency_device=table.device)
    cal_table = calibrate_lut(search_cfg, stage, made, measured, out, quiet)
    assert cal_table is not None and read_lut(out).calibration == cal_table.calibration
    assert cal_table.calibration.a == pytest.approx(1.1)
    # ... and the next search predicts in calibrated milliseconds.
    t1, seg1, alt1, _ = search_latencies(search_cfg, reg, house.root, quiet)
    assert t1 == pytest.approx(cal_table.calibration.apply(t0))
    for a in alt1:
        assert seg1[house.alternative(a).segment] - alt1[a] == pytest.approx(1.1 * (seg0[house.alternative(a).segment] - alt0[a]))
    # A table the run did not write (a device plugin's) is left alone.
    assert calibrate_lut(search_cfg, stage, made, measured, tmp_path / "other.json", quiet) is None


def test_replace_one_pairs_runs_of_the_same_round_when_the_estimator_gives_them():
    from bespoke.latency import measure_replace_one, saving_key

    class Drifting(_FakeEstimator):
        """Every round is slower than the last (a machine getting busier): medians of separate
        runs would mix rounds, paired relative differences do not."""

        def latency_samples(self, queries):
            self.calls.append(len(queries))
            return {q.key: [self.ms_of(q.module) * (1 + 0.5 * r) for r in range(5)] for q in queries}

    def ms_of(m):
        return float(sum(isinstance(x, nn.Conv2d) for x in m.modules()))

    teacher = nn.Sequential(block(3, 8), block(8, 8), block(8, 8), block(8, 8))
    todo = [("drop1", "sig-seg1", "sig-id", lambda: nn.Sequential(teacher[0], teacher[2], teacher[3]))]
    savings, refs = measure_replace_one(teacher, todo, Drifting(ms_of), (1, 3, 16, 16))
    # relative saving 1/4 of the teacher's median (4 ms * 2.0 in the middle round)
    assert refs == [8.0] and savings[saving_key("sig-seg1", "sig-id")].ms == pytest.approx(0.25 * 8.0)


def test_measure_ratios_pairs_rounds_and_falls_back_to_medians():
    from bespoke.evaluate import measure_ratios

    teacher, small = nn.Sequential(block(3, 8), block(8, 8)), nn.Sequential(block(3, 8))
    runs = {2: [10.0, 20.0, 30.0], 1: [15.0, 8.0, 12.0]}  # per round: 1.5, 0.4, 0.4 of the teacher

    class Paired(_FakeEstimator):
        def latency_samples(self, queries):
            return {q.key: runs[sum(isinstance(x, nn.Conv2d) for x in q.module.modules())] for q in queries}

    models = {"teacher": teacher, "small": small}
    ms, ratios = measure_ratios(models, (1, 3, 16, 16), Paired(None))
    # the median of the per-round ratios, not the ratio of the medians (12 / 20 = 0.6)
    assert ratios == {"teacher": 1.0, "small": pytest.approx(0.4)} and ms == {"teacher": 20.0, "small": 12.0}

    medians = _FakeEstimator(lambda m: 10.0 * sum(isinstance(x, nn.Conv2d) for x in m.modules()))
    ms, ratios = measure_ratios(models, (1, 3, 16, 16), medians)  # no timed runs given: medians
    assert ratios == {"teacher": 1.0, "small": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="reference 'base'"):
        measure_ratios(models, (1, 3, 16, 16), medians, reference="base")


def test_measure_ratios_pairwise_times_each_model_beside_the_reference_alone():
    from bespoke.evaluate import measure_ratios

    teacher = nn.Sequential(block(3, 8), block(8, 8), block(8, 8), block(8, 8))
    half, quarter = nn.Sequential(block(3, 8), block(8, 8)), nn.Sequential(block(3, 8))
    calls = []

    class Crowded(_FakeEstimator):
        """Every model runs slower the more models share a call (caches), the teacher included."""
        def latency_samples(self, queries):
            calls.append(len(queries))
            crowd = 1.0 + 0.25 * (len(queries) - 2)
            convs = lambda q: sum(isinstance(x, nn.Conv2d) for x in q.module.modules())
            return {q.key: [(5.0 * convs(q) + (0 if convs(q) == 4 else 2.0 * crowd)) * r for r in (1.0, 1.1, 0.9)]
                    for q in queries}

    models = {"half": half, "teacher": teacher, "quarter": quarter}
    shapes = {"teacher": (1, 3, 16, 16), "half": (1, 3, 16, 16), "quarter": (1, 3, 8, 8)}
    _, together = measure_ratios(models, shapes, Crowded(None))
    assert calls == [3]
    calls.clear()
    ms, pairs = measure_ratios(models, shapes, Crowded(None), pairwise=True)
    assert calls == [2, 2] and list(ms) == ["half", "teacher", "quarter"]
    # in pairs: (10 + 2) / 20 and (5 + 2) / 20; all three in one call: +0.5 ms of crowding each
    assert pairs == {"half": pytest.approx(0.6), "teacher": 1.0, "quarter": pytest.approx(0.35)}
    assert together["half"] == pytest.approx(12.5 / 20) and ms["teacher"] == pytest.approx(20.0)
    calls.clear()
    assert measure_ratios({"teacher": teacher, "half": half}, (1, 3, 16, 16), Crowded(None),
                          pairwise=True)[1]["half"] == pytest.approx(0.6) and calls == [2]
