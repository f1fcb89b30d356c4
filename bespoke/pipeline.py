"""The orchestrator: the pipeline, top to bottom. Knows no particular donor, loss, device or search.

Each command is one function here; each stage's work lives in its own module of
:mod:`bespoke.stages` (build, profile, search, pick, students, report), which calls the engine
modules. Plugins come only from the facade ``registry`` (:class:`bespoke.plugins.Registry`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from bespoke.console import make_console

from bespoke import data as images
from bespoke import search as S
from bespoke.blocks import Context
from bespoke.config import whole_sources
from bespoke.distill import DistEnv, Settings, calibration_batch, distill_house, source_for
from bespoke.errors import UsageError
from bespoke.export import check_formats, export_model
from bespoke.files import claim_folder, tidy_on_failure
from bespoke.house import House, populate
from bespoke.stages import build as build_stage
from bespoke.stages import pct, pick, warner
from bespoke.stages import profile as profile_stage
from bespoke.stages import zoo
from bespoke.stages import search as search_stage
from bespoke.stages.report import Clock, write_run_report
from bespoke.stages.students import Students, read_search_recipe
from bespoke.student import load_student, save_student


@tidy_on_failure()  # a failed command removes the folders it made while they are empty
def build(cfg, registry, console=None, within_run=False):
    """Build (or resume) the model house: partition the teacher, sample segments, create every
    enabled block source's alternatives, distil them, profile them. Returns the :class:`House`.

    Rerunning on an existing house resumes (trained alternatives are kept, pending ones trained).
    Under ``torchrun`` rank 0 creates the alternatives and every rank trains its share.
    The configuration is resolved first (its preset and the few-image recipe,
    :func:`bespoke.stages.build.resolve_config`, as :func:`run` resolves it), the images' roles
    are checked and images that failed to decode are named at the end, unless ``within_run``
    (:func:`run` does all three itself).
    """
    console = console or make_console()
    if not within_run:  # the same house from the same configuration as `bespoke run` builds
        cfg = build_stage.resolve_config(cfg, registry, console)
    warn = warner(console)
    registry.preflight(cfg, ("block-source", "distill-loss"))  # a bad option fails here, in seconds
    dist = DistEnv.from_env(cfg.device)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        root = claim_folder(build_stage.house_dir(cfg))
        existing = House.open(root) if House.exists(root) else None  # a bad manifest fails early
        settings = Settings.from_build(cfg.build, seed=cfg.seed, device=cfg.device)

        if not within_run:  # distillation, selection and scoring images share none (in seconds)
            build_stage.check_roles(cfg, console if dist.main else None)

        # 1. The teacher, frozen, partitioned at its input size.
        teacher, partition, size, weights = build_stage.load_teacher(cfg)

        # 2. Images: training, held-out, and a calibration batch for the block sources (with few
        # images, topped up with augmented views of them).
        split = build_stage.prepare_images(cfg, teacher, size, console, dist.main)
        calibration = calibration_batch(images.eval_view(split, teacher, size), cfg.build.calibration_images,
                                        views=split.train, seed=cfg.seed)
        ctx = Context(partition, cfg.teacher, (3, size, size), calibration=calibration,
                      seed=cfg.seed, device=cfg.device)
        sources = registry.block_sources(cfg, warn=warn)

        # 3. The house: created, or resumed; rank 0 samples segments and creates alternatives.
        if dist.main:
            house = build_stage.open_house(cfg, root, existing, teacher, partition, split, size, weights, console)
            segments = build_stage.draw_segments(cfg, partition, house)
            populate(house, partition, ctx, sources, segments, seed=cfg.seed, warn=warn,
                     whole_sources=whole_sources(cfg), offered=build_stage.offered_sources(cfg, partition))
            build_stage.note_teacher_top1(house, partition, split, settings)
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

        loss_fn = registry.distill_loss(cfg.plugins.distill_loss, cfg.plugin_options.get(cfg.plugins.distill_loss))
        report = distill_house(house, partition, make_module, split.train, split.val, loss_fn, settings,
                               bunch_size=cfg.build.bunch_size, dist=dist, console=console)
        dist.barrier()

        # 5. One house: rank 0 merges the ranks' results and reports.
        if dist.main:
            if dist.world > 1:
                house = House.open(root)
                house.merge_shards()
            build_stage.summarise(house, root, split, report, console, say_skipped=not within_run)
        dist.barrier()
        return house
    finally:
        dist.close()


@tidy_on_failure()
def profile(cfg, registry, output, console=None, size=None):
    """Measure every alternative and teacher segment of the house (and the whole teacher) with
    the configured measuring estimator, at input resolution ``size`` (default: the teacher's
    own); write a latency lookup table to ``output``.

    This is how a vendor builds the table their device plugin ships. Returns the table.
    """
    cfg = build_stage.resolve_config(cfg, registry, images=False)  # the preset's estimator options
    claim_folder(Path(output).parent)
    return profile_stage.measure(cfg, registry, Path(output), console or make_console(), size=size)


@tidy_on_failure()
def search(cfg, registry, output, storage=None, study=None, console=None, evaluate=None, size=None,
           size_ratio=None, tighten=None):
    """Search which segments to replace under each of ``cfg.budgets``; write the report (recipes
    per budget and the Pareto front) to ``output`` and show a table. Returns the report.

    ``cfg.house`` is a model house directory (latencies from the selected latency estimator, loss
    proxy ``cfg.search.proxy`` from the house's profiles) or a search-problem JSON file
    (``bespoke.search.problem_to_dict``). ``storage``/``study`` go to strategies that take them
    (``optuna``; others warn). ``evaluate(candidates) -> RealScore`` (a list of the chosen
    :class:`bespoke.types.Candidate` records), when given, re-ranks the best
    ``cfg.search.rerank_top_k`` candidates per budget by real scores. ``size`` searches students
    that run at that input resolution (latencies of the house rebuilt at that size); budgets stay
    ratios of the teacher at its own size, which runs ``1 / size_ratio`` times as long as at
    ``size`` (measured side by side), and ``evaluate``'s latency ratios are to it. ``tighten``
    (> 1): the strategy searches at the budgets divided by it and re-ranking holds its candidates
    to the budgets as given (a fallback's second look, :meth:`bespoke.stages.students.Students.hold_budgets`).
    """
    console = console or make_console()
    cfg = build_stage.resolve_config(cfg, registry, images=False)  # the preset's proxy, trials, budgets
    output = Path(output)
    claim_folder(output.parent)
    if not cfg.house:
        raise UsageError("give the model house directory (bespoke search HOUSE) or set `house` in the config")
    problem, teacher = search_stage.search_problem(cfg, registry, console, size)
    reference_ms = problem.teacher_ms / size_ratio if size_ratio else problem.teacher_ms  # what ratios are of
    budgets_ms = S.resolve_budgets(cfg.budgets, reference_ms)
    name = cfg.plugins.search
    strategy = registry.search_strategy(name, cfg.plugin_options.get(name), storage=storage, study=study,
                                        warn=warner(console))
    solutions = S.run_strategy(strategy, problem, [b / (tighten or 1) for b in budgets_ms], seed=cfg.seed,
                               workdir=str(output.resolve().parent), name=name)
    if tighten:  # searched at tighter budgets, re-ranked against the budgets as given
        for s, b in zip(solutions, budgets_ms):
            s.budget_ms = b
    if evaluate is not None:
        def search_again(budget_ms):  # the same strategy at another budget (re-ranking's second look)
            return S.run_strategy(strategy, problem, [budget_ms], seed=cfg.seed,
                                  workdir=str(output.resolve().parent), name=name)[0]

        solutions = search_stage.rerank(cfg, problem, solutions, evaluate, reference_ms, console, strategy=name,
                                        search_again=search_again)
    return search_stage.write_report(cfg, problem, solutions, output, console, strategy=name, teacher=teacher,
                                     size=size, reference_ms=reference_ms)


@tidy_on_failure()
def finetune(cfg, registry, recipe, out, console=None):
    """Assemble the student a search recipe describes (``bespoke search`` writes one per budget),
    recalibrate its BatchNorm, fine-tune it with distillation, and save it to ``OUT/student``.

    Resumable: rerunning the same command after a kill continues from the last checkpoint in
    ``OUT/checkpoint``. Returns the saved student's directory.
    """
    console = console or make_console()
    cfg = build_stage.resolve_config(cfg, registry, console)
    plan = read_search_recipe(Path(recipe))
    root = Path(cfg.house or plan.get("house") or "")
    if not House.exists(root) and House.exists(Path(recipe).parent / "house"):
        root = Path(recipe).parent / "house"  # `bespoke run` keeps OUT/house beside the recipes
    if not House.exists(root):
        raise UsageError(f"recipe {str(recipe)!r} points at model house {str(root)!r}, which does not exist; "
                         "set `house` in the config (--config) to where the house is")
    stage = Students(cfg, registry, House.open(root), console)
    made = stage.make(plan, claim_folder(out))
    console.print(f"student saved to {made.student_dir} ({made.finetune.steps} fine-tuning steps; "
                  f"agreement with the teacher {pct(made.before.agreement)} -> {pct(made.after.agreement)} "
                  f"on {made.after.images} held-out images)")
    return made.student_dir


@tidy_on_failure()
def export(student, out, formats, console=None, dynamic_batch=False):
    """Export a saved student directory to ``out`` in ``formats`` (onnx, torch-export,
    safetensors); the ONNX file is checked against PyTorch with onnxruntime and the saved
    safetensors form is reloaded and compared. ``dynamic_batch``: a symbolic batch axis in the
    ONNX file and the program (:mod:`bespoke.export`). Returns the
    :class:`bespoke.export.ExportResult`."""
    console = console or make_console()
    formats = check_formats(formats)
    model = load_student(Path(student))
    claim_folder(out)
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


@tidy_on_failure()
def run(cfg, registry, console=None):
    """Everything, for each budget: build (or reuse) the house, profile, search, fine-tune,
    evaluate, export, score, report. Writes ``OUT/report.json`` and ``OUT/pareto.png``; returns
    the :class:`bespoke.report.Report`.

    The images play three roles that share no image, checked first: distillation (``data``),
    selection (``val_data``, or held out from ``data``) and scoring (``score_data``, optional):
    the teacher and the saved students are scored on the scoring images once, at the end, and
    nothing that chooses reads them.

    Every stage resumes: the house, the latency table, the search study and each student's
    fine-tuning checkpoint are kept in ``OUT``, so rerunning after a kill picks up where it was.
    """
    console = console or make_console()
    cfg = build_stage.resolve_config(cfg, registry, console)  # the preset, the few-image recipe
    registry.preflight(cfg)  # every plugin option and file it names, before anything is built or written
    out = claim_folder(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"house": cfg.house or str(out / "house")})
    clock = Clock()

    with clock("data"):  # the three roles share no image, checked before anything is built
        roles, role_sets = build_stage.check_roles(cfg, console)
    with clock("build"):
        house = build(cfg, registry, console=console, within_run=True)
    sizes = [s for s in cfg.search.input_sizes if s != house.manifest.teacher.input_size]
    with clock("profile"):
        search_cfg = profile_stage.for_search(cfg, registry, out / "latency.json", console, measure=profile)
        sized_cfgs = {s: profile_stage.for_search(cfg, registry, out / f"latency-{s}px.json", console, size=s,
                                                  measure=profile)
                      for s in sizes}
    stage = Students(cfg, registry, house, console)
    if any(isinstance(b, str) for b in cfg.budgets):  # "as fast as this donor": timed on the device, now
        with clock("profile"):
            budgets = zoo.named_budgets(cfg, stage, console)
        cfg, search_cfg = (c.model_copy(update={"budgets": budgets}) for c in (cfg, search_cfg))
        sized_cfgs = {s: c.model_copy(update={"budgets": budgets}) for s, c in sized_cfgs.items()}
        stage.cfg = cfg
    rerank = cfg.search.rerank and len(stage.split.val) > 0
    if sizes and not rerank:
        raise UsageError("search.input_sizes compares students at different input sizes by their agreement with "
                         "the teacher on held-out images, and this run has none: give val_data, or raise "
                         "build.validation_images")
    def search_again(c, o, **kw):  # the search of this run, for other sizes and second looks
        return search(c, registry, o, console=console, **kw)

    with clock("search"):
        found = search(search_cfg, registry, out / ("search.json" if not sizes else f"search-{stage.size}px.json"),
                       console=console, evaluate=stage.fidelity if rerank else None)
        if sizes:
            found = pick.search_sizes(cfg, stage, found, sized_cfgs, out, console, search=search_again)
        if (said := stage.scores.summary()) is not None:
            console.print(said, highlight=False)
        if cfg.search.zoo and rerank:  # the donors and the teacher at each size, as they are, compete
            found = zoo.pick(cfg, stage, found, sizes, console)
            S.write_report(found, out / "search.json")
        stage.release_pick_images()
    met = search_stage.require_feasible(found, console)
    with clock("finetune"):  # each budget's answer, and its best mixed student when that is not the answer
        students = [stage.make(r.model_dump(), out / "students" / f"budget-{r.budget:g}") for r in met]
        students += [stage.make(plan, out / "students" / f"budget-{r.budget:g}" / "mixed")
                     for r in met if (plan := zoo.mixed_plan(r)) is not None]
    with clock("evaluate"):
        measured = stage.measure(students)  # as saved: what ships is what is timed
        students = stage.hold_budgets(students, search=search_again,
                                      configs={stage.size: search_cfg, **sized_cfgs})  # a fallback's second look
        measured.update({m.name: m.after.latency_ms for m in students})
        # what the table at the teacher's size predicted (a fallback's prediction is not recorded)
        at_own_size = [m for m in students if m.size == stage.size and m.plan.get("latency_ms") is not None
                       and not (m.plan.get("meta") or {}).get("zoo")]
        if at_own_size:
            profile_stage.calibrate_lut(search_cfg, stage, at_own_size, measured, out / "latency.json", console)
    with clock("export"):
        exports = [stage.export(s) for s in students]
    scores = None
    if "scoring" in role_sets:  # touched once, now, after every choice is made and saved
        with clock("score"):
            scores = stage.score(students, role_sets["scoring"])
    with clock("report"):
        report = write_run_report(cfg, stage, found, students, measured, exports, clock, roles=roles,
                                  scores=scores, skipped=[n for s in role_sets.values() for n in s.skipped])
    return report
