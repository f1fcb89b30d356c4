"""Search: strategies against brute force on small synthetic houses, the contract (no budget
violations), swapping by config / --plugin, and Optuna studies shared by processes (SQLite, and a
real PostgreSQL server when BESPOKE_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from bespoke import UsageError
from bespoke.plugins import load_registry
from bespoke.search import (RealScore, build_problem, check_solution, exact_front, exhaustive,
                            fastest_latency, greedy_solution, make_report, optimum, problem_to_dict,
                            read_report, report_table, rerank, resolve_budgets, run_strategy,
                            write_report)

ROOT = Path(__file__).resolve().parents[1]


def synthetic(seed: int, n_points: int = 14, n_segments: int = 7, alts: int = 3, lam: float = 1.0):
    """A small house: overlapping segments over ``n_points`` cut points, ``alts`` alternatives
    each (faster ones lose more, with noise). ``lam`` = 1 so the 1% score tolerance is tight."""
    rng = random.Random(seed)
    point_ms = [rng.uniform(0.5, 2.0) for _ in range(n_points)]
    teacher = sum(point_ms) + 1.0  # stem and head never replaced
    segs: set[tuple[int, int]] = set()
    while len(segs) < n_segments:
        a = rng.randrange(0, n_points - 1)
        segs.add((a, rng.randrange(a + 1, min(n_points, a + 5) + 1)))
    seg_ms, altmap, alt_ms, alt_loss = {}, {}, {}, {}
    for a, b in sorted(segs):
        sid = f"{a}-{b}"
        seg_ms[sid] = sum(point_ms[a:b])
        for k in range(alts):
            aid = f"{sid}.alt{k}"
            altmap[aid] = sid
            alt_ms[aid] = seg_ms[sid] * rng.uniform(0.2, 0.95)
            alt_loss[aid] = rng.uniform(0.1, 3.0) * (1 - alt_ms[aid] / seg_ms[sid])
    return build_problem(teacher, seg_ms, altmap, alt_ms, alt_loss, lam=lam)


def feasible_budgets(problem):
    """Three budgets between the fastest reachable latency and the teacher's (all feasible)."""
    fast = fastest_latency(problem)
    return [fast + f * (problem.teacher_ms - fast) for f in (0.1, 0.35, 0.65)]


STRATEGIES = {
    "exact": ("exact", {}),
    "greedy": ("greedy", {}),
    "random": ("random", {"samples": 20000}),
    "annealing": ("annealing", {}),
    "optuna-constrained": ("optuna", {"n_trials": 150}),
    "optuna-pareto": ("optuna", {"mode": "pareto", "n_trials": 400}),
}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


# --------------------------------------------------------------------------------------------
# Exact solvers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_exact_front_matches_exhaustive(seed):
    p = synthetic(seed)
    for b in feasible_budgets(p) + [p.teacher_ms * 0.3]:
        ex = exhaustive(p, b)
        op = optimum(p, b)
        assert ex.meta["feasible"] == op.meta["feasible"]
        if ex.meta["feasible"]:
            assert op.loss == pytest.approx(ex.loss, abs=1e-9)
    front = exact_front(p)
    lats = [f[0] for f in front]
    assert lats == sorted(lats)
    assert all(a[1] > b[1] for a, b in zip(front, front[1:]))  # faster costs strictly more loss


# --------------------------------------------------------------------------------------------
# Every strategy: close to optimal, never over budget
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "greedy"])
def test_strategy_within_1pct_of_exhaustive(registry, strategy):
    name, options = STRATEGIES[strategy]
    impl = registry.instantiate(name, options, category="search")
    for seed in range(3):
        p = synthetic(seed)
        budgets = feasible_budgets(p)
        sols = run_strategy(impl, p, budgets, seed=0, name=name)
        for b, s in zip(budgets, sols):
            best = exhaustive(p, b)
            assert s.meta["feasible"] and p.feasible(s.chosen, b), (strategy, seed, b)
            assert p.score(s.chosen, b) <= 1.01 * p.score(best.chosen, b), (strategy, seed, b, s.loss, best.loss)


