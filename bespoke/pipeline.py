"""The orchestrator: the pipeline, top to bottom. Knows no particular donor, loss, device or search."""

from __future__ import annotations


def build(cfg, registry, console=None):
    """Build (or resume) the model house: partition the teacher, sample segments, create every
    enabled block source's alternatives, distil them, profile them. Returns the :class:`House`.

    Rerunning on an existing house resumes (trained alternatives are kept, pending ones trained).
    Under ``torchrun`` rank 0 creates the alternatives and every rank trains its share.
    """
    from pathlib import Path

    import torch
    from rich.console import Console

    from bespoke import data as images
    from bespoke.blocks import Context
    from bespoke.distill import (DistEnv, Settings, block_sources, calibration_batch,
                                 distill_house, source_for, summary_table, teacher_top1)
    from bespoke.errors import UsageError
    from bespoke.house import House, TeacherInfo, count_flops, count_params, populate
    from bespoke.models import default_input_size, load_model
    from bespoke.partition import Partition

    console = console or Console()
    dist = DistEnv.from_env(cfg.device)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        root = Path(cfg.house or Path(cfg.out) / "house")
        existing = House.open(root) if House.exists(root) else None  # a bad manifest fails early
        settings = Settings.from_build(cfg.build, seed=cfg.seed, device=cfg.device)

        # 1. The teacher, frozen, partitioned at its input size.
        weights = cfg.teacher_weights or "auto"
        teacher = load_model(cfg.teacher, weights=weights)
        size = cfg.input_size or default_input_size(teacher)
        partition = Partition.from_model(teacher, (1, 3, size, size), name=cfg.teacher)
        teacher.to(cfg.device).requires_grad_(False)

        # 2. Images: training, held-out, and a calibration batch for the block sources.
        split = images.prepare(teacher, size, data=cfg.data, val_data=cfg.val_data,
                               class_list=cfg.class_list, held_out=cfg.build.validation_images,
                               augment=cfg.build.augment, seed=cfg.seed)
        if dist.main:
            console.print(f"images: {split.source}: {len(split.train)} for training, {len(split.val)} held out"
                          + (", labelled" if split.labelled else ", unlabelled"))
            if cfg.data is None:
                console.print("[yellow]note:[/yellow] scikit-image's sample photos are a dozen images: enough "
                              "to try bespoke, too few for useful distillation; pass --data FOLDER")
        calibration = calibration_batch(images.eval_view(split, teacher, size), cfg.build.calibration_images)
        ctx = Context(partition, cfg.teacher, (3, size, size), calibration=calibration,
                      seed=cfg.seed, device=cfg.device)
        sources = block_sources(cfg, registry, warn=lambda m: console.print(f"[yellow]warning:[/yellow] {m}"))

        # 3. The house: created, or resumed; rank 0 samples segments and creates alternatives.
        if dist.main:
            if existing is not None:
                house = existing
                house.check_teacher(cfg.teacher, size)
                house.merge_shards()  # results of a killed torchrun build
                console.print(f"resuming the model house {root}")
                for line in _segment_settings_changed(house, cfg):
                    console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
            else:
                house = House.create(root, TeacherInfo(
                    name=cfg.teacher, weights=weights, input_size=size, params=count_params(teacher),
                    flops=count_flops(teacher, (1, 3, size, size)),
                    num_cut_points=len(partition.cut_points)),
                    build=cfg.build.model_dump(mode="json") | {"seed": cfg.seed},
                    data={"source": split.source, "train_images": len(split.train),
                          "val_images": len(split.val), "labelled": split.labelled})
            if not house.manifest.segments:
                if cfg.build.enumerate_max_len:
                    segments = partition.enumerate_segments(cfg.build.enumerate_max_len)
                elif cfg.build.segments:
                    segments = partition.sample_segments(cfg.build.segments, cfg.build.max_fraction, seed=cfg.seed)
                else:
                    segments = []
                extra = []
                if cfg.build.tiles:  # guarantee a non-overlapping set that covers the network
                    extra += partition.tile_segments(cfg.build.tiles)
                if cfg.build.modules:  # the network's own blocks and stages
                    extra += partition.module_segments(cfg.build.max_fraction)
                if extra:
                    segments = sorted({(s.start, s.end): s for s in [*extra, *segments]}.values(),
                                      key=lambda s: (s.start, s.end))
                if not segments:
                    raise UsageError(f"no segments of {cfg.teacher} to build alternatives for: the "
                                     "build settings found none (build.modules finds only blocks and stages "
                                     "mapping a cut point to a cut point); set build.segments or build.tiles")
            else:
                segments = list(house.manifest.segments)
            populate(house, partition, ctx, sources, segments, seed=cfg.seed,
                     warn=lambda m: console.print(f"[yellow]warning:[/yellow] {m}"))
            if house.manifest.teacher.val_top1 is None and split.labelled and len(split.val):
                house.manifest.teacher.val_top1 = teacher_top1(partition, split.val, settings)
                house.save()
            pending = len(house.by_status("pending"))
            console.print(f"{len(house.manifest.segments)} segments, "
                          f"{len(house.manifest.alternatives)} alternatives, {pending} to train"
                          + (f" on {dist.world} processes" if dist.world > 1 else ""))
        dist.barrier()
        if not dist.main:
            house = House.open(root)

        # 4. Block-level distillation and profiling of every pending alternative.
        def make_module(record):
            source = source_for(record.source, sources, cfg, registry)
            return house.load_alternative(record.id, ctx, source, initial=True)

        loss_fn = registry.instantiate(cfg.plugins.distill_loss, cfg.plugin_options.get(cfg.plugins.distill_loss),
                                       category="distill-loss")
        report = distill_house(house, partition, make_module, split.train, split.val, loss_fn, settings,
                               bunch_size=cfg.build.bunch_size, dist=dist, console=console)
        dist.barrier()

        # 5. One house: rank 0 merges the ranks' results and reports.
        if dist.main:
            if dist.world > 1:
                house = House.open(root)
                house.merge_shards()
            skipped = split.skipped
            if skipped:
                house.manifest.data["skipped"] = sorted(set(house.manifest.data.get("skipped", [])) | set(skipped))
                house.save()
            console.print(summary_table(house, title=f"model house {root}"))
            counts = {s: len(house.by_status(s)) for s in ("trained", "failed", "pending")}
            console.print(f"{counts['trained']} trained, {counts['failed']} failed, {counts['pending']} pending"
                          + (f"; {report.images_per_second:.1f} images/s" if report.images_per_second else ""))
            if skipped:
                console.print(f"[yellow]{len(skipped)} image(s) failed to decode and were skipped:[/yellow] "
                              + ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
        dist.barrier()
        return house
    finally:
        dist.close()


def profile(cfg, registry, output, console=None, size=None):
    """Measure every alternative and teacher segment of the house (and the whole teacher) with
    the configured measuring estimator, at input resolution ``size`` (default: the teacher's
    own); write a latency lookup table to ``output``.

    This is how a vendor builds the table their device plugin ships. Returns the table.
    """
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from bespoke.errors import UsageError
    from bespoke.house import House
    from bespoke.latency import module_signature, profile_house, read_lut, write_lut

    def _key(item):
        return module_signature(item.module, item.input_shape)

    console = console or Console()
    name = cfg.plugins.latency
    options = dict(cfg.plugin_options.get(name, {}))
    record = registry.get(name, "latency")
    fields = getattr(record.options_model, "model_fields", {}) if record.options_model else {}
    if cfg.threads and "threads" in fields and "threads" not in options:
        options["threads"] = cfg.threads
    estimator = registry.instantiate(name, options, category="latency")
    if getattr(estimator, "table", None) is not None:
        raise UsageError(f"`bespoke profile` measures, but {name!r} answers from a lookup table; "
                         "pick a measuring estimator: --plugin measured-latency or --plugin onnxruntime-latency")
    house_dir = Path(cfg.house or Path(cfg.out) / "house")
    house = House.open(house_dir)
    device = estimator.device()
    px = f" at {size} px" if size else ""
    console.print(f"profiling {house_dir}{px} with {name}: {device.runtime} on {device.name}, "
                  f"{device.threads} thread(s), batch {device.batch}")
    table, mods = profile_house(house, estimator, registry, cfg, batch=device.batch, size=size)
    output = Path(output)
    if output.is_file():  # a calibration fitted for this device stays valid for new measurements
        try:
            old = read_lut(output, device=device)
        except UsageError:
            old = None
        if old is not None and old.calibration is not None:
            table.calibration = old.calibration
            console.print(f"kept the calibration already in {output}")
    write_lut(table, output)
    for alt_id, why in mods.skipped.items():
        console.print(f"[yellow]warning:[/yellow] alternative {alt_id!r} not profiled: {why}", highlight=False)
    summary = Table(title=f"latency on {device.name} ({device.runtime})")
    for col in ("segment", "teacher ms", "alternatives", "fastest alternative", "ms"):
        summary.add_column(col)
    for seg_id, item in mods.segments.items():
        seg_ms = table.get_ms(_key(item))
        alts = [(table.get_ms(_key(mods.alternatives[a])), a) for a, s in mods.alt_segment.items() if s == seg_id]
        best = min(alts) if alts else (None, "-")
        summary.add_row(seg_id, f"{seg_ms:.3f}", str(len(alts)), best[1],
                        "-" if best[0] is None else f"{best[0]:.3f}")
    console.print(summary)
    console.print(f"teacher {table.teacher.ms:.3f} ms; {len(table.entries)} entries written to {output}")
    return table


def search(cfg, registry, output, storage=None, study=None, console=None, evaluate=None, size=None,
           size_ratio=None):
    """Search which segments to replace under each of ``cfg.budgets``; write the report (recipes
    per budget and the Pareto front) to ``output`` and show a table. Returns the report.

    ``cfg.house`` is a model house directory (latencies from the selected latency estimator, loss
    proxy ``cfg.search.proxy`` from the house's profiles) or a search-problem JSON file
    (``bespoke.search.problem_to_dict``). ``storage``/``study`` go to strategies that take them
    (``optuna``). ``evaluate(candidates) -> RealScore`` (a list of the chosen
    :class:`bespoke.types.Candidate` records), when given, re-ranks the best
    ``cfg.search.rerank_top_k`` candidates per budget by real scores. ``size`` searches students
    that run at that input resolution (latencies of the house rebuilt at that size); budgets stay
    ratios of the teacher at its own size, which runs ``1 / size_ratio`` times as long as at
    ``size`` (measured side by side), and ``evaluate``'s latency ratios are to it.
    """
    from pathlib import Path

    from rich.console import Console

    from bespoke import search as S
    from bespoke.errors import UsageError

    console = console or Console()
    output = Path(output)
    if not cfg.house:
        raise UsageError("give the model house directory (bespoke search HOUSE) or set `house` in the config")
    problem, teacher = _search_problem(cfg, registry, console, size)
    reference_ms = problem.teacher_ms / size_ratio if size_ratio else problem.teacher_ms  # what ratios are of
    budgets_ms = S.resolve_budgets(cfg.budgets, reference_ms)
    name = cfg.plugins.search
    options = dict(cfg.plugin_options.get(name, {}))
    record = registry.get(name, "search")
    fields = getattr(record.options_model, "model_fields", {}) if record.options_model else {}
    for key, value in (("storage", storage), ("study", study)):
        if value is None:
            continue
        if key in fields:
            options[key] = value
        else:
            console.print(f"[yellow]warning:[/yellow] --{key} is ignored: search strategy {name!r} keeps no study")
    strategy = registry.instantiate(name, options, category="search")
    solutions = S.run_strategy(strategy, problem, budgets_ms, seed=cfg.seed,
                               workdir=str(output.resolve().parent), name=name)
    if evaluate is not None:
        def real(chosen):
            r = evaluate([problem.candidates[i] for i in chosen])
            if isinstance(r, S.RealScore) and r.latency_ms is None and r.latency_ratio is not None:
                r = r.model_copy(update={"latency_ms": r.latency_ratio * reference_ms})
            return r

        solutions = [S.rerank(problem, s, real, k=cfg.search.rerank_top_k)[0] for s in solutions]
        for s in solutions:
            for row in s.meta.get("reranked", []):
                console.print(f"  re-rank at {s.budget_ms:.2f} ms: {len(row['chosen'])} replacement(s), proxy loss "
                              f"{row['proxy_loss']:.2f}, real fidelity {row['fidelity']:.4f}"
                              + ("" if row["within_budget"] else " (over budget)"), highlight=False)
    report = S.make_report(problem, cfg.budgets, solutions, strategy=name, proxy=cfg.search.proxy,
                           house=str(cfg.house), teacher=teacher)
    if size:
        for r in report.results:
            r.input_size = int(size)
            r.meta["reference_ms"] = reference_ms
            r.speedup = reference_ms / r.latency_ms if r.latency_ms > 0 else r.speedup
    written = S.write_report(report, output)
    console.print(S.report_table(report))
    for r in report.results:
        if not r.feasible:
            console.print(f"[red]budget {r.budget:g} ({r.budget_ms:.2f} ms) cannot be met:[/red] the fastest "
                          f"student this house allows runs in {r.fastest_ms:.2f} ms "
                          f"({r.fastest_ms / problem.teacher_ms:.2f} of the teacher). Raise the budget, or "
                          "build more (or cheaper) alternatives.")
    console.print(f"wrote {written[0]} and {len(written) - 1} recipe file(s) beside it")
    return report


def _search_problem(cfg, registry, console, size=None):
    """The search problem from a problem JSON file or a model house; and the teacher's name."""
    import json
    from pathlib import Path

    from bespoke import search as S
    from bespoke.errors import UsageError

    path = Path(cfg.house)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a model house directory nor a search-problem JSON file ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != "bespoke.search-problem":
            raise UsageError(f"{path}: not a search-problem file (kind 'bespoke.search-problem'); "
                             "give a model house directory")
        problem = S.problem_from_dict(data)
        problem.lam = cfg.search.lam
        return problem, data.get("teacher")
    teacher_ms, seg_ms, alt_ms, house = _house_latencies(cfg, registry, path, console, size)
    problem = S.problem_from_house(house.manifest, seg_ms, alt_ms, teacher_ms,
                                   proxy=cfg.search.proxy, lam=cfg.search.lam)
    return problem, house.manifest.teacher.name


def _house_latencies(cfg, registry, root, console, size=None):
    """Teacher, teacher-segment and alternative latencies of a house from the selected estimator."""
    from bespoke.blocks import Context
    from bespoke.distill import block_sources, source_for
    from bespoke.errors import UsageError
    from bespoke.house import House
    from bespoke.latency import make_query
    from bespoke.models import load_model
    from bespoke.partition import Partition

    if not House.exists(root):
        raise UsageError(f"{root}: no model house there (build one with `bespoke build`)")
    house = House.open(root)
    t = house.manifest.teacher
    model = load_model(t.name, weights=t.weights or "auto")
    partition = Partition.from_model(model, (1, 3, t.input_size, t.input_size), name=t.name)
    size = int(size or t.input_size)
    partition = partition.resized(size)
    ctx = Context(partition, t.name, (3, size, size), calibration=None, seed=cfg.seed)
    sources = block_sources(cfg, registry, warn=lambda m: console.print(f"[yellow]warning:[/yellow] {m}"))
    estimator = registry.instantiate(cfg.plugins.latency, cfg.plugin_options.get(cfg.plugins.latency),
                                     category="latency")
    queries, seg_key, alt_key = {}, {}, {}
    for stored in house.manifest.segments:
        seg = partition.segment(stored.start, stored.end)  # shapes at this size
        q = make_query(partition.extract(seg), (1, *tuple(seg.in_shape)[1:]))
        queries.setdefault(q.key, q)
        seg_key[seg.id] = q.key
    for rec in house.by_status("trained"):
        stored = house.segment(rec.segment)
        seg = partition.segment(stored.start, stored.end)
        module = house.load_alternative(rec.id, ctx, source_for(rec.source, sources, cfg, registry))
        q = make_query(module, (1, *tuple(seg.in_shape)[1:]))
        queries.setdefault(q.key, q)
        alt_key[rec.id] = q.key
    tq = make_query(partition.model, (1, 3, size, size))
    queries.setdefault(tq.key, tq)
    ms = estimator.latencies(list(queries.values()))
    teacher_ms, seg_ms, alt_ms = ms[tq.key], {k: ms[v] for k, v in seg_key.items()}, {k: ms[v] for k, v in alt_key.items()}
    table = getattr(estimator, "table", None)
    if table is not None:  # a LUT: its in-context savings and its calibration (budgets in calibrated ms)
        from bespoke.latency import table_latencies

        teacher_ms, alt_ms = table_latencies(
            table, teacher_ms, seg_ms, alt_ms, segment_key=seg_key, alt_key=alt_key,
            alt_segment={a: house.alternative(a).segment for a in alt_key})
        cal = table.calibration
        if cal is not None:
            console.print(f"latency predictions calibrated from {cal.n} measured model(s): a={cal.a:.3f}, "
                          f"b={cal.b:+.2f} ms, c={cal.c:+.3f} ms per replaced segment", highlight=False)
    return (teacher_ms, seg_ms, alt_ms, house)


def finetune(cfg, registry, recipe, out, console=None):
    """Assemble the student a search recipe describes (``bespoke search`` writes one per budget),
    recalibrate its BatchNorm, fine-tune it with distillation, and save it to ``OUT/student``.

    Resumable: rerunning the same command after a kill continues from the last checkpoint in
    ``OUT/checkpoint``. Returns the saved student's directory.
    """
    from pathlib import Path

    from rich.console import Console

    from bespoke.config import apply_preset
    from bespoke.errors import UsageError
    from bespoke.house import House

    console = console or Console()
    cfg = apply_preset(cfg, registry)
    plan = _read_search_recipe(Path(recipe))
    root = Path(cfg.house or plan.get("house") or "")
    if not House.exists(root) and House.exists(Path(recipe).parent / "house"):
        root = Path(recipe).parent / "house"  # `bespoke run` keeps OUT/house beside the recipes
    if not House.exists(root):
        raise UsageError(f"recipe {str(recipe)!r} points at model house {str(root)!r}, which does not exist; "
                         "set `house` in the config (--config) to where the house is")
    stage = _Students(cfg, registry, House.open(root), console)
    made = stage.make(plan, Path(out))
    console.print(f"student saved to {made.student_dir} ({made.finetune.steps} fine-tuning steps; "
                  f"agreement with the teacher {_pct(made.before.agreement)} -> {_pct(made.after.agreement)} "
                  f"on {made.after.images} held-out images)")
    return made.student_dir


def export(student, out, formats, console=None, dynamic_batch=False):
    """Export a saved student directory to ``out`` in ``formats`` (onnx, torch-export,
    safetensors); the ONNX file is checked against PyTorch with onnxruntime and the saved
    safetensors form is reloaded and compared. ``dynamic_batch``: a symbolic batch axis in the
    ONNX file and the program (:mod:`bespoke.export`). Returns the
    :class:`bespoke.export.ExportResult`."""
    from pathlib import Path

    import torch
    from rich.console import Console

    from bespoke.export import check_formats, export_model
    from bespoke.student import load_student, save_student

    console = console or Console()
    formats = check_formats(formats)
    model = load_student(Path(student))
    shape = (1, *model.recipe.input_size)
    with model.taps(False):
        res = export_model(model, shape, Path(out), formats,
                           save_student=lambda d: save_student(model, model.recipe, d), dynamic_batch=dynamic_batch)
        if res.student_dir:
            x = torch.randn(shape)
            with torch.no_grad():
                diff = float((load_student(res.student_dir)(x) - model(x)).abs().max())
            console.print(f"safetensors + recipe: {res.student_dir} (reloaded; max |diff| {diff:.2e})")
    if res.onnx:
        batch = "dynamic batch" if isinstance(res.onnx_batch, str) else f"batch {res.onnx_batch}"
        console.print(f"ONNX: {res.onnx} ({res.onnx_exporter} exporter, {batch}; onnxruntime vs PyTorch "
                      f"max |diff| {res.onnx_max_abs_diff:.2e})")
    if res.torch_export:
        console.print(f"torch.export program: {res.torch_export} (torch.export.load reloads it)")
    return res


def run(cfg, registry, console=None):
    """Everything, for each budget: build (or reuse) the house, profile, search, fine-tune,
    evaluate, export, report. Writes ``OUT/report.json`` and ``OUT/pareto.png``; returns the
    :class:`bespoke.report.Report`.

    Every stage resumes: the house, the latency table, the search study and each student's
    fine-tuning checkpoint are kept in ``OUT``, so rerunning after a kill picks up where it was.
    """
    from pathlib import Path

    from rich.console import Console

    from bespoke.config import apply_preset

    console = console or Console()
    cfg = apply_preset(cfg, registry)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"house": cfg.house or str(out / "house")})
    clock = _Clock()

    with clock("build"):
        house = build(cfg, registry, console=console)
    sizes = [s for s in cfg.search.input_sizes if s != house.manifest.teacher.input_size]
    with clock("profile"):
        search_cfg = _profile(cfg, registry, out / "latency.json", console)
        sized_cfgs = {s: _profile(cfg, registry, out / f"latency-{s}px.json", console, size=s) for s in sizes}
    stage = _Students(cfg, registry, house, console)
    rerank = cfg.search.rerank and len(stage.split.val) > 0
    if sizes and not rerank:
        from bespoke.errors import UsageError

        raise UsageError("search.input_sizes compares students at different input sizes by their agreement with "
                         "the teacher on held-out images, and this run has none: give val_data, or raise "
                         "build.validation_images")
    with clock("search"):
        found = search(search_cfg, registry, out / ("search.json" if not sizes else f"search-{stage.size}px.json"),
                       console=console, evaluate=stage.fidelity if rerank else None)
        if sizes:
            found = _search_sizes(cfg, registry, stage, found, sized_cfgs, out, console)
    met = _require_feasible(found, console)
    with clock("finetune"):
        students = [stage.make(r.model_dump(), out / "students" / f"budget-{r.budget:g}")
                    for r in met]
    with clock("evaluate"):
        measured = stage.measure(students)
        at_own_size = [m for m in students if m.size == stage.size]  # what the table at that size predicted
        if at_own_size:
            _calibrate_lut(search_cfg, stage, at_own_size, measured, out / "latency.json", console)
    with clock("export"):
        exports = [stage.export(s) for s in students]
    with clock("report"):
        report = _report(cfg, stage, found, students, measured, exports, clock)
    return report


