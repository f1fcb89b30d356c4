"""Benchmark: compress EfficientNet-Lite2 to the CPU latency of Lite0 and Lite1 and compare.

    python benchmarks/lite2_cpu.py --out DIR [--data ../shared/data]

One process, this machine's CPU, batch 1, 2 threads. The images play three roles that share no
image (checked by file, bytes and pixels; counts and digests in DIR/benchmark.json):

- distillation: imagenet-sample/train and broad/ (3,905 images less the selection images by
  default; ``--pool`` adds or swaps in imagenet-extra/distill; ``--distill-images N`` takes the
  first N: imagenet-sample/train first, then the pool in a seeded order);
- selection: ``--selection-images`` (200) held back from imagenet-sample/train (the broad
  classes; ``--selection-from each``: half from each root), for everything that chooses
  (replace-one proxy, re-rank, pick, keep-best, halving);
- scoring: imagenet-sample/val and imagenet-extra/val (1,200 images), touched once at the end.

It

1. loads the teacher (tf_efficientnet_lite2, 260 px) and the donors Lite0 (224 px) and Lite1
   (240 px) with the real packaged ImageNet weights, and measures their latencies interleaved to
   get Lite0's and Lite1's latency ratios to the teacher on this machine;
2. runs the whole bespoke pipeline (build the house with successive halving, ``--halving``;
   profile, search, fine-tune -- BatchNorm recalibration only by default, ``--finetune-steps``
   --, export) at budgets 0.5, 0.7 and the two donors by name (``budgets: [0.5, 0.7,
   tf_efficientnet_lite0, tf_efficientnet_lite1]``: the run times each donor beside the teacher
   right before its search, and the donor meets its own budget by definition); students
   may run at the teacher's 260 px or at the ``--input-sizes`` (240, 224, 208 and 192 px by
   default: ``search.input_sizes``), each size searched with its own latency table; the final
   pick of a budget over the sizes counts agreement on the selection images plus
   ``--pick-train-images`` training images, and times again the finalists measured within 3 %
   of the budget;
3. runs the baselines at the donors' latencies: a random search over the same house (same
   fine-tuning, same sizes), each donor whole distilled from the teacher (fine-tuned against
   it at its own size, ``--distilled-donor-steps``; ``--no-distilled-donors`` leaves it out),
   the teacher itself at each of the input sizes, and with
   ``--uniform-pruning`` uniform channel pruning of the teacher with torch-pruning to the same
   latency (same fine-tuning);
4. measures every model end to end, each in its own interleaved call beside the teacher (torch
   eager), and again with ONNX Runtime, scores each on the scoring images, and prints one table;
   writes DIR/benchmark.json and DIR/pareto.png. The bespoke students are saved under
   DIR/students/ (``bespoke.load_student``; each recipe records its input size). Every row at a
   donor's latency says how its top-1 differs from that donor's on the same scoring images,
   with a 95 % paired-bootstrap interval.

Latency ratios in the table are measured in the same run, side by side: the median over
interleaved rounds of each model's ratio to the teacher in that round (90 rounds for the budgets
and the final table), so the machine's drift between rounds cancels. Every ratio -- Lite0's and
Lite1's that set the budgets, the re-ranked candidates', the final table's -- is timed in a pair
with the teacher: how many models one call interleaves moves the ratios by about 0.02.

Costs: ``one_time`` = building the house (segments, alternatives, distillation, profiling
of alternatives' accuracy) in CPU-minutes; ``per_target`` = latency profile + search + fine-tuning
of all students for this device, in CPU-minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"

TEACHER, DONORS = "tf_efficientnet_lite2", ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]


def cpu_minutes() -> float:
    """CPU time of this process and its finished workers (the build's data loader), in minutes."""
    from bespoke.stages.report import cpu_seconds

    return cpu_seconds() / 60.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="../shared/data (imagenet-sample/ and, when present, imagenet-extra/), or an old-style "
                        "folder with train/, val/ and classes.txt")
    p.add_argument("--pool", choices=["broad", "broad+extra", "extra"], default="broad",
                   help="the distillation pool besides imagenet-sample/train: broad/ (3,605 unlabelled photos "
                        "across ImageNet's classes and beyond; the default since 2026-12-07), broad/ and "
                        "imagenet-extra/distill, or imagenet-extra/distill alone (12,447 images of 20 classes; "
                        "the default before)")
    p.add_argument("--distill-images", type=int, default=0,
                   help="distil on this many images (imagenet-sample/train first, then the --pool images in a "
                        "seeded order); 0: all of them")
    p.add_argument("--selection-images", type=int, default=200,
                   help="images held back from the distillation pool for everything that chooses (proxy, "
                        "re-rank, pick, keep-best, halving); never scored on")
    p.add_argument("--selection-from", choices=["broad", "each"], default="broad",
                   help="broad: hold the selection images back from imagenet-sample/train only (its classes are "
                        "spread like the scoring images'); each: half from each root (before 2026-12-04, eighth "
                        "session: half of them then came from imagenet-extra's 20 classes)")
    p.add_argument("--halving", type=int, default=1024,
                   help="build.halving: images in the first slice of successive halving (0: off)")
    p.add_argument("--halving-eta", type=float, default=3.0, help="build.halving_eta")
    p.add_argument("--workers", type=int, default=1, help="build.workers: DataLoader worker processes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--segments", type=int, default=0, help="segments sampled from the teacher")
    p.add_argument("--tiles", type=int, default=0,
                   help="also cut the teacher into this many consecutive segments (guarantees coverage)")
    p.add_argument("--no-modules", dest="modules", action="store_false",
                   help="do not make a segment of every block and stage of the teacher (build.modules)")
    p.add_argument("--whole-donors", action="store_true",
                   help="build.whole_sources [timm-donors]: each donor whole is one more alternative (for the whole "
                        "network), distilled from the teacher's logits at timm-donors' whole_lr_scale, so a "
                        "student may be a distilled donor")
    p.add_argument("--stitch", action=argparse.BooleanOptionalAction, default=True,
                   help="build.stitch_sources [timm-donors]: stitched stages (a donor's early stages then the "
                        "teacher's later ones, and the other way round, one adapter between them)")
    p.add_argument("--max-fraction", type=float, default=0.12,
                   help="longest segment as a fraction of the cut points (0.12: Lite2's blocks, not its stages)")
    p.add_argument("--prune-ratios", type=float, nargs="+", default=[0.25, 0.5],
                   help="pruned-self channel ratios")
    p.add_argument("--donor-max-params", type=float, default=0.9,
                   help="timm-donors max_params_ratio: donor pieces must be this much smaller than the teacher's")
    p.add_argument("--calibration-images", type=int, default=32,
                   help="images the block sources fit adapters and choose channels on")
    p.add_argument("--lowrank-fractions", type=float, nargs="+", default=[0.5], help="lowrank rank fractions")
    from bespoke.data import BALANCE

    p.add_argument("--data-balance", choices=list(BALANCE), default=None,
                   help="data_balance (default: none with the broad pools, whose images are unlabelled and spread "
                        "over many classes; class with --pool extra, whose images are 98 %% twenty classes)")
    p.add_argument("--distill-epochs", type=int, default=1)
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="fine-tuning steps per student (batch 16). 0 since 2026-12-04, eleventh session: "
                        "BatchNorm recalibration only, kept when it does not lower held-out agreement. "
                        "150 steps (the tenth run's) lowered every student's held-out agreement, at lr 1e-4 "
                        "and 3e-5 alike (finetune_resolution.py --student DIR), and cost 29 of its 122 min")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-beta", type=float, default=3.0,
                   help="weight of the distillation terms against the label loss")
    p.add_argument("--finetune-label-weight", type=float, default=0.0,
                   help="finetune.label_weight: 0 distils from the teacher only (the labels are skewed to 20 classes, "
                        "which pulls the students' prior toward them)")
    p.add_argument("--search", default="exact", help="search strategy for the bespoke students (exact, optuna, ...)")
    p.add_argument("--proxy", default="replace-one-kl", help="search.proxy")
    p.add_argument("--rerank-top-k", type=int, default=4, help="proxy candidates per budget assembled and scored for real")
    p.add_argument("--trials", type=int, default=200, help="Optuna trials per search / random samples")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model in latency measurements")
    p.add_argument("--repeats", type=int, default=3,
                   help="the budgets and the final table time each model beside the teacher in this many separate "
                        "calls of --runs runs and take the median, as the run's budget check does "
                        "(search.check_repeats) and the pick does (1 + --pick-remeasure calls)")
    p.add_argument("--input-sizes", type=int, nargs="*", default=[240, 224, 208, 192],
                   help="search.input_sizes: students may also run at these input resolutions (px); none: 260 only")
    p.add_argument("--pick-train-images", type=int, default=200,
                   help="search.pick_train_images: the final pick over input sizes also counts agreement on this many "
                        "training images (100 held-out images tell candidates one image apart)")
    p.add_argument("--pick-remeasure", type=int, default=2,
                   help="search.pick_remeasure: finalists measured within --pick-margin of the budget are timed this "
                        "many more times")
    from bespoke.config import SearchConfig

    p.add_argument("--pick-margin", type=float, default=SearchConfig().pick_margin,
                   help="search.pick_margin: the relative distance to the budget within which the pick times a "
                        "finalist again (default: bespoke run's)")
    p.add_argument("--skip-baselines", action="store_true", help="only the bespoke students (faster)")
    p.add_argument("--uniform-pruning", action="store_true",
                   help="also the uniform channel-pruning baseline (torch-pruning; about 17 min; off by default "
                        "since 2026-12-04: it scored 0.2 and 18.3 %% at the donors' latencies in every run)")
    p.add_argument("--no-distilled-donors", dest="distilled_donors", action="store_false",
                   help="leave out the baseline of each donor whole distilled from the teacher (Lite0 and Lite1 "
                        "fine-tuned against Lite2 at their own sizes; about 10 min)")
    p.add_argument("--distilled-donor-steps", type=int, default=150,
                   help="fine-tuning steps of each distilled donor (batch 16, --finetune-lr, distillation only)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.data_balance is None:
        args.data_balance = "class" if args.pool == "extra" else "none"
    return args


def data_layout(args, out: Path) -> dict:
    """The images of each role, as folders of links under OUT/data (read by path, never copied):

    - ``distill/``: imagenet-sample/train, less the selection images, and by ``--pool``
      ``broad/`` (every sub-folder: unlabelled photos spread over ImageNet's classes and beyond)
      and/or imagenet-extra/distill (20 classes); ``--distill-images``: the first N of them,
      imagenet-sample/train first;
    - ``selection/``: ``--selection-images`` held back from imagenet-sample/train (``--selection-from
      broad``: its classes are spread like the scoring images', where imagenet-extra/distill is 20
      classes), or half from each root (``each``), for everything that chooses;
    - scoring: imagenet-sample/val and imagenet-extra/val as they are, touched once at the end.

    Links are named ``<wnid>_<file>``, so the class list labels them. An old-style ``--data``
    folder (train/, val/, classes.txt) distils on train/, holds back from it and scores on val/.
    """
    import os
    import random
    import shutil

    from bespoke.data import IMAGE_SUFFIXES

    def files(folder: Path) -> list[tuple[str, Path]]:  # (link name, file), labelled by name
        found = []
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                name = f.name if f.parent == folder else f"{f.parent.name}_{f.name}"
                found.append((name, f))
        return found

    if (args.data / "imagenet-sample").is_dir():
        sample, extra, broad = args.data / "imagenet-sample", args.data / "imagenet-extra", args.data / "broad"
        pools = [files(sample / "train")]
        if "broad" in args.pool:
            if not broad.is_dir():
                raise SystemExit(f"error: --pool {args.pool} needs {broad} (broad unlabelled photos)")
            pools += [files(d) for d in sorted(broad.iterdir()) if d.is_dir()]
        if "extra" in args.pool and (extra / "distill").is_dir():
            pools.append(files(extra / "distill"))
        scoring = [sample / "val"] + ([extra / "val"] if (extra / "val").is_dir() else [])
        class_list = sample / "classes.txt"
    elif (args.data / "train").is_dir() and (args.data / "val").is_dir():
        pools, scoring, class_list = [files(args.data / "train")], [args.data / "val"], args.data / "classes.txt"
    else:
        raise SystemExit(f"error: {args.data} holds neither imagenet-sample/ nor train/ and val/")
    rng = random.Random(args.seed)
    selection, rest = [], []
    share = len(pools) if args.selection_from == "each" else 1
    for n, pool in enumerate(pools):
        pool = list(pool)
        rng.shuffle(pool)
        take = (args.selection_images // share + (n < args.selection_images % share)) if n < share else 0
        selection += pool[:take]
        rest.append(pool[take:])
    distill = rest[0] + [f for pool in rest[1:] for f in pool]  # the broad images first
    if args.distill_images:
        distill = distill[:args.distill_images]
    folders = {}
    for role, chosen in (("distill", distill), ("selection", selection)):
        folder = out / "data" / role
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name, f in chosen:
            os.symlink(f.resolve(), folder / name)
        folders[role] = folder
    return {"distill": folders["distill"], "selection": folders["selection"], "scoring": scoring,
            "class_list": class_list,
            "per_root": {"distill": [len(p) for p in rest] if not args.distill_images else None}}


def halving_summary(house_dir: Path, full: int) -> dict:
    """What successive halving spent: images the alternatives saw, against every alternative seeing
    all ``full`` images (the distillation pool times the epochs), and why each stopped."""
    from bespoke.house import House

    alts = House.open(house_dir).by_status("trained")
    seen = sum(a.images for a in alts)
    reasons: dict[str, int] = {}
    for a in alts:
        if a.stopped:
            key = next((k for k in ("no cheaper", "dominated", "stalled") if k in a.stopped), "other")
            key = f"{key}, {'untrained' if not a.images else f'after {a.images:,}'}"
            reasons[key] = reasons.get(key, 0) + 1
    return {"alternatives": len(alts), "images_seen": seen, "images_without_halving": len(alts) * full,
            "fraction_spent": round(seen / (len(alts) * full), 3) if alts and full else None,
            "saw_all": sum(1 for a in alts if a.images >= full), "stopped": reasons}


def finetune_settings(args) -> dict:
    """The ``finetune`` section every student and baseline of this benchmark is trained with."""
    return {"epochs": 100, "steps": args.finetune_steps, "batch_size": 16, "lr": args.finetune_lr,
            "beta": args.finetune_beta, "label_weight": args.finetune_label_weight, "bn_recalibration_batches": 8}


def run_config(args, layout: dict, selection_images: int, budgets: list[float]) -> dict:
    """The run configuration (a dict for ``RunConfig``) of the benchmark's bespoke students: the
    house's build settings, the search and the fine-tune; ``benchmarks/many_targets.py`` builds
    the same house from it."""
    out = args.out.resolve()
    return {
        "teacher": TEACHER, "teacher_weights": "packaged", "donors": DONORS,
        "data": str(layout["distill"]), "val_data": str(layout["selection"]), "class_list": str(layout["class_list"]),
        "data_balance": args.data_balance,
        "budgets": budgets, "out": str(out), "house": str(out / "house"), "seed": args.seed,
        "threads": args.threads, "preset": "full",
        "plugins": {"block_sources": ["timm-donors", "pruned-self", "lowrank", "skip"],
                    "latency": "measured-latency", "search": args.search},
        "plugin_options": {
            "measured-latency": {"threads": args.threads, "runs": args.runs, "warmup": 5},
            "optuna": {"n_trials": args.trials, "top_k": args.rerank_top_k},
            "exact": {"top_k": args.rerank_top_k},
            "pruned-self": {"ratios": args.prune_ratios},
            "timm-donors": {"max_params_ratio": args.donor_max_params},
            "lowrank": {"fractions": args.lowrank_fractions},
        },
        "build": {"segments": args.segments, "tiles": args.tiles, "modules": args.modules,
                  "whole_sources": ["timm-donors"] if args.whole_donors else [],
                  "stitch_sources": ["timm-donors"] if args.stitch else [],
                  "max_fraction": args.max_fraction, "epochs": args.distill_epochs, "batch_size": 16,
                  "calibration_images": args.calibration_images,
                  "validation_images": selection_images, "augment": True,
                  "halving": args.halving, "halving_eta": args.halving_eta, "workers": args.workers},
        "search": {"proxy": args.proxy, "rerank_top_k": args.rerank_top_k, "input_sizes": args.input_sizes,
                   "pick_train_images": args.pick_train_images, "pick_remeasure": args.pick_remeasure,
                   "pick_margin": args.pick_margin, "check_repeats": args.repeats},
        "finetune": finetune_settings(args),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data} does not exist; give --data ../shared/data (imagenet-sample/, imagenet-extra/)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from rich.console import Console

    from bespoke import pipeline
    from bespoke.config import RunConfig
    from bespoke.data import folder_images, transforms_for
    from bespoke.evaluate import evaluate
    from bespoke.models import default_input_size, load_model
    from bespoke.files import atomic_write_text
    from bespoke.plugins import get_registry

    console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)  # a log file: whole rows
    registry = get_registry()
    t_start = time.perf_counter()
    from bespoke.data import open_images
    from bespoke.roles import role_summary

    layout = data_layout(args, out)
    class_list = layout["class_list"]
    roles = {"distill": open_images(str(layout["distill"]), class_list),
             "selection": open_images(str(layout["selection"]), class_list),
             "scoring": open_images([str(p) for p in layout["scoring"]], class_list, key="scoring")}
    t0 = time.perf_counter()
    data_summary = role_summary(roles)  # refuses any image in two roles (file, bytes or pixels)
    data_summary["check_seconds"] = round(time.perf_counter() - t0, 1)
    data_summary["scoring_per_root"] = roles["scoring"].per_root()
    console.print(f"images: {data_summary['distill_images']} to distil on, {data_summary['selection_images']} to "
                  f"select on, {data_summary['scoring_images']} to score on (disjoint: checked by file, bytes "
                  f"and pixels in {data_summary['check_seconds']} s)")

    # ---- 1. Teacher and donors at their native sizes: accuracy and latency ratios -------------
    refs = {}
    for name in [TEACHER, *DONORS]:
        model = load_model(name, weights="packaged").eval()
        size = default_input_size(model)
        refs[name] = {"model": model, "size": size}
    measurer = registry.latency_estimator("measured-latency", {"threads": args.threads, "runs": args.runs,
                                                               "warmup": 5})
    from bespoke.evaluate import measure_ratios

    def measure(models: dict[str, tuple[torch.nn.Module, int]], estimator=measurer,
                reference: str = TEACHER) -> tuple[dict[str, float], dict[str, float]]:
        """Medians (ms) and ratios to ``reference`` (medians of per-round ratios), each model timed
        in its own interleaved call beside the reference: the budgets, the pipeline's re-ranking
        and the final table then all time a model the same way (a call of 20 models put the same
        student 0.02 higher than a pair did). Every model is timed as bespoke ships a network
        (``bespoke.student.deployed``: flat graph, in place), the teacher and donors included,
        so the ratios compare like with like."""
        return measure_ratios({n: as_shipped(m, s) for n, (m, s) in models.items()},
                              {n: (1, 3, s, s) for n, (_, s) in models.items()}, estimator,
                              reference=reference, pairwise=True, repeats=args.repeats)

    shipped: dict[tuple[int, int], torch.nn.Module] = {}

    def as_shipped(model: torch.nn.Module, size: int) -> torch.nn.Module:
        from bespoke.student import Student, deployed

        if isinstance(model, Student):
            return model
        if (id(model), size) not in shipped:
            shipped[(id(model), size)] = deployed(model, (1, 3, size, size))
        return shipped[(id(model), size)]

    # the budgets, the pick, the run's budget check and the final table all time a model the same
    # way: --repeats separate pairwise calls of --runs runs beside the teacher, the median ratio
    ref_ms, ratios = measure({n: (r["model"], r["size"]) for n, r in refs.items()})
    console.print(f"reference latencies (ms): {ref_ms}; ratios {ratios}")

    def val_set(model, size):
        return roles["scoring"].with_transform(transforms_for(model, size))

    t_model, t_size = refs[TEACHER]["model"], refs[TEACHER]["size"]
    teacher_metrics, teacher_pred = evaluate(t_model, TEACHER, val_set(t_model, t_size), (1, 3, t_size, t_size))
    ref_metrics = {TEACHER: teacher_metrics}
    preds = {TEACHER: teacher_pred}  # every model's answers on val, for the paired comparisons
    for d in DONORS:
        m, s = refs[d]["model"], refs[d]["size"]
        ref_metrics[d], preds[d] = evaluate(m, d, val_set(m, s), (1, 3, s, s), teacher=teacher_pred)

    # ---- 2. bespoke ------------------------------------------------------------------------
    def budgets_from(ratios: dict[str, float]) -> tuple[list[float], dict[float, str]]:
        at = [round(ratios[DONORS[0]], 3), round(ratios[DONORS[1]], 3)]
        names = {0.5: "0.5", 0.7: "0.7", at[0]: "lite0-latency", at[1]: "lite1-latency"}
        return at, names  # a donor's ratio equal to 0.5 or 0.7 is searched once, under the donor's name

    at_donors, budget_names = budgets_from(ratios)
    base = run_config(args, layout, data_summary["selection_images"], list(budget_names))
    cfg = RunConfig.model_validate(base)

    from bespoke.stages.report import peak_rss_mb

    rss = {"references": peak_rss_mb()["self"]}  # the process's peak (MB) after each part: a running maximum
    c0 = cpu_minutes()
    pipeline.build(cfg, registry, console=console)  # the house does not depend on the budgets
    one_time = cpu_minutes() - c0
    rss["build"] = peak_rss_mb()["self"]
    halving = halving_summary(out / "house", data_summary["distill_images"] * args.distill_epochs)
    # The budgets: 0.5, 0.7 and the donors by name. The run times each donor beside the teacher right
    # before its search (budgets named by a model), and each donor meets its own budget by
    # definition: ratios on this VM drift by up to 10 % over a run (Lite0 0.564 and 0.609 ten
    # minutes apart in many_targets.py on 2026-12-07). The start's ratios are kept in benchmark.json.
    base = run_config(args, layout, data_summary["selection_images"], [0.5, 0.7, *DONORS])
    cfg = RunConfig.model_validate(base)
    c0 = cpu_minutes()
    report = pipeline.run(cfg, registry, console=console)  # resumes the house built above
    per_target = cpu_minutes() - c0
    rss["run"] = peak_rss_mb()["self"]
    ratios_in_run = {d: next(s.budget for s in report.students if s.budget_model == d) for d in DONORS}
    console.print(f"donors' ratios timed by the run: {ratios_in_run} (at the start: {ratios})")
    at_donors, budget_names = budgets_from(ratios_in_run)
    base = run_config(args, layout, data_summary["selection_images"], list(budget_names))  # as numbers

    # ---- 3. Baselines at the same budgets --------------------------------------------------
    baseline_models: dict[str, tuple[torch.nn.Module, float, str]] = {}
    baseline_metrics = {}
    if not args.skip_baselines:
        lut = out / "latency.json"
        # at the donors' latencies only: where every row is compared with a donor (and with bespoke)
        # the random search's own students: the zoo stays out of its pick (the donors have rows of their own)
        rnd_cfg = RunConfig.model_validate({**base, "budgets": at_donors, "out": str(out / "baselines" / "random"),
                                            "search": {**base["search"], "zoo": False},
                                            "plugins": {**base["plugins"], "search": "random",
                                                        "latency": "lut-latency"},
                                            "plugin_options": {**base["plugin_options"],
                                                               "lut-latency": {"path": str(lut)},
                                                               "random": {"samples": args.trials,
                                                                          "top_k": args.rerank_top_k}}})
        from bespoke import load_student
        from bespoke.errors import UsageError

        try:
            rnd_students = pipeline.run(rnd_cfg, registry, console=console).students
        except UsageError as exc:  # e.g. no random student meets any budget: a finding, not a crash
            console.print(f"[yellow]random-search baseline: no students ({exc})[/yellow]")
            rnd_students = []
        for s in rnd_students:
            name = f"random-search@{budget_names.get(s.budget, s.budget)}"
            baseline_models[name] = (load_student(s.student_dir).eval(), s.budget, "random search, same house",
                                     s.input_size or t_size)

        for b, (model, budget, note) in (uniform_pruning(cfg, registry, at_donors, budget_names, measure, t_model,
                                                         t_size, out, console) if args.uniform_pruning else {}).items():
            baseline_models[b] = (model, budget, note, t_size)
        preprocessing = {}  # a baseline that is not the teacher sees its own network's preprocessing
        for name, (model, budget, note, size, donor) in (distilled_donors(cfg, at_donors, refs, t_model, t_size, out,
                                                                          console, args.distilled_donor_steps)
                                                         if args.distilled_donors else {}).items():
            baseline_models[name] = (model, budget, note, size)
            preprocessing[name] = refs[donor]["model"]
        for size in args.input_sizes:  # the teacher itself at a lower resolution, nothing replaced
            baseline_models[f"teacher@{size}px"] = (t_model, None, f"the teacher as is at {size} px", size)
        for name, (model, budget, _, size) in baseline_models.items():
            baseline_metrics[name], preds[name] = evaluate(model, name, val_set(preprocessing.get(name, t_model), size),
                                                           (1, 3, size, size),
                                                           teacher=teacher_pred)

    rss["baselines"] = peak_rss_mb()["self"]

    # ---- 4. Everything measured side by side -----------------------------------------------
    from bespoke import load_student

    students = {}  # each budget's answer, and its best mixed student (the answer itself when that is mixed)
    for s in report.students:
        where = budget_names.get(s.budget, s.budget)
        names = [f"bespoke@{where}"] if s.role == "answer" else [f"mixed@{where}"]
        if s.role == "answer" and s.kind == "mixed":
            names.append(f"mixed@{where}")
        model = load_student(s.student_dir).eval()
        for name in names:
            students[name] = (model, s)
    # the check that what ships runs as the teacher: the teacher saved as a student, nothing replaced
    from bespoke.partition import Partition
    from bespoke.student import StudentRecipe, assemble, save_student

    identity_dir = save_student(assemble(Partition.from_model(t_model, (1, 3, t_size, t_size), name=TEACHER), []),
                                StudentRecipe(teacher=TEACHER, teacher_weights="packaged", input_size=(3, t_size, t_size)),
                                out / "students" / "teacher-as-student")
    identity = load_student(identity_dir).eval()
    every = {n: (r["model"], r["size"]) for n, r in refs.items()}
    every["teacher-as-student"] = (identity, t_size)
    aliases = {n: f"bespoke@{n.split('@', 1)[1]}" for n, (m, s) in students.items()
               if n.startswith("mixed@") and students.get(f"bespoke@{n.split('@', 1)[1]}", (None,))[0] is m}
    every.update({n: (m, m.recipe.input_size[-1]) for n, (m, s) in students.items() if n not in aliases})
    every.update({n: (m, size) for n, (m, _, _, size) in baseline_models.items()})
    torch_ms, torch_ratio = measure(every)
    ort = registry.latency_estimator("onnxruntime-latency", {"threads": args.threads, "runs": args.runs,
                                                             "warmup": 5})
    try:
        ort_ms, ort_ratio = measure(every, ort)
    except Exception as exc:  # ONNX Runtime missing or an export failure: report, do not hide
        console.print(f"[yellow]ONNX Runtime latency skipped: {exc}[/yellow]")
        ort_ms, ort_ratio = {}, {}

    for alias, name in aliases.items():  # the answer is the mixed student itself: timed once
        for table in (torch_ms, torch_ratio, ort_ms, ort_ratio):
            if name in table:
                table[alias] = table[name]
    rows = []
    from bespoke.evaluate import paired_difference

    donor_at = {at_donors[0]: DONORS[0], at_donors[1]: DONORS[1]}  # the budgets set by a donor's latency

    def row(name, kind, budget, m, note="", at_pick=None, in_run=None, what=None):
        versus = None
        if budget in donor_at and name in preds:  # top-1 minus the donor's, on the same images
            versus = {"donor": donor_at[budget], **paired_difference(preds[name], preds[donor_at[budget]],
                                                                      seed=args.seed).as_dict()}
        rows.append({"name": name, "kind": kind, "budget": budget,
                     "budget_name": None if budget is None else budget_names.get(budget, f"{budget:g}"),
                     "what": what, "top1": m.top1, "agreement": m.agreement,
                     "latency_ms": torch_ms[name], "latency_ratio": torch_ratio[name],
                     "latency_ms_onnxruntime": ort_ms.get(name), "latency_ratio_onnxruntime": ort_ratio.get(name),
                     "params": m.params, "vs_donor": versus, "note": note,
                     "latency_ratio_at_pick": at_pick, "latency_ratio_in_run": in_run})

    row(TEACHER, "teacher", None, ref_metrics[TEACHER], f"{t_size} px")
    for d in DONORS:
        row(d, "donor", None, ref_metrics[d], f"{refs[d]['size']} px, pretrained as is")
    for name, (model, s) in students.items():  # all val images, like every other row
        # a donor as it is sees its own preprocessing; a mixed student and the teacher, the teacher's
        size = model.recipe.input_size[-1]
        base_model = refs[model.recipe.teacher]["model"] if model.recipe.teacher in refs else t_model
        m, preds[name] = evaluate(model, name, val_set(base_model, size), (1, 3, size, size), teacher=teacher_pred)
        predicted = "" if s.latency_ms_predicted is None else f"; predicted {s.latency_ms_predicted:.2f} ms"
        row(name, "answer" if name.startswith("bespoke@") else "mixed", s.budget, m,
            f"{size} px, {s.what or s.kind}{predicted}"
            + (" (over budget as saved)" if s.over_budget else "") + (f" (finalist {s.fallback + 1})" if s.fallback else ""),
            at_pick=s.latency_ratio_at_pick, in_run=s.latency_ratio, what=s.kind)
    m, preds["teacher-as-student"] = evaluate(identity, "teacher-as-student", val_set(t_model, t_size),
                                              (1, 3, t_size, t_size), teacher=teacher_pred)
    row("teacher-as-student", "check", None, m, "the teacher saved and loaded as a student, nothing replaced")
    for name, (_, budget, note, _) in baseline_models.items():
        row(name, "baseline", budget, baseline_metrics[name], note)

    result = {
        "schema_version": 1,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/lite2_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "distill_images": data_summary["distill_images"], "data_balance": args.data_balance, "pool": args.pool,
        "selection_images": data_summary["selection_images"],
        "scoring_images": data_summary["scoring_images"],
        "data": data_summary,
        "rows": rows,
        "costs_min": {"one_time": round(one_time, 2), "per_target": round(per_target, 2)},
        "timings_s": report.timings_s,
        "wall_min": round((time.perf_counter() - t_start) / 60, 2),
        "peak_rss_mb": {**rss, "end": peak_rss_mb()["self"], "children": peak_rss_mb()["children"],
                        "run_stages": report.peak_rss_mb},
        "halving": halving,
        "donor_ratios": {"at_start": {d: ratios[d] for d in DONORS},
                         "in_run": ratios_in_run},
        "students": {n: str(s.student_dir) for n, (_, s) in students.items()},
        "unmet_budgets": report.unmet_budgets,
    }
    atomic_write_text(out / "benchmark.json", json.dumps(result, indent=2))
    print_table(rows, result, console)
    plot(rows, out / "pareto.png")
    console.print(f"wrote {out / 'benchmark.json'} and {out / 'pareto.png'}")
    return 0


def distilled_donors(cfg, at_donors, refs, teacher, size, out, console, steps):
    """Each donor whole, at its own input size, fine-tuned against the teacher with the students'
    fine-tune (``bespoke.finetune.finetune_student``: logits only, the KL target the teacher at its
    own size, on the same distillation images, ``--distilled-donor-steps`` steps): knowledge
    distillation into the donor, the obvious alternative a block-level student must beat next to
    the donor as it comes."""
    from bespoke import data as images
    from bespoke.finetune import finetune_student
    from bespoke.partition import Partition
    from bespoke.student import assemble

    partition = Partition.from_model(copy.deepcopy(teacher), (1, 3, size, size), name=TEACHER)
    split = images.prepare(teacher, size, data=cfg.data, val_data=cfg.val_data, class_list=cfg.class_list,
                           held_out=0, seed=cfg.seed, balance=cfg.data_balance)
    train = images.eval_view(split, teacher, size)
    ft = cfg.finetune.model_copy(update={"steps": steps})
    found = {}
    for d, budget in zip(DONORS, at_donors):
        d_size = refs[d]["size"]
        student = assemble(Partition.from_model(copy.deepcopy(refs[d]["model"]), (1, 3, size, size), name=d), [])
        console.print(f"distilling {d} whole from the teacher at {d_size} px ({ft.steps} steps, lr {ft.lr:g})")
        res = finetune_student(student, partition, train, ft, out / "baselines" / "distilled-donors" / d,
                               seed=cfg.seed, console=console, input_size=d_size)
        found[f"{d}+kd"] = (res.student.eval(), budget,
                            f"{d} whole at {d_size} px, fine-tuned {ft.steps} steps against the teacher", d_size, d)
    return found


def uniform_pruning(cfg, registry, at_donors, budget_names, measure, teacher, size, out, console):
    """Uniform channel pruning of the whole teacher (torch-pruning, L1 magnitude, the same ratio
    in every layer, widths rounded to multiples of 16 as pruned-self's are), the ratio bisected
    until the measured latency meets each budget; then the same fine-tuning as the students
    (BN recalibration + CE + KL to the teacher)."""
    import torch_pruning as tp

    from bespoke import data as images
    from bespoke.finetune import finetune_student
    from bespoke.partition import Partition

    example = torch.randn(1, 3, size, size)

    def pruned(ratio):
        m = copy.deepcopy(teacher).eval()
        if ratio > 0:
            pr = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[m.classifier], round_to=16)
            pr.step()
        return m

    partition = Partition.from_model(copy.deepcopy(teacher), (1, 3, size, size), name=TEACHER)
    split = images.prepare(teacher, size, data=cfg.data, val_data=cfg.val_data, class_list=cfg.class_list,
                           held_out=0, seed=cfg.seed, balance=cfg.data_balance)
    train = images.eval_view(split, teacher, size)
    found = {}
    for b in at_donors:
        lo, hi, best = 0.0, 0.9, None
        for _ in range(7):
            mid = (lo + hi) / 2
            # the ratio to the teacher timed beside it: this machine's absolute speed drifts
            _, got = measure({"m": (pruned(mid), size), TEACHER: (teacher, size)})
            if got["m"] <= b:
                best, hi = mid, mid
            else:
                lo = mid
        ratio = best if best is not None else 0.9
        model = pruned(ratio)
        console.print(f"uniform pruning for budget {b}: ratio {ratio:.3f}")
        res = finetune_student(model, partition, train, cfg.finetune, out / "baselines" / "uniform" / f"budget-{b:g}",
                               targets={}, seed=cfg.seed, console=console)
        name = f"uniform-prune@{budget_names.get(b, b)}"
        found[name] = (res.student.eval(), b, f"torch-pruning uniform ratio {ratio:.3f}")
    return found


