"""Benchmark: your own model. A fine-tuned teacher, its unlabelled images, the practitioner's alternative.

    python benchmarks/data/caltech101.py --images DIR/101_ObjectCategories --out SPLIT
    python benchmarks/own_model.py --split SPLIT --out DIR [--cache CACHE] [--quick]

The case most users have: a network fine-tuned on their own task, a folder of their own images
(unlabelled), no ready-made smaller sibling. Here: ``tf_efficientnet_lite2`` fine-tuned on
Caltech-101's ``train/`` split (``benchmarks/own_model_setup.py``; made once, reused from
``--cache``). One process, this machine's CPU, batch 1, 2 threads.

1. **Set-up** (cached): the fine-tuned teacher, and the practitioner's alternative: Lite0 and
   Lite1 fine-tuned on the same labelled images, distilled from the teacher as well as from the
   labels, until their top-1 on ``selection/`` stops rising.
2. **Budgets**: the fine-tuned siblings' latencies, each timed beside the teacher (medians of
   per-round ratios, ``--repeats`` pairwise calls), and 0.5.
3. **bespoke** on the fine-tuned teacher (``teacher_weights``: its checkpoint; the user's way),
   with ``pool/`` (the training images, *without their labels*) to distil on and ``selection/``
   for everything that chooses; the house of ``benchmarks/lite2_cpu.py`` (same settings), the
   ImageNet Lite0 and Lite1 as donors of pieces (not offered whole: their classes are not the
   teacher's). Its answer per budget is the best of the mixed students and the teacher at each
   input size (the zoo).
4. **Baselines** at the siblings' latencies: the fine-tuned siblings (they needed labels), the
   teacher at each lower input size as it is, and uniform channel pruning of the teacher to the
   same latency with the students' fine-tuning (``--no-uniform-pruning`` leaves it out).
5. **Scoring**: every model on ``test/`` (about 4,000 images), touched once at the end; each row's
   top-1 with a paired 95 % interval against the fine-tuned sibling at the same latency; each
   path's CPU-minutes.

Writes ``DIR/benchmark.json`` and prints one table. ``--quick`` (minutes, for trying the steps
of docs/own-model.md): the set-up on 5 training images a class, one view, 3 epochs (in
``CACHE/quick``), a small house (the teacher cut into 8 consecutive segments, 192 images, no
halving), one other input size, 500 test images.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import lite2_cpu  # noqa: E402  (the house settings of the main benchmark)
import own_model_setup as setup_mod  # noqa: E402

TEACHER = "tf_efficientnet_lite2"
SIBLINGS = {"lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", required=True, type=Path, help="the folder benchmarks/data/caltech101.py wrote")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cache", type=Path, default=setup_mod.DEFAULT_CACHE,
                   help="where the set-up's fine-tuned teacher and siblings are kept (made once)")
    p.add_argument("--quick", action="store_true", help="a few minutes: small set-up, small house, 500 test images")
    p.add_argument("--input-sizes", type=int, nargs="*", default=None,
                   help="other input sizes the students may run at (default 240 224 208 192; quick: 224)")
    p.add_argument("--halving", type=int, default=1024, help="build.halving (quick: 0)")
    p.add_argument("--stitch", action=argparse.BooleanOptionalAction, default=False,
                   help="build.stitch_sources [timm-donors]: stitched stages")
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tuning steps per student (0: BN recalibration)")
    p.add_argument("--uniform-pruning", action=argparse.BooleanOptionalAction, default=True,
                   help="uniform channel pruning of the teacher to each sibling's latency (same fine-tuning)")
    p.add_argument("--test-images", type=int, default=0, help="score on the first N test images of a seeded order "
                                                               "(0: all; quick: 500)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model in latency measurements")
    p.add_argument("--repeats", type=int, default=3, help="separate pairwise calls per latency ratio")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.input_sizes is None:
        args.input_sizes = [224] if args.quick else [240, 224, 208, 192]
    if args.quick:
        args.halving, args.runs, args.repeats = 0, 10, 1
        args.test_images = args.test_images or 500
    return args


def cpu_minutes() -> float:
    return setup_mod.cpu_minutes()


def bespoke_config(args, out: Path, budgets: list[float], cache: Path) -> dict:
    """The run configuration of the students: lite2_cpu's house and search settings, on the
    fine-tuned teacher and the user's unlabelled images."""
    base_args = lite2_cpu.parse_args(["--out", str(out), "--input-sizes", *map(str, args.input_sizes),
                                      "--halving", str(args.halving), "--finetune-steps", str(args.finetune_steps),
                                      "--runs", str(args.runs), "--repeats", str(args.repeats),
                                      "--threads", str(args.threads), "--seed", str(args.seed),
                                      "--data-balance", "none"]
                                     + (["--tiles", "8", "--no-modules", "--prune-ratios", "0.5", "--trials", "40"]
                                        if args.quick else []))
    layout = {"distill": args.split / "pool", "selection": args.split / "selection", "class_list": None}
    selection = sum(1 for _ in (args.split / "selection").rglob("*") if _.is_file() or _.is_symlink())
    cfg = lite2_cpu.run_config(base_args, layout, selection, budgets)
    cfg.update({"teacher_weights": str(cache / "teacher.safetensors"), "class_list": None})
    cfg["build"]["stitch_sources"] = ["timm-donors"] if args.stitch else []
    if args.quick:
        cfg["build"].update({"epochs": 1, "steps_per_epoch": 12})
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    for role in ("pool", "selection", "test", "train"):
        if not (args.split / role).is_dir():
            print(f"error: {args.split / role} is missing; run benchmarks/data/caltech101.py first", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    from rich.console import Console

    from bespoke import load_student, pipeline
    from bespoke.config import RunConfig
    from bespoke.data import open_images, transforms_for
    from bespoke.evaluate import evaluate, measure_ratios, paired_difference
    from bespoke.files import atomic_write_text
    from bespoke.models import load_model
    from bespoke.plugins import get_registry
    from bespoke.stages.report import peak_rss_mb
    from bespoke.student import Student, deployed

    console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)
    registry = get_registry()

    # ---- 1. The set-up: the fine-tuned teacher and siblings (cached) -----------------------
    cache = args.cache.resolve() / ("quick" if args.quick else "")  # a quick set-up never stands in for the real one
    quick = {"views": 1, "max_epochs": 3, "patience": 2, "per_class": 5} if args.quick else {}
    record = setup_mod.setup(args.split, cache, **quick)
    models = {"teacher": (load_model(TEACHER, weights=str(cache / "teacher.safetensors")), 260)}
    for key, name in SIBLINGS.items():
        models[key] = (load_model(name, weights=str(cache / f"{key}.safetensors")),
                       record["models"][key]["input_size"])
    t_model, t_size = models["teacher"]

    shipped: dict = {}

    def as_shipped(model, size):
        if isinstance(model, Student):
            return model
        if (id(model), size) not in shipped:
            shipped[(id(model), size)] = deployed(model, (1, 3, size, size))
        return shipped[(id(model), size)]

    measurer = registry.latency_estimator("measured-latency", {"threads": args.threads, "runs": args.runs,
                                                               "warmup": 5})

    def measure(named: dict) -> tuple[dict, dict]:
        return measure_ratios({n: as_shipped(m, s) for n, (m, s) in named.items()},
                              {n: (1, 3, s, s) for n, (_, s) in named.items()}, measurer,
                              reference="teacher", pairwise=True, repeats=args.repeats)

    # ---- 2. Budgets: the siblings' latencies -------------------------------------------------
    _, ratios = measure(models)
    console.print(f"the fine-tuned siblings' latency ratios to the teacher: "
                  + ", ".join(f"{k} {ratios[k]:.3f}" for k in SIBLINGS), highlight=False)
    at = {round(ratios[k], 3): k for k in SIBLINGS}
    names = {**{b: f"{k}-latency" for b, k in at.items()}, 0.5: "0.5"}
    budgets = sorted(names)

    # ---- 3. bespoke on the fine-tuned teacher ------------------------------------------------
    base = bespoke_config(args, out, budgets, cache)
    cfg = RunConfig.model_validate(base)
    rss = {}
    c0 = cpu_minutes()
    pipeline.build(cfg, registry, console=console)
    one_time = cpu_minutes() - c0
    rss["build"] = peak_rss_mb()["self"]
    _, again = measure(models)  # timed again next to the search that has to meet them
    at = {round(again[k], 3): k for k in SIBLINGS}
    names = {**{b: f"{k}-latency" for b, k in at.items()}, 0.5: "0.5"}
    budgets = sorted(names)
    cfg = RunConfig.model_validate({**base, "budgets": budgets})
    c0 = cpu_minutes()
    report = pipeline.run(cfg, registry, console=console)
    per_target = cpu_minutes() - c0
    rss["run"] = peak_rss_mb()["self"]

    # ---- 4. Baselines ------------------------------------------------------------------------
    rows_models: dict[str, dict] = {}
    for key in SIBLINGS:
        m = record["models"][key]
        rows_models[f"{key}-fine-tuned"] = {
            "model": models[key][0], "size": models[key][1], "base": models[key][0], "kind": "sibling",
            "budget": next(b for b, k in at.items() if k == key),
            "note": f"{SIBLINGS[key]} fine-tuned on the labelled train images + distilled from the teacher",
            "cpu_minutes": m["cpu_minutes"], "labels": True}
    for size in args.input_sizes:
        rows_models[f"teacher@{size}px"] = {"model": t_model, "size": size, "base": t_model, "kind": "baseline",
                                            "budget": None, "note": f"the teacher as it is at {size} px",
                                            "cpu_minutes": 0.0, "labels": False}
    if args.uniform_pruning:
        c0 = cpu_minutes()
        pruned = lite2_cpu.uniform_pruning(cfg, registry, sorted(at), names,
                                           lambda named: measure({("teacher" if n == lite2_cpu.TEACHER else n): v
                                                                  for n, v in named.items()}),
                                           t_model, t_size, out, console)
        spent = (cpu_minutes() - c0) / max(1, len(pruned))
        for name, (model, budget, note) in pruned.items():
            rows_models[name] = {"model": model, "size": t_size, "base": t_model, "kind": "baseline",
                                 "budget": budget, "note": note, "cpu_minutes": spent, "labels": False}
    for s in report.students:
        where = names.get(s.budget, f"{s.budget:g}")
        model = load_student(s.student_dir).eval()
        entry = {"model": model, "size": model.recipe.input_size[-1], "base": t_model, "budget": s.budget,
                 "note": s.what or s.kind, "labels": False, "over_budget": s.over_budget,
                 "cpu_minutes": None, "in_run": s.latency_ratio}
        if s.role == "answer":
            rows_models[f"bespoke@{where}"] = {**entry, "kind": "answer"}
        if s.role == "mixed" or s.kind == "mixed":
            rows_models[f"mixed@{where}"] = {**entry, "kind": "mixed"}

    # ---- 5. Latency side by side, then the test images, once --------------------------------
    timed = {"teacher": (t_model, t_size)}
    seen: dict[int, str] = {}
    aliases = {}
    for name, r in rows_models.items():
        if id(r["model"]) in seen and r["size"] == rows_models[seen[id(r["model"])]]["size"]:
            aliases[name] = seen[id(r["model"])]
            continue
        seen[id(r["model"])] = name
        timed[name] = (r["model"], r["size"])
    ms, ratio = measure(timed)
    for alias, name in aliases.items():
        ms[alias], ratio[alias] = ms[name], ratio[name]

    test = open_images(str(args.split / "test"))
    if args.test_images and args.test_images < len(test):
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed)).tolist()
        test = test.subset(sorted(order[:args.test_images]))

    def on_test(model, base_model, size, name, teacher=None):
        return evaluate(model, name, test.with_transform(transforms_for(base_model, size)), (1, 3, size, size),
                        teacher=teacher)

    teacher_m, teacher_pred = on_test(t_model, t_model, t_size, "teacher")
    preds, metrics = {}, {}
    for name, r in rows_models.items():
        if name in aliases:
            preds[name], metrics[name] = preds[aliases[name]], metrics[aliases[name]]
            continue
        metrics[name], preds[name] = on_test(r["model"], r["base"], r["size"], name, teacher_pred)
    sibling_at = {b: f"{k}-fine-tuned" for b, k in at.items()}
    rows = [{"name": "teacher", "kind": "teacher", "budget": None, "budget_name": None, "top1": teacher_m.top1,
             "agreement": 1.0, "latency_ms": ms["teacher"], "latency_ratio": 1.0, "vs_sibling": None,
             "note": f"{TEACHER} fine-tuned (set-up), {t_size} px", "labels": True,
             "cpu_minutes": record["models"]["teacher"]["cpu_minutes"], "params": teacher_m.params}]
    for name, r in rows_models.items():
        budget = r["budget"]
        if budget is None:  # the teacher at a lower size: compared at the sibling nearest its latency
            budget = min(at, key=lambda b: abs(b - ratio[name]))
        versus = None
        if budget in sibling_at and sibling_at[budget] != name:
            versus = {"sibling": sibling_at[budget],
                      **paired_difference(preds[name], preds[sibling_at[budget]], seed=args.seed).as_dict()}
        rows.append({"name": name, "kind": r["kind"], "budget": r["budget"],
                     "budget_name": None if r["budget"] is None else names.get(r["budget"], f"{r['budget']:g}"),
                     "top1": metrics[name].top1, "agreement": metrics[name].agreement,
                     "latency_ms": ms[name], "latency_ratio": ratio[name], "latency_ratio_in_run": r.get("in_run"),
                     "over_budget": r.get("over_budget", False), "vs_sibling": versus, "note": r["note"],
                     "labels": r["labels"], "cpu_minutes": r["cpu_minutes"], "params": metrics[name].params})
    result = {
        "schema_version": 1, "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/own_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "split": json.loads((args.split / "split.json").read_text()) if (args.split / "split.json").exists() else None,
        "test_images": len(test), "setup": record, "rows": rows,
        "costs_min": {"one_time": round(one_time, 2), "per_target": round(per_target, 2),
                      "setup_teacher": record["models"]["teacher"]["cpu_minutes"],
                      **{f"setup_{k}": record["models"][k]["cpu_minutes"] for k in SIBLINGS}},
        "wall_min": round((time.perf_counter() - t_start) / 60, 2),
        "peak_rss_mb": {**rss, "end": peak_rss_mb()["self"]},
        "sibling_ratios": {"at_start": {k: ratios[k] for k in SIBLINGS}, "after_build": {k: again[k] for k in SIBLINGS}},
        "unmet_budgets": report.unmet_budgets,
    }
    atomic_write_text(out / "benchmark.json", json.dumps(result, indent=2))
    print_table(result, console)
    console.print(f"wrote {out / 'benchmark.json'}")
    return 0


def print_table(result: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"your own model: {TEACHER} fine-tuned on Caltech-101, {result['test_images']} test images, "
                    f"{result['date']}")
    for col in ("name", "kind", "budget", "top-1", "vs sibling [95% CI]", "agree", "ratio", "labels", "CPU-min"):
        t.add_column(col)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in result["rows"]:
        v = r.get("vs_sibling")
        versus = "-" if not v else f"{100 * v['diff']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]"
        t.add_row(r["name"], r["kind"], r["budget_name"] or "-", pct(r["top1"]), versus, pct(r["agreement"]),
                  f"{r['latency_ratio']:.3f}", "yes" if r["labels"] else "no",
                  "-" if r["cpu_minutes"] is None else f"{r['cpu_minutes']:.1f}")
    console.print(t)
    c = result["costs_min"]
    console.print(f"bespoke: one-time {c['one_time']:.1f} CPU-min, per target {c['per_target']:.1f}; set-up (the "
                  f"user's teacher) {c['setup_teacher']:.1f}; fine-tuned siblings {c['setup_lite0']:.1f} and "
                  f"{c['setup_lite1']:.1f} (with labels); wall {result['wall_min']:.1f} min", highlight=False)


if __name__ == "__main__":
    raise SystemExit(main())
