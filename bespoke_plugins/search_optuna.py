"""Optuna search (the default): a constrained single objective per budget, or one multi-objective
study (latency, loss) whose Pareto front serves every budget at once.

Encoding: one categorical parameter per teacher segment, ``seg:<start>-<end>``, whose choices are
``"-"`` (keep the teacher's) or one of that segment's alternative ids. Sampled segments overlap,
so a trial's raw choice may be inconsistent; it is *repaired* deterministically: the picked pairs
are kept in order of decreasing saving (ties: lower loss, then segment) and one that overlaps an
already kept pair is dropped. The repaired set is what the trial is scored on (and is stored in
the trial's user attributes, ``chosen``). One parameter per segment keeps the space static for
TPE / NSGA-II, and an overlap never makes a trial wasted: it just scores the repaired set.

Storage: any SQLAlchemy URL; by default an SQLite file ``optuna.db`` in the run directory. A study
is named ``<study>:<mode>[:<budget>]``; processes given the same storage and study name cooperate
(each stops once the study holds ``n_trials`` complete trials), and a killed search resumes the
same study. Heartbeats mark the trials of a killed worker failed and retry them once.

Polish (on by default): when the study is done, for each budget, (1) the best mix of the pairs
used by the ten best feasible and ten best nearly feasible (<= 5% over) trials, solved exactly on
that small pool (a recombination), and (2) local descents (:func:`bespoke.search.improve`) from
it and from the three best trials of each kind are enqueued and run as extra trials. TPE /
NSGA-II find the right region fast but rarely the last double exchange when the optimum sits right
at the budget.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import warnings
import os
import socket
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field

from bespoke.api import (PluginOptions, PluginRecord, SearchProblem, Solution, UsageError,
                        conflicts, finalize, greedy_solution, hookimpl, improve, optimum, pareto_of,
                        problem_fingerprint, top_k)

SKIP = "-"
_WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process ran a trial (shared studies)


class OptunaOptions(PluginOptions):
    mode: Literal["constrained", "pareto"] = Field(
        "constrained", description="constrained: one study per budget, loss minimised with latency <= "
        "budget as a constraint; pareto: one study over (latency, loss), one pick per budget from its front")
    n_trials: int = Field(300, ge=1, description="complete trials per study (all cooperating workers together)")
    timeout_s: float | None = Field(None, gt=0, description="stop this worker after this many seconds")
    sampler: Literal["tpe", "nsga2", "nsga3", "random", "gp"] | None = Field(
        None, description="default: tpe (multivariate, constraint-aware) for constrained, nsga2 for pareto")
    sampler_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the Optuna sampler")
    storage: str | None = Field(None, description="SQLAlchemy URL; default: sqlite:///<workdir>/optuna.db (in memory without a workdir)")
    study: str | None = Field(None, description="study name; default: bespoke-<problem fingerprint>")
    seed: int | None = Field(None, description="sampler seed; default: the run's seed")
    enqueue_greedy: bool = Field(True, description="enqueue the greedy solution of each budget as a first trial")
    heartbeat_interval: int | None = Field(60, ge=1, description="seconds; RDB storages only; stale trials of killed workers fail and are retried once")
    top_k: int = Field(3, ge=1, description="distinct feasible solutions kept for re-ranking")
    polish: bool = Field(True, description="after the study, enqueue a local descent (bespoke.search.improve) from the best trial of each budget as one more trial")


def _sampler(name: str, kwargs: dict[str, Any], seed: int, constraints):
    import warnings

    import optuna

    s = optuna.samplers
    if _HAS_SET_CONSTRAINT:  # Optuna >= 5 reads trial.set_constraint(); constraints_func is deprecated
        constraints = None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        if name == "tpe":
            kw = {"multivariate": True, "group": True, "n_startup_trials": 20, **kwargs}
            return s.TPESampler(seed=seed, constraints_func=constraints, **kw)
        if name == "nsga2":
            kw = {"population_size": 30, **kwargs}
            return s.NSGAIISampler(seed=seed, constraints_func=constraints, **kw)
        if name == "nsga3":
            kw = {"population_size": 30, **kwargs}
            return s.NSGAIIISampler(seed=seed, constraints_func=constraints, **kw)
        if name == "gp":
            return s.GPSampler(seed=seed, constraints_func=constraints, **kwargs)
        return s.RandomSampler(seed=seed, **kwargs)
    except TypeError as exc:
        raise UsageError(f"plugin_options.optuna.sampler_options {kwargs} do not fit Optuna's "
                         f"{name} sampler: {exc}") from None


def _has_set_constraint() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


_HAS_SET_CONSTRAINT = _has_set_constraint()


def _constraints(trial) -> Sequence[float]:
    return trial.user_attrs.get("constraint", [math.inf])


def storage_for(url: str | None, workdir: str | None, heartbeat: int | None):
    """An Optuna storage: in memory, or an RDB one with heartbeats and a retry of failed trials."""
    import optuna

    if url is None and workdir is None:
        return optuna.storages.InMemoryStorage(), "in-memory"
    if url is None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(workdir).resolve() / 'optuna.db'}"
    url = normalize_url(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # several processes on one SQLite file wait for the write lock instead of failing
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True
    hb: dict[str, Any] = {}
    if heartbeat:
        params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        # Optuna >= 4.9 names the retry hook heartbeat_stale_trial_callback and its callback
        # RetryHeartbeatStaleTrialCallback (RetryFailedTrialCallback is deprecated there)
        new_api = "heartbeat_stale_trial_callback" in params
        hook = "heartbeat_stale_trial_callback" if new_api else "failed_trial_callback"
        callback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) if new_api else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = (callback or optuna.storages.RetryFailedTrialCallback)(max_retry=1)
        hb = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat, hook: retry}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **hb)
            if url.startswith("sqlite"):
                _sqlite_pragmas(storage)
            break
        except ImportError:
            raise UsageError(f"no database driver for {_redact(url)}; for PostgreSQL: "
                             "pip install 'bespoke[postgres]'") from None
        except Exception as exc:  # bad URL, server down; or workers racing to create the schema
            if attempt < 5 and _is_race(exc):
                time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
                continue
            raise UsageError(f"cannot open the Optuna storage {_redact(url)}: {type(exc).__name__}: "
                             f"{exc}. Check the URL (e.g. postgresql://user:password@host/db) and "
                             "that the server runs") from None
    return storage, _redact(url)


def normalize_url(url: str) -> str:
    """``postgresql://`` picks a driver explicitly: SQLAlchemy 2.1 defaults to psycopg (3), 1.4/2.0
    to psycopg2; use whichever is installed (``bespoke[postgres]`` installs psycopg2-binary)."""
    import importlib.util

    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            rest = url[len(prefix):]
            for module, dialect in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
                if importlib.util.find_spec(module) is not None:
                    return f"postgresql+{dialect}://{rest}"
            return "postgresql://" + rest
    return url


def _sqlite_pragmas(storage) -> None:
    """WAL journal and fewer fsyncs: Optuna commits a dozen times per trial, and with SQLite's
    defaults each commit waits for the disk (0.5 s per trial measured here). WAL also lets
    readers proceed while one worker writes. Still durable across a killed process."""
    from sqlalchemy import event

    def on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections made while creating the schema lack the pragmas


def _is_race(exc: Exception) -> bool:
    """Errors two workers starting at once on a fresh storage can hit (both create the schema)."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("integrity", "unique", "locked", "already exists", "duplicate"))


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':')[0]}:***@{host}"
    return url


