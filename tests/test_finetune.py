"""Student fine-tuning, evaluation and export on a tiny hand-assembled student (seconds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bespoke.config import FinetuneConfig
from bespoke.finetune import (batch_at, finetune_student, load_checkpoint, mix_batch, recalibrate_batchnorm,
                              student_loss)

sys.path.insert(0, str(Path(__file__).parent))
import _tiny_student as tiny  # noqa: E402

TESTS = Path(__file__).parent


def _cfg(**kw) -> FinetuneConfig:
    base = dict(epochs=20, steps=6, batch_size=8, lr=1e-3, beta=0.5, bn_recalibration_batches=2)
    base.update(kw)
    return FinetuneConfig(**base)


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_recalibrate_batchnorm_averages_over_every_batch(mode):
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Identity(), bn, nn.Dropout(0.5)).eval()
    batches = [torch.randn(4, 3, 5, 5) + i for i in range(3)]
    seen = recalibrate_batchnorm(model, batches, mode=mode)
    assert seen == 12
    want = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, want)
    if mode == "eval":
        torch.testing.assert_close(bn.running_var, torch.cat(batches).transpose(0, 1).flatten(1).var(1))
    assert bn.momentum == 0.1 and not model.training  # restored


def test_eval_mode_recalibration_keeps_a_calibrated_model():
    """Statistics already right for the data stay (nearly) right; train mode would drift."""
    torch.manual_seed(0)
    net = tiny.TinyNet().eval()
    data = [torch.randn(8, 3, 32, 32) for _ in range(8)]
    recalibrate_batchnorm(net, data, passes=3)  # converge on this data
    before = _weights(net)
    recalibrate_batchnorm(net, data)
    for k, v in net.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, before[k], rtol=1e-4, atol=1e-5)


def test_loss_terms():
    logits = torch.randn(4, 10, requires_grad=True)
    teacher_logits = logits.detach().clone()
    out = torch.randn(4, 16, 2, 2)
    parts = student_loss(logits, torch.tensor([1, -1, 2, 3]), {"3-6": out}, {6: out + 1},
                         teacher_logits, {"3-6": 6}, beta=0.5, label_smoothing=0.1)
    assert parts.kl == pytest.approx(0.0, abs=1e-6)  # identical logits
    assert parts.mse == pytest.approx(1.0)
    assert parts.ce > 0
    no_labels = student_loss(logits, None, {}, {}, teacher_logits, {}, beta=0.5, label_smoothing=0.1)
    assert no_labels.ce == 0.0
    no_labels.total.backward()


def test_mixed_label_loss_weights_both_labels():
    logits = torch.randn(4, 10)
    a, b = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, -1])
    kw = dict(replaced={}, teacher_acts={}, teacher_logits=logits, targets={}, beta=0.0, label_smoothing=0.0)
    plain = student_loss(logits, a, **kw)
    assert student_loss(logits, a, mixed_labels=b, lam=1.0, **kw).ce == pytest.approx(plain.ce)
    other = student_loss(logits, b, **kw)  # the unlabelled sample drops out of this term
    half = student_loss(logits, a, mixed_labels=b, lam=0.25, **kw)
    assert half.ce == pytest.approx(0.25 * plain.ce + 0.75 * other.ce, rel=1e-5)


def test_label_weight_scales_the_label_term_and_zero_drops_it():
    logits, teacher = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    kw = dict(replaced={}, teacher_acts={}, teacher_logits=teacher, targets={}, beta=1.0, label_smoothing=0.0)
    plain, half = student_loss(logits, y, **kw), student_loss(logits, y, label_weight=0.5, **kw)
    assert float(half.total) == pytest.approx(float(plain.total) - 0.5 * plain.ce, rel=1e-5)
    only_kd = student_loss(logits, y, label_weight=0.0, **kw)
    assert only_kd.ce == 0.0 and float(only_kd.total) == pytest.approx(only_kd.kl, rel=1e-5)


def test_mix_batch_is_a_function_of_the_step_and_mixes_consistently():
    x = torch.randn(6, 3, 20, 20)
    y = torch.arange(6)
    same = mix_batch(x, y, 0, 0)  # both off: the batch as it is
    assert same[0] is x and same[2] is None and same[3] == 1.0
    a = mix_batch(x, y, 3, 1, mixup=0.4, crop_scale=0.3)
    b = mix_batch(x, y, 3, 1, mixup=0.4, crop_scale=0.3)
    c = mix_batch(x, y, 4, 1, mixup=0.4, crop_scale=0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and a[3] == b[3]
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == x.shape and 0.0 <= a[3] <= 1.0
    xm, ya, yb, lam = mix_batch(x, y, 3, 1, mixup=0.4)  # mixup only: a blend of two images
    assert torch.equal(ya, y) and sorted(yb.tolist()) == y.tolist()
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[yb])
    crops = mix_batch(x, y, 3, 1, crop_scale=0.3)[0]  # crops only: resized back, not the original
    assert crops.shape == x.shape and not torch.equal(crops, x)


def test_batches_are_a_function_of_the_step():
    data = tiny.ImageList(n=10)
    a = batch_at(data, 4, 5, seed=1)
    b = batch_at(data, 4, 5, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape[0] == 4


def test_finetune_trains_student_leaves_teacher(tmp_path):
    teacher, part, student, seg = tiny.make()
    teacher_before = _weights(teacher)
    data = tiny.ImageList()
    x = data.x[:8]
    with torch.no_grad():
        t_logits = teacher(x)
    res = finetune_student(student, part, data, _cfg(steps=8), tmp_path)
    assert res.steps == 8 and res.resumed_from == 0 and res.bn_images > 0
    assert res.history[-1]["mse"] < res.history[0]["mse"]
    for k, v in teacher.state_dict().items():  # the frozen teacher did not move
        assert torch.equal(v, teacher_before[k]), k
    with torch.no_grad():
        assert torch.allclose(teacher(x), t_logits)
    state, model_t, opt_t = load_checkpoint(tmp_path / "checkpoint")
    assert state.finished and state.step == 8
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]  # nothing pickled
    # a second call finds the finished checkpoint and does not train again
    again = finetune_student(tiny.make()[2], part, data, _cfg(steps=8), tmp_path)
    assert again.resumed_from == 8
    s1 = res.student.state_dict()
    for k, v in again.student.state_dict().items():
        assert torch.equal(v, s1[k]), k


def test_freeze_classifier_keeps_the_last_linear_layer_and_trains_the_rest(tmp_path):
    _, part, student, _ = tiny.make()
    before = _weights(student)
    res = finetune_student(student, part, tiny.ImageList(), _cfg(steps=6, freeze_classifier=True), tmp_path)
    after = res.student.state_dict()
    head = [k for k in after if k.startswith("after.") and k.endswith(("head.weight", "head.bias"))]
    assert head and all(torch.equal(after[k], before[k]) for k in head)
    assert not torch.equal(after["alt.0.weight"], before["alt.0.weight"])  # everything else trained


def test_finetune_recalibrates_batchnorm_with_batch_statistics(tmp_path, monkeypatch):
    """Alternatives are distilled with batch statistics; the eval-mode estimate destroyed a real
    Lite2 student (0.84 -> 0.01 top-1), so the fine-tune must use train mode."""
    import bespoke.finetune as ft

    calls = []
    real = ft.recalibrate_batchnorm

    def spy(model, batches, device="cpu", **kw):
        calls.append(kw)
        return real(model, batches, device, **kw)

    monkeypatch.setattr(ft, "recalibrate_batchnorm", spy)
    _, part, student, _ = tiny.make()
    finetune_student(student, part, tiny.ImageList(), _cfg(steps=2), tmp_path)
    assert len(calls) == 2  # after assembly, and after the weights moved
    assert all(c.get("mode") == "train" for c in calls)


def test_unlabelled_data_uses_distillation_only(tmp_path):
    _, part, student, _ = tiny.make()
    res = finetune_student(student, part, tiny.ImageList(labelled=False), _cfg(steps=2), tmp_path)
    assert all(h["ce"] == 0.0 for h in res.history)


@pytest.mark.parametrize("aug", [{}, {"mixup": 0.4, "crop_scale": 0.5}], ids=["flips", "mixup-crops"])
def test_interrupted_finetune_resumes_where_it_stopped(tmp_path, aug):
    """Crash after step 3 (checkpoint every step); the resumed run ends exactly where an
    uninterrupted one does (also with mixup and random crops: they are drawn from the step)."""
    data = tiny.ImageList()
    cfg = _cfg(**aug)
    full = finetune_student(tiny.make()[2], tiny.make()[1], data, cfg, tmp_path / "full",
                            checkpoint_every=1)

    class Crash(Exception):
        pass

    def crash(step, parts):
        if step == 3:
            raise Crash

    _, part, student, _ = tiny.make()
    with pytest.raises(Crash):
        finetune_student(student, part, data, cfg, tmp_path / "cut", checkpoint_every=1, on_step=crash)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint")[0].step == 2
    resumed = finetune_student(tiny.make()[2], tiny.make()[1], data, cfg, tmp_path / "cut", checkpoint_every=1)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    ref = full.student.state_dict()
    for k, v in resumed.student.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)


KILLED_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import _tiny_student as tiny
    from bespoke.config import FinetuneConfig
    from bespoke.finetune import finetune_student
    _, part, student, _ = tiny.make()
    cfg = FinetuneConfig(epochs=100, steps=int(sys.argv[2]), batch_size=8, lr=1e-3, beta=0.5,
                         bn_recalibration_batches=2)
    slow = float(sys.argv[3])
    res = finetune_student(student, part, tiny.ImageList(), cfg, sys.argv[1], checkpoint_every=1,
                           on_step=lambda s, p: time.sleep(slow))
    print("resumed_from", res.resumed_from, "steps", res.steps, flush=True)
""")


