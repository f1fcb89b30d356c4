"""bespoke.student over many timm families (random weights, 64 px): assembly, training,
save/reload through block sources, ONNX export."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from torch import nn

from _families import FAMILIES, INPUT_SHAPE, example, model_ref, skip_segment, teacher
from bespoke import AlternativeSpec, PluginRecord, UsageError, hookimpl
from bespoke.plugins import get_registry, load_registry
from bespoke.student import (
    Student,
    StudentChoice,
    StudentRecipe,
    assemble,
    export_onnx,
    load_student,
    save_student,
)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class _SelfCopy:
    """In-test block source: the teacher's own segment (what a house would hold untrained)."""

    def propose(self, ctx, segment):
        return [AlternativeSpec(source="self-copy", kind="self", label="self")]

    def create(self, ctx, segment, spec):
        return copy.deepcopy(ctx.teacher.extract(segment)), spec

    def rebuild(self, ctx, segment, spec):
        return copy.deepcopy(ctx.teacher.extract(segment))


def _self_copy_plugin():
    @hookimpl
    def register_block_sources(register):
        register(PluginRecord(name="self-copy", category="block-source", factory=lambda o: _SelfCopy()))

    return types.SimpleNamespace(__name__="test-self-copy", register_block_sources=register_block_sources)


@pytest.fixture(scope="module")
def registry():
    return load_registry(extra_plugins=[_self_copy_plugin()])


def _chained(part, seed=0):
    """Two adjacent segments with compute (the first's end is the second's start) + a third."""
    segs = [s for s in part.sample_segments(30, max_fraction=0.2, seed=seed)]
    for a in segs:
        for b in segs:
            if b.start == a.end:
                rest = [c for c in segs if not c.overlaps(a) and not c.overlaps(b)]
                return [a, b] + rest[:1]
    raise AssertionError("no adjacent segments sampled")


