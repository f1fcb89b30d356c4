"""What the README's first command hands a newcomer, scored on photos it never saw.

Runs ``bespoke run`` exactly as the README's quick start does (the default configuration: the
Lite2 teacher, scikit-image's sample photos, the default budgets) -- or reads a run that already
exists (``--run DIR``) -- and then scores every saved student, and the teacher at the same input
size, on labelled ImageNet photos the run never touched (default: ``imagenet-sample/val`` beside
the project). Nothing here feeds back into the run: the scoring images are read once, at the end.

Prints, per student: its budget, measured ratio, input size, top-1 and the teacher's top-1 at
the same size, the fraction of the teacher's top-1 it keeps (issue 23's bar: the largest budget's
student at least 85 %, every student at least 60 %), the paired 95 % interval of the difference,
and what the run itself said about it (``usable``). Writes ``OUT/default_run.json``.

    python benchmarks/default_run.py --out /tmp/default-run            # run, then score
    python benchmarks/default_run.py --run bespoke-out --out /tmp/x    # score an existing run
    python benchmarks/default_run.py --run bespoke-out --out /tmp/y --scoring ../shared/data/imagenet-extra
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VAL = ROOT.parent / "shared" / "data" / "imagenet-sample"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where the run (unless --run) and the scores go")
    p.add_argument("--run", type=Path, default=None, help="score this existing `bespoke run` output instead of running")
    p.add_argument("--scoring", type=Path, default=DEFAULT_VAL,
                   help="folder with val/ and classes.txt: labelled photos the run never saw")
    p.add_argument("--class-list", type=Path, default=None,
                   help="classes.txt for the scoring images (default: SCORING/classes.txt, else imagenet-sample's); "
                        "imagenet-extra/val has none of its own")
    p.add_argument("run_args", nargs="*", help="extra arguments for `bespoke run` (after --)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    val_dir = args.scoring / "val"
    classes = args.class_list or next((c for c in (args.scoring / "classes.txt", DEFAULT_VAL / "classes.txt")
                                       if c.is_file()), args.scoring / "classes.txt")
    if not val_dir.is_dir() or not classes.is_file():
        print(f"error: {args.scoring} must hold val/, and a classes.txt must be found (--class-list)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir, wall = args.run, None
    if run_dir is None:
        run_dir = args.out / "bespoke-out"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "bespoke", "run", "--out", str(run_dir), *args.run_args]
        print("$ " + " ".join(cmd[2:]), flush=True)
        done = subprocess.run(cmd, cwd=args.out)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(f"error: bespoke run exited {done.returncode}", file=sys.stderr)
            return done.returncode

    import torch

    from bespoke import load_student
    from bespoke.data import folder_images, transforms_for
    from bespoke.evaluate import evaluate, paired_difference
    from bespoke.models import load_model

    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    cfg = report["config"]
    teacher = load_model(cfg["teacher"], weights=cfg.get("teacher_weights") or "auto").eval()
    own = report["data"]["input_size"]
    torch.set_num_threads(2)
    scored, teacher_at = [], {}

    def images(size):
        return folder_images(val_dir, classes).with_transform(transforms_for(teacher, size))

    for s in report["students"]:
        size = s.get("input_size") or own
        if size not in teacher_at:
            teacher_at[size] = evaluate(teacher, f"teacher@{size}", images(size), (1, 3, size, size))
        t_metrics, t_pred = teacher_at[size]
        where = Path(s["student_dir"])
        if not where.is_absolute() and not where.is_dir():  # relative to where `bespoke run` ran
            where = run_dir.resolve().parent / where
        student = load_student(where).eval()
        m, pred = evaluate(student, s["name"], images(size), (1, 3, size, size), teacher=t_pred)
        diff = paired_difference(pred, t_pred)
        scored.append({"name": s["name"], "budget": s["budget"], "latency_ratio": s.get("latency_ratio"),
                       "input_size": size, "top1": m.top1, "teacher_top1": t_metrics.top1,
                       "kept": m.top1 / t_metrics.top1 if t_metrics.top1 else None,
                       "agreement": m.agreement, "vs_teacher": diff.as_dict(), "images": m.images,
                       "run_usable": s.get("usable"), "run_agreement": s.get("agreement"),
                       "run_images": s.get("images")})
    result = {"run": str(run_dir), "run_wall_s": wall, "run_timings_s": report.get("timings_s"),
              "train_images": report["data"].get("train_images"), "val_images": report["data"].get("val_images"),
              "scoring": str(val_dir), "students": scored}
    (args.out / "default_run.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"scored on {scored[0]['images'] if scored else 0} labelled photos of {val_dir} the run never saw")
    print(f"{'student':14} {'ratio':>6} {'px':>4} {'top-1':>6} {'teach':>6} {'kept':>5} {'agree':>6}  run said")
    for r in scored:
        ratio = "-" if r["latency_ratio"] is None else f"{r['latency_ratio']:.3f}"
        said = {True: "usable", False: "unusable", None: "unproven"}[r["run_usable"]]
        print(f"{r['name']:14} {ratio:>6} {r['input_size']:>4} {100 * r['top1']:6.1f} {100 * r['teacher_top1']:6.1f} "
              f"{100 * r['kept']:4.0f}% {100 * r['agreement']:6.1f}  {said}")
    if wall is not None:
        print(f"bespoke run: {wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
