"""Images from several roots, and the three roles a run's images play (distillation, selection,
scoring), which must share no image: by file, by bytes or by pixels."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import IMAGENET_SAMPLE, SAMPLE_MISSING, run_cli  # noqa: E402

from bespoke import data, roles as R  # noqa: E402
from bespoke.errors import UsageError  # noqa: E402

TENCH, GOLDFISH, SHARK = "n01440764", "n01443537", "n01484850"
CLASSES = f"0\t{TENCH}\ttench\n1\t{GOLDFISH}\tgoldfish\n2\t{SHARK}\tgreat_white_shark\n"


def _photo(seed: int, size: int = 64) -> Image.Image:
    """A smooth colour gradient with a few rectangles: structure, unlike white noise, so that a
    re-encoded copy stays close to it and another photo does not."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = rng.uniform(-1, 1, (3, 3))
    img = np.stack([a[c, 0] * xx + a[c, 1] * yy + a[c, 2] for c in range(3)], axis=-1)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, size // 2, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(-1, 1, 3)
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-6)
    return Image.fromarray((img * 255).astype(np.uint8))


def _save(path: Path, seed: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _photo(seed).save(path, **kw)
    return path


def _folder(path: Path, names: list[str], seed: int = 0) -> Path:
    for i, name in enumerate(names):
        _save(path / name, seed * 100 + i)
    return path


# -- several roots ---------------------------------------------------------------------------


def test_class_subfolders_flat_wordnet_files_and_a_dataset_combine_with_unique_names(tmp_path):
    (tmp_path / "classes.txt").write_text(CLASSES)
    by_class = _folder(tmp_path / "by_class", [f"{TENCH}/a.png", f"{TENCH}/b.png", f"{GOLDFISH}/a.png"], 1)
    flat = _folder(tmp_path / "flat", [f"{SHARK}_a.png", f"{TENCH}_x.png"], 2)
    both = data.open_images([str(by_class), str(flat)])  # classes.txt found in each one's parent
    assert both.labelled and len(both) == 5
    names = [it.name for it in both.items]
    assert len(set(names)) == 5 and names[0] == f"by_class/{TENCH}/a.png" and names[-1] == f"flat/{SHARK}_a.png"
    assert {it.name: it.label for it in both.items} == {
        f"by_class/{TENCH}/a.png": 0, f"by_class/{TENCH}/b.png": 0, f"by_class/{GOLDFISH}/a.png": 1,
        f"flat/{SHARK}_a.png": 2, f"flat/{TENCH}_x.png": 0}
    assert both.per_root() == {"by_class": 3, "flat": 2}
    assert both.subset([0, 4]).per_root() == {"by_class": 1, "flat": 1}
    x, y = both.with_transform(lambda img: __import__("torch").zeros(3))[4]
    assert y == 2

    # with an unlabelled root among them, the whole set is unlabelled, and says why
    bare = _folder(tmp_path / "photos" / "mine", ["p.png"], 3)
    mixed = data.open_images([str(by_class), str(flat), str(bare)])
    assert not mixed.labelled and {it.label for it in mixed.items} == {-1}
    assert "mine has no labels" in mixed.note and mixed.per_root()["mine"] == 1

    # a dataset root keeps its own names (ref[i]); a single root keeps its names as they were
    with_tiny = data.open_images([str(bare), "bespoke.tiny:images"])
    assert len(with_tiny) == 25 and with_tiny.items[1].name == "bespoke.tiny:images[0]"
    assert [it.name for it in data.open_images(str(flat)).items] == [f"{TENCH}_x.png", f"{SHARK}_a.png"]


def test_roots_with_the_same_folder_name_get_longer_names(tmp_path):
    a = _folder(tmp_path / "one" / "val", ["x.png"], 1)
    b = _folder(tmp_path / "two" / "val", ["x.png"], 2)
    both = data.open_images([str(a), str(b)])
    assert [it.name for it in both.items] == ["one/val/x.png", "two/val/x.png"]
    with pytest.raises(UsageError, match="twice"):
        data.open_images([str(a), str(tmp_path / "one" / ".." / "one" / "val")])


def test_roots_labelled_different_ways_ask_for_a_class_list(tmp_path):
    # one root by WordNet id through its classes.txt, the other by its sorted subfolder names
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "classes.txt").write_text(CLASSES)
    flat = _folder(tmp_path / "sample" / "train", [f"{SHARK}_a.png", f"{GOLDFISH}_b.png"], 1)
    extra = _folder(tmp_path / "extra" / "distill", [f"{GOLDFISH}/a.png", f"{TENCH}/b.png"], 2)
    with pytest.raises(UsageError, match="class_list") as err:
        data.open_images([str(flat), str(extra)])
    assert "train by WordNet ids through" in str(err.value) and "distill by its 2 sorted subfolder names" in str(err.value)
    fixed = data.open_images([str(flat), str(extra)], class_list=tmp_path / "sample" / "classes.txt")
    assert fixed.labelled and [it.label for it in fixed.items] == [1, 2, 0, 1]

    # two roots by subfolder index agree only with the same subfolders
    cats = _folder(tmp_path / "cats", ["cat/a.png", "dog/a.png"], 3)
    same = _folder(tmp_path / "more", ["cat/b.png", "dog/b.png"], 4)
    other = _folder(tmp_path / "other", ["cow/b.png", "dog/b.png"], 5)
    assert data.open_images([str(cats), str(same)]).labelled
    with pytest.raises(UsageError, match="class_list"):
        data.open_images([str(cats), str(other)])


