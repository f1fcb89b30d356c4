"""Shared fixtures. Tests are CPU-only, tiny models, few threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_SAMPLE = Path(os.environ.get("BESPOKE_IMAGENET_SAMPLE") or ROOT.parent / "shared" / "data" / "imagenet-sample")
SAMPLE_MISSING = (f"ImageNet sample not found at {IMAGENET_SAMPLE}: put its train/, val/ and classes.txt there, "
                  "or set BESPOKE_IMAGENET_SAMPLE (CONTRIBUTING.md, 'Tests that skip')")


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture
def imagenet_sample() -> Path:
    """The 800-image ImageNet sample beside the project; tests skip cleanly without it."""
    if not (IMAGENET_SAMPLE / "val").is_dir():
        pytest.skip(SAMPLE_MISSING)
    return IMAGENET_SAMPLE


def run_cli(*args: str, env: dict | None = None, cwd: str | Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m bespoke ARGS`` in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "bespoke", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