def test_greedy_baseline_gap_to_exhaustive(registry):
    """Greedy is the baseline, a heuristic: not within 1% everywhere (that is what the other
    strategies are for). Held to: always feasible, optimal on most instances, never far off."""
    impl = registry.instantiate("greedy", {}, category="search")
    ratios = []
    for seed in range(20):
        p = synthetic(seed)
        budgets = feasible_budgets(p)
        for b, s in zip(budgets, run_strategy(impl, p, budgets, name="greedy")):
            assert p.feasible(s.chosen, b)
            ratios.append(p.score(s.chosen, b) / p.score(exhaustive(p, b).chosen, b))
    assert sum(r <= 1.01 for r in ratios) >= 0.8 * len(ratios)
    assert max(ratios) < 1.5


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_no_budget_violation_exhaustive_check(registry, strategy):
    name, options = STRATEGIES[strategy]
    options = dict(options)
    if name == "optuna":
        options["n_trials"] = 40
    if name == "annealing":
        options["steps"] = 300
    impl = registry.instantiate(name, options, category="search")
    for seed in range(10, 14):
        p = synthetic(seed, n_segments=6, alts=2)
        fast = fastest_latency(p)
        budgets = [fast * 0.95, fast, fast * 1.01, (fast + p.teacher_ms) / 2]
        sols = impl.search(p, budgets, seed=seed)
        assert len(sols) == len(budgets)
        for b, s in zip(budgets, sols):
            assert check_solution(p, s) == []
            if exhaustive(p, b).meta["feasible"]:
                assert p.feasible(s.chosen, b) and s.meta.get("feasible", True)
            else:
                assert s.meta["feasible"] is False
                assert s.meta["fastest_ms"] == pytest.approx(fast)


def test_infeasible_budget_reports_fastest(registry, tmp_path, capsys):
    p = synthetic(3)
    sols = registry.instantiate("greedy", {}).search(p, [1e-3])
    assert sols[0].meta["feasible"] is False
    assert sols[0].latency_ms == pytest.approx(fastest_latency(p))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def test_budgets_ratio_or_ms():
    assert resolve_budgets([0.5, 1.0, 12.5], 20.0) == [10.0, 20.0, 12.5]
    with pytest.raises(UsageError):
        resolve_budgets([0.0], 20.0)


def test_build_problem_errors_name_the_alternative():
    with pytest.raises(UsageError, match="a1.*no latency"):
        build_problem(10.0, {"0-2": 3.0}, {"a1": "0-2"}, {}, {"a1": 0.1})
    with pytest.raises(UsageError, match="START-END"):
        build_problem(10.0, {"x": 3.0}, {"a1": "x"}, {"a1": 1.0}, {"a1": 0.1})
    p = build_problem(10.0, {"0-2": 3.0}, {"a1": "0-2", "slow": "0-2"}, {"a1": 1.0, "slow": 4.0},
                      {"a1": 0.1, "slow": 0.2})
    assert [c.alternative for c in p.candidates] == ["a1"]  # slower and lossier: dropped


def test_greedy_feasible_and_rerank_uses_real_scores(registry):
    p = synthetic(4)
    b = feasible_budgets(p)[1]
    assert p.feasible(greedy_solution(p, b), b)
    sol = registry.instantiate("random", {"top_k": 3}).search(p, [b], seed=1)[0]
    assert len(sol.meta["top"]) == 3
    worst = sol.meta["top"][-1]
    picked, table = rerank(p, sol, lambda ch: RealScore(fidelity=1.0 if ch == worst else 0.5), k=3)
    assert picked.chosen == worst and len(table) == 3
    # a candidate whose measured latency breaks the budget is not picked
    picked, _ = rerank(p, sol, lambda ch: RealScore(fidelity=1.0 if ch == worst else 0.5,
                                                    latency_ms=b * 2 if ch == worst else None), k=3)
    assert picked.chosen != worst
    # every candidate measured over the budget: the fastest, not the most faithful
    over = {tuple(ch): b * (1.5 + 0.1 * i) for i, ch in enumerate(sol.meta["top"])}
    picked, table = rerank(p, sol, lambda ch: RealScore(fidelity=1.0 if ch == worst else 0.5,
                                                        latency_ms=over[tuple(ch)]), k=3)
    assert picked.chosen == sol.meta["top"][0] and not any(t["within_budget"] for t in table)
    # a ratio measured beside the teacher is read against the problem's teacher latency
    picked, table = rerank(p, sol, lambda ch: RealScore(fidelity=1.0 if ch == worst else 0.5,
                                                        latency_ratio=2.0 if ch == worst else 0.0), k=3)
    assert picked.chosen != worst
    assert next(t for t in table if t["chosen"] == worst)["measured_ms"] == 2.0 * p.teacher_ms
    assert picked.meta["reranked"][picked.meta["picked"]]["chosen"] == picked.chosen


