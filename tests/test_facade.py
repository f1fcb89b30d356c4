"""The plugin facade (:class:`bespoke.plugins.Registry`): plugins are made only through its typed
methods, options they do not take are refused with a message, and what they return is checked
where it crosses into bespoke, each breach a UsageError naming the plugin."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pydantic import Field
from rich.console import Console
from torch import nn

from bespoke import AlternativeSpec, DeviceInfo, PluginOptions, PluginRecord, SegmentInfo, Solution, hookimpl
from bespoke.errors import UsageError
from bespoke.latency import make_query
from bespoke.plugins import load_registry
from bespoke.search import build_problem, make_solution, run_strategy


def _problem():
    # two segments, one alternative each: candidates 0 and 1
    return build_problem(10.0, {"0-2": 3.0, "2-4": 3.0}, {"a": "0-2", "b": "2-4"}, {"a": 1.0, "b": 2.0},
                         {"a": 0.1, "b": 0.2})


class _Strategy:
    def __init__(self, answer):
        self.answer = answer

    def search(self, problem, budgets_ms, *, seed=0, workdir=None):
        return self.answer(problem, budgets_ms)


def _registry_with(**plugins):
    """A registry with in-process plugins: ``name=(category, factory, options_model)``."""
    hooks = {"search": "register_search_strategies", "latency": "register_latency_estimators",
             "block-source": "register_block_sources"}

    class P:
        pass

    for category in {c for c, _, _ in plugins.values()}:
        def register_all(register, _category=category):
            for name, (c, factory, options) in plugins.items():
                if c == _category:
                    register(PluginRecord(name=name, category=c, factory=factory, options_model=options))

        setattr(P, hooks[category], staticmethod(hookimpl(specname=hooks[category])(register_all)))
    return load_registry(extra_plugins=[P])


# -- search strategies ------------------------------------------------------------------------


def test_a_strategy_returning_none_is_an_error_naming_it():
    reg = _registry_with(**{"says-none": ("search", lambda o: _Strategy(lambda p, b: None), None)})
    strategy = reg.search_strategy("says-none")
    with pytest.raises(UsageError, match=r"search strategy 'says-none' returned NoneType"):
        run_strategy(strategy, _problem(), [8.0], name="says-none")


def test_a_strategy_choosing_an_unknown_candidate_is_an_error_naming_it():
    def answer(problem, budgets):
        return [Solution(chosen=[0, 7], latency_ms=5.0, loss=0.1, budget_ms=b) for b in budgets]

    reg = _registry_with(**{"makes-up": ("search", lambda o: _Strategy(answer), None)})
    with pytest.raises(UsageError, match=r"search strategy 'makes-up' chose unknown candidate\(s\) \[7\]"):
        reg.search_strategy("makes-up").search(_problem(), [8.0])


def test_a_strategy_returning_something_else_than_solutions_is_an_error_naming_it():
    reg = _registry_with(**{"dicts": ("search", lambda o: _Strategy(lambda p, b: [{"chosen": [0]}]), None)})
    with pytest.raises(UsageError, match=r"search strategy 'dicts' returned dict .*not a bespoke.Solution"):
        reg.search_strategy("dicts").search(_problem(), [8.0])


def test_a_strategy_without_top_is_reranked_on_its_own_pick_with_a_warning():
    from types import SimpleNamespace

    from bespoke.config import SearchConfig
    from bespoke.search import RealScore
    from bespoke.stages.search import rerank

    problem = _problem()
    sol = make_solution(problem, [0], 8.0, {"strategy": "no-top"})  # no meta["top"]
    scored = []

    def evaluate(candidates):
        scored.append([c.alternative for c in candidates])
        return RealScore(fidelity=0.9)

    buf = io.StringIO()
    cfg = SimpleNamespace(search=SearchConfig(rerank_top_k=3))
    (out,) = rerank(cfg, problem, [sol], evaluate, problem.teacher_ms, Console(file=buf, width=300),
                    strategy="no-top")
    assert "search strategy 'no-top' gives no meta['top']" in buf.getvalue()
    assert scored == [["a"]] and out.chosen == [0]
    # with meta["top"], every listed candidate is scored and no warning is given
    buf2, scored[:] = io.StringIO(), []
    sol = make_solution(problem, [0], 8.0, {"top": [[0], [1], [0, 1]]})
    rerank(cfg, problem, [sol], evaluate, problem.teacher_ms, Console(file=buf2, width=300), strategy="top")
    assert "meta['top']" not in buf2.getvalue() and len(scored) == 3


def test_a_budget_every_candidate_measures_over_is_searched_again_tighter():
    from types import SimpleNamespace

    from bespoke.config import SearchConfig
    from bespoke.search import RealScore
    from bespoke.stages.search import rerank

    problem = _problem()  # teacher 10 ms; a saves 2 ms, b saves 1 ms (predicted)

    def evaluate(candidates):  # every student measures 10 % slower than predicted
        predicted = problem.teacher_ms - sum(c.saving_ms for c in candidates)
        return RealScore(fidelity=1.0 - 0.1 * len(candidates), latency_ms=1.1 * predicted)

    asked = []

    def search_again(budget_ms):
        asked.append(budget_ms)
        return make_solution(problem, [0, 1] if budget_ms < 8.0 else [0], budget_ms, {})

    sol = make_solution(problem, [0], 8.5, {"top": [[0]]})  # a alone: 8 ms predicted, 8.8 measured
    buf = io.StringIO()
    for rounds, chosen in ((1, [0, 1]), (0, [0])):
        cfg = SimpleNamespace(search=SearchConfig(rerank_top_k=2, rerank_tighten=rounds))
        (out,) = rerank(cfg, problem, [sol], evaluate, problem.teacher_ms, Console(file=buf, width=300),
                        strategy="s", search_again=search_again)
        assert sorted(out.chosen) == chosen and out.budget_ms == 8.5  # judged by the budget as given
    assert asked == [pytest.approx(8.5 / 1.1)]  # only with rerank_tighten 1
    assert "searching again at 7.73 ms" in buf.getvalue()


def test_storage_is_passed_to_a_strategy_that_takes_it_and_refused_with_a_warning_otherwise():
    class WithStorage(PluginOptions):
        storage: str | None = None

    made = {}

    def factory(options):
        made["options"] = options
        return _Strategy(lambda p, b: [])

    reg = _registry_with(**{"keeps": ("search", factory, WithStorage), "forgets": ("search", factory, None)})
    warned = []
    reg.search_strategy("keeps", storage="sqlite:///s.db", warn=warned.append)
    assert made["options"].storage == "sqlite:///s.db" and warned == []
    reg.search_strategy("forgets", storage="sqlite:///s.db", study="x", warn=warned.append)
    assert made["options"] is None
    assert len(warned) == 2 and all("search strategy 'forgets'" in w for w in warned)
    assert "--storage" in warned[0] and "--study" in warned[1]


# -- latency estimators -----------------------------------------------------------------------


class _Estimator:
    def __init__(self, options, answer):
        self.options, self.answer = options, answer

    def device(self):
        return DeviceInfo(name="test", runtime="test", threads=1)

    def latencies(self, queries):
        return {q.key: self.answer for q in queries}


@pytest.mark.parametrize("answer, what", [(-1.0, "-1.0"), (math.nan, "nan"), (math.inf, "inf"),
                                          (None, "no latency")])
def test_an_estimator_answering_a_bad_latency_is_an_error_naming_it(answer, what):
    reg = _registry_with(**{"bad-clock": ("latency", lambda o: _Estimator(o, answer), None)})
    query = make_query(nn.Conv2d(3, 4, 1), (1, 3, 8, 8))
    with pytest.raises(UsageError, match=r"latency estimator 'bad-clock' gave") as exc:
        reg.latency_estimator("bad-clock").latencies([query])
    assert what in str(exc.value) and query.key in str(exc.value)


def test_an_estimator_leaving_a_query_out_is_an_error_naming_it():
    class Forgetful(_Estimator):
        def latencies(self, queries):
            return {queries[0].key: 1.0}

    reg = _registry_with(**{"forgetful": ("latency", lambda o: Forgetful(o, 1.0), None)})
    qs = [make_query(nn.Conv2d(3, c, 1), (1, 3, 8, 8)) for c in (4, 5)]
    with pytest.raises(UsageError, match=rf"'forgetful' gave no latency for query {qs[1].key}"):
        reg.latency_estimator("forgetful").latencies(qs)


def test_a_good_estimator_passes_through_with_its_other_attributes():
    reg = _registry_with(**{"fine": ("latency", lambda o: _Estimator(o, 0.0), None)})
    est = reg.latency_estimator("fine")
    q = make_query(nn.Identity(), (1, 3, 8, 8))
    assert est.latencies([q]) == {q.key: 0.0}  # zero is a latency (a skipped block)
    assert est.device().name == "test" and est.answer == 0.0 and est.options is None


def test_threads_go_to_an_estimator_that_takes_them_and_are_refused_with_a_warning_otherwise():
    class Threads(PluginOptions):
        threads: int | None = Field(None, ge=1)

    reg = _registry_with(**{"threaded": ("latency", lambda o: _Estimator(o, 1.0), Threads),
                            "fixed": ("latency", lambda o: _Estimator(o, 1.0), None)})
    warned = []
    assert reg.latency_estimator("threaded", threads=3, warn=warned.append).options.threads == 3
    assert reg.latency_estimator("threaded", {"threads": 2}, threads=3).options.threads == 2  # options win
    assert warned == []
    assert reg.latency_estimator("fixed", threads=3, warn=warned.append).options is None
    (line,) = warned
    assert "--threads 3" in line and "latency estimator 'fixed'" in line


# -- block sources ----------------------------------------------------------------------------


SEGMENT = SegmentInfo(start=0, end=2, in_shape=(1, 3, 8, 8), out_shape=(1, 4, 4, 4), in_stride=1, out_stride=2)


class _Source:
    def __init__(self, stride):
        self.stride = stride

    def propose(self, ctx, segment):
        return [AlternativeSpec(source="s", kind="conv", label="conv")]

    def rebuild(self, ctx, segment, spec):
        return nn.Conv2d(3, 4, 1, stride=self.stride)

    def create(self, ctx, segment, spec):
        return self.rebuild(ctx, segment, spec), spec


def test_a_block_source_whose_module_misses_the_segment_shapes_is_an_error_naming_it():
    reg = _registry_with(**{"wrong-stride": ("block-source", lambda o: _Source(1), None),
                            "right-stride": ("block-source", lambda o: _Source(2), None)})
    spec = AlternativeSpec(source="wrong-stride", kind="conv", label="conv")
    with pytest.raises(UsageError, match=r"block source 'wrong-stride' created 'conv' for segment 0-2, "
                                         r"which maps input \(1, 3, 8, 8\) to \(1, 4, 8, 8\), not to the "
                                         r"segment's output \(1, 4, 4, 4\)"):
        reg.block_source("wrong-stride").create(None, SEGMENT, spec)
    module, _ = reg.block_source("right-stride").create(None, SEGMENT, spec)
    assert module.training  # the check leaves the module's mode as it was
    assert module(torch.zeros(2, 3, 8, 8)).shape == (2, 4, 4, 4)


def test_block_sources_get_the_configured_donors_only_when_they_take_them():
    from bespoke.config import RunConfig

    class Donors(PluginOptions):
        donors: list[str] = []

    reg = _registry_with(**{"with-donors": ("block-source", lambda o: o, Donors),
                            "plain": ("block-source", lambda o: o, None)})
    cfg = RunConfig.model_validate({"donors": ["d1", "d2"], "plugins": {"block_sources": ["with-donors", "plain"]}})
    sources = reg.block_sources(cfg)
    assert sources["with-donors"].inner.donors == ["d1", "d2"] and sources["plain"].inner is None


# -- one counter ------------------------------------------------------------------------------


def test_one_flops_and_parameter_counter_serves_the_house_the_evaluation_and_the_block_sources():
    from bespoke import blocks, counting, evaluate, house

    assert evaluate.count_flops is counting.count_flops and blocks.count_flops is counting.count_flops
    assert evaluate.count_params is counting.count_params and blocks.count_parameters is counting.count_params
    conv = nn.Conv2d(3, 8, 1)
    conv.train()
    assert counting.count_flops(conv, (1, 3, 4, 4)) == 2 * 3 * 8 * 16 and conv.training
    assert house._flops(conv, (7, 3, 4, 4)) == 2 * 3 * 8 * 16  # the house counts at batch 1

    class Uncountable(nn.Module):
        def forward(self, x):
            raise RuntimeError("no")

    assert counting.count_flops(Uncountable(), (1, 3)) is None and house._flops(Uncountable(), (1, 3)) == 0
    shared = nn.Linear(4, 4)
    assert counting.count_params(nn.Sequential(shared, shared)) == 20  # shared parameters once
