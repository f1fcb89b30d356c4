"""The plugin core: entry-point discovery, broken plugins, name conflicts, selection, env vars."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bespoke import PluginRecord, hookimpl
from bespoke.config import RunConfig, apply_plugin_flags, check_plugin_selection
from bespoke.errors import UsageError
from bespoke.plugins import DuplicatePluginError, load_registry

BUILTIN = {
    "timm-donors": "block-source",
    "pruned-self": "block-source",
    "mse": "distill-loss",
    "measured-latency": "latency",
    "lut-latency": "latency",
    "optuna": "search",
    "annealing": "search",
}


def make_distribution(root: Path, dist: str, module: str, source: str, entry_name: str) -> Path:
    """A minimal installed distribution on disk: a module plus a dist-info with entry points,
    which importlib.metadata finds on sys.path exactly like a pip-installed package."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[bespoke]\n{entry_name} = {module}\n")
    return root


def test_builtins_are_discovered_through_entry_points():
    reg = load_registry()
    for name, category in BUILTIN.items():
        rec = reg.get(name)
        assert rec.category == category
        assert rec.distribution == "bespoke"
        assert rec.version
    assert {name for name, _, _ in reg.loaded} >= {"timm-donors", "losses", "optuna"}


def test_plugins_json_has_exactly_the_documented_keys(cli):
    res = cli("plugins", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert rows, "no plugins listed"
    for row in rows:
        assert set(row) == {"name", "category", "distribution", "version", "description"}
        assert row["category"] in {"block-source", "distill-loss", "latency", "search"}
    names = {r["name"]: r["category"] for r in rows}
    for name, category in BUILTIN.items():
        assert names[name] == category


def test_plugins_table(cli):
    res = cli("plugins")
    assert res.returncode == 0, res.stderr
    assert "measured-latency" in res.stdout and "category" in res.stdout


def test_unknown_plugin_exits_2_and_lists_every_category(cli):
    res = cli("run", "--plugin", "no-such-thing")
    assert res.returncode == 2
    assert "no-such-thing" in res.stderr
    for category in ("block-source", "distill-loss", "latency", "search"):
        assert category in res.stderr
    assert "lut-latency" in res.stderr and "annealing" in res.stderr
    assert "Traceback" not in res.stderr


def test_broken_plugin_warns_and_cli_keeps_working(tmp_path, cli):
    site = make_distribution(tmp_path / "site", "bespoke-broken", "bespoke_broken_plugin",
                             "raise RuntimeError('boom at import')\n", "broken")
    res = cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    assert "bespoke-broken" in res.stderr and "boom at import" in res.stderr
    names = {r["name"] for r in json.loads(res.stdout)}
    assert "mse" in names


def test_plugin_failing_inside_its_hook_registers_nothing(tmp_path, cli):
    source = """
        from bespoke import PluginRecord, hookimpl

        @hookimpl
        def register_latency_estimators(register):
            register(PluginRecord(name="half-way", category="latency", factory=dict))
            raise ValueError("second registration failed")
    """
    site = make_distribution(tmp_path / "site", "bespoke-halfway", "bespoke_halfway", source, "halfway")
    res = cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    assert "second registration failed" in res.stderr
    assert "half-way" not in {r["name"] for r in json.loads(res.stdout)}


def test_third_party_plugin_is_listed_and_selectable(tmp_path, cli):
    source = """
        from bespoke import PluginRecord, hookimpl

        @hookimpl
        def register_search_strategies(register):
            register(PluginRecord(name="third-party-search", category="search", factory=lambda o: None,
                                  description="from a third party"))
    """
    site = make_distribution(tmp_path / "site", "bespoke-thirdparty", "bespoke_thirdparty", source, "thirdparty")
    res = cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["third-party-search"]["distribution"] == "bespoke-thirdparty"
    assert rows["third-party-search"]["version"] == "9.9"


def test_two_plugins_claiming_one_name_is_an_error_naming_both(tmp_path, cli):
    source = """
        from bespoke import PluginRecord, hookimpl

        @hookimpl
        def register_distill_losses(register):
            register(PluginRecord(name="mse", category="distill-loss", factory=lambda o: None))
    """
    site = make_distribution(tmp_path / "site", "bespoke-imposter", "bespoke_imposter", source, "imposter")
    env = {"PYTHONPATH": str(site)}
    listing = cli("plugins", "--json", env=env)
    assert listing.returncode == 0  # the rest of the CLI keeps working
    assert "bespoke-imposter" in listing.stderr and "'bespoke'" in listing.stderr
    res = cli("run", "--plugin", "mse", env=env)
    assert res.returncode == 2
    assert "bespoke-imposter" in res.stderr and "'bespoke'" in res.stderr
    assert "Traceback" not in res.stderr


def test_duplicate_in_process_registry():
    class P:
        @staticmethod
        @hookimpl
        def register_distill_losses(register):
            register(PluginRecord(name="mse", category="distill-loss", factory=lambda o: None))

    reg = load_registry(extra_plugins=[P])
    with pytest.raises(DuplicatePluginError, match="two plugins claim the name 'mse'"):
        reg.get("mse")


def test_wrong_category_from_hook_is_reported(tmp_path, cli):
    source = """
        from bespoke import PluginRecord, hookimpl

        @hookimpl
        def register_search_strategies(register):
            register(PluginRecord(name="confused", category="latency", factory=dict))
    """
    site = make_distribution(tmp_path / "site", "bespoke-confused", "bespoke_confused", source, "confused")
    res = cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert res.returncode == 0
    assert "confused" in res.stderr and "register_search_strategies" in res.stderr


def test_env_selects_and_disables_plugins(monkeypatch):
    monkeypatch.setenv("BESPOKE_LOAD_PLUGINS", "losses,optuna")
    reg = load_registry()
    assert set(reg.records) == {"mse", "nmse", "cosine", "optuna"}
    monkeypatch.delenv("BESPOKE_LOAD_PLUGINS")
    monkeypatch.setenv("BESPOKE_DISABLE_PLUGINS", "annealing")
    reg = load_registry()
    assert "annealing" not in reg.records and "optuna" in reg.records


def test_plugin_flag_replaces_by_category():
    reg = load_registry()
    cfg = apply_plugin_flags(RunConfig(), ["lut-latency", "annealing", "nmse"], reg)
    assert cfg.plugins.latency == "lut-latency"
    assert cfg.plugins.search == "annealing"
    assert cfg.plugins.distill_loss == "nmse"
    assert cfg.plugins.block_sources == RunConfig().plugins.block_sources
    cfg = apply_plugin_flags(RunConfig(), ["skip", "pruned-self"], reg)
    assert cfg.plugins.block_sources == ["skip", "pruned-self"]


def test_config_keys_select_plugins_and_wrong_category_is_refused():
    reg = load_registry()
    cfg = RunConfig.model_validate({"plugins": {"search": "annealing", "latency": "lut-latency"}})
    check_plugin_selection(cfg, reg)
    bad = RunConfig.model_validate({"plugins": {"search": "mse"}})
    with pytest.raises(UsageError, match="unknown search plugin 'mse'"):
        check_plugin_selection(bad, reg)


def test_plugin_options_are_validated_by_the_plugins_own_model():
    from pydantic import Field

    from bespoke import PluginOptions

    class Opts(PluginOptions):
        runs: int = Field(10, ge=1)

    class P:
        @staticmethod
        @hookimpl
        def register_latency_estimators(register):
            register(PluginRecord(name="opt-test", category="latency", factory=lambda o: o,
                                  options_model=Opts))

    reg = load_registry(extra_plugins=[P])
    assert reg.instantiate("opt-test", {"runs": 3}).runs == 3
    with pytest.raises(UsageError, match=r"plugin_options.opt-test") as exc:
        reg.instantiate("opt-test", {"runs": 0})
    assert "runs" in str(exc.value)
    with pytest.raises(UsageError, match="Extra inputs"):
        reg.instantiate("opt-test", {"rnus": 3})
    with pytest.raises(UsageError, match="takes no options"):
        reg.instantiate("mse", {"x": 1})


def test_in_process_block_source_is_registered_and_selectable():
    class Source:
        def propose(self, ctx, segment):
            return []

    class P:
        @staticmethod
        @hookimpl
        def register_block_sources(register):
            register(PluginRecord(name="my-source", category="block-source", factory=lambda o: Source()))

    reg = load_registry(extra_plugins=[P])
    cfg = apply_plugin_flags(RunConfig(), ["my-source"], reg)
    assert cfg.plugins.block_sources == ["my-source"]
    assert isinstance(reg.instantiate("my-source", category="block-source"), Source)
    with pytest.raises(UsageError, match="unknown latency plugin 'my-source'"):
        reg.get("my-source", "latency")
