"""Benchmark: one model house, three targets, minutes each.

    python benchmarks/many_targets.py --out DIR [--house DIR] [--data ../shared/data]

The expensive part of bespoke -- cutting the teacher, collecting alternatives, distilling them --
is paid once, in the house. Each target then costs a profile, a search, a pick, a fine-tune and an
export. This script builds the EfficientNet-Lite2 house of ``benchmarks/lite2_cpu.py`` (same
settings, same images; or reuses one with ``--house``, e.g. ``DIR/house`` of a lite2_cpu run)
and serves three targets from it, one after the other:

- ``torch-cpu``: torch eager, batch 1, this machine (``measured-latency``);
- ``onnxruntime-cpu``: ONNX Runtime on the same CPU (``onnxruntime-latency``): block latencies
  measured on exported ONNX pieces (the legacy exporter, ``piece_exporter``: a tenth of the
  export time), every whole model exported and timed in ONNX Runtime beside the teacher's export
  (the torch.export-based exporter ``bespoke export`` ships with; worker threads do not spin, so
  the sessions timed in turn do not take each other's cores);
- ``vendor-npu``: an int8 accelerator we cannot reach, whose latencies come from the documented
  cost model of the plugin package ``examples/bespoke-latency-vendor-npu`` (installed with pip
  when missing; ``bespoke profile HOUSE --plugin vendor-npu -o npu.lut.json`` writes its table).

For each target: the donors' latency ratios on that target set the budgets (Lite0's, Lite1's,
and 0.5), given to ``bespoke run`` by name (``budgets: [0.5, tf_efficientnet_lite0,
tf_efficientnet_lite1]``: the run times each donor beside the teacher, and the donor meets its own
budget by definition); ``bespoke run`` then profiles, searches (the teacher's 260 px and ``--input-sizes``),
picks, fine-tunes quickly (``--finetune-steps``), measures, exports. One line per target:

    target=NAME per_target_cpu_min=X finetune_cpu_min=Y

X: CPU time of this process and its workers for the target (donor ratios, profile, search, pick,
measure, export), fine-tuning excluded; Y: fine-tuning. Not counted in either: scoring the
students on the scoring images, timing each student on the other targets, and the longer
fine-tune (``--full-finetune-steps``) that shows what the quick one leaves on the table; those are
this benchmark's, not the target's.

Then, on the scoring images of the main benchmark (imagenet-sample/val and imagenet-extra/val,
touched once, at the end): each student's top-1 after the quick fine-tune and after the full one,
with the paired 95 % interval against the donor whose latency set its budget; a table of each
student's latency ratio on every target (a student is made for one device; timed on another it
should sit further from its budget); and the alternatives chosen per segment on each target, with
the overlap between targets. Everything lands in DIR/many_targets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lite2_cpu  # noqa: E402  (the house settings and the image roles of the main benchmark)

from bespoke.stages.report import cpu_seconds  # noqa: E402  (what report.json's cpu_s counts)

ROOT = HERE.parent
TEACHER, DONORS = lite2_cpu.TEACHER, lite2_cpu.DONORS
TARGETS = ("torch-cpu", "onnxruntime-cpu", "vendor-npu")
VENDOR_PACKAGE = ROOT / "examples" / "bespoke-latency-vendor-npu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--house", type=Path, default=None,
                   help="reuse this model house (e.g. DIR/house of benchmarks/lite2_cpu.py); default: build OUT/house "
                        "with lite2_cpu's settings")
    p.add_argument("--data", type=Path, default=lite2_cpu.DEFAULT_DATA, help="../shared/data, as lite2_cpu takes it")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--threads", type=int, default=2, help="threads of every timed model (torch and ONNX Runtime)")
    p.add_argument("--input-sizes", type=int, nargs="*", default=[224],
                   help="search.input_sizes besides the teacher's 260 px (each size costs a profile and a search)")
    p.add_argument("--rerank-top-k", type=int, default=2, help="search.rerank_top_k")
    p.add_argument("--runs", type=int, default=15, help="timed runs per model in each latency measurement")
    p.add_argument("--pick-train-images", type=int, default=0,
                   help="search.pick_train_images: the final pick also counts agreement on this many training images")
    p.add_argument("--repeats", type=int, default=2, help="separate calls per ratio the run checks (search.check_repeats)")
    p.add_argument("--finetune-steps", type=int, default=24, help="the quick fine-tune of every student (batch 16)")
    p.add_argument("--full-finetune-steps", type=int, default=100,
                   help="the longer fine-tune of the students at Lite0's latency, for comparison (0: none)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ensure_vendor_plugin(console) -> None:
    """The vendor's plugin package, installed with pip as a user would (`bespoke plugins` lists it)."""
    from bespoke.plugins import load_registry

    if "vendor-npu" in load_registry().names()["latency"]:
        return
    console.print(f"installing the vendor plugin package: pip install -e {VENDOR_PACKAGE.relative_to(ROOT)}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                    str(VENDOR_PACKAGE)], check=True)
    # an editable install's path hook is read at start-up: start again, in a fresh interpreter
    os.execv(sys.executable, [sys.executable, *sys.argv])


def estimator_for(target: str, args) -> tuple[str, dict]:
    if target == "torch-cpu":
        return "measured-latency", {"threads": args.threads, "runs": args.runs, "warmup": 5}
    if target == "onnxruntime-cpu":
        return "onnxruntime-latency", {"threads": args.threads, "runs": args.runs, "warmup": 5,
                                       "exporter": "dynamo", "allow_spinning": False}
    return "vendor-npu", {}


def main(argv=None) -> int:
    args = parse_args(argv)
    from bespoke import load_student, pipeline
    from bespoke.config import RunConfig
    from bespoke.data import transforms_for
    from bespoke.evaluate import evaluate, measure_ratios, paired_difference
    from bespoke.files import atomic_write_text
    from bespoke.models import default_input_size, load_model
    from bespoke.plugins import load_registry
    from bespoke.data import open_images
    from bespoke.roles import role_summary
    from bespoke.student import deployed

    t_start = time.perf_counter()
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)  # a log file: whole rows
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_vendor_plugin(console)
    registry = load_registry()

    # ---- the images: the main benchmark's three roles -----------------------------------------
    base_args = lite2_cpu.parse_args(["--out", str(out), "--data", str(args.data), "--seed", str(args.seed),
                                      "--threads", str(args.threads)])
    layout = lite2_cpu.data_layout(base_args, out)
    class_list = layout["class_list"]
    roles = {"distill": open_images(str(layout["distill"]), class_list),
             "selection": open_images(str(layout["selection"]), class_list),
             "scoring": open_images([str(p) for p in layout["scoring"]], class_list, key="scoring")}
    data_summary = role_summary(roles)
    console.print(f"images: {data_summary['distill_images']} to distil on, {data_summary['selection_images']} to "
                  f"select on, {data_summary['scoring_images']} to score on")

    # ---- the house: built once (or reused) ------------------------------------------------------
    house = args.house.resolve() if args.house else out / "house"
    base = lite2_cpu.run_config(base_args, layout, data_summary["selection_images"], budgets=[0.5])
    base.update({"house": str(house), "threads": args.threads})
    base["search"].update({"input_sizes": args.input_sizes, "rerank_top_k": args.rerank_top_k,
                           "check_repeats": args.repeats, "pick_remeasure": 1,
                           "pick_train_images": args.pick_train_images})
    base["plugin_options"]["exact"] = {"top_k": args.rerank_top_k}
    base["finetune"] = {**base["finetune"], "steps": args.finetune_steps}
    c0 = cpu_seconds()
    pipeline.build(RunConfig.model_validate({**base, "out": str(out / "build")}), registry, console=console)
    one_time_cpu_min = (cpu_seconds() - c0) / 60

    # ---- the teacher and donors, scored once on the scoring images ----------------------------
    refs = {}
    for name in [TEACHER, *DONORS]:
        model = load_model(name, weights="packaged").eval()
        refs[name] = (model, default_input_size(model))
    t_model, t_size = refs[TEACHER]

    def scoring_at(size):
        return roles["scoring"].with_transform(transforms_for(t_model, size))

    ref_metrics, preds = {}, {}
    ref_metrics[TEACHER], preds[TEACHER] = evaluate(t_model, TEACHER, scoring_at(t_size), (1, 3, t_size, t_size))
    for d in DONORS:
        m, s = refs[d]
        ref_metrics[d], preds[d] = evaluate(m, d, roles["scoring"].with_transform(transforms_for(m, s)),
                                            (1, 3, s, s), teacher=preds[TEACHER])

    shipped = {n: deployed(m, (1, 3, s, s)) for n, (m, s) in refs.items()}
    results, students, estimators = {}, {}, {}
    for target in args.targets:
        console.rule(f"target {target}")
        name, options = estimator_for(target, args)
        estimator = estimators[target] = registry.latency_estimator(name, options)
        c0, w0 = cpu_seconds(), time.perf_counter()
        # the donors' latencies on this target are its budgets: the run times them beside the teacher
        # (budgets named by a model), and each donor meets its own budget however the timings drift
        budgets = [0.5, *DONORS]
        cfg = RunConfig.model_validate({
            **base, "out": str(out / "targets" / target), "budgets": budgets,
            "plugins": {**base["plugins"], "latency": name},
            "plugin_options": {**base["plugin_options"], name: options}})
        report = pipeline.run(cfg, registry, console=console)
        at = {d: next(s.budget for s in report.students if s.budget_model == d) for d in DONORS}
        console.print(f"{target}: Lite0 {at[DONORS[0]]:.3f}, Lite1 {at[DONORS[1]]:.3f} of the teacher", highlight=False)
        cpu = cpu_seconds() - c0
        finetune_cpu = report.cpu_s.get("finetune", 0.0)
        line = (f"target={target} per_target_cpu_min={(cpu - finetune_cpu) / 60:.2f} "
                f"finetune_cpu_min={finetune_cpu / 60:.2f}")
        console.print(line, highlight=False, soft_wrap=True)
        by_budget = {0.5: "0.5", at[DONORS[0]]: "lite0-latency", at[DONORS[1]]: "lite1-latency"}
        donor_of = {at[DONORS[0]]: DONORS[0], at[DONORS[1]]: DONORS[1]}
        results[target] = {"estimator": name, "options": options, "donor_ratios": at,
                           "budgets": sorted({0.5, *at.values()}),
                           "line": line, "per_target_cpu_min": round((cpu - finetune_cpu) / 60, 2),
                           "finetune_cpu_min": round(finetune_cpu / 60, 2), "wall_min": round((time.perf_counter() - w0) / 60, 2),
                           "stage_cpu_s": report.cpu_s, "stage_wall_s": report.timings_s,
                           "unmet_budgets": report.unmet_budgets, "students": []}
        for s in report.students:  # each budget's answer, and its best mixed student beside a zoo answer
            key = f"{target}@{by_budget.get(s.budget, s.budget)}" + ("" if s.role == "answer" else "/mixed")
            students[key] = {"target": target, "budget": s.budget, "dir": s.student_dir, "role": s.role,
                             "kind": s.kind, "what": s.what,
                             "size": s.input_size or t_size, "donor": donor_of.get(s.budget),
                             "ratio_own": s.latency_ratio, "over_budget": s.over_budget,
                             "replaced": {r["segment"]: r["alternative"] for r in s.replaced}}
            results[target]["students"].append(key)

    # ---- not the targets' cost: scoring, cross-device timing, the longer fine-tune ----------------
    for key, st in students.items():
        model = load_student(st["dir"]).eval()
        st["size"] = int(model.recipe.input_size[-1])
        if model.recipe.teacher in refs and model.recipe.teacher != TEACHER:  # a donor as it is: its preprocessing
            view = roles["scoring"].with_transform(transforms_for(refs[model.recipe.teacher][0], st["size"]))
        else:
            view = scoring_at(st["size"])
        m, preds[key] = evaluate(model, key, view, (1, 3, st["size"], st["size"]), teacher=preds[TEACHER])
        st["top1"], st["agreement"] = m.top1, m.agreement
        if st["donor"]:
            st["vs_donor"] = paired_difference(preds[key], preds[st["donor"]], seed=args.seed).as_dict()
        st["ratio_on"] = {}
        for t, est in estimators.items():  # the student on every target, beside the teacher there
            with model.taps(False):
                _, r = measure_ratios({"teacher": shipped[TEACHER], "student": model},
                                      {"teacher": (1, 3, t_size, t_size), "student": (1, 3, st["size"], st["size"])},
                                      est, reference="teacher", pairwise=True, repeats=args.repeats)
            st["ratio_on"][t] = r["student"]

    def summary():
        return {
            "schema_version": 1, "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                        "torch": torch.__version__, "python": platform.python_version()},
            "command": "python benchmarks/many_targets.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "house": str(house), "one_time_cpu_min": round(one_time_cpu_min, 2), "data": data_summary,
            "references": {n: {"top1": m.top1, "agreement": m.agreement} for n, m in ref_metrics.items()},
            "targets": results, "students": students, "overlap": overlap(students),
            "wall_min": round((time.perf_counter() - t_start) / 60, 2),
        }

    # written before the longer fine-tune too, so a kill there loses none of the targets' figures
    atomic_write_text(out / "many_targets.json", json.dumps(summary(), indent=2, default=str))
    if args.full_finetune_steps:
        full_finetune(args, base, students, registry, console, scoring_at, preds, out)
    result = summary()
    atomic_write_text(out / "many_targets.json", json.dumps(result, indent=2, default=str))
    print_tables(result, console)
    for t in results.values():
        console.print(t["line"], highlight=False, soft_wrap=True)
    console.print(f"wrote {out / 'many_targets.json'}")
    return 0