def test_killed_finetune_resumes(tmp_path):
    """A real SIGKILL mid-run: the rerun resumes from the last checkpoint and finishes."""
    script = tmp_path / "ft.py"
    script.write_text(KILLED_SCRIPT.format(tests=str(TESTS)))
    work = tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(work), "40", "0.3"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            got = load_checkpoint(work / "checkpoint")
            if got is not None and got[0].step >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint appeared")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    at = load_checkpoint(work / "checkpoint")[0]
    assert not at.finished and 3 <= at.step < 40
    done = subprocess.run([sys.executable, str(script), str(work), "40", "0"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed_from = int(done.stdout.split()[1])
    assert resumed_from >= at.step and "steps 40" in done.stdout
    assert load_checkpoint(work / "checkpoint")[0].finished


def test_evaluate_teacher_and_student():
    from bespoke.evaluate import evaluate

    teacher, part, student, _ = tiny.make()
    data = tiny.ImageList(n=12)
    tm, tpred = evaluate(teacher, "teacher", data, (1, 3, 32, 32), batch_size=5)
    assert tm.agreement == 1.0 and tm.images == 12 and 0 <= tm.top1 <= tm.top5 <= 1
    assert tm.params == sum(p.numel() for p in teacher.parameters())
    sm, _ = evaluate(student, "student", data, (1, 3, 32, 32), teacher=tpred)
    assert 0 <= sm.agreement <= 1 and sm.params < tm.params
    assert sm.flops and tm.flops and sm.flops < tm.flops
    um, _ = evaluate(teacher, "t", tiny.ImageList(n=4, labelled=False), (1, 3, 32, 32))
    assert um.top1 is None and um.top5 is None


def _preds(correct, labels):
    from bespoke.evaluate import Predictions

    labels = torch.tensor(labels)
    top1 = torch.where(torch.tensor(correct, dtype=torch.bool), labels, (labels + 1) % 10)
    return Predictions(torch.stack([top1] + [(labels + k) % 10 for k in range(2, 6)], dim=1), labels)


def test_paired_difference_counts_images_and_brackets_the_difference():
    from bespoke.evaluate import paired_difference

    labels = [i % 10 for i in range(300)]
    a = _preds([i % 10 != 0 for i in range(300)], labels)  # 90 %
    b = _preds([i % 10 not in (0, 1, 2) for i in range(300)], labels)  # 70 %, wrong wherever a is
    d = paired_difference(a, b, resamples=2000)
    assert d.images == 300 and d.only_a == 60 and d.only_b == 0
    assert abs(d.diff - 0.2) < 1e-6 and d.low < 0.2 < d.high and d.low > 0.1
    same = paired_difference(a, a, resamples=500)
    assert same.diff == same.low == same.high == 0.0
    # one image apart out of 300: the interval spans zero
    c = _preds([i % 10 != 0 or i == 0 for i in range(300)], labels)
    near = paired_difference(c, a, resamples=2000)
    assert near.only_a == 1 and near.low <= 0 <= near.high


def test_paired_difference_rejects_mismatched_or_unlabelled_images():
    from bespoke.evaluate import paired_difference

    a = _preds([True, False], [1, 2])
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, _preds([True, False, True], [1, 2, 3]))
    with pytest.raises(ValueError, match="labelled"):
        paired_difference(_preds([True], [-1]), _preds([True], [-1]))
    with pytest.raises(ValueError, match="confidence"):
        paired_difference(a, a, confidence=1.5)


def test_export_onnx_matches_and_program_reloads(tmp_path):
    from bespoke.export import export_model

    _, _, student, _ = tiny.make()
    student.eval()
    saved = []
    res = export_model(student, (1, 3, 32, 32), tmp_path, save_student=lambda d: saved.append(d) or d.mkdir())
    assert res.onnx_max_abs_diff is not None and res.onnx_max_abs_diff < 1e-4
    assert Path(res.onnx).is_file() and saved
    program = torch.export.load(res.torch_export)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), student(x), rtol=1e-5, atol=1e-5)