class Encoding:
    """Segment-categorical encoding with overlap repair (see the module docstring)."""

    def __init__(self, problem: SearchProblem):
        self.problem = problem
        self.by_seg: dict[str, list[int]] = {}
        for i, c in enumerate(problem.candidates):
            if c.saving_ms > 0 or c.loss < 0:
                self.by_seg.setdefault(c.segment, []).append(i)
        self.segments = sorted(self.by_seg, key=lambda s: tuple(int(x) for x in s.split("-")))
        self.conf = conflicts(problem)

    def suggest(self, trial) -> list[int]:
        picked = []
        cs = self.problem.candidates
        for seg in self.segments:
            choices = [SKIP] + [cs[i].alternative for i in self.by_seg[seg]]
            v = trial.suggest_categorical(f"seg:{seg}", choices)
            if v != SKIP:
                picked.append(self.by_seg[seg][choices.index(v) - 1])
        return self.repair(picked)

    def repair(self, picked: list[int]) -> list[int]:
        cs = self.problem.candidates
        kept: set[int] = set()
        for i in sorted(picked, key=lambda i: (-cs[i].saving_ms, cs[i].loss, cs[i].start, i)):
            if self.conf[i].isdisjoint(kept):
                kept.add(i)
        return sorted(kept)

    def params(self, chosen: Sequence[int]) -> dict[str, str]:
        cs = self.problem.candidates
        p = {f"seg:{seg}": SKIP for seg in self.segments}
        for i in chosen:
            p[f"seg:{cs[i].segment}"] = cs[i].alternative
        return p


