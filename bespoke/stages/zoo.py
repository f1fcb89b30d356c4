"""The zoo in the pick: what the user already has competes with the mixed students.

Per budget, the final pick weighs the best *mixed* student (search, re-rank, input sizes:
:mod:`bespoke.stages.pick`) against the networks the run holds, as they are: each donor
(``donors``: its own weights, input size and preprocessing; no training) and the teacher at each
searched input size. Each is timed as shipped the way a finalist is (beside the teacher; again,
``search.pick_remeasure`` times, when it lies within ``search.pick_margin`` of a budget, judged by
the median; within a budget up to ``search.budget_tolerance``, the margin every saved student is
held to, so a donor whose own latency set the budget is not lost to timing noise) and judged on the selection images by the same criterion as the mixed student
(agreement with the teacher on the held-out images plus ``search.pick_train_images`` training
images; without those, the re-ranking score). The **answer** of a budget is the best one within
it, with one rule of evidence: the best mixed student displaces the best network of the zoo only
when the pick's images are sure it agrees better (``search.zoo_confidence``: a paired interval of
the difference, image by image, above zero), since the zoo's network is what the user already
has; and at a budget named by a donor (:func:`named_budgets`), another network of the zoo
displaces that donor only on the same evidence, since that donor is the one the user named.
The best mixed student is kept beside the answer (``meta["mixed"]``), so the report says what
mixing gained or cost. A donor whose outputs are not the teacher's classes is not offered, and
the run says so. ``search.zoo`` (on by default) turns it off.
"""

from __future__ import annotations

import statistics
from typing import Any

from bespoke.errors import UsageError
from bespoke.stages import plain
from bespoke.stages.pick import scored_pick


def named_budgets(cfg: Any, stage: Any, console: Any) -> list[float]:
    """``cfg.budgets`` with each budget named by a model (one of ``donors``) replaced by that
    model's latency ratio to the teacher on the run's device: its flat traced graph at its own
    input size, timed beside the teacher in ``search.check_repeats`` calls (the median), as saved
    students are timed. Records ``stage.budget_models`` (ratio -> name): at the pick, that model
    meets its own budget by definition (:func:`pick`), and so does it as saved."""
    from bespoke.evaluate import measure_ratios
    from bespoke.models import default_input_size, load_model
    from bespoke.student import deployed

    out = []
    for b in cfg.budgets:
        if not isinstance(b, str):
            out.append(b)
            continue
        if b not in cfg.donors:
            raise UsageError(f"budget {b!r} names a model that is not one of donors {list(cfg.donors)}: add it to "
                             "donors (a budget is named by a donor, timed on the device), or give a ratio")
        model = load_model(b, weights="auto").eval()
        size = default_input_size(model, stage.size)
        estimator, fallback = stage._estimators()
        _, ratios = measure_ratios({"teacher": stage.deployed(), b: deployed(model, (1, 3, size, size))},
                                   {"teacher": stage.shape, b: (1, 3, size, size)}, estimator, fallback,
                                   pairwise=True, repeats=cfg.search.check_repeats)
        ratio = ratios.get(b)
        if ratio is None or not 0 < ratio < 1:
            raise UsageError(f"budget {b!r}: " + ("the latency estimator cannot time it" if ratio is None else
                             f"it runs at {ratio:.3f} of the teacher on this device, not faster, so a budget "
                             "named by it compresses nothing") + "; give a ratio instead")
        ratio = round(ratio, 3)
        if ratio in stage.budget_models or ratio in out:
            raise UsageError(f"budget {b!r} comes to {ratio}, which another budget already is; give each once")
        stage.budget_models[ratio] = b
        out.append(ratio)
        console.print(f"budget {b}: {ratio:.3f} of the teacher ({size} px, timed beside it on this device)",
                      highlight=False)
    return out


def entries(cfg: Any, stage: Any, sizes: list[int], warn: Any) -> list[dict[str, Any]]:
    """The zoo: the teacher at its own and at each searched input size, then each donor that
    gives the teacher's classes, as it is."""
    out = [{"kind": "teacher", "input_size": s, "what": f"the teacher at {s} px"}
           for s in sorted({stage.size, *sizes}, reverse=True)]
    for name in cfg.donors:
        try:
            view = stage.donor_as_is(name)
        except UsageError as exc:
            warn(str(exc))
            continue
        out.append({"kind": "donor", "model": name, "input_size": view.size, "what": f"{name} as it is"})
    return out


