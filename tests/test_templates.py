"""The plugin templates of docs/plugins.md: the docs show exactly the files under
examples/plugin-templates/, and the four of them together run the whole pipeline on the tiny
preset, so neither the docs nor the templates can rot."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "examples" / "plugin-templates"
DOCS = ROOT / "docs" / "plugins.md"
FAMILIES = {"block_source.py": "register_block_sources", "distill_loss.py": "register_distill_losses",
            "latency_estimator.py": "register_latency_estimators",
            "search_strategy.py": "register_search_strategies"}
# docs/plugins.md marks each template block: <!-- template: examples/plugin-templates/X.py -->
MARKED = re.compile(r"<!-- template: (\S+) -->\s*```python\n(.*?)```", re.S)


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"template_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_show_every_template_exactly():
    shown = {name: code for name, code in MARKED.findall(DOCS.read_text())}
    want = {f"examples/plugin-templates/{f}" for f in FAMILIES}
    assert set(shown) == want, f"docs/plugins.md should mark exactly {sorted(want)}, marks {sorted(shown)}"
    for name, code in shown.items():
        assert code == (ROOT / name).read_text(), f"docs/plugins.md shows a stale copy of {name}"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_template_is_one_family_and_imports_only_the_public_api(name):
    tree = ast.parse((TEMPLATES / name).read_text())
    bespoke_imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                       and n.module and n.module.split(".")[0] == "bespoke"}
    bespoke_imports |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                        if a.name.split(".")[0] in ("bespoke", "bespoke_plugins")}
    assert bespoke_imports == {"bespoke.api"}, bespoke_imports
    hooks = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("register_")}
    assert hooks == {FAMILIES[name]}


def test_templates_run_the_pipeline_end_to_end_on_the_tiny_preset(tmp_path):
    """All four registered in-process (as docs/plugins.md "Try your plugin in a minute" shows),
    selected together, through build, profile, search with re-ranking, fine-tuning and export."""
    from bespoke import pipeline
    from bespoke.config import load_config
    from bespoke.plugins import load_registry

    modules = [_load(TEMPLATES / name) for name in sorted(FAMILIES)]
    registry = load_registry(extra_plugins=modules)
    names = {"block-source": "template-one-conv", "distill-loss": "template-smooth-l1",
             "latency": "template-timer", "search": "template-least-loss"}
    for category, name in names.items():
        assert registry.get(name, category).plugin.startswith("template_")
    cfg = load_config(None, {
        "preset": "tiny", "out": str(tmp_path / "out"), "budgets": [0.9], "threads": 1,
            "search": {"zoo_confidence": 0},  # 8 held-out images prove nothing: the better score wins
        "plugins": {"block_sources": [names["block-source"]], "distill_loss": names["distill-loss"],
                    "latency": names["latency"], "search": names["search"]},
        "plugin_options": {"template-timer": {"runs": 3}, "template-smooth-l1": {"beta": 0.5}},
    })
    report = pipeline.run(cfg, registry)

    out = tmp_path / "out"
    lut = json.loads((out / "latency.json").read_text())
    assert lut["device"]["name"] == "this-cpu"
    assert lut["device"]["threads"] == 1  # the run's `threads` reached the estimator's option
    found = json.loads((out / "search.json").read_text())
    assert found["strategy"] == "template-least-loss"
    result = found["results"][0]
    assert result["feasible"] and result["meta"]["reranked"]  # meta["top"] went to re-ranking
    data = json.loads((out / "report.json").read_text())
    assert data["students"] and len(report.students) == len(data["students"])
    for s in data["students"]:
        assert s["replaced"] and {r["source"] for r in s["replaced"]} == {"template-one-conv"}
        assert Path(s["onnx"]).is_file()