def test_rerank_times_lazily_best_fidelity_first_and_picks_as_if_all_were_timed(registry):
    p = synthetic(4)
    b = feasible_budgets(p)[1]
    sol = registry.instantiate("random", {"top_k": 3}).search(p, [b], seed=1)[0]
    top = [tuple(c) for c in sol.meta["top"]]
    fid = {c: 0.9 - 0.1 * i for i, c in enumerate(reversed(top))}  # the last proxy candidate scores best

    def run(ms):
        timed = []

        def evaluate(ch):
            c = tuple(ch)
            return RealScore(fidelity=fid[c], timer=lambda: timed.append(c) or ms[c] / p.teacher_ms)

        eager, _ = rerank(p, sol, lambda ch: RealScore(fidelity=fid[tuple(ch)], latency_ms=ms[tuple(ch)]), k=3)
        lazy, table = rerank(p, sol, evaluate, k=3)
        assert lazy.chosen == eager.chosen  # the same pick as timing every candidate
        return timed, table

    best, second, third = sorted(top, key=lambda c: -fid[c])
    # the best candidate fits: it alone is timed; the others' rows say they were not
    timed, table = run({c: b * 0.9 for c in top})
    assert timed == [best]
    assert sorted(t.get("timed", True) for t in table) == [False, False, True]
    assert all(t["measured_ms"] is None for t in table if t.get("timed") is False)
    # the best measures over the budget: the next is timed, and picked
    timed, _ = run({c: b * (1.5 if c == best else 0.9) for c in top})
    assert timed == [best, second]
    # every one over: all timed, the fastest kept
    timed, table = run({c: b * (1.5 + 0.1 * i) for i, c in enumerate(top)})
    assert sorted(timed) == sorted(top) and not any(t["within_budget"] for t in table)


def test_pick_scored_prefers_fidelity_within_budget_then_speed():
    from bespoke.search import pick_scored

    def row(fid, ok, ms, pred=1.0):
        return {"fidelity": fid, "within_budget": ok, "measured_ms": ms, "predicted_ms": pred}

    assert pick_scored([row(0.9, True, 5), row(0.95, False, 4), row(0.92, True, 6)]) == 2
    # none within the budget: the fastest (measured, else predicted), fidelity breaking ties
    assert pick_scored([row(0.9, False, 7), row(0.8, False, None, pred=6), row(0.99, False, 8)]) == 1
    assert pick_scored([row(0.5, False, 6), row(0.7, False, 6)]) == 1
    with pytest.raises(ValueError):
        pick_scored([])
    # the latency keys are the caller's (ratios across input sizes)
    ratios = [{"fidelity": 0.9, "within_budget": False, "r": 0.8, "p": 0.7},
              {"fidelity": 0.9, "within_budget": False, "r": None, "p": 0.75}]
    assert pick_scored(ratios, measured="r", predicted="p") == 1


def test_report_roundtrip_and_table(registry, tmp_path):
    p = synthetic(5)
    budgets = [0.6, 0.8]
    sols = registry.instantiate("optuna", {"mode": "pareto", "n_trials": 60}).search(
        p, resolve_budgets(budgets, p.teacher_ms))
    rep = make_report(p, budgets, sols, strategy="optuna", proxy="replace-one")
    written = write_report(rep, tmp_path / "search.json")
    assert [w.name for w in written] == ["search.json", "search.budget-0.6.json", "search.budget-0.8.json"]
    again = read_report(written[0])
    assert again == rep and again.schema_version == 1 and len(again.front) >= 1
    recipe = json.loads(written[1].read_text())
    assert recipe["kind"] == "bespoke.search-recipe" and recipe["budget"] == 0.6
    assert report_table(rep).row_count == 2


# --------------------------------------------------------------------------------------------
# Swapping the strategy: config key or --plugin, nothing else
# --------------------------------------------------------------------------------------------


def _problem_file(tmp_path: Path, seed: int = 0) -> Path:
    path = tmp_path / "problem.json"
    path.write_text(json.dumps(problem_to_dict(synthetic(seed))))
    return path


