"""The run report: ``report.json`` (typed, versioned), ``pareto.png`` and a terminal table.

Accuracy on the plot and in the table is top-1 when the data has labels, else agreement with
the teacher's top-1 (which needs no labels; the teacher scores 1.0 by definition).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

REPORT_SCHEMA_VERSION = 1


class ModelEntry(BaseModel):
    name: str
    params: int
    flops: float | None = None
    latency_ms: float | None = Field(None, description="measured end to end by the latency estimator")
    top1: float | None = Field(None, description="null when the data has no labels")
    top5: float | None = None
    agreement: float | None = Field(None, description="top-1 agreement with the teacher")
    score_top1: float | None = Field(None, description="top-1 on the scoring images (score_data; null without them or without labels)")
    score_agreement: float | None = Field(None, description="top-1 agreement with the teacher on the scoring images (null without them)")
    score_images: int = Field(0, description="scoring images the score_ fields were measured on (0: none)")


class StudentEntry(BaseModel):
    budget: float = Field(..., description="the budget as given: a ratio of the teacher (<= 1) or ms")
    budget_ms: float
    name: str
    role: Literal["answer", "mixed"] = Field("answer", description="answer: what the run hands back for this budget (the best within it on the selection images, from the mixed students and the zoo: search.zoo); mixed: the budget's best mixed student, saved beside an answer that came from the zoo, so the report shows what mixing gained or cost")
    kind: Literal["mixed", "donor", "teacher"] = Field("mixed", description="mixed: the teacher with segments replaced; donor: a donor network as it is (its own weights, input size and preprocessing); teacher: the teacher with nothing replaced, at input_size")
    what: str | None = Field(None, description="what the student is, in words (e.g. 'tf_efficientnet_lite0 as it is', 'the teacher at 208 px', '3 segment(s) replaced at 208 px')")
    params: int
    flops: float | None = None
    latency_ms_predicted: float | None = Field(None, description="additive prediction the search used")
    latency_ms_measured: float | None = None
    speedup: float | None = Field(None, description="teacher latency / measured student latency")
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None
    top1_before_finetune: float | None = None
    agreement_before_finetune: float | None = None
    replaced: list[dict[str, Any]] = Field(default_factory=list, description="segment id, alternative id and label per replaced segment")
    feasible: bool = True
    onnx: str | None = None
    onnx_max_abs_diff: float | None = None
    onnx_batch: int | str | None = Field(None, description="the ONNX input's batch axis: 1, or 'batch' when exported with export.dynamic_batch")
    torch_export: str | None = None
    student_dir: str | None = None
    finetune_steps: int = 0
    input_size: int | None = Field(None, description="the student's square input resolution (px); None: the teacher's")
    finetune_kept: bool = Field(True, description="false: fine-tuning lowered the held-out agreement and the assembled student was kept (finetune.keep_best)")
    latency_ratio: float | None = Field(None, description="measured latency of the saved student (reloaded from student_dir) over the teacher's at its own size, timed beside it: the median of per-round ratios")
    latency_ratio_interval: list[float] | None = Field(None, description="95 % interval of latency_ratio (bootstrap of the per-round ratios)")
    latency_ratio_at_pick: float | None = Field(None, description="the ratio the final pick measured for this student's architecture, before fine-tuning and saving")
    budget_ratio: float | None = Field(None, description="the budget as a ratio of the teacher at its own size")
    budget_model: str | None = Field(None, description="the model whose latency on the device set this budget (a budget given as a donor's name), else null; that model meets it by definition")
    over_budget: bool = Field(False, description="true: the saved student measures over its budget by more than search.budget_tolerance or the measured noise (listed in unmet_budgets)")
    fallback: int | None = Field(None, description="n: the budget's pick measured over budget as saved, and this is its n-th other finalist (search.pick_fallbacks)")
    fallback_detail: dict[str, Any] | None = Field(None, description="why this student stands in for the budget's pick, when it does: the pick's and the finalist's agreement on the pick's images, and what a second, tighter search found (search.fallback_max_drop); also OUT/students/budget-B/fallback.json")
    images: int = Field(0, description="held-out images top1 and agreement were measured on")
    agreement_interval: list[float] | None = Field(None, description="95 % (Wilson) interval of agreement over those images")
    usable: bool | None = Field(None, description="true: its agreement with the teacher is not surely below search.usable_agreement; false: it is (not worth keeping, see usable_note); null: too few held-out images to tell")
    usable_note: str | None = Field(None, description="why a student is unusable or unproven, and what to do")
    score_top1: float | None = Field(None, description="top-1 on the scoring images (score_data), which nothing that chose this student read; null without them or without labels")
    score_agreement: float | None = Field(None, description="top-1 agreement with the teacher's top-1 (at its own size) on the scoring images; null without them")
    score_images: int = Field(0, description="scoring images the score_ fields were measured on (0: none)")


class Report(BaseModel):
    schema_version: int = REPORT_SCHEMA_VERSION
    bespoke_version: str
    created: str
    teacher: ModelEntry
    students: list[StudentEntry]
    unmet_budgets: list[dict[str, Any]] = Field(default_factory=list, description="budgets no student of the house meets (budget, budget_ms, fastest_ms; no student is made for them), and budgets whose saved student measures over them (budget, budget_ms, measured_ratio, reason)")
    references: list[ModelEntry] = Field(default_factory=list)
    timings_s: dict[str, float]
    cpu_s: dict[str, float] = Field(default_factory=dict, description="CPU seconds per stage (this process's threads and its finished child processes), as timings_s has wall seconds")
    peak_rss_mb: dict[str, float] = Field(default_factory=dict, description="this process's peak resident memory (MB) at the end of each stage, a running maximum (the first stage whose figure rises raised it); children: the largest finished worker process")
    data: dict[str, Any] = Field(default_factory=dict, description="source, image counts, labelled, skipped images; the three roles' counts and digests (distill_images, selection_images, scoring_images, and *_digest: sha256 over the sorted per-image sha256s, 16 hex digits; scoring 0 and null without score_data)")
    latency: dict[str, Any] = Field(default_factory=dict, description="estimator, device, prediction error")
    config: dict[str, Any] = Field(default_factory=dict)


def write_report(report: Report, out: str | Path) -> Path:
    from bespoke.files import atomic_write_text

    return atomic_write_text(Path(out) / "report.json", report.model_dump_json(indent=2))


def _accuracy(e: Any, labelled: bool) -> float | None:
    return e.top1 if labelled else e.agreement


def pareto_plot(report: Report, out: str | Path) -> Path | None:
    """Latency (x) vs accuracy (y): the teacher, each student, each reference model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the JSON report is the record
        return None
    labelled = report.teacher.top1 is not None
    metric = "top-1 accuracy" if labelled else "top-1 agreement with the teacher"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    t = report.teacher
    if t.latency_ms is not None and _accuracy(t, labelled) is not None:
        ax.scatter([t.latency_ms], [_accuracy(t, labelled)], marker="*", s=220, color="black", label=f"teacher {t.name}", zorder=3)
    pts = [(s.latency_ms_measured, _accuracy(s, labelled), s) for s in report.students
           if s.latency_ms_measured is not None and _accuracy(s, labelled) is not None]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:red", s=60, label="students", zorder=3)
        for x, y, s in pts:
            ax.annotate(f"budget {s.budget:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ordered = sorted([(p[0], p[1]) for p in pts] + ([(t.latency_ms, _accuracy(t, labelled))] if t.latency_ms else []))
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], color="tab:red", alpha=0.35, lw=1)
    refs = [(r.latency_ms, _accuracy(r, labelled), r) for r in report.references
            if r.latency_ms is not None and _accuracy(r, labelled) is not None]
    if refs:
        ax.scatter([p[0] for p in refs], [p[1] for p in refs], marker="s", color="tab:blue", s=45, label="reference models", zorder=3)
        for x, y, r in refs:
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_xlabel("latency (ms, measured, batch 1)")
    ax.set_ylabel(metric)
    ax.set_title(f"bespoke: {t.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(out) / "pareto.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: float | None, pct: bool = False, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def summary_table(report: Report) -> Any:
    """The run's table, narrow enough for an 80-column terminal or log file: short headers with
    their units, no vertical rules, and a legend (:func:`summary_legend`) below it."""
    from bespoke.console import table as make_table

    table = make_table(f"bespoke run: {report.teacher.name}", ("model", "left"), "budget", "params", "pred", "ms",
                       "ratio", "top-1", "agree", ("repl", "left"))
    t = report.teacher
    pc = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    ratio = lambda v: f"{v / t.latency_ms:.3f}" if v and t.latency_ms else "-"  # noqa: E731
    table.add_row("teacher", "-", f"{t.params / 1e6:.2f}", "-", ms(t.latency_ms), "1.000", pc(t.top1),
                  pc(t.agreement), "-")
    for s in report.students:
        budget = f"{s.budget:g}" + ("" if s.feasible else "!") + ("*" if s.over_budget else "")
        measured = f"{s.latency_ratio:.3f}" if s.latency_ratio is not None else ratio(s.latency_ms_measured)
        name = s.name + {False: " (unusable)", None: " (unproven)"}.get(s.usable, "")
        repl = "donor" if s.kind == "donor" else str(len(s.replaced)) + (f"@{s.input_size}px" if s.input_size else "")
        table.add_row(name, budget, f"{s.params / 1e6:.2f}", ms(s.latency_ms_predicted), ms(s.latency_ms_measured),
                      measured, pc(s.top1), pc(s.agreement), repl)
    for r in report.references:
        table.add_row(r.name, "-", f"{r.params / 1e6:.2f}", "-", ms(r.latency_ms), ratio(r.latency_ms), pc(r.top1),
                      pc(r.agreement), "-")
    return table


def score_table(report: Report) -> Any:
    """The teacher and each student on the scoring images (score_data), or ``None`` without them:
    the one score of the run on images nothing chose on."""
    from bespoke.console import table as make_table

    if not report.teacher.score_images:
        return None
    pc = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    table = make_table(f"scored on {report.teacher.score_images} images nothing chose on (score_data)",
                       ("model", "left"), "budget", "ratio", "top-1", "agree", "images")
    t = report.teacher
    table.add_row("teacher", "-", "1.000", pc(t.score_top1), pc(t.score_agreement), str(t.score_images))
    for s in report.students:
        ratio = "-" if s.latency_ratio is None else f"{s.latency_ratio:.3f}"
        table.add_row(s.name, f"{s.budget:g}", ratio, pc(s.score_top1), pc(s.score_agreement), str(s.score_images))
    return table


def answer_lines(report: Report) -> list[str]:
    """One line per budget: what its answer is and, when the zoo gave it, how the best mixed
    student compares (held-out agreement and latency ratio)."""
    pc = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    rt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = []
    for s in report.students:
        if s.role != "answer":
            continue
        line = f"budget {s.budget:g}: {s.name} is {s.what or s.kind} (agreement {pc(s.agreement)} at {rt(s.latency_ratio)})"
        mixed = next((m for m in report.students if m.role == "mixed" and m.budget == s.budget), None)
        if mixed is not None:
            line += f"; the best mixed student, {mixed.name}: {pc(mixed.agreement)} at {rt(mixed.latency_ratio)}"
        lines.append(line)
    return lines


def summary_legend(report: Report) -> str:
    """One line under :func:`summary_table` that says what its columns mean."""
    marks = []
    if any(not s.feasible for s in report.students):
        marks.append("! no student of the house meets the budget")
    if any(s.over_budget for s in report.students):
        marks.append("* measured over its budget as saved (report.json: unmet_budgets)")
    return ("params: millions; budget and ratio: latency over the teacher's; pred: the search's "
            "predicted ms; ms: measured, batch 1; top-1 and agree (with the teacher's top-1): % of "
            "held-out images; repl: segments replaced (@ input size), donor: a donor as it is"
            + "".join(f"; {m}" for m in marks))