def test_subfolders_partly_in_the_class_list_are_an_error(tmp_path):
    (tmp_path / "classes.txt").write_text(CLASSES)
    mixed = _folder(tmp_path / "mixed", [f"{TENCH}/a.png", "holiday/b.png"], 1)
    with pytest.raises(UsageError, match="holiday"):
        data.open_images(str(mixed))


def test_the_per_root_lines_fit_80_columns_and_name_every_root():
    counts = {f"/very/long/path/number/{i}/of/a/root/that/goes/on/and/on/images": 1000 * i for i in range(6)}
    lines = data.counts_line("images per root", counts).splitlines()
    assert all(len(line) <= 80 for line in lines) and lines[0].startswith("images per root: ...")
    assert [line.endswith(f"images {1000 * i}" + ("," if i < 5 else "")) for i, line in enumerate(lines)] == [True] * 6
    assert all(line.startswith("  ") for line in lines[1:])  # every root, none dropped
    assert data.counts_line("images per root", {"train": 500, "distill": 12447}) == \
        "images per root: train 500, distill 12447"


# -- images that fail to decode ----------------------------------------------------------------


def test_a_corrupt_image_is_skipped_and_named_in_one_line(tmp_path):
    import torch

    folder = _folder(tmp_path / "imgs", ["a.jpg", "b.jpg"], 1)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = data.open_images(str(folder)).with_transform(lambda img: torch.zeros(3, 8, 8))
    batch = data.collate([images[i] for i in range(len(images))])
    assert batch[0].shape[0] == 2 and images.skipped == ["broken.jpg"]
    line = data.skipped_line(images.skipped)
    assert line == "skipped 1 undecodable image(s): broken.jpg" and "\n" not in line
    many = data.skipped_line([f"some/folder/n0144{i:04d}_10026.JPEG" for i in range(40)])
    assert many == "skipped 40 undecodable image(s): n01440000_10026.JPEG and 39 more"
    long = data.skipped_line([f"n0144{i:04d}_a_very_very_long_name_indeed_and_longer.JPEG" for i in range(3)])
    assert len(long) == 71 and long.startswith("skipped 3 undecodable image(s): n01440000_a_very") and \
        long.endswith("...r.JPEG and 2 more")

    # digesting it does not fail either: it has no thumbnail, counts as skipped, and is not counted
    from bespoke.roles import image_digests, role_summary

    fresh = data.open_images(str(folder))
    digests = image_digests(fresh)
    assert len(digests) == 3 and [d.thumb is None for d in digests] == [False, False, True]
    assert fresh.skipped == ["broken.jpg"]
    assert role_summary({"distill": fresh})["distill_images"] == 2


# -- overlap between roles -------------------------------------------------------------------


def test_the_same_file_through_two_roots_is_an_error(tmp_path):
    train = _folder(tmp_path / "train", ["a.png", "b.png"], 1)
    score = _folder(tmp_path / "score", ["c.png"], 2)
    (score / "link").symlink_to(train)  # the same files through another path
    with pytest.raises(UsageError) as err:
        R.check_disjoint({"distill": data.open_images(str(train)),
                             "scoring": data.open_images(str(score / "link"))})
    text = str(err.value)
    assert "distillation images (data) and the scoring images (score_data) share 2 image(s)" in text
    assert f"{(train / 'a.png').resolve()} (the same file in both)" in text


def test_the_same_pixels_under_another_name_is_an_error(tmp_path):
    train = _folder(tmp_path / "train", ["a.png", "b.png", "c.png"], 1)
    val = _folder(tmp_path / "val", ["x.png"], 2)
    shutil.copy(train / "b.png", val / "copy_of_b.png")  # the same bytes
    _photo(102).save(val / "c_again.bmp")  # the same pixels as train/c.png, another format
    with pytest.raises(UsageError) as err:
        R.check_disjoint({"distill": data.open_images(str(train)), "selection": data.open_images(str(val))})
    text = str(err.value)
    assert "selection images" in text and "share 2 image(s)" in text
    train, val = train.resolve(), val.resolve()
    assert f"{train / 'b.png'} = {val / 'copy_of_b.png'} (the same bytes)" in text
    assert f"{train / 'c.png'} = {val / 'c_again.bmp'} (the same pixels)" in text


