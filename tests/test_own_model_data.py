"""benchmarks/data/caltech101.py: the seeded, stratified split of the own-model benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "data"))
import caltech101  # noqa: E402


@pytest.fixture()
def categories(tmp_path):
    root = tmp_path / "101_ObjectCategories"
    for name, n in (("accordion", 20), ("ant", 41), ("Faces", 30), ("Faces_easy", 30), ("BACKGROUND_Google", 10)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"image_{i:04d}.jpg").write_bytes(f"{name} {i}: not decoded here".encode())
    return root


def test_the_split_is_stratified_seeded_and_leaves_out_the_near_copies(categories, tmp_path):
    out = tmp_path / "split"
    assert caltech101.main(["--images", str(categories), "--out", str(out)]) == 0
    record = json.loads((out / "split.json").read_text())
    assert sorted(record["per_class"]) == ["Faces", "accordion", "ant"]  # no Faces_easy, no BACKGROUND_Google
    for c, n in (("accordion", 20), ("ant", 41), ("Faces", 30)):
        got = record["per_class"][c]
        assert sum(got.values()) == n and got["test"] == round(0.485 * n) and got["selection"] >= 1
    paths = {r: {p.resolve() for p in (out / r).rglob("*.jpg")} for r in ("train", "selection", "test")}
    assert not (paths["train"] & paths["test"]) and not (paths["train"] & paths["selection"])
    assert not (paths["selection"] & paths["test"])
    pool = {p.resolve() for p in (out / "pool").iterdir()}
    assert pool == paths["train"]  # the same images, flat, without labels
    again = caltech101.split(categories, seed=0)
    assert caltech101.digest_of(again) == record["digest"] == record["drawn"]  # no copies here
    assert caltech101.digest_of(caltech101.split(categories, seed=1)) != record["digest"]


def test_copies_of_a_training_image_are_taken_out_of_selection_and_test(categories, tmp_path):
    drawn = caltech101.split(categories, seed=0)
    original = drawn["train"]["ant"][0]
    copies = [drawn["selection"]["ant"][0], drawn["test"]["ant"][0], drawn["test"]["ant"][1]]
    for c in copies:  # the same photo under three other names (Caltech-101 has a few)
        c.write_bytes(original.read_bytes())
    out = tmp_path / "split"
    assert caltech101.main(["--images", str(categories), "--out", str(out)]) == 0
    record = json.loads((out / "split.json").read_text())
    assert sorted(record["copies_dropped"]["selection"]) == [str(copies[0].resolve())]
    assert sorted(record["copies_dropped"]["test"]) == sorted(str(c.resolve()) for c in copies[1:])
    for c in copies:
        assert not any(p.resolve() == c.resolve() for r in ("selection", "test") for p in (out / r).rglob("*.jpg"))
    assert record["counts"]["test"] == sum(round(0.485 * n) for n in (20, 41, 30)) - 2
    assert caltech101.main(["--images", str(categories), "--out", str(out)]) == 0  # rerun: the same split


def test_another_split_is_refused_in_the_same_folder_and_a_missing_folder_is_an_error(categories, tmp_path, capsys):
    out = tmp_path / "split"
    assert caltech101.main(["--images", str(categories), "--out", str(out)]) == 0
    assert caltech101.main(["--images", str(categories), "--out", str(out)]) == 0  # the same split: fine
    assert caltech101.main(["--images", str(categories), "--out", str(out), "--seed", "3"]) == 2
    assert "holds another split" in capsys.readouterr().err
    assert caltech101.main(["--images", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_benchmarks_configure_a_valid_run(tmp_path):
    """lite2_cpu.py's and own_model.py's run configurations validate (broad pool, stitched stages,
    the user's checkpoint, no class list for a task of its own), without running anything."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lite2_cpu
    import own_model

    from bespoke.config import RunConfig, SearchConfig

    args = lite2_cpu.parse_args(["--out", str(tmp_path / "b")])
    assert args.pool == "broad" and args.data_balance == "none" and args.stitch
    assert lite2_cpu.parse_args(["--out", "x", "--pool", "extra"]).data_balance == "class"
    layout = {"distill": tmp_path / "d", "selection": tmp_path / "s", "class_list": tmp_path / "classes.txt"}
    cfg = RunConfig.model_validate(lite2_cpu.run_config(args, layout, 200, [0.5, 0.7]))
    assert cfg.build.stitch_sources == ["timm-donors"] and cfg.search.zoo
    assert cfg.search.pick_margin == SearchConfig().pick_margin  # the run's default, unless asked
    wide = lite2_cpu.parse_args(["--out", "x", "--pick-margin", "0.1"])
    assert RunConfig.model_validate(lite2_cpu.run_config(wide, layout, 200, [0.5])).search.pick_margin == 0.1
    split = tmp_path / "split"
    (split / "selection" / "a").mkdir(parents=True)
    (split / "selection" / "a" / "x.jpg").write_bytes(b"")
    own = own_model.parse_args(["--split", str(split), "--out", str(tmp_path / "o"), "--quick"])
    cfg = RunConfig.model_validate(own_model.bespoke_config(own, tmp_path / "o", [0.5], tmp_path / "cache"))
    assert cfg.teacher_weights == str(tmp_path / "cache" / "teacher.safetensors") and cfg.class_list is None
    assert cfg.data == str(split / "pool") and cfg.val_data == str(split / "selection")
    assert cfg.build.validation_images == 1 and cfg.search.input_sizes == [224]
