"""The report stage: ``OUT/report.json``, ``OUT/pareto.png`` and the summary table of a run; and
the wall-clock time of each stage that goes into it."""

from __future__ import annotations

import contextlib
import datetime
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from bespoke import __version__
from bespoke.data import skipped_line
from bespoke.evaluate import proportion_interval, usability
from bespoke.report import (ModelEntry, Report, StudentEntry, answer_lines, pareto_plot, score_table,
                            summary_legend, summary_table, write_report)


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished child processes (data
    loader workers, torchrun), user and system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory so far (MB, 10**6 bytes): ``self`` is this process's, ``children``
    the largest of its finished child processes (data loader workers, torchrun)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {"self": round(own / 1e6, 1), "children": round(kids / 1e6, 1)}


class Clock:
    """Wall time, CPU time and peak memory per stage, for the report."""

    def __init__(self):
        self._time = time.perf_counter
        self.start, self.cpu_start = self._time(), cpu_seconds()
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.rss: dict[str, float] = {}

    def __call__(self, name):
        @contextlib.contextmanager
        def timed():
            t0, c0 = self._time(), cpu_seconds()
            try:
                yield
            finally:
                self.seconds[name] = round(self.seconds.get(name, 0.0) + self._time() - t0, 3)
                self.cpu[name] = round(self.cpu.get(name, 0.0) + cpu_seconds() - c0, 3)
                self.rss[name] = peak_rss_mb()["self"]

        return timed()

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(self._time() - self.start, 3)}

    def cpu_total(self) -> dict[str, float]:
        return {**self.cpu, "total": round(cpu_seconds() - self.cpu_start, 3)}

    def rss_total(self) -> dict[str, float]:
        """The process's peak RSS (MB) at the end of each stage: a running maximum, so the first
        stage whose figure rises is the one that raised it; ``children``: the largest worker."""
        return {**self.rss, "children": peak_rss_mb()["children"]}


