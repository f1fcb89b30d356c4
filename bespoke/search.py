"""The search stage: from a model house and latencies to a :class:`~bespoke.types.SearchProblem`,
and from a strategy's solutions to recipes on disk.

What lives here (strategies themselves are plugins, see ``bespoke_plugins/search_*.py``):

- :func:`resolve_budgets`: budgets as ratios of the teacher (<= 1) or milliseconds (> 1).
- :func:`build_problem` (plain dicts) and :func:`problem_from_house` (a thin adapter).
- Solvers every strategy may lean on: :func:`greedy_solution`, :func:`fastest_solution`,
  :func:`exact_front` / :func:`optimum` (an exact Pareto dynamic programme over cut points),
  :func:`exhaustive` (brute force, for tests), :func:`finalize` (the no-violation guarantee).
- :func:`check_solution`, :func:`rerank`; the on-disk report (:class:`SearchReport`) and its
  table live in :mod:`bespoke.search_report`, the problem's fingerprint and the Pareto front of
  chosen sets (:func:`problem_fingerprint`, :func:`pareto_of`, :data:`EPS`) in
  :mod:`bespoke.problem`; both are re-exported here.

Latency and loss are additive over chosen pairs (the model in ``SearchProblem``), so the set of
non-overlapping pairs is a weighted interval selection with one extra additive constraint; the
exact front below solves it by keeping only non-dominated (saving, loss) points per cut point.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from bespoke.errors import UsageError
from bespoke.problem import EPS, pareto_of, problem_fingerprint  # noqa: F401 (re-exported)
from bespoke.search_report import (SEARCH_SCHEMA_VERSION, BudgetResult, ChoiceRecord,  # noqa: F401 (re-exported)
                                   FrontPoint, SearchReport, make_report, read_report, report_table, SEARCH_LEGEND,
                                   write_report)
from bespoke.types import Candidate, SearchProblem, Solution

Proxy = Literal["replace-one", "replace-one-kl", "distill-error"]


# --------------------------------------------------------------------------------------------
# Budgets and problems
# --------------------------------------------------------------------------------------------


def resolve_budgets(budgets: Iterable[float], teacher_ms: float) -> list[float]:
    """Budgets in ms: a value <= 1 is a ratio of ``teacher_ms``, a value > 1 is milliseconds."""
    out = []
    for b in budgets:
        if isinstance(b, str):
            raise UsageError(f"budget {b!r} names a model: only `bespoke run` times it on the device (beside the "
                             "teacher) to make it a budget; here give a ratio (<= 1) or milliseconds (> 1)")
        b = float(b)
        if not b > 0 or math.isinf(b):
            raise UsageError(f"budget {b} must be a positive ratio (<= 1) or milliseconds (> 1)")
        out.append(b * teacher_ms if b <= 1.0 else b)
    return out


def parse_segment_id(segment: str) -> tuple[int, int]:
    """``"3-7"`` -> ``(3, 7)`` (the :attr:`bespoke.types.SegmentInfo.id` format)."""
    try:
        a, b = segment.split("-")
        start, end = int(a), int(b)
    except ValueError:
        raise UsageError(f"segment id {segment!r} is not 'START-END' (two cut-point indices)") from None
    if start >= end:
        raise UsageError(f"segment id {segment!r}: start must be before end")
    return start, end


def build_problem(
    teacher_ms: float,
    segment_ms: Mapping[str, float],
    alternatives: Mapping[str, str],
    alt_ms: Mapping[str, float],
    alt_loss: Mapping[str, float],
    *,
    lam: float = 0.1,
    keep_useless: bool = False,
) -> SearchProblem:
    """A :class:`SearchProblem` from plain dicts.

    :param teacher_ms: the whole teacher's latency.
    :param segment_ms: teacher segment id (``"start-end"``) -> its latency in ms.
    :param alternatives: alternative id -> the segment id it replaces.
    :param alt_ms: alternative id -> its latency in ms.
    :param alt_loss: alternative id -> accuracy-loss proxy of replacing that segment alone.
    :param keep_useless: keep alternatives that save nothing and lose something (never chosen by
        an optimal solution; dropped by default to shrink the search space).
    """
    if not teacher_ms > 0:
        raise UsageError(f"teacher latency {teacher_ms} ms must be > 0")
    cands: list[Candidate] = []
    for alt, seg in sorted(alternatives.items(), key=lambda kv: (parse_segment_id(kv[1]), kv[0])):
        if seg not in segment_ms:
            raise UsageError(f"alternative {alt!r}: no latency for its teacher segment {seg!r}; "
                             "profile the house on this device first (bespoke profile)")
        if alt not in alt_ms:
            raise UsageError(f"alternative {alt!r}: no latency; profile the house on this device "
                             "first (bespoke profile) or use a LUT that covers it")
        if alt not in alt_loss or alt_loss[alt] is None or not math.isfinite(alt_loss[alt]):
            raise UsageError(f"alternative {alt!r}: no accuracy-loss proxy; train and profile it "
                             "(bespoke build) or leave it out")
        start, end = parse_segment_id(seg)
        saving = float(segment_ms[seg]) - float(alt_ms[alt])
        loss = float(alt_loss[alt])
        if saving <= 0 and loss >= 0 and not keep_useless:
            continue
        cands.append(Candidate(segment=seg, start=start, end=end, alternative=alt,
                               saving_ms=saving, loss=loss))
    return SearchProblem(teacher_ms=float(teacher_ms), candidates=cands, lam=lam)


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, Mapping) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def proxy_loss(profile: Any, proxy: Proxy) -> float | None:
    """The selected accuracy-loss proxy from an alternative's profile (dict or model).

    ``replace-one``: the drop of the teacher with only this alternative swapped in (1 - top-1
    agreement with the teacher, or the top-1 accuracy drop when labels exist), in percentage
    points when the house stores fractions; ``distill-error``: the distillation error normalised
    by the teacher activation's variance; ``replace-one-kl``: the mean KL divergence (nats) from
    the teacher's output to the output with only this alternative swapped in, times 100 so its
    scale is close to percentage points: continuous, so it ranks alternatives even where a
    handful of held-out images leaves agreement unchanged.
    """
    if profile is None:
        return None
    if proxy == "replace-one-kl":
        v = _get(profile, "kl")
        return None if v is None else 100.0 * float(v)
    if proxy == "replace-one":
        v = _get(profile, "replace_one_drop", "replace_one_accuracy_drop")
        if v is None:
            agree = _get(profile, "replace_one_agreement", "agreement")
            v = None if agree is None else 1.0 - float(agree)
        return None if v is None else 100.0 * float(v)
    v = _get(profile, "distill_error", "normalised_distill_error", "normalized_distill_error",
             "nmse")
    return None if v is None else float(v)


def problem_from_house(house: Any, segment_ms: Mapping[str, float], alt_ms: Mapping[str, float],
                       teacher_ms: float, *, proxy: Proxy = "replace-one",
                       lam: float = 0.1) -> SearchProblem:
    """Thin adapter: trained alternatives of a house (``house.alternatives``: records with ``id``,
    ``segment`` (a :class:`SegmentInfo` or its id), ``status`` and ``profile``) -> problem."""
    alts: dict[str, str] = {}
    losses: dict[str, float] = {}
    records = _get(house, "alternatives", default=None)
    if records is None:
        manifest = _get(house, "manifest")
        records = _get(manifest, "alternatives", default=[])
    if isinstance(records, Mapping):
        records = [dict(v, id=k) if isinstance(v, Mapping) else v for k, v in records.items()]
    for rec in records:
        if _get(rec, "status") not in (None, "trained"):
            continue
        seg = _get(rec, "segment", "segment_id")
        seg_id = seg if isinstance(seg, str) else _get(seg, "id")
        loss = proxy_loss(_get(rec, "profile", default=rec), proxy)
        if loss is None:
            continue
        aid = str(_get(rec, "id", "alternative_id"))
        alts[aid] = seg_id
        losses[aid] = loss
    if not alts:
        raise UsageError("the house has no trained, profiled alternatives; run bespoke build first")
    return build_problem(teacher_ms, segment_ms, alts, alt_ms, losses, lam=lam)


def problem_to_dict(problem: SearchProblem) -> dict[str, Any]:
    return {"kind": "bespoke.search-problem", "schema_version": SEARCH_SCHEMA_VERSION,
            "teacher_ms": problem.teacher_ms, "lam": problem.lam,
            "candidates": [c.__dict__ for c in problem.candidates]}


def problem_from_dict(data: Mapping[str, Any]) -> SearchProblem:
    try:
        return SearchProblem(teacher_ms=float(data["teacher_ms"]), lam=float(data.get("lam", 0.1)),
                             candidates=[Candidate(**c) for c in data["candidates"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"not a search problem file ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------
# Solvers every strategy may use
# --------------------------------------------------------------------------------------------


def conflicts(problem: SearchProblem) -> list[frozenset[int]]:
    """For each candidate, the indices of candidates it overlaps (itself excluded)."""
    cs = problem.candidates
    out = []
    for i, a in enumerate(cs):
        out.append(frozenset(j for j, b in enumerate(cs)
                             if j != i and a.start < b.end and b.start < a.end))
    return out


def exact_front(problem: SearchProblem, resolution_ms: float = 0.0) -> list[tuple[float, float, tuple[int, ...]]]:
    """Every Pareto-optimal (latency_ms, loss, chosen) of the problem, fastest first.

    Dynamic programme over cut points: ``F[p]`` holds the non-dominated (saving, loss) sets of
    candidates ending at or before ``p``. Exact for additive latency and loss; cost grows with the
    front's size, not with the number of subsets. ``resolution_ms`` > 0 merges savings closer than
    that (for very large houses).
    """
    cs = problem.candidates
    idx = [i for i, c in enumerate(cs) if c.saving_ms > 0 or c.loss < 0]
    points = sorted({p for i in idx for p in (cs[i].start, cs[i].end)})
    by_end: dict[int, list[int]] = {}
    for i in idx:
        by_end.setdefault(cs[i].end, []).append(i)
    front: dict[int, list[tuple[float, float, tuple[int, ...]]]] = {}
    prev: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for p in points:
        pool = list(prev)
        for i in by_end.get(p, []):
            c = cs[i]
            for s, l, ch in front[c.start]:
                pool.append((s + c.saving_ms, l + c.loss, ch + (i,)))
        prev = front[p] = _prune(pool, resolution_ms)
    result = [(problem.teacher_ms - s, l, tuple(sorted(ch))) for s, l, ch in prev]
    result.sort()
    return result


def _prune(pool, resolution_ms):
    # larger saving and smaller loss are better; keep strictly improving loss as saving drops
    pool.sort(key=lambda t: (-t[0], t[1]))
    out = []
    best_loss = math.inf
    last_s = math.inf
    for s, l, ch in pool:
        if l < best_loss - EPS:
            if resolution_ms > 0 and out and last_s - s < resolution_ms:
                continue
            out.append((s, l, ch))
            best_loss = l
            last_s = s
    return out


def optimum(problem: SearchProblem, budget_ms: float) -> Solution:
    """The exact best solution under ``budget_ms`` (least loss, then fastest), from
    :func:`exact_front`; the fastest solution, marked infeasible, when none fits."""
    best = None
    for lat, loss, ch in exact_front(problem):
        if lat <= budget_ms + EPS and (best is None or loss < best[1] - EPS):
            best = (lat, loss, ch)
    if best is None:
        return finalize(problem, budget_ms, None, {"strategy": "exact"})
    return make_solution(problem, best[2], budget_ms, {"strategy": "exact"})


def fastest_solution(problem: SearchProblem) -> list[int]:
    """The largest total saving reachable (weighted interval scheduling), loss breaking ties."""
    cs = problem.candidates
    order = sorted(range(len(cs)), key=lambda i: cs[i].end)
    points = sorted({0} | {c.start for c in cs} | {c.end for c in cs})
    best: dict[int, tuple[float, float, tuple[int, ...]]] = {}
    cur = (0.0, 0.0, ())
    k = 0
    for p in points:
        while k < len(order) and cs[order[k]].end == p:
            i = order[k]
            s, l, ch = best.get(cs[i].start, (0.0, 0.0, ()))
            cand = (s + cs[i].saving_ms, l + cs[i].loss, ch + (i,))
            if cand[0] > cur[0] + EPS or (abs(cand[0] - cur[0]) <= EPS and cand[1] < cur[1]):
                cur = cand
            k += 1
        best[p] = cur
    return sorted(cur[2])


def exhaustive(problem: SearchProblem, budget_ms: float, limit: int = 2_000_000) -> Solution:
    """Brute force over every non-overlapping subset (tests only): the least-loss feasible one
    (ties: fastest); the least-score one, marked infeasible, when none fits."""
    cs = problem.candidates
    n = len(cs)
    order = sorted(range(n), key=lambda i: (cs[i].start, cs[i].end))
    best_feasible: tuple[float, float, list[int]] | None = None
    best_any: tuple[float, list[int]] | None = None
    count = 0

    def rec(k: int, chosen: list[int], frontier: int, saving: float, loss: float) -> None:
        nonlocal best_feasible, best_any, count
        if k == n:
            count += 1
            if count > limit:
                raise UsageError(f"exhaustive search exceeded {limit} subsets; use optimum()")
            lat = problem.teacher_ms - saving
            if lat <= budget_ms + EPS:
                if best_feasible is None or (loss, lat) < best_feasible[:2]:
                    best_feasible = (loss, lat, list(chosen))
            score = max(lat / budget_ms, 1.0) + problem.lam * loss
            if best_any is None or score < best_any[0]:
                best_any = (score, list(chosen))
            return
        i = order[k]
        rec(k + 1, chosen, frontier, saving, loss)
        # sorted by start: compatible with all chosen iff it starts at or after every chosen end
        if cs[i].start >= frontier:
            chosen.append(i)
            rec(k + 1, chosen, cs[i].end, saving + cs[i].saving_ms, loss + cs[i].loss)
            chosen.pop()

    rec(0, [], -(10**9), 0.0, 0.0)
    if best_feasible is not None:
        return make_solution(problem, best_feasible[2], budget_ms,
                             {"strategy": "exhaustive", "subsets": count})
    assert best_any is not None
    return make_solution(problem, best_any[1], budget_ms,
                         {"strategy": "exhaustive", "subsets": count, "feasible": False})


def _ratio(c: Candidate) -> float:
    # loss per ms saved; a candidate that lowers loss while saving time is best of all
    return c.loss / c.saving_ms if c.saving_ms > 0 else math.inf


def greedy_solution(problem: SearchProblem, budget_ms: float,
                    conf: Sequence[frozenset[int]] | None = None) -> list[int]:
    """Add the compatible pair with the least loss per ms saved until the budget is met; then
    improve by local moves (drop, swap-in, exchange; :func:`improve`) while loss
    falls and the budget holds (or, while still over budget, while latency falls). When that
    cannot meet the budget, it starts again from :func:`fastest_solution`."""
    cs = problem.candidates
    conf = conf or conflicts(problem)
    chosen: set[int] = set()
    lat = problem.teacher_ms
    order = sorted((i for i, c in enumerate(cs) if c.saving_ms > 0), key=lambda i: (_ratio(cs[i]), i))
    for i in order:
        if lat <= budget_ms + EPS:
            break
        if conf[i].isdisjoint(chosen):
            chosen.add(i)
            lat -= cs[i].saving_ms
    out = improve(problem, chosen, budget_ms, conf)
    if not problem.feasible(list(out), budget_ms):
        # early cheap picks can block the big savings a tight budget needs: start over from the
        # fastest solution (feasible whenever anything is) and shed loss from there
        fast = fastest_solution(problem)
        if problem.feasible(fast, budget_ms):
            out = improve(problem, fast, budget_ms, conf)
    return sorted(out)


def improve(problem: SearchProblem, chosen: Iterable[int], budget_ms: float,
            conf: Sequence[frozenset[int]]) -> set[int]:
    """First-improvement local search: drop a pair; swap one in for the pairs it overlaps; exchange
    a chosen pair for another (see :func:`greedy_solution`)."""
    cs = problem.candidates
    cur = set(chosen)

    def key(s: set[int]) -> tuple[float, float]:
        lat = problem.teacher_ms - sum(cs[j].saving_ms for j in s)
        return (max(0.0, lat - budget_ms - EPS), sum(cs[j].loss for j in s))

    cur_key = key(cur)
    improved = True
    while improved:
        improved = False
        moves: list[set[int]] = [cur - {j} for j in cur]
        moves += [(cur - conf[i]) | {i} for i in range(len(cs)) if i not in cur]
        # exchange: drop one pair and take another that it does not overlap
        moves += [(cur - {j} - conf[i]) | {i} for j in cur for i in range(len(cs))
                  if i not in cur and j not in conf[i]]
        # ruin and recreate: force one pair in, or one out, then refill greedily to the budget
        moves += [_refill(problem, (cur - conf[i]) | {i}, budget_ms, conf, banned={i})
                  for i in range(len(cs)) if i not in cur]
        moves += [_refill(problem, cur - {j}, budget_ms, conf, banned={j}) for j in cur]
        for new in moves:
            k = key(new)
            if k[0] < cur_key[0] - EPS or (abs(k[0] - cur_key[0]) <= EPS and k[1] < cur_key[1] - EPS):
                cur, cur_key, improved = new, k, True
                break
    return cur


def _refill(problem: SearchProblem, chosen: set[int], budget_ms: float,
            conf: Sequence[frozenset[int]], banned: set[int]) -> set[int]:
    """Add compatible pairs by least loss per ms saved until ``budget_ms`` is met."""
    cs = problem.candidates
    out = set(chosen)
    lat = problem.latency(list(out))
    for i in sorted(range(len(cs)), key=lambda i: (_ratio(cs[i]), i)):
        if lat <= budget_ms + EPS:
            break
        if cs[i].saving_ms > 0 and i not in out and i not in banned and conf[i].isdisjoint(out):
            out.add(i)
            lat -= cs[i].saving_ms
    # then drop what the budget no longer needs, most lossy first
    for j in sorted(out, key=lambda j: -cs[j].loss):
        if cs[j].loss > 0 and lat + cs[j].saving_ms <= budget_ms + EPS:
            out.discard(j)
            lat += cs[j].saving_ms
    return out


def make_solution(problem: SearchProblem, chosen: Iterable[int], budget_ms: float | None,
                  meta: dict[str, Any] | None = None) -> Solution:
    ch = sorted(chosen)
    lat = problem.latency(ch)
    meta = dict(meta or {})
    if budget_ms is not None:
        meta.setdefault("feasible", lat <= budget_ms + EPS)
        meta.setdefault("score", problem.score(ch, budget_ms))
    return Solution(chosen=ch, latency_ms=lat, loss=problem.loss(ch), budget_ms=budget_ms, meta=meta)


def finalize(problem: SearchProblem, budget_ms: float, best: Iterable[int] | None,
             meta: dict[str, Any]) -> Solution:
    """A strategy's answer for one budget, with the no-violation guarantee.

    ``best`` is the best *feasible* set the strategy found, or ``None``. When it found none, the
    fastest reachable solution is returned instead: feasible whenever anything is, otherwise
    marked ``meta["feasible"] = False`` with ``meta["fastest_ms"]``.
    """
    meta = dict(meta)
    if best is not None:
        ch = sorted(best)
        if problem.feasible(ch, budget_ms):
            return make_solution(problem, ch, budget_ms, meta)
    fast = fastest_solution(problem)
    fast_ms = problem.latency(fast)
    meta["fastest_ms"] = fast_ms
    if fast_ms <= budget_ms + EPS:
        meta["fallback"] = "fastest"
        return make_solution(problem, improve(problem, fast, budget_ms, conflicts(problem)),
                             budget_ms, meta)
    meta["feasible"] = False
    return make_solution(problem, fast, budget_ms, meta)


def check_solution(problem: SearchProblem, solution: Solution) -> list[str]:
    """Everything wrong with ``solution`` (empty when valid): bad indices, overlaps, stale
    latency/loss, a budget violation not marked infeasible."""
    errs = []
    n = len(problem.candidates)
    bad = [i for i in solution.chosen if not 0 <= i < n]
    if bad:
        return [f"candidate indices out of range: {bad}"]
    if len(set(solution.chosen)) != len(solution.chosen):
        errs.append("a candidate is chosen twice")
    for k, i in enumerate(solution.chosen):
        if not problem.compatible(solution.chosen[:k], i):
            c = problem.candidates[i]
            errs.append(f"segment {c.segment} ({c.alternative}) overlaps another chosen segment")
    if abs(problem.latency(solution.chosen) - solution.latency_ms) > 1e-6:
        errs.append("latency_ms does not match the chosen candidates")
    if abs(problem.loss(solution.chosen) - solution.loss) > 1e-6:
        errs.append("loss does not match the chosen candidates")
    if solution.budget_ms is not None and not problem.feasible(solution.chosen, solution.budget_ms):
        if solution.meta.get("feasible", True):
            errs.append(f"latency {solution.latency_ms:.3f} ms exceeds the budget "
                        f"{solution.budget_ms:.3f} ms but is not marked infeasible")
    return errs


def top_k(entries: Iterable[tuple[float, Sequence[int]]], k: int) -> list[list[int]]:
    """The ``k`` best distinct chosen sets by key (smaller is better)."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for _, ch in sorted(entries, key=lambda e: e[0]):
        t = tuple(sorted(ch))
        if t in seen:
            continue
        seen.add(t)
        out.append(list(t))
        if len(out) >= k:
            break
    return out


