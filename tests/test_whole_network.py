"""``build.whole_sources``: the whole network (image to logits) as one more segment, offered to the
named block sources only; a student may then be a donor whole, distilled from the teacher."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_cli  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def _cfg(tmp_path, **build):
    from bespoke.config import apply_preset, load_config
    from bespoke.plugins import get_registry

    return apply_preset(load_config(None, {"preset": "tiny", "out": str(tmp_path / "out"), "budgets": [0.5],
                                           "build": {"epochs": 1, **build}}), get_registry())


def test_the_whole_network_segment_goes_to_the_named_sources_only_and_its_donor_student_round_trips(tmp_path,
                                                                                                    monkeypatch):
    from bespoke import load_student, pipeline
    from bespoke.partition import Partition
    from bespoke.plugins import get_registry
    from bespoke.student import StudentChoice, StudentRecipe, assemble, save_student
    from bespoke.distill import source_for
    from bespoke.blocks import Context
    from bespoke import tiny

    from bespoke.distill import training  # where train_bunch makes each bunch's optimiser

    made = []  # each bunch's optimiser: the whole donor trains at a fine-tuning rate, in a group of its own
    real = training._optimizer
    monkeypatch.setattr(training, "_optimizer", lambda params, lr: made.append(real(params, lr)) or made[-1])
    cfg = _cfg(tmp_path, whole_sources=["timm-donors"])
    reg = get_registry()
    house = pipeline.build(cfg, reg)
    teacher = tiny.teacher()
    size = tiny.INPUT_SIZE
    partition = Partition.from_model(teacher, (1, 3, size, size), name=cfg.teacher)
    whole = partition.whole_segment()
    assert (whole.start, whole.end) == (0, len(partition.cut_points) - 1)
    assert whole.id in {s.id for s in house.manifest.segments}
    on_whole = [a for a in house.manifest.alternatives if a.segment == whole.id]
    assert on_whole and {a.source for a in on_whole} == {"timm-donors"}  # pruned-self and lowrank were not asked
    others = {a.source for a in house.manifest.alternatives if a.segment != whole.id}
    assert {"pruned-self", "timm-donors"} <= others  # every source still proposes for the other segments
    (rec,) = [a for a in on_whole if a.status == "trained"]
    def stage_long(a):  # a donor piece from the input to where stages meet, or from there to the output
        s, e = (int(x) for x in a.segment.split("-"))
        return a.source == "timm-donors" and partition.is_stitched(partition.segment(s, e))

    assert rec.spec.lr_scale == 0.1
    assert {a.spec.lr_scale for a in house.manifest.alternatives if a is not rec and not stage_long(a)} == {1.0}
    assert {a.spec.lr_scale for a in house.manifest.alternatives if a is not rec and stage_long(a)} <= {0.1}
    lrs = sorted({g["lr"] for opt in made for g in opt.param_groups})
    assert lrs == pytest.approx([0.1 * cfg.build.lr, cfg.build.lr])
    whole_params = {id(p) for opt in made for g in opt.param_groups if g["lr"] < cfg.build.lr for p in g["params"]}
    slow = [a for a in house.manifest.alternatives if a.spec.lr_scale < 1 and a.status == "trained"]
    assert rec in slow and len(whole_params) == sum(  # the whole donor and stage-long pieces, nothing else
        sum(1 for _ in house.load_alternative(a.id, Context(partition, cfg.teacher, (3, size, size)),
                                              source_for(a.source, reg.block_sources(cfg), cfg, reg)).parameters())
        for a in slow)

    # the student made of the donor alone: it runs, is cheaper than the teacher, saves and reloads
    ctx = Context(partition, cfg.teacher, (3, size, size), calibration=torch.randn(4, 3, size, size))
    module = house.load_alternative(rec.id, ctx, source_for(rec.source, reg.block_sources(cfg), cfg, reg))
    # exactly the donor (its weights distilled): no adapter in the way, the donor's every tensor
    assert isinstance(module.in_adapter, torch.nn.Identity) and isinstance(module.out_adapter, torch.nn.Identity)
    donor = tiny.donor()
    assert sorted(p.shape for p in module.parameters()) == sorted(p.shape for p in donor.parameters())
    student = assemble(partition, [(whole, module)])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = student.eval()(x)
        assert y.shape == (2, 1000) and torch.allclose(y, module(x), atol=1e-5)  # nothing of the teacher left
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    recipe = StudentRecipe(teacher=cfg.teacher, input_size=(3, size, size),
                           choices=[StudentChoice(segment=whole, spec=rec.spec, alternative_id=rec.id)])
    saved = save_student(student, recipe, tmp_path / "student")
    with torch.no_grad():
        assert torch.allclose(load_student(saved).eval()(x), y, atol=1e-5)


def test_without_whole_sources_there_is_no_whole_network_segment(tmp_path):
    from bespoke import tiny
    from bespoke.partition import Partition
    from bespoke.stages.build import draw_segments

    cfg = _cfg(tmp_path)
    size = tiny.INPUT_SIZE
    partition = Partition.from_model(tiny.teacher(), (1, 3, size, size), name=cfg.teacher)
    whole = partition.whole_segment().id
    assert whole not in {s.id for s in draw_segments(cfg, partition, _EmptyHouse())}
    with_whole = _cfg(tmp_path, whole_sources=["timm-donors"])
    assert whole in {s.id for s in draw_segments(with_whole, partition, _EmptyHouse())}


class _EmptyHouse:
    class manifest:  # noqa: N801 - a new house's manifest: no segments yet
        segments: list = []


def test_whole_sources_naming_a_source_the_run_does_not_use_is_a_clear_error(tmp_path):
    from bespoke.config import whole_sources
    from bespoke.errors import UsageError

    cfg = _cfg(tmp_path, whole_sources=["timm-donors", "no-such-source"])
    with pytest.raises(UsageError, match="'no-such-source', not among this run's block sources"):
        whole_sources(cfg)
    assert whole_sources(_cfg(tmp_path)) is None
    assert whole_sources(_cfg(tmp_path, whole_sources=["timm-donors"])) == {"timm-donors"}

    conf = tmp_path / "run.yaml"
    conf.write_text("preset: tiny\nbuild:\n  whole_sources: [skipp]\n")
    proc = run_cli("run", str(conf), "--out", str(tmp_path / "cli"), env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "whole_sources" in proc.stderr + proc.stdout and "skipp" in proc.stderr + proc.stdout


@pytest.mark.parametrize("halving", [0, 32])
def test_a_donor_offered_whole_stops_at_its_image_cap_and_the_others_train_on(tmp_path, halving):
    """timm-donors' whole_max_images becomes the whole donor's max_images: it stops there (a
    round of its own, halving or not), profiled and kept; every other alternative sees every
    image of the build's epochs."""
    from bespoke import pipeline
    from bespoke.config import apply_preset, load_config
    from bespoke.plugins import get_registry

    reg = get_registry()
    cfg = apply_preset(load_config(None, {
        "preset": "tiny", "out": str(tmp_path / "out"), "budgets": [0.5],
        "build": {"epochs": 3, "whole_sources": ["timm-donors"], "halving": halving, "steps_per_epoch": 2,
                  "batch_size": 8},
        "plugin_options": {"timm-donors": {"whole_max_images": 20}}}), reg)
    house = pipeline.build(cfg, reg)
    by_segment = {}
    for a in house.manifest.alternatives:
        by_segment.setdefault(a.segment, []).append(a)
    last = max(s.end for s in house.manifest.segments)
    (whole,) = by_segment[f"0-{last}"]
    assert whole.spec.max_images == 20 and whole.status == "trained"
    assert 20 <= whole.images < 20 + 8 and "image cap" in (whole.stopped or "")  # 3 steps of 8: 24 images
    full = [a for a in house.manifest.alternatives if a is not whole and a.status == "trained" and not a.stopped]
    assert full and all(a.images == 3 * 2 * 8 for a in full)


