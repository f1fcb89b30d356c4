"""The search stage: the search problem (from a model house or a problem file), the strategy's
solutions re-ranked by real scores, the report written and shown."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

from bespoke import search as S
from bespoke.blocks import Context
from bespoke.distill import source_for
from bespoke.errors import UsageError
from bespoke.house import House
from bespoke.latency import house_latencies as latency_of_house
from bespoke.models import load_model
from bespoke.partition import Partition
from bespoke.stages import warner


def search_problem(cfg: Any, registry: Any, console: Any, size: int | None = None) -> tuple[Any, str | None]:
    """The search problem from a problem JSON file or a model house; and the teacher's name."""
    path = Path(cfg.house)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a model house directory nor a search-problem JSON file ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != "bespoke.search-problem":
            raise UsageError(f"{path}: not a search-problem file (kind 'bespoke.search-problem'); "
                             "give a model house directory")
        problem = S.problem_from_dict(data)
        problem.lam = cfg.search.lam
        return problem, data.get("teacher")
    teacher_ms, seg_ms, alt_ms, house = house_latencies(cfg, registry, path, console, size)
    problem = S.problem_from_house(house.manifest, seg_ms, alt_ms, teacher_ms,
                                   proxy=cfg.search.proxy, lam=cfg.search.lam)
    return problem, house.manifest.teacher.name


def house_latencies(cfg: Any, registry: Any, root: Path, console: Any, size: int | None = None):
    """Teacher, teacher-segment and alternative latencies of a house from the selected estimator
    (:func:`bespoke.latency.house_latencies`, the one place that assembles them):
    ``(teacher_ms, segment_ms, alternative_ms, house)``."""
    if not House.exists(root):
        raise UsageError(f"{root}: no model house there (build one with `bespoke build`)")
    house = House.open(root)
    t = house.manifest.teacher
    model = load_model(t.name, weights=t.weights or "auto")
    size = int(size or t.input_size)
    partition = Partition.from_model(model, (1, 3, t.input_size, t.input_size), name=t.name).resized(size)
    ctx = Context(partition, t.name, (3, size, size), calibration=None, seed=cfg.seed)
    sources = registry.block_sources(cfg, warn=warner(console))
    estimator = registry.latency_estimator(cfg.plugins.latency, cfg.plugin_options.get(cfg.plugins.latency))
    lat = latency_of_house(house, partition, estimator,
                           lambda rec: house.load_alternative(rec.id, ctx, source_for(rec.source, sources, cfg, registry)))
    cal = lat.calibration
    if cal is not None:
        console.print(f"latency predictions calibrated from {cal.n} measured model(s): a={cal.a:.3f}, "
                      f"b={cal.b:+.2f} ms, c={cal.c:+.3f} ms per replaced segment", highlight=False)
    return (lat.teacher_ms, lat.segment_ms, lat.alt_ms, house)


def rerank(cfg: Any, problem: Any, solutions: list[Any], evaluate: Callable[[list[Any]], Any],
           reference_ms: float, console: Any, *, strategy: str,
           search_again: Callable[[float], Any] | None = None) -> list[Any]:
    """Re-rank each budget's best ``search.rerank_top_k`` candidates by real scores.

    The candidates are the strategy's ``meta["top"]`` (its best chosen sets, best first). A
    strategy that omits ``meta["top"]`` gets a warning naming it, and only its chosen solution is
    scored (re-ranking has nothing else to choose from: the pick is then the strategy's own).

    ``search_again(budget_ms)`` (the strategy run again at another budget), when given: a budget whose
    re-ranked candidates all measure over it is searched again, ``search.rerank_tighten`` times
    at most, at the budget divided by how much the measurements exceeded the predictions (the
    median of measured over predicted ms), and those candidates are re-ranked against the
    original budget; the new pick is kept when one of them measures within it, or when it is
    faster than the old one.
    """
    if any("top" not in s.meta for s in solutions):
        console.print(f"[yellow]warning:[/yellow] search strategy {strategy!r} gives no meta['top'] (its best "
                      "candidates); re-ranking scores only the solution it chose", highlight=False)

    def with_ms(r):  # a ratio read against the teacher at its own size (reference_ms)
        if isinstance(r, S.RealScore) and r.latency_ms is None and r.latency_ratio is not None:
            r = r.model_copy(update={"latency_ms": r.latency_ratio * reference_ms})
        return r

    def real(chosen):
        r = with_ms(evaluate([problem.candidates[i] for i in chosen]))
        if isinstance(r, S.RealScore) and r.timer is not None:  # timed lazily, by re-ranking
            timer, fidelity = r.timer, r.fidelity
            r = r.model_copy(update={"timer": lambda: with_ms(S.RealScore(fidelity=fidelity, latency_ratio=timer()))})
        return r

    def show(s):
        for row in s.meta.get("reranked", []):
            console.print(f"  re-rank at {s.budget_ms:.2f} ms: {len(row['chosen'])} replacement(s), proxy loss "
                          f"{row['proxy_loss']:.2f}, real fidelity {row['fidelity']:.4f}"
                          + ("" if row["within_budget"] else " (over budget)" if row.get("timed", True)
                             else " (not timed: predicted over budget)" if row["predicted_ms"] > s.budget_ms + S.EPS
                             else " (not timed: a better one fits)"), highlight=False)

    out = []
    for s in solutions:
        s = S.rerank(problem, s, real, k=cfg.search.rerank_top_k)[0]
        show(s)
        for _ in range(cfg.search.rerank_tighten if search_again is not None else 0):
            rows = s.meta.get("reranked", [])
            over = [r["measured_ms"] / r["predicted_ms"] for r in rows
                    if r.get("measured_ms") and r.get("predicted_ms")]
            if not rows or any(r["within_budget"] for r in rows) or not over:
                break
            factor = float(statistics.median(over))
            if factor <= 1.0:
                break
            tighter = s.budget_ms / factor
            console.print(f"  every candidate at {s.budget_ms:.2f} ms measured over it ({factor:.3f}x the "
                          f"predictions): searching again at {tighter:.2f} ms", highlight=False)
            again = search_again(tighter)
            again.budget_ms = s.budget_ms  # re-ranked against the budget as given
            again = S.rerank(problem, again, real, k=cfg.search.rerank_top_k)[0]
            show(again)
            picked, before = again.meta["reranked"][again.meta["picked"]], rows[s.meta["picked"]]
            if picked["within_budget"] or (picked.get("measured_ms") or 1e30) < (before.get("measured_ms") or 1e30):
                again.meta["tightened"] = {"factor": factor, "budget_ms": tighter}
                s = again
            else:
                break
        out.append(s)
    return out


