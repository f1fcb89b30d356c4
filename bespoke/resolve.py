"""``package.module:attribute`` references, as models and datasets are given on the command line."""

from __future__ import annotations

import importlib
from typing import Any

from bespoke.errors import UsageError


def resolve(ref: str, what: str) -> Any:
    """The object ``ref`` (``package.module:attr.sub``) names; a :class:`UsageError` naming
    ``what`` (``"model"``, ``"dataset"``) when the module does not import or lacks the attribute."""
    mod_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"{what} {ref!r}: cannot import module {mod_name!r} ({exc}); "
                         "is it installed or on PYTHONPATH?") from None
    obj: Any = mod
    for part in attr.split(".") if attr else []:
        if not hasattr(obj, part):
            raise UsageError(f"{what} {ref!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
