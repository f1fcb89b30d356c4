"""Exports modules to ONNX and times them with ONNX Runtime (median of interleaved runs)."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field

from bespoke.api import DeviceInfo, LatencyQuery, PluginOptions, PluginRecord, UsageError, hookimpl


NAME = "onnxruntime-latency"


class OnnxRuntimeLatencyOptions(PluginOptions):
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads (fixed, so numbers compare)")
    warmup: int = Field(10, ge=0, description="untimed runs of every module first")
    runs: int = Field(50, ge=1, description="timed runs of every module; the median is reported")
    batch: int = Field(1, ge=1, description="batch size timed (replaces the batch of each query's input shape)")
    warm_per_visit: int = Field(1, ge=0, description="untimed runs each time a module's turn comes round (steady-state caches)")
    runs_per_visit: int = Field(1, ge=1, description="timed runs per turn")
    clock: Literal["wall", "cpu"] = Field(
        "wall", description="wall: elapsed time; cpu: CPU time of the timing thread (threads: 1 on cpu only), which ignores waiting for a core on a shared machine")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu: CPUExecutionProvider; cuda: CUDAExecutionProvider")
    statistic: Literal["median", "min"] = Field(
        "median", description="summary of the timed runs: median (default), or min, which resists other load on a shared machine")
    in_context: bool = Field(
        False, description="`bespoke profile` also measures each alternative's saving in context: the whole teacher with that one segment replaced, end to end (one whole-model timing per alternative; predictions then match measured students far better)")
    device_name: str | None = Field(None, description="name written into the DeviceInfo (default: the CPU model)")
    opset: int = Field(18, ge=7)
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="torch.onnx exporter of whole networks as they ship (students, the teacher): the torch.export-based one `bespoke export` uses (default), or the legacy TorchScript one (faster to export, deprecated)")
    piece_exporter: Literal["dynamo", "torchscript"] | None = Field(
        "torchscript", description="torch.onnx exporter when a call times pieces of a network (`bespoke profile`'s blocks and alternatives; the teacher timed with them goes the same way, so their ratios compare like with like); none: `exporter`. The legacy one exports a block in about a tenth of the CPU time")
    cache_dir: str | None = Field(None, description="where exported models are kept, by signature (default: a temporary directory)")
    allow_spinning: bool = Field(False, description="let ORT worker threads spin between runs (ORT's own default). Off by default here: the estimator interleaves many sessions in one process, and each idle session's spinning threads take the cores from the one being timed (Lite2 at 260 px timed beside its 20 blocks, 2 threads: 33.1 ms with spinning, 14.3 ms without; the blocks summed to 54.8 ms against 12.7)")


def _export(module, x, path: Path, opset: int, exporter: str) -> None:
    import torch

    tmp = path.with_name(path.stem + ".tmp.onnx")
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module, (x,), str(tmp), dynamo=True, external_data=False,
                              opset_version=opset, verbose=False, input_names=["x"])
        else:
            torch.onnx.export(module, (x,), str(tmp), dynamo=False, opset_version=min(opset, 17),
                              input_names=["x"], do_constant_folding=True)
    tmp.replace(path)


def _first(exporter: str) -> list[str]:
    """The exporters to try, ``exporter`` first: a graph one cannot take goes to the other."""
    return [exporter] + [e for e in ("dynamo", "torchscript") if e != exporter]


class OnnxRuntimeLatency:
    """ONNX Runtime timing: each module exported once (cached by signature), fixed threads,
    warm-up, interleaved timed runs, median."""

    def __init__(self, options: OnnxRuntimeLatencyOptions | None = None):
        self.options = options or OnnxRuntimeLatencyOptions()
        if self.options.clock == "cpu" and (self.options.threads != 1 or self.options.device != "cpu"):
            raise UsageError(f"{NAME}: clock = 'cpu' times one CPU thread; it needs threads: 1 and device: cpu "
                             f"(got threads: {self.options.threads}, device: {self.options.device})")
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("onnxruntime-latency needs ONNX Runtime: pip install 'bespoke[onnx]'") from None
        if self.options.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError(
                "onnxruntime-latency: device = 'cuda' but this ONNX Runtime has no CUDAExecutionProvider "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use device: cpu"
            )
        self._tmp: tempfile.TemporaryDirectory | None = None
        if self.options.cache_dir:
            self.cache = Path(self.options.cache_dir)
            self.cache.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="bespoke-onnx-")
            self.cache = Path(self._tmp.name)

    def device(self) -> DeviceInfo:
        from bespoke.api import cpu_name

        o = self.options
        name = o.device_name
        if not name:
            if o.device == "cuda":
                import torch

                name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"
            else:
                name = cpu_name()
        return DeviceInfo(name=name, runtime=f"onnxruntime-{o.device}", threads=o.threads,
                          batch=o.batch, precision="fp32")

    def onnx_path(self, query: LatencyQuery, exporter: str | None = None) -> Path:
        """The exported model for ``query`` (exported on first use) with ``exporter`` (default:
        the configured one, falling back to the legacy one for graphs the dynamo exporter cannot
        take); the file name says which exporter wrote it."""
        path, _ = self._export(query, [exporter] if exporter else _first(self.options.exporter))
        return path

    def _export(self, query: LatencyQuery, tries: Sequence[str]) -> tuple[Path, str]:
        """Export ``query`` with the first of the exporters ``tries`` that takes it."""
        import torch

        o = self.options
        errors = []
        for how in tries:
            path = self.cache / f"{query.key}-b{o.batch}-{how}-op{o.opset}.onnx"
            if path.exists():
                return path, how
            module = query.module.eval().to("cpu")
            x = torch.randn((o.batch, *tuple(query.input_shape)[1:]))
            try:
                _export(module, x, path, o.opset, how)
                return path, how
            except Exception as exc:  # some graphs only the legacy exporter handles
                errors.append(f"{how}: {type(exc).__name__}: {str(exc)[:300]}")
        raise UsageError(
            f"onnxruntime-latency: could not export {type(query.module).__name__} "
            f"(key {query.key}, input {tuple(query.input_shape)}) to ONNX: " + "; ".join(errors))

    def exporter_for(self, queries: Sequence[LatencyQuery]) -> str:
        """The exporter a call prefers: ``exporter`` when every query is a whole network as it
        ships, ``piece_exporter`` (when set) as soon as one is a piece."""
        o = self.options
        pieces = any(not getattr(q, "as_shipped", False) for q in queries)
        return o.piece_exporter if pieces and o.piece_exporter else o.exporter

    def exported(self, queries: Sequence[LatencyQuery]) -> tuple[list[Path], str]:
        """Every query exported by one exporter (:meth:`exporter_for`, the other one for all of
        them when a graph needs it), so that ratios between them compare like with like."""
        prefer = self.exporter_for(queries)
        done = [self._export(q, _first(prefer)) for q in queries]
        used = {how for _, how in done}
        if len(used) > 1:
            other = next(e for e in used if e != prefer)
            done = [self._export(q, [other]) for q in queries]
        return [p for p, _ in done], done[0][1] if done else prefer

    def _session(self, path: Path):
        import onnxruntime as ort

        o = self.options
        so = ort.SessionOptions()
        so.intra_op_num_threads = o.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if o.allow_spinning else "0")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if o.device == "cuda" else ["CPUExecutionProvider"]
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)

    def latencies(self, queries: Sequence[LatencyQuery]) -> dict[str, float]:
        from bespoke.api import summarise_samples

        return summarise_samples(self.latency_samples(queries), self.options.statistic)

    def latency_samples(self, queries: Sequence[LatencyQuery]) -> dict[str, list[float]]:
        """Every timed run (ms) per distinct key, in round order: the i-th runs of two modules
        were timed in the same interleaved round (used for paired differences)."""
        import numpy as np

        from bespoke.api import time_interleaved, unique_queries

        o = self.options
        todo = unique_queries(queries)
        if not todo:
            return {}
        paths, _ = self.exported(todo)
        sessions = [self._session(p) for p in paths]
        feeds = []
        for q, s in zip(todo, sessions):
            shape = (o.batch, *tuple(q.input_shape)[1:])
            feeds.append({s.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)})
        # session.run is synchronous: it returns host arrays, on CUDA too.
        runners = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)]
        times = time_interleaved(runners, warmup=o.warmup, runs=o.runs, warm_per_visit=o.warm_per_visit,
                                 runs_per_visit=o.runs_per_visit, clock=o.clock)
        return {q.key: list(t) for q, t in zip(todo, times)}


def _factory(options):
    return OnnxRuntimeLatency(options)


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(name="onnxruntime-latency", category="latency", factory=_factory,
                          options_model=OnnxRuntimeLatencyOptions,
                          description="Exports modules to ONNX and times them with ONNX Runtime"))
