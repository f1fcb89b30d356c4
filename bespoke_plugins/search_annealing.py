"""Simulated annealing from a greedy start (the Bespoke reference method), with a normalised
temperature.

Score to minimise (the reference): ``max(L / L*, 1) + lambda * loss``, L* the budget. A move
removes one or more chosen pairs at random (1 + a geometric number, p = 1/2) and refills with
random pairs drawn from those still compatible until the budget is met (with probability
``extra_prob``, up to as many as it removed even when within budget).

Temperature: the reference used raw constants, which only suit one scale of latencies and losses.
Here the start temperature is measured: ``T0 = -mean(uphill delta) / ln(accept0)`` over a sample
of moves from the start state, so a typical worsening move is accepted with probability
``accept0`` at the start whatever the units; it cools geometrically to ``T0 * final_ratio``.
Restart 0 starts from greedy; each further restart reheats from the best solution so far. Each
restart ends with a local descent from the best (``polish``; drop / swap-in / exchange / ruin and
recreate moves of :func:`bespoke.search.improve`), which finds the last exchange the random moves
tend to miss when the optimum sits right at the budget.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from typing import Sequence

from pydantic import Field

from bespoke.api import (PluginOptions, PluginRecord, SearchProblem, Solution, conflicts, finalize,
                        greedy_solution, hookimpl, improve)


class AnnealingOptions(PluginOptions):
    steps: int = Field(5000, ge=1, description="annealing steps per restart")
    restarts: int = Field(2, ge=1, description="runs: the first from greedy, later ones reheat from the best so far")
    accept0: float = Field(0.8, gt=0, lt=1, description="start acceptance probability of a typical uphill move")
    final_ratio: float = Field(1e-3, gt=0, lt=1, description="final temperature as a fraction of the start one")
    lam: float | None = Field(None, ge=0, description="weight of the loss in the score; default: the problem's (0.1)")
    top_k: int = Field(3, ge=1, description="distinct feasible solutions kept for re-ranking")
    extra_prob: float = Field(0.1, ge=0, le=1, description="chance that a refill adds up to as many random pairs as were removed even when already within budget (otherwise it refills only to the budget)")
    polish: bool = Field(True, description="end each restart with a local descent (bespoke.search.improve) from the best")


class Annealing:
    def __init__(self, options: AnnealingOptions | None = None):
        self.options = options or AnnealingOptions()

    def search(self, problem: SearchProblem, budgets_ms: Sequence[float], *, seed: int = 0,
               workdir: str | None = None) -> list[Solution]:
        conf = conflicts(problem)
        out = []
        for bi, b in enumerate(budgets_ms):
            t0 = time.perf_counter()
            rng = random.Random(seed * 1_000_003 + bi)
            best, top, steps, temp0 = self._anneal(problem, b, conf, rng)
            out.append(finalize(problem, b, best, {
                "strategy": "annealing", "top": top, "evaluations": steps,
                "start_temperature": temp0, "wall_s": time.perf_counter() - t0}))
        return out

    def _anneal(self, problem: SearchProblem, budget: float, conf, rng: random.Random):
        o = self.options
        cs = problem.candidates
        lam = problem.lam if o.lam is None else o.lam
        useful = [i for i, c in enumerate(cs) if c.saving_ms > 0 or c.loss < 0]
        if not useful:
            return [], [[]], 0, 0.0

        def score(lat: float, loss: float) -> float:
            return max(lat / budget, 1.0) + lam * loss

        def move(chosen: set[int], lat: float, loss: float):
            new = set(chosen)
            r = 1
            while rng.random() < 0.5:
                r += 1
            if new:
                for i in rng.sample(sorted(new), min(r, len(new))):
                    new.discard(i)
                    lat += cs[i].saving_ms
                    loss -= cs[i].loss
            want = rng.randint(0, r) if rng.random() < self.options.extra_prob else 0
            # refill from the pairs still compatible (drawing blindly from all pairs mostly hits
            # overlapping ones once a few are chosen, and leaves the state over budget)
            free = [i for i in useful if i not in new and conf[i].isdisjoint(new)]
            while (want > 0 or lat > budget) and free:
                i = free.pop(rng.randrange(len(free)))
                new.add(i)
                lat -= cs[i].saving_ms
                loss += cs[i].loss
                want -= 1
                free = [j for j in free if j not in conf[i]]
            return new, lat, loss

        start = set(greedy_solution(problem, budget, conf))
        best: tuple[float, float, tuple[int, ...]] | None = None  # (loss, lat, chosen), feasible
        heap: list[tuple[float, tuple[int, ...]]] = []  # max-heap by -loss of distinct feasible sets
        inheap: set[tuple[int, ...]] = set()

        def record(chosen: set[int], lat: float, loss: float) -> None:
            nonlocal best
            if lat > budget + 1e-9:
                return
            key = tuple(sorted(chosen))
            if best is None or (loss, lat) < best[:2]:
                best = (loss, lat, key)
            if key in inheap:
                return
            if len(heap) < o.top_k:
                heapq.heappush(heap, (-loss, key))
                inheap.add(key)
            elif -heap[0][0] > loss:
                _, old = heapq.heapreplace(heap, (-loss, key))
                inheap.discard(old)
                inheap.add(key)

        total = 0
        temp0_first = 0.0
        for restart in range(o.restarts):
            cur = set(best[2]) if (restart > 0 and best is not None) else set(start)
            lat = problem.latency(list(cur))
            loss = problem.loss(list(cur))
            cur_score = score(lat, loss)
            record(cur, lat, loss)
            ups = []
            for _ in range(100):
                _, l2, s2 = move(cur, lat, loss)
                d = score(l2, s2) - cur_score
                if d > 0:
                    ups.append(d)
            temp0 = (sum(ups) / len(ups) if ups else 1e-3 * cur_score) / -math.log(o.accept0)
            temp0_first = temp0_first or temp0
            decay = o.final_ratio ** (1.0 / max(1, o.steps - 1))
            temp = temp0
            for _ in range(o.steps):
                new, l2, s2 = move(cur, lat, loss)
                d = score(l2, s2) - cur_score
                if d <= 0 or rng.random() < math.exp(-d / temp):
                    cur, lat, loss, cur_score = new, l2, s2, cur_score + d
                    record(cur, lat, loss)
                temp *= decay
            total += o.steps
            if o.polish and best is not None:
                pol = improve(problem, best[2], budget, conf)
                record(pol, problem.latency(list(pol)), problem.loss(list(pol)))
        top = [list(k) for _, k in sorted(heap, key=lambda e: -e[0])]
        return (list(best[2]) if best else None), top, total, temp0_first


@hookimpl
def register_search_strategies(register):
    register(PluginRecord(name="annealing", category="search", factory=Annealing,
                          options_model=AnnealingOptions,
                          description="Simulated annealing from a greedy start (the Bespoke reference method)"))