# -- helpers of finetune / export / run ----------------------------------------------------------


def _search_sizes(cfg, registry, stage, native, sized_cfgs, out, console):
    """Search students at each other input size too, and keep per budget the best re-ranked one
    over all sizes (:func:`bespoke.search.pick_scored`: the best held-out agreement among those
    measured within the budget). Writes the merged report to ``OUT/search.json``."""
    from bespoke import search as S

    ratios = stage.size_ratios(list(sized_cfgs))
    console.print("the teacher at other input sizes, measured beside itself at its own size: "
                  + ", ".join(f"{s} px {r:.3f}" for s, r in ratios.items()), highlight=False)
    found = {stage.size: native}
    for size, scfg in sized_cfgs.items():
        found[size] = search(scfg, registry, out / f"search-{size}px.json", console=console, size=size,
                             size_ratio=ratios[size], evaluate=lambda c, size=size: stage.fidelity(c, size))
    merged = []
    for i in range(len(native.results)):
        options = [(size, rep.results[i]) for size, rep in found.items()]
        feasible = [o for o in options if o[1].feasible] or options
        rows = [_scored_pick(r, native.teacher_ms) for _, r in feasible]
        _refine_finalists(cfg, stage, feasible, rows, native.results[i].budget)
        size, pick = feasible[S.pick_scored(rows, measured="measured_ratio", predicted="predicted_ratio")]
        pick = pick.model_copy(deep=True)
        pick.meta["input_sizes"] = [{"input_size": s, **row} for (s, _), row in zip(feasible, rows)]
        merged.append(pick)
        console.print(f"budget {pick.budget:g}: the student at {size} px agrees best within the budget ("
                      + ", ".join(f"{s} px {row['fidelity']:.4f}" + ("" if row["within_budget"] else " over")
                                  + (f" (timed x{len(row['measured_ratios'])}: {row['measured_ratio']:.3f})"
                                     if "measured_ratios" in row else "")
                                  for (s, _), row in zip(feasible, rows)) + ")", highlight=False)
    report = native.model_copy(update={"results": merged})
    S.write_report(report, out / "search.json")
    return report


