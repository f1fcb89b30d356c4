"""Baseline search strategies: ``greedy`` and ``random`` (what every result is compared against),
and ``exact``: the optimum of the additive proxy problem by dynamic programming over cut points."""

from __future__ import annotations

import random as _random
import time
from typing import Sequence

from pydantic import Field

from bespoke.api import (PluginOptions, PluginRecord, SearchProblem, Solution, conflicts,
                        exact_front, finalize, greedy_solution, hookimpl, top_k)


class GreedyOptions(PluginOptions):
    top_k: int = Field(3, ge=1, description="distinct solutions kept for re-ranking")


class Greedy:
    """Least loss per ms saved until the budget is met, then local improvement (drop / swap-in)."""

    def __init__(self, options: GreedyOptions | None = None):
        self.options = options or GreedyOptions()

    def search(self, problem: SearchProblem, budgets_ms: Sequence[float], *, seed: int = 0,
               workdir: str | None = None) -> list[Solution]:
        conf = conflicts(problem)
        out = []
        for b in budgets_ms:
            t0 = time.perf_counter()
            ch = greedy_solution(problem, b, conf)
            feasible = problem.feasible(ch, b)
            out.append(finalize(problem, b, ch if feasible else None,
                                {"strategy": "greedy", "top": [ch] if feasible else [],
                                 "wall_s": time.perf_counter() - t0}))
        return out


class RandomOptions(PluginOptions):
    samples: int = Field(2000, ge=1, description="random solutions drawn per budget")
    top_k: int = Field(3, ge=1, description="distinct solutions kept for re-ranking")


class RandomSearch:
    """Random solutions: pairs in random order, each added when compatible, until the budget is
    met. The best feasible one (least loss) is kept."""

    def __init__(self, options: RandomOptions | None = None):
        self.options = options or RandomOptions()

    def search(self, problem: SearchProblem, budgets_ms: Sequence[float], *, seed: int = 0,
               workdir: str | None = None) -> list[Solution]:
        conf = conflicts(problem)
        cs = problem.candidates
        useful = [i for i, c in enumerate(cs) if c.saving_ms > 0 or c.loss < 0]
        out = []
        for bi, b in enumerate(budgets_ms):
            t0 = time.perf_counter()
            rng = _random.Random(seed * 1_000_003 + bi)
            found: list[tuple[float, list[int]]] = []
            for _ in range(self.options.samples):
                order = useful[:]
                rng.shuffle(order)
                chosen: set[int] = set()
                lat = problem.teacher_ms
                for i in order:
                    if lat <= b:
                        break
                    if conf[i].isdisjoint(chosen):
                        chosen.add(i)
                        lat -= cs[i].saving_ms
                if lat <= b + 1e-9:
                    found.append((problem.loss(list(chosen)), sorted(chosen)))
            top = top_k(found, self.options.top_k)
            out.append(finalize(problem, b, top[0] if top else None,
                                {"strategy": "random", "top": top, "evaluations": self.options.samples,
                                 "wall_s": time.perf_counter() - t0}))
        return out


class ExactOptions(PluginOptions):
    top_k: int = Field(3, ge=1, description="best distinct solutions under each budget kept for re-ranking")
    resolution_ms: float = Field(0.0, ge=0, description="merge Pareto points whose savings differ by less than this (0: exact; raise it for very large houses)")


class Exact:
    """The exact optimum of the additive problem: latency and loss are sums over non-overlapping
    segments, so a dynamic programme over cut points yields the whole Pareto front, and each
    budget reads its best point off it. Exact only for the additive proxy, like every strategy
    here; re-ranking by real evaluation covers what the proxy misses."""

    def __init__(self, options: ExactOptions | None = None):
        self.options = options or ExactOptions()

    def search(self, problem: SearchProblem, budgets_ms: Sequence[float], *, seed: int = 0,
               workdir: str | None = None) -> list[Solution]:
        t0 = time.perf_counter()
        front = exact_front(problem, self.options.resolution_ms)
        out = []
        for b in budgets_ms:
            fits = sorted((loss, lat, list(ch)) for lat, loss, ch in front if lat <= b + 1e-9)
            top = [ch for _, _, ch in fits[: self.options.top_k]]
            out.append(finalize(problem, b, top[0] if top else None,
                                {"strategy": "exact", "top": top, "front_size": len(front),
                                 "wall_s": time.perf_counter() - t0}))
        return out


@hookimpl
def register_search_strategies(register):
    register(PluginRecord(name="exact", category="search", factory=Exact, options_model=ExactOptions,
                          description="Exact optimum of the additive proxy (dynamic programme over cut points)"))
    register(PluginRecord(name="greedy", category="search", factory=Greedy,
                          options_model=GreedyOptions,
                          description="Greedy by loss per millisecond saved, then local improvement"))
    register(PluginRecord(name="random", category="search", factory=RandomSearch,
                          options_model=RandomOptions,
                          description="Random feasible solutions, best kept (the baseline)"))
