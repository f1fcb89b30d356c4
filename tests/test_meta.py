"""Meta-tests that keep the plugin contract honest (after datasette's): every hook is documented
with its signature, every hook is exercised by a test, every config key is documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from bespoke import hookspecs
from bespoke.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "bespoke_spec")]


def test_there_are_four_hook_families():
    assert sorted(HOOKS) == ["register_block_sources", "register_distill_losses",
                             "register_latency_estimators", "register_search_strategies"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### `{hook}(register)`" in docs, f"docs/plugins.md lacks a section for {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    me = Path(__file__).name
    users = [p.name for p in (ROOT / "tests").glob("test_*.py")
             if p.name != me and hook in p.read_text()]
    assert users, f"no test implements or calls {hook}"


def _fields(model, prefix=""):
    for name, field in model.model_fields.items():
        yield prefix + name
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _fields(ann, prefix + name + ".")


def test_every_config_key_is_documented():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in _fields(RunConfig) if f"`{k}`" not in docs]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_configuration_reference_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", ROOT / "docs" / "gen_config_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "configuration.md").read_text() == gen.render(), (
        "docs/configuration.md is stale: run `python docs/gen_config_reference.py`")
