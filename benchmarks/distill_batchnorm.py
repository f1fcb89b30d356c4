"""Does block distillation improve on the block sources' closed-form fits? One halving round.

    python benchmarks/distill_batchnorm.py --out DIR [--lr 1e-3] [--train-mode-batchnorm]
    python benchmarks/distill_batchnorm.py --compare DIR_A DIR_B [...]

Builds the Lite2 house of ``benchmarks/lite2_cpu.py`` (same alternatives, its data layout and
``--selection-from``) on its first 1,024 distillation images, one thread, with
``build.halving 1024``: every alternative is profiled on the 200 selection images before
training and after the 1,024 images, and keep-best reverts those that got worse (the manifest's
``kept``). ``--compare`` prints, per house, how many reverted and the median replace-one KL, and
against the first house the per-alternative KL ratios by block source. Nothing here reads the
scoring images. This is how ``build.freeze_batchnorm`` was chosen (docs/house.md, 2026-12-04:
43 of 85 reverted with BatchNorm in train mode at lr 1e-3, 55 at lr 1e-4, 5 with it frozen).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lite2_cpu  # noqa: E402


def build(out: Path, lr: float, frozen: bool, selection_from: str) -> None:
    import torch
    from rich.console import Console

    from bespoke import pipeline
    from bespoke.config import RunConfig
    from bespoke.plugins import get_registry

    args = lite2_cpu.parse_args(["--out", str(out), "--distill-images", "1024", "--threads", "1",
                                 "--halving", "1024", "--selection-from", selection_from])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    layout = lite2_cpu.data_layout(args, out.resolve())
    base = lite2_cpu.run_config(args, layout, args.selection_images, [0.6])
    base["build"].update({"lr": lr, "freeze_batchnorm": frozen})
    t = time.perf_counter()
    pipeline.build(RunConfig.model_validate(base), get_registry(), console=Console(width=120, soft_wrap=True))
    print(f"build: {time.perf_counter() - t:.0f} s", flush=True)


def trained_kl(a: dict) -> float:
    """The KL after training (the manifest's ``kl`` is the kept weights' when keep-best reverted)."""
    m = re.search(r"; ([0-9.e+-]+) after", a.get("kept") or "")
    return float(m.group(1)) if m else a["kl"]


def compare(dirs: list[Path]) -> None:
    houses = [{a["id"]: a for a in json.loads((d / "house" / "manifest.json").read_text())["alternatives"]
               if a.get("kl") is not None} for d in dirs]
    common = sorted(set.intersection(*(set(h) for h in houses)))
    trained = [i for i in common if houses[0][i].get("images")]
    print(f"{len(common)} alternatives in common, {len(trained)} trained")
    for d, h in zip(dirs, houses):
        print(f"{d}: {sum(1 for i in trained if h[i].get('kept'))} of {len(trained)} reverted by keep-best; "
              f"median KL {statistics.median(h[i]['kl'] for i in common):.4g}")
        if h is houses[0]:
            continue
        by: dict[str, list[float]] = {}
        for i in trained:
            by.setdefault(h[i]["source"], []).append(trained_kl(h[i]) / trained_kl(houses[0][i]))
        for src, r in sorted(by.items()):
            print(f"  {src}: trained KL / first house's, median {statistics.median(r):.3f}, "
                  f"lower for {sum(x < 1 for x in r)} of {len(r)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-mode-batchnorm", action="store_true", help="build.freeze_batchnorm false")
    p.add_argument("--selection-from", choices=["broad", "each"], default="each",
                   help="as lite2_cpu.py (each: the split the 2026-12-04 comparison used)")
    p.add_argument("--compare", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.compare:
        compare(args.compare)
    elif args.out:
        build(args.out, args.lr, not args.train_mode_batchnorm, args.selection_from)
    else:
        p.error("give --out DIR to build or --compare DIR ... to compare")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
