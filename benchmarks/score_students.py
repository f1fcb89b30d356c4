"""Score the students of one or more ``lite2_cpu.py`` runs on images none of them has seen.

    python benchmarks/score_students.py RUN_DIR [RUN_DIR ...] [--images DIR ...] [--out FILE]

Each RUN_DIR is the ``--out`` of a ``benchmarks/lite2_cpu.py`` run: its ``benchmark.json`` names
the saved students (``bespoke.load_student``; each recipe records its input size), their
budgets and measured latency ratios, and what the house cost. Every student and the teacher and
donors are scored on the same images (default: ``../shared/data/imagenet-extra/val``, 900
ImageNet validation images that no run distils, selects or picks on), and each student at a
donor's latency is compared with that donor on those images, with a paired 95 % interval.

This is how the data-scaling table of docs/benchmarks.md is made: runs that distilled on 500,
3,000 and 12,747 images, scored on images none of them touched (the 500-image runs selected on
imagenet-sample/val, so that folder is left out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lite2_cpu  # noqa: E402

DEFAULT_IMAGES = lite2_cpu.DEFAULT_DATA / "imagenet-extra" / "val"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="output folders of benchmarks/lite2_cpu.py runs")
    p.add_argument("--images", nargs="+", type=Path, default=[DEFAULT_IMAGES],
                   help="labelled image folders (wnid class folders or <wnid>_ names) to score on")
    p.add_argument("--class-list", type=Path, default=lite2_cpu.DEFAULT_DATA / "imagenet-sample" / "classes.txt")
    p.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for d in [*args.runs, *args.images]:
        if not d.exists():
            print(f"error: {d} does not exist", file=sys.stderr)
            return 2
    import torch

    from bespoke import load_student
    from bespoke.data import open_images, transforms_for
    from bespoke.evaluate import evaluate, paired_difference
    from bespoke.models import default_input_size, load_model

    torch.set_num_threads(2)
    images = open_images([str(p) for p in args.images], str(args.class_list), key="scoring")
    teacher = load_model(lite2_cpu.TEACHER, weights="packaged").eval()
    t_size = default_input_size(teacher)

    def scored(model, name, size, transform_of=teacher, reference=None):
        view = images.with_transform(transforms_for(transform_of, size))
        return evaluate(model, name, view, (1, 3, size, size), teacher=reference)

    t_metrics, t_pred = scored(teacher, lite2_cpu.TEACHER, t_size)
    refs = {lite2_cpu.TEACHER: {"top1": t_metrics.top1}}
    preds = {}
    for d in lite2_cpu.DONORS:
        model = load_model(d, weights="packaged").eval()
        m, preds[d] = scored(model, d, default_input_size(model), transform_of=model, reference=t_pred)
        refs[d] = {"top1": m.top1}
    print(f"{len(images)} images; teacher {100 * t_metrics.top1:.1f}, "
          + ", ".join(f"{d} {100 * refs[d]['top1']:.1f}" for d in lite2_cpu.DONORS))
    runs = []
    for run in args.runs:
        bench = json.loads((run / "benchmark.json").read_text())
        rows = {r["name"]: r for r in bench["rows"]}
        entry = {"run": str(run), "command": bench.get("command"),
                 "distill_images": bench.get("distill_images") or bench["settings"].get("distill_images") or 500,
                 "costs_min": bench.get("costs_min"), "wall_min": bench.get("wall_min"), "students": {}}
        for name, folder in bench.get("students", {}).items():
            donor = {"bespoke@lite0-latency": lite2_cpu.DONORS[0], "bespoke@lite1-latency": lite2_cpu.DONORS[1]}.get(name)
            student = load_student(folder).eval()
            size = int(student.recipe.input_size[-1])
            m, pred = scored(student, name, size, reference=t_pred)
            row = rows.get(name, {})
            s = {"top1": m.top1, "agreement": m.agreement, "size": size, "latency_ratio": row.get("latency_ratio"),
                 "budget": row.get("budget")}
            if donor:
                s["vs_donor"] = {"donor": donor, **paired_difference(pred, preds[donor], seed=args.seed).as_dict()}
            entry["students"][name] = s
            vs = s.get("vs_donor")
            print(f"{run.name}: {entry['distill_images']} distillation images: {name} ({size} px, ratio "
                  f"{s['latency_ratio'] if s['latency_ratio'] is None else round(s['latency_ratio'], 3)}) top-1 "
                  f"{100 * m.top1:.1f}"
                  + (f", {100 * vs['diff']:+.1f} [{100 * vs['low']:+.1f}, {100 * vs['high']:+.1f}] vs {donor}" if vs else ""))
        runs.append(entry)
    if args.out:
        args.out.write_text(json.dumps({"images": [str(p) for p in args.images], "count": len(images),
                                        "references": refs, "runs": runs}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
