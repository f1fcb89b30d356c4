"""The orchestrator: the pipeline, top to bottom. Knows no particular donor, loss, device or search."""

from __future__ import annotations

from bespoke.errors import NotImplementedYet


def build(cfg, registry, console=None):
    raise NotImplementedYet("bespoke build lands with the model house (issue 4)")


def profile(cfg, registry, output, console=None):
    raise NotImplementedYet("bespoke profile lands with the latency estimators (issue 5)")


def search(cfg, registry, output, storage=None, study=None, console=None):
    raise NotImplementedYet("bespoke search lands with the search strategies (issue 6)")


def finetune(cfg, registry, recipe, out, console=None):
    raise NotImplementedYet("bespoke finetune lands with the student stage (issue 7)")


def export(student, out, formats, console=None):
    raise NotImplementedYet("bespoke export lands with the student stage (issue 7)")


def run(cfg, registry, console=None):
    raise NotImplementedYet("bespoke run lands with the student stage (issue 7)")
