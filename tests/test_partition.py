"""bespoke.partition over many timm families (random weights, 64 px), and `bespoke inspect`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from _families import FAMILIES, INPUT_SHAPE, example, teacher
from bespoke.errors import UsageError
from bespoke.partition import Partition


@pytest.mark.parametrize("name", FAMILIES)
def test_cut_points_and_activations(name):
    part = teacher(name)
    cps = part.cut_points
    assert len(cps) >= 10
    assert [c.index for c in cps] == list(range(len(cps)))
    assert cps[0].shape == INPUT_SHAPE and cps[0].stride == 1
    x = example()
    with torch.no_grad():
        want = part.model(x)
        acts = part.activations(x, range(len(cps)))
    assert cps[-1].shape == (1, *want.shape[1:])  # the last cut point is the output
    assert torch.equal(acts[len(cps) - 1], want)
    assert acts[0] is x
    for c in cps:
        assert tuple(acts[c.index].shape[1:]) == c.shape[1:], c  # batch is free
        assert c.stride >= 1
    strides = [c.stride for c in cps if len(c.shape) == 4]
    assert max(strides) >= 16  # the network downsamples


@pytest.mark.parametrize("name", FAMILIES)
def test_extracted_segments_reproduce_activations(name):
    part = teacher(name)
    segs = part.sample_segments(6, seed=3)
    assert segs
    x = example()
    with torch.no_grad():
        acts = part.activations(x, {i for s in segs for i in (s.start, s.end)})
        for seg in segs:
            before = acts[seg.start].clone()
            out = part.extract(seg)(acts[seg.start])
            assert torch.equal(out, acts[seg.end]), seg
            assert torch.equal(acts[seg.start], before)  # segments never write into their input


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "vit_tiny_patch16_224"])
def test_sampling_is_deterministic_bounded_and_has_compute(name):
    part = teacher(name)
    k = len(part.cut_points)
    a = part.sample_segments(20, max_fraction=0.3, seed=7)
    assert a == part.sample_segments(20, max_fraction=0.3, seed=7)
    assert a != part.sample_segments(20, max_fraction=0.3, seed=8)
    assert len({s.id for s in a}) == len(a)
    for s in a:
        assert 0 <= s.start < s.end < k
        assert s.end - s.start <= max(1, int(0.3 * (k - 1 - s.start)))
        assert part.has_compute(s)
        assert s == part.segment(s.start, s.end)


def test_enumerate_segments_covers_everything_with_compute():
    part = teacher("resnet18")
    segs = part.enumerate_segments(3)
    ids = {s.id for s in segs}
    assert len(ids) == len(segs)
    assert all(1 <= s.end - s.start <= 3 and part.has_compute(s) for s in segs)
    k = len(part.cut_points)
    every = {part.segment(s, e).id for s in range(k - 1) for e in range(s + 1, min(k, s + 4))
             if part.has_compute(part.segment(s, e))}
    assert ids == every
    # every cut point transition with compute is covered by some segment
    assert {s.end for s in segs} >= {e for e in range(1, k) if part.has_compute(part.segment(e - 1, e))}


def test_segment_bounds_are_checked():
    part = teacher("resnet18")
    with pytest.raises(UsageError):
        part.segment(3, 3)
    with pytest.raises(UsageError):
        part.segment(0, len(part.cut_points))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.conv(x)
        return self.conv(-x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.body = _Branchy()

    def forward(self, x):
        return self.body(torch.relu(self.stem(x)))


def test_untraceable_model_names_module_and_fix():
    with pytest.raises(UsageError) as info:
        Partition.from_model(_Net(), (1, 3, 8, 8))
    msg = str(info.value)
    assert "'body'" in msg and "_Branchy" in msg
    assert "leaf_modules=[_Branchy]" in msg
    assert "control flow" in msg
    assert "Traceback" not in msg and "torch/fx" not in msg
    # and the fix it names works: the leaf stays whole
    part = Partition.from_model(_Net(), (1, 3, 8, 8), leaf_modules=[_Branchy])
    assert part.cut_points[-1].name == "body"


def test_inplace_activations_do_not_corrupt_shared_activations():
    part = teacher("resnet18")  # timm's ResNet uses ReLU(inplace=True)
    x = example()
    with torch.no_grad():
        acts = part.activations(x, range(len(part.cut_points)))
        again = part.activations(x, range(len(part.cut_points)))
    assert all(torch.equal(acts[i], again[i]) for i in acts)


def test_token_stride_is_patch_size():
    part = teacher("vit_tiny_patch16_224")
    tokens = [c for c in part.cut_points if len(c.shape) == 3]
    assert tokens and all(c.stride == 16 for c in tokens)


def test_resized_partition_keeps_cut_points_at_another_size():
    part = teacher("resnet18")
    small = part.resized(48)
    assert part.resized(INPUT_SHAPE[-1]) is part
    assert [c.name for c in small.cut_points] == [c.name for c in part.cut_points]
    seg = part.tile_segments(3)[1]
    mine = small.segment(seg.start, seg.end)
    assert mine.in_shape[1] == seg.in_shape[1] and mine.in_shape[-1] < seg.in_shape[-1]
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        acts = small.activations(x, [seg.start, seg.end])
        torch.testing.assert_close(small.extract(mine)(acts[seg.start]), acts[seg.end])


def test_resized_partition_of_a_fixed_size_model_is_a_clear_error():
    part = teacher("vit_tiny_patch16_224")  # its position embedding fixes the patch grid
    with pytest.raises(UsageError, match="does not run on an input"):
        part.resized(32)


# ---- the CLI ---------------------------------------------------------------------------------


def test_inspect_json_lite2_has_many_cut_points(cli):
    res = cli("inspect", "tf_efficientnet_lite2", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert set(info) == {"model", "input_shape", "cut_points"}
    assert info["model"] == "tf_efficientnet_lite2"
    assert info["input_shape"] == [1, 3, 260, 260]
    assert len(info["cut_points"]) >= 15
    first = info["cut_points"][0]
    assert set(first) == {"index", "name", "shape", "stride"}
    assert first["stride"] == 1 and first["shape"] == [1, 3, 260, 260]
    assert info["cut_points"][-1]["shape"] == [1, 1000]


def test_inspect_callable_reference(cli):
    tests_dir = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = cli("inspect", "_families:vit_tiny_patch16_64", "--json", env=env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["input_shape"] == [1, 3, 64, 64]  # the size the ViT was built for
    assert any(c["shape"] == [1, 17, 192] and c["stride"] == 16 for c in info["cut_points"])


def _main(capsys, *argv):
    from bespoke.cli import main

    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_table_and_input_size(capsys):
    code, out, err = _main(capsys, "inspect", "resnet18", "--input-size", "64")
    assert code == 0, err
    assert "cut points" in out and "layer1_0_act2" in out and "(1, 64, 16, 16)" in out


def test_inspect_unknown_model_exit_2(capsys):
    code, out, err = _main(capsys, "inspect", "resnet_nope")
    assert code == 2
    assert "timm does not know a model named 'resnet_nope'" in err
    assert "Traceback" not in err


def test_inspect_wrong_input_size_exit_2(capsys):
    code, out, err = _main(capsys, "inspect", "vit_tiny_patch16_224", "--input-size", "64")
    assert code == 2
    assert "(3, 224, 224)" in err and "Traceback" not in err


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean()


def test_model_must_return_one_tensor():
    with pytest.raises(UsageError, match="returns a tuple; bespoke needs a model whose forward returns a single tensor"):
        Partition.from_model(_TwoOutputs(), (1, 3, 8, 8))


def test_optional_forward_arguments_are_fixed_away():
    part = teacher("vit_tiny_patch16_224")  # forward(x, attn_mask=None, is_causal=False)
    assert [n.name for n in part.gm.graph.nodes if n.op == "placeholder"] == ["x"]
    seg = part.segment(0, 6)
    sub = part.extract(seg)
    assert [n.op for n in sub.graph.nodes].count("placeholder") == 1
    x = example()
    with torch.no_grad():
        assert torch.equal(sub(x), part.activations(x, [6])[6])


def test_tile_segments_cover_the_network_without_overlap():
    import timm

    from bespoke.partition import Partition

    part = Partition.from_model(timm.create_model("resnet18"), (1, 3, 64, 64))
    last = len(part.cut_points) - 1
    for n in (1, 3, 6, 100):
        tiles = part.tile_segments(n)
        assert tiles[0].start == 0 and tiles[-1].end == last
        assert all(a.end == b.start for a, b in zip(tiles, tiles[1:]))  # consecutive, no overlap
        assert all(part.has_compute(t) for t in tiles)
        assert len(tiles) <= min(n, last)


@pytest.mark.parametrize("name", FAMILIES)
def test_module_segments_are_the_networks_blocks(name):
    part = teacher(name)
    segs = part.module_segments(0.5)
    assert segs, "every family has blocks that map a cut point to a cut point"
    last = len(part.cut_points) - 1
    assert segs == sorted(segs, key=lambda s: (s.start, s.end))
    assert len({(s.start, s.end) for s in segs}) == len(segs)
    for s in segs:
        assert part.has_compute(s)
        assert s.end - s.start <= 0.5 * last
    # each segment ends at the last node of a (non-leaf) module, so residual blocks appear whole:
    # the family's residual blocks give identity-shaped segments a skip can replace
    if name not in ("vit_tiny_patch16_224",):  # ViT's blocks are residual too, checked below
        assert any(s.in_shape == s.out_shape for s in segs)
    x = example()
    with torch.no_grad():
        acts = part.activations(x, {i for s in segs for i in (s.start, s.end)})
        for s in segs[:6]:
            assert torch.equal(part.extract(s)(acts[s.start]), acts[s.end]), s


def test_module_segments_of_efficientnet_match_its_blocks():
    part = teacher("tf_efficientnet_lite0")
    names = [c.name for c in part.cut_points]
    segs = part.module_segments(1.0)
    ends = {names[s.end] for s in segs}
    # the last node of every block is a cut point; a stride-2 block ends at its last norm
    assert "blocks_1_0_bn3" in ends and "add" in ends
    by_end = {names[s.end]: s for s in segs}
    first = by_end["add"]  # blocks.1.1: the first residual block, from the output of blocks.1.0
    assert names[first.start] == "blocks_1_0_bn3" and first.in_shape == first.out_shape
    assert all(e - s < last for s, e, last in [(s.start, s.end, len(names) - 1) for s in segs])
    with pytest.raises(UsageError):
        part.module_segments(0)


def test_module_segments_need_no_leaf_layers():
    """Leaf layers (a conv, a norm) are not segments: only modules with children."""
    part = teacher("resnet18")
    names = [c.name for c in part.cut_points]
    for s in part.module_segments(1.0):
        assert s.end - s.start >= 2 or not names[s.end].startswith(("conv", "bn"))
