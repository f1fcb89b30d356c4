"""The public lookup-table estimator, bespoke.latency.LutLatency: a device plugin builds on it
without bespoke_plugins, exactly as docs/latency.md shows and the example package does."""

from __future__ import annotations

import ast
import re
import shutil
import sys

import pytest
from torch import nn

from bespoke import LatencyQuery, UsageError
from bespoke.latency import make_query, read_lut
from bespoke.plugins import load_registry
from test_latency import EXAMPLE, ROOT

LUT = EXAMPLE / "bespoke_latency_example" / "lut.json"


def _imported_modules(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def _device_plugin_snippet() -> str:
    """The step-4 module of docs/latency.md ("Make the package")."""
    text = (ROOT / "docs" / "latency.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "register_latency_estimators" in b]
    assert len(blocks) == 1, "docs/latency.md should show one device-plugin module"
    lines = blocks[0].splitlines()
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    return "\n".join(ln[indent:] for ln in lines) + "\n"


def test_the_docs_device_plugin_runs_as_written(tmp_path, monkeypatch):
    snippet = _device_plugin_snippet()
    assert not any(m.startswith("bespoke_plugins") for m in _imported_modules(snippet))
    pkg = tmp_path / "bespoke_latency_myboard"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(snippet)
    shutil.copy(LUT, pkg / "lut.json")
    monkeypatch.syspath_prepend(str(tmp_path))
    import bespoke_latency_myboard

    monkeypatch.delitem(sys.modules, "bespoke_latency_myboard")
    reg = load_registry(extra_plugins=[bespoke_latency_myboard])
    est = reg.instantiate("myboard-latency", category="latency")
    packaged = read_lut(LUT)
    assert est.device() == packaged.device
    teacher = LatencyQuery(key=packaged.teacher.key, input_shape=(1, 3, 32, 32))  # a table needs only the key
    assert est.latencies([teacher]) == {packaged.teacher.key: packaged.teacher.ms}
    # what is missing is named, and the option to set is the device plugin's own
    with pytest.raises(UsageError, match=r"no entry for 1 module(.|\n)*plugin_options\.myboard-latency\.allow_fallback"):
        est.latencies([make_query(nn.Conv2d(3, 5, 1), (1, 3, 8, 8))])


def test_the_example_and_the_builtin_plugin_share_the_public_core():
    for path in EXAMPLE.rglob("*.py"):
        imported = _imported_modules(path.read_text(encoding="utf-8"))
        assert not any(m.startswith("bespoke_plugins") for m in imported), f"{path} imports bespoke_plugins"
    from bespoke.latency import LutLatency

    reg = load_registry()
    with pytest.raises(UsageError, match=r"lut-latency needs a table: set plugin_options\.lut-latency\.path"):
        reg.instantiate("lut-latency", {}, category="latency")
    assert isinstance(reg.instantiate("lut-latency", {"path": str(LUT)}, category="latency"), LutLatency)