class OptunaSearch:
    def __init__(self, options: OptunaOptions | None = None):
        self.options = options or OptunaOptions()

    def search(self, problem: SearchProblem, budgets_ms: Sequence[float], *, seed: int = 0,
               workdir: str | None = None) -> list[Solution]:
        import optuna

        o = self.options
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("optuna").setLevel(logging.WARNING)
        enc = Encoding(problem)
        storage, shown = storage_for(o.storage, workdir, o.heartbeat_interval)
        fp = problem_fingerprint(problem)
        base = o.study or f"bespoke-{fp}"
        seed = seed if o.seed is None else o.seed
        sampler = o.sampler or ("tpe" if o.mode == "constrained" else "nsga2")
        if not enc.segments:
            return [finalize(problem, b, [], {"strategy": "optuna", "study": None}) for b in budgets_ms]
        if o.mode == "pareto":
            return self._pareto(problem, budgets_ms, enc, storage, shown, f"{base}:pareto", sampler, seed, fp)
        out = []
        for b in budgets_ms:
            out.append(self._constrained(problem, b, enc, storage, shown, f"{base}:constrained:{b:.6g}",
                                         sampler, seed, fp))
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _study(self, storage, name: str, sampler_name: str, seed: int, fp: str, directions,
               constraints):
        import optuna

        o = self.options
        # seed + trials already there: a resumed or joining worker does not replay the first
        # worker's random start; a fresh single worker stays reproducible
        probe = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                    load_if_exists=True)
        have = probe.user_attrs.get("problem_fingerprint")
        if have is None:
            probe.set_user_attr("problem_fingerprint", fp)
        elif have != fp:
            raise UsageError(f"Optuna study {name!r} was run on a different problem (fingerprint {have}, "
                             f"now {fp}: the house, latencies or loss proxy changed). Give another "
                             "study name (--study) or delete it")
        n_prior = len(probe.get_trials(deepcopy=False))
        probe.sampler = _sampler(sampler_name, dict(o.sampler_options), seed + n_prior, constraints)
        return probe

    def _optimize(self, study, objective, n_trials: int) -> float:
        import optuna
        from optuna.trial import TrialState

        t0 = time.perf_counter()
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if done < n_trials:
            study.optimize(objective, n_trials=n_trials - done, timeout=self.options.timeout_s,
                           callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))])
        return time.perf_counter() - t0

    def _polish(self, study, objective, enc: Encoding, budgets, found) -> float:
        """Local descent from each budget's best trial; new points become trials of the study
        (so every worker and a later resume see them)."""
        t0 = time.perf_counter()
        queued = 0
        seen: set[tuple[int, ...]] = set()
        trials = [t.user_attrs["chosen"] for t in study.get_trials(deepcopy=False) if "chosen" in t.user_attrs]
        for b, f in zip(budgets, found):
            # starts: the best feasible trials, and the least lossy ones just over the budget
            # (the optimum often sits between the two)
            over = sorted((enc.problem.loss(ch), ch) for ch in trials
                          if b < enc.problem.latency(ch) <= b * 1.1)
            starts = [ch for _, ch in sorted(f)[:3]] + [ch for _, ch in over[:3]]
            best = min(f)[0][0] if f else float("inf")
            # recombination: the best mix of the pairs the ten best feasible and ten best nearly
            # feasible trials use (exact on that small pool)
            pool = sorted({i for ch in [c for _, c in sorted(f)[:20]] + [c for _, c in over[:20]] for i in ch})
            if pool:
                sub = SearchProblem(teacher_ms=enc.problem.teacher_ms, lam=enc.problem.lam,
                                    candidates=[enc.problem.candidates[i] for i in pool])
                mix = optimum(sub, b)
                if mix.meta.get("feasible", True):
                    starts.append([pool[i] for i in mix.chosen])
            for start in starts:
                better = sorted(improve(enc.problem, start, b, enc.conf))
                key = tuple(better)
                if key in seen or not enc.problem.feasible(better, b) or enc.problem.loss(better) >= best - 1e-12:
                    continue
                seen.add(key)
                study.enqueue_trial(enc.params(better), skip_if_exists=True)
                queued += 1
        if queued:
            study.optimize(objective, n_trials=queued)
        return time.perf_counter() - t0

    def _evaluate(self, enc: Encoding, trial, budgets: Sequence[float]):
        chosen = enc.suggest(trial)
        lat = enc.problem.latency(chosen)
        loss = enc.problem.loss(chosen)
        trial.set_user_attr("chosen", chosen)
        trial.set_user_attr("worker", _WORKER)
        trial.set_user_attr("latency_ms", lat)
        trial.set_user_attr("loss", loss)
        if budgets:
            trial.set_user_attr("constraint", [lat - budgets[0]])
            if _HAS_SET_CONSTRAINT:
                trial.set_constraint("latency", lat - budgets[0])
        return chosen, lat, loss

    def _feasible_sets(self, study, problem: SearchProblem, budget: float):
        from optuna.trial import TrialState

        found = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            ch = t.user_attrs.get("chosen")
            if ch is not None and problem.feasible(ch, budget):
                found.append(((problem.loss(ch), problem.latency(ch)), ch))
        return found

    def _constrained(self, problem, budget, enc, storage, shown, name, sampler, seed, fp) -> Solution:
        o = self.options
        study = self._study(storage, name, sampler, seed, fp, ["minimize"], _constraints)
        if o.enqueue_greedy:
            g = greedy_solution(problem, budget, enc.conf)
            study.enqueue_trial(enc.params(g), skip_if_exists=True)

        def objective(trial):
            _, _, loss = self._evaluate(enc, trial, [budget])
            return loss

        wall = self._optimize(study, objective, o.n_trials)
        found = self._feasible_sets(study, problem, budget)
        if o.polish:
            wall += self._polish(study, objective, enc, [budget], [found])
            found = self._feasible_sets(study, problem, budget)
        top = top_k(found, o.top_k)
        return finalize(problem, budget, top[0] if top else None, {
            "strategy": "optuna", "mode": "constrained", "study": name, "storage": shown,
            "sampler": sampler, "trials": len(study.trials), "top": top, "wall_s": wall})

    def _pareto(self, problem, budgets, enc, storage, shown, name, sampler, seed, fp) -> list[Solution]:
        o = self.options
        study = self._study(storage, name, sampler, seed, fp, ["minimize", "minimize"], None)
        if o.enqueue_greedy:
            for b in budgets:
                study.enqueue_trial(enc.params(greedy_solution(problem, b, enc.conf)), skip_if_exists=True)

        def objective(trial):
            _, lat, loss = self._evaluate(enc, trial, [])
            return lat, loss

        wall = self._optimize(study, objective, o.n_trials)
        if o.polish:
            wall += self._polish(study, objective, enc, budgets,
                                 [self._feasible_sets(study, problem, b) for b in budgets])
        from optuna.trial import TrialState

        all_sets = [t.user_attrs["chosen"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if "chosen" in t.user_attrs]
        front = [{"latency_ms": lat, "loss": l, "chosen": ch} for lat, l, ch in pareto_of(problem, all_sets)]
        out = []
        for b in budgets:
            top = top_k(self._feasible_sets(study, problem, b), o.top_k)
            out.append(finalize(problem, b, top[0] if top else None, {
                "strategy": "optuna", "mode": "pareto", "study": name, "storage": shown,
                "sampler": sampler, "trials": len(study.trials), "top": top, "front": front,
                "wall_s": wall}))
        return out


@hookimpl
def register_search_strategies(register):
    register(PluginRecord(name="optuna", category="search", factory=OptunaSearch,
                          options_model=OptunaOptions,
                          description="Optuna study: constrained single objective or NSGA-II Pareto front"))