def _refine_finalists(cfg, stage, finalists, rows, budget):
    """Sharpen the real scores ``rows`` of a budget's finalists (one ``(size, result)`` per input
    size) in place before the pick: with ``search.pick_remeasure``, time again those measured
    within ``pick_margin`` of the budget, either side, and judge them by the median of all their
    measurements; with ``search.pick_train_images``, score those within the budget (or near it)
    by their agreement on the held-out plus that many training images."""
    import statistics

    s = cfg.search
    if not (s.pick_train_images or s.pick_remeasure) or budget is None:
        return
    for (size, result), row in zip(finalists, rows):
        measured = row.get("measured_ratio")
        near = measured is not None and abs(measured - budget) <= s.pick_margin * budget
        if s.pick_remeasure and near and result.feasible:
            times = [measured] + [stage.ratio_of(result.choices, size) for _ in range(s.pick_remeasure)]
            times = [t for t in times if t is not None]
            row["measured_ratios"] = times
            row["measured_ratio"] = measured = float(statistics.median(times))
            row["within_budget"] = measured <= budget * (1 + 1e-9)
        if s.pick_train_images and result.feasible and (row["within_budget"] or near):
            row["proxy_fidelity"] = row["fidelity"]
            row["fidelity"] = stage.pick_fidelity(result.choices, size)


