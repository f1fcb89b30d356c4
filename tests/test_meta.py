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
    section = _section(docs, f"### `{hook}(register)`")
    # a runnable template (tests/test_templates.py runs it and compares it with the file)
    assert "<!-- template: examples/plugin-templates/" in section and f"def {hook}(register)" in section


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


def test_every_config_key_has_a_description():
    """The reference is generated from the model: a key without a description is an empty cell."""
    def bare(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            section = isinstance(ann, type) and hasattr(ann, "model_fields")
            if not (field.description or (section and ann.__doc__)):
                yield prefix + name
            if section:
                yield from bare(ann, prefix + name + ".")

    assert not list(bare(RunConfig)), "give these Fields a description= (then regenerate the docs)"


# -- the CLI ---------------------------------------------------------------------------------


def _commands():
    import typer

    from bespoke.cli import app

    return typer.main.get_command(app).commands


def _section(text: str, heading_start: str) -> str:
    """The text from the heading that starts with ``heading_start`` to the next heading."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith(heading_start)), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_cli_option_is_documented(command):
    """Each command has its section in docs/configuration.md naming each of its options, with a
    help text; the README or another page may say more."""
    docs = (ROOT / "docs" / "configuration.md").read_text()
    section = _section(docs, f"### `bespoke {command}")
    assert section, f"docs/configuration.md has no section for `bespoke {command}`"
    for param in _commands()[command].params:
        name = param.name.upper() if param.param_type_name == "argument" else param.opts[0]
        assert f"`{name}`" in section, f"`bespoke {command}` {name} is not documented"
        assert getattr(param, "help", None), f"`bespoke {command}` {name} has no help text"


def test_every_cli_command_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [c for c in _commands() if f"bespoke {c}" not in readme]
    assert not missing, f"README.md never shows {missing}"


# -- the built-in plugins and the public API ------------------------------------------------


def _entry_points() -> dict[str, str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["bespoke"]


PLUGIN_DOCS = ("plugins.md", "house.md", "latency.md", "search.md")


def test_every_built_in_plugin_is_documented():
    """Every entry point, and every name each one registers, in docs/plugins.md's table of
    built-ins, and in the page that documents its family."""
    from bespoke.plugins import load_registry

    plugins_md = (ROOT / "docs" / "plugins.md").read_text()
    table = _section(plugins_md, "## Built-in plugins")
    family_docs = "".join((ROOT / "docs" / p).read_text() for p in PLUGIN_DOCS)
    registry = load_registry()
    for entry_point in _entry_points():
        assert f"| `{entry_point}` |" in table, f"docs/plugins.md's built-in table lacks {entry_point}"
        names = [r.name for r in registry.records.values() if r.plugin == entry_point]
        assert names, f"entry point {entry_point} registers nothing (failed to load?): {registry.warnings}"
        for name in names:
            assert f"`{name}`" in table, f"docs/plugins.md's built-in table lacks {name}"
            assert family_docs.count(f"`{name}`") >= 2, f"{name} is named but not documented in {PLUGIN_DOCS}"


def test_the_public_api_holds_every_contract_type():
    """Whatever the core hands a plugin or takes back is declared in bespoke.types; all of it is
    importable from bespoke.api."""
    import bespoke.api
    import bespoke.types

    declared = {n for n, v in vars(bespoke.types).items()
                if inspect.isclass(v) and v.__module__ == "bespoke.types" and not n.startswith("_")}
    assert declared and not declared - set(bespoke.api.__all__), declared - set(bespoke.api.__all__)
    assert all(getattr(bespoke.api, n) is getattr(bespoke.types, n) for n in declared)


def test_every_public_api_name_is_documented():
    import bespoke.api

    docs = (ROOT / "docs" / "plugins.md").read_text()
    missing = [n for n in bespoke.api.__all__ if f"`{n}" not in docs]
    assert not missing, f"docs/plugins.md does not document {missing}"


# bespoke_plugins/*latency*.py are moving to the public LutLatency core in another branch; they
# join this check when that lands.
BUILT_IN_MODULES = sorted(p for p in (ROOT / "bespoke_plugins").glob("*.py")
                          if p.name != "__init__.py")


@pytest.mark.parametrize("path", BUILT_IN_MODULES, ids=lambda p: p.name)
def test_built_in_plugins_import_only_the_public_api(path):
    """Built-ins load like third-party plugins, so they use only what a third party can."""
    import ast

    allowed = {"bespoke", "bespoke.api"}
    tree = ast.parse(path.read_text())
    used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    core = {m for m in used if m.split(".")[0] == "bespoke"}
    assert core <= allowed, f"{path.name} imports {sorted(core - allowed)}; use bespoke.api"


# examples/bespoke-latency-example moves to the public LutLatency in the latency branch; it
# joins this check when that lands.
EXAMPLE_MODULES = sorted((ROOT / "examples").rglob("*.py"))


def test_examples_never_import_bespoke_plugins():
    import ast

    assert EXAMPLE_MODULES
    offenders = []
    for path in EXAMPLE_MODULES:
        tree = ast.parse(path.read_text())
        used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if any(m.split(".")[0] == "bespoke_plugins" for m in used):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