# --------------------------------------------------------------------------------------------
# Re-ranking with real scores
# --------------------------------------------------------------------------------------------


class RealScore(BaseModel):
    """What assembling and evaluating one candidate solution gave.

    ``timer``, when given instead of a latency: a call that times the candidate (its latency ratio
    to the teacher, measured beside it). Re-ranking then times candidates lazily, best fidelity
    first, and stops at the first one within the budget: the pick is the same as timing all of
    them (the best fidelity within the budget), at a fraction of the timing."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    fidelity: float  # higher is better, e.g. top-1 agreement with the teacher on held-out images
    latency_ms: float | None = None  # measured end to end, when the estimator can
    # measured end to end beside the teacher, in one interleaved call: robust to a machine whose
    # speed drifts; read against the problem's own teacher latency when latency_ms is not given
    latency_ratio: float | None = None
    # a call that times the candidate: its ratio to the teacher, or a RealScore with the latency
    timer: Callable[[], Any] | None = Field(default=None, exclude=True, repr=False)


def rerank(problem: SearchProblem, solution: Solution,
           evaluate: Callable[[list[int]], RealScore | float], k: int = 3) -> tuple[Solution, list[dict[str, Any]]]:
    """Score the best ``k`` proxy candidates of ``solution`` (``meta["top"]``) for real; keep the
    one with the best real fidelity whose measured latency (if any) meets the budget. When every
    candidate measures over the budget, keep the fastest (closest to it).

    Candidates whose score carries a ``timer`` (:class:`RealScore`) are timed in order of fidelity,
    best first, until one measures within the budget; those after it are not timed (their row
    says ``timed: false``, ``within_budget: false``): none of them could be the pick.

    Returns the picked solution (``meta["reranked"]`` = the table of real scores) and that table.
    """
    pool = [list(c) for c in solution.meta.get("top", [])] or [solution.chosen]
    if solution.chosen not in pool:
        pool.insert(0, solution.chosen)
    pool = pool[:max(1, k)]
    budget = solution.budget_ms
    scores = []
    for ch in pool:
        r = evaluate(list(ch))
        scores.append(r if isinstance(r, RealScore) else RealScore(fidelity=float(r)))
    table: list[dict[str, Any]] = [{} for _ in pool]
    found = False  # a candidate of higher fidelity measured within the budget: the rest need no timing
    for i in sorted(range(len(pool)), key=lambda i: -scores[i].fidelity):
        ch, r = pool[i], scores[i]
        feasible = budget is None or problem.feasible(ch, budget)
        timed = True
        if r.latency_ms is None and r.latency_ratio is None and r.timer is not None:
            if found or not feasible:
                timed = False
            else:
                got = r.timer()
                got = (got.model_dump(include={"latency_ms", "latency_ratio"}) if isinstance(got, RealScore)
                       else {"latency_ratio": got})
                r = r.model_copy(update={**got, "timer": None})
        if r.latency_ms is None and r.latency_ratio is not None:
            r = r.model_copy(update={"latency_ms": r.latency_ratio * problem.teacher_ms})
        ok = timed and (budget is None or r.latency_ms is None or r.latency_ms <= budget + EPS) and feasible
        found = found or ok
        table[i] = {"chosen": list(ch), "choices": choice_dicts(problem, ch), "proxy_loss": problem.loss(ch),
                    "predicted_ms": problem.latency(ch), "fidelity": r.fidelity,
                    "measured_ms": r.latency_ms, "measured_ratio": r.latency_ratio, "within_budget": ok,
                    **({} if timed else {"timed": False})}
    pick = table[pick_scored(table)]
    meta = dict(solution.meta, reranked=table, picked=table.index(pick))
    return make_solution(problem, pick["chosen"], solution.budget_ms, meta), table


def choice_dicts(problem: SearchProblem, chosen: Iterable[int]) -> list[dict[str, Any]]:
    """The candidates ``chosen`` as plain dicts (segment, start, end, alternative), the form a
    student is assembled from."""
    return [{"segment": c.segment, "start": c.start, "end": c.end, "alternative": c.alternative}
            for c in (problem.candidates[i] for i in sorted(chosen, key=lambda i: problem.candidates[i].start))]


def pick_scored(rows: Sequence[Mapping[str, Any]], *, measured: str = "measured_ms",
                predicted: str = "predicted_ms") -> int:
    """Which of the really scored candidates ``rows`` (``fidelity``, ``within_budget`` and a
    measured and a predicted latency under the keys ``measured`` / ``predicted``, in any one unit)
    to keep: the best fidelity among those within the budget; when none is, the fastest
    (measured, else predicted). Returns its index."""
    if not rows:
        raise ValueError("no scored candidates to pick from")
    ok = [i for i, t in enumerate(rows) if t["within_budget"]]
    if ok:
        return max(ok, key=lambda i: rows[i]["fidelity"])

    def ms(t):
        return t[measured] if t.get(measured) is not None else t[predicted]

    return min(range(len(rows)), key=lambda i: (ms(rows[i]), -rows[i]["fidelity"]))


# --------------------------------------------------------------------------------------------
# Running a strategy (the report on disk: bespoke.search_report)
# --------------------------------------------------------------------------------------------


def run_strategy(strategy: Any, problem: SearchProblem, budgets_ms: Sequence[float], *, seed: int = 0,
                 workdir: str | None = None, name: str = "") -> list[Solution]:
    """Call ``strategy.search`` and hold it to the contract: one valid solution per budget."""
    t0 = time.perf_counter()
    sols = strategy.search(problem, list(budgets_ms), seed=seed, workdir=workdir)
    wall = time.perf_counter() - t0
    if len(sols) != len(budgets_ms):
        raise UsageError(f"search strategy {name!r} returned {len(sols)} solutions for "
                         f"{len(budgets_ms)} budgets; it breaks the SearchStrategy contract")
    out = []
    for b, s in zip(budgets_ms, sols):
        if s.budget_ms is None:
            s.budget_ms = b
        errs = check_solution(problem, s)
        if errs:
            raise UsageError(f"search strategy {name!r} returned an invalid solution for budget "
                             f"{b:.3f} ms: " + "; ".join(errs))
        if not problem.feasible(s.chosen, b) and fastest_latency(problem) <= b + EPS:
            # a feasible solution exists: never hand back a violating one
            s = finalize(problem, b, None, dict(s.meta, repaired=True))
        s.meta.setdefault("wall_s", wall)
        out.append(s)
    return out


def fastest_latency(problem: SearchProblem) -> float:
    return problem.latency(fastest_solution(problem))