def _plain(choices):
    """Search choices (objects or dicts) as the dicts :meth:`_Students.assemble` takes."""
    def get(c, k):
        return c[k] if isinstance(c, dict) else getattr(c, k)

    return [{"alternative": get(c, "alternative"), "start": get(c, "start"), "end": get(c, "end")} for c in choices]


def _scored_pick(result, teacher_ms):
    """The real scores re-ranking gave the candidate ``result`` kept, as ratios of the teacher at
    its own size (so students at different input sizes compare)."""
    table = result.meta.get("reranked") or []
    row = table[result.meta.get("picked", 0)] if table else {}
    reference = result.meta.get("reference_ms") or teacher_ms
    measured = row.get("measured_ratio")
    if measured is None and row.get("measured_ms") is not None:
        measured = row["measured_ms"] / reference
    return {"fidelity": row.get("fidelity", float("-inf")), "measured_ratio": measured,
            "predicted_ratio": result.latency_ms / reference,
            "within_budget": bool(row.get("within_budget", result.feasible)) and result.feasible}


class _Clock:
    """Wall time per stage, for the report."""

    def __init__(self):
        import time

        self._time = time.perf_counter
        self.start = self._time()
        self.seconds: dict[str, float] = {}

    def __call__(self, name):
        import contextlib

        @contextlib.contextmanager
        def timed():
            t0 = self._time()
            try:
                yield
            finally:
                self.seconds[name] = round(self.seconds.get(name, 0.0) + self._time() - t0, 3)

        return timed()

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(self._time() - self.start, 3)}


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _read_search_recipe(path):
    """A per-budget recipe written by ``bespoke search`` (or one result of a search report)."""
    import json

    from bespoke.errors import UsageError

    if not path.is_file():
        raise UsageError(f"recipe {str(path)!r} does not exist; give one of the "
                         "search.budget-*.json files `bespoke search` wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"recipe {str(path)!r} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or "choices" not in data:
        raise UsageError(f"{str(path)!r} is not a search recipe (no 'choices'); give one of the "
                         "search.budget-*.json files `bespoke search` wrote")
    return data


def _profile(cfg, registry, lut_path, console, size=None):
    """Latencies of every teacher segment and alternative through the selected estimator (at
    input resolution ``size``; default: the teacher's own).

    A measuring estimator measures once into ``lut_path`` and the search reads that table (no
    second measurement); a table estimator (a device plugin's LUT) is the profile already.
    Returns the configuration the search stage runs with.
    """
    record = registry.get(cfg.plugins.latency, "latency")
    probe = registry.instantiate(record.name, cfg.plugin_options.get(record.name), category="latency")
    if getattr(probe, "table", None) is not None:
        if size:
            return _table_at_size(cfg, record.name, probe, size, console)
        console.print(f"latencies from the table of {record.name!r}; nothing to measure")
        return cfg
    profile(cfg, registry, lut_path, console=console, size=size)
    options = {**cfg.plugin_options, "lut-latency": {"path": str(lut_path)}}
    if "lut-latency" not in registry.records:
        return cfg
    plugins = cfg.plugins.model_copy(update={"latency": "lut-latency"})
    return cfg.model_copy(update={"plugins": plugins, "plugin_options": options})


def _table_at_size(cfg, name, probe, size, console):
    """A table estimator answers at one input size; the table for another size lies beside its
    file as ``<stem>-<size>px.json`` (what `bespoke run` writes). The configuration that reads it."""
    import json
    from pathlib import Path

    from bespoke.errors import UsageError

    options = dict(cfg.plugin_options.get(name) or {})
    path = Path(options.get("path") or getattr(getattr(probe, "options", None), "path", None) or "")
    sibling = path.with_name(f"{path.stem}-{size}px{path.suffix or '.json'}") if path.name else None
    if sibling is None or not sibling.is_file():
        raise UsageError(f"search.input_sizes asks for students at {size} px, but the latency table of {name!r} "
                         f"({path if path.name else 'no file'}) holds one input size and no table "
                         f"{sibling.name if sibling else f'<table>-{size}px.json'} lies beside it. Profile the "
                         f"house at that size (a `bespoke run` with a measuring estimator, --plugin measured-latency, "
                         "writes one), or leave search.input_sizes empty")
    try:
        noted = json.loads(sibling.read_text(encoding="utf-8")).get("notes", {}).get("input_size")
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"{sibling}: not a readable latency table ({exc})") from None
    if noted is not None and int(noted) != int(size):
        raise UsageError(f"{sibling} was profiled at {noted} px, not {size} px; profile the house again at {size} px")
    console.print(f"latencies at {size} px from {sibling}", highlight=False)
    return cfg.model_copy(update={"plugin_options": {**cfg.plugin_options, name: {**options, "path": str(sibling)}}})