def test_a_copy_re_encoded_at_another_jpeg_quality_is_caught(tmp_path):
    train, score = tmp_path / "train", tmp_path / "score"
    for i in range(3):
        _save(train / f"t{i}.jpg", 10 + i, quality=95)
        _save(score / f"s{i}.jpg", 20 + i, quality=95)
    _save(score / "again.jpg", 11, quality=40)  # train/t1.jpg at quality 40
    roles = {"distill": data.open_images(str(train)), "scoring": data.open_images(str(score))}
    with pytest.raises(UsageError, match=r"t1\.jpg = .*again\.jpg \(the same pixels\)"):
        R.check_disjoint(roles)
    (score / "again.jpg").unlink()
    roles["scoring"] = data.open_images(str(score))
    assert set(R.check_disjoint(roles)) == {"distill", "scoring"}


def test_an_overlap_names_at_most_five_pairs_and_counts_them_all(tmp_path):
    train = _folder(tmp_path / "train", [f"{i}.png" for i in range(8)], 1)
    with pytest.raises(UsageError) as err:
        R.check_disjoint({"distill": data.open_images(str(train)), "scoring": data.open_images(str(train))})
    lines = str(err.value).splitlines()
    assert "share 8 image(s)" in lines[0] and lines[6] == "  and 3 more" and len(lines) == 8


def test_a_dataset_without_files_is_compared_by_its_decoded_pixels(tmp_path):
    from bespoke import tiny

    score = tmp_path / "score"
    score.mkdir()
    tiny.images()[5].save(score / "generated.png")
    roles = {"distill": data.open_images("bespoke.tiny:images"), "scoring": data.open_images(str(score))}
    with pytest.raises(UsageError, match=r"bespoke\.tiny:images\[5\] = .*generated\.png \(the same pixels\)"):
        R.check_disjoint(roles)


def test_role_summary_counts_and_digests_each_role(tmp_path):
    train = _folder(tmp_path / "train", ["a.png", "b.png", "c.png"], 1)
    val = _folder(tmp_path / "val", ["d.png"], 2)
    summary = R.role_summary({"distill": data.open_images(str(train)), "selection": data.open_images(str(val))})
    assert summary["distill_images"] == 3 and summary["selection_images"] == 1
    assert summary["scoring_images"] == 0 and summary["scoring_digest"] is None
    assert len(summary["distill_digest"]) == 16 and summary["distill_digest"] != summary["selection_digest"]
    # the digest is of the images, not of their order or names
    renamed = _folder(tmp_path / "renamed", ["z.png", "y.png", "x.png"], 1)  # a.png, b.png, c.png's pixels
    assert R.role_summary({"distill": data.open_images(str(renamed))})["distill_digest"] == summary["distill_digest"]
    other = _folder(tmp_path / "other", ["a.png", "b.png", "c.png"], 3)
    assert R.role_summary({"distill": data.open_images(str(other))})["distill_digest"] != summary["distill_digest"]


def test_roles_split_as_the_run_splits_and_only_given_selection_images_are_checked_against_data(tmp_path):
    import torch

    from bespoke.config import RunConfig
    from bespoke.stages.build import check_roles

    train = _folder(tmp_path / "train", [f"{i}.png" for i in range(10)], 1)
    roles = R.open_roles(str(train), held_out=3, seed=4)
    split = data.prepare(torch.nn.Conv2d(3, 3, 1), 32, data=str(train), held_out=3, seed=4)
    assert [it.name for it in roles["distill"].items] == [it.name for it in split.train.items]
    assert [it.name for it in roles["selection"].items] == [it.name for it in split.val.items]
    assert "scoring" not in roles

    summary, sets = check_roles(RunConfig.model_validate({"data": str(train), "build": {"validation_images": 3}}))
    assert (summary["distill_images"], summary["selection_images"], summary["scoring_images"]) == (7, 3, 0)
    with pytest.raises(UsageError, match="distillation images .* and the selection images"):
        check_roles(RunConfig.model_validate({"data": str(train), "val_data": str(train)}))
    with pytest.raises(UsageError, match="selection images .* and the scoring images"):
        check_roles(RunConfig.model_validate({"data": str(train), "score_data": str(train)}))


# -- configuration and command line ------------------------------------------------------------


