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
    # copies of teacher pieces come with frozen parameters; they must train all the same
    from safetensors.torch import load_file

    rec = next(a for a in alts if a.spec.kind == "copy")
    trained = load_file(str(house.weights_path(rec.id)))
    teacher = load_file(str(tmp / "teacher.safetensors"))
    weights = [k for k in trained if k.endswith("weight") and trained[k].dim() == 4 and k in teacher]
    assert weights and all(not torch.equal(trained[k], teacher[k]) for k in weights)


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
    proc = subprocess.Popen([sys.executable, str(driver)], env=_env(TINY_DELAY="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                statuses = [a["status"] for a in json.loads((house / "manifest.json").read_text())["alternatives"]]
            except (OSError, ValueError):
                statuses = []
            if "trained" in statuses and "pending" in statuses:
                time.sleep(0.4)  # into the next bunch
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait()
    assert killed, f"the build finished or stalled before it could be killed: {proc.stderr.read().decode()[-2000:]}"
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