@pytest.mark.parametrize("how", ["flag", "config"])
def test_swap_strategy_by_flag_or_config(cli, tmp_path, how):
    prob = _problem_file(tmp_path)
    out = tmp_path / "out" / "search.json"
    args = ["search", str(prob), "--budget", "0.7,0.8", "-o", str(out)]
    if how == "flag":
        args += ["--plugin", "annealing"]
    else:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("plugins:\n  search: greedy\n")
        args += ["--config", str(cfg)]
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = read_report(out)
    assert rep.strategy == ("annealing" if how == "flag" else "greedy")
    assert [res.budget for res in rep.results] == [0.7, 0.8]
    assert all(res.latency_ms <= res.budget_ms + 1e-9 for res in rep.results if res.feasible)
    assert "proxy loss" in r.stdout


def test_cli_search_unknown_strategy_is_clear(cli, tmp_path):
    r = cli("search", str(_problem_file(tmp_path)), "--plugin", "no-such", "-o", str(tmp_path / "s.json"))
    assert r.returncode == 2 and "no-such" in r.stderr + r.stdout and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# Optuna studies shared by processes, resumed after SIGKILL
# --------------------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from bespoke.search import problem_from_dict
    from bespoke_plugins.search_optuna import OptunaOptions, OptunaSearch
    problem_path, storage, study, n_trials, go, mode = sys.argv[1:7]
    problem = problem_from_dict(json.loads(Path(problem_path).read_text()))
    while go != "-" and not Path(go).exists():  # start together
        time.sleep(0.01)
    opts = OptunaOptions(storage=storage, study=study, n_trials=int(n_trials), mode=mode, heartbeat_interval=5)
    OptunaSearch(opts).search(problem, [0.7 * problem.teacher_ms], seed=0)
