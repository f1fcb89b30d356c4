"""``timm-donors``: the matching segment of another pretrained network, with least-squares
1x1 channel adapters on both sides.

Matching (``propose``, cheap): every donor is partitioned at the teacher's input size, so
activations line up stride for stride. A donor segment ``u -> w`` fits a teacher segment when
its spatial reduction (``out_stride / in_stride``) is the same. Preferred, in order:

1. the same input and output spatial sizes (the same depth in stride terms; otherwise the
   reduction alone must match and a trial run must give the teacher's output size);
2. cut points that correspond by name (the cut point's own node name or the next one's: a
   donor of the same family, e.g. EfficientNet-Lite0 for Lite2, matches stage to stage);
3. the closest relative depth (cut-point index / number of cut points) at both ends.

Each donor offers at most ``per_donor`` segments, and at most ``max_per_segment`` in all.

Initialisation (``create``): on the calibration images, the input adapter maps the teacher's
activation at ``u`` to the donor's own activation at its start (bilinearly resized when the
strides differ), the output adapter maps the donor segment's output (fed through the input
adapter) to the teacher's activation at ``w``; both solved in closed form
(:func:`bespoke.blocks.fit_linear_adapter`). Adapters are present even where channel counts
match (least squares then starts near the identity and training may use them), with two
exceptions: a donor segment that starts at the input sees exactly the teacher's input (no input
adapter), and one that ends at the logits of the teacher's classes with far fewer calibration
images than classes has no output adapter (its own classifier trains instead). A donor offered
for the whole network (``build.whole_sources``) is then exactly the donor.

Donor list: ``plugin_options.timm-donors.donors``; when not given, the run's ``donors``
(:attr:`bespoke.config.RunConfig.donors`) are used: the registry fills the ``donors`` option
of any block source that has one from ``cfg.donors`` (``bespoke.plugins.Registry.block_source``). Used
on its own, this options model defaults to RunConfig's default donor list.

Pruned donors (option ``prune_ratios``, default none): for each matched donor segment, also
channel-pruned copies of it at these ratios (the ``pruned-self`` machinery: dependency-aware,
grouped layers pruned block-wise, importance ``prune_importance``). The donor segment's own input
and output channels are kept, so the adapters fit exactly as for the unpruned donor: the input
adapter is fitted first, the body is pruned (importance ``error`` is measured on the adapted
calibration activations), then the output adapter is fitted on the pruned body's output. The
completed spec stores the pruning plan and the body's input shape; ``rebuild`` replays it.

``rebuild`` loads the donor with ``weights=None`` (architecture only), so a saved student
reloads offline; the weights come from the house.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bespoke.api import (AlternativeSpec, PluginOptions, PluginRecord, SegmentInfo, UsageError,
                        count_parameters, fit_linear_adapter, hookimpl,
                        linear_adapter, run_batched)

NAME = "timm-donors"


def _default_donors() -> list[str]:
    from bespoke.api import RunConfig

    return list(RunConfig.model_fields["donors"].default_factory())  # type: ignore[misc]


class TimmDonorsOptions(PluginOptions):
    donors: list[str] = Field(default_factory=_default_donors,
                              description="donor models (timm names, module:attr, checkpoints); default: the run's donors")
    donor_weights: str | None = Field(
        "context", description="'context' (the run's setting, normally 'auto'), 'auto', 'hub', 'packaged', a checkpoint path, or null (random)")
    max_per_segment: int = Field(2, ge=1, description="alternatives offered per teacher segment, over all donors")
    per_donor: int = Field(1, ge=1, description="alternatives offered per teacher segment and donor")
    same_stride_only: bool = Field(False, description="only donor segments at the teacher's own input and output strides")
    ridge: float = Field(1e-4, ge=0, description="relative ridge term of the least-squares adapter fits")
    calibration_images: int | None = Field(None, ge=1, description="cap on calibration images used for the fits (default: all the context has)")
    max_params_ratio: float | None = Field(
        None, gt=0, description="offer a donor segment only when it has at most this fraction of the teacher segment's parameters (same-family donors often repeat the teacher's own blocks at the same cost); null: any")
    prune_ratios: list[float] = Field(default_factory=list,
                                      description="also offer channel-pruned copies of each donor segment at these ratios (pruned-self's pruning; donor boundary channels kept)")
    whole_lr_scale: float = Field(
        0.1, gt=0, description="distillation learning rate of a donor offered whole (the teacher's whole-network segment, build.whole_sources) or of a stitched piece (build.stitch_sources: pretrained stages behind an adapter fitted in closed form), as a multiple of build.lr: pretrained stages are fine-tuned, not trained from their adapters (0.1 of the default 1e-3: the 1e-4 at which fine-tuning Lite0 against Lite2 raised its held-out agreement)")
    whole_max_images: int | None = Field(
        2400, ge=1, description="distil a donor offered whole on at most about this many images (its spec's max_images; null: as many as any alternative). Fine-tuning Lite0 against Lite2 on 2,400 images (150 steps of 16) raised its held-out agreement by 2 points; a whole network's distillation costs what a whole network's training step does, every image")
    stitch_max_images: int | None = Field(
        1024, ge=1, description="distil a donor piece for a stitched segment (from the input to where stages meet, or from there to the output: build.stitch_sources) on at most about this many images (its spec's max_images; null: as many as any alternative): a stage-long piece costs a large part of a network's training step, every image, and starts from pretrained stages joined by an adapter fitted in closed form")
    prune_importance: Literal["magnitude", "error"] = Field(
        "error", description="channel importance for pruned donors: magnitude (group L1) or error (measured on adapted calibration activations)")


class DonorBlock(nn.Module):
    """``out_adapter(body(in_adapter(x)))``: a donor segment between two channel adapters."""

    def __init__(self, in_adapter: nn.Module, body: nn.Module, out_adapter: nn.Module) -> None:
        super().__init__()
        self.in_adapter = in_adapter
        self.body = body
        self.out_adapter = out_adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_adapter(self.body(self.in_adapter(x)))


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[2:]) if len(shape) == 4 else tuple(shape[1:-1])


def _channels(shape: tuple[int, ...]) -> int:
    return int(shape[1]) if len(shape) == 4 else int(shape[-1])


class TimmDonors:
    """Block source ``timm-donors`` (see the module docstring)."""

    def __init__(self, options: TimmDonorsOptions | None = None) -> None:
        self.options = options or TimmDonorsOptions()
        self._failed: set[str] = set()

    # -- donors ----------------------------------------------------------------------------------

    def _weights(self, ctx: Any) -> Any:
        w = self.options.donor_weights
        return getattr(ctx, "donor_weights", "auto") if w == "context" else w

    def _donor(self, ctx: Any, name: str, weights: Any) -> Any:
        try:
            return ctx.donor(name, weights=weights)
        except TypeError:  # a BlockContext without the weights keyword
            return ctx.donor(name)

    def _donor_activation(self, ctx: Any, name: str, index: int, weights: Any) -> torch.Tensor:
        if hasattr(ctx, "donor_activation"):
            return ctx.donor_activation(name, index, weights=weights)
        part = self._donor(ctx, name, weights)
        return run_batched(lambda x: part.activations(x, [index])[index], ctx.calibration_inputs(),
                           device=getattr(ctx, "device", "cpu"))

    # -- matching --------------------------------------------------------------------------------

    def _candidates(self, ctx: Any, segment: SegmentInfo, name: str, donor: Any) -> list[tuple]:
        teacher = ctx.teacher
        tcp, dcp = teacher.cut_points, donor.cut_points
        nt, nd = len(tcp), len(dcp)
        a, b = tcp[segment.start], tcp[segment.end]
        rank_in, rank_out = len(a.shape), len(b.shape)

        def key(cps: list, i: int) -> set[str]:
            return {cps[i].name, "next:" + cps[i + 1].name} if i + 1 < len(cps) else {cps[i].name}

        ka, kb = key(tcp, segment.start), key(tcp, segment.end)
        pos_a, pos_b = segment.start / max(1, nt - 1), segment.end / max(1, nt - 1)
        out = []
        for u in range(nd - 1):
            du = dcp[u]
            if len(du.shape) != rank_in:
                continue
            same_in = _spatial(du.shape) == _spatial(a.shape)
            if self.options.same_stride_only and not same_in:
                continue
            name_u = bool(key(dcp, u) & ka)
            for w in range(u + 1, nd):
                dw = dcp[w]
                if len(dw.shape) != rank_out:
                    continue
                same_out = _spatial(dw.shape) == _spatial(b.shape)
                if same_in and not same_out:
                    continue
                if not same_in and max(1, dw.stride // max(1, du.stride)) != segment.reduction:
                    continue
                if not donor.has_compute(donor.segment(u, w)):
                    continue
                names = int(name_u) + int(bool(key(dcp, w) & kb))
                dist = abs(u / max(1, nd - 1) - pos_a) + abs(w / max(1, nd - 1) - pos_b)
                out.append((0 if same_in else 1, -names, dist, name, u, w))
        out.sort()
        return out

    def _runs_to_shape(self, ctx: Any, segment: SegmentInfo, donor: Any, u: int, w: int) -> bool:
        """Whether the donor segment, fed the teacher's spatial size, gives the teacher's."""
        a = ctx.teacher.cut_points[segment.start]
        du = donor.cut_points[u]
        shape = (1, _channels(du.shape), *_spatial(a.shape)) if len(a.shape) == 4 else (1, *a.shape[1:-1], _channels(du.shape))
        try:
            with torch.no_grad():
                y = donor.extract(donor.segment(u, w))(torch.zeros(shape, device=getattr(ctx, "device", "cpu")))
        except Exception:
            return False
        return _spatial(tuple(y.shape)) == _spatial(tuple(segment.out_shape))

    def propose(self, ctx: Any, segment: SegmentInfo) -> list[AlternativeSpec]:
        if len(segment.in_shape) not in (2, 3, 4) or len(segment.out_shape) not in (2, 3, 4):
            return []
        weights = self._weights(ctx)
        limit = None
        if self.options.max_params_ratio is not None:
            limit = self.options.max_params_ratio * count_parameters(ctx.teacher.extract(segment))
        found: list[tuple] = []
        for name in self.options.donors:
            if name == getattr(ctx, "teacher_name", None) or name in self._failed:
                continue
            try:
                donor = self._donor(ctx, name, weights)
            except Exception as exc:  # one unavailable donor must not stop the others
                self._failed.add(name)
                warnings.warn(f"timm-donors: donor {name!r} is unavailable and was skipped: {exc}")
                continue
            taken = 0
            for cand in self._candidates(ctx, segment, name, donor):
                if taken >= self.options.per_donor:
                    break
                if cand[0] == 1 and not self._runs_to_shape(ctx, segment, donor, cand[4], cand[5]):
                    continue
                if limit is not None and count_parameters(donor.extract(donor.segment(cand[4], cand[5]))) > limit:
                    break  # the best match is no cheaper: worse-matched pieces would not be either
                found.append(cand)
                taken += 1
        found.sort()
        specs = []
        whole = ctx.teacher.is_whole(segment)
        stitched = not whole and ctx.teacher.is_stitched(segment)  # a stage-long pretrained piece
        for tier, names, dist, name, u, w in found[: self.options.max_per_segment]:
            base = AlternativeSpec(
                source=NAME, kind="donor", label=f"{name}[{u}-{w}]",
                options={"donor": name, "donor_start": u, "donor_end": w,
                         "same_stride": tier == 0, "name_matches": -names},
                lr_scale=self.options.whole_lr_scale if whole or stitched else 1.0,
                max_images=(self.options.whole_max_images if whole
                            else self.options.stitch_max_images if stitched else None))
            specs.append(base)
            specs.extend(self._pruned_specs(ctx, segment, base, weights))
        return specs

    # -- pruned donors -----------------------------------------------------------------------------

    def _pruner(self, ratios: list[float] | None = None) -> Any:
        from bespoke_plugins.pruned_self import PrunedSelf, PrunedSelfOptions

        return PrunedSelf(PrunedSelfOptions(ratios=ratios or self.options.prune_ratios or [0.5],
                                            importance=self.options.prune_importance))

    def _body_example(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))

    def _body_in_shape(self, ctx: Any, segment: SegmentInfo, donor: Any, u: int) -> tuple[int, ...]:
        """What the donor body is fed: the donor's channels at ``u``, the teacher's spatial size."""
        a = ctx.teacher.cut_points[segment.start]
        c = _channels(donor.cut_points[u].shape)
        return (1, c, *_spatial(a.shape)) if len(a.shape) == 4 else (1, *a.shape[1:-1], c)

    def _pruned_specs(self, ctx: Any, segment: SegmentInfo, base: AlternativeSpec, weights: Any) -> list[AlternativeSpec]:
        if not self.options.prune_ratios:
            return []
        body, donor = self._body(ctx, base, weights)
        body.cpu()
        shape = self._body_in_shape(ctx, segment, donor, int(base.options["donor_start"]))
        example = self._body_example(shape)
        with torch.no_grad():
            out_shape = tuple(body(example).shape)
        pruner = self._pruner()
        found = pruner.trial(body, example, out_shape)
        if found is None:
            return []
        sizes, allow_reshape = found
        specs = []
        for ratio in self.options.prune_ratios:
            if not any(pruner._removed(n, blocks, ratio) for n, blocks in sizes):
                continue
            specs.append(base.model_copy(update={
                "kind": "donor-pruned", "label": f"{base.label}-pruned-{int(round(ratio * 100))}",
                "options": {**base.options, "prune_ratio": ratio, "prune_importance": self.options.prune_importance,
                            "allow_reshape": allow_reshape, "body_in_shape": list(shape)}}))
        return specs

    # -- building --------------------------------------------------------------------------------

    def _body(self, ctx: Any, spec: AlternativeSpec, weights: Any) -> tuple[nn.Module, Any]:
        o = spec.options
        donor = self._donor(ctx, o["donor"], weights)
        u, w = int(o["donor_start"]), int(o["donor_end"])
        return copy.deepcopy(donor.extract(donor.segment(u, w))).eval(), donor

    def create(self, ctx: Any, segment: SegmentInfo, spec: AlternativeSpec) -> tuple[nn.Module, AlternativeSpec]:
        weights = self._weights(ctx)
        body, donor = self._body(ctx, spec, weights)
        u = int(spec.options["donor_start"])
        n = self.options.calibration_images
        x = ctx.teacher_activation(segment.start)
        target = ctx.teacher_activation(segment.end)
        y = self._donor_activation(ctx, spec.options["donor"], u, weights)
        if n is not None:
            x, target, y = x[:n], target[:n], y[:n]
        if _spatial(tuple(y.shape)) != _spatial(tuple(x.shape)):
            if y.dim() != 4:
                raise UsageError(f"timm-donors: {spec.label} has {y.shape[1]} tokens where the teacher has "
                                 f"{x.shape[1]}; token donors must match the teacher's patch grid")
            y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        no_in_adapter = x.shape == y.shape and torch.equal(x, y)  # the donor starts where the teacher does
        in_adapter = nn.Identity() if no_in_adapter else fit_linear_adapter(x, y, ridge=self.options.ridge)
        device = getattr(ctx, "device", "cpu")  # the donor runs where the context put it
        pruned_update: dict[str, Any] = {}
        if "prune_ratio" in spec.options:
            o = spec.options
            importance = o.get("prune_importance", self.options.prune_importance)
            shape = tuple(int(v) for v in o["body_in_shape"])
            body.cpu()
            calib = run_batched(in_adapter, x[:32]) if importance == "error" else None
            plan = self._pruner([float(o["prune_ratio"])]).prune(
                body, self._body_example(shape), float(o["prune_ratio"]), importance, calib,
                bool(o.get("allow_reshape", True)))
            body.to(device)
            pruned_update = {"pruned": plan, "prune_importance": importance}
        in_adapter.to(device)
        z = run_batched(lambda t: body(in_adapter(t)), x, device=device)
        if z.dim() != target.dim() or _spatial(tuple(z.shape)) != _spatial(tuple(target.shape)):
            raise UsageError(f"timm-donors: {spec.label} gives {tuple(z.shape[1:])} where segment "
                             f"{segment.id} of the teacher gives {tuple(target.shape[1:])}")
        no_out_adapter = False
        if z.dim() == 2 and z.shape[1] == target.shape[1] and z.shape[0] < 4 * z.shape[1]:
            # Logits to logits (the segment ends at the classifier): far fewer images than
            # classes leave the least-squares map underdetermined, so it would interpolate the
            # calibration images. The donor's classes are the teacher's: no output adapter (a
            # 1000 x 1000 identity would add a million parameters and nothing the donor's own
            # classifier, which trains, cannot do).
            out_adapter, no_out_adapter = nn.Identity(), True
        else:
            out_adapter = fit_linear_adapter(z, target, ridge=self.options.ridge)
        module = DonorBlock(in_adapter, body, out_adapter).cpu().eval()
        with torch.no_grad():
            fitted = module(x[:8])
            err = F.mse_loss(fitted, target[:8]).item() / max(target[:8].pow(2).mean().item(), 1e-12)
        done = spec.model_copy(update={"options": {
            **spec.options,
            "ndim": x.dim(),
            "out_ndim": z.dim(),
            "in_channels": [_channels(tuple(x.shape)), _channels(tuple(y.shape))],
            "out_channels": [_channels(tuple(z.shape)), _channels(tuple(target.shape))],
            "weights": weights if weights is None or isinstance(weights, str) else str(weights),
            "relative_mse": err,
            "params": count_parameters(module),
            **pruned_update,
            **({"in_adapter": "none"} if no_in_adapter else {}),
            **({"out_adapter": "none"} if no_out_adapter else {}),
        }})
        return module, done

    def rebuild(self, ctx: Any, segment: SegmentInfo, spec: AlternativeSpec) -> nn.Module:
        body, _ = self._body(ctx, spec, None)
        body.cpu()
        o = spec.options
        if "pruned" in o:
            from bespoke_plugins.pruned_self import PrunedSelf

            PrunedSelf.replay(body, self._body_example(tuple(int(v) for v in o["body_in_shape"])), o["pruned"])
        ndim = int(o["ndim"])
        out_ndim = int(o.get("out_ndim", ndim))  # houses written before out_ndim: same as input
        out = nn.Identity() if o.get("out_adapter") == "none" else linear_adapter(*o["out_channels"], out_ndim)
        into = nn.Identity() if o.get("in_adapter") == "none" else linear_adapter(*o["in_channels"], ndim)
        return DonorBlock(into, body, out).eval()


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name=NAME, category="block-source", factory=TimmDonors, options_model=TimmDonorsOptions,
                          description="Matching segments of other pretrained timm models, with least-squares 1x1 channel adapters"))
