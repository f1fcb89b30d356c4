"""The student stage for one model house: assemble a search recipe's student, score candidates
for re-ranking and the final pick, fine-tune, evaluate, time against the teacher, export.

:class:`Students` holds what every student of a house shares (the teacher, its partition at each
input size, the images, the block sources, the distillation loss, the latency estimators), made
once per run.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bespoke import data as images
from bespoke.blocks import Context
from bespoke.distill import source_for
from bespoke.errors import UsageError
from bespoke.evaluate import evaluate, measure_ratios, over_budget
from bespoke.export import export_model
from bespoke.files import atomic_write_text
from bespoke.finetune import FinetuneResult, finetune_student, iter_batches
from bespoke.models import default_input_size, load_model
from bespoke.partition import Partition
from bespoke.search import RealScore
from bespoke.stages import pct, plain, warner
from bespoke.stages.pick import DecodedBatches, Normalized, ScoreMemo, finalists, ratio_at_pick, split_normalize, to_pixels
from bespoke.student import StudentChoice, StudentRecipe, assemble, deployed, load_student, save_student


def read_search_recipe(path: Path) -> dict[str, Any]:
    """A per-budget recipe written by ``bespoke search`` (or one result of a search report)."""
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


class Made:
    """One fine-tuned student and what is known about it."""

    def __init__(self, **kw):
        # what time_students finds out, once it has timed the saved student
        self.__dict__.update({"latency_ratio": None, "latency_interval": None, "ratio_at_pick": None,
                              "budget_ratio": None, "over_budget": False}, **kw)


def budget_ratio(plan: dict[str, Any], teacher_ms: float | None) -> float | None:
    """A plan's budget as a ratio of the teacher at its own size: the budget itself when given as
    a ratio (<= 1), else its milliseconds over the teacher's as just measured."""
    budget = plan.get("budget")
    if budget is None:
        return None
    if budget <= 1:
        return float(budget)
    return float(plan["budget_ms"]) / teacher_ms if teacher_ms else None


def _zoo_of(plan: dict[str, Any]) -> dict[str, Any] | None:
    """The zoo entry a plan makes (a donor, or the teacher at a size, as it is), or None for a
    mixed student: ``plan["zoo"]`` when set (a fallback), else the pick's ``meta.zoo``."""
    return plan["zoo"] if "zoo" in plan else (plan.get("meta") or {}).get("zoo")


