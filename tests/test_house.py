"""The model house on disk, and the image data that feeds distillation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bespoke import AlternativeSpec, SegmentInfo, UsageError
from bespoke.house import (AlternativeRecord, House, SegmentRecord, TeacherInfo, alternative_id,
                           read_manifest)

from conftest import IMAGENET_SAMPLE as SAMPLE, SAMPLE_MISSING  # noqa: E402


def _house(tmp_path: Path) -> House:
    house = House.create(tmp_path / "house", TeacherInfo(name="t", weights="auto", input_size=32))
    seg = SegmentRecord(start=1, end=3, in_shape=(1, 4, 8, 8), out_shape=(1, 6, 4, 4),
                        in_stride=4, out_stride=8, params=10, flops=20)
    house.manifest.segments.append(seg)
    spec = AlternativeSpec(source="lin", kind="conv", label="conv 1x1/2", options={"c": 4})
    house.update(AlternativeRecord(id=alternative_id(seg, spec), segment=seg.id, source="lin", spec=spec))
    house.save()
    return house


def test_manifest_round_trip_is_atomic(tmp_path):
    house = _house(tmp_path)
    again = House.open(house.root)
    assert again.manifest == house.manifest
    assert again.manifest.schema_version == 1
    rec = again.manifest.alternatives[0]
    assert rec.id == "1-3.lin.conv_1x1_2" and rec.status == "pending"
    assert isinstance(again.segment("1-3"), SegmentInfo)
    # no temporary files left beside the manifest
    assert sorted(p.name for p in house.root.iterdir()) == ["alts", "manifest.json"]


def test_alternative_ids_are_unique_and_file_safe():
    seg = SegmentInfo(start=0, end=2, in_shape=(1, 3, 8, 8), out_shape=(1, 3, 8, 8), in_stride=1, out_stride=1)
    spec = AlternativeSpec(source="a/b", kind="k", label="x y")
    first = alternative_id(seg, spec)
    assert first == "0-2.a_b.x_y"
    assert alternative_id(seg, spec, taken=[first]) == "0-2.a_b.x_y-2"


@pytest.mark.parametrize("text", ["{not json", '{"schema_version": 1, "teacher": 3}', "[]"])
def test_corrupted_manifest_names_the_file(tmp_path, text):
    house = _house(tmp_path)
    path = house.root / "manifest.json"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        House.open(house.root)
    assert str(path) in str(err.value)
    assert "corrupted" in str(err.value)


def test_newer_schema_is_refused_with_the_file_named(tmp_path):
    house = _house(tmp_path)
    path = house.root / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="schema_version 99") as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_corrupted_manifest_cli_error(tmp_path, capsys):
    """`bespoke build` on a house with a corrupted manifest: exit 2, the file named, no traceback."""
    from bespoke.cli import main

    house = _house(tmp_path)
    (house.root / "manifest.json").write_text("\x00garbage")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: test_efficientnet\ninput_size: 32\nplugins: {block_sources: [skip]}\n")
    with pytest.raises(SystemExit) as exc:
        main(["build", str(cfg), "--out", str(house.root)])
    assert exc.value.code == 2
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert str(house.root / "manifest.json") in err and "Traceback" not in err


def test_weights_round_trip_through_rebuild(tmp_path):
    house = _house(tmp_path)
    rec = house.manifest.alternatives[0]

    class Source:
        def rebuild(self, ctx, segment, spec):
            return nn.Sequential(nn.Conv2d(spec.options["c"], 6, 1, stride=2), nn.BatchNorm2d(6))

    torch.manual_seed(0)
    module = Source().rebuild(None, None, rec.spec)
    module[1].running_mean.add_(1.5)
    house.save_weights(rec.id, module)
    assert house.weights_path(rec.id).suffix == ".safetensors"
    loaded = house.load_alternative(rec.id, None, Source()).eval()
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(loaded(x), module.eval()(x))
    # weights that do not fit are a clear error
    house.weights_path(rec.id).write_bytes(b"junk")
    with pytest.raises(UsageError, match=rec.id):
        house.load_alternative(rec.id, None, Source())


def test_shards_merge_into_the_manifest(tmp_path):
    house = _house(tmp_path)
    rec = house.manifest.alternatives[0]
    house.write_shard(1, [rec.model_copy(update={"status": "trained", "agreement": 0.5})])
    assert house.merge_shards() == 1
    again = House.open(house.root)
    assert again.manifest.alternatives[0].status == "trained"
    assert again.manifest.alternatives[0].agreement == 0.5
    assert not list((house.root / "shards").glob("*.json"))


# ---- data ----------------------------------------------------------------------------------


def _png(path: Path, seed: int = 0) -> None:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def tiny_model():
    import timm

    return timm.create_model("test_efficientnet", pretrained=False)


def test_folder_with_class_subfolders_and_a_broken_image(tmp_path, tiny_model):
    from bespoke import data

    for cls in ("b_dog", "a_cat"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", i)
    (tmp_path / "a_cat" / "broken.jpg").write_bytes(b"not an image")
    split = data.prepare(tiny_model, 32, data=str(tmp_path), held_out=2, seed=0)
    assert split.labelled and len(split.train) + len(split.val) == 7
    batches = [data.collate([split.train[i] for i in range(len(split.train))]),
               data.collate([split.val[i] for i in range(len(split.val))])]
    xs = sum(b[0].shape[0] for b in batches if b is not None)
    assert xs == 6 and batches[0][0].shape[1:] == (3, 32, 32)
    assert split.skipped == ["a_cat/broken.jpg"]
    labels = {it.name.split("/")[0]: it.label for it in split.train.items + split.val.items}
    assert labels == {"a_cat": 0, "b_dog": 1}


def test_flat_folder_with_wordnet_ids(tmp_path, tiny_model):
    from bespoke import data

    (tmp_path / "classes.txt").write_text("0\tn01440764\ttench\n1\tn01443537\tgoldfish\n")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "n01443537_goldfish.jpg")
    _png(imgs / "n01440764_x.png")
    ds = data.open_images(str(imgs))  # classes.txt found in the parent
    assert ds.labelled and sorted(it.label for it in ds.items) == [0, 1]
    unl = tmp_path / "unl"
    unl.mkdir()
    _png(unl / "photo.png")
    assert not data.open_images(str(unl)).labelled


def test_missing_or_empty_folder_is_a_usage_error(tmp_path):
    from bespoke import data

    with pytest.raises(UsageError, match="does not exist") as err:
        data.open_images(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(UsageError, match="holds no images"):
        data.open_images(str(tmp_path))


def test_split_is_deterministic_and_keeps_half_for_training():
    from bespoke.data import split_indices

    a = split_indices(10, 3, seed=1)
    assert a == split_indices(10, 3, seed=1) and len(a[1]) == 3
    assert not set(a[0]) & set(a[1])
    assert len(split_indices(10, 50)[1]) == 5


def test_dataset_attribute_and_sample_photos(tmp_path, monkeypatch, tiny_model):
    from bespoke import data

    mod = tmp_path / "my_images.py"
    mod.write_text("import numpy as np\n"
                   "def make():\n"
                   "    return [(np.full((20, 20, 3), i * 40, dtype=np.uint8), i) for i in range(4)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = data.open_images("my_images:make")
    assert ds.labelled and len(ds) == 4
    x, y = ds.with_transform(data.transforms_for(tiny_model, 32))[3]
    assert x.shape == (3, 32, 32) and y == 3
    photos = data.open_images(None)
    assert 1 <= len(photos) <= len(data.SKIMAGE_SAMPLES) and not photos.labelled


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=SAMPLE_MISSING)
def test_imagenet_sample_labels_from_classes_txt():
    from bespoke import data

    ds = data.open_images(str(SAMPLE / "val"))
    assert ds.labelled and len(ds) == 300
    tench = [it for it in ds.items if it.name.startswith("n01440764")]
    assert all(it.label == 0 for it in tench)


def test_resuming_with_other_segment_settings_warns(tmp_path):
    """A house keeps the segments it was created with; a config that asks for others is told so."""
    from bespoke.config import RunConfig
    from bespoke.stages.build import segment_settings_changed

    house = _house(tmp_path)
    cfg = RunConfig.model_validate({"teacher": "t", "build": {"segments": 6, "tiles": 0}, "seed": 0})
    house.manifest.build = cfg.build.model_dump(mode="json") | {"seed": 0}
    assert segment_settings_changed(house, cfg) == []
    other = RunConfig.model_validate({"teacher": "t", "build": {"segments": 9, "tiles": 4}, "seed": 0})
    (line,) = segment_settings_changed(house, other)
    assert "build.segments 6 -> 9" in line and "build.tiles 0 -> 4" in line
    assert "keeps its 1 segments" in line and "--house" in line
