"""A tiny block source for the model-house and distillation tests (fast, no donors).

For each segment it offers:

- ``copy``: a copy of the teacher segment itself (what pruned-self starts from);
- ``conv``: one 3x3 convolution with the segment's spatial reduction (4-D activations only);
- ``broken`` (only with ``options["broken"]``): raises in forward, so it must fail alone;
- ``oom`` (only with ``options["oom"]``): raises out-of-memory in forward.

Also a helper that writes a random-weight teacher checkpoint and a config for it.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from bespoke import AlternativeSpec, PluginOptions, PluginRecord, hookimpl

TEACHER = "test_efficientnet"
SIZE = 32


class Options(PluginOptions):
    broken: bool = False
    oom: bool = False
    kinds: list[str] = Field(default_factory=lambda: ["copy", "conv"])


class _Broken(nn.Module):
    def __init__(self, c_in, c_out, exc):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)
        self.exc = exc

    def forward(self, x):
        if self.exc == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        raise ValueError("this alternative is broken on purpose")


class TinySource:
    def __init__(self, options: Options | None):
        self.options = options or Options()

    def propose(self, ctx, segment):
        specs = []
        if "copy" in self.options.kinds:
            specs.append(AlternativeSpec(source="tiny", kind="copy", label="copy"))
        four_d = len(segment.in_shape) == 4 and len(segment.out_shape) == 4
        if four_d and "conv" in self.options.kinds:
            specs.append(AlternativeSpec(source="tiny", kind="conv", label="conv3x3",
                                         options={"c_in": segment.in_shape[1], "c_out": segment.out_shape[1],
                                                  "stride": segment.reduction}))
        if four_d and self.options.broken:
            specs.append(AlternativeSpec(source="tiny", kind="broken", label="broken",
                                         options={"c_in": segment.in_shape[1], "c_out": segment.out_shape[1]}))
        if four_d and self.options.oom:
            specs.append(AlternativeSpec(source="tiny", kind="oom", label="oom",
                                         options={"c_in": segment.in_shape[1], "c_out": segment.out_shape[1]}))
        return specs

    def rebuild(self, ctx, segment, spec):
        module = self._rebuild(ctx, segment, spec)
        delay = float(os.environ.get("TINY_DELAY", "0"))
        if delay:  # slow enough for a test to kill the run in the middle
            module.register_forward_pre_hook(lambda m, args: time.sleep(delay))
        return module

    def _rebuild(self, ctx, segment, spec):
        o = spec.options
        if spec.kind == "copy":
            return copy.deepcopy(ctx.teacher.extract(segment))
        if spec.kind == "conv":
            return nn.Sequential(nn.Conv2d(o["c_in"], o["c_out"], 3, stride=o["stride"], padding=1),
                                 nn.BatchNorm2d(o["c_out"]))
        return _Broken(o["c_in"], o["c_out"], spec.kind)

    def create(self, ctx, segment, spec):
        module = self._rebuild(ctx, segment, spec)
        if spec.kind == "copy":
            module.load_state_dict(ctx.teacher.extract(segment).state_dict())
        return module, spec


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name="tiny", category="block-source", factory=TinySource,
                          options_model=Options, description="tiny test block source"))


def write_teacher(path: Path) -> Path:
    """Random (seeded) weights of the tiny teacher, as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TEACHER, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def config(tmp: Path, house: Path, **build) -> dict:
    """A small run configuration for the tiny teacher with the tiny source."""
    weights = tmp / "teacher.safetensors"
    if not weights.exists():
        write_teacher(weights)
    b = {"segments": 3, "epochs": 2, "steps_per_epoch": 2, "batch_size": 4, "bunch_size": 64,
         "calibration_images": 4, "validation_images": 4,
         "few_images": 0}  # this schedule, not the few-image recipe (on scikit-image's photos)
    b.update(build)
    return {"teacher": TEACHER, "teacher_weights": str(weights), "input_size": SIZE,
            "house": str(house), "seed": 0, "threads": 1,
            "preset": "full",  # the schedule below as written (`bespoke build` applies presets)
            "plugins": {"block_sources": ["tiny"], "distill_loss": "mse"},
            "build": b}


def write_config(tmp: Path, house: Path, **build) -> Path:
    path = tmp / "config.json"
    path.write_text(json.dumps(config(tmp, house, **build)))
    return path


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import house_plugin
import bespoke.plugins as plugins
plugins._REGISTRY = plugins.load_registry(extra_plugins=[house_plugin])
from bespoke.cli import main
main(["build", {config!r}])
"""


def write_driver(tmp: Path, config_path: Path) -> Path:
    """A script that runs `bespoke build CONFIG` with the tiny source registered (also under
    torchrun, which runs a script as it runs `-m bespoke`)."""
    path = tmp / "driver.py"
    path.write_text(DRIVER.format(tests=str(Path(__file__).parent), config=str(config_path)))
    return path
