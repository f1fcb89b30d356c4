"""Fine-tuning checkpoints: the student's and the optimizer's tensors (safetensors) and the
progress (JSON), one directory replaced atomically, so a killed fine-tune resumes from the last
complete one (:func:`bespoke.finetune.finetune_student`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

CHECKPOINT_SCHEMA_VERSION = 1



class CheckpointState(BaseModel):
    schema_version: int = CHECKPOINT_SCHEMA_VERSION
    fingerprint: str
    step: int
    total_steps: int
    finished: bool = False
    param_groups: list[dict[str, Any]]
    optimizer_keys: dict[str, list[str]]  # param index -> names of its state tensors
    bn_recalibrated: bool = True
    history: list[dict[str, float]] = []


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, list[str]]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[str, list[str]] = {}
    for pid, st in sd["state"].items():
        keys[str(pid)] = []
        for name, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"state.{pid}.{name}"] = t.detach().cpu().contiguous()
            keys[str(pid)].append(name)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups, keys


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict], keys: dict[str, list[str]]) -> dict:
    state = {int(pid): {name: tensors[f"state.{pid}.{name}"] for name in names} for pid, names in keys.items()}
    return {"state": state, "param_groups": groups}


def _clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone so tied weights (teacher pieces) save fine.
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, state: CheckpointState) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_clean_state_dict(model), str(tmp / "model.safetensors"))
    tensors, groups, keys = _flatten_optimizer(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = state.model_copy(update={"param_groups": groups, "optimizer_keys": keys})
    (tmp / "state.json").write_text(state.model_dump_json(indent=1))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(path: Path) -> tuple[CheckpointState, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """(state, model tensors, optimizer tensors), or None if there is no complete checkpoint.

    A crash between the two renames in :func:`save_checkpoint` leaves only ``.old``: use it.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for cand in (path, path.with_name(path.name + ".old")):
        if (cand / "state.json").is_file():
            try:
                state = CheckpointState.model_validate_json((cand / "state.json").read_text())
                return state, load_file(str(cand / "model.safetensors")), load_file(str(cand / "optimizer.safetensors"))
            except Exception:
                continue
    return None


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
