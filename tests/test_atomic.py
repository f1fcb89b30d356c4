"""Product files are replaced atomically: a writer that dies half-way leaves the previous file
whole and no temporary file behind (students, ONNX, ``.pt2``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from _tiny_student import TinyNet
from bespoke.errors import UsageError
from bespoke.partition import Partition
from bespoke.student import StudentRecipe, assemble, save_student


def _dies_half_way(path, *args, **kwargs):
    Path(path).write_bytes(b"torn")
    raise OSError("disk full (simulated)")


def _only(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_student_save_that_dies_leaves_the_previous_student_whole(tmp_path, monkeypatch):
    import safetensors.torch

    torch.manual_seed(0)
    part = Partition.from_model(TinyNet().eval(), (1, 3, 32, 32), name="tiny")
    student = assemble(part, [])
    recipe = StudentRecipe(teacher="tiny", input_size=(3, 32, 32), choices=[])
    out = save_student(student, recipe, tmp_path / "s")
    before = {name: (out / name).read_bytes() for name in _only(out)}
    assert set(before) == {"model.safetensors", "recipe.json"}
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata=None: _dies_half_way(path))
    with pytest.raises(OSError, match="simulated"):
        save_student(student, recipe, out)
    assert {name: (out / name).read_bytes() for name in _only(out)} == before


def test_an_export_that_dies_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    from bespoke.export import export_onnx, save_program

    (tmp_path / "model.pt2").write_bytes(b"old program")
    (tmp_path / "model.onnx").write_bytes(b"old onnx")
    monkeypatch.setattr(torch.export, "save", lambda program, path: _dies_half_way(path))
    with pytest.raises(OSError, match="simulated"):
        save_program(object(), tmp_path / "model.pt2")
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, path, **kw: _dies_half_way(path))
    with pytest.raises(UsageError, match="failed with both exporters"):
        export_onnx(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "model.onnx", program=object())
    assert (tmp_path / "model.pt2").read_bytes() == b"old program"
    assert (tmp_path / "model.onnx").read_bytes() == b"old onnx"
    assert _only(tmp_path) == ["model.onnx", "model.pt2"]
