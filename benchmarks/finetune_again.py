"""Fine-tune a saved Lite2 benchmark student once more with other fine-tuning settings.

    python benchmarks/finetune_again.py STUDENT_DIR [--set steps=96 lr=3e-5 mixup=1.0 crop_scale=0.35]
                                        [--from-teacher] [--data ../shared/data/imagenet-sample]

STUDENT_DIR is a student saved by ``benchmarks/lite2_cpu.py`` (``DIR/students/budget-B/student``);
its input size comes from its recipe. The teacher is ``tf_efficientnet_lite2`` at 260 px with
the packaged weights, trained against on the 500 ``train/`` images exactly as the benchmark's
fine-tune does (``bespoke.finetune.finetune_student``, logits only at another input size),
starting from the saved weights, or with ``--from-teacher`` from the teacher's own weights for
every parameter the student shares with it (what the assembled student had, for students whose
replacements are skips). ``--set`` overrides ``finetune`` keys (``bespoke.config.FinetuneConfig``)
of the benchmark's own defaults (``lite2_cpu.finetune_settings``: 150 steps, lr 1e-4, beta 3,
label weight 0, batch 16). Prints top-1 on the 300 ``val/`` images before and after, and the seconds the
fine-tune took.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-sample"
TEACHER = "tf_efficientnet_lite2"


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set takes key=value pairs, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", type=Path)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--from-teacher", action="store_true")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        print(f"error: {args.data} must hold train/ and val/ (the ImageNet sample)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    from pydantic import ValidationError

    from bespoke import data as images
    from bespoke import load_student
    from bespoke.config import FinetuneConfig
    from bespoke.errors import UsageError
    from bespoke.evaluate import evaluate
    from bespoke.finetune import finetune_student
    from bespoke.models import load_model
    from bespoke.partition import Partition

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lite2_cpu

    settings = {**lite2_cpu.finetune_settings(lite2_cpu.parse_args(["--out", "unused"])), **parse_set(args.set)}
    try:
        cfg = FinetuneConfig(**settings)
        student = load_student(args.student)
    except (ValidationError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = int(student.recipe.input_size[-1])
    teacher = load_model(TEACHER, "auto").eval()
    if args.from_teacher:
        mine, theirs = student.state_dict(), teacher.state_dict()
        shared = {k: theirs[k.removeprefix("net.")] for k, v in mine.items()
                  if k.removeprefix("net.") in theirs and theirs[k.removeprefix("net.")].shape == v.shape}
        student.load_state_dict({**mine, **shared})
        print(f"{len(shared)} of {len(mine)} tensors reset to the teacher's")
    classes = args.data / "classes.txt"
    kw = dict(data=str(args.data / "train"), val_data=str(args.data / "val"),
              class_list=str(classes) if classes.exists() else None, held_out=300)
    train = images.eval_view(images.prepare(teacher, 260, **kw), teacher, 260)
    val = images.prepare(teacher, size, **kw).val
    shape = (1, 3, size, size)
    before, _ = evaluate(student, "before", val, shape)
    partition = Partition.from_model(copy.deepcopy(teacher), (1, 3, 260, 260), name=TEACHER)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        res = finetune_student(student, partition, train, cfg, work, targets={},
                               input_size=size if size != 260 else None)
    after, _ = evaluate(res.student, "after", val, shape)
    print(f"{args.student} at {size} px, finetune {json.dumps(settings)}: top-1 {100 * before.top1:.1f} -> "
          f"{100 * after.top1:.1f} % ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
