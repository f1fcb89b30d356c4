"""Measuring modules with an estimator: modules timed alone into a lookup table, and in-context
(replace-one) savings timed beside the whole teacher."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from pydantic import BaseModel

from bespoke.errors import UsageError
from bespoke.counting import count_flops
from bespoke.latency.signature import make_query, module_signature
from bespoke.latency.stats import per_round_means
from bespoke.latency.table import LatencyTable, LutEntry, Role, SavingEntry, TeacherLatency, saving_key
from bespoke.types import LatencyEstimator, LatencyQuery

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class ProfileItem:
    """One module to measure into a LUT."""

    label: str
    module: "nn.Module"
    input_shape: tuple[int, ...]
    role: Role = "other"


def profile_modules(items: Sequence[ProfileItem], estimator: LatencyEstimator, *,
                    teacher: ProfileItem | None = None, count_flops_too: bool = True,
                    notes: dict[str, Any] | None = None) -> LatencyTable:
    """Measure ``items`` (and the ``teacher``) with ``estimator`` in one interleaved batch."""
    import bespoke

    queries: dict[str, LatencyQuery] = {}
    meta: dict[str, ProfileItem] = {}
    all_items = list(items) + ([teacher] if teacher is not None else [])
    for it in all_items:
        q = make_query(it.module, it.input_shape)
        queries.setdefault(q.key, q)
        meta.setdefault(q.key, it)
    if not queries:
        raise UsageError("nothing to profile: no modules were given")
    ms = estimator.latencies(list(queries.values()))
    entries: dict[str, LutEntry] = {}
    for it in items:
        key = module_signature(it.module, it.input_shape)
        if key in entries:
            continue  # identical architecture and shape: one entry answers both
        entries[key] = LutEntry(
            ms=float(ms[key]), label=it.label, role=it.role, input_shape=list(it.input_shape),
            flops=count_flops(it.module, it.input_shape) if count_flops_too else None,
        )
    notes = dict(notes or {})
    options = getattr(estimator, "options", None)
    if isinstance(options, BaseModel):  # how it was measured (runs, statistic, ...), for the record
        notes.setdefault("estimator_options", options.model_dump(mode="json"))
    table = LatencyTable(
        device=estimator.device(), entries=entries,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        bespoke_version=bespoke.__version__, notes=notes,
    )
    if teacher is not None:
        tkey = module_signature(teacher.module, teacher.input_shape)
        table.teacher = TeacherLatency(key=tkey, ms=float(ms[tkey]), label=teacher.label)
    return table


def measure_replace_one(reference: "nn.Module", replaced: Sequence[tuple[str, str, str, Any]],
                        estimator: LatencyEstimator, input_shape: Sequence[int], *,
                        chunk: int = 16) -> tuple[dict[str, SavingEntry], list[float]]:
    """In-context savings: the whole ``reference`` (the teacher) against the teacher with one
    segment replaced, all measured end to end.

    ``replaced``: ``(label, segment_key, alternative_key, build)`` where ``build()`` returns the
    whole model with that one replacement (built lazily, ``chunk`` at a time, to bound memory).
    Each chunk is one interleaved call of ``estimator`` that includes the reference. When the
    estimator gives every timed run (``latency_samples``), a saving is the median over rounds of
    the *paired* relative difference ``(ref - alt) / ref`` within one round (drift between rounds
    cancels); otherwise the relative difference of the two medians. Relative savings are turned
    into ms with the reference's median over all chunks, so a chunk timed while the machine was
    slower does not inflate its savings. Returns the savings (keyed by :func:`saving_key`) and
    the reference's median latency in each chunk.
    """
    shape = tuple(int(s) for s in input_shape)
    ref_q = make_query(reference, shape)
    rel: dict[str, tuple[float, str, str, str]] = {}
    refs: list[float] = []
    todo = list(replaced)
    paired = callable(getattr(estimator, "latency_samples", None))
    step = max(1, chunk)
    for lo in range(0, len(todo), step):
        part = todo[lo:lo + step]
        mods = [build() for *_, build in part]
        for m in mods:
            if hasattr(m, "taps_enabled"):
                m.taps_enabled = False
        qs = [make_query(m, shape) for m in mods]
        if paired:
            samples = estimator.latency_samples([ref_q, *qs])
            ref_s = samples[ref_q.key]
            ref = float(statistics.median(ref_s))
        else:
            ms = estimator.latencies([ref_q, *qs])
            ref = float(ms[ref_q.key])
        refs.append(ref)
        for (label, seg_key, alt_key, _), q in zip(part, qs):
            if paired:
                alt_s = samples[q.key]
                rounds = min(len(ref_s), len(alt_s))
                r_ref, r_alt = per_round_means(ref_s[:rounds], rounds), per_round_means(alt_s[:rounds], rounds)
                value = float(statistics.median((a - b) / a for a, b in zip(r_ref, r_alt) if a > 0))
            else:
                value = (ref - float(ms[q.key])) / ref if ref > 0 else 0.0
            rel[saving_key(seg_key, alt_key)] = (value, seg_key, alt_key, label)
        del mods, qs
    overall = float(statistics.median(refs)) if refs else 0.0
    savings = {k: SavingEntry(ms=v * overall, segment=sk, alternative=ak, label=label, reference_ms=overall)
               for k, (v, sk, ak, label) in rel.items()}
    return savings, refs
