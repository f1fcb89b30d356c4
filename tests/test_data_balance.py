"""``data_balance``: distillation images drawn with an equal share per class or per root, so a
pool skewed to a few classes (imagenet-extra's 20) trains the blocks on every class."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_cli  # noqa: E402
from test_data_roles import CLASSES, GOLDFISH, SHARK, TENCH, _folder  # noqa: E402

from bespoke import data  # noqa: E402
from bespoke.errors import UsageError  # noqa: E402


def _skewed(tmp_path: Path) -> data.ImageSet:
    """Ten tench, three goldfish, one shark: 14 labelled images in class folders."""
    (tmp_path / "classes.txt").write_text(CLASSES)
    names = ([f"{TENCH}/t{i}.png" for i in range(10)] + [f"{GOLDFISH}/g{i}.png" for i in range(3)]
             + [f"{SHARK}/s0.png"])
    return data.open_images(str(_folder(tmp_path / "pool", names, 1)))


def test_class_balance_gives_every_class_an_equal_share_of_as_many_draws(tmp_path):
    pool = _skewed(tmp_path)
    drawn = pool.balanced("class", seed=0)
    assert len(drawn) == len(pool) == 14
    shares = Counter(it.label for it in drawn.items)
    assert sorted(shares.values()) == [4, 5, 5]  # 14 draws over 3 classes
    # the shark's one image repeats; the tench's draws are distinct images of it
    assert Counter(it.name for it in drawn.items)[f"{SHARK}/s0.png"] == shares[2]
    tench = [it.name for it in drawn.items if it.label == 0]
    assert len(set(tench)) == len(tench)
    distinct = drawn.distinct()
    assert len(distinct) == len({it.name for it in drawn.items}) == len(set(tench)) + 3 + 1
    assert distinct.distinct() is distinct
    # seeded: the same draws and order for the same seed, another order for another
    assert [it.name for it in pool.balanced("class", seed=0).items] == [it.name for it in drawn.items]
    assert [it.name for it in pool.balanced("class", seed=1).items] != [it.name for it in drawn.items]
    # repeats are separate items of the stream: each is decoded and augmented on its own
    x = drawn.with_transform(lambda img: __import__("torch").zeros(3))
    assert all(x[i] is not None for i in range(len(x)))


def test_none_and_groups_of_one_size_leave_the_set_as_it_is(tmp_path):
    pool = _skewed(tmp_path)
    assert pool.balanced("none") is pool
    even = pool.subset([0, 1, 10, 11])  # two tench, two goldfish
    assert even.balanced("class") is even
    assert pool.balanced("root") is pool  # one root
    with pytest.raises(UsageError, match="data_balance 'classes' is not one of none, class, root"):
        pool.balanced("classes")


def test_unlabelled_images_balance_by_root(tmp_path):
    many = _folder(tmp_path / "many", [f"m{i}.png" for i in range(9)], 2)
    few = _folder(tmp_path / "few", ["f0.png"], 3)
    both = data.open_images([str(many), str(few)])
    assert not both.labelled
    for by in ("class", "root"):  # without labels, a class share falls back to the roots
        shares = Counter(it.root for it in both.balanced(by).items)
        assert shares == {"many": 5, "few": 5}


def test_prepare_takes_the_held_out_images_off_before_drawing(tmp_path):
    import torch

    model = torch.nn.Conv2d(3, 4, 3)
    pool = _skewed(tmp_path)
    plain = data.prepare(model, 32, data=pool.source, held_out=4)
    split = data.prepare(model, 32, data=pool.source, held_out=4, balance="class")
    assert plain.balance == "none" and split.balance == "class"
    assert [it.name for it in split.val.items] == [it.name for it in plain.val.items]
    held = {it.name for it in split.val.items}
    assert not held & {it.name for it in split.train.items}  # never redrawn into training
    assert len(split.train) == split.pool_images == len(plain.train) == 10
    assert len(Counter(it.label for it in split.train.items)) == len({it.label for it in plain.train.items})


def test_config_names_the_choices():
    from bespoke.config import load_config

    assert load_config(None, {}).data_balance == "none"
    assert load_config(None, {"data_balance": "class"}).data_balance == "class"
    with pytest.raises(UsageError, match="data_balance"):
        load_config(None, {"data_balance": "classes"})


def test_a_run_says_how_it_drew_and_the_house_records_it(tmp_path):
    many = _folder(tmp_path / "many", [f"m{i}.png" for i in range(12)], 4)
    few = _folder(tmp_path / "few", [f"f{i}.png" for i in range(4)], 5)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"preset": "tiny", "data": [str(many), str(few)], "data_balance": "root",
                               "out": str(tmp_path / "out")}))
    proc = run_cli("run", str(cfg), cwd=tmp_path, timeout=600,
                   env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("data_balance"))
    assert "data_balance root:" in line and "equal per root" in line and len(line) <= 80
    manifest = json.loads((tmp_path / "out" / "house" / "manifest.json").read_text())
    assert manifest["data"]["balance"] == "root" and manifest["data"]["train_images"] == manifest["data"]["pool_images"]


def test_the_command_line_option_reads_and_refuses_well():
    proc = run_cli("build", "--data-balance", "classes", "--out", "unused", timeout=120)
    assert proc.returncode == 2 and "data_balance" in proc.stderr and "class" in proc.stderr
    assert "Traceback" not in proc.stderr