def _calibrate_lut(search_cfg, stage, made, measured, lut_path, console):
    """The students (and the teacher) were just measured end to end: refit the calibration of the
    latency table the search read (when this run wrote it) so later searches predict better."""
    from pathlib import Path

    from bespoke.errors import UsageError
    from bespoke.latency import recalibrate_lut

    opts = search_cfg.plugin_options.get("lut-latency") or {}
    if search_cfg.plugins.latency != "lut-latency" or Path(opts.get("path", "")) != Path(lut_path):
        return None  # a device plugin's table (or a measuring estimator): nothing of ours to refit
    points = [(m.name, m.plan["latency_ms"], len(m.plan.get("choices", [])), measured.get(m.name)) for m in made]
    try:
        table = recalibrate_lut(lut_path, stage.latency_device, points, teacher_measured_ms=measured.get("teacher"))
    except UsageError as exc:
        console.print(f"[yellow]warning:[/yellow] latency table not calibrated: {exc}", highlight=False)
        return None
    cal = table.calibration
    console.print(f"calibrated {lut_path} from {cal.n} measured model(s): a={cal.a:.3f}, b={cal.b:+.2f} ms, "
                  f"c={cal.c:+.3f} ms per replaced segment; median error {_pct(cal.median_abs_rel_error_before)} "
                  f"-> {_pct(cal.median_abs_rel_error_after)}", highlight=False)
    return table


def _segment_settings_changed(house, cfg) -> list[str]:
    """Why a resumed house does not follow this configuration's segment settings, if it doesn't:
    its segments were drawn once, when it was created, and are kept."""
    if not house.manifest.segments:
        return []
    stored = house.manifest.build or {}
    now = {**{k: getattr(cfg.build, k) for k in ("segments", "tiles", "modules", "max_fraction",
                                                  "enumerate_max_len")},
           "seed": cfg.seed}
    changed = [f"{'' if k == 'seed' else 'build.'}{k} {stored[k]!r} -> {v!r}"
               for k, v in now.items() if k in stored and stored[k] != v]
    if not changed:
        return []
    return [f"the model house {house.root} was built with other segment settings ({', '.join(changed)}); "
            f"it keeps its {len(house.manifest.segments)} segments and is not resampled. To build with "
            "the new settings, give another --house (or delete this one)."]


