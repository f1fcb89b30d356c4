"""The final pick of each budget over input sizes (``search.input_sizes``).

The search runs once per input size; per budget, the pick keeps the re-ranked student that
agrees best with the teacher among those measured within the budget (:func:`bespoke.search.pick_scored`),
after sharpening the finalists' scores (:func:`refine_finalists`).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from bespoke import search as S
from bespoke.stages import plain

PICK_CACHE_BYTES = 1 << 30  # decoded pick images kept in memory (as 8-bit pixels), over all input sizes


def search_sizes(cfg: Any, stage: Any, native: Any, sized_cfgs: dict[int, Any], out: Path, console: Any, *,
                 search: Callable[..., Any]) -> Any:
    """Search students at each other input size too (``search``: :func:`bespoke.pipeline.search`),
    and keep per budget the best re-ranked one over all sizes (:func:`bespoke.search.pick_scored`:
    the best held-out agreement among those measured within the budget). Writes the merged report
    to ``OUT/search.json``."""
    ratios = stage.size_ratios(list(sized_cfgs))
    console.print("the teacher at other input sizes, measured beside itself at its own size: "
                  + ", ".join(f"{s} px {r:.3f}" for s, r in ratios.items()), highlight=False)
    found = {stage.size: native}
    for size, scfg in sized_cfgs.items():
        found[size] = search(scfg, out / f"search-{size}px.json", size=size, size_ratio=ratios[size],
                             evaluate=lambda c, size=size: stage.fidelity(c, size))
    merged = []
    for i in range(len(native.results)):
        options = [(size, rep.results[i]) for size, rep in found.items()]
        feasible = [o for o in options if o[1].feasible] or options
        rows = [scored_pick(r, native.teacher_ms) for _, r in feasible]
        refine_finalists(cfg, stage, feasible, rows, native.results[i].budget)
        size, pick = feasible[S.pick_scored(rows, measured="measured_ratio", predicted="predicted_ratio")]
        pick = pick.model_copy(deep=True)
        pick.meta["input_sizes"] = [{"input_size": s, **row, "choices": plain(r.choices)}
                                    for (s, r), row in zip(feasible, rows)]
        merged.append(pick)
        console.print(f"budget {pick.budget:g}: the student at {size} px agrees best within the budget ("
                      + ", ".join(f"{s} px {row['fidelity']:.4f}" + ("" if row["within_budget"] else " over")
                                  + (f" (timed x{len(row['measured_ratios'])}: {row['measured_ratio']:.3f})"
                                     if "measured_ratios" in row else "")
                                  for (s, _), row in zip(feasible, rows)) + ")", highlight=False)
    report = native.model_copy(update={"results": merged})
    S.write_report(report, out / "search.json")
    return report


def refine_finalists(cfg: Any, stage: Any, finalists: list[tuple[int, Any]], rows: list[dict[str, Any]],
                     budget: float | None) -> None:
    """Sharpen the real scores ``rows`` of a budget's finalists (one ``(size, result)`` per input
    size) in place before the pick: with ``search.pick_remeasure``, time again those measured
    within ``pick_margin`` of the budget, either side, and judge them by the median of all their
    measurements; with ``search.pick_train_images``, score those within the budget (or near it)
    by their agreement on the held-out plus that many training images."""
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


def scored_pick(result: Any, teacher_ms: float) -> dict[str, Any]:
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


class ScoreMemo:
    """The real scores of assembled candidates in one run, by input size and choices: a candidate
    that re-ranking meets again -- in another budget's best, a search again at a tighter budget
    (``search.rerank_tighten``, a fallback's second look) -- is neither scored nor timed twice.
    Its agreement is the same images' and its ratio the first timing's (timing it again until it
    fits would be choosing on noise). Keeps numbers only, never the assembled student."""

    def __init__(self):
        self.rows, self.hits = {}, 0

    def summary(self) -> str | None:
        """What re-ranking scored, for the console; None when it scored nothing."""
        if not self.rows:
            return None
        return (f"re-ranking scored {len(self.rows)} students on the held-out images"
                + (f"; {self.hits} met again were not scored again" if self.hits else ""))

    def get(self, size: int, choices: list[dict[str, Any]], measure: Callable[[], Any],
            retime: Callable[[], Any]) -> Any:
        """``measure()``: the candidate's :class:`bespoke.search.RealScore` (its lazy ``timer``, if
        any, is kept for the first timing); ``retime()``: its ratio when it is first timed after
        the score was kept (a new assembly)."""
        key = (int(size), tuple((int(c["start"]), int(c["end"]), c["alternative"]) for c in choices))
        row, first = self.rows.get(key), None
        if row is None:
            score = measure()
            row = self.rows[key] = {"fidelity": score.fidelity, "timed": score.timer is not None}
            first = score.timer
        else:
            self.hits += 1
        if not row["timed"]:
            return S.RealScore(fidelity=row["fidelity"])

        def timer():
            if "ratio" not in row:
                row["ratio"] = (first or retime)()
            return row["ratio"]
        return S.RealScore(fidelity=row["fidelity"], timer=timer)


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


def split_normalize(transform: Any) -> tuple[Any, Any]:
    """``transform`` (timm's eval preprocessing) as (the steps up to pixels in [0, 1], the final
    ``Normalize``); ``(transform, None)`` unless it ends in a to-tensor step then a Normalize
    (only then are the values before the Normalize exact multiples of 1/255)."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if (len(steps) >= 2 and isinstance(steps[-1], T.Normalize)
            and type(steps[-2]).__name__ in ("ToTensor", "MaybeToTensor")):
        return T.Compose(steps[:-1]), steps[-1]
    return transform, None


