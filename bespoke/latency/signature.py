"""Module signatures: the key a lookup table finds a module by, and the query that carries it.

A signature hashes the architecture and the input shape, never the weights, so the same
alternative rebuilt anywhere finds its entry.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence

from bespoke.types import LatencyQuery

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _qualname(obj: Any) -> str:
    t = obj if isinstance(obj, type) else type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _tensor_desc(t: Any) -> str:
    return f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}"


def _own_tensors(module: "nn.Module") -> list[str]:
    out = [f"p {n} {_tensor_desc(p)}" for n, p in module.named_parameters(recurse=False)]
    out += [f"b {n} {_tensor_desc(b)}" for n, b in module.named_buffers(recurse=False) if b is not None]
    return out


def _describe(module: "nn.Module") -> list[str]:
    """Architecture lines, names relative to ``module``; fx graphs canonicalised."""
    import torch.fx as fx

    if isinstance(module, fx.GraphModule):
        return _describe_graph(module)
    lines: list[str] = []
    skip_prefixes: list[str] = []
    for name, sub in module.named_modules(remove_duplicate=False):
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(sub, fx.GraphModule) and sub is not module:
            lines.append(f"[{name}] graph")
            lines += ["  " + s for s in _describe_graph(sub)]
            skip_prefixes.append(name + ".")
            continue
        try:
            extra = sub.extra_repr()
        except Exception:  # extra_repr of exotic modules may fail; the class name still counts
            extra = ""
        lines.append(f"[{name}] {_qualname(sub)}({extra})")
        lines += ["  " + s for s in _own_tensors(sub)]
    return lines


def _describe_graph(gm: Any) -> list[str]:
    """An fx graph with node and attribute names replaced by positions, so identical
    architectures extracted from different places of a network give identical text."""
    import torch

    node_ids: dict[Any, str] = {}
    module_ids: dict[str, str] = {}
    lines: list[str] = []

    def arg(a: Any) -> str:
        if isinstance(a, torch.fx.Node):
            return node_ids.get(a, "?")
        if isinstance(a, (list, tuple)):
            inner = ", ".join(arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {arg(v)}" for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))) + "}"
        if isinstance(a, torch.Tensor):
            return f"tensor{_tensor_desc(a)}"
        if callable(a):
            return getattr(a, "__qualname__", None) or getattr(a, "__name__", None) or repr(a)
        return repr(a)

    for i, node in enumerate(gm.graph.nodes):
        nid = f"%{i}"
        node_ids[node] = nid
        args = ", ".join(arg(a) for a in node.args)
        kwargs = arg(dict(node.kwargs)) if node.kwargs else ""
        if node.op == "call_module":
            target = str(node.target)
            if target not in module_ids:
                module_ids[target] = f"m{len(module_ids)}"
                sub = gm.get_submodule(target)
                lines.append(f"def {module_ids[target]}:")
                lines += ["  " + s for s in _describe(sub)]
            tgt = module_ids[target]
        elif node.op == "get_attr":
            try:
                obj = gm
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                tgt = f"attr{_tensor_desc(obj)}" if isinstance(obj, torch.Tensor) else "attr"
            except AttributeError:
                tgt = "attr?"
        elif node.op in ("call_function",):
            tgt = f"{getattr(node.target, '__module__', '')}.{arg(node.target)}"
        elif node.op in ("placeholder", "output"):
            tgt = ""
        else:  # call_method: the method name is the architecture
            tgt = str(node.target)
        lines.append(f"{nid} = {node.op} {tgt}({args}{', ' if args and kwargs else ''}{kwargs})")
    return lines


def module_signature(module: "nn.Module", input_shape: Sequence[int]) -> str:
    """A stable key for ``module`` run on ``input_shape``: architecture + shapes, not weights.

    Built from each submodule's class and ``extra_repr`` (kernel sizes, strides, channels...),
    its parameter and buffer shapes, the canonicalised fx graph for ``GraphModule`` pieces, and the
    input shape (batch included). Two modules of identical architecture give the same key wherever
    they come from; any change of shape, layer or wiring gives another.
    """
    text = "\n".join(_describe(module)) + f"\ninput {tuple(int(s) for s in input_shape)}"
    return "sig-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def make_query(module: "nn.Module", input_shape: Sequence[int], *, as_shipped: bool = False) -> LatencyQuery:
    """A :class:`LatencyQuery` for ``module``, keyed by :func:`module_signature`; ``as_shipped``:
    it is a whole network as it ships (:class:`LatencyQuery`)."""
    shape = tuple(int(s) for s in input_shape)
    return LatencyQuery(key=module_signature(module, shape), input_shape=shape, module=module, as_shipped=as_shipped)
