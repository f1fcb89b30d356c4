"""The few-image recipe: with a handful of photos, closed-form fits and no SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bespoke.config import RunConfig, apply_preset
from bespoke.stages.build import FEW_IMAGE_RECIPE, few_image_recipe, training_images


def _photos(folder, n):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_few_images_switch_to_the_recipe_where_the_user_left_keys_unset(tmp_path):
    data = _photos(tmp_path / "few", 12)
    given = RunConfig.model_validate({"data": str(data), "finetune": {"steps": 5}})
    cfg = few_image_recipe(apply_preset(given), given)
    assert training_images(given) == 6  # half held out (build.validation_images 64 > 12 // 2)
    assert cfg.build.epochs == 0 and cfg.finetune.epochs == 0 and cfg.finetune.bn_recalibration_batches == 0
    assert cfg.finetune.steps == 5  # the user's own value stays
    assert cfg.build.modules and cfg.build.segments == 0 and cfg.build.validation_views == 8
    assert cfg.search.input_sizes == [144, 128]  # 0.9 and 0.8 of the quick preset's 160 px
    mine = RunConfig.model_validate({"data": str(data), "build": {"segments": 3}, "search": {"input_sizes": [96]}})
    kept = few_image_recipe(apply_preset(mine), mine)
    assert kept.build.segments == 3 and kept.search.input_sizes == [96]
    assert set(FEW_IMAGE_RECIPE) == {"build", "finetune"}
    off = given.model_copy(update={"build": given.build.model_copy(update={"few_images": 0})})
    assert few_image_recipe(apply_preset(off), off).build.epochs == apply_preset(off).build.epochs
    tiny = RunConfig.model_validate({"preset": "tiny"})
    assert few_image_recipe(apply_preset(tiny), tiny).build.epochs == apply_preset(tiny).build.epochs


def test_every_command_resolves_the_configuration_one_way(tmp_path, monkeypatch):
    """resolve_config (issue 35): the preset, then the few-image recipe, in one place that every
    command calls, so `bespoke build` builds the house `bespoke run` builds; resolving twice changes
    nothing; profile and search (no images read) take the preset only."""
    from bespoke import pipeline
    from bespoke.plugins import get_registry
    from bespoke.stages import build as build_stage

    reg = get_registry()
    given = RunConfig.model_validate({"data": str(_photos(tmp_path / "few", 12))})
    cfg = build_stage.resolve_config(given, reg)
    assert cfg.input_size == 160 and cfg.build.epochs == 0 and cfg.build.modules  # quick, then the recipe
    assert build_stage.resolve_config(cfg, reg).model_dump() == cfg.model_dump()
    assert build_stage.resolve_config(given, reg, images=False).model_dump() == apply_preset(given, reg).model_dump()

    seen = []

    class Resolved(Exception):
        pass

    def resolve(c, registry, console=None, *, images=True):
        seen.append(images)
        raise Resolved

    monkeypatch.setattr(build_stage, "resolve_config", resolve)
    for command, args in ((pipeline.build, ()), (pipeline.run, ()), (pipeline.finetune, ("r.json", "o")),
                          (pipeline.profile, ("t.json",)), (pipeline.search, ("s.json",))):
        with pytest.raises(Resolved):
            command(given, reg, *args)
    assert seen == [True, True, True, False, False]


def test_no_distillation_epochs_keeps_the_closed_form_fit_and_profiles_it():
    from bespoke.distill import Job, Settings, train_bunch

    class Seg:
        start, end = 0, 1

    module = torch.nn.Conv2d(3, 3, 1)
    before = module.weight.detach().clone()
    job = Job(record=None, segment=Seg(), module=module)
    settings = Settings(epochs=0)
    assert train_bunch(None, [job], [], lambda a, b: 0, settings) == 0
    assert job.failed is None and torch.equal(module.weight, before) and not module.training


def test_calibration_tops_up_few_images_with_augmented_views():
    from bespoke.data import ImageSet, _Item, transforms_for
    from bespoke.distill import calibration_batch

    net = torch.nn.Conv2d(3, 3, 1)
    rng = np.random.default_rng(1)
    items = [_Item(f"p{i}", -1, (lambda a=rng.integers(0, 255, (50, 60, 3), dtype=np.uint8): a)) for i in range(3)]
    photos = ImageSet(items, labelled=False, source="test")
    plain = photos.with_transform(transforms_for(net, 32))
    views = photos.with_transform(transforms_for(net, 32, augment=True))
    state = torch.get_rng_state()
    x = calibration_batch(plain, 10, views=views, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left as it was
    assert x.shape == (10, 3, 32, 32)
    assert not torch.equal(x[3], x[0]) and not torch.equal(x[3], x[6])  # views differ
    assert torch.equal(x, calibration_batch(plain, 10, views=views, seed=0))  # and repeat
    assert calibration_batch(plain, 2, views=views).shape[0] == 2


def test_batchnorm_recalibration_on_no_batches_keeps_the_statistics():
    from bespoke.finetune import recalibrate_batchnorm

    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.fill_(0.5)
    for mode in ("train", "eval"):
        assert recalibrate_batchnorm(torch.nn.Sequential(bn), [], mode=mode) == 0
        assert torch.all(bn.running_mean == 0.5)


def test_held_out_views_are_fixed_crops_the_same_at_every_size(tmp_path):
    from bespoke.data import folder_images, prepare

    data = _photos(tmp_path / "views", 6)
    net = torch.nn.Conv2d(3, 3, 1)
    split = prepare(net, 32, data=str(data), held_out=2, val_views=4, seed=0)
    assert len(split.val) == 8 and split.val_images == 2 and split.val_views == 4
    a = [split.val[i][0] for i in range(8)]
    again = prepare(net, 32, data=str(data), held_out=2, val_views=4, seed=0)
    assert all(torch.equal(x, again.val[i][0]) for i, x in enumerate(a))  # fixed
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # views differ
    plain = prepare(net, 32, data=str(data), held_out=2, seed=0)
    assert torch.equal(plain.val[0][0], a[0]) and torch.equal(plain.val[1][0], a[4])  # view 0: the image
    assert len(folder_images(data).views(1)) == 6
