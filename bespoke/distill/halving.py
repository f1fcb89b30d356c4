"""Which alternatives stop training before the image stream ends: successive halving
(:func:`halving_stops`, decided at the ends of the rounds :func:`plan_rounds` cuts the stream
into) and each alternative's image cap (its spec's ``max_images``, :func:`image_cap_stops`)."""

from __future__ import annotations

import math
from typing import Any

from bespoke.distill.jobs import Settings
from bespoke.distill.stream import Stream
from bespoke.house import AlternativeRecord, House


def plan_rounds(stream: Stream, settings: Settings, records: list[AlternativeRecord],
                halving: bool) -> tuple[list[int], set[int]]:
    """The steps of the stream at which the alternatives ``records`` are profiled (a round ends),
    in order, the last the stream's end; and those of them at which halving decides."""
    # halving decides first on the untrained alternatives (step 0), then after every round
    bounds = ([0] if halving else []) + (stream.rounds(settings.halving, settings.halving_eta) if halving
                                         else [stream.total])
    halving_bounds = set(bounds) if halving else set()
    # an alternative's image cap (its spec's max_images) ends a round of its own there
    caps = {min(stream.total, math.ceil(cap / settings.batch_size))
            for cap in (_max_images(rec) for rec in records) if cap and settings.epochs}
    return sorted(set(bounds) | caps), halving_bounds


def image_cap_stops(records: list[AlternativeRecord], info: dict[str, dict], stops: dict[str, str]) -> dict[str, str]:
    """``stops`` with, added, those of ``records`` (profiled; ``info`` holds their saved states'
    JSON) that have seen as many images as their cap."""
    for rec in records:
        cap, seen = _max_images(rec), int(info[rec.id].get("images", 0))
        if cap and seen >= cap and rec.id not in stops:
            stops[rec.id] = f"after {seen:,} images: reached its image cap ({cap:,}, max_images)"
    return stops


def _max_images(rec: Any) -> int | None:
    """An alternative's image cap (its spec's ``max_images``), if it has one."""
    return getattr(getattr(rec, "spec", None), "max_images", None)


def halving_stops(house: House, candidates: list[AlternativeRecord], info: dict[str, dict],
                  settings: Settings, *, first: bool = False) -> dict[str, str]:
    """Which ``candidates`` (profiled at the same step of the stream; ``info`` holds their saved
    states' JSON: ``profile``, ``kl_history``, ``images``) stop training, and why.

    - **No cheaper than the teacher's segment** (FLOPs and parameters both at least the
      segment's): the teacher's own block is better at no more cost; decided before training.
    - **Dominated**: another alternative of the same segment (still training, or finished) has no
      more FLOPs and no more parameters and a replace-one KL lower by more than
      ``settings.halving_margin`` of this one's. Not decided on untrained alternatives
      (``first``): their initialisations differ in kind.
    - **Stalled**: its KL improved by less than ``settings.halving_stall`` (relative) over the last
      round: more images of the same kind will not change its rank much.
    """
    stops: dict[str, str] = {}
    kl: dict[str, float] = {}
    for rec in candidates:
        value = (info.get(rec.id, {}).get("profile") or {}).get("kl")
        if value is not None:
            kl[rec.id] = float(value)
    peers: dict[str, list[tuple[AlternativeRecord, float]]] = {}
    for rec in house.manifest.alternatives:
        value = kl.get(rec.id, rec.kl if rec.status == "trained" else None)
        if value is not None:
            peers.setdefault(rec.segment, []).append((rec, value))
    for rec in candidates:
        if rec.id not in kl:
            continue
        mine, seen = kl[rec.id], int(info.get(rec.id, {}).get("images", 0))
        seg = house.segment(rec.segment)
        after = f"after {seen:,} images: " if seen else "untrained: "
        if seg.flops and seg.params and seg.flops <= rec.flops and seg.params <= rec.params:
            stops[rec.id] = f"{after}no cheaper than the teacher's segment in FLOPs and parameters"
            continue
        if first:
            continue
        better = [(other, v) for other, v in peers.get(rec.segment, []) if other.id != rec.id
                  and other.flops <= rec.flops and other.params <= rec.params
                  and v < mine * (1 - settings.halving_margin)]
        if better:
            other, v = min(better, key=lambda t: t[1])
            stops[rec.id] = f"{after}dominated by {other.id} (KL {v:.3g} against {mine:.3g}, no more FLOPs or parameters)"
            continue
        history = info.get(rec.id, {}).get("kl_history") or []
        if len(history) >= 2 and history[-1] > history[-2] * (1 - settings.halving_stall):
            stops[rec.id] = (f"{after}stalled (KL {history[-2]:.3g} -> {history[-1]:.3g} over the last round, "
                             f"less than {settings.halving_stall:.0%} better)")
    return stops


__all__ = ["halving_stops", "image_cap_stops", "plan_rounds"]