@pytest.mark.parametrize("name", FAMILIES)
def test_teacher_own_segments_reproduce_teacher_exactly(name):
    part = teacher(name)
    segs = _chained(part)
    student = assemble(part, [(s, part.extract(s)) for s in segs])
    x = example()
    with torch.no_grad():
        want = part.model(x)
        got = student(x)
        acts = part.activations(x, [s.end for s in segs])
    assert torch.equal(got, want)
    assert sorted(student.replaced_outputs) == sorted(s.id for s in segs)
    for s in segs:
        assert torch.equal(student.replaced_outputs[s.id], acts[s.end])
    # the student owns its weights: teacher params are not shared
    teacher_ptrs = {p.data_ptr() for p in part.model.parameters()}
    assert not any(p.data_ptr() in teacher_ptrs for p in student.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_skip_student_runs_and_is_smaller(name):
    part = teacher(name)
    seg = skip_segment(part)
    assert seg is not None, "every family here has a residual block"
    src = get_registry().instantiate("skip")
    specs = src.propose(None, seg)
    assert [s.kind for s in specs] == ["skip"]
    module, spec = src.create(None, seg, specs[0])
    student = assemble(part, [(seg, module)])
    with torch.no_grad():
        out = student(example())
    assert out.shape == (2, *part.cut_points[-1].shape[1:])
    assert _params(student) < _params(part.model)
    assert torch.equal(student.replaced_outputs[seg.id], part.activations(example(), [seg.start])[seg.start])


def test_student_forward_calls_the_same_modules_under_flat_names():
    """Student.forward runs a flat view of its graph (no getattr chains): the same module
    objects, outside the state dict, and it follows training, copies and dtype moves."""
    part = teacher("resnet18")
    seg = skip_segment(part)
    student = assemble(part, [(seg, nn.Identity())])
    x = example()
    with torch.no_grad():
        student(x)  # the view is built on the first forward
    flat = student._flat[False]  # taps on: the out-of-place view
    assert flat is not None and not any(k.startswith("_flat") for k in student.state_dict())
    hier = dict(student.net.named_modules())
    for name, mod in flat.named_children():
        assert any(mod is m for m in hier.values()), name
    with torch.no_grad(), student.taps(False):  # taps off: in place where the teacher is
        torch.testing.assert_close(student(x), student.net(x), rtol=0, atol=0)
    inplace = student._flat[True]
    own = {id(p) for p in student.parameters()}
    assert all(id(p) in own for p in inplace.parameters())  # copies of activations only, same weights
    assert any(name.endswith("__inplace") for name, _ in inplace.named_children())
    with torch.no_grad():
        torch.testing.assert_close(student(x), student.net(x), rtol=0, atol=0)
        for p in student.parameters():  # a change made through the registered modules shows
            p.mul_(0.5)
        torch.testing.assert_close(student(x), student.net(x), rtol=0, atol=0)
    twin = copy.deepcopy(student).double()
    assert all(a is not b for a, b in zip(twin.parameters(), student.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(twin(x.double()), twin.net(x.double()), rtol=0, atol=0)
    twin.replaced_outputs = {}
    with torch.no_grad():
        twin(x.double())
    assert twin.replaced_outputs[seg.id].dtype == torch.float64  # the taps (hooks) fired through the view
    # a module swapped into the graph after assembly is what runs next (no stale view)
    name = f"seg_{seg.start}_{seg.end}"
    doubled = nn.Sequential(nn.Identity())
    doubled.register_forward_hook(lambda m, a, out: out * 2)
    setattr(twin.net.alternatives, name, doubled)
    with torch.no_grad():
        torch.testing.assert_close(twin(x.double()), twin.net(x.double()), rtol=0, atol=0)
        assert twin._flat[False].get_submodule(f"m_alternatives__{name}") is doubled


def test_skip_proposes_nothing_when_shapes_differ():
    part = teacher("resnet18")
    seg = next(s for s in part.enumerate_segments(6) if s.in_shape != s.out_shape)
    assert get_registry().instantiate("skip").propose(None, seg) == []


def _pruned(part, name, seed=0):
    """A pruned-self alternative for some sampled segment, or skip the test."""
    from bespoke.blocks import Context

    reg = get_registry()
    if "pruned-self" not in reg.records:
        pytest.skip("pruned-self is not installed")
    ctx = Context(part, model_ref(name), INPUT_SHAPE[1:], calibration=None, donor_weights=None)
    src = reg.instantiate("pruned-self")
    for seg in part.sample_segments(12, seed=seed):
        specs = src.propose(ctx, seg)
        if specs:
            module, spec = src.create(ctx, seg, specs[-1])
            return seg, module, spec
    pytest.skip(f"pruned-self proposed nothing for the sampled segments of {name}")


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_student_runs_and_is_smaller(name):
    part = teacher(name)
    seg, module, spec = _pruned(part, name)
    student = assemble(part, [(seg, module)])
    with torch.no_grad():
        out = student(example())
    assert out.shape == (2, *part.cut_points[-1].shape[1:])
    assert _params(student) < _params(part.model)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_reload_round_trips_bit_exactly(name, registry, tmp_path):
    part = teacher(name)
    seg_skip = skip_segment(part)
    own = [s for s in part.sample_segments(20, seed=5) if not s.overlaps(seg_skip)][0]
    choices = [(seg_skip, nn.Identity()), (own, part.extract(own))]
    student = assemble(part, choices)
    with torch.no_grad():  # move the weights off the teacher's, so reloading must load them
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    recipe = StudentRecipe(
        teacher=model_ref(name), input_size=INPUT_SHAPE[1:],
        choices=[StudentChoice(segment=seg_skip, spec=AlternativeSpec(source="skip", kind="skip", label="skip")),
                 StudentChoice(segment=own, spec=AlternativeSpec(source="self-copy", kind="self", label="self"),
                               alternative_id="a1")])
    save_student(student, recipe, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "recipe.json").read_text())["schema_version"] == 1
    again = load_student(tmp_path / "s", registry=registry)
    assert isinstance(again, Student)
    assert again.recipe == recipe
    sd_a, sd_b = student.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x = example()
    with torch.no_grad():
        assert torch.equal(student(x), again(x))


def test_pruned_round_trip_through_the_plugin(tmp_path):
    name = "resnet18"
    part = teacher(name)
    seg, module, spec = _pruned(part, name)
    student = assemble(part, [(seg, module)])
    recipe = StudentRecipe(teacher=name, input_size=INPUT_SHAPE[1:],
                           choices=[StudentChoice(segment=seg, spec=spec)])
    save_student(student, recipe, tmp_path)
    again = load_student(tmp_path)
    x = example()
    with torch.no_grad():
        assert torch.equal(student(x), again(x))


def test_load_student_errors_are_clear(tmp_path, registry):
    with pytest.raises(UsageError, match="recipe.json is missing"):
        load_student(tmp_path)
    part = teacher("resnet18")
    seg = skip_segment(part)
    student = assemble(part, [(seg, nn.Identity())])
    recipe = StudentRecipe(teacher="resnet18", input_size=INPUT_SHAPE[1:],
                           choices=[StudentChoice(segment=seg, spec=AlternativeSpec(source="skip", kind="skip", label="skip"))])
    save_student(student, recipe, tmp_path)
    data = json.loads((tmp_path / "recipe.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="schema_version 99"):
        load_student(tmp_path, registry=registry)
    with pytest.raises(UsageError, match="not the student's"):
        save_student(student, StudentRecipe(teacher="resnet18", input_size=INPUT_SHAPE[1:]), tmp_path / "x")


def test_overlapping_choices_are_refused():
    part = teacher("resnet18")
    a, b = part.segment(2, 6), part.segment(4, 9)
    with pytest.raises(UsageError, match="overlap"):
        assemble(part, [(a, part.extract(a)), (b, part.extract(b))])


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_student_trains(name):
    part = teacher(name)
    seg = skip_segment(part)
    own = [s for s in part.sample_segments(20, seed=2) if not s.overlaps(seg)][0]
    student = assemble(part, [(own, copy.deepcopy(part.extract(own))), (seg, nn.Identity())])
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    x = example()
    with torch.no_grad():
        target = part.model(x)
    before = [p.detach().clone() for p in student.alternative(own.id).parameters()]
    out = student(x)
    loss = (out - target).pow(2).mean() + student.replaced_outputs[own.id].pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in student.alternative(own.id).parameters() if p.requires_grad)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.alternative(own.id).parameters()))
    # the teacher did not move
    with torch.no_grad():
        assert torch.equal(part.model(x), target)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_matches_pytorch(name, tmp_path):
    pytest.importorskip("onnxruntime")
    part = teacher(name)
    seg = skip_segment(part)
    own = [s for s in part.sample_segments(20, seed=4) if not s.overlaps(seg)][0]
    student = assemble(part, [(seg, nn.Identity()), (own, part.extract(own))])
    diff = export_onnx(student, tmp_path / "student.onnx", INPUT_SHAPE)
    assert diff is not None and diff < 1e-4
    assert student.taps_enabled  # export switched taps off only while exporting
