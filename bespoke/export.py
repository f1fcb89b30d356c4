"""Export a student for deployment, in three forms:

- ``onnx``: ``model.onnx``, produced from the ``torch.export`` program by the torch.export-based
  ONNX exporter (the legacy TorchScript exporter is the fallback), then run with onnxruntime on
  the same input as PyTorch; the maximum absolute difference of the logits is reported.
- ``torch-export``: ``model.pt2``, a ``torch.export`` program (``torch.export.load`` reloads it).
- ``safetensors``: the bespoke recipe (``recipe.json``) + ``model.safetensors``, which reloads
  with :func:`bespoke.load_student`.

Shapes are static: batch 1 at the student's input size, which is what the latency was
measured and searched for.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bespoke.errors import UsageError

FORMATS = ("onnx", "torch-export", "safetensors")


@dataclass
class ExportResult:
    onnx: str | None = None
    onnx_max_abs_diff: float | None = None
    onnx_exporter: str | None = None
    torch_export: str | None = None
    student_dir: str | None = None


def check_formats(formats: Sequence[str]) -> list[str]:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"--formats {','.join(formats)!r}: unknown {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(FORMATS)}")
    return list(formats)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress lines and deprecation chatter; keep the terminal ours."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_program(model: nn.Module, example: torch.Tensor) -> Any:
    model.eval()
    with _quiet(), torch.no_grad():
        return torch.export.export(model, (example,))


def save_program(program: Any, path: Path) -> Path:
    torch.export.save(program, str(path))
    return path


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, program: Any = None) -> str:
    """Write ``path``; returns which exporter succeeded ("dynamo" or "torchscript")."""
    model.eval()
    errors = []
    for exporter in ("dynamo", "torchscript"):
        try:
            with _quiet(), torch.no_grad():
                if exporter == "dynamo":
                    src = program if program is not None else model
                    # one self-contained file: students are far below ONNX's 2 GB limit
                    torch.onnx.export(src, (example,), str(path), dynamo=True, verbose=False,
                                      external_data=False, input_names=["input"], output_names=["logits"])
                else:
                    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                                      input_names=["input"], output_names=["logits"])
            return exporter
        except Exception as exc:  # try the other exporter before giving up
            errors.append(f"{exporter}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    raise UsageError("ONNX export failed with both exporters:\n  " + "\n  ".join(errors))


def onnx_max_abs_diff(model: nn.Module, path: Path, example: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on ``example``; max |difference|."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    got = torch.from_numpy(sess.run(None, {name: example.cpu().numpy()})[0])
    with torch.no_grad():
        want = model.eval()(example).cpu()
    if tuple(got.shape) != tuple(want.shape):
        raise UsageError(f"ONNX output shape {tuple(got.shape)} differs from PyTorch's {tuple(want.shape)}")
    return float((got - want).abs().max())


def export_model(model: nn.Module, input_shape: Sequence[int], out: str | Path,
                 formats: Sequence[str] = FORMATS, *,
                 save_student: Callable[[Path], None] | None = None, seed: int = 0) -> ExportResult:
    """Export ``model`` into ``out`` in ``formats``; ``save_student(dir)`` writes the bespoke
    recipe + safetensors form (it needs the recipe, which only the caller has)."""
    formats = check_formats(formats)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = torch.randn(tuple(int(s) for s in input_shape), generator=torch.Generator().manual_seed(seed))
    res = ExportResult()
    program = None
    if "torch-export" in formats or "onnx" in formats:
        try:
            program = export_program(model, example)
        except Exception:
            if "torch-export" in formats:
                raise
    if "torch-export" in formats:
        res.torch_export = str(save_program(program, out / "model.pt2"))
    if "onnx" in formats:
        path = out / "model.onnx"
        res.onnx_exporter = export_onnx(model, example, path, program)
        res.onnx = str(path)
        res.onnx_max_abs_diff = onnx_max_abs_diff(model, path, example)
    if "safetensors" in formats:
        if save_student is None:
            raise UsageError("the safetensors form needs the student's recipe; export a saved student directory")
        target = out / "student"
        if target.exists():
            shutil.rmtree(target)
        save_student(target)
        res.student_dir = str(target)
    return res
