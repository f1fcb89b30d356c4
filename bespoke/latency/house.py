"""A model house's latencies: rebuilding its modules to profile them into a lookup table, and
:func:`house_latencies`, the one place that assembles the teacher, segment and alternative
latencies the search uses (with a table's in-context savings and calibration applied)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from bespoke.errors import UsageError
from bespoke.latency.measure import ProfileItem, measure_replace_one, profile_modules
from bespoke.latency.signature import make_query, module_signature
from bespoke.latency.table import Calibration, LatencyTable, SavingEntry, saving_key
from bespoke.student import deployed
from bespoke.types import DeviceInfo, LatencyEstimator, LatencyQuery

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class HouseModules:
    """A house's teacher, segments and alternatives as runnable modules, for timing.

    Latency does not depend on weights, so the teacher is built with random weights and the
    alternatives are rebuilt from their specs through their block sources without loading theirs.
    """

    teacher: ProfileItem
    segments: dict[str, ProfileItem]  # segment id -> the teacher's segment
    alternatives: dict[str, ProfileItem]  # alternative id -> the alternative
    alt_segment: dict[str, str]  # alternative id -> segment id
    skipped: dict[str, str]  # alternative id -> why it could not be rebuilt
    partition: Any = None  # the teacher's Partition (to assemble replace-one models)
    segment_infos: dict[str, Any] | None = None  # segment id -> SegmentInfo

    def items(self) -> list[ProfileItem]:
        return list(self.segments.values()) + list(self.alternatives.values())


def house_modules(house: Any, registry: Any, cfg: Any = None, *, batch: int = 1,
                  size: int | None = None) -> HouseModules:
    """Rebuild everything of ``house`` that has a latency (failed alternatives are skipped), at
    input resolution ``size`` (default: the teacher's own)."""
    from bespoke.blocks import Context
    from bespoke.distill import source_for
    from bespoke.models import load_model
    from bespoke.partition import Partition

    if cfg is None:
        from bespoke.config import RunConfig

        cfg = RunConfig()
    t = house.manifest.teacher
    size = int(size or t.input_size)
    model = load_model(t.name, weights=None, classes=t.num_classes).eval()
    partition = Partition.from_model(model, (1, 3, t.input_size, t.input_size), name=t.name)
    if size != t.input_size:
        partition = partition.resized(size)
    ctx = Context(partition, t.name, (3, size, size), calibration=None, donor_weights=None, seed=cfg.seed)
    segments: dict[str, ProfileItem] = {}
    infos: dict[str, Any] = {}
    for seg in house.manifest.segments:
        info = partition.segment(seg.start, seg.end)
        shape = (batch, *tuple(info.in_shape)[1:])
        segments[info.id] = ProfileItem(f"segment {info.id}", partition.extract(info), shape, "segment")
        infos[info.id] = info
    sources: dict[str, Any] = {}
    alternatives: dict[str, ProfileItem] = {}
    alt_segment: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for rec in house.manifest.alternatives:
        if rec.status == "failed":
            skipped[rec.id] = f"failed in the build: {rec.reason or 'no reason recorded'}"
            continue
        seg = house.segment(rec.segment)
        info = partition.segment(seg.start, seg.end)
        try:
            source = source_for(rec.source, sources, cfg, registry)
            module = source.rebuild(ctx, info, rec.spec).eval()
        except Exception as exc:  # one alternative that cannot be rebuilt must not stop the rest
            skipped[rec.id] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        alternatives[rec.id] = ProfileItem(rec.id, module, segments[info.id].input_shape, "alternative")
        alt_segment[rec.id] = info.id
    teacher = ProfileItem(t.name, deployed(partition), (batch, 3, size, size), "teacher")  # as students ship
    return HouseModules(teacher, segments, alternatives, alt_segment, skipped, partition, infos)


def house_replace_one(mods: HouseModules, estimator: LatencyEstimator, *, chunk: int = 16) -> dict[str, SavingEntry]:
    """In-context (replace-one) savings of every alternative of a house: the teacher assembled
    with nothing replaced against the teacher assembled with each alternative in place."""
    from bespoke.student import assemble

    part = mods.partition
    if part is None or not mods.segment_infos:
        raise UsageError("replace-one savings need the house's partition (build the modules with house_modules)")
    shape = mods.teacher.input_shape
    reference = deployed(part)
    todo = []
    for alt_id, item in mods.alternatives.items():
        seg_id = mods.alt_segment[alt_id]
        seg_item = mods.segments[seg_id]
        info = mods.segment_infos[seg_id]
        todo.append((alt_id, module_signature(seg_item.module, seg_item.input_shape),
                     module_signature(item.module, item.input_shape),
                     lambda info=info, m=item.module: assemble(part, [(info, m)])))
    savings, _ = measure_replace_one(reference, todo, estimator, shape, chunk=chunk)
    return savings


def profile_house(house: Any, estimator: LatencyEstimator, registry: Any, cfg: Any = None, *,
                  batch: int = 1, in_context: bool | None = None,
                  size: int | None = None) -> tuple[LatencyTable, HouseModules]:
    """Measure every alternative and teacher segment of ``house`` (and the teacher) into a LUT,
    at input resolution ``size`` (default: the teacher's own).

    ``in_context`` (default: the estimator's ``in_context`` option, else off) also measures each
    alternative's replace-one saving end to end (:func:`house_replace_one`): one whole-model
    timing per alternative, which is what makes predictions match measured students.
    """
    mods = house_modules(house, registry, cfg, batch=batch, size=size)
    table = profile_modules(mods.items(), estimator, teacher=mods.teacher,
                            notes={"house": str(getattr(house, "root", "")),
                                   "teacher": house.manifest.teacher.name,
                                   "input_size": int(size or house.manifest.teacher.input_size)})
    if in_context is None:
        in_context = bool(getattr(getattr(estimator, "options", None), "in_context", False))
    if in_context and mods.alternatives:
        table.savings = house_replace_one(mods, estimator)
    return table, mods


@dataclass
class HouseLatencies:
    """What the search needs: the teacher's, each segment's and each alternative's latency.

    From a lookup table with a calibration, ``teacher_ms`` and every ``segment ms - alternative
    ms`` are in calibrated milliseconds; ``calibration`` is the one applied (None: none was).
    """

    teacher_ms: float
    segment_ms: dict[str, float]  # segment id -> ms
    alt_ms: dict[str, float]  # alternative id -> ms
    device: DeviceInfo
    calibration: Calibration | None = None


def house_latencies(house: Any, partition: Any, estimator: LatencyEstimator,
                    load_alternative: Callable[[Any], "nn.Module"], *,
                    alternatives: Iterable[Any] | None = None, batch: int = 1,
                    calibrate: bool = True) -> HouseLatencies:
    """Ask ``estimator`` for every latency of ``house`` in one call (one interleaved session for
    a measuring estimator), at the input size ``partition`` was built for.

    ``partition``: the teacher's :class:`bespoke.partition.Partition` at the wanted input size
    (``Partition.from_model(...).resized(size)``); its model is timed as the teacher and its
    segments at the house's cut points as the segments. ``load_alternative(record)``: the
    alternative of that :class:`bespoke.house.AlternativeRecord` as a runnable module.
    ``alternatives``: the records to include (default: the house's trained ones). ``batch``: the
    batch size of every query.

    When ``estimator`` answers from a lookup table (it has a ``table``, as :class:`LutLatency`
    does), the table's in-context savings replace ``segment ms - alternative ms`` where it has
    them, and with ``calibrate`` its calibration is folded in (:func:`table_latencies`), so an
    additive search sees calibrated milliseconds.
    """
    records = list(house.by_status("trained") if alternatives is None else alternatives)
    queries: dict[str, LatencyQuery] = {}  # one query per signature: identical pieces timed once

    def ask(module: "nn.Module", shape: tuple[int, ...]) -> str:
        q = make_query(module, shape)
        queries.setdefault(q.key, q)
        return q.key

    def at_this_size(segment_id: str) -> Any:  # the house's segment, its shapes at this size
        stored = house.segment(segment_id)
        return partition.segment(stored.start, stored.end)

    seg_key: dict[str, str] = {}
    for stored in house.manifest.segments:
        seg = at_this_size(stored.id)
        seg_key[seg.id] = ask(partition.extract(seg), (batch, *tuple(seg.in_shape)[1:]))
    alt_key: dict[str, str] = {}
    alt_segment: dict[str, str] = {}
    for rec in records:
        seg = at_this_size(rec.segment)
        alt_key[rec.id] = ask(load_alternative(rec), (batch, *tuple(seg.in_shape)[1:]))
        alt_segment[rec.id] = seg.id
    # the teacher as students ship (flat graph, in place), so that savings are the replacements';
    # a table profiled before 2026-12-03 holds the teacher's eager module instead, and answers for it
    shape = (batch, *tuple(partition.input_shape)[1:])
    table = getattr(estimator, "table", None)
    teacher = deployed(partition)
    if isinstance(table, LatencyTable) and table.get_ms(make_query(teacher, shape).key) is None \
            and table.get_ms(make_query(partition.model, shape).key) is not None:
        teacher = partition.model
    teacher_key = ask(teacher, shape)
    ms = estimator.latencies(list(queries.values()))
    teacher_ms = ms[teacher_key]
    segment_ms = {k: ms[v] for k, v in seg_key.items()}
    alt_ms = {k: ms[v] for k, v in alt_key.items()}
    calibration = None
    if isinstance(table, LatencyTable):
        teacher_ms, alt_ms = table_latencies(table, teacher_ms, segment_ms, alt_ms, segment_key=seg_key,
                                             alt_key=alt_key, alt_segment=alt_segment, calibrate=calibrate)
        calibration = table.calibration if calibrate else None
    return HouseLatencies(teacher_ms=teacher_ms, segment_ms=segment_ms, alt_ms=alt_ms,
                          device=estimator.device(), calibration=calibration)


def table_latencies(table: LatencyTable, teacher_ms: float, segment_ms: dict[str, float],
                    alt_ms: dict[str, float], *, segment_key: dict[str, str], alt_key: dict[str, str],
                    alt_segment: dict[str, str], calibrate: bool = True) -> tuple[float, dict[str, float]]:
    """``(teacher_ms, alt_ms)`` as an additive search should see a LUT's answers: the table's
    in-context savings where it has them, then its calibration folded in (see
    :func:`calibrate_problem`): the teacher becomes ``a*T + b`` and each alternative's latency is
    set so that its saving becomes ``a*s - c``. Budgets and reported latencies are then calibrated.

    ``segment_key``: segment id -> signature; ``alt_key``: alternative id -> signature;
    ``alt_segment``: alternative id -> segment id. :func:`house_latencies` calls it; it is public
    for callers that already hold a table's raw answers.
    """
    alt = dict(alt_ms)
    if table.savings:
        alt = in_context_alt_ms(table, segment_ms, alt, {k: segment_key[alt_segment[k]] for k in alt_key},
                                alt_key, alt_segment)
    cal = table.calibration if calibrate else None
    if cal is None:
        return teacher_ms, alt
    out = {}
    for k, v in alt.items():
        seg = segment_ms[alt_segment[k]]
        out[k] = seg - (cal.a * (seg - v) - cal.c)
    return cal.apply(teacher_ms, 0), out


def in_context_alt_ms(table: LatencyTable, segment_ms: dict[str, float], alt_ms: dict[str, float],
                      alt_segment_key: dict[str, str], alt_key: dict[str, str],
                      alt_segment: dict[str, str]) -> dict[str, float]:
    """Alternative latencies that make ``segment ms - alternative ms`` equal the table's
    in-context (replace-one) saving wherever it has one, so additive consumers (the search)
    use in-context savings unchanged. Alternatives without one keep their own latency."""
    out = dict(alt_ms)
    for alt, key in alt_key.items():
        entry = table.savings.get(saving_key(alt_segment_key[alt], key))
        if entry is not None:
            out[alt] = segment_ms[alt_segment[alt]] - entry.ms
    return out
