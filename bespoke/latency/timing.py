"""Helpers for measuring estimators: steady timing conditions (allocator, garbage collector),
interleaved timing rounds, deduplicated queries, and the CPU's name for DeviceInfo."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Sequence

from bespoke.errors import UsageError
from bespoke.types import LatencyQuery


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), for DeviceInfo.name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


_STEADY_ALLOCATOR: bool | None = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def steady_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process, once; True where applied.

    With glibc's default *dynamic* thresholds, what a model's forward pass costs on the CPU
    depends on what the process did before: freed activation buffers above the trim threshold
    go back to the OS and every run faults them in again (measured here, EfficientNet-Lite2 at
    260 px, batch 1: 1.5 million minor page faults in one timing call, 35 ms per run; 4 thousand
    faults and 22 ms once the thresholds are fixed). A process that has trained something
    with large batches has raised the thresholds and runs fast; a fresh one runs slow, so
    latencies measured before and after the model house is built disagree, and large
    models (more activation memory) are hit harder than small ones. Fixed thresholds keep
    freed buffers for reuse, as a long-running server with a tuned allocator (jemalloc,
    tcmalloc) does. Process-wide and not undone (glibc has no getter for the old values).
    Elsewhere (macOS, Windows, musl) it does nothing and returns False.
    """
    global _STEADY_ALLOCATOR
    if _STEADY_ALLOCATOR is not None:
        return _STEADY_ALLOCATOR
    _STEADY_ALLOCATOR = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
            _STEADY_ALLOCATOR = bool(ok)
        except (OSError, AttributeError):
            pass
    return _STEADY_ALLOCATOR


def interleaved_order(n: int, round_index: int) -> list[int]:
    """Round-robin order for one timing round: each round starts one later, so no query always
    runs right after the same neighbour and drift hits every query alike."""
    if n == 0:
        return []
    s = round_index % n
    return list(range(s, n)) + list(range(0, s))


def time_interleaved(runners: Sequence[Any], *, warmup: int, runs: int, warm_per_visit: int = 1,
                     runs_per_visit: int = 1, sync: Any = None, clock: str = "wall",
                     gc_off: bool = True) -> list[list[float]]:
    """Time each ``runners[i]()`` (a zero-argument callable); return every timed run in ms.

    After ``warmup`` untimed rounds, rounds visit the runners round-robin (each round starting one
    later) until each has ``runs`` timed runs. On each visit a runner first runs
    ``warm_per_visit`` times untimed, so its weights are back in the caches as in steady-state
    use (a large model timed right after another one would otherwise run cold), then
    ``runs_per_visit`` timed runs. Drift over the session hits every runner alike.

    ``clock="cpu"`` times the CPU time of the calling thread instead of the wall clock: on a
    machine shared with other work, a single-threaded run's CPU time does not count the time it
    waited for a core. Only meaningful when the work runs on the calling thread (one CPU thread).

    Python's garbage collector is collected once and then off while timing (as :mod:`timeit`
    does): in a process holding millions of objects (a built model house, a data set), its
    collections land inside timed runs and add a fixed cost per run, which inflates the
    latency of small models relative to large ones (``gc_off=False`` keeps it on).
    """
    import gc
    import time

    now = time.thread_time if clock == "cpu" else time.perf_counter
    sync = sync or (lambda: None)
    n = len(runners)
    times: list[list[float]] = [[] for _ in runners]
    was_enabled = gc.isenabled()
    if gc_off:
        gc.collect()
        gc.disable()
    try:
        for r in range(warmup):
            for i in interleaved_order(n, r):
                runners[i]()
        sync()
        per = max(1, runs_per_visit)
        rounds = -(-runs // per)
        for r in range(rounds):
            for i in interleaved_order(n, r):
                for _ in range(warm_per_visit):
                    runners[i]()
                for _ in range(min(per, runs - len(times[i]))):
                    sync()
                    t0 = now()
                    runners[i]()
                    sync()
                    times[i].append((now() - t0) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return times


def unique_queries(queries: Sequence[LatencyQuery]) -> list[LatencyQuery]:
    """``queries`` without repeated keys (one timing per architecture and shape); each must carry
    its module, since a measuring estimator runs it."""
    seen: dict[str, LatencyQuery] = {}
    for q in queries:
        if q.module is None:
            raise UsageError(
                f"latency query {q.key!r} (input {tuple(q.input_shape)}) has no module; a measuring "
                "estimator needs the module itself (only lut-latency answers from keys alone)"
            )
        seen.setdefault(q.key, q)
    return list(seen.values())
