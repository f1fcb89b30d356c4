"""What block sources work with: the :class:`Context` the core hands them, and shared helpers.

:class:`Context` implements :class:`bespoke.types.BlockContext`: the partitioned teacher, donors
partitioned at the teacher's input size (so spatial sizes match cut point for cut point), a small
batch of real calibration inputs and the teacher's activations on them.

Helpers for plugins (public, stable):

- :func:`fit_linear_adapter`: a 1x1 conv (or ``nn.Linear`` for token tensors) fitted in closed form
  by ridge-regularised least squares, mapping one activation to another channel-wise.
- :func:`linear_adapter`: the same module uninitialised, for rebuilding from a spec.
- :func:`run_batched`: run a module over a large activation in chunks, without gradients.
- :func:`count_parameters`, :func:`count_flops`: cost figures of a module (from
  :mod:`bespoke.counting`, the one counter).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from bespoke.counting import count_flops
from bespoke.counting import count_params as count_parameters

__all__ = [
    "Context",
    "count_flops",
    "count_parameters",
    "fit_linear_adapter",
    "linear_adapter",
    "run_batched",
]

_USE_CONTEXT_DEFAULT: Any = object()


class Context:
    """The :class:`bespoke.types.BlockContext` the core hands block sources.

    :param teacher: the teacher's :class:`bespoke.partition.Partition`.
    :param teacher_name: the teacher's model reference (timm name, ``module:attr``, path).
    :param input_size: ``(C, H, W)`` or a square size ``H``.
    :param calibration: real, preprocessed teacher inputs ``(N, C, H, W)`` used to fit adapters
        and to measure channel importance. ``None``: standard-normal noise of 8 images (enough for
        shapes and tests, not for good adapters).
    :param donor_weights: how donors load (see :func:`bespoke.models.load_model`): ``"auto"``,
        ``"hub"``, ``"packaged"``, a checkpoint path, or ``None`` (random; for rebuilding).
    """

    def __init__(
        self,
        teacher: Any,
        teacher_name: str,
        input_size: Any,
        *,
        calibration: torch.Tensor | None = None,
        donor_weights: str | None = "auto",
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.teacher = teacher
        self.teacher_name = teacher_name
        if isinstance(input_size, int):
            input_size = (3, input_size, input_size)
        input_size = tuple(int(v) for v in input_size)
        if len(input_size) == 4:  # (N, C, H, W) given
            input_size = input_size[1:]
        self.input_size: tuple[int, int, int] = input_size  # type: ignore[assignment]
        self.donor_weights = donor_weights
        self.seed = seed
        self.device = torch.device(device)
        self._calibration = calibration
        self._donors: dict[tuple[str, Any], Any] = {}
        # Activations at early cut points are large (64 images x 96 x 130 x 130 floats = 415 MB):
        # keep the most recently used ones up to a byte budget.
        self._activations: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self.cache_bytes = 2 * 1024**3
        self.batch_size = 32  # chunk size for forward passes over the calibration set

    # -- donors ------------------------------------------------------------------------------

    def donor(self, name: str, *, weights: Any = _USE_CONTEXT_DEFAULT) -> Any:
        """Donor ``name`` loaded with ``weights`` (default: this context's ``donor_weights``),
        partitioned at the teacher's input size. Cached per (name, weights).

        ``weights=None`` gives the architecture with random weights: what rebuilding a saved
        alternative needs, offline.
        """
        if weights is _USE_CONTEXT_DEFAULT:
            weights = self.donor_weights
        key = (name, weights)
        if key not in self._donors:
            from bespoke.models import load_model
            from bespoke.partition import Partition

            model = load_model(name, weights=weights).eval().to(self.device)
            self._donors[key] = Partition.from_model(model, (1, *self.input_size))
        return self._donors[key]

    # -- calibration -------------------------------------------------------------------------

    def calibration_inputs(self) -> torch.Tensor:
        if self._calibration is None:
            g = torch.Generator().manual_seed(self.seed)
            self._calibration = torch.randn(8, *self.input_size, generator=g)
        return self._calibration

    def teacher_activation(self, cut_index: int) -> torch.Tensor:
        """The teacher's activation at cut point ``cut_index`` on the calibration inputs (cached;
        computed in chunks of ``batch_size`` images, kept on the CPU)."""
        return self._cached(("teacher", cut_index), self.teacher, cut_index)

    def donor_activation(self, name: str, cut_index: int, *, weights: Any = _USE_CONTEXT_DEFAULT) -> torch.Tensor:
        """Donor ``name``'s own activation at its cut point ``cut_index`` on the calibration
        inputs (cached like :meth:`teacher_activation`)."""
        if weights is _USE_CONTEXT_DEFAULT:
            weights = self.donor_weights
        return self._cached(("donor", name, weights, cut_index), self.donor(name, weights=weights), cut_index)

    def _cached(self, key: Any, partition: Any, cut_index: int) -> torch.Tensor:
        if key in self._activations:
            self._activations.move_to_end(key)
            return self._activations[key]
        x = self.calibration_inputs()
        parts = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size].to(self.device)
                parts.append(partition.activations(xb, [cut_index])[cut_index].detach().cpu())
        value = torch.cat(parts)
        self._activations[key] = value
        total = sum(t.numel() * t.element_size() for t in self._activations.values())
        while total > self.cache_bytes and len(self._activations) > 1:
            _, old = self._activations.popitem(last=False)
            total -= old.numel() * old.element_size()
        return value


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def run_batched(module: nn.Module | Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                batch_size: int = 32, device: str | torch.device = "cpu") -> torch.Tensor:
    """``module(x)`` in chunks along the batch dimension, without gradients, result on the CPU."""
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            outs.append(module(x[i:i + batch_size].to(device)).detach().cpu())
    return torch.cat(outs)


def observe_inputs(module: nn.Module, layers: dict[nn.Module, Callable[[nn.Module, torch.Tensor], None]],
                   x: torch.Tensor, batch_size: int = 16) -> None:
    """Run ``module`` on ``x`` in chunks, without gradients, calling ``layers[layer](layer, input)``
    with each listed sub-layer's (detached) input as it runs: how data-aware block sources collect
    statistics of the activations inside a segment."""
    _run_hooked(module, x, {layer: (lambda layer, inputs, _out, observe=observe: observe(layer, inputs[0].detach()))
                            for layer, observe in layers.items()}, batch_size)


def _run_hooked(module: nn.Module, x: torch.Tensor, hooks: dict[nn.Module, Callable[..., None]],
                batch_size: int = 16) -> None:
    """Run ``module`` on ``x`` in chunks of ``batch_size``, without gradients, with each
    ``hooks[layer](layer, inputs, output)`` registered as a forward hook of ``layer``."""
    handles = [layer.register_forward_hook(hook) for layer, hook in hooks.items()]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                module(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()


class _NormalEquations:
    """Least squares ``y ~ x W (+ b)`` accumulated over chunks of rows in float64 and solved with
    a ridge relative to the inputs' mean energy (the intercept is not regularised)."""

    def __init__(self, c_in: int, c_out: int, intercept: bool):
        k = c_in + int(intercept)
        self.c_in, self.intercept = c_in, intercept
        self.xtx = torch.zeros(k, k, dtype=torch.float64)
        self.xty = torch.zeros(k, c_out, dtype=torch.float64)

    def add(self, xr: torch.Tensor, yr: torch.Tensor) -> None:
        xr, yr = xr.to(torch.float64), yr.to(torch.float64)
        if self.intercept:
            xr = torch.cat([xr, torch.ones(xr.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xtx += xr.T @ xr
        self.xty += xr.T @ yr

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W (c_in, c_out), b (c_out) or None)``."""
        reg = torch.zeros(self.xtx.shape[0], dtype=torch.float64)
        reg[:self.c_in] = ridge * torch.diagonal(self.xtx)[:self.c_in].mean().clamp_min(1e-12)
        sol = torch.linalg.solve(self.xtx + torch.diag(reg), self.xty)
        return sol[:self.c_in], (sol[self.c_in] if self.intercept else None)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """Activation -> (rows, channels): (N, C, H, W) -> (N*H*W, C); (N, L, C) -> (N*L, C)."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if t.dim() == 3:
        return t.reshape(-1, t.shape[2])
    if t.dim() == 2:
        return t
    raise ValueError(f"cannot fit a channel adapter on a tensor of shape {tuple(t.shape)}")


def _pointwise(layer: nn.Module) -> bool:
    """A layer :func:`refit_pointwise` can solve for: linear, or a dense (ungrouped) conv with zero
    padding whose unfolded inputs stay few enough to solve for (at most 4,608 per output)."""
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple)
            and layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] <= 4608)


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of what each output position sees: unfolded patches for a conv."""
    if isinstance(layer, nn.Conv2d) and (layer.kernel_size != (1, 1) or layer.stride != (1, 1)):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return _as_rows(x)


def refit_pointwise(module: nn.Module, reference: nn.Module, x: torch.Tensor, *, ridge: float = 1e-3,
                    batch_size: int = 16) -> list[str]:
    """Least-squares reconstruction of a narrowed copy of ``reference`` (ThiNet, Luo et al. 2017;
    few-sample compression as in Li et al., CVPR 2020): every linear layer or dense convolution of
    ``module`` (any kernel, on unfolded patches) that takes fewer input channels than the layer of the same name in ``reference``
    and gives as many outputs gets the weights (and bias, when it has one) that best reproduce
    the reference layer's output on inputs ``x`` -- its own input computed by ``module``, the
    target by ``reference``. Layers are refitted in the order they run, each on the inputs the
    layers refitted before it produce, so later ones absorb earlier errors. Normal equations in
    float64, ``ridge`` relative to the inputs' mean energy. Returns the names refitted (in place).
    """
    ref_layers = dict(reference.named_modules())
    layers = dict(module.named_modules())
    names = [n for n, m in layers.items()
             if _pointwise(m) and _pointwise(ref_layers.get(n, nn.Identity()))
             and _in_out(m)[1] == _in_out(ref_layers[n])[1] and _in_out(m)[0] < _in_out(ref_layers[n])[0]]
    if not names:
        return []
    # the reference's outputs at those layers (the targets), and the order the layers run in
    targets: dict[str, list[torch.Tensor]] = {}

    def keep_output(name):
        return lambda _m, _a, out: targets.setdefault(name, []).append(out.detach())

    _run_hooked(reference, x, {ref_layers[n]: keep_output(n) for n in names}, batch_size)
    refitted = []
    for name in list(targets):
        layer = layers[name]
        c_out = _in_out(layer)[1]
        c_in = layer.weight[0].numel()  # what one output sees: channels x kernel positions
        eq = _NormalEquations(c_in, c_out, intercept=layer.bias is not None)
        chunks, mismatch = iter(targets.pop(name)), []  # the reference's outputs go once used

        def accumulate(_m, inputs, _out, layer=layer, chunks=chunks, mismatch=mismatch, c_out=c_out, eq=eq):
            xr = _input_rows(layer, inputs[0].detach())
            yr = _as_rows(next(chunks, torch.empty(0, c_out)))
            if xr.shape[0] != yr.shape[0]:  # padding done outside the conv (TF "same"), or a shared layer
                mismatch.append(True)
            elif not mismatch:
                eq.add(xr, yr)

        _run_hooked(module, x, {layer: accumulate}, batch_size)
        if mismatch:
            continue
        weight, bias = eq.solve(ridge)
        with torch.no_grad():
            layer.weight.copy_(weight.T.reshape(layer.weight.shape).to(layer.weight.dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(layer.bias.dtype))
        refitted.append(name)
    return refitted


def _in_out(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def fit_linear_adapter(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-4) -> nn.Module:
    """The channel-wise affine map ``A`` minimising ``||A(x) - y||^2 + ridge * scale * ||W||^2``.

    Closed form (normal equations in float64; the bias is not regularised; ``scale`` is the mean
    diagonal of ``x^T x`` so ``ridge`` is relative). ``x`` and ``y`` must have the same batch and
    spatial (or token) sizes.

    :param x: (N, C_in, H, W) feature maps, or (N, L, C_in) tokens.
    :param y: (N, C_out, H, W), or (N, L, C_out).
    :returns: ``nn.Conv2d(C_in, C_out, 1)`` with bias for feature maps, ``nn.Linear`` for tokens.
    """
    if x.dim() != y.dim() or x.shape[0] != y.shape[0]:
        raise ValueError(f"adapter fit needs matching layouts, got {tuple(x.shape)} -> {tuple(y.shape)}")
    if x.dim() == 4 and x.shape[2:] != y.shape[2:]:
        raise ValueError(f"adapter fit needs equal spatial sizes, got {tuple(x.shape)} -> {tuple(y.shape)}")
    if x.dim() == 3 and x.shape[1] != y.shape[1]:
        raise ValueError(f"adapter fit needs equal token counts, got {tuple(x.shape)} -> {tuple(y.shape)}")
    c_in, c_out = (x.shape[1], y.shape[1]) if x.dim() == 4 else (x.shape[-1], y.shape[-1])
    xr, yr = _as_rows(x), _as_rows(y)
    # Accumulate the normal equations in chunks: rows can be millions (pixels x images).
    eq = _NormalEquations(c_in, c_out, intercept=True)
    step = 65536
    for i in range(0, xr.shape[0], step):
        eq.add(xr[i:i + step], yr[i:i + step])
    sol, b = eq.solve(ridge)
    weight, bias = sol.T.to(torch.float32), b.to(torch.float32)
    if x.dim() == 4:
        layer: nn.Module = nn.Conv2d(c_in, c_out, 1, bias=True)
        with torch.no_grad():
            layer.weight.copy_(weight.reshape(c_out, c_in, 1, 1))
            layer.bias.copy_(bias)
    else:
        layer = nn.Linear(c_in, c_out, bias=True)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return layer


def linear_adapter(c_in: int, c_out: int, ndim: int) -> nn.Module:
    """The uninitialised module :func:`fit_linear_adapter` returns, for rebuilding from a spec.

    ``ndim`` is the rank of the tensor it maps: 4 for feature maps (a 1x1 ``Conv2d``), 2 or 3 for
    vectors and tokens (``Linear``)."""
    return nn.Conv2d(c_in, c_out, 1, bias=True) if ndim == 4 else nn.Linear(c_in, c_out, bias=True)


def identity_adapter(channels: int) -> nn.Module:
    """A ``Linear`` adapter that starts as the identity (for vectors whose channels already agree)."""
    layer = nn.Linear(channels, channels, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(channels))
        layer.bias.zero_()
    return layer