def print_table(rows, result, console):
    from rich.table import Table

    t = Table(title=f"EfficientNet-Lite2 on this CPU ({result['machine']['threads']} threads, batch 1), "
                    f"{result['date']}")
    for col in ("name", "kind", "budget", "top-1", "vs donor [95% CI]", "agreement", "ms (torch)", "ratio",
                "at pick", "ms (ORT)", "ratio (ORT)", "params (M)"):
        t.add_column(col)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def versus(v):
        if not v:
            return "-"
        return f"{100 * v['diff']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]"

    for r in rows:
        t.add_row(r["name"], r["kind"], "-" if r["budget"] is None else f"{r['budget']:.3g}", pct(r["top1"]),
                  versus(r.get("vs_donor")), pct(r["agreement"]), f"{r['latency_ms']:.2f}", f"{r['latency_ratio']:.3f}",
                  "-" if r.get("latency_ratio_at_pick") is None else f"{r['latency_ratio_at_pick']:.3f}",
                  "-" if r["latency_ms_onnxruntime"] is None else f"{r['latency_ms_onnxruntime']:.2f}",
                  "-" if r["latency_ratio_onnxruntime"] is None else f"{r['latency_ratio_onnxruntime']:.3f}",
                  f"{r['params'] / 1e6:.2f}")
    console.print(t)
    c = result["costs_min"]
    console.print(f"one-time cost {c['one_time']:.1f} CPU-min; per-target cost {c['per_target']:.1f} CPU-min; "
                  f"wall {result['wall_min']:.1f} min")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {"teacher": ("k", "*"), "donor": ("tab:blue", "s"), "answer": ("tab:red", "o"), "mixed": ("tab:orange", "o"),
              "baseline": ("tab:gray", "x"), "check": ("tab:green", "+")}
    for r in rows:
        if r["top1"] is None:
            continue
        color, marker = styles[r["kind"]]
        ax.scatter(r["latency_ms"], 100 * r["top1"], c=color, marker=marker, s=60)
        ax.annotate(r["name"], (r["latency_ms"], 100 * r["top1"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("latency (ms, batch 1, torch CPU)")
    ax.set_ylabel("top-1 on the scoring images (%)")
    ax.set_title("bespoke students vs Lite0/Lite1 and baselines")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