def full_finetune(args, base, students, registry, console, scoring_at, preds, out):
    """The students at Lite0's latency fine-tuned for ``--full-finetune-steps`` from their
    assembled form (same recipe, same data), then scored: what the quick fine-tune leaves."""
    from bespoke.config import RunConfig
    from bespoke.evaluate import evaluate, paired_difference
    from bespoke.house import House
    from bespoke.stages.students import Students

    cfg = RunConfig.model_validate({**base, "out": str(out / "full-finetune"),
                                    "finetune": {**base["finetune"], "steps": args.full_finetune_steps}})
    stage = Students(cfg, registry, House.open(base["house"]), console)
    for key, st in students.items():
        if st["donor"] != lite2_cpu.DONORS[0] or not st["replaced"]:  # Lite0's latency, mixed students only
            continue
        plan = {"budget": st["budget"], "input_size": st["size"],
                "choices": [{"segment": seg, "start": int(seg.split("-")[0]), "end": int(seg.split("-")[1]),
                             "alternative": alt} for seg, alt in st["replaced"].items()]}
        c0 = cpu_seconds()
        made = stage.make(plan, out / "full-finetune" / key.replace("@", "-"))
        st["full_finetune_cpu_min"] = round((cpu_seconds() - c0) / 60, 2)
        st["full_finetune_kept"] = made.finetune_kept
        m, preds[key + "+full"] = evaluate(made.student, key, scoring_at(st["size"]),
                                           (1, 3, st["size"], st["size"]), teacher=preds[lite2_cpu.TEACHER])
        st["top1_full"] = m.top1
        st["vs_donor_full"] = paired_difference(preds[key + "+full"], preds[st["donor"]], seed=args.seed).as_dict()