def _judge(cfg: Any, stage: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """An entry's row: its score by the pick's criterion and its ratio, timed once beside the
    teacher (the teacher at its own size is 1.0 by definition)."""
    student, _, view = stage.as_is(entry, entry["input_size"])
    student.to(cfg.device).eval()
    base = getattr(view, "base", None)
    if cfg.search.pick_train_images:
        fidelity = stage.pick_agreement(student, view.size, base)
    else:
        fidelity = stage.fidelity_of(student, view).fidelity
    own = entry["kind"] == "teacher" and view.size == stage.size
    ratio = 1.0 if own else stage._pair_ratio(student, view)
    return {**entry, "choices": [], "fidelity": fidelity, "measured_ratios": [ratio],
            "measured_ratio": ratio, "student": student, "view": view}


def _remeasure(cfg: Any, stage: Any, row: dict[str, Any], budget: float) -> None:
    """Time an entry near ``budget`` again, as the pick times its finalists (``pick_remeasure``)."""
    s = cfg.search
    near = row["measured_ratio"] is not None and abs(row["measured_ratio"] - budget) <= s.pick_margin * budget
    if not (s.pick_remeasure and near) or len(row["measured_ratios"]) > 1 or row["measured_ratio"] == 1.0:
        return
    more = [stage._pair_ratio(row["student"], row["view"]) for _ in range(s.pick_remeasure)]
    row["measured_ratios"] += [t for t in more if t is not None]
    row["measured_ratio"] = float(statistics.median(row["measured_ratios"]))


def _mixed_row(cfg: Any, stage: Any, result: Any, teacher_ms: float) -> dict[str, Any]:
    """The budget's mixed pick as a row judged by the zoo's criterion."""
    meta = result.meta
    rows = meta.get("input_sizes")
    row = None
    if rows:  # the pick over input sizes already judged it
        key = (result.input_size or stage.size, [c["alternative"] for c in plain(result.choices)])
        row = next((dict(r) for r in rows if (r.get("input_size"), [c["alternative"] for c in plain(r.get("choices", []))])
                    == key), None)
    if row is None:
        row = scored_pick(result, teacher_ms)
    if cfg.search.pick_train_images and "proxy_fidelity" not in row and result.feasible:
        row["proxy_fidelity"] = row["fidelity"]
        row["fidelity"] = stage.pick_fidelity(plain(result.choices), result.input_size)
    return row


def pick(cfg: Any, stage: Any, found: Any, sizes: list[int], console: Any) -> Any:
    """Each budget's answer: its mixed pick or a zoo entry, the best within the budget; writes
    what won into each result's ``meta`` (``answer``, ``mixed``, ``zoo``) and returns the report
    with the answers as its results."""
    warn = lambda m: console.print(f"[yellow]warning:[/yellow] {m}", highlight=False)  # noqa: E731
    zoo = [_judge(cfg, stage, e) for e in entries(cfg, stage, sizes, warn)]
    console.print("the zoo, as it is (score on the selection images, latency ratio):", highlight=False)
    for z in zoo:
        console.print(f"  {z['what']}: {z['fidelity']:.4f} at {z['measured_ratio']:.3f}", highlight=False)
    results, flags = [], {}
    for result in found.results:
        budget = result.budget if result.budget <= 1 else result.budget_ms / found.teacher_ms
        mixed = _mixed_row(cfg, stage, result, found.teacher_ms)
        rows, named = [], getattr(stage, "budget_models", {}).get(result.budget)
        for z in zoo:
            _remeasure(cfg, stage, z, budget)
            # a fixed network at the budget is within it up to the margin every saved student is held
            # to (search.budget_tolerance): a donor whose own latency set the budget is not lost to noise
            row = {k: v for k, v in z.items() if k not in ("student", "view")} \
                | {"within_budget": z["measured_ratio"] <= budget * (1 + cfg.search.budget_tolerance)}
            if named is not None and z["kind"] == "donor" and z.get("model") == named:
                # the budget is this model's latency on the device: it meets it by definition
                row |= {"within_budget": True, "sets_budget": True, "measured_ratio": budget}
            rows.append(row)
        compare = (lambda a, b, result=result, rows=rows: _evidence(cfg, stage, flags, a, b, result, zoo, rows)
                   ) if cfg.search.zoo_confidence else None
        results.append(_answer(result, mixed, rows, found.teacher_ms, console, compare))
    return found.model_copy(update={"results": results})


def _index(rows: list[dict[str, Any]], row: dict[str, Any]) -> int:
    return next(i for i, r in enumerate(rows) if r is row)


def _evidence(cfg: Any, stage: Any, flags: dict[Any, Any], a: Any, b: dict[str, Any], result: Any,
              zoo: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How much better candidate ``a`` (``"mixed"``: the budget's mixed pick, or a zoo row) does
    than the zoo row ``b``, image by image on the pick's images, with a paired bootstrap interval
    at ``search.zoo_confidence`` (:func:`bespoke.evaluate.paired_flags`): top-1 against the labels
    of the labelled ones (``search.zoo_evidence: labels``), else agreement with the teacher's
    top-1. ``flags`` keeps each candidate's per-image flags across budgets."""
    from bespoke.evaluate import paired_flags

    labels = cfg.search.zoo_evidence == "labels"

    def flags_of(c, on_labels):
        if isinstance(c, str):  # the mixed pick
            choices = plain(result.choices)
            key = ("mixed", on_labels, result.input_size, tuple(x["alternative"] for x in choices))
            if key not in flags:
                flags[key] = (stage.finalist_correct_flags if on_labels else stage.finalist_flags)(
                    choices, result.input_size)
            return flags[key]
        entry, key = zoo[_index(rows, c)], ("zoo", on_labels, c["what"])
        if key not in flags:
            flags[key] = (stage.correct_flags if on_labels else stage.agreement_flags)(
                entry["student"], entry["view"].size, getattr(entry["view"], "base", None))
        return flags[key]

    fa, fb = (flags_of(a, True), flags_of(b, True)) if labels else (None, None)
    on = "labels"
    if fa is None or fb is None or not len(fa):  # no labelled image among the pick's: agreement, as without labels
        fa, fb, on = flags_of(a, False), flags_of(b, False), "agreement"
    diff = paired_flags(fa, fb, resamples=4000, confidence=cfg.search.zoo_confidence, seed=cfg.seed)
    return {**diff.as_dict(), "against": b["what"], "on": on}


def _answer(result: Any, mixed: dict[str, Any], zoo: list[dict[str, Any]], teacher_ms: float, console: Any,
            compare: Any = None) -> Any:
    """The result of one budget with its answer chosen between ``mixed`` and the ``zoo`` rows.
    ``compare(a, b)``, when given, says how sure the pick's images are that candidate ``a`` (a
    zoo row, or ``"mixed"``) agrees better than the zoo row ``b`` (:func:`_evidence`): at a budget
    named by a donor, another network of the zoo displaces that donor only when the interval's
    lower bound is above zero; the mixed student displaces the zoo's choice only then too."""
    mixed_ok = bool(mixed.get("within_budget")) and result.feasible
    within = [z for z in zoo if z["within_budget"]]
    best = max(within, default=None, key=lambda z: (z["fidelity"], -z["measured_ratio"]))
    named = next((z for z in within if z.get("sets_budget")), None)
    zoo_evidence = None
    if named is not None and best is not named and compare is not None:
        zoo_evidence = {**compare(best, named), "candidate": best["what"]}
        if zoo_evidence["low"] <= 0:  # the donor the user named stays: the other is not surely better
            console.print(f"budget {result.budget:g}: {best['what']} agrees {best['fidelity']:.4f}, "
                          f"{named['what']} {named['fidelity']:.4f}; not surely better: {_points(zoo_evidence)}",
                          highlight=False)
            best = named
    evidence = None
    if best is not None and mixed_ok and compare is not None and \
            (mixed.get("fidelity") or float("-inf")) > best["fidelity"]:
        evidence = compare("mixed", best)
    mixed_info = {"choices": plain(result.choices), "input_size": result.input_size,
                  "fidelity": mixed.get("fidelity"), "measured_ratio": mixed.get("measured_ratio"),
                  "within_budget": mixed_ok, "latency_ms": result.latency_ms}
    out = result.model_copy(deep=True)
    out.meta["zoo"] = None
    out.meta["zoo_rows"] = zoo  # every entry as judged for this budget: finalists too (pick.finalists)
    # a tie goes to the zoo: on the selection images the mixed student is then no better than what the user has
    unsure = evidence is not None and evidence["low"] <= 0
    if best is not None and (not mixed_ok or unsure or best["fidelity"] >= (mixed.get("fidelity") or float("-inf"))):
        out.choices, out.input_size = [], best["input_size"]
        out.feasible, out.loss, out.score = True, 0.0, 0.0
        out.latency_ms = best["measured_ratio"] * teacher_ms  # measured, not predicted: the answer's meta says so
        out.speedup = 1.0 / best["measured_ratio"] if best["measured_ratio"] else out.speedup
        out.meta["zoo"] = {"kind": best["kind"], "model": best.get("model"), "what": best["what"]}
        out.meta["answer"] = {"kind": best["kind"], "what": best["what"], "fidelity": best["fidelity"],
                              "measured_ratio": best["measured_ratio"], "evidence": evidence,
                              "zoo_evidence": zoo_evidence}
        out.meta["mixed"] = mixed_info if result.choices else None
        out.meta["ratio_at_pick"] = best["measured_ratio"]
        console.print(f"budget {result.budget:g}: the answer is {best['what']} ({best['fidelity']:.4f} at "
                      f"{best['measured_ratio']:.3f}); the best mixed student "
                      + (f"{mixed_info['fidelity']:.4f} at {mixed_info['measured_ratio'] or float('nan'):.3f}"
                         + ("" if mixed_ok else ", over the budget") if result.choices else "replaces nothing")
                      + (f", not surely better: {_points(evidence)}" if unsure else ""), highlight=False)
    else:
        kind = "mixed" if result.choices else "teacher"
        what = (f"{len(result.choices)} segment(s) replaced" if result.choices
                else f"the teacher at {result.input_size or 'its own size'} px")
        out.meta["answer"] = {"kind": kind, "what": what, "fidelity": mixed.get("fidelity"),
                              "measured_ratio": mixed.get("measured_ratio"), "evidence": evidence,
                              "zoo_evidence": zoo_evidence}
        out.meta["mixed"] = None  # the answer is the mixed student itself
        console.print(f"budget {result.budget:g}: the answer is the mixed pick ({what}); the best of the zoo "
                      + (f"is {best['what']} ({best['fidelity']:.4f})" if best else "does not fit the budget")
                      + (f"; mixed minus zoo {_points(evidence)}" if evidence else ""), highlight=False)
    return out


def _points(evidence: dict[str, Any]) -> str:
    what = "points of top-1 on" if evidence.get("on") == "labels" else "points of agreement on"
    return (f"{100 * evidence['diff']:+.1f} [{100 * evidence['low']:+.1f}, {100 * evidence['high']:+.1f}] "
            f"{what} {evidence['images']} {'labelled ' if evidence.get('on') == 'labels' else ''}images")


def mixed_plan(result: Any) -> dict[str, Any] | None:
    """The plan of a budget's best mixed student when the answer is a zoo entry (``None`` when the
    answer is the mixed student itself): made, timed and scored beside the answer, named
    ``mixed-<budget>``; it falls back among the mixed finalists only."""
    mixed = result.meta.get("mixed")
    if not mixed:
        return None
    plan = result.model_dump()
    plan.update(choices=mixed["choices"], input_size=mixed["input_size"], latency_ms=mixed["latency_ms"],
                name=f"mixed-{result.budget:g}", role="mixed", zoo=None, ratio_at_pick=mixed["measured_ratio"])
    plan["meta"] = {**plan["meta"], "zoo": None, "zoo_rows": [], "answer": None}
    return plan


__all__ = ["entries", "mixed_plan", "named_budgets", "pick"]
