"""A search strategy: take candidates by least loss per millisecond saved until the budget is met;
the few best of a handful of such sets (each leaving out one early pick) go to re-ranking."""

from pydantic import Field

from bespoke.api import PluginOptions, PluginRecord, finalize, hookimpl, top_k


class LeastLossOptions(PluginOptions):
    top_k: int = Field(3, ge=1, description="distinct solutions handed to re-ranking per budget")


def _fill(problem, budget_ms, order, banned=()):
    """Compatible candidates in ``order`` until the predicted latency meets ``budget_ms``."""
    chosen = []
    for i in order:
        if problem.feasible(chosen, budget_ms):
            break
        if i not in banned and problem.candidates[i].saving_ms > 0 and problem.compatible(chosen, i):
            chosen.append(i)
    return chosen


class LeastLoss:
    def __init__(self, options: LeastLossOptions):
        self.options = options

    def search(self, problem, budgets_ms, *, seed=0, workdir=None):
        cands = problem.candidates
        order = sorted((i for i, c in enumerate(cands) if c.saving_ms > 0),
                       key=lambda i: cands[i].loss / cands[i].saving_ms)
        solutions = []
        for budget in budgets_ms:
            first = _fill(problem, budget, order)
            sets = [first] + [_fill(problem, budget, order, banned={i}) for i in first]
            feasible = [(problem.loss(s), s) for s in sets if problem.feasible(s, budget)]
            top = top_k(feasible, self.options.top_k)
            # finalize: the best feasible set (or None), made a Solution; it falls back to the
            # fastest reachable set, marked infeasible, when nothing meets the budget
            solutions.append(finalize(problem, budget, top[0] if top else None,
                                      {"strategy": "template-least-loss", "top": top}))
        return solutions


@hookimpl
def register_search_strategies(register):
    register(PluginRecord(name="template-least-loss", category="search", factory=LeastLoss,
                          options_model=LeastLossOptions, description="least loss per ms saved (template)"))