def test_export_with_a_dynamic_batch_runs_at_any_batch(tmp_path):
    import onnxruntime as ort

    from bespoke.export import export_model

    _, _, student, _ = tiny.make()
    student.eval()
    static = export_model(student, (1, 3, 32, 32), tmp_path / "static", ["onnx"])
    assert static.onnx_batch == 1
    res = export_model(student, (1, 3, 32, 32), tmp_path / "dynamic", ["onnx", "torch-export"], dynamic_batch=True)
    assert res.onnx_batch == "batch" and res.onnx_max_abs_diff < 1e-4
    sess = ort.InferenceSession(res.onnx, providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].shape[0] == "batch"
    program = torch.export.load(res.torch_export).module()
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            want = student(x)
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(program(x), want, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_dynamic_batch_the_model_fixes(tmp_path):
    from bespoke.errors import UsageError
    from bespoke.export import export_model

    class FixedBatch(nn.Module):
        def forward(self, x):
            return torch.ones(2, 1) * x.flatten(1).mean(1, keepdim=True)  # batch must be 2

    with pytest.raises(UsageError, match="without --dynamic-batch"):
        export_model(FixedBatch(), (1, 3, 8, 8), tmp_path, ["onnx"], dynamic_batch=True)


def test_export_rejects_unknown_format(tmp_path):
    from bespoke.errors import UsageError
    from bespoke.export import export_model

    with pytest.raises(UsageError, match="tflite"):
        export_model(nn.Linear(2, 2), (1, 2), tmp_path, ["tflite"])


def test_quick_preset_fills_only_what_the_config_left_unset():
    from bespoke.config import QUICK_PRESET, apply_preset, load_config
    from bespoke.plugins import get_registry

    cfg = apply_preset(load_config(None, {"finetune": {"steps": 3}, "input_size": 96,
                                          "plugin_options": {"optuna": {"n_trials": 7}}}), get_registry())
    assert cfg.finetune.steps == 3 and cfg.input_size == 96  # the user's values stay
    assert cfg.build.segments == QUICK_PRESET["build"]["segments"]  # preset values fill in
    assert cfg.build.tiles == QUICK_PRESET["build"]["tiles"] > 0
    assert cfg.finetune.batch_size == QUICK_PRESET["finetune"]["batch_size"]
    assert cfg.plugin_options["optuna"]["n_trials"] == 7
    assert cfg.reference_models == cfg.donors
    full = apply_preset(load_config(None, {"preset": "full"}), get_registry())
    assert full.build.segments == 12 and full.input_size is None


def test_finetune_at_another_input_size_resizes_inputs_and_targets(tmp_path):
    """A student that runs at 24 px is trained on the 32 px images resized for it, against the
    teacher's logits at 32 px; segment targets (16 x 8 x 8 there, 16 x 6 x 6 in the student: they
    do not align) are dropped."""
    teacher, part, student, _ = tiny.make()
    seen = []
    student.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    res = finetune_student(student, part, tiny.ImageList(), _cfg(steps=3), tmp_path, input_size=24)
    assert set(seen) == {(24, 24)}  # BN recalibration and every step
    assert all(h["mse"] == 0 and h["kl"] > 0 for h in res.history)
    # a checkpoint made at another input size is not resumed as this one
    again = finetune_student(tiny.make()[2], part, tiny.ImageList(), _cfg(steps=3), tmp_path)
    assert again.resumed_from == 0


def test_resize_input_leaves_matching_batches_alone():
    from bespoke.finetune import resize_input

    x = torch.randn(2, 3, 32, 32)
    assert resize_input(x, None) is x and resize_input(x, 32) is x
    assert resize_input(x, 20).shape == (2, 3, 20, 20)
