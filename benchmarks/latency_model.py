"""How well does the additive LUT model predict students' latency, before and after calibration?

Teacher: tf_efficientnet_lite2 with its real packaged ImageNet weights, at its native 260 px.
Segments: runs of one or two consecutive blocks. Alternatives: skip (the identity, where every
block of the run is residual) and channel-pruned copies keeping 25/50/75% of each inverted
residual's hidden channels (L1-ranked). Random students replace random non-overlapping segments.

For each runtime (torch eager CPU, ONNX Runtime CPU): profile every segment and alternative (and the
teacher) into a LUT with the bespoke estimator, predict every student additively from the LUT,
measure every student end to end with the same estimator (interleaved), then fit the LUT's linear
calibration on half of the students and test it on the other half.

    python benchmarks/latency_model.py [--students 32] [--runs 20] [--clock cpu|wall]

By default it times the CPU time of the (single) timing thread, so that other work sharing the
machine does not count; on a quiet, dedicated machine ``--clock wall`` measures elapsed time.

The last line is ``within_5pct_calibrated=<fraction>`` for torch CPU (held-out half).
Timings depend on the machine and on whatever else runs on it: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bespoke.latency import (
    ProfileItem, calibrate_table, error_summary, make_query, profile_modules, write_lut,
)
from bespoke.models import load_model
from bespoke.plugins import load_registry


def prune_inverted_residual(block: nn.Module, keep: float) -> nn.Module:
    """A copy of a timm InvertedResidual keeping the ``keep`` fraction of its hidden channels,
    chosen by the L1 norm of the expansion conv's filters (boundary channels untouched)."""
    b = copy.deepcopy(block)
    mid = b.conv_pw.out_channels
    k = max(1, int(round(mid * keep)))
    idx = b.conv_pw.weight.detach().abs().sum(dim=(1, 2, 3)).argsort(descending=True)[:k].sort().values

    def conv(old: nn.Conv2d, out_idx=None, in_idx=None, depthwise=False) -> nn.Conv2d:
        w = old.weight.detach()
        if out_idx is not None:
            w = w[out_idx]
        if in_idx is not None and not depthwise:
            w = w[:, in_idx]
        new = nn.Conv2d(w.shape[1] * (len(out_idx) if depthwise else 1), w.shape[0], old.kernel_size,
                        old.stride, old.padding, old.dilation, groups=len(out_idx) if depthwise else 1,
                        bias=old.bias is not None)
        new.weight.data.copy_(w)
        if old.bias is not None:
            new.bias.data.copy_(old.bias.detach()[out_idx] if out_idx is not None else old.bias.detach())
        return new

    def bn(old: nn.Module) -> nn.Module:
        new = copy.deepcopy(old)
        new.num_features = k
        new.weight = nn.Parameter(old.weight.detach()[idx].clone())
        new.bias = nn.Parameter(old.bias.detach()[idx].clone())
        new.running_mean = old.running_mean[idx].clone()
        new.running_var = old.running_var[idx].clone()
        return new

    b.conv_pw = conv(block.conv_pw, out_idx=idx)
    b.bn1 = bn(block.bn1)
    b.conv_dw = conv(block.conv_dw, out_idx=idx, depthwise=True)
    b.bn2 = bn(block.bn2)
    b.conv_pwl = conv(block.conv_pwl, in_idx=idx)
    return b


def build_problem(model: nn.Module, size: int):
    """Blocks with their input shapes; segments (runs of 1-2 blocks) with alternatives."""
    blocks, shapes = [], []
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        x = model.bn1(model.conv_stem(x))
        for si, stage in enumerate(model.blocks):
            for bi, blk in enumerate(stage):
                blocks.append((si, bi, blk))
                shapes.append(tuple(x.shape))
                x = blk(x)
    segments = []  # (first block index, length, teacher module, input shape, {alt name: module})
    for i in range(len(blocks)):
        for length in (1, 2):
            if i + length > len(blocks):
                continue
            run = [blocks[j][2] for j in range(i, i + length)]
            teacher_seg = nn.Sequential(*run).eval()
            alts: dict[str, nn.Module] = {}
            if all(getattr(b, "has_skip", False) for b in run):
                alts["skip"] = nn.Identity()
            if all(hasattr(b, "conv_pwl") for b in run):
                for keep in (0.25, 0.5, 0.75):
                    alts[f"prune{int(keep * 100)}"] = nn.Sequential(*[prune_inverted_residual(b, keep) for b in run]).eval()
            if alts:
                segments.append((i, length, teacher_seg, shapes[i], alts))
    return blocks, segments


def random_students(blocks, segments, n: int, seed: int):
    rng = random.Random(seed)
    students = []
    while len(students) < n:
        order = list(range(len(segments)))
        rng.shuffle(order)
        want = rng.randint(2, 8)
        chosen, used = [], set()
        for s in order:
            i, length = segments[s][0], segments[s][1]
            span = set(range(i, i + length))
            if span & used:
                continue
            used |= span
            chosen.append((s, rng.choice(sorted(segments[s][4]))))
            if len(chosen) == want:
                break
        students.append(chosen)
    return students


def assemble(model: nn.Module, blocks, segments, choice) -> nn.Module:
    student = copy.deepcopy(model).eval()
    for s, alt in choice:
        i, length, _, _, alts = segments[s]
        si, bi, _ = blocks[i]
        student.blocks[si][bi] = copy.deepcopy(alts[alt])
        for j in range(i + 1, i + length):
            sj, bj, _ = blocks[j]
            student.blocks[sj][bj] = nn.Identity()
    return student


