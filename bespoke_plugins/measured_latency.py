"""Times modules in PyTorch on this device (median of interleaved runs)."""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from bespoke.api import DeviceInfo, LatencyQuery, PluginOptions, PluginRecord, UsageError, hookimpl


NAME = "measured-latency"


class MeasuredLatencyOptions(PluginOptions):
    threads: int = Field(1, ge=1, description="torch CPU threads while timing (fixed, so numbers compare)")
    warmup: int = Field(10, ge=0, description="untimed runs of every module first")
    runs: int = Field(50, ge=1, description="timed runs of every module; the median is reported")
    batch: int = Field(1, ge=1, description="batch size timed (replaces the batch of each query's input shape)")
    warm_per_visit: int = Field(1, ge=0, description="untimed runs each time a module's turn comes round (steady-state caches)")
    runs_per_visit: int = Field(1, ge=1, description="timed runs per turn")
    clock: Literal["wall", "cpu"] = Field(
        "wall", description="wall: elapsed time; cpu: CPU time of the timing thread (threads: 1 on cpu only), which ignores waiting for a core on a shared machine")
    device: Literal["cpu", "cuda"] = "cpu"
    statistic: Literal["median", "min"] = Field(
        "median", description="summary of the timed runs: median (default), or min, which resists other load on a shared machine")
    in_context: bool = Field(
        False, description="`bespoke profile` also measures each alternative's saving in context: the whole teacher with that one segment replaced, end to end (one whole-model timing per alternative; predictions then match measured students far better)")
    steady_allocator: bool = Field(
        True, description="fix glibc malloc's mmap/trim thresholds before timing (bespoke.latency.steady_allocator), so freed activations are reused rather than faulted in again on every run and a model times the same early in a process and after a build or training; process-wide; no effect off glibc")
    device_name: str | None = Field(None, description="name written into the DeviceInfo (default: the CPU or GPU model)")


class MeasuredLatency:
    """PyTorch eager timing: fixed threads, warm-up, interleaved timed runs, median."""

    def __init__(self, options: MeasuredLatencyOptions | None = None):
        self.options = options or MeasuredLatencyOptions()
        if self.options.clock == "cpu" and (self.options.threads != 1 or self.options.device != "cpu"):
            raise UsageError(f"{NAME}: clock = 'cpu' times one CPU thread; it needs threads: 1 and device: cpu "
                             f"(got threads: {self.options.threads}, device: {self.options.device})")
        if self.options.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("measured-latency: device = 'cuda' but torch sees no CUDA GPU; use device: cpu")

    def device(self) -> DeviceInfo:
        from bespoke.api import cpu_name

        o = self.options
        if o.device_name:
            name = o.device_name
        elif o.device == "cuda":
            import torch

            name = torch.cuda.get_device_name()
        else:
            name = cpu_name()
        return DeviceInfo(name=name, runtime=f"torch-eager-{o.device}", threads=o.threads,
                          batch=o.batch, precision="fp32")

    def latencies(self, queries: Sequence[LatencyQuery]) -> dict[str, float]:
        from bespoke.api import summarise_samples

        return summarise_samples(self.latency_samples(queries), self.options.statistic)

    def latency_samples(self, queries: Sequence[LatencyQuery]) -> dict[str, list[float]]:
        """Every timed run (ms) per distinct key, in round order: the i-th runs of two modules
        were timed in the same interleaved round (used for paired differences)."""
        import torch

        from bespoke.api import steady_allocator, time_interleaved, unique_queries

        o = self.options
        if o.steady_allocator:
            steady_allocator()
        todo = unique_queries(queries)
        if not todo:
            return {}
        dev = torch.device(o.device)
        cuda = dev.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        mods = [q.module.eval().to(dev) for q in todo]
        xs = [torch.randn((o.batch, *tuple(q.input_shape)[1:]), device=dev) for q in todo]
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(o.threads)
        try:
            with torch.inference_mode():
                runners = [lambda m=m, x=x: m(x) for m, x in zip(mods, xs)]
                times = time_interleaved(runners, warmup=o.warmup, runs=o.runs, warm_per_visit=o.warm_per_visit,
                                         runs_per_visit=o.runs_per_visit, sync=sync, clock=o.clock)
        finally:
            torch.set_num_threads(prev_threads)
        return {q.key: list(t) for q, t in zip(todo, times)}


def _factory(options):
    return MeasuredLatency(options)


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(name="measured-latency", category="latency", factory=_factory,
                          options_model=MeasuredLatencyOptions,
                          description="Times modules in PyTorch on this device (median of interleaved runs)"))
