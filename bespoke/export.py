"""Export a student for deployment, in three forms:

- ``onnx``: ``model.onnx``, produced from the ``torch.export`` program by the torch.export-based
  ONNX exporter (the legacy TorchScript exporter is the fallback), then run with onnxruntime on
  the same input as PyTorch; the maximum absolute difference of the logits is reported.
- ``torch-export``: ``model.pt2``, a ``torch.export`` program (``torch.export.load`` reloads it).
- ``safetensors``: the bespoke recipe (``recipe.json``) + ``model.safetensors``, which reloads
  with :func:`bespoke.load_student`.

Shapes are static by default: batch 1 at the student's input size, which is what the latency
was measured and searched for. With ``dynamic_batch`` (``bespoke export --dynamic-batch``,
``export.dynamic_batch`` in a run) the batch axis is symbolic in both files (named ``batch`` in
the ONNX graph); the program is traced at batch 2, because torch.export specialises a size-1
axis to the constant 1, and the ONNX file is checked with onnxruntime at batches 1 and 3 as well.
The spatial size stays fixed: the search chose the student for it.
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
from bespoke.files import atomic_write

FORMATS = ("onnx", "torch-export", "safetensors")


@dataclass
class ExportResult:
    onnx: str | None = None
    onnx_max_abs_diff: float | None = None
    onnx_exporter: str | None = None
    onnx_batch: int | str | None = None  # the ONNX input's batch axis: 1, or "batch" when dynamic
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


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = False) -> Any:
    model.eval()
    shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    with _quiet(), torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=shapes)


def save_program(program: Any, path: Path) -> Path:
    """Write the ``torch.export`` program to ``path`` atomically (a kill leaves no torn file)."""
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp), suffix=".tmp.pt2")


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, program: Any = None,
                dynamic_batch: bool = False) -> str:
    """Write ``path``; returns which exporter succeeded ("dynamo" or "torchscript").

    ``dynamic_batch``: the first axis of the input and the logits is symbolic (``batch``); the
    dynamo exporter takes it from ``program``, which must then have been exported with it."""
    model.eval()
    if dynamic_batch and program is None:
        program = export_program(model, example, dynamic_batch=True)
    errors = []
    for exporter in ("dynamo", "torchscript"):
        try:
            # a temporary file renamed over ``path`` when complete: a kill leaves no torn file
            atomic_write(path, lambda tmp: _write_onnx(exporter, model, program, example, tmp, dynamic_batch),
                         suffix=".tmp.onnx")
            return exporter
        except Exception as exc:  # try the other exporter before giving up
            errors.append(f"{exporter}: {_first_line(exc)}")
    raise UsageError("ONNX export failed with both exporters:\n  " + "\n  ".join(errors))


def _write_onnx(exporter: str, model: nn.Module, program: Any, example: torch.Tensor, path: str,
                dynamic_batch: bool) -> None:
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            src = program if program is not None else model
            # one self-contained file: students are far below ONNX's 2 GB limit
            torch.onnx.export(src, (example,), path, dynamo=True, verbose=False,
                              external_data=False, input_names=["input"], output_names=["logits"])
        else:
            axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (example,), path, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    if dynamic_batch:
        _name_batch_axis(Path(path))


def _first_line(exc: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters of it), for one-line errors."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _name_batch_axis(path: Path) -> None:
    """Call the symbolic first axis of the graph's inputs and outputs ``batch`` (the dynamo
    exporter names it after its internal symbol, e.g. ``s77``)."""
    import onnx

    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.save(model, str(path))


def onnx_batch_axis(path: Path) -> int | str:
    """The ONNX file's input batch axis: a number when static, its name when symbolic."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return int(dim.dim_value) if dim.HasField("dim_value") else str(dim.dim_param)


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
                 save_student: Callable[[Path], None] | None = None, seed: int = 0,
                 dynamic_batch: bool = False) -> ExportResult:
    """Export ``model`` into ``out`` in ``formats``; ``save_student(dir)`` writes the bespoke
    recipe + safetensors form (it needs the recipe, which only the caller has). ``dynamic_batch``:
    see the module docstring."""
    formats = check_formats(formats)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in input_shape)
    if dynamic_batch:  # a size-1 axis would be specialised to 1
        shape = (max(2, shape[0]), *shape[1:])
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(shape, generator=gen)
    res = ExportResult()
    program = None
    if "torch-export" in formats or "onnx" in formats:
        try:
            program = export_program(model, example, dynamic_batch=dynamic_batch)
        except Exception as exc:
            if dynamic_batch:
                raise UsageError(f"torch.export could not export this student with a dynamic batch axis "
                                 f"({_first_line(exc)}); export it without --dynamic-batch (batch 1)") from exc
            if "torch-export" in formats:
                raise
    if "torch-export" in formats:
        res.torch_export = str(save_program(program, out / "model.pt2"))
    if "onnx" in formats:
        path = out / "model.onnx"
        res.onnx_exporter = export_onnx(model, example, path, program, dynamic_batch=dynamic_batch)
        res.onnx = str(path)
        checks = [example]
        if dynamic_batch:  # the symbolic axis must work at other batches than the traced one
            checks += [torch.randn((b, *shape[1:]), generator=gen) for b in (1, 3)]
        res.onnx_max_abs_diff = max(onnx_max_abs_diff(model, path, x) for x in checks)
        res.onnx_batch = onnx_batch_axis(path)
    if "safetensors" in formats:
        if save_student is None:
            raise UsageError("the safetensors form needs the student's recipe; export a saved student directory")
        target = out / "student"
        if target.exists():
            shutil.rmtree(target)
        save_student(target)
        res.student_dir = str(target)
    return res