def _require_feasible(found, console=None):
    """The search results whose budget a student meets.

    A budget no student meets is an input error when it is the only kind there is; beside met
    budgets it is a warning (the report lists it under ``unmet_budgets``) and the run goes on.
    The message says how fast the fastest student is."""
    from bespoke.errors import UsageError

    bad = [r for r in found.results if not r.feasible]
    met = [r for r in found.results if r.feasible]
    if not bad:
        return met
    fastest = min([r.fastest_ms for r in bad if r.fastest_ms is not None] or [p.latency_ms for p in found.front]
                  or [found.teacher_ms])
    lines = [f"budget {r.budget:g} ({r.budget_ms:.2f} ms) is below what any student can reach"
             for r in bad]
    message = ("; ".join(lines) + f". The fastest student this model house allows runs in "
               f"{fastest:.2f} ms ({fastest / found.teacher_ms:.2f} of the teacher's "
               f"{found.teacher_ms:.2f} ms). Give a budget of at least "
               f"{fastest / found.teacher_ms:.2f} (or {fastest:.2f} ms), or build more and "
               "cheaper alternatives (more segments, the skip and pruned-self sources). "
               "The house and latency table are kept, so the rerun starts at the search.")
    if not met:
        raise UsageError(message)
    if console is not None:
        console.print(f"[yellow]warning: {message} Going on with the other "
                      f"{len(met)} budget(s).[/yellow]", highlight=False)
    return met


PICK_CACHE_BYTES = 2 << 30  # decoded pick images kept in memory, over all input sizes


class DecodedBatches:
    """Decoded image batches per key (an input size), kept while their total stays under
    ``limit`` bytes. Past it, a key's batches are decoded again on every pass (the returned
    iterable calls ``make`` anew each time), so a large ``search.pick_train_images`` costs time,
    not memory."""

    def __init__(self, limit: int = PICK_CACHE_BYTES):
        self.limit, self.kept, self.bytes = limit, {}, 0

    def get(self, key, make, nbytes):
        """``make()`` yields the batches; ``nbytes`` is what keeping them would take."""
        if key in self.kept:
            return self.kept[key]
        if self.bytes + nbytes <= self.limit:
            batches = list(make())
            self.kept[key] = batches
            self.bytes += sum(b.numel() * b.element_size() for b in batches)
            return batches
        return _Replay(make)


class _Replay:
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