def write_run_report(cfg: Any, stage: Any, found: Any, made: list[Any], measured: dict[str, Any],
                     exports: list[Any], clock: Clock, roles: dict[str, Any] | None = None,
                     scores: dict[str, Any] | None = None, skipped: list[str] | None = None) -> Report:
    """report.json, pareto.png and the summary table of a run: the teacher, each budget's
    student (``made``, ``exports``) and the reference models, as :class:`Students` measured them;
    ``roles``: :func:`bespoke.roles.role_summary`; ``scores``: :meth:`Students.score` (the
    scoring images' metrics by name); ``skipped``: more names of images that failed to decode."""
    scores = scores or {}

    def scored(name):
        m = scores.get(name)
        return {"score_top1": m.top1, "score_agreement": m.agreement, "score_images": m.images} if m else {}

    def entry(m):
        return ModelEntry(name=m.name, params=m.params, flops=m.flops, latency_ms=m.latency_ms,
                          top1=m.top1, top5=m.top5, agreement=m.agreement)

    teacher = entry(stage.teacher_metrics).model_copy(update=scored("teacher"))
    students = []
    for m, res in zip(made, exports):
        r, a = m.plan, m.after
        distinct = a.images // stage.split.val_views  # intervals count images, not views of them
        usable, note = usability(a.agreement, distinct, cfg.search.usable_agreement)
        alts = {rec.id: rec for rec in stage.house.manifest.alternatives}
        zoo = r["zoo"] if "zoo" in r else (r.get("meta") or {}).get("zoo")
        students.append(StudentEntry(
            budget=r["budget"], budget_ms=r["budget_ms"], name=m.name, role=r.get("role", "answer"),
            kind=m.recipe.meta.get("kind", "mixed"), what=m.recipe.meta.get("what"), params=a.params, flops=a.flops,
            latency_ms_predicted=None if zoo else r["latency_ms"], latency_ms_measured=a.latency_ms,
            speedup=(teacher.latency_ms / a.latency_ms) if teacher.latency_ms and a.latency_ms else None,
            top1=a.top1, top5=a.top5, agreement=a.agreement, top1_before_finetune=m.before.top1,
            agreement_before_finetune=m.before.agreement, feasible=r["feasible"],
            replaced=[{"segment": c["segment"], "alternative": c["alternative"],
                       "source": alts[c["alternative"]].source if c["alternative"] in alts else None,
                       "label": alts[c["alternative"]].spec.label if c["alternative"] in alts else None}
                      for c in r["choices"]],
            onnx=res.onnx, onnx_max_abs_diff=res.onnx_max_abs_diff, onnx_batch=res.onnx_batch,
            torch_export=res.torch_export,
            student_dir=res.student_dir, finetune_steps=m.finetune.steps, finetune_kept=m.finetune_kept,
            input_size=m.size if m.size != stage.size else None,
            latency_ratio=m.latency_ratio, latency_ratio_interval=list(m.latency_interval) if m.latency_interval else None,
            latency_ratio_at_pick=m.ratio_at_pick, budget_ratio=m.budget_ratio, over_budget=m.over_budget,
            budget_model=getattr(stage, "budget_models", {}).get(r["budget"]),
            fallback=r.get("fallback"), fallback_detail=r.get("fallback_detail"), images=a.images, usable=usable, usable_note=note,
            agreement_interval=list(proportion_interval(a.agreement, distinct))
            if a.agreement is not None and distinct else None, **scored(m.name)))
    skipped = sorted(set(stage.split.skipped) | set(stage.house.manifest.data.get("skipped", [])) | set(skipped or []))
    # a fallback student (search.pick_fallbacks) has no prediction of its own
    errors = [abs(s.latency_ms_predicted - s.latency_ms_measured) / s.latency_ms_measured for s in students
              if s.latency_ms_measured and s.latency_ms_predicted is not None]
    report = Report(
        bespoke_version=__version__, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        teacher=teacher, students=students, references=[entry(r) for r in stage.references],
        timings_s=clock.total(), cpu_s=clock.cpu_total(), peak_rss_mb=clock.rss_total(),
        data={"source": stage.split.source, "labelled": stage.split.labelled,
              "train_images": len(stage.split.train), "val_images": stage.split.val_images,
              "val_views": stage.split.val_views,
              "input_size": stage.size, "skipped_images": len(skipped), "skipped": skipped[:100],
              **(roles or {})},
        latency={"estimator": cfg.plugins.latency, "device": stage.latency_device.model_dump(),
                 "search_teacher_ms": found.teacher_ms,
                 "prediction_abs_rel_error": errors, "search_strategy": found.strategy},
        unmet_budgets=[{"budget": r.budget, "budget_ms": r.budget_ms, "fastest_ms": r.fastest_ms,
                        "reason": "no student of the house meets it"}
                       for r in found.results if not r.feasible]
                      + [{"budget": s.budget, "budget_ms": s.budget_ms, "measured_ratio": s.latency_ratio,
                          "budget_ratio": s.budget_ratio, "reason": "the saved student measures over it"}
                         for s in students if s.over_budget],
        config=cfg.model_dump(mode="json"))
    out = Path(cfg.out)
    path = write_report(report, out)
    plot = pareto_plot(report, out)
    report.timings_s, report.cpu_s, report.peak_rss_mb = clock.total(), clock.cpu_total(), clock.rss_total()
    write_report(report, out)
    stage.console.print(summary_table(report))
    stage.console.print(summary_legend(report), highlight=False)
    for line in answer_lines(report):
        stage.console.print(line, highlight=False)
    if score_table(report) is not None:
        stage.console.print(score_table(report))
    for s in students:
        if s.usable_note:
            stage.console.print(("[yellow]warning:[/yellow] " if s.usable is False else "note: ")
                                + f"{s.name} {s.usable_note}", highlight=False)
    stage.console.print(data_line(len(stage.split.train), stage.split.val_images, stage.split.val_views,
                                  cfg.build.few_images), highlight=False)
    stage.console.print(f"wrote {path}" + (f" and {plot}" if plot else "")
                        + f" in {report.timings_s['total']:.0f} s", highlight=False)
    if skipped:  # one line, last: what the run could not read
        stage.console.print(f"[yellow]warning:[/yellow] {escape(skipped_line(skipped))}", highlight=False)
    return report


def data_line(train: int, held_out: int, views: int = 1, few: int = 300) -> str:
    """What the run's images allow, in one line under its table."""
    lo, hi = proportion_interval(0.5, held_out) if held_out else (0.0, 1.0)
    line = (f"images: {train} to distil and fine-tune on, {held_out} held out to judge by"
            + (f" (x{views} views)" if views > 1 else "")
            + (f"; an agreement on them is +-{50 * (hi - lo):.0f} points at 95 %" if held_out else ""))
    if train < few:
        line += (f"; fewer than {few} training images (build.few_images): the students show what the pipeline "
                 "does; for ones to deploy, give --data DIR with a few thousand photos of your task")
    return line


__all__ = ["Clock", "data_line", "write_run_report"]
