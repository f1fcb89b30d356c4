"""RunConfig: YAML/TOML files, CLI overrides, clear errors for bad files and values."""

from __future__ import annotations

import pytest

from bespoke.config import RunConfig, load_config
from bespoke.errors import UsageError


def test_defaults_are_the_offline_demo():
    cfg = RunConfig()
    assert cfg.teacher == "tf_efficientnet_lite2"
    assert cfg.donors == ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    assert cfg.budgets == [0.7, 0.85]
    assert cfg.plugins.search == "optuna" and cfg.plugins.latency == "measured-latency"


def test_yaml_and_toml_load_the_same(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("teacher: resnet18\nbudgets: [0.5]\nplugins:\n  search: annealing\nbuild:\n  segments: 3\n")
    t = tmp_path / "run.toml"
    t.write_text('teacher = "resnet18"\nbudgets = [0.5]\n[plugins]\nsearch = "annealing"\n[build]\nsegments = 3\n')
    a, b = load_config(y), load_config(t)
    assert a == b
    assert a.teacher == "resnet18" and a.plugins.search == "annealing" and a.build.segments == 3
    assert a.plugins.latency == "measured-latency"  # untouched defaults survive a partial section


def test_cli_overrides_win_over_the_file(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("teacher: resnet18\nbudgets: [0.5]\n")
    cfg = load_config(y, {"budgets": [0.7, 0.9], "build": {"epochs": 2}})
    assert cfg.budgets == [0.7, 0.9] and cfg.teacher == "resnet18" and cfg.build.epochs == 2


def test_invalid_value_names_file_key_value_and_reason(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("build:\n  segments: -3\n")
    with pytest.raises(UsageError) as exc:
        load_config(y)
    msg = str(exc.value)
    assert str(y) in msg and "build.segments" in msg and "-3" in msg and "greater than or equal" in msg


def test_unknown_key_is_an_error(tmp_path):
    y = tmp_path / "typo.yaml"
    y.write_text("teachr: resnet18\n")
    with pytest.raises(UsageError, match="teachr"):
        load_config(y)


def test_unparseable_missing_and_wrong_extension(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("budgets: [0.5\n")
    with pytest.raises(UsageError, match="could not be parsed"):
        load_config(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    other = tmp_path / "run.ini"
    other.write_text("x=1")
    with pytest.raises(UsageError, match="unknown extension"):
        load_config(other)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        load_config(listy)


def test_budget_must_be_positive():
    with pytest.raises(UsageError, match="budgets"):
        load_config(None, {"budgets": [0.5, -1]})


def test_cli_reports_bad_config_with_exit_2(tmp_path, cli):
    y = tmp_path / "bad.yaml"
    y.write_text("finetune:\n  lr: zero\n")
    res = cli("run", str(y))
    assert res.returncode == 2
    assert "finetune.lr" in res.stderr and "zero" in res.stderr and str(y) in res.stderr.replace("\n", "")
    assert "Traceback" not in res.stderr


def test_cli_help_lists_every_stage_command(cli):
    res = cli("--help")
    assert res.returncode == 0
    for command in ("run", "plugins", "inspect", "build", "profile", "search", "finetune", "export"):
        assert command in res.stdout


def test_build_without_any_segment_source_is_a_clear_error():
    from bespoke.config import load_config

    with pytest.raises(UsageError, match="no segments would be made"):
        load_config(overrides={"build": {"segments": 0}})
    cfg = load_config(overrides={"build": {"segments": 0, "modules": True}})
    assert cfg.build.modules and cfg.build.segments == 0


def test_input_sizes_are_checked_sorted_and_need_reranking():
    cfg = RunConfig.model_validate({"search": {"input_sizes": [224, 240, 224]}})
    assert cfg.search.input_sizes == [240, 224]
    with pytest.raises(Exception, match="between 16 and 4096"):
        RunConfig.model_validate({"search": {"input_sizes": [8]}})
    with pytest.raises(Exception, match="needs search.rerank"):
        RunConfig.model_validate({"search": {"input_sizes": [224], "rerank": False}})


def test_cli_input_sizes_flag_is_parsed_and_checked(cli, tmp_path):
    res = cli("run", "--input-sizes", "240,x", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "whole pixel sizes" in res.stderr and "Traceback" not in res.stderr
    res = cli("run", "--input-sizes", "8", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "search.input_sizes" in res.stderr and "Traceback" not in res.stderr


def test_corrupt_latency_table_fails_before_anything_is_built(tmp_path, cli):
    lut = tmp_path / "board.lut.json"
    lut.write_text('{"device": {"name": "board"}, "entries": [')  # cut short
    y = tmp_path / "run.yaml"
    y.write_text(f"out: {tmp_path / 'out'}\nplugins:\n  latency: lut-latency\n"
                 f"plugin_options:\n  lut-latency:\n    path: {lut}\n")
    res = cli("run", str(y))
    assert res.returncode == 2, res.stderr
    assert str(lut) in res.stderr.replace("\n", "") and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "house").exists()  # it failed before the build began


def test_preflight_makes_each_selected_plugin_once(tmp_path):
    from bespoke.config import RunConfig
    from bespoke.errors import UsageError
    from bespoke.plugins import get_registry

    registry = get_registry()
    cfg = RunConfig.model_validate({"plugins": {"latency": "lut-latency"},
                                    "plugin_options": {"lut-latency": {"path": str(tmp_path / "missing.json")}}})
    with pytest.raises(UsageError, match="missing.json"):
        registry.preflight(cfg)
    registry.preflight(cfg, ("block-source", "distill-loss"))  # a build needs no table
    bad = RunConfig.model_validate({"plugin_options": {"optuna": {"n_trials": -1}}})
    with pytest.raises(UsageError, match="n_trials"):
        registry.preflight(bad)