# --------------------------------------------------------------------------------------------
# Stitched stages (build.stitch_sources)
# --------------------------------------------------------------------------------------------


def test_stitch_points_are_where_stages_meet_at_a_block_output():
    from bespoke import tiny
    from bespoke.partition import Partition

    part = Partition.from_model(tiny.teacher(), (1, 3, 64, 64))
    points = part.stitch_points()
    strides = [part.cut_points[k].stride for k in points]
    assert strides == sorted(set(strides)) and len(points) >= 3  # one per stride, the last stride left out
    last = len(part.cut_points) - 1
    for k in points:  # the smallest activation at its stride: a block's output, not an expanded one
        same = [j for j in range(1, last) if part.cut_points[j].stride == part.cut_points[k].stride]
        size = lambda j: torch.Size(part.cut_points[j].shape[1:]).numel()  # noqa: E731
        assert size(k) == min(size(j) for j in same)
    segs = part.stitched_segments()
    assert {(s.start, s.end) for s in segs} == {p for k in points for p in ((0, k), (k, last))}
    mid = part.stitched_segments((0.3, 0.65))  # the default span: neither a few early blocks nor near-whole
    assert mid and all(0.3 * last <= s.end - s.start <= 0.65 * last for s in mid) and len(mid) < len(segs)


def test_stitched_segments_are_offered_to_the_named_sources_only(tmp_path):
    from bespoke.config import load_config
    from bespoke.plugins import get_registry
    from bespoke import pipeline

    cfg = load_config(None, {"preset": "tiny", "out": str(tmp_path / "out"), "house": str(tmp_path / "house"),
                             "build": {"stitch_sources": ["timm-donors"], "stitch_span": [0.0, 1.0], "epochs": 0,
                                       "modules": False, "segments": 0, "tiles": 0}})
    house = pipeline.build(cfg, get_registry())
    segs = {s.id for s in house.manifest.segments}
    from bespoke.models import load_model
    from bespoke.partition import Partition
    from bespoke import tiny

    part = Partition.from_model(load_model(tiny.TEACHER), (1, 3, tiny.INPUT_SIZE, tiny.INPUT_SIZE))
    assert segs == {s.id for s in part.stitched_segments()}
    sources = {a.source for a in house.manifest.alternatives}
    assert sources == {"timm-donors"}
    last = len(part.cut_points) - 1
    for a in house.manifest.alternatives:  # stage-long pretrained pieces: capped, at a fine-tuning rate
        assert a.spec.max_images == 1024 and a.spec.lr_scale == 0.1
        start, end = map(int, a.segment.split("-"))
        assert start == 0 or end == last


def test_stitch_span_must_be_two_ordered_fractions():
    from bespoke.config import load_config
    from bespoke.errors import UsageError

    with pytest.raises((UsageError, ValueError), match="stitch_span"):
        load_config(None, {"build": {"stitch_span": [0.7, 0.3]}})


def test_stitch_sources_must_name_a_block_source_of_the_run():
    from bespoke.config import check_plugin_selection, load_config
    from bespoke.errors import UsageError
    from bespoke.plugins import get_registry

    cfg = load_config(None, {"build": {"stitch_sources": ["timm-donor"]}})
    with pytest.raises(UsageError, match="build.stitch_sources names 'timm-donor'"):
        check_plugin_selection(cfg, get_registry())
