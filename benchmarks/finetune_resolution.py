"""How much does fine-tuning recover when the teacher runs at a lower input size?

    python benchmarks/finetune_resolution.py --out DIR [--sizes 224] [--variant 150:1e-4:0 ...]
                                             [--student tf_efficientnet_lite0]

The teacher (``tf_efficientnet_lite2``, packaged weights, trained at 260 px) is run as is at a
lower input size, and fine-tuned there against itself at 260 px (``bespoke.finetune.finetune_student``
with ``input_size``: logits only, the KL target the teacher at its own size), the way the
benchmark fine-tunes a student at a lower input size. Each ``--variant STEPS:LR:LABEL_WEIGHT``
is one fine-tune from the teacher's weights (batch 16, beta 3). ``--student NAME`` fine-tunes
another network (with its packaged weights) the same way, against the same teacher: e.g. a donor
at its own input size, distilled from the teacher (what a student made of the whole donor gets);
``--student DIR``, a student saved by ``lite2_cpu.py`` (``DIR/students/budget-B/student``), is
fine-tuned from its saved weights, as the benchmark's fine-tune would (with ``--sizes`` its own
input size, from its recipe, when not given).

Images: the roles of ``benchmarks/lite2_cpu.py`` with its defaults (``data_layout``): fine-tuning
on its distillation pool, measured on its 200 selection images (never on the scoring images:
this chooses the benchmark's fine-tuning defaults). Prints, per row, top-1 on those images,
top-1 agreement with the teacher at 260 px and the KL divergence to it (nats per image), and
writes ``DIR/finetune_resolution.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="input sizes (px) to run the network at (default: 224, or a saved student's own)")
    p.add_argument("--variant", nargs="*", default=["150:1e-4:0"],
                   help="fine-tunes as STEPS:LR:LABEL_WEIGHT[:MIXUP[:CROP_SCALE[:FREEZE_CLASSIFIER]]] (label weight "
                        "0: distillation from the teacher only; mixup: finetune.mixup, e.g. 0.2; crop scale: "
                        "finetune.crop_scale, e.g. 0.35, the teacher seeing the same mixed crops: function matching; "
                        "freeze classifier 1: finetune.freeze_classifier)")
    p.add_argument("--student", default=None,
                   help="the network fine-tuned (packaged weights; default: the teacher itself)")
    p.add_argument("--bn-batches", type=int, default=8,
                   help="finetune.bn_recalibration_batches (the benchmark's: 8; they recalibrate replaced parts only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import lite2_cpu

    from bespoke.config import FinetuneConfig
    from bespoke.data import eval_view, open_images, prepare, transforms_for
    from bespoke.finetune import finetune_student, iter_batches
    from bespoke.files import atomic_write_text
    from bespoke.models import load_model
    from bespoke.partition import Partition
    from bespoke.student import assemble

    variants = []
    for v in args.variant:
        try:
            parts = v.split(":")
            if not 3 <= len(parts) <= 6:
                raise ValueError(v)
            steps, lr, lw, mixup, crop, frozen = (parts + ["0", "1", "0"][len(parts) - 3:])[:6]
            variants.append((int(steps), float(lr), float(lw), float(mixup), float(crop), bool(int(frozen))))
        except ValueError:
            print(f"error: --variant {v!r} is not STEPS:LR:LABEL_WEIGHT[:MIXUP[:CROP_SCALE[:FREEZE_CLASSIFIER]]] "
                  "(e.g. 150:1e-4:0 or 300:1e-4:0:0.2:0.35:1)", file=sys.stderr)
            return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    layout = lite2_cpu.data_layout(lite2_cpu.parse_args(["--out", str(out), "--seed", str(args.seed)]), out)
    teacher = load_model(lite2_cpu.TEACHER, weights="packaged").eval()
    size0 = 260
    selection = open_images(str(layout["selection"]), layout["class_list"])

    @torch.no_grad()
    def logits(model, size):
        model.eval()
        xs, ys = [], []
        for x, y in iter_batches(selection.with_transform(transforms_for(transforms_of if model is not teacher
                                                                          else teacher, size)), 32):
            xs.append(model(x))
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    t_logits, labels = logits(teacher, size0)
    saved = args.student is not None and Path(args.student).is_dir()
    if saved:
        from bespoke import load_student

        base = load_student(args.student).eval()
        transforms_of = teacher  # a student sees the teacher's preprocessing, as in the benchmark
        sizes = args.sizes or [int(base.recipe.input_size[-1])]
    else:
        base = teacher if args.student is None else load_model(args.student, weights="packaged").eval()
        transforms_of = base  # each network sees its own preprocessing (the Lite family shares it)
        sizes = args.sizes or [224]
    rows = []

    def row(name, model, size, seconds=None):
        s_logits, _ = logits(model, size)
        kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                      reduction="batchmean").item()
        r = {"name": name, "size": size, "top1": round(100 * (s_logits.argmax(-1) == labels).float().mean().item(), 1),
             "agreement": round(100 * (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item(), 1),
             "kl": round(kl, 3), "seconds": seconds}
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("teacher", teacher, size0)
    split = prepare(teacher, size0, data=str(layout["distill"]), class_list=str(layout["class_list"]),
                    held_out=0, seed=args.seed)  # lite2_cpu's pool: imagenet-sample/train and broad/
    train = eval_view(split, teacher, size0)
    partition = Partition.from_model(copy.deepcopy(teacher), (1, 3, size0, size0), name=lite2_cpu.TEACHER)
    for size in sizes:
        row("as is", base, size)
        for steps, lr, lw, mixup, crop, frozen in variants:
            cfg = FinetuneConfig(epochs=100, steps=steps, batch_size=16, lr=lr, beta=3.0, label_weight=lw,
                                 bn_recalibration_batches=args.bn_batches, mixup=mixup, crop_scale=crop,
                                 freeze_classifier=frozen)
            t0 = time.perf_counter()
            student = copy.deepcopy(base) if saved else assemble(
                Partition.from_model(copy.deepcopy(base), (1, 3, size0, size0), name=args.student or lite2_cpu.TEACHER), [])
            tag = Path(args.student).parent.name if saved else (args.student or "teacher")
            recipe = (f"-mix{mixup:g}" if mixup else "") + (f"-crop{crop:g}" if crop < 1 else "") + ("-fc" if frozen else "")
            workdir = out / f"ft-{tag}-{size}-{steps}-{lr:g}-{lw:g}-bn{args.bn_batches}{recipe}"
            res = finetune_student(student, partition, train, cfg, workdir, seed=args.seed,
                                   input_size=None if size == size0 else size)  # as the pipeline calls it
            row(f"{steps} steps, lr {lr:g}, label weight {lw:g}"
                + (f", mixup {mixup:g}" if mixup else "") + (f", crops >= {crop:g}" if crop < 1 else "")
                + (", classifier frozen" if frozen else ""), res.student, size,
                round(time.perf_counter() - t0, 1))
    atomic_write_text(out / "finetune_resolution.json", json.dumps(
        {"command": "python benchmarks/finetune_resolution.py " + " ".join(sys.argv[1:] if argv is None else argv),
         "student": args.student or lite2_cpu.TEACHER, "selection_images": len(selection), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