class Students:
    """The student stage for one house: teacher, data, block sources; assemble, fine-tune,
    evaluate, measure, export."""

    def __init__(self, cfg, registry, house, console):
        t = house.manifest.teacher
        self.cfg, self.registry, self.house, self.console = cfg, registry, house, console
        self.size = t.input_size
        self.shape = (1, 3, self.size, self.size)
        self.teacher = load_model(t.name, weights=t.weights or "auto").eval()
        self.partition = Partition.from_model(self.teacher, self.shape, name=t.name)
        # what every latency ratio is of: the teacher as a student with nothing replaced (flat graph,
        # in place), so that a ratio counts what the replacements save, not how the graph is run
        self._deployed = {self.size: deployed(self.partition)}
        self.ctx = Context(self.partition, t.name, (3, self.size, self.size), calibration=None, seed=cfg.seed)
        self.sources = registry.block_sources(cfg)
        self.split = images.prepare(self.teacher, self.size, data=cfg.data, val_data=cfg.val_data,
                                    class_list=cfg.class_list, held_out=cfg.build.validation_images,
                                    seed=cfg.seed, val_views=cfg.build.validation_views,
                                    balance=cfg.data_balance)
        self.train = images.eval_view(self.split, self.teacher, self.size)  # flips are added per step
        self.loss = registry.distill_loss(cfg.plugins.distill_loss, cfg.plugin_options.get(cfg.plugins.distill_loss))
        self.teacher_metrics, self.teacher_pred = evaluate(self.teacher, t.name, self.split.val, self.shape)
        self._at = {}
        self._size_ratios = {}  # the teacher at other sizes over itself at its own, as the pick timed it
        self._pick_cache, self._pick_teacher, self._last_finalist = DecodedBatches(), None, (None, None)  # the final pick's
        self._pick_preds = weakref.WeakKeyDictionary()  # the pick's predictions per module (release_pick_images)
        self.scores = ScoreMemo()  # re-ranking's real scores, by size and choices
        self._zoo = {}  # the donors as they are, by name (donor_as_is)
        self.budget_models = {}  # budget ratio -> the model whose latency set it (zoo.named_budgets)

    def at(self, size=None):
        """The teacher's partition, block-source context and held-out images at input ``size``
        (default: the teacher's own), made once per size."""
        size = int(size or self.size)
        if size == self.size:
            return Made(size=size, shape=self.shape, partition=self.partition, ctx=self.ctx, val=self.split.val)
        if size not in self._at:
            partition = self.partition.resized(size)
            ctx = Context(partition, self.house.manifest.teacher.name, (3, size, size), calibration=None,
                          seed=self.cfg.seed)
            val = self.split.val.with_transform(images.transforms_for(self.teacher, size))
            self._at[size] = Made(size=size, shape=(1, 3, size, size), partition=partition, ctx=ctx, val=val)
        return self._at[size]

    def deployed(self, size=None):
        """The teacher at input ``size`` as students ship (:func:`bespoke.student.deployed`), the
        reference every latency ratio is timed against; made once per size."""
        view = self.at(size)
        if view.size not in self._deployed:
            self._deployed[view.size] = deployed(view.partition)
        return self._deployed[view.size].to(self.cfg.device)

    def assemble(self, choices, size=None):
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
                               num_classes=t.num_classes, choices=recipe_choices)
        return assemble(view.partition, picked), recipe

    def fidelity(self, candidates, size=None):
        """How well the student these search candidates assemble into, before fine-tuning, agrees
        with the teacher on the held-out images: top-1 agreement, ties broken by lower KL. A
        student at another input ``size`` sees the images at that size; the teacher, at its own.
        The latency ratio is to the teacher at its own size. Scored and timed once a run (ScoreMemo)."""
        view, chosen = self.at(size), plain(candidates)
        return self.scores.get(view.size, chosen, lambda: self.fidelity_of(self.assemble(chosen, view.size)[0], view),
                                lambda: self._pair_ratio(self.assemble(chosen, view.size)[0], view))

    def fidelity_of(self, student, view):
        """:meth:`fidelity` of any module ``student`` fed ``view.val`` (the held-out images under
        its own preprocessing): agreement minus KL / 1000, and a lazy timer."""
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
                kl += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"))
                n += x.shape[0]
        n = max(n, 1)
        timer = (lambda: self._pair_ratio(student, view)) if self.cfg.search.rerank_latency else None
        return RealScore(fidelity=agree / n - (kl / n) / 1000.0, timer=timer)  # timed when re-ranking asks

    def _pair_ratio(self, student, view):
        """The student's latency ratio to the teacher at its own size, timed in one interleaved
        call beside it (the median of per-round ratios: drift between rounds cancels)."""
        estimator, fallback = self._estimators()
        with student.taps(False):
            _, ratios = measure_ratios({"teacher": self.deployed(), "candidate": student},
                                       {"teacher": self.shape, "candidate": view.shape}, estimator, fallback)
        return ratios.get("candidate")

    def _finalist(self, choices, size):
        """The student of ``choices`` at input ``size``, assembled once: the final pick times and
        scores the same finalist in turn, so the last one assembled is kept."""
        chosen = plain(choices)
        key = (self.at(size).size, tuple(tuple(c.values()) for c in chosen))
        if self._last_finalist[0] != key:
            student, _ = self.assemble(chosen, key[0])
            self._last_finalist = (key, student.to(self.cfg.device).eval())
        return self._last_finalist[1]

    def ratio_of(self, choices, size=None):
        """Time the student of ``choices`` at input ``size`` beside the teacher (its ratio)."""
        return self._pair_ratio(self._finalist(choices, size), self.at(size))

    def pick_fidelity(self, choices, size=None):
        """Top-1 agreement with the teacher of the student of ``choices`` (at input ``size``) on
        the held-out images plus ``search.pick_train_images`` training images (a fixed subset at
        the eval transforms), for the final pick of a budget over input sizes. The images are
        decoded once per size and kept as 8-bit pixels, up to
        :data:`bespoke.stages.pick.PICK_CACHE_BYTES` over all sizes."""
        return self.pick_agreement(self._finalist(choices, size), self.at(size).size)

    def pick_agreement(self, student, size, base=None):
        """:meth:`pick_fidelity` of any module ``student`` at input ``size``, its images made with
        the preprocessing of ``base`` (a model with timm's pretrained config; default: the
        teacher's)."""
        flags = self.agreement_flags(student, size, base)
        return float(flags.float().mean()) if len(flags) else 0.0

    def agreement_flags(self, student, size, base=None):
        """Per image of :meth:`pick_agreement`'s images, whether ``student`` gives the teacher's
        top-1 class (a bool tensor, in the images' order): what a paired comparison of two
        candidates on the same images needs (:func:`bespoke.stages.zoo.pick`)."""
        targets = torch.cat([t.argmax(-1) for t in self._teacher_on_pick_images()])
        return self._pick_predictions(student, size, base) == targets

    def correct_flags(self, student, size, base=None):
        """Per *labelled* image of :meth:`pick_agreement`'s images, whether ``student``'s top-1 is
        the label; ``None`` when none is labelled or one failed to decode (nothing to line up)."""
        val, train = self._pick_sets()
        labels = torch.tensor([it.label if part.labelled else -1 for part in (val, train) for it in part.items],
                              dtype=torch.long)
        if not bool((labels >= 0).any()):
            return None
        pred = self._pick_predictions(student, size, base)
        return (pred == labels)[labels >= 0] if len(pred) == len(labels) else None

    def _pick_predictions(self, student, size, base=None):
        """``student``'s top-1 class on each of the pick's images, in their order; until the pick
        ends (:meth:`release_pick_images`), one pass per module, size and preprocessing."""
        memo = self._pick_preds.setdefault(student, {}) if self._pick_preds is not None else {}
        key = (int(size), None if base is None else id(base))
        if key not in memo:
            out = []
            with torch.no_grad(), student.taps(False):
                for x in self._pick_images(size, base):
                    out.append(student(x.to(self.cfg.device)).argmax(-1).cpu())
            memo[key] = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
        return memo[key]

    def finalist_flags(self, choices, size=None):
        """:meth:`agreement_flags` of the student of ``choices`` at input ``size``."""
        return self.agreement_flags(self._finalist(choices, size), self.at(size).size)

    def finalist_correct_flags(self, choices, size=None):
        """:meth:`correct_flags` of the student of ``choices`` at input ``size``."""
        return self.correct_flags(self._finalist(choices, size), self.at(size).size)

    def _pick_sets(self):
        """The pick's images: the held-out images, and ``search.pick_train_images`` training
        images (a fixed subset), each without a transform."""
        n = min(self.cfg.search.pick_train_images, len(self.split.train))
        if self.split.balance != "none":  # the draws come shuffled: the first n distinct ones
            distinct = self.split.train.distinct()
            train = distinct.subset(range(min(n, len(distinct))))
        else:
            order = torch.randperm(len(self.split.train), generator=torch.Generator().manual_seed(self.cfg.seed + 1))
            train = self.split.train.subset(sorted(order[:n].tolist()))
        return self.split.val, train

    def _pick_images(self, size, base=None):
        """Batches of the held-out images and the pick's training subset at input ``size``,
        preprocessed as ``base`` (default: the teacher) preprocesses them."""
        n = min(self.cfg.search.pick_train_images, len(self.split.train))
        base = self.teacher if base is None else base
        pixels, normalize = split_normalize(images.transforms_for(base, size))

        def make():
            val, train = self._pick_sets()
            train = train.with_transform(pixels)
            val = val.with_transform(pixels)
            batches = (x for part in (val, train) if len(part) for x, _ in iter_batches(part, 32))
            return (to_pixels(x) for x in batches) if normalize is not None else batches

        nbytes = (len(self.split.val) + n) * 3 * size * size * (1 if normalize is not None else 4)
        key = size if base is self.teacher else (size, id(base))
        kept = self._pick_cache.get(key, make, nbytes)
        return Normalized(kept, normalize) if normalize is not None else kept

    def release_pick_images(self):
        """Let the final pick's decoded images go (they are decoded again if asked for): the
        fine-tune that follows needs the memory. The pick's predictions go too, and are no longer
        kept: a module may be trained after the pick."""
        self._pick_cache = DecodedBatches()
        self._pick_preds = None

    def _teacher_on_pick_images(self):
        if self._pick_teacher is None:
            self.teacher.to(self.cfg.device).eval()
            with torch.no_grad():
                self._pick_teacher = [self.teacher(x.to(self.cfg.device)).cpu() for x in self._pick_images(self.size)]
        return self._pick_teacher

    def size_ratios(self, sizes):
        """How long the teacher takes at each input size in ``sizes`` relative to its own size,
        each size timed in its own interleaved call beside the teacher at its own size (medians of
        per-round ratios), the way re-ranking times a candidate."""
        estimator, fallback = self._estimators()
        models = {"teacher": self.deployed(), **{f"{s}px": self.deployed(s) for s in sizes}}
        shapes = {"teacher": self.shape, **{f"{s}px": (1, 3, s, s) for s in sizes}}
        _, ratios = measure_ratios(models, shapes, estimator, fallback, pairwise=True)
        out = {}
        for s in sizes:
            if not ratios.get(f"{s}px"):
                raise UsageError(f"the latency estimator {self.cfg.plugins.latency!r} cannot measure the teacher at "
                                 f"{s} px; search.input_sizes needs one that measures whole models")
            out[s] = ratios[f"{s}px"]
        self._size_ratios.update(out)
        return out

    def _estimators(self):
        """The configured latency estimator, and a measuring one to fall back on when it is a
        table (a table holds segments, not whole new models). Made once per stage."""
        if getattr(self, "_made_estimators", None) is not None:
            return self._made_estimators
        name = self.cfg.plugins.latency
        # with the thread count `profile` measured the table with
        estimator = self.registry.latency_estimator(name, self.cfg.plugin_options.get(name), threads=self.cfg.threads,
                                                    warn=warner(self.console))
        fallback = None
        if getattr(estimator, "table", None) is not None and self.registry.has("measured-latency"):
            fallback = self.registry.latency_estimator("measured-latency",
                                                       self.cfg.plugin_options.get("measured-latency"))
        self._made_estimators = (estimator, fallback)
        return self._made_estimators

    def donor_as_is(self, name):
        """Donor ``name`` as it is -- its own weights, input size and preprocessing, no training --
        as a student with nothing replaced (its flat traced graph, timed, saved and exported like
        any student), with its held-out images; made once. Raises :class:`UsageError` when its
        outputs are not the teacher's classes (it cannot answer for the teacher then)."""
        if name not in self._zoo:
            model = load_model(name, weights="auto").eval()
            size = default_input_size(model, self.size)
            shape = (1, 3, size, size)
            partition = Partition.from_model(model, shape, name=name)
            mine, theirs = self.partition.cut_points[-1].shape, partition.cut_points[-1].shape
            if tuple(mine) != tuple(theirs):
                raise UsageError(f"donor {name} gives outputs of shape {tuple(theirs)[1:]}, the teacher "
                                 f"{tuple(mine)[1:]}: not the teacher's classes, so it is not offered as it is")
            self._zoo[name] = Made(size=size, shape=shape, partition=partition, base=model, name=name,
                                   val=self.split.val.with_transform(images.transforms_for(model, size)))
        return self._zoo[name]

    def as_is(self, zoo, size=None):
        """The student a zoo entry (``{"kind": "donor", "model": name}``, or ``{"kind":
        "teacher"}`` at input ``size``) is: ``(student, recipe, view)``, nothing replaced, fresh."""
        if zoo.get("kind") == "donor":
            view = self.donor_as_is(zoo["model"])
            recipe = StudentRecipe(teacher=zoo["model"], teacher_weights="auto", input_size=(3, view.size, view.size),
                                   meta={"kind": "donor", "what": f"{zoo['model']} as it is"})
            return assemble(view.partition, []), recipe, view
        view = self.at(size)
        student, recipe = self.assemble([], view.size)
        recipe.meta.update(kind="teacher", what=f"the teacher at {view.size} px")
        return student, recipe, view

    def make(self, plan, workdir):
        """Assemble, evaluate, fine-tune (resumable), evaluate again, save ``workdir/student``. A
        plan from the zoo (``plan["zoo"]``: a donor, or the teacher at an input size, as it is) is
        saved as it is: no fine-tuning, no BatchNorm recalibration."""
        choices = plan.get("choices", [])
        zoo = _zoo_of(plan)
        name = plan.get("name") or f"student-{plan.get('budget', 0):g}"
        if zoo:
            return self._make_as_is(plan, zoo, name, workdir)
        view = self.at(plan.get("input_size"))
        student, recipe = self.assemble(choices, view.size)
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
            what = "fine-tuning" if result.steps else "BatchNorm recalibration (no fine-tuning steps)"
            self.console.print(f"  {name}: {what} lowered the held-out agreement with the teacher "
                               f"({pct(before.agreement)} -> {pct(after.agreement)}); keeping the assembled "
                               "student (finetune.keep_best)", highlight=False)
            student, recipe = self.assemble(choices, view.size)  # afresh: nothing trained touches it
            after = before
        recipe.meta.update(kind="mixed" if choices else "teacher",
                           what=f"{len(choices)} segment(s) replaced{px}" if choices else f"the teacher at {view.size} px")
        student_dir = save_student(student, recipe, workdir / "student")
        return Made(name=name, plan=plan, student=student, recipe=recipe, before=before, after=after,
                    finetune=result, student_dir=student_dir, workdir=workdir, size=view.size, shape=view.shape,
                    finetune_kept=kept, base=None)

    def _make_as_is(self, plan, zoo, name, workdir):
        student, recipe, view = self.as_is(zoo, plan.get("input_size"))
        self.console.print(f"[bold]{name}[/bold]: {recipe.meta['what']} (from the zoo: no training)", highlight=False)
        metrics, _ = evaluate(student, name, view.val, view.shape, teacher=self.teacher_pred)
        student_dir = save_student(student, recipe, workdir / "student")
        return Made(name=name, plan=plan, student=student, recipe=recipe, before=metrics, after=metrics,
                    finetune=FinetuneResult(student=student, steps=0, resumed_from=0, bn_images=0, seconds=0.0),
                    student_dir=student_dir, workdir=workdir,
                    size=view.size, shape=view.shape, finetune_kept=True, base=getattr(view, "base", None))

    def measure(self, made):
        """End-to-end latency of the teacher, every reference model and every student with the
        selected estimator (a measuring one when it is a table), each timed in its own interleaved
        call beside the teacher (:meth:`time_students`). Returns ms by name."""
        self.references = []
        models, shapes = {"teacher": self.deployed()}, {"teacher": self.shape}
        for ref in self.cfg.reference_models:
            model = load_model(ref, weights="auto").eval()
            metrics, _ = evaluate(model, ref, self.split.val, self.shape, teacher=self.teacher_pred)
            self.references.append(metrics)
            try:  # timed as the teacher and the students are, when fx can trace it
                timed = deployed(model, self.shape)
            except UsageError:
                timed = model
            models[f"ref:{ref}"], shapes[f"ref:{ref}"] = timed, self.shape
        estimator, fallback = self._estimators()
        self.latency_device = (fallback or estimator).device()
        ms, _ = measure_ratios(models, shapes, estimator, fallback, pairwise=True)
        self.teacher_metrics.latency_ms = ms["teacher"]
        for r in self.references:
            r.latency_ms = ms[f"ref:{r.name}"]
        return {**ms, **self.time_students(made)}

    def time_students(self, made):
        """Time each student as it ships -- reloaded from its directory with
        :func:`bespoke.load_student`, the module a user deploys -- in its own interleaved call
        beside the teacher (``measure_ratios(pairwise=True)``) in ``search.check_repeats`` separate
        calls (the median), the way the pick timed its finalists; record on each its ms, its ratio to the teacher at the teacher's own
        size with that ratio's 95 % interval, the ratio the pick measured, and whether it is over
        its budget (``search.budget_tolerance``). Returns ms by name."""
        estimator, fallback = self._estimators()
        models, shapes = {"teacher": self.deployed()}, {"teacher": self.shape}
        for m in made:
            models[m.name], shapes[m.name] = load_student(m.student_dir, self.registry).to(self.cfg.device), m.shape
        intervals = {}
        ms, ratios = measure_ratios(models, shapes, estimator, fallback, pairwise=True, intervals=intervals,
                                    repeats=self.cfg.search.check_repeats)
        for m in made:
            m.after.latency_ms = ms[m.name]
            m.latency_ratio, m.latency_interval = ratios.get(m.name), intervals.get(m.name)
            m.ratio_at_pick = m.plan.get("ratio_at_pick", ratio_at_pick(m.plan))
            m.budget_ratio = budget_ratio(m.plan, ms.get("teacher"))
            m.over_budget = m.budget_ratio is not None and over_budget(
                m.latency_ratio, m.latency_interval, m.budget_ratio, self.cfg.search.budget_tolerance)
            zoo = _zoo_of(m.plan)
            if zoo and zoo.get("model") is not None and self.budget_models.get(m.plan.get("budget")) == zoo["model"]:
                m.over_budget = False  # the model whose latency is the budget meets it by definition
        return {m.name: ms[m.name] for m in made}

    def hold_budgets(self, made, search=None, configs=None):
        """Each saved student within its budget as timed by :meth:`time_students`, or the next of
        its budget's finalists (:func:`bespoke.stages.pick.finalists`) that is, made in turn (up
        to ``search.pick_fallbacks``); when none is, the first student, flagged over budget.

        A finalist that agreed with the teacher on the pick's own images more than
        ``search.fallback_max_drop`` less than the pick did is not taken at once when ``search``
        is given (:func:`bespoke.pipeline.search` bound to the run, ``configs`` its search
        configuration by input size): the budget is searched again first, tighter
        (:meth:`search_tighter`), and that search's student is kept when it agrees better than the
        finalist and stays within the budget once saved. The plan of a student kept in place of
        the pick says why (``fallback_detail``), and so does ``fallback.json`` beside it."""
        kept = []
        for m in made:
            first = m
            if m.over_budget and self.cfg.search.pick_fallbacks:
                searched = None if search is not None and configs else {}  # the second look, once
                for k, alt in enumerate(finalists(m.plan)[1:1 + self.cfg.search.pick_fallbacks], start=1):
                    detail = self.fallback_detail(m, alt)
                    drop = detail.get("agreement_drop")
                    if searched is None and drop is not None and drop > self.cfg.search.fallback_max_drop:
                        if _zoo_of(m.plan):  # a fixed network is not searched again: it is timed again
                            searched = self.retime(m, detail)
                            if not m.over_budget:
                                break
                        else:
                            searched, other = self.search_tighter(m, alt, detail, search, configs)
                            if other is not None:
                                m = other
                                break
                    detail.update(searched or {})
                    self.console.print(f"{m.name}: measures {m.latency_ratio:.3f} of the teacher as saved, over "
                                       f"its budget {m.budget_ratio:.3f}; trying the next finalist "
                                       f"({len(alt['choices'])} replaced"
                                       + (f" at {alt['input_size']} px" if alt["input_size"] else "") + ")",
                                       highlight=False)
                    plan = {**m.plan, "choices": alt["choices"], "input_size": alt["input_size"], "latency_ms": None,
                            "zoo": alt.get("zoo"), "ratio_at_pick": alt.get("measured_ratio"), "fallback": k,
                            "fallback_detail": {**detail, "kept": f"finalist {k}"}}
                    other = self.make(plan, m.workdir / f"fallback-{k}")
                    self.time_students([other])
                    if not other.over_budget:
                        m = other
                        break
            if m.over_budget:
                self.console.print(f"[yellow]warning:[/yellow] {m.name} measures {m.latency_ratio:.3f} of the "
                                   f"teacher as saved, over its budget {m.budget_ratio:.3f} (listed in "
                                   "unmet_budgets); give a larger budget, or build cheaper alternatives",
                                   highlight=False)
            elif m is not first:
                atomic_write_text(first.workdir / "fallback.json", json.dumps(m.plan["fallback_detail"], indent=2))
            kept.append(m)
        return kept

    def agreement_at_pick(self, plan):
        """The agreement with the teacher (its fidelity) that the pick measured on its own images
        for the student ``plan`` kept: its row of the pick over input sizes, else of re-ranking;
        None when it measured none for it."""
        meta = plan.get("meta") or {}
        if _zoo_of(plan):  # a network of the zoo: the score the pick gave it
            row = meta.get("answer") if meta.get("zoo") == _zoo_of(plan) else None
            return (row or {}).get("fidelity")
        size = plan.get("input_size")  # None: the teacher's own, read as ratio_at_pick reads it
        alts = [c["alternative"] for c in plain(plan.get("choices", []))]

        def same(row):
            return [c["alternative"] for c in plain(row.get("choices") or [])] == alts

        rows = meta.get("input_sizes")
        if rows is not None:
            return next((r.get("fidelity") for r in rows if size in (None, r.get("input_size")) and same(r)), None)
        table = meta.get("reranked") or []
        row = table[meta.get("picked", 0)] if table else {}
        return row.get("fidelity") if row and same(row) else None

    def fallback_detail(self, m, alt):
        """Why student ``m`` falls back to finalist ``alt``, and how the two compare on the pick's
        own images: the record a fallback's plan keeps (``fallback_detail``)."""
        pick, other = self.agreement_at_pick(m.plan), alt.get("fidelity")
        return {"reason": f"the saved student measured {m.latency_ratio:.3f} of the teacher, over its budget "
                          f"{m.budget_ratio:.3f}",
                "agreement_pick": pick, "agreement_fallback": other,
                "agreement_drop": pick - other if pick is not None and other is not None else None,
                "max_drop": self.cfg.search.fallback_max_drop}

    def retime(self, m, detail):
        """The second look of :meth:`hold_budgets` for a network of the zoo (a donor, or the
        teacher at a size, as it is) over its budget as saved, whose next finalist agrees much
        less: nothing can be searched again, and the network is the one the pick found within the
        budget, so it is timed again as saved (``search.check_repeats`` more calls) and judged on
        the mean of the two timings, its interval spanning both. ``m`` keeps the pooled figures;
        when they are within the budget it stays, and its plan says so (``fallback_detail``).
        Returns what the look found, for the record of a fallback that follows."""
        first, first_iv, first_ms = m.latency_ratio, m.latency_interval, m.after.latency_ms
        self.time_students([m])
        second, second_iv = m.latency_ratio, m.latency_interval
        if second is None:  # (first is not: an untimed student is never over its budget)
            info = {"retimed": [first, second], "outcome": "not timed again"}
        else:
            m.latency_ratio = (first + second) / 2
            if first_iv is not None and second_iv is not None:
                m.latency_interval = (min(first_iv[0], second_iv[0]), max(first_iv[1], second_iv[1]))
            if first_ms is not None and m.after.latency_ms is not None:
                m.after.latency_ms = (first_ms + m.after.latency_ms) / 2
            m.over_budget = over_budget(m.latency_ratio, m.latency_interval, m.budget_ratio,
                                        self.cfg.search.budget_tolerance)
            info = {"retimed": [first, second], "outcome": "over the budget" if m.over_budget else "within the budget"}
        self.console.print(f"{m.name}: fallback -{100 * detail['agreement_drop']:.1f} pts vs pick; timed again: "
                           + (f"{second:.3f}, mean {m.latency_ratio:.3f}: " if second is not None else "")
                           + ("over" if m.over_budget else "within"), highlight=False)
        if not m.over_budget:
            m.plan = {**m.plan, "fallback_detail": {**detail, **info, "kept": "pick"}}
        return info

    def search_tighter(self, m, alt, detail, search, configs):
        """The second look of :meth:`hold_budgets` for student ``m``, over its budget as saved, whose
        finalist ``alt`` agrees much less than it: the same strategy at ``m``'s input size searches
        at the budget divided by how much ``m`` measured over it (at least
        ``1 + search.budget_tolerance``), its candidates re-ranked against the budget as given
        (``search(cfg, output, evaluate=..., tighten=...)``; the report lands in
        ``search-tighter.json`` beside the student). When its best within the budget agrees with
        the teacher better than ``alt`` (on the images ``alt`` was scored on), it is made, saved
        and timed. Returns (what the look found, for the record; the student when it stays within
        the budget, else None), and says it in one line."""
        factor = max(m.latency_ratio / m.budget_ratio, 1 + self.cfg.search.budget_tolerance)
        info = {"tightened_by": factor}
        size, scfg = m.size, configs.get(m.size)
        if scfg is None or (size != self.size and size not in self._size_ratios):
            return self._looked(m, detail, info, "no search there", f"no search at {size} px to repeat"), None
        kw = {} if size == self.size else {"size": size, "size_ratio": self._size_ratios[size]}
        output = m.workdir / "search-tighter.json"
        report = search(scfg.model_copy(update={"budgets": [m.plan["budget"]]}), output,
                        evaluate=lambda c: self.fidelity(c, size), tighten=factor, **kw)
        (result,) = report.results
        rows = result.meta.get("reranked") or []
        row = rows[result.meta.get("picked", 0)] if rows else {}
        info.update(tightened_budget_ms=result.budget_ms / factor, search_report=str(output))
        chosen = [c["alternative"] for c in plain(result.choices)]
        if not row.get("within_budget"):
            return self._looked(m, detail, info, "none within budget", "it found no student within the budget"), None
        if chosen == [c["alternative"] for c in plain(m.plan.get("choices", []))]:
            return self._looked(m, detail, info, "found the pick", "it found the pick again"), None
        refined = self.cfg.search.pick_train_images and (m.plan.get("meta") or {}).get("input_sizes") is not None
        info["agreement_search"] = agreement = (self.pick_fidelity(result.choices, size) if refined
                                                else row.get("fidelity"))
        if alt.get("fidelity") is not None and agreement <= alt["fidelity"]:
            return self._looked(m, detail, info, "finalist better", "its best agreed no better than the finalist"), None
        plan = {**result.model_dump(), **{k: m.plan[k] for k in ("name", "role") if k in m.plan},  # still mixed-B
                "fallback": None, "fallback_detail": {**detail, **info, "outcome": "kept its best", "kept": "search"}}
        other = self.make(plan, m.workdir / "search-tighter")
        self.time_students([other])
        if other.over_budget:
            return self._looked(m, detail, info, "its best too slow", "its best measured over the budget as saved"), None
        self._looked(m, detail, info, "kept its best", "kept its best")
        return info, other

    def _looked(self, m, detail, info, short, outcome):
        """Record the second look's ``outcome`` in ``info`` and say it in one line (80 columns)."""
        info["outcome"] = outcome
        self.console.print(f"{m.name}: fallback -{100 * detail['agreement_drop']:.1f} pts vs pick; searched at "
                           f"{m.budget_ratio / info['tightened_by']:.3f}x: {short}", highlight=False)
        return info

    def score(self, made, scoring):
        """The teacher and each saved student (reloaded from its directory, as it ships) on the
        ``scoring`` images, which nothing that chooses reads: top-1 when they are labelled, and
        agreement with the teacher's top-1 at its own size, each student at its own input size
        (as on the held-out images). Returns :class:`bespoke.evaluate.Metrics` by name, the
        teacher's under ``teacher``."""
        device = self.cfg.device

        def at(size, base=None):
            return scoring.with_transform(images.transforms_for(self.teacher if base is None else base, size))

        self.teacher.to(device).eval()
        teacher, pred = evaluate(self.teacher, "teacher", at(self.size), self.shape, device=device)
        out = {"teacher": teacher}
        for m in made:
            student = load_student(m.student_dir, self.registry).to(device).eval()
            with student.taps(False):
                out[m.name], _ = evaluate(student, m.name, at(m.size, getattr(m, "base", None)), m.shape,
                                          teacher=pred, device=device)
        self.console.print(f"scored the teacher and {len(made)} student(s) on {teacher.images} scoring images"
                           + ("" if teacher.top1 is not None else " (unlabelled: agreement only)"), highlight=False)
        return out

    def export(self, m):
        with m.student.taps(False):
            res = export_model(m.student, m.shape, m.workdir, ("onnx", "torch-export"), seed=self.cfg.seed,
                               dynamic_batch=self.cfg.export.dynamic_batch)
        res.student_dir = str(m.student_dir)
        self.console.print(f"{m.name}: exported {res.onnx} (onnxruntime vs PyTorch max |diff| "
                           f"{res.onnx_max_abs_diff:.1e}), {res.torch_export}, {res.student_dir}")
        return res


__all__ = ["Made", "Students", "read_search_recipe"]
