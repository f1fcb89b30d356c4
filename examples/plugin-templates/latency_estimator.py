"""A latency estimator: times each module with torch on this CPU, the queries interleaved so a
drift in the machine's speed touches all of them alike; the median of the timed runs, in ms."""

import statistics
import time

import torch
from pydantic import Field

from bespoke.api import DeviceInfo, PluginOptions, PluginRecord, UsageError, hookimpl


class TimerOptions(PluginOptions):
    runs: int = Field(5, ge=1, description="timed runs per query")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (the run's --threads fills it)")


class Timer:
    def __init__(self, options: TimerOptions):
        self.options = options

    def device(self):
        return DeviceInfo(name="this-cpu", runtime="torch-eager",
                          threads=self.options.threads or torch.get_num_threads())

    def latencies(self, queries):
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        todo = {q.key: q for q in queries}  # one query per key, however often it is asked
        if any(q.module is None for q in todo.values()):
            raise UsageError("template-timer measures modules; it has no table for module-less queries")
        samples = {key: [] for key in todo}
        with torch.no_grad():
            inputs = {key: torch.randn(q.input_shape) for key, q in todo.items()}
            for key, q in todo.items():
                q.module.eval()(inputs[key])  # warm-up
            for _ in range(self.options.runs):
                for key, q in todo.items():
                    t0 = time.perf_counter()
                    q.module(inputs[key])
                    samples[key].append((time.perf_counter() - t0) * 1000.0)
        return {key: statistics.median(s) for key, s in samples.items()}


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(name="template-timer", category="latency", factory=Timer,
                          options_model=TimerOptions, description="torch eager timing on this CPU (template)"))