""")


def _workers(tmp_path: Path, storage: str, study: str, n_trials: int, n: int, mode: str = "pareto"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    prob = _problem_file(tmp_path, seed=7)
    go = tmp_path / f"go-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(script), str(prob), storage, study, str(n_trials), str(go), mode],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    return procs, go


def _study_trials(storage: str, study: str):
    import optuna

    name = f"{study}:pareto"
    summaries = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith(study)]
    return summaries, optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _check_cooperation(tmp_path: Path, storage: str):
    from optuna.trial import TrialState

    study = f"coop-{uuid.uuid4().hex[:8]}"
    procs, go = _workers(tmp_path, storage, study, n_trials=80, n=2)
    time.sleep(0.5)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    names, trials = _study_trials(storage, study)
    assert names == [f"{study}:pareto"]  # one study
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2, workers  # both processes contributed
    assert 80 <= len(complete) <= 82  # they stop together at n_trials (one in flight each)


def _check_kill_resume(tmp_path: Path, storage: str):
    import optuna
    from optuna.trial import TrialState

    study = f"resume-{uuid.uuid4().hex[:8]}"
    (proc,), go = _workers(tmp_path, storage, study, n_trials=100_000, n=1)
    go.touch()
    name = f"{study}:pareto"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline:
        try:
            done = len(optuna.load_study(study_name=name, storage=storage).get_trials(
                deepcopy=False, states=(TrialState.COMPLETE,)))
        except KeyError:  # not created yet
            done = 0
        if done >= 20:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and done >= 20
    before = {t.number for t in optuna.load_study(study_name=name, storage=storage).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,))}
    target = len(before) + 30
    (proc,), go = _workers(tmp_path, storage, study, n_trials=target, n=1)
    go.touch()
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    names, trials = _study_trials(storage, study)
    assert names == [name]
    after = [t for t in trials if t.state == TrialState.COMPLETE]
    assert before <= {t.number for t in after}  # nothing lost
    assert len(after) >= target  # and it went on to the total
    assert len({t.user_attrs["worker"] for t in after}) == 2  # the killed and the restarted worker


def test_optuna_two_processes_share_one_sqlite_study(tmp_path):
    _check_cooperation(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}")


def test_optuna_killed_search_resumes_sqlite_study(tmp_path):
    _check_kill_resume(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}")


def test_cli_search_storage_and_study_resume(cli, tmp_path):
    """`bespoke search --storage URL --study NAME` twice: the second run reuses the finished study."""
    prob = _problem_file(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("plugin_options:\n  optuna:\n    n_trials: 30\n")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    for _ in range(2):
        r = cli("search", str(prob), "--budget", "0.7", "--storage", url, "--study", "s1", "-c", str(cfg),
                "-o", str(tmp_path / "search.json"))
        assert r.returncode == 0, r.stdout + r.stderr
    import optuna

    (summary,) = optuna.get_all_study_summaries(url)
    assert summary.study_name.startswith("s1:constrained:") and summary.n_trials == 30
    assert read_report(tmp_path / "search.json").results[0].meta["trials"] == 30
    assert not (tmp_path / "optuna.db").exists()  # the default file is not used when a URL is given


POSTGRES_URL = os.environ.get("BESPOKE_TEST_POSTGRES_URL")
if POSTGRES_URL:  # the same driver choice the plugin makes, for the test's own reads
    from bespoke_plugins.search_optuna import normalize_url

    POSTGRES_URL = normalize_url(POSTGRES_URL)
needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="set BESPOKE_TEST_POSTGRES_URL (see .ci/postgres.sh)")


@pytest.mark.postgres
@needs_postgres
def test_optuna_two_processes_share_one_postgres_study(tmp_path):
    _check_cooperation(tmp_path, POSTGRES_URL)


@pytest.mark.postgres
@needs_postgres
def test_optuna_killed_search_resumes_postgres_study(tmp_path):
    _check_kill_resume(tmp_path, POSTGRES_URL)


def test_problem_from_house_records_and_proxy():
    from types import SimpleNamespace

    from bespoke import AlternativeSpec
    from bespoke.house import AlternativeRecord
    from bespoke.search import problem_from_house

    spec = AlternativeSpec(source="skip", kind="skip", label="skip")
    recs = [AlternativeRecord(id="a", segment="0-2", source="skip", spec=spec, status="trained",
                              agreement=0.9, distill_error=0.2, kl=0.03),
            AlternativeRecord(id="b", segment="2-4", source="skip", spec=spec, status="failed"),
            AlternativeRecord(id="c", segment="2-4", source="skip", spec=spec, status="trained",
                              agreement=0.95, distill_error=0.05, kl=0.01)]
    house = SimpleNamespace(alternatives=recs)
    seg_ms, alt_ms = {"0-2": 3.0, "2-4": 2.0}, {"a": 1.0, "b": 1.0, "c": 0.5}
    p = problem_from_house(house, seg_ms, alt_ms, 10.0)
    assert [(c.alternative, round(c.loss, 6)) for c in p.candidates] == [("a", 10.0), ("c", 5.0)]
    p = problem_from_house(house, seg_ms, alt_ms, 10.0, proxy="distill-error")
    assert [round(c.loss, 6) for c in p.candidates] == [0.2, 0.05]
    p = problem_from_house(house, seg_ms, alt_ms, 10.0, proxy="replace-one-kl")
    assert [round(c.loss, 6) for c in p.candidates] == [3.0, 1.0]


def test_run_goes_on_with_met_budgets_and_refuses_when_none_is_met():
    """`bespoke run`: an unmet budget beside met ones is a warning, alone it is an error."""
    import io

    from rich.console import Console

    from bespoke.errors import UsageError
    from bespoke.stages.search import require_feasible
    from bespoke.search import BudgetResult

    def result(budget, feasible):
        return BudgetResult(budget=budget, budget_ms=100 * budget, feasible=feasible, latency_ms=60.0,
                            loss=1.0, score=1.0, speedup=1.6, fastest_ms=None if feasible else 60.0,
                            choices=[])

    class Found:
        teacher_ms = 100.0
        front = []

    found = Found()
    found.results = [result(0.5, False), result(0.7, True)]
    buf = io.StringIO()
    met = require_feasible(found, Console(file=buf, width=200))
    assert [r.budget for r in met] == [0.7]
    assert "budget 0.5" in buf.getvalue() and "60.00 ms" in buf.getvalue()
    found.results = [result(0.5, False)]
    with pytest.raises(UsageError, match="fastest student this model house allows runs in 60.00 ms"):
        require_feasible(found)


def test_pick_images_are_kept_up_to_the_byte_limit_then_decoded_per_pass():
    import torch

    from bespoke.stages.pick import DecodedBatches

    calls = []

    def batches(key):
        def make():
            calls.append(key)
            return (torch.full((2, 3), float(key + i)) for i in range(3))
        return make

    one = 3 * 2 * 3 * 4  # three float32 batches of 2 x 3
    cache = DecodedBatches(limit=2 * one)
    first = cache.get(1, batches(1), one)
    assert cache.get(1, batches(1), one) is first and calls == [1]  # kept: decoded once
    cache.get(2, batches(2), one)
    assert cache.bytes == 2 * one
    over = cache.get(3, batches(3), one)  # past the limit: not kept, decoded on every pass
    assert 3 not in cache.kept and calls == [1, 2]
    passes = [[float(b[0, 0]) for b in over] for _ in range(2)]
    assert passes == [[3.0, 4.0, 5.0]] * 2 and calls == [1, 2, 3, 3]


def test_final_pick_remeasures_near_the_budget_and_scores_on_more_images():
    """refine_finalists: finalists measured near the budget (either side) are timed again and
    judged by the median; those within (or near) are scored on more images; far ones are not."""
    from types import SimpleNamespace

    from bespoke.config import SearchConfig
    from bespoke.stages.pick import refine_finalists
    from bespoke.search import pick_scored

    class Stage:
        timed, scored = [], []

        def ratio_of(self, choices, size):
            self.timed.append(size)
            return {240: 0.79, 224: 0.83}[size]

        def pick_fidelity(self, choices, size):
            self.scored.append(size)
            return {240: 0.90, 224: 0.95, 192: 0.50}[size]

    def result(feasible=True):
        return SimpleNamespace(feasible=feasible, choices=[])

    finalists = [(240, result()), (224, result()), (192, result()), (260, result(False))]
    rows = [{"fidelity": 0.96, "measured_ratio": 0.81, "within_budget": False},  # just over: timed again
            {"fidelity": 0.97, "measured_ratio": 0.79, "within_budget": True},  # just under: timed again
            {"fidelity": 0.93, "measured_ratio": 0.60, "within_budget": True},  # far under: as it was
            {"fidelity": 0.99, "measured_ratio": 0.95, "within_budget": False}]  # infeasible: untouched
    cfg = SimpleNamespace(search=SearchConfig(pick_train_images=5, pick_remeasure=2, pick_margin=0.03))
    stage = Stage()
    refine_finalists(cfg, stage, finalists, rows, 0.8)
    assert sorted(stage.timed) == [224, 224, 240, 240]
    assert rows[0]["measured_ratios"] == [0.81, 0.79, 0.79] and rows[0]["within_budget"]
    assert rows[1]["measured_ratio"] == 0.83 and not rows[1]["within_budget"]
    assert "measured_ratios" not in rows[2] and rows[2]["within_budget"]
    assert sorted(stage.scored) == [192, 224, 240]  # 224 is near the budget: scored too
    assert rows[0]["fidelity"] == 0.90 and rows[0]["proxy_fidelity"] == 0.96 and rows[3]["fidelity"] == 0.99
    assert finalists[pick_scored(rows, measured="measured_ratio", predicted="measured_ratio")][0] == 240
    # off by default: nothing is timed or scored again
    plain = [dict(r) for r in rows]
    refine_finalists(SimpleNamespace(search=SearchConfig()), Stage(), finalists, plain, 0.8)
    assert plain == rows


def test_pick_images_kept_as_pixels_are_the_eval_transform_bit_for_bit(imagenet_sample):
    """The final pick keeps its decoded images as 8-bit pixels (a quarter of float32's memory)
    and gives them back normalised exactly as timm's eval transform does."""
    import torch

    from bespoke.data import open_images, transforms_for
    from bespoke.finetune import iter_batches
    from bespoke.models import load_model
    from bespoke.stages.pick import Normalized, split_normalize, to_pixels

    model = load_model("tf_efficientnet_lite0", weights=None)
    photos = open_images(str(imagenet_sample / "val"), imagenet_sample / "classes.txt")
    photos = photos.subset(list(range(6)))
    full = transforms_for(model, 208)
    pixels, normalize = split_normalize(full)
    assert normalize is not None
    kept = [to_pixels(x) for x, _ in iter_batches(photos.with_transform(pixels), 4)]
    assert all(b.dtype == torch.uint8 for b in kept)
    expected = [x for x, _ in iter_batches(photos.with_transform(full), 4)]
    for _ in range(2):  # every pass gives the same batches
        got = list(Normalized(kept, normalize))
        assert len(got) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert split_normalize(pixels) == (pixels, None)  # no Normalize at the end: kept as is