def to_pixels(x: Any) -> Any:
    """A batch in [0, 1] from ``to_tensor`` (k / 255) as the 8-bit pixels k, exactly."""
    return x.mul(255).round_().to(torch.uint8)


class Normalized:
    """Batches kept as 8-bit pixels (a quarter of float32's memory), given back as the eval
    transform gives them: ``to_tensor``'s ``float().div(255)`` then the ``Normalize``, the
    same operations on the same values, so the result is bit for bit the same."""

    def __init__(self, kept: Any, normalize: Any):
        self.kept, self.normalize = kept, normalize

    def __iter__(self):
        for b in self.kept:
            yield self.normalize(b.to(torch.float32).div(255))


__all__ = ["PICK_CACHE_BYTES", "DecodedBatches", "Normalized", "ScoreMemo", "split_normalize", "to_pixels", "refine_finalists", "scored_pick", "search_sizes"]


def finalists(result: dict[str, Any], zoo: bool = True) -> list[dict[str, Any]]:
    """A budget's finalists (``input_size``, ``choices``, ``fidelity``, ``measured_ratio`` and,
    for the zoo's entries, ``zoo``), the pick first, then the others the pick measured within the
    budget, best fidelity first: where the pick falls back to when the student it made measures
    over the budget once saved. ``zoo=False``: the mixed students only."""
    meta = result.get("meta") or {}
    rows = meta.get("input_sizes")
    if rows is None:
        rows = [{**row, "input_size": result.get("input_size")} for row in meta.get("reranked") or []]
    if zoo:
        rows = [*rows, *({**z, "zoo": {"kind": z["kind"], "model": z.get("model"), "what": z.get("what")}}
                         for z in meta.get("zoo_rows") or [])]
    first = {"input_size": result.get("input_size"), "choices": plain(result.get("choices", [])),
             "zoo": result["zoo"] if "zoo" in result else meta.get("zoo")}

    def key(r):
        z = r.get("zoo") or {}
        return (r.get("input_size"), z.get("model"), tuple(tuple(sorted(c.items())) for c in plain(r.get("choices", []))))

    others = sorted((r for r in rows if r.get("within_budget") and r.get("choices") is not None and key(r) != key(first)),
                    key=lambda r: -float(r.get("fidelity", float("-inf"))))
    seen, out = set(), []
    for r in [first, *others]:
        if key(r) not in seen:
            seen.add(key(r))
            out.append({"input_size": r.get("input_size"), "choices": plain(r["choices"]),
                        "fidelity": r.get("fidelity"), "measured_ratio": r.get("measured_ratio"),
                        "zoo": r.get("zoo")})
    return out


def ratio_at_pick(result: dict[str, Any]) -> float | None:
    """The latency ratio (to the teacher at its own size) the pick measured for the student it
    kept, or None when it measured none."""
    meta = result.get("meta") or {}
    if meta.get("zoo") and result.get("zoo", meta["zoo"]) and meta.get("answer"):
        return meta["answer"].get("measured_ratio")  # the zoo entry the pick timed
    for row in meta.get("input_sizes") or []:
        if row.get("input_size") == (result.get("input_size") or row.get("input_size")) and \
                [c.get("alternative") for c in plain(row.get("choices", []))] == \
                [c.get("alternative") for c in plain(result.get("choices", []))]:
            return row.get("measured_ratio")
    table = meta.get("reranked") or []
    if table:
        row = table[meta.get("picked", 0)]
        if row.get("measured_ratio") is not None:
            return row["measured_ratio"]
        reference = meta.get("reference_ms") or None
        if row.get("measured_ms") is not None and reference:
            return row["measured_ms"] / reference
    return None