def evaluate(name: str, estimator, model, size, blocks, segments, students, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    items = []
    for i, length, seg, shape, alts in segments:
        items.append(ProfileItem(f"blocks {i}..{i + length - 1}", seg, shape, "segment"))
        for alt_name, alt in alts.items():
            items.append(ProfileItem(f"blocks {i}..{i + length - 1} {alt_name}", alt, shape, "alternative"))
    teacher = ProfileItem("tf_efficientnet_lite2", model, (1, 3, size, size), "teacher")
    table = profile_modules(items, estimator, teacher=teacher, count_flops_too=False)
    lut_path = write_lut(table, out_dir / f"lut-{name}.json")
    t_profile = time.perf_counter() - t0

    predicted = []
    for choice in students:
        savings = []
        for s, alt in choice:
            _, _, seg, shape, alts = segments[s]
            seg_ms = table.get_ms(make_query(seg, shape).key)
            alt_ms = table.get_ms(make_query(alts[alt], shape).key)
            savings.append(seg_ms - alt_ms)
        predicted.append(table.predict(savings, calibrated=False))

    t1 = time.perf_counter()
    modules = [assemble(model, blocks, segments, c) for c in students]
    queries = [make_query(m, (1, 3, size, size)) for m in modules]
    # The teacher runs among the students again: how far the machine drifted since profiling.
    teacher_q = make_query(model, (1, 3, size, size))
    # Distinct students may share an architecture (and so a key): measured once, answered for both.
    ms = estimator.latencies(queries + [teacher_q])
    measured = [ms[q.key] for q in queries]
    drift = ms[teacher_q.key] / table.teacher.ms
    t_measure = time.perf_counter() - t1

    fit_idx = list(range(0, len(students), 2))
    test_idx = list(range(1, len(students), 2))
    calibrated_table = calibrate_table(table, [predicted[i] for i in fit_idx], [measured[i] for i in fit_idx],
                                       device=estimator.device())
    write_lut(calibrated_table, lut_path)
    cal = calibrated_table.calibration
    before = error_summary([predicted[i] for i in test_idx], [measured[i] for i in test_idx])
    after = error_summary([cal.apply(predicted[i]) for i in test_idx], [measured[i] for i in test_idx])
    before_all = error_summary(predicted, measured)
    print(f"\n== {name}: {estimator.device().runtime} on {estimator.device().name}, "
          f"{estimator.device().threads} thread(s); {len(table.entries)} LUT entries, teacher "
          f"{table.teacher.ms:.2f} ms; profile {t_profile:.0f}s, students {t_measure:.0f}s")
    print(f"   students: {len(students)}; measured {min(measured):.2f}..{max(measured):.2f} ms; "
          f"predicted {min(predicted):.2f}..{max(predicted):.2f} ms; teacher re-measured among the "
          f"students / in the LUT = {drift:.3f}")
    print(f"   uncalibrated, all {before_all.n}:     median {before_all.median:.2%}  p95 {before_all.p95:.2%}  "
          f"within 5% {before_all.within_5pct:.2f}")
    print(f"   uncalibrated, test half {before.n}: median {before.median:.2%}  p95 {before.p95:.2%}  "
          f"within 5% {before.within_5pct:.2f}")
    print(f"   calibrated (a={cal.a:.3f}, b={cal.b:+.2f} ms, fit on {cal.n}), test half {after.n}: "
          f"median {after.median:.2%}  p95 {after.p95:.2%}  within 5% {after.within_5pct:.2f}")
    return {"before": before, "after": after}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per module (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", type=int, default=260)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                    help="cpu (default): the timing thread's CPU time, which ignores waiting for a core on a "
                         "shared machine; wall: elapsed time (use on a quiet, dedicated machine)")
    ap.add_argument("--statistic", choices=["median", "min"], default="median",
                    help="summary of the timed runs (min resists other load on a shared machine)")
    ap.add_argument("--runtimes", default="torch,onnxruntime")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bespoke-latency-model"),
                    help="where the LUTs (and the exported ONNX models) go")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = load_model("tf_efficientnet_lite2", weights="packaged").eval()
    blocks, segments = build_problem(model, args.size)
    students = random_students(blocks, segments, args.students, args.seed)
    n_alts = sum(len(s[4]) for s in segments)
    print(f"tf_efficientnet_lite2 @ {args.size}px: {len(blocks)} blocks, {len(segments)} segments, "
          f"{n_alts} alternatives; {len(students)} random students "
          f"({sum(len(c) for c in students) / len(students):.1f} replacements each)")

    reg = load_registry()
    common = {"threads": args.threads, "runs": args.runs, "warmup": args.warmup, "statistic": args.statistic,
              "warm_per_visit": 1, "runs_per_visit": 2, "clock": args.clock}
    print(f"timing: {args.threads} thread(s), {args.warmup} warm-up + {args.runs} timed runs per module, "
          f"interleaved (each turn: 1 untimed + 2 timed runs), {args.clock} clock, statistic {args.statistic}")
    results = {}
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if "onnxruntime" in runtimes:
        # The legacy exporter exports in a tenth of the time; latencies do not depend on it much.
        est = reg.instantiate("onnxruntime-latency", {**common, "exporter": "torchscript",
                                                      "cache_dir": str(out_dir / "onnx")})
        results["onnxruntime-cpu"] = evaluate("onnxruntime-cpu", est, model, args.size, blocks, segments, students, out_dir)
    if "torch" in runtimes:
        est = reg.instantiate("measured-latency", common)
        results["torch-cpu"] = evaluate("torch-cpu", est, model, args.size, blocks, segments, students, out_dir)
    if "torch-cpu" in results:
        print(f"within_5pct_calibrated={results['torch-cpu']['after'].within_5pct:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