def write_report(cfg: Any, problem: Any, solutions: list[Any], output: Path, console: Any, *, strategy: str,
                 teacher: str | None, size: int | None, reference_ms: float) -> Any:
    """The search report (recipes per budget, the Pareto front) written to ``output`` and shown,
    with what to do about a budget no student meets."""
    report = S.make_report(problem, cfg.budgets, solutions, strategy=strategy, proxy=cfg.search.proxy,
                           house=str(cfg.house), teacher=teacher)
    if size:
        for r in report.results:
            r.input_size = int(size)
            r.meta["reference_ms"] = reference_ms
            r.speedup = reference_ms / r.latency_ms if r.latency_ms > 0 else r.speedup
    written = S.write_report(report, output)
    console.print(S.report_table(report))
    console.print(S.SEARCH_LEGEND, highlight=False)
    for r in report.results:
        if not r.feasible:
            console.print(f"[red]budget {r.budget:g} ({r.budget_ms:.2f} ms) cannot be met:[/red] the fastest "
                          f"student this house allows runs in {r.fastest_ms:.2f} ms "
                          f"({r.fastest_ms / problem.teacher_ms:.2f} of the teacher). Raise the budget, or "
                          "build more (or cheaper) alternatives.")
    console.print(f"wrote {written[0]} and {len(written) - 1} recipe file(s) beside it")
    return report


def require_feasible(found: Any, console: Any = None) -> list[Any]:
    """The search results whose budget a student meets.

    A budget no student meets is an input error when it is the only kind there is; beside met
    budgets it is a warning (the report lists it under ``unmet_budgets``) and the run goes on.
    The message says how fast the fastest student is."""
    bad = [r for r in found.results if not r.feasible]
    met = [r for r in found.results if r.feasible]
    if not bad:
        return met
    fastest = min([r.fastest_ms for r in bad if r.fastest_ms is not None] or [p.latency_ms for p in found.front]
                  or [found.teacher_ms])
    lines = [f"budget {r.budget:g} ({r.budget_ms:.2f} ms) is below what any student can reach"
             for r in bad]
    message = ("; ".join(lines) + f". The fastest student this model house allows runs in "
               f"{fastest:.2f} ms ({fastest / found.teacher_ms:.2f} of the teacher's "
               f"{found.teacher_ms:.2f} ms). Give a budget of at least "
               f"{fastest / found.teacher_ms:.2f} (or {fastest:.2f} ms), or build more and "
               "cheaper alternatives (more segments, the skip and pruned-self sources). "
               "The house and latency table are kept, so the rerun starts at the search.")
    if not met:
        raise UsageError(message)
    if console is not None:
        console.print(f"[yellow]warning: {message} Going on with the other "
                      f"{len(met)} budget(s).[/yellow]", highlight=False)
    return met


__all__ = ["house_latencies", "require_feasible", "rerank", "search_problem", "write_report"]
