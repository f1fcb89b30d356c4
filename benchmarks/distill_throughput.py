"""Block-level distillation throughput: does sharing the teacher forward pay off?

tf_efficientnet_lite2 with its real (packaged) ImageNet weights, alternatives from the built-in
block sources on sampled segments, real sample images. Reports images/s of bunched training and

    efficiency_ratio = measured bunch step time
                       / (one teacher forward + sum of each alternative's own forward+backward)

where the denominator's parts are timed separately in the same run, interleaved with the bunch
steps so drift affects both alike. A bunch step also includes the optimiser update, so the ratio
is >= 1 in practice; the target is <= 1.2. The last line printed is ``efficiency_ratio=<number>``.

    python benchmarks/distill_throughput.py [--input-size 260] [--batch 8] [--segments 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample" / "train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="tf_efficientnet_lite2")
    ap.add_argument("--input-size", type=int, default=260)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--calibration", type=int, default=16, help="calibration images for the block sources")
    ap.add_argument("--sources", default="pruned-self,lowrank,skip,timm-donors")
    ap.add_argument("--donors", default="tf_efficientnet_lite0")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    ap.add_argument("--steps", type=int, default=2, help="timed bunch steps per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=str(SAMPLE) if SAMPLE.is_dir() else None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from bespoke import data as images
    from bespoke.blocks import Context
    from bespoke.distill import Job, Settings, calibration_batch, train_bunch
    from bespoke.house import AlternativeRecord, alternative_id
    from bespoke.models import load_model
    from bespoke.partition import Partition
    from bespoke.plugins import load_registry

    t0 = time.perf_counter()
    teacher = load_model(args.teacher, weights="packaged").requires_grad_(False)
    size = args.input_size
    part = Partition.from_model(teacher, (1, 3, size, size), name=args.teacher)
    imgs = images.open_images(args.data)
    view = imgs.with_transform(images.transforms_for(teacher, size))
    calib = calibration_batch(view, args.calibration)
    n_batch = args.batch * (args.steps + 1)
    xs = calibration_batch(view, n_batch)
    while xs.shape[0] < n_batch:  # few images (scikit-image's photos): repeat them
        xs = torch.cat([xs, xs])[:n_batch]
    # pre-decoded batches: the step time measures training, not JPEG decoding
    tensors = images.ImageSet([images._Item(f"x{i}", -1, (lambda t=xs[i]: t)) for i in range(n_batch)],
                              labelled=False, source="memory")

    registry = load_registry()
    ctx = Context(part, args.teacher, (3, size, size), calibration=calib, seed=0)
    segments = part.sample_segments(args.segments, 0.3, seed=0)
    jobs: list[Job] = []
    for name in [s.strip() for s in args.sources.split(",") if s.strip()]:
        # creation quality is not measured here: the cheap settings give the same architectures
        opts = {"timm-donors": {"donors": args.donors.split(","), "max_per_segment": 1},
                "pruned-self": {"importance": "magnitude"}}.get(name, {})
        source = registry.block_source(name, opts)
        for seg in segments:
            try:
                specs = source.propose(ctx, seg)
            except Exception as exc:
                print(f"# {name} failed to propose for {seg.id}: {exc}", file=sys.stderr)
                continue
            for spec in specs:
                try:
                    module, full = source.create(ctx, seg, spec)
                except Exception as exc:
                    print(f"# {name} failed to create {spec.label}: {exc}", file=sys.stderr)
                    continue
                aid = alternative_id(seg, full, [j.record.id for j in jobs])
                rec = AlternativeRecord(id=aid, segment=seg.id, source=name, spec=full)
                jobs.append(Job(rec, seg, module))
    if not jobs:
        raise SystemExit("no alternatives were created")
    setup_s = time.perf_counter() - t0
    print(f"teacher={args.teacher} input={size} batch={args.batch} threads={torch.get_num_threads()} "
          f"segments={len(segments)} alternatives={len(jobs)} setup_s={setup_s:.1f}")
    for j in jobs:
        print(f"  {j.record.id}", flush=True)

    loss_fn = registry.distill_loss("mse")
    settings = Settings(epochs=1, steps_per_epoch=args.steps + 1, batch_size=args.batch, lr=1e-4,
                        cache_activations=False, seed=0)
    needed = sorted({j.segment.start for j in jobs} | {j.segment.end for j in jobs})
    x = xs[:args.batch]
    with torch.no_grad():
        acts = part.activations(x, needed)

    step_s: list[float] = []
    teacher_s: list[float] = []
    alt_s: dict[str, list[float]] = {j.record.id: [] for j in jobs}

    def time_teacher() -> None:
        for _ in range(args.steps):
            t = time.perf_counter()
            with torch.no_grad():
                part.activations(x, needed)
            teacher_s.append(time.perf_counter() - t)

    def time_alternatives(reps: int = args.steps) -> None:
        for j in jobs:
            j.module.train().requires_grad_(True)  # as train_bunch trains them
            for _ in range(reps):
                for p in j.module.parameters():
                    p.grad = None
                t = time.perf_counter()
                loss = loss_fn(j.module(acts[j.segment.start]), acts[j.segment.end])
                if loss.requires_grad:
                    loss.backward()
                alt_s[j.record.id].append(time.perf_counter() - t)
            for p in j.module.parameters():
                p.grad = None

    def time_bunch() -> None:
        marks: list[float] = []

        def on_step(step, total, loss, ips):
            marks.append(time.perf_counter())

        for j in jobs:
            j.failed, j.steps = None, 0
        train_bunch(part, jobs, tensors, loss_fn, settings, on_step)
        step_s.extend(b - a for a, b in zip(marks, marks[1:]))  # the first step is warm-up
        failed = [j.record.id for j in jobs if j.failed]
        if failed:
            print(f"# failed in the bunch: {failed}", file=sys.stderr)

    med = statistics.median
    time_alternatives(1)  # warm-up of every alternative
    for v in alt_s.values():
        v.clear()
    time_teacher()
    for r in range(args.rounds):
        time_bunch()
        time_teacher()
        time_alternatives()
        sep = med(teacher_s) + sum(med(v) for v in alt_s.values())
        print(f"# round {r + 1}/{args.rounds}: bunch step {med(step_s) * 1e3:.0f} ms, "
              f"separate {sep * 1e3:.0f} ms, ratio so far {med(step_s) / sep:.3f} "
              f"({len(step_s)} bunch steps timed)", flush=True)
    t_teacher = med(teacher_s)
    t_alts = sum(med(v) for v in alt_s.values())
    t_step = med(step_s)
    ratio = t_step / (t_teacher + t_alts)
    print(f"teacher_forward_ms={t_teacher * 1e3:.1f}")
    print(f"sum_alternative_fwd_bwd_ms={t_alts * 1e3:.1f}")
    print(f"separate_total_ms={(t_teacher + t_alts) * 1e3:.1f}")
    print(f"bunch_step_ms={t_step * 1e3:.1f}")
    print(f"images_per_s={args.batch / t_step:.2f}")
    print(f"unshared_teacher_ms={(t_teacher * len(jobs) + t_alts) * 1e3:.1f}  (one teacher forward per alternative)")
    print(f"efficiency_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
