"""Search strategies side by side on tf_efficientnet_lite2: proxy loss and wall time per budget.

    python benchmarks/search.py                      # real partition, measured segments, synthetic alternatives
    python benchmarks/search.py --house OUT/house    # a real model house (latencies from --latency)

Which problem it used is printed first:

- ``house``: a built model house of the teacher; latencies from the selected latency estimator
  (``measured-latency`` by default), loss proxy from the house profiles (replace-one).
- ``partition+synthetic`` (when no house is given): the real teacher partitioned by
  ``bespoke.partition.Partition`` at 260x260, ``--segments`` segments sampled as the method does,
  each teacher segment and the whole teacher *measured* on this CPU (``measured-latency``, 1
  thread). Alternatives are synthetic but shaped like a house's (per segment, a severity ``c`` ~
  lognormal scaled by the segment's share of the teacher's time, in replace-one percentage points):
  channel-pruned copies keeping 75/50/25% (latency ``T*(0.1+0.9*k^1.6)``, loss ``c*(1-k)^1.3``),
  low-rank copies at rank 1/2 and 1/4 (``T*(0.45+0.45*r)``, ``0.5*c*(1-r)``), two donor pieces
  (``T*U(0.55, 0.85)``, ``c*U(0.25, 0.7)``) and, for shape-preserving segments, a skip
  (``0.02*T``, ``c*U(1.5, 3)``); each latency and loss gets 10% noise.

Every strategy is run with its defaults (Optuna in memory, so storage I/O does not count) and
compared with the exact optimum of the additive problem (``bespoke.search.optimum``).
Wall times are on this machine as loaded at the time: compare them within one run only.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_problem(args):
    import torch

    from bespoke.latency import make_query
    from bespoke.models import load_model
    from bespoke.partition import Partition
    from bespoke.plugins import load_registry
    from bespoke.search import build_problem

    torch.set_num_threads(args.threads)
    size = 260
    model = load_model("tf_efficientnet_lite2", weights=None)  # latency does not depend on weights
    part = Partition.from_model(model, (1, 3, size, size), name="tf_efficientnet_lite2")
    segments = part.sample_segments(args.segments, 0.3, seed=args.seed)
    est = load_registry().latency_estimator("measured-latency", {"threads": args.threads, "warmup": 3,
                                                                 "runs": args.runs})
    queries = {}
    seg_key = {}
    for seg in segments:
        q = make_query(part.extract(seg), (1, *tuple(seg.in_shape)[1:]))
        queries.setdefault(q.key, q)
        seg_key[seg.id] = q.key
    tq = make_query(part.model, (1, 3, size, size))
    queries.setdefault(tq.key, tq)
    t0 = time.perf_counter()
    ms = est.latencies(list(queries.values()))
    measure_s = time.perf_counter() - t0
    teacher_ms = ms[tq.key]
    seg_ms = {sid: ms[k] for sid, k in seg_key.items()}

    rng = random.Random(args.seed)
    alts, alt_ms, alt_loss = {}, {}, {}

    def add(seg, name, lat, loss):
        aid = f"{seg.id}.{name}"
        alts[aid] = seg.id
        alt_ms[aid] = lat * rng.uniform(0.9, 1.1)
        alt_loss[aid] = loss * rng.uniform(0.9, 1.1)

    for seg in segments:
        t = seg_ms[seg.id]
        c = 12.0 * (t / teacher_ms) ** 0.7 * math.exp(rng.gauss(0, 0.5))
        for k in (0.75, 0.5, 0.25):
            add(seg, f"pruned-{int(k * 100)}", t * (0.1 + 0.9 * k ** 1.6), c * (1 - k) ** 1.3)
        for r in (0.5, 0.25):
            add(seg, f"lowrank-{int(r * 100)}", t * (0.45 + 0.45 * r), 0.5 * c * (1 - r))
        for d in ("lite0", "lite1"):
            add(seg, f"donor-{d}", t * rng.uniform(0.55, 0.85), c * rng.uniform(0.25, 0.7))
        if tuple(seg.in_shape) == tuple(seg.out_shape):
            add(seg, "skip", 0.02 * t, c * rng.uniform(1.5, 3.0))
    problem = build_problem(teacher_ms, seg_ms, alts, alt_ms, alt_loss, lam=0.1)
    covered = sum(seg_ms.values())
    desc = (f"partition+synthetic: tf_efficientnet_lite2 at {size}x{size}, {len(part.cut_points)} cut points, "
            f"{len(segments)} sampled segments (measured: teacher {teacher_ms:.2f} ms, segments sum "
            f"{covered:.2f} ms with overlaps; {measure_s:.0f} s to measure), {len(problem.candidates)} synthetic alternatives")
    return problem, desc


def house_problem(args):
    from bespoke.config import load_config
    from bespoke.stages.search import search_problem
    from bespoke.plugins import load_registry
    from rich.console import Console

    reg = load_registry()
    cfg = load_config(None, {"house": str(args.house), "plugins": {"latency": args.latency}})
    problem, teacher = search_problem(cfg, reg, Console(stderr=True))
    return problem, f"house: {args.house} (teacher {teacher}, {len(problem.candidates)} trained alternatives, latencies from {args.latency})"


STRATEGIES = {
    "greedy": ("greedy", {}),
    "random": ("random", {}),
    "annealing": ("annealing", {}),
    "optuna": ("optuna", {}),
    "optuna-pareto": ("optuna", {"mode": "pareto", "n_trials": 1000}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--house", type=Path, default=None, help="a built model house of tf_efficientnet_lite2")
    ap.add_argument("--latency", default="measured-latency", help="latency plugin for --house")
    ap.add_argument("--budgets", default="0.5,0.6,0.7")
    ap.add_argument("--segments", type=int, default=24)
    ap.add_argument("--runs", type=int, default=15, help="timed runs per module when measuring")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import optuna
    from rich.console import Console
    from rich.table import Table

    from bespoke.plugins import load_registry
    from bespoke.search import check_solution, exact_front, optimum, resolve_budgets

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = Console(width=150)
    if args.house is not None and (args.house / "manifest.json").is_file():
        problem, desc = house_problem(args)
    else:
        if args.house is not None:
            console.print(f"[yellow]no house at {args.house}; using the partition with synthetic alternatives[/yellow]")
        problem, desc = synthetic_problem(args)
    console.print(f"problem: {desc}")
    ratios = [float(x) for x in args.budgets.split(",")]
    budgets = resolve_budgets(ratios, problem.teacher_ms)

    t0 = time.perf_counter()
    exact = [optimum(problem, b) for b in budgets]
    exact_s = time.perf_counter() - t0
    console.print(f"exact optimum (Pareto DP over cut points): {exact_s * 1000:.1f} ms for all budgets, "
                  f"front of {len(exact_front(problem))} points")

    reg = load_registry()
    rows = []
    for key in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        name, opts = STRATEGIES[key]
        impl = reg.search_strategy(name, opts)
        t0 = time.perf_counter()
        sols = impl.search(problem, budgets, seed=args.seed)
        wall = time.perf_counter() - t0
        for s in sols:
            assert not check_solution(problem, s), check_solution(problem, s)
        rows.append((key, wall, sols))

    table = Table(title=f"search on tf_efficientnet_lite2, teacher {problem.teacher_ms:.2f} ms, "
                        f"{len(problem.candidates)} candidates (proxy loss: lower is better)")
    table.add_column("strategy")
    for r, b in zip(ratios, budgets):
        table.add_column(f"loss @{r:g} ({b:.1f} ms)", justify="right")
    table.add_column("loss over optimum", justify="right")
    table.add_column("wall s (3 budgets)", justify="right")
    table.add_row("exact optimum", *[f"{e.loss:.3f}" for e in exact], "0", f"{exact_s:.3f}")
    for key, wall, sols in rows:
        cells = []
        gaps = []
        for s, e, b in zip(sols, exact, budgets):
            feas = problem.feasible(s.chosen, b)
            cells.append(f"{s.loss:.3f}" + ("" if feas else " (over)")
                         + (" (fallback)" if s.meta.get("fallback") else ""))
            gaps.append(s.loss / e.loss - 1 if e.loss > 0 else 0.0)
        table.add_row(key, *cells, f"{100 * max(gaps):.1f}% max", f"{wall:.2f}")
    console.print(table)
    for key, wall, sols in rows:
        print(f"{key}: " + " ".join(f"loss@{r:g}={s.loss:.4f}" for r, s in zip(ratios, sols))
              + f" wall_s={wall:.3f}")
    print("exact: " + " ".join(f"loss@{r:g}={e.loss:.4f}" for r, e in zip(ratios, exact)) + f" wall_s={exact_s:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