def overlap(students: dict) -> dict:
    """Per budget name, the share of replaced segments on which two targets chose the same
    alternative (Jaccard over (segment, alternative) pairs)."""
    found = {}
    keys = list(students)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if a.split("@")[1] != b.split("@")[1]:
                continue
            pa, pb = set(students[a]["replaced"].items()), set(students[b]["replaced"].items())
            found[f"{a} vs {b}"] = round(len(pa & pb) / max(1, len(pa | pb)), 3)
    return found


def print_tables(result, console):
    from rich.table import Table

    refs = result["references"]
    console.print(f"teacher top-1 {100 * refs[TEACHER]['top1']:.1f}; Lite0 {100 * refs[DONORS[0]]['top1']:.1f}; "
                  f"Lite1 {100 * refs[DONORS[1]]['top1']:.1f} ({result['data']['scoring_images']} scoring images)")
    targets = list(result["targets"])
    t = Table(title="students per target: top-1 (quick / full fine-tune) and latency ratio on every target")
    for col in ("student", "budget", "px", "top-1", "vs donor", "top-1 full", "vs donor full", *targets):
        t.add_column(col)

    def vs(v):
        return "-" if not v else f"{100 * v['diff']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]"

    for key, s in result["students"].items():
        t.add_row(key + (f" ({s['what']})" if s.get("what") else ""), f"{s['budget']:.3g}", str(s["size"]),
                  f"{100 * s['top1']:.1f}", vs(s.get("vs_donor")),
                  "-" if s.get("top1_full") is None else f"{100 * s['top1_full']:.1f}", vs(s.get("vs_donor_full")),
                  *[("-" if s["ratio_on"].get(x) is None else f"{s['ratio_on'][x]:.3f}") for x in targets])
    console.print(t)
    segs = sorted({seg for s in result["students"].values() for seg in s["replaced"]},
                  key=lambda x: tuple(int(p) for p in x.split("-")))
    c = Table(title="alternative chosen per segment (blank: the teacher's own)")
    c.add_column("segment")
    for key in result["students"]:
        c.add_column(key)
    for seg in segs:
        c.add_row(seg, *[(s["replaced"].get(seg, "").split(".", 1)[-1]) for s in result["students"].values()])
    console.print(c)
    for pair, j in result["overlap"].items():
        console.print(f"overlap {pair}: {j:.2f}", highlight=False)


if __name__ == "__main__":
    raise SystemExit(main())