class _Made:
    """One fine-tuned student and what is known about it."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Students:
    """The student stage for one house: teacher, data, block sources; assemble, fine-tune,
    evaluate, measure, export."""

    def __init__(self, cfg, registry, house, console):
        from bespoke import data as images
        from bespoke.blocks import Context
        from bespoke.distill import block_sources
        from bespoke.evaluate import evaluate
        from bespoke.models import load_model
        from bespoke.partition import Partition

        t = house.manifest.teacher
        self.cfg, self.registry, self.house, self.console = cfg, registry, house, console
        self.size = t.input_size
        self.shape = (1, 3, self.size, self.size)
        self.teacher = load_model(t.name, weights=t.weights or "auto").eval()
        self.partition = Partition.from_model(self.teacher, self.shape, name=t.name)
        self.ctx = Context(self.partition, t.name, (3, self.size, self.size), calibration=None, seed=cfg.seed)
        self.sources = block_sources(cfg, registry)
        self.split = images.prepare(self.teacher, self.size, data=cfg.data, val_data=cfg.val_data,
                                    class_list=cfg.class_list, held_out=cfg.build.validation_images,
                                    seed=cfg.seed)
        self.train = images.eval_view(self.split, self.teacher, self.size)  # flips are added per step
        self.loss = registry.instantiate(cfg.plugins.distill_loss, cfg.plugin_options.get(cfg.plugins.distill_loss),
                                         category="distill-loss")
        self.teacher_metrics, self.teacher_pred = evaluate(self.teacher, t.name, self.split.val, self.shape)
        self._at = {}
        self._pick_cache, self._pick_teacher, self._last_finalist = DecodedBatches(), None, (None, None)  # the final pick's

    def at(self, size=None):
        """The teacher's partition, block-source context and held-out images at input ``size``
        (default: the teacher's own), made once per size."""
        from bespoke import data as images
        from bespoke.blocks import Context

        size = int(size or self.size)
        if size == self.size:
            return _Made(size=size, shape=self.shape, partition=self.partition, ctx=self.ctx, val=self.split.val)
        if size not in self._at:
            partition = self.partition.resized(size)
            ctx = Context(partition, self.house.manifest.teacher.name, (3, size, size), calibration=None,
                          seed=self.cfg.seed)
            val = self.split.val.with_transform(images.transforms_for(self.teacher, size))
            self._at[size] = _Made(size=size, shape=(1, 3, size, size), partition=partition, ctx=ctx, val=val)
        return self._at[size]

    def assemble(self, choices, size=None):
        from bespoke.distill import source_for
        from bespoke.student import StudentChoice, StudentRecipe, assemble

        view = self.at(size)
        picked, recipe_choices = [], []
        for c in choices:
            rec = self.house.alternative(c["alternative"])
            seg = view.partition.segment(int(c["start"]), int(c["end"]))
            module = self.house.load_alternative(rec.id, view.ctx, source_for(rec.source, self.sources, self.cfg, self.registry))
            picked.append((seg, module))
            recipe_choices.append(StudentChoice(segment=seg, spec=rec.spec, alternative_id=rec.id))
        t = self.house.manifest.teacher
        recipe = StudentRecipe(teacher=t.name, teacher_weights=t.weights, input_size=(3, view.size, view.size),
                               choices=recipe_choices)
        return assemble(view.partition, picked), recipe

    def fidelity(self, candidates, size=None):
        """How well the student these search candidates assemble into, before fine-tuning, agrees
        with the teacher on the held-out images: top-1 agreement, ties broken by lower KL. A
        student at another input ``size`` sees the images at that size; the teacher, at its own.
        The latency ratio is to the teacher at its own size."""
        import torch
        import torch.nn.functional as F

        from bespoke.finetune import iter_batches
        from bespoke.search import RealScore

        view = self.at(size)
        student, _ = self.assemble(_plain(candidates), view.size)
        student.to(self.cfg.device).eval()
        agree, kl, n = 0.0, 0.0, 0
        with torch.no_grad(), student.taps(False):
            if getattr(self, "_val_logits", None) is None:  # the teacher's, once
                self.teacher.to(self.cfg.device)
                self._val_logits = [self.teacher(x.to(self.cfg.device)) for x, _ in iter_batches(self.split.val, 32)]
            for (x, _), t in zip(iter_batches(view.val, 32), self._val_logits):
                x = x.to(self.cfg.device)
                s = student(x)
                agree += float((s.argmax(-1) == t.argmax(-1)).sum())
                kl += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                     reduction="sum"))
                n += x.shape[0]
        n = max(n, 1)
        ratio = self._pair_ratio(student, view) if self.cfg.search.rerank_latency else None
        return RealScore(fidelity=agree / n - (kl / n) / 1000.0, latency_ratio=ratio)

    def _pair_ratio(self, student, view):
        """The student's latency ratio to the teacher at its own size, timed in one interleaved
        call beside it (the median of per-round ratios: drift between rounds cancels)."""
        from bespoke.evaluate import measure_ratios

        estimator, fallback = self._estimators()
        with student.taps(False):
            _, ratios = measure_ratios({"teacher": self.teacher, "candidate": student},
                                       {"teacher": self.shape, "candidate": view.shape}, estimator, fallback)
        return ratios.get("candidate")

    def _finalist(self, choices, size):
        """The student of ``choices`` at input ``size``, assembled once: the final pick times and
        scores the same finalist in turn, so the last one assembled is kept."""
        plain = _plain(choices)
        key = (self.at(size).size, tuple(tuple(c.values()) for c in plain))
        if self._last_finalist[0] != key:
            student, _ = self.assemble(plain, key[0])
            self._last_finalist = (key, student.to(self.cfg.device).eval())
        return self._last_finalist[1]

    def ratio_of(self, choices, size=None):
        """Time the student of ``choices`` at input ``size`` beside the teacher (its ratio)."""
        return self._pair_ratio(self._finalist(choices, size), self.at(size))

    def pick_fidelity(self, choices, size=None):
        """Top-1 agreement with the teacher of the student of ``choices`` (at input ``size``) on
        the held-out images plus ``search.pick_train_images`` training images (a fixed subset at
        the eval transforms), for the final pick of a budget over input sizes. The images are
        decoded once per size and kept, up to :data:`PICK_CACHE_BYTES` over all sizes."""
        import torch

        view = self.at(size)
        student = self._finalist(choices, size)
        targets = torch.cat([t.argmax(-1) for t in self._teacher_on_pick_images()])
        agree, n = 0, 0
        with torch.no_grad(), student.taps(False):
            for x in self._pick_images(view.size):
                s = student(x.to(self.cfg.device)).argmax(-1).cpu()
                agree += int((s == targets[n:n + len(s)]).sum())
                n += len(s)
        return agree / max(n, 1)

    def _pick_images(self, size):
        """Batches of the held-out images and the pick's training subset at input ``size``."""
        from bespoke import data as images
        from bespoke.finetune import iter_batches

        n = min(self.cfg.search.pick_train_images, len(self.split.train))

        def make():
            import torch

            order = torch.randperm(len(self.split.train), generator=torch.Generator().manual_seed(self.cfg.seed + 1))
            transform = images.transforms_for(self.teacher, size)
            train = self.split.train.subset(sorted(order[:n].tolist())).with_transform(transform)
            val = self.split.val.with_transform(transform)
            return (x for part in (val, train) if len(part) for x, _ in iter_batches(part, 32))

        return self._pick_cache.get(size, make, (len(self.split.val) + n) * 3 * size * size * 4)  # float32

    def _teacher_on_pick_images(self):
        import torch

        if self._pick_teacher is None:
            self.teacher.to(self.cfg.device).eval()
            with torch.no_grad():
                self._pick_teacher = [self.teacher(x.to(self.cfg.device)).cpu() for x in self._pick_images(self.size)]
        return self._pick_teacher

    def size_ratios(self, sizes):
        """How long the teacher takes at each input size in ``sizes`` relative to its own size,
        each size timed in its own interleaved call beside the teacher at its own size (medians of
        per-round ratios), the way re-ranking times a candidate."""
        from bespoke.evaluate import measure_ratios

        estimator, fallback = self._estimators()
        models = {"teacher": self.teacher, **{f"{s}px": self.teacher for s in sizes}}
        shapes = {"teacher": self.shape, **{f"{s}px": (1, 3, s, s) for s in sizes}}
        _, ratios = measure_ratios(models, shapes, estimator, fallback, pairwise=True)
        out = {}
        for s in sizes:
            if not ratios.get(f"{s}px"):
                from bespoke.errors import UsageError

                raise UsageError(f"the latency estimator {self.cfg.plugins.latency!r} cannot measure the teacher at "
                                 f"{s} px; search.input_sizes needs one that measures whole models")
            out[s] = ratios[f"{s}px"]
        return out

    def _estimators(self):
        """The configured latency estimator, and a measuring one to fall back on when it is a
        table (a table holds segments, not whole new models). Made once per stage."""
        if getattr(self, "_made_estimators", None) is not None:
            return self._made_estimators
        name = self.cfg.plugins.latency
        options = dict(self.cfg.plugin_options.get(name) or {})
        record = self.registry.get(name, "latency")  # the thread count `profile` measured the LUT with
        if self.cfg.threads and "threads" in (getattr(record.options_model, "model_fields", None) or {}):
            options.setdefault("threads", self.cfg.threads)
        estimator = self.registry.instantiate(name, options, category="latency")
        fallback = None
        if getattr(estimator, "table", None) is not None and "measured-latency" in self.registry.records:
            fallback = self.registry.instantiate("measured-latency", self.cfg.plugin_options.get("measured-latency"),
                                                 category="latency")
        self._made_estimators = (estimator, fallback)
        return self._made_estimators

    def make(self, plan, workdir):
        """Assemble, evaluate, fine-tune (resumable), evaluate again, save ``workdir/student``."""
        from bespoke.evaluate import evaluate
        from bespoke.finetune import finetune_student
        from bespoke.student import save_student

        choices = plan.get("choices", [])
        view = self.at(plan.get("input_size"))
        student, recipe = self.assemble(choices, view.size)
        name = f"student-{plan.get('budget', 0):g}"
        px = f" at {view.size} px" if view.size != self.size else ""
        self.console.print(f"[bold]{name}[/bold]{px}: {len(choices)} segment(s) replaced: "
                           + (", ".join(c["alternative"] for c in choices) or "none"), highlight=False)
        before, _ = evaluate(student, name, view.val, view.shape, teacher=self.teacher_pred)
        result = finetune_student(
            student, self.partition, self.train, self.cfg.finetune, workdir, targets=None,
            distill_loss=self.loss, seed=self.cfg.seed, device=self.cfg.device,
            fingerprint_extra=[self.house.manifest.teacher.model_dump(), [c["alternative"] for c in choices]],
            console=self.console, input_size=view.size if view.size != self.size else None)
        after, _ = evaluate(result.student, name, view.val, view.shape, teacher=self.teacher_pred)
        kept = not (self.cfg.finetune.keep_best and len(view.val) and after.agreement < before.agreement)
        if kept:
            student = result.student
        else:  # fine-tuning on these images made it agree less with the teacher: the assembled one
            self.console.print(f"  {name}: fine-tuning lowered the held-out agreement with the teacher "
                               f"({_pct(before.agreement)} -> {_pct(after.agreement)}); keeping the assembled "
                               "student (finetune.keep_best)", highlight=False)
            student, recipe = self.assemble(choices, view.size)  # afresh: nothing trained touches it
            after = before
        student_dir = save_student(student, recipe, workdir / "student")
        return _Made(name=name, plan=plan, student=student, recipe=recipe, before=before, after=after,
                     finetune=result, student_dir=student_dir, workdir=workdir, size=view.size, shape=view.shape,
                     finetune_kept=kept)

    def measure(self, made):
        """End-to-end latency of the teacher, every student and every reference model with the
        selected estimator (a measuring one when it is a table), each timed in its own interleaved
        call beside the teacher (``measure_ratios(pairwise=True)``), the way re-ranking timed the
        candidates: how many models one call holds moves the ratios."""
        from bespoke.evaluate import evaluate, measure_ratios
        from bespoke.models import load_model

        self.references = []
        models, shapes = {"teacher": self.teacher}, {"teacher": self.shape}
        for ref in self.cfg.reference_models:
            model = load_model(ref, weights="auto").eval()
            metrics, _ = evaluate(model, ref, self.split.val, self.shape, teacher=self.teacher_pred)
            self.references.append(metrics)
            models[f"ref:{ref}"], shapes[f"ref:{ref}"] = model, self.shape
        for m in made:
            m.student.taps_enabled = False
            models[m.name], shapes[m.name] = m.student, m.shape
        estimator, fallback = self._estimators()
        self.latency_device = (fallback or estimator).device()
        ms, _ = measure_ratios(models, shapes, estimator, fallback, pairwise=True)
        for m in made:
            m.student.taps_enabled = True
        self.teacher_metrics.latency_ms = ms["teacher"]
        for r in self.references:
            r.latency_ms = ms[f"ref:{r.name}"]
        for m in made:
            m.after.latency_ms = ms[m.name]
        return ms

    def export(self, m):
        from bespoke.export import export_model

        with m.student.taps(False):
            res = export_model(m.student, m.shape, m.workdir, ("onnx", "torch-export"), seed=self.cfg.seed,
                               dynamic_batch=self.cfg.export.dynamic_batch)
        res.student_dir = str(m.student_dir)
        self.console.print(f"{m.name}: exported {res.onnx} (onnxruntime vs PyTorch max |diff| "
                           f"{res.onnx_max_abs_diff:.1e}), {res.torch_export}, {res.student_dir}")
        return res