def test_config_takes_a_root_or_a_list_and_bad_values_read_well():
    from bespoke.config import load_config

    assert load_config(None, {"data": "a"}).data == "a"
    cfg = load_config(None, {"data": ["a", "b"], "val_data": [Path("v")], "score_data": "s"})
    assert cfg.data == ["a", "b"] and cfg.val_data == ["v"] and cfg.score_data == "s"
    assert data.roots(cfg.data) == ["a", "b"] and data.roots("a") == ["a"] and data.roots(None) == []
    for value, words in ((5, "data = 5: int 5 is not an image source: give a folder path or "
                                "package.module:attribute, or a list of them"),
                         ([], "data = []: an empty list: give one or more folders"),
                         (["a", ""], "an empty string is not an image source"),
                         (["a", "b", "a"], "lists 'a' twice; give each folder once")):
        with pytest.raises(UsageError) as err:
            load_config(None, {"data": value})
        assert words in str(err.value) and "Value error" not in str(err.value)
    with pytest.raises(UsageError, match="score_data = 3"):
        load_config(None, {"score_data": 3})


def test_cli_image_options_repeat():
    from bespoke.cli import _roots

    assert _roots(None) is None and _roots([]) is None
    assert _roots(["a"]) == "a" and _roots(["a", "b"]) == ["a", "b"]
    proc = run_cli("build", "--data", "x", "--data", "x", "--out", "unused", timeout=120)
    assert proc.returncode == 2 and "lists 'x' twice" in proc.stderr


# -- a whole run with scoring images -----------------------------------------------------------


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    score = _folder(root / "score", [f"s{i}.png" for i in range(4)], 7)
    (score / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    proc = run_cli("run", "--preset", "tiny", "--out", str(root / "out"), "--score-data", str(score), cwd=root,
                   timeout=600, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((root / "out" / "report.json").read_text()), proc.stdout


def test_a_run_scores_teacher_and_students_once_on_the_scoring_images(scored_run):
    report, stdout = scored_run
    d = report["data"]
    assert (d["distill_images"], d["selection_images"], d["scoring_images"]) == (16, 8, 4)
    assert all(len(d[f"{r}_digest"]) == 16 for r in ("distill", "selection", "scoring"))
    t = report["teacher"]
    assert t["score_agreement"] == 1.0 and t["score_top1"] is None and t["score_images"] == 4  # unlabelled
    for s in report["students"]:
        assert 0 <= s["score_agreement"] <= 1 and s["score_top1"] is None and s["score_images"] == 4
    assert "score" in report["timings_s"] and "data" in report["timings_s"]
    assert "scored on 4 images nothing chose on (score_data)" in stdout
    assert "images: 16 to distil, 8 to select with, 4 to score; no image shared" in stdout
    warnings = [line for line in stdout.splitlines() if "undecodable" in line]
    assert warnings == [stdout.rstrip().splitlines()[-1]] and "broken.jpg" in warnings[0]
    assert len(warnings[0]) <= 80 and "broken.jpg" in d["skipped"]


def test_a_run_without_scoring_images_reports_none():
    from bespoke.report import ModelEntry, Report, score_table

    old = {"bespoke_version": "0", "created": "now", "teacher": {"name": "t", "params": 1}, "students": [],
           "timings_s": {}}
    report = Report.model_validate(old)  # a report written before these fields reads as before
    assert report.teacher.score_images == 0 and report.teacher.score_top1 is None
    assert score_table(report) is None and isinstance(report.teacher, ModelEntry)


# -- the real data beside the project (skipped without it) --------------------------------------

EXTRA = IMAGENET_SAMPLE.parent / "imagenet-extra"


@pytest.mark.skipif(not (IMAGENET_SAMPLE / "val").is_dir() or not (EXTRA / "distill").is_dir(), reason=SAMPLE_MISSING)
def test_imagenet_sample_and_extra_combine_with_a_class_list_and_share_no_image():
    classes = IMAGENET_SAMPLE / "classes.txt"
    roots = [str(IMAGENET_SAMPLE / "train"), str(EXTRA / "distill")]
    with pytest.raises(UsageError, match="class_list"):  # extra/distill alone is labelled by subfolder index
        data.open_images(roots)
    distill = data.open_images(roots, class_list=classes)
    assert distill.labelled and distill.per_root() == {"train": 500, "distill": 12447}
    score = data.open_images([str(IMAGENET_SAMPLE / "val"), str(EXTRA / "val")], class_list=classes)
    assert score.labelled and len(score) == 1200
    tench = [it for it in distill.items if it.name.startswith(f"distill/{TENCH}/")]
    assert tench and {it.label for it in tench} == {0}
    summary = R.role_summary({"distill": distill.subset(range(500)), "scoring": score})
    assert summary["distill_images"] == 500 and summary["scoring_images"] == 1200
