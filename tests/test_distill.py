"""Building a model house: block-level distillation, failures, resume after SIGKILL, torchrun."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import house_plugin as hp
from bespoke.config import load_config
from bespoke.plugins import load_registry

VENV_BIN = Path(sys.executable).parent
# run-dependent fields, not part of the result
VOLATILE = {"seconds"}


def _build(tmp: Path, house: Path, **build):
    from bespoke import pipeline

    cfg = load_config(None, hp.config(tmp, house, **build))
    return pipeline.build(cfg, load_registry(extra_plugins=[hp]))


def _records(house: Path) -> dict[str, dict]:
    manifest = json.loads((house / "manifest.json").read_text())
    return {a["id"]: {k: v for k, v in a.items() if k not in VOLATILE} for a in manifest["alternatives"]}


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6):
                return False
        elif x != y:
            return False
    return True


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return env


def _kill_when(driver: Path, delay: str, ready, why: str) -> None:
    """Run the build driver slowed by ``TINY_DELAY=delay`` and SIGKILL it once ``ready()``."""
    proc = subprocess.Popen([sys.executable, str(driver)], env=_env(TINY_DELAY=delay),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait()
    assert killed, f"{why}: {proc.stderr.read().decode()[-2000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process build, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("reference")
    house = _build(tmp, tmp / "house")
    return tmp, house


def test_build_tiny_model(reference):
    tmp, house = reference
    alts = house.manifest.alternatives
    assert len(house.manifest.segments) == 3
    assert alts and all(a.status == "trained" for a in alts)
    for a in alts:
        assert a.params > 0 and a.flops > 0 and a.steps == 4  # 2 epochs x 2 steps
        assert a.distill_error is not None and a.distill_error >= 0
        assert 0 <= a.agreement <= 1
        assert a.kl is not None and a.kl >= -1e-9  # a KL divergence, up to rounding
        assert a.top1 is None  # the default sample photos carry no labels
        assert house.weights_path(a.id).is_file()
        assert not house.weights_path(a.id, initial=True).exists()
    assert house.manifest.data["train_images"] > 0
    # with BatchNorm frozen (build.freeze_batchnorm) a copy of the teacher's own segment is the
    # teacher's function: nothing to learn, so it ends where it began (that teacher copies train
    # at all is checked on train_bunch below)
    from safetensors.torch import load_file

    rec = next(a for a in alts if a.spec.kind == "copy")
    assert rec.train_loss == pytest.approx(0.0, abs=1e-10)
    trained = load_file(str(house.weights_path(rec.id)))
    teacher = load_file(str(tmp / "teacher.safetensors"))
    weights = [k for k in trained if k.endswith("weight") and trained[k].dim() == 4 and k in teacher]
    assert weights and all(torch.equal(trained[k], teacher[k]) for k in weights)


def test_alternative_loads_back_and_reproduces_its_profile(reference):
    from bespoke.blocks import Context
    from bespoke.models import load_model
    from bespoke.partition import Partition

    tmp, house = reference
    t = house.manifest.teacher
    teacher = load_model(t.name, weights=t.weights)
    part = Partition.from_model(teacher, (1, 3, t.input_size, t.input_size))
    ctx = Context(part, t.name, t.input_size)
    rec = next(a for a in house.manifest.alternatives if a.spec.kind == "conv")
    module = house.load_alternative(rec.id, ctx, hp.TinySource(None)).eval()
    seg = house.segment(rec.segment)
    x = torch.randn(2, *seg.in_shape[1:])
    assert module(x).shape == (2, *seg.out_shape[1:])
    # replace-one profiling (teacher head activations -> alternative -> teacher tail) is the
    # student with only this alternative swapped in
    from bespoke.distill import Tails
    from bespoke.student import assemble

    images = torch.randn(3, 3, t.input_size, t.input_size)
    student = assemble(part, [(seg, module)])
    with torch.no_grad():
        acts = part.activations(images, [seg.start])
        torch.testing.assert_close(Tails(part)(seg.end, module(acts[seg.start])), student(images),
                                   rtol=1e-4, atol=1e-5)


def test_rerun_resumes_without_redoing_anything(reference, tmp_path):
    tmp, house = reference
    copy = tmp_path / "house"
    shutil.copytree(house.root, copy)
    before = _records(copy)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (copy / "alts").iterdir()}
    _build(tmp, copy)
    assert _records(copy) == before
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "alts").iterdir()} == mtimes


def test_failures_are_isolated_and_oom_halves_the_bunch(tmp_path):
    from bespoke import pipeline

    data = hp.config(tmp_path, tmp_path / "house", segments=2, epochs=1, steps_per_epoch=1)
    data["plugin_options"] = {"tiny": {"broken": True, "oom": True}}
    data["plugins"]["distill_loss"] = "nmse"  # any distill-loss plugin is selectable
    house = pipeline.build(load_config(None, data), load_registry(extra_plugins=[hp]))
    by_kind: dict[str, list] = {}
    for a in house.manifest.alternatives:
        by_kind.setdefault(a.spec.kind, []).append(a)
    assert all(a.status == "trained" for k in ("copy", "conv") for a in by_kind[k])
    assert all(a.status == "failed" and "broken on purpose" in a.reason for a in by_kind["broken"])
    assert all(a.status == "failed" and "out of memory even when trained alone" in a.reason
               for a in by_kind["oom"])


def test_resume_after_sigkill_gives_the_same_manifest(reference, tmp_path):
    """A real SIGKILL in the middle of distillation; rerunning finishes the same house."""
    ref_tmp, ref_house = reference
    shutil.copy(ref_tmp / "teacher.safetensors", tmp_path / "teacher.safetensors")
    house = tmp_path / "house"
    # bunches of one alternative: results independent of who shares a bunch is part of the claim
    config = hp.write_config(tmp_path, house, bunch_size=1)
    driver = hp.write_driver(tmp_path, config)
    def ready():
        try:
            statuses = [a["status"] for a in json.loads((house / "manifest.json").read_text())["alternatives"]]
        except (OSError, ValueError):
            return False
        if "trained" in statuses and "pending" in statuses:
            time.sleep(0.4)  # into the next bunch
            return True
        return False

    _kill_when(driver, "0.3", ready, "the build finished or stalled before it could be killed")
    interrupted = _records(house)
    assert any(r["status"] == "pending" for r in interrupted.values())
    done = subprocess.run([sys.executable, str(driver)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout
    final, expected = _records(house), _records(ref_house.root)
    assert final.keys() == expected.keys()
    for aid in expected:
        assert _same(final[aid], expected[aid]), (aid, final[aid], expected[aid])


REAL_SOURCES = ["skip", "pruned-self", "lowrank"]


def test_torchrun_two_processes_train_the_same_alternatives(tmp_path):
    """`torchrun --nproc-per-node 2 -m bespoke build` with the built-in block sources: the same
    trained alternatives (and results) as one process."""
    from bespoke import pipeline

    def config(house: Path) -> dict:
        data = hp.config(tmp_path, house, epochs=1)
        data["plugins"]["block_sources"] = REAL_SOURCES
        return data

    one = pipeline.build(load_config(None, config(tmp_path / "one")), load_registry())
    cfg_path = tmp_path / "two.json"
    cfg_path.write_text(json.dumps(config(tmp_path / "two")))
    torchrun = VENV_BIN / "torchrun"
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc-per-node", "2",
           "-m", "bespoke", "build", str(cfg_path)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "on 2 processes" in done.stdout
    final, expected = _records(tmp_path / "two"), _records(one.root)
    trained = {k for k, r in final.items() if r["status"] == "trained"}
    assert trained and trained == {k for k, r in expected.items() if r["status"] == "trained"}
    assert not list((tmp_path / "two" / "shards").glob("*.json"))
    for aid in expected:  # each alternative's training does not depend on the rank it ran on
        assert _same(final[aid], expected[aid]), (aid, final[aid], expected[aid])


# ---- inside an epoch: training states, the image stream, successive halving ---------------

LONG = dict(epochs=8, steps_per_epoch=2, cache_activations=False, checkpoint_minutes=0.001)


def _positions(house: Path) -> dict[str, int]:
    out = {}
    for f in (house / "states").glob("*.json"):
        try:
            out[f.stem] = json.loads(f.read_text())["position"]
        except (OSError, ValueError, KeyError):
            pass
    return out


def test_a_build_killed_inside_an_epoch_resumes_from_its_saved_state(tmp_path):
    """SIGKILL in the middle of a bunch's training: the rerun starts from the alternatives' saved
    training states (weights, Adam state, position in the image stream), not from the start, and
    ends with the house an uninterrupted build makes."""
    ref = _build(tmp_path, tmp_path / "ref", **LONG)
    assert not list((ref.root / "states").glob("*")), "finished alternatives leave no training state"
    house = tmp_path / "house"
    config = hp.write_config(tmp_path, house, **LONG)
    driver = hp.write_driver(tmp_path, config)
    _kill_when(driver, "0.05", lambda: bool(_positions(house)) and min(_positions(house).values()) >= 5,
               "no training state was saved before the build ended")
    assert all(r["status"] == "pending" for r in _records(house).values())  # killed inside the only bunch
    done = subprocess.run([sys.executable, str(driver)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "inside the image stream, at step(s)" in done.stdout, done.stdout[-2000:]
    resumed_from = int(done.stdout.split("at step(s) ")[1].split()[0].rstrip(","))
    assert 5 <= resumed_from < 16
    final, expected = _records(house), _records(ref.root)
    assert final.keys() == expected.keys()
    for aid in expected:  # the same weights' profile: Adam's state and the stream were restored
        assert _same(final[aid], expected[aid]), (aid, final[aid], expected[aid])
    assert not list((house / "states").glob("*"))


def test_a_state_whose_tensors_are_missing_is_ignored(tmp_path):
    from bespoke.house import House

    h = _build(tmp_path, tmp_path / "house", segments=1, epochs=1, steps_per_epoch=1)
    rec = h.manifest.alternatives[0]
    h.save_state(rec.id, {"module": {}, "optim": []}, {"position": 3})
    assert h.load_state(rec.id) is not None
    h.save_state(rec.id, {"module": {}, "optim": []}, {"position": 4})
    assert [p.name for p in (h.root / "states").glob("*.pt")] == [f"{rec.id}.00000004.pt"]  # the older one went
    h.state_path(rec.id, "00000004").unlink()  # a kill between the two writes, or a lost file
    assert h.load_state(rec.id) is None
    h.remove_state(rec.id)
    assert not list((h.root / "states").glob("*"))


def test_the_stream_is_the_same_whoever_decodes_it():
    """Batches of a step: the same with worker processes or without, and from any start."""
    from bespoke.distill import Settings, Stream, _steps
    from bespoke.data import transforms_for, sample_images
    import timm

    model = timm.create_model(hp.TEACHER, pretrained=False)
    data = sample_images().with_transform(transforms_for(model, 32, augment=True))
    stream = Stream.of(len(data), Settings(epochs=3, batch_size=4))
    whole = {s: b for s, b in _steps(data, stream, 0, stream.total, workers=0)}
    parallel = {s: b for s, b in _steps(data, stream, 0, stream.total, workers=2)}
    later = {s: b for s, b in _steps(data, stream, 5, stream.total, workers=1)}
    assert len(whole) == stream.total == 3 * math.ceil(len(data) / 4)
    for s, (x, y) in whole.items():
        assert torch.equal(x, parallel[s][0]) and torch.equal(y, parallel[s][1])
        if s >= 5:
            assert torch.equal(x, later[s][0])
    assert not torch.equal(whole[0][0], whole[stream.steps_per_epoch][0])  # each epoch: new order, new crops
    assert stream.rounds(0, 3) == [stream.total]
    assert stream.rounds(4, 3) == [1, 4, stream.total]  # slices of 1, 3, then the rest (steps of 4 images)


def test_successive_halving_stops_alternatives_not_worth_more_images(tmp_path):
    """Copies of the teacher's segment cost what the segment costs: stopped before training.
    The others train in rounds, each profiled; the house records how many images each saw."""
    house = _build(tmp_path, tmp_path / "house", segments=3, epochs=6, steps_per_epoch=2, halving=4,
                   halving_eta=2, halving_stall=0.0, cache_activations=False)
    recs = {a.id: a for a in house.manifest.alternatives}
    segments = {s.id: s for s in house.manifest.segments}
    copies = [a for a in recs.values() if a.spec.kind == "copy"]
    convs = [a for a in recs.values() if a.spec.kind == "conv"]
    assert copies and convs
    for a in copies:
        assert a.status == "trained" and a.images == 0 and a.steps == 0
        assert "no cheaper than the teacher's segment" in a.stopped and a.kl is not None
    trained_on = []
    for a in convs:
        seg = segments[a.segment]
        assert a.status == "trained" and a.kl is not None
        if a.flops >= seg.flops and a.params >= seg.params:
            assert a.images == 0 and "teacher's segment" in a.stopped
            continue
        trained_on.append(a.images)
        assert a.stopped is None or "stalled" in a.stopped or "dominated" in a.stopped
        if a.stopped is None:  # trained to the end of the stream: 6 epochs of 2 steps of 4 images
            assert a.images == 6 * 2 * 4
    assert trained_on and all(n > 0 for n in trained_on)
    assert not list((house.root / "states").glob("*"))


def test_halving_rules(tmp_path):
    from bespoke.distill import Settings, halving_stops
    from bespoke.house import AlternativeRecord, House, SegmentRecord, TeacherInfo
    from bespoke.types import AlternativeSpec

    seg = SegmentRecord(start=0, end=1, in_shape=(1, 8, 8, 8), out_shape=(1, 8, 8, 8), in_stride=1,
                        out_stride=1, params=1000, flops=10_000)
    h = House.create(tmp_path / "h", TeacherInfo(name="t", input_size=8))
    h.manifest.segments.append(seg)

    def alt(name, params, flops, **kw):
        rec = AlternativeRecord(id=f"0-1.{name}", segment=seg.id, source="x",
                                spec=AlternativeSpec(source="x", kind=name, label=name), params=params,
                                flops=flops, **kw)
        h.manifest.alternatives.append(rec)
        return rec

    big = alt("big", 1000, 10_000)  # as costly as the segment itself
    small = alt("small", 400, 4000)
    smaller = alt("smaller", 300, 3000)
    tiny = alt("tiny", 100, 1000)
    done = alt("done", 350, 3500, status="trained", kl=0.01)  # finished earlier
    info = {big.id: {"profile": {"kl": 0.0}, "images": 0},
            small.id: {"profile": {"kl": 0.5}, "images": 64, "kl_history": [0.9, 0.5]},
            smaller.id: {"profile": {"kl": 0.2}, "images": 64, "kl_history": [0.8, 0.2]},
            tiny.id: {"profile": {"kl": 0.9}, "images": 64, "kl_history": [0.91, 0.9]}}
    s = Settings(halving_margin=0.2, halving_stall=0.05)
    first = halving_stops(h, [big, small, smaller, tiny], info, s, first=True)
    assert set(first) == {big.id} and "teacher's segment" in first[big.id]  # only cost decides untrained
    stops = halving_stops(h, [small, smaller, tiny], info, s)
    assert "dominated by 0-1.done" in stops[small.id]  # the best of those cheaper and far better
    assert smaller.id not in stops  # the finished `done` is costlier; nothing cheaper is better
    assert "stalled" in stops[tiny.id]  # cheapest, but its KL no longer moves
    s.halving_margin = 0.99  # `done` and `smaller` are better than `small`, but not by 99 %
    assert small.id not in halving_stops(h, [small, smaller, tiny], info, s)


def test_rounds_that_make_an_alternative_worse_are_not_kept(tmp_path):
    """Keep-best on the held-out images: with a learning rate that wrecks every alternative, each
    one stops after its first round and keeps the weights it had before it (its KL then)."""
    house = _build(tmp_path, tmp_path / "house", segments=3, epochs=4, steps_per_epoch=2, halving=4,
                   halving_eta=2, lr=5.0, cache_activations=False)
    convs = [a for a in house.manifest.alternatives if a.spec.kind == "conv" and a.images]
    assert convs
    for a in convs:
        assert a.stopped and "stalled" in a.stopped
        assert a.kept and a.kept.startswith("the weights after 0 images")
        before, after = (float(v) for v in a.kept.split("KL ")[1].split(";")[0:1] + [a.kept.split("; ")[1].split()[0]])
        assert a.kl == pytest.approx(before, rel=1e-3) and before < after


@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_batchnorm_keeps_an_alternatives_running_statistics(freeze):
    """build.freeze_batchnorm: the alternative's BatchNorm keeps the statistics its block source
    gave it while its scale and shift (and every other weight, frozen or not as it came) train."""
    from types import SimpleNamespace

    import timm
    from torch import nn

    from bespoke.data import sample_images, transforms_for
    from bespoke.distill import Job, Settings, train_bunch

    torch.manual_seed(0)
    data = sample_images().with_transform(transforms_for(timm.create_model(hp.TEACHER, pretrained=False), 16,
                                                         augment=True))
    teacher = nn.Conv2d(3, 4, 1)
    partition = SimpleNamespace(activations=lambda x, needed: {0: x, 1: teacher(x)})
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).requires_grad_(False)  # as teacher copies come
    bn = module[1]
    conv = module[0].weight.clone()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    job = Job(SimpleNamespace(id="a"), SimpleNamespace(start=0, end=1), module)
    seen = train_bunch(partition, [job], data, nn.functional.mse_loss,
                       Settings(epochs=1, steps_per_epoch=3, batch_size=4, lr=1e-2, workers=0,
                                freeze_batchnorm=freeze))
    assert seen == 12 and job.steps == 3
    assert not torch.equal(module[0].weight, conv)  # frozen parameters train all the same
    assert not torch.equal(bn.weight, before["weight"]) and not torch.equal(bn.bias, before["bias"])
    stats_kept = all(torch.equal(bn.state_dict()[k], before[k]) for k in ("running_mean", "running_var"))
    assert stats_kept == freeze
    assert not module.training  # handed back in eval mode either way