def _report(cfg, stage, found, made, measured, exports, clock):
    """report.json, pareto.png and the summary table."""
    import datetime
    from pathlib import Path

    from bespoke import __version__
    from bespoke.report import (ModelEntry, Report, StudentEntry, pareto_plot, summary_table,
                                write_report)

    def entry(m):
        return ModelEntry(name=m.name, params=m.params, flops=m.flops, latency_ms=m.latency_ms,
                          top1=m.top1, top5=m.top5, agreement=m.agreement)

    teacher = entry(stage.teacher_metrics)
    students = []
    for m, res in zip(made, exports):
        r, a = m.plan, m.after
        alts = {rec.id: rec for rec in stage.house.manifest.alternatives}
        students.append(StudentEntry(
            budget=r["budget"], budget_ms=r["budget_ms"], name=m.name, params=a.params, flops=a.flops,
            latency_ms_predicted=r["latency_ms"], latency_ms_measured=a.latency_ms,
            speedup=(teacher.latency_ms / a.latency_ms) if teacher.latency_ms and a.latency_ms else None,
            top1=a.top1, top5=a.top5, agreement=a.agreement, top1_before_finetune=m.before.top1,
            agreement_before_finetune=m.before.agreement, feasible=r["feasible"],
            replaced=[{"segment": c["segment"], "alternative": c["alternative"],
                       "source": alts[c["alternative"]].source if c["alternative"] in alts else None,
                       "label": alts[c["alternative"]].spec.label if c["alternative"] in alts else None}
                      for c in r["choices"]],
            onnx=res.onnx, onnx_max_abs_diff=res.onnx_max_abs_diff, onnx_batch=res.onnx_batch,
            torch_export=res.torch_export,
            student_dir=res.student_dir, finetune_steps=m.finetune.steps, finetune_kept=m.finetune_kept,
            input_size=m.size if m.size != stage.size else None))
    skipped = sorted(set(stage.split.skipped) | set(stage.house.manifest.data.get("skipped", [])))
    pred = [s.latency_ms_predicted for s in students if s.latency_ms_measured]
    meas = [s.latency_ms_measured for s in students if s.latency_ms_measured]
    errors = [abs(p - q) / q for p, q in zip(pred, meas)]
    report = Report(
        bespoke_version=__version__, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        teacher=teacher, students=students, references=[entry(r) for r in stage.references],
        timings_s=clock.total(),
        data={"source": stage.split.source, "labelled": stage.split.labelled,
              "train_images": len(stage.split.train), "val_images": len(stage.split.val),
              "input_size": stage.size, "skipped_images": len(skipped), "skipped": skipped[:100]},
        latency={"estimator": cfg.plugins.latency, "device": stage.latency_device.model_dump(),
                 "search_teacher_ms": found.teacher_ms,
                 "prediction_abs_rel_error": errors, "search_strategy": found.strategy},
        unmet_budgets=[{"budget": r.budget, "budget_ms": r.budget_ms, "fastest_ms": r.fastest_ms}
                       for r in found.results if not r.feasible],
        config=cfg.model_dump(mode="json"))
    out = Path(cfg.out)
    path = write_report(report, out)
    plot = pareto_plot(report, out)
    report.timings_s = clock.total()
    write_report(report, out)
    stage.console.print(summary_table(report))
    if skipped:
        stage.console.print(f"[yellow]{len(skipped)} image(s) failed to decode and were skipped[/yellow]")
    stage.console.print(f"wrote {path}" + (f" and {plot}" if plot else "")
                        + f" in {report.timings_s['total']:.0f} s", highlight=False)
    return report
