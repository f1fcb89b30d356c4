"""Baseline search strategies: ``greedy`` and ``random`` (what every result is compared against)."""

from __future__ import annotations

import random as _random
import time
from typing import Sequence

from pydantic import Field

from bespoke import PluginOptions, PluginRecord, SearchProblem, Solution, hookimpl
from bespoke.search import conflicts, finalize, greedy_solution, top_k


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


@hookimpl
def register_search_strategies(register):
    register(PluginRecord(name="greedy", category="search", factory=Greedy,
                          options_model=GreedyOptions,
                          description="Greedy by loss per millisecond saved, then local improvement"))
    register(PluginRecord(name="random", category="search", factory=RandomSearch,
                          options_model=RandomOptions,
                          description="Random feasible solutions, best kept (the baseline)"))
