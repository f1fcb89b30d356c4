"""Hand-made stage hybrids of EfficientNet-Lite2 and Lite0: what stage-level donor segments give.

    python benchmarks/stage_hybrids.py [--data ../shared/data/imagenet-sample] [--splices 03 04 23 ...]

A splice ``AK`` runs network A's stem and its first K stages, then a 1x1 adapter, then network
B's stages K.. and head (A, B: ``0`` Lite0 then Lite2, ``2`` Lite2 then Lite0), all at 224 px.
The adapter is the least-squares map from A's features to B's at the splice on the first 300
``train/`` images (:func:`bespoke.blocks.fit_linear_adapter`, ridge 1e-4); nothing else is
trained. It prints, per splice, top-1 on the 300 ``val/`` images and the latency ratios to the
teacher (Lite2 at 260 px) of the hybrid and of Lite0, each timed beside the teacher as
``benchmarks/lite2_cpu.py`` times its rows (``measured-latency``, 90 runs, batch 1, 2 threads;
``measure_ratios(..., pairwise=True)``: the median of per-round paired ratios).

This is the upper end of what a ``timm-donors`` segment spanning whole stages could start from
before distillation; see docs/benchmarks.md ("Experiments after the latest run").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-sample"
SIZE = 224


def prefix(m: nn.Module, k: int) -> nn.Module:
    return nn.Sequential(m.conv_stem, m.bn1, *m.blocks[:k])


def suffix(m: nn.Module, k: int) -> nn.Module:
    return nn.Sequential(*m.blocks[k:], m.conv_head, m.bn2, m.global_pool, m.classifier)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--splices", nargs="+", default=["03", "04", "05", "23", "24", "25"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        print(f"error: {args.data} must hold train/ and val/ (the ImageNet sample)", file=sys.stderr)
        return 2
    bad = [s for s in args.splices if len(s) != 2 or s[0] not in "02" or not s[1].isdigit() or not 1 <= int(s[1]) <= 6]
    if bad:
        print(f"error: splices are two digits, 0 or 2 then a stage 1-6 (e.g. 03, 24); got {bad}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    from bespoke import data as images
    from bespoke.blocks import fit_linear_adapter
    from bespoke.evaluate import evaluate, measure_ratios
    from bespoke.finetune import iter_batches
    from bespoke.models import load_model
    from bespoke.plugins import get_registry

    timer = get_registry().latency_estimator("measured-latency", {"threads": args.threads, "runs": 90,
                                                                  "warmup": 5})

    lite2 = load_model("tf_efficientnet_lite2", "auto").eval()
    lite0 = load_model("tf_efficientnet_lite0", "auto").eval()
    classes = args.data / "classes.txt"
    split = images.prepare(lite2, SIZE, data=str(args.data / "train"), val_data=str(args.data / "val"),
                           class_list=str(classes) if classes.exists() else None, held_out=300)
    x = torch.cat([b[0] for b in iter_batches(images.eval_view(split, lite2, SIZE), 50)])[:300]
    print(f"{'splice':>6} {'top-1':>6} {'ratio':>6} {'lite0 ratio':>11}")
    for s in args.splices:
        first, second = (lite0, lite2) if s[0] == "0" else (lite2, lite0)
        k = int(s[1])
        with torch.no_grad():
            fa = torch.cat([prefix(first, k)(x[i:i + 50]) for i in range(0, len(x), 50)])
            fb = torch.cat([prefix(second, k)(x[i:i + 50]) for i in range(0, len(x), 50)])
        hybrid = nn.Sequential(prefix(first, k), fit_linear_adapter(fa, fb), suffix(second, k)).eval()
        metrics, _ = evaluate(hybrid, f"hybrid-{s}", split.val, (1, 3, SIZE, SIZE))
        _, r = measure_ratios({"teacher": lite2, "hybrid": hybrid, "lite0": lite0},
                              {"teacher": (1, 3, 260, 260), "hybrid": (1, 3, SIZE, SIZE), "lite0": (1, 3, 224, 224)},
                              timer, pairwise=True)
        print(f"{s:>6} {100 * metrics.top1:6.1f} {r['hybrid']:6.3f} {r['lite0']:11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
