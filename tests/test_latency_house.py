"""bespoke.latency.house_latencies: the one place a house's latencies are assembled for the search."""

from __future__ import annotations

import pytest
from torch import nn

from bespoke.latency import (
    Calibration, LatencyTable, LutEntry, LutLatency, SavingEntry, TeacherLatency, house_latencies,
    make_query, saving_key,
)
from test_latency import _teacher_module, _tiny_house, device


class Recording:
    """A measuring estimator stand-in: 1 ms plus 1 ms per conv per 16 px of input width; every
    call's queries are kept."""

    def __init__(self):
        self.calls = []

    def device(self):
        return device()

    @staticmethod
    def ms(module, shape):
        return 1.0 + sum(isinstance(m, nn.Conv2d) for m in module.modules()) * shape[-1] / 16

    def latencies(self, queries):
        self.calls.append(list(queries))
        return {q.key: self.ms(q.module, q.input_shape) for q in queries}


def _house_and_partition(tmp_path, monkeypatch, size=32):
    from bespoke.house import AlternativeRecord
    from bespoke.partition import Partition

    house = _tiny_house(tmp_path, monkeypatch)
    first = house.manifest.alternatives[0]
    # an alternative that failed in the build has no latency to ask for
    house.manifest.alternatives.append(AlternativeRecord(id="broken", segment=first.segment, source="skip",
                                                         spec=first.spec, status="failed"))
    model = _teacher_module(tmp_path, monkeypatch)
    part = Partition.from_model(model, (1, 3, 32, 32))
    return house, (part.resized(size) if size != 32 else part)


def test_house_latencies_ask_once_for_every_piece_at_the_wanted_size(tmp_path, monkeypatch):
    house, part = _house_and_partition(tmp_path, monkeypatch, size=48)
    est = Recording()
    loaded = []
    lat = house_latencies(house, part, est, lambda rec: loaded.append(rec.id) or nn.Identity())
    trained = [a.id for a in house.by_status("trained")]
    assert loaded == trained and "broken" not in lat.alt_ms
    assert len(est.calls) == 1  # one interleaved session for everything
    keys = [q.key for q in est.calls[0]]
    # b2 and b3 (and their skips) are one architecture on one shape: timed once
    assert len(keys) == len(set(keys)) < 1 + len(house.manifest.segments) + len(trained)
    assert lat.teacher_ms == Recording.ms(part.model, (1, 3, 48, 48)) == 1.0 + 4 * 3
    assert set(lat.segment_ms) == {s.id for s in house.manifest.segments}
    for stored in house.manifest.segments:  # the segment at 48 px, not at the house's 32
        seg = part.segment(stored.start, stored.end)
        assert lat.segment_ms[stored.id] == Recording.ms(part.extract(seg), tuple(seg.in_shape))
    assert lat.alt_ms == {a: 1.0 for a in trained}  # a skip has no conv
    assert lat.device == device() and lat.calibration is None
    # the batch of every query, and a chosen subset of alternatives
    est2 = Recording()
    one = house.by_status("trained")[:1]
    lat2 = house_latencies(house, part, est2, lambda rec: nn.Identity(), alternatives=one, batch=2)
    assert set(lat2.alt_ms) == {one[0].id} and {q.input_shape[0] for q in est2.calls[0]} == {2}


def test_house_latencies_from_a_table_use_its_in_context_savings_and_calibration(tmp_path, monkeypatch):
    house, part = _house_and_partition(tmp_path, monkeypatch)
    alts = house.by_status("trained")
    seg_key, alt_key = {}, {}
    for stored in house.manifest.segments:
        seg = part.segment(stored.start, stored.end)
        seg_key[stored.id] = make_query(part.extract(seg), (1, *seg.in_shape[1:])).key
    for rec in alts:
        seg = house.segment(rec.segment)
        alt_key[rec.id] = make_query(nn.Identity(), (1, *seg.in_shape[1:])).key
    teacher_key = make_query(part.model, (1, 3, 32, 32)).key
    entries = {k: LutEntry(ms=2.0) for k in seg_key.values()}
    entries.update({k: LutEntry(ms=0.5) for k in alt_key.values()})
    with_saving = alts[0]
    skey = saving_key(seg_key[with_saving.segment], alt_key[with_saving.id])
    table = LatencyTable(device=device(), teacher=TeacherLatency(key=teacher_key, ms=10.0), entries=entries,
                         savings={skey: SavingEntry(ms=1.2, segment=seg_key[with_saving.segment],
                                                    alternative=alt_key[with_saving.id])})
    lut = LutLatency(table=table)

    def saving(lat, rec):
        return lat.segment_ms[rec.segment] - lat.alt_ms[rec.id]

    raw = house_latencies(house, part, lut, lambda rec: nn.Identity())
    assert raw.teacher_ms == 10.0 and raw.calibration is None
    for rec in alts:  # in context where the table has it (and every identical pair shares it)
        want = 1.2 if alt_key[rec.id] == alt_key[with_saving.id] and seg_key[rec.segment] == seg_key[with_saving.segment] else 1.5
        assert saving(raw, rec) == pytest.approx(want)
    table.calibration = Calibration(a=0.8, b=1.0, c=0.25)
    cal = house_latencies(house, part, lut, lambda rec: nn.Identity())
    assert cal.calibration == table.calibration and cal.teacher_ms == pytest.approx(0.8 * 10.0 + 1.0)
    for rec in alts:  # each saving becomes a * s - c, so the search stays additive in calibrated ms
        assert saving(cal, rec) == pytest.approx(0.8 * saving(raw, rec) - 0.25)
    off = house_latencies(house, part, lut, lambda rec: nn.Identity(), calibrate=False)
    assert off.teacher_ms == 10.0 and off.alt_ms == raw.alt_ms and off.calibration is None
