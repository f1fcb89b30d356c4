"""Pure functions of a :class:`~bespoke.types.SearchProblem` that both the search engine
(:mod:`bespoke.search`) and its report (:mod:`bespoke.search_report`) use: the problem's
fingerprint, the Pareto front of chosen sets, and the tolerance :data:`EPS` latencies and losses
are compared with. Both modules import this one, so neither imports the other back (the engine
re-exports everything here).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

from bespoke.types import SearchProblem

EPS = 1e-9


def problem_fingerprint(problem: SearchProblem) -> str:
    """Stable hash of a problem (candidates, latencies, losses): studies are keyed by it."""
    h = hashlib.sha256()
    h.update(f"{problem.teacher_ms:.6g}|{problem.lam:.6g}".encode())
    for c in problem.candidates:
        h.update(f"|{c.segment}:{c.alternative}:{c.saving_ms:.6g}:{c.loss:.6g}".encode())
    return h.hexdigest()[:16]


def pareto_of(problem: SearchProblem, sets: Iterable[Sequence[int]]) -> list[tuple[float, float, list[int]]]:
    """Non-dominated (latency, loss, chosen) among ``sets``, fastest first."""
    pts = sorted({tuple(sorted(s)) for s in sets}, key=lambda s: (problem.latency(s), problem.loss(s)))
    out = []
    best = math.inf
    for s in pts:
        l = problem.loss(s)
        if l < best - EPS:
            out.append((problem.latency(s), l, list(s)))
            best = l
    return out


__all__ = ["EPS", "pareto_of", "problem_fingerprint"]
