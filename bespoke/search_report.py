"""The search report: what ``bespoke search`` writes (``search.json`` and one recipe per budget
beside it, each the input of ``bespoke finetune``), read back, and shown as a table.

Re-exported by :mod:`bespoke.search`, where the rest of the code finds it; it imports
:mod:`bespoke.problem`, never :mod:`bespoke.search`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from bespoke.errors import UsageError
from bespoke.files import atomic_write_text
from bespoke.problem import pareto_of, problem_fingerprint
from bespoke.types import SearchProblem, Solution

SEARCH_SCHEMA_VERSION = 1


class ChoiceRecord(BaseModel):
    segment: str
    start: int
    end: int
    alternative: str
    saving_ms: float
    loss: float


class BudgetResult(BaseModel):
    """The pick for one budget: a recipe for ``bespoke finetune`` (its ``choices``)."""

    budget: float  # as the user gave it (ratio or ms)
    budget_ms: float
    feasible: bool
    latency_ms: float
    loss: float
    score: float
    speedup: float
    fastest_ms: float | None = None
    choices: list[ChoiceRecord]
    meta: dict[str, Any] = Field(default_factory=dict)
    input_size: int | None = None  # the student's input resolution, when not the teacher's


class FrontPoint(BaseModel):
    latency_ms: float
    loss: float
    alternatives: list[str]


class SearchReport(BaseModel):
    """``bespoke search`` output: recipes per budget and the latency/loss Pareto front."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SEARCH_SCHEMA_VERSION
    kind: Literal["bespoke.search"] = "bespoke.search"
    strategy: str
    house: str | None = None
    teacher: str | None = None
    proxy: str
    lam: float
    teacher_ms: float
    n_candidates: int
    problem_fingerprint: str
    results: list[BudgetResult]
    front: list[FrontPoint]


def make_report(problem: SearchProblem, budgets: Sequence[float], solutions: Sequence[Solution], *,
                strategy: str, proxy: str, house: str | None = None,
                teacher: str | None = None) -> SearchReport:
    """The report of one search: each budget's solution as a recipe, and the latency/loss Pareto
    front over every chosen set the strategy reported."""
    results = []
    sets: list[Sequence[int]] = []
    for b, s in zip(budgets, solutions):
        fronts = s.meta.get("front") or []
        sets += [p["chosen"] for p in fronts] + [s.chosen] + list(s.meta.get("top", []))
        meta = {k: v for k, v in s.meta.items() if k not in ("front", "top")}
        results.append(BudgetResult(
            budget=b, budget_ms=float(s.budget_ms or 0.0), feasible=bool(s.meta.get("feasible", True)),
            latency_ms=s.latency_ms, loss=s.loss, score=problem.score(s.chosen, s.budget_ms or 1.0),
            speedup=problem.teacher_ms / s.latency_ms if s.latency_ms > 0 else math.inf,
            fastest_ms=s.meta.get("fastest_ms"),
            choices=[ChoiceRecord(**problem.candidates[i].__dict__) for i in s.chosen],
            meta=json.loads(json.dumps(meta, default=str))))
    front = [FrontPoint(latency_ms=lat, loss=l, alternatives=[problem.candidates[i].alternative for i in ch])
             for lat, l, ch in pareto_of(problem, sets)]
    return SearchReport(strategy=strategy, house=house, teacher=teacher, proxy=proxy, lam=problem.lam,
                        teacher_ms=problem.teacher_ms, n_candidates=len(problem.candidates),
                        problem_fingerprint=problem_fingerprint(problem), results=results, front=front)


def write_report(report: SearchReport, path: str | Path) -> list[Path]:
    """Write the report, and one recipe file per budget beside it (``<stem>.budget-<b>.json``)."""
    path = Path(path)
    atomic_write_text(path, report.model_dump_json(indent=2))
    written = [path]
    for r in report.results:
        p = path.with_name(f"{path.stem}.budget-{r.budget:g}.json")
        recipe = {"kind": "bespoke.search-recipe", "schema_version": SEARCH_SCHEMA_VERSION,
                  "house": report.house, "teacher": report.teacher, "strategy": report.strategy,
                  **r.model_dump()}
        atomic_write_text(p, json.dumps(recipe, indent=2))
        written.append(p)
    return written


def read_report(path: str | Path) -> SearchReport:
    from pydantic import ValidationError

    try:
        return SearchReport.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        raise UsageError(f"{path}: not a readable bespoke search report: {exc}") from None


def report_table(report: SearchReport):
    """A table of the picks, one row per budget; :data:`SEARCH_LEGEND` says what its columns mean."""
    from bespoke.console import table as make_table

    t = make_table(f"search: {report.strategy} (teacher {report.teacher_ms:.2f} ms, proxy {report.proxy})",
                   "budget", "budget ms", "ms", "speedup", "loss", "repl", ("fits", "left"))
    for r in report.results:
        feas = "yes" if r.feasible else f"[red]no[/red] (fastest {r.fastest_ms:.2f} ms)"
        t.add_row(f"{r.budget:g}", f"{r.budget_ms:.2f}", f"{r.latency_ms:.2f}", f"{r.speedup:.2f}x",
                  f"{r.loss:.4g}", str(len(r.choices)), feas)
    return t


SEARCH_LEGEND = ("ms: the pick's predicted latency; speedup: the teacher's ms over it; loss: the proxy loss "
                 "of the pick; repl: segments replaced; fits: within the budget")


__all__ = ["BudgetResult", "ChoiceRecord", "FrontPoint", "SEARCH_SCHEMA_VERSION", "SearchReport", "make_report",
           "read_report", "report_table", "SEARCH_LEGEND", "write_report"]
