"""The build stage: the teacher, the images, the model house created or resumed, its segments.

:func:`bespoke.pipeline.build` runs these in order, then distils every pending alternative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from bespoke import data as images
from bespoke.config import apply_preset, stitch_sources
from bespoke.counting import count_flops, count_params
from bespoke.distill import HOUSE_LEGEND, summary_table, teacher_top1
from bespoke.errors import UsageError
from bespoke.house import House, TeacherInfo
from bespoke.models import default_input_size, load_model
from bespoke.partition import Partition


def house_dir(cfg: Any) -> Path:
    """Where the house of ``cfg`` lives: ``house``, else ``OUT/house``."""
    return Path(cfg.house or Path(cfg.out) / "house")


def load_teacher(cfg: Any) -> tuple[Any, Partition, int, str]:
    """The teacher, frozen on ``cfg.device``, partitioned at its input size: ``(teacher,
    partition, size, weights)``."""
    weights = cfg.teacher_weights or "auto"
    teacher = load_model(cfg.teacher, weights=weights)
    size = cfg.input_size or default_input_size(teacher)
    partition = Partition.from_model(teacher, (1, 3, size, size), name=cfg.teacher)
    teacher.to(cfg.device).requires_grad_(False)
    return teacher, partition, size, weights


def prepare_images(cfg: Any, teacher: Any, size: int, console: Any, main: bool) -> Any:
    """Training and held-out images (:func:`bespoke.data.prepare`); rank 0 says what they are
    (and how many came from each root, when there are several)."""
    split = images.prepare(teacher, size, data=cfg.data, val_data=cfg.val_data,
                           class_list=cfg.class_list, held_out=cfg.build.validation_images,
                           augment=cfg.build.augment, seed=cfg.seed, val_views=cfg.build.validation_views,
                           balance=cfg.data_balance)
    if main:
        console.print(f"images: {split.source}: {len(split.train)} for training, {split.val_images} held out"
                      + (f" (x{split.val_views} views)" if split.val_views > 1 else "")
                      + (", labelled" if split.labelled else ", unlabelled"))
        if len(split.per_root) > 1:
            console.print(escape(images.counts_line("images per root", split.per_root)), highlight=False)
        if split.balance != "none":
            console.print(f"data_balance {split.balance}: {len(split.train):,} draws of "
                          f"{len(split.train.distinct()):,} distinct images, equal per {split.balance}",
                          highlight=False)
        if split.note:
            console.print(f"[yellow]note:[/yellow] {escape(split.note)}", highlight=False)
        if cfg.data is None:
            console.print("[yellow]note:[/yellow] scikit-image's sample photos are a dozen images: enough "
                          "to try bespoke, too few for useful distillation; pass --data FOLDER")
    return split


def check_roles(cfg: Any, console: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The images of the three roles (:func:`bespoke.roles.open_roles`), checked to share no image:
    distillation and selection (when ``val_data`` is given; else the selection images are split
    off ``data`` and disjoint by construction), either of them and scoring. Says in one line how
    many each role has (and the scoring images per root, when there are several) on ``console``. Returns
    (:func:`bespoke.roles.role_summary`, the roles' image sets)."""
    import time

    from bespoke import roles as R

    t0 = time.perf_counter()
    sets = R.open_roles(cfg.data, cfg.val_data, cfg.score_data, class_list=cfg.class_list,
                        held_out=cfg.build.validation_images, seed=cfg.seed)
    pairs = [(a, b) for a, b in (("distill", "selection"), ("distill", "scoring"), ("selection", "scoring"))
             if a in sets and b in sets and (cfg.val_data or b != "selection")]
    summary = R.role_summary(sets, pairs)
    if console is not None:
        checked = f"; no image shared ({time.perf_counter() - t0:.0f} s)" if pairs else ""
        console.print(f"images: {summary['distill_images']} to distil, {summary['selection_images']} to select "
                      f"with, {summary['scoring_images']} to score{checked}", highlight=False)
        if "scoring" in sets and len(sets["scoring"].per_root()) > 1:
            console.print(escape(images.counts_line("scoring images per root", sets["scoring"].per_root())),
                          highlight=False)
    return summary, sets


def training_images(cfg: Any) -> int:
    """How many training images ``cfg``'s data holds (listed, not decoded; the held-out split taken
    off as :func:`bespoke.data.prepare` takes it)."""
    found = len(images.open_images(cfg.data, cfg.class_list))
    if images.roots(cfg.val_data):
        return found
    return len(images.split_indices(found, cfg.build.validation_images, cfg.seed)[0])


# Measured on the default run (docs/benchmarks.md, "The default run"): with closed-form fits on
# 7 photos, a whole stage replaced agrees with the teacher on 0-68 % of the held-out views, and
# students of several such stages agree on 0-2 %; single blocks (pruned, skipped, a donor's)
# and a lower input resolution keep 92-94 % of the teacher's top-1 at the same size.
FEW_IMAGE_RECIPE = {"build": {"epochs": 0, "validation_views": 8, "modules": True, "segments": 0, "tiles": 0,
                              "max_fraction": 0.12}, "finetune": {"epochs": 0, "steps": 0, "bn_recalibration_batches": 0}}


def few_image_recipe(cfg: Any, given: Any = None, console: Any = None) -> Any:
    """``cfg`` (presets applied) with the few-image recipe (:data:`FEW_IMAGE_RECIPE`) wherever
    ``given`` (the configuration as the user gave it, before presets) leaves the keys unset, when
    the training images are fewer than ``build.few_images``; ``cfg`` itself otherwise, and for
    the tiny preset (whose generated images exercise every stage). Says so in one line."""
    limit = cfg.build.few_images
    if not limit or cfg.preset == "tiny":
        return cfg
    n = training_images(cfg)
    if n >= limit:
        return cfg
    given = given or cfg
    recipe = {k: dict(v) for k, v in FEW_IMAGE_RECIPE.items()}
    if cfg.input_size and not cfg.search.input_sizes:  # students may also run at 0.9 and 0.8 of the size
        sizes = sorted({max(32, int(round(cfg.input_size * f / 16)) * 16) for f in (0.9, 0.8)} - {cfg.input_size},
                       reverse=True)
        if sizes:
            recipe["search"] = {"input_sizes": sizes}
    update = {}
    for section, values in recipe.items():
        user_set = getattr(given, section).model_fields_set
        update[section] = getattr(cfg, section).model_copy(
            update={k: v for k, v in values.items() if k not in user_set})
    b = cfg.build
    if console is not None:
        console.print(f"few images ({n} for training, fewer than build.few_images {limit}): the few-image recipe -- "
                      f"single blocks replaced, fitted in closed form on {b.calibration_images} augmented views, no "
                      "distillation by SGD and no fine-tuning (they would overfit), lower input sizes searched too "
                      "(docs/house.md)", highlight=False)
    return cfg.model_copy(update=update)


def resolve_config(cfg: Any, registry: Any, console: Any = None, *, images: bool = True) -> Any:
    """The configuration as every command runs it, from the configuration as given: its preset
    (:func:`bespoke.config.apply_preset`) filled in wherever the configuration leaves a key unset,
    then, when ``images`` (the commands that read the distillation images: ``build``,
    ``finetune``, ``run``), the few-image recipe (:func:`few_image_recipe`, said in one line on
    ``console``). ``profile`` and ``search`` read no images and take the preset only.

    The one place this happens, so that one configuration builds one house whichever command
    builds it. Resolving a resolved configuration gives it back unchanged (the preset fills only
    unset keys; the recipe sees its keys set); ``bespoke run`` resolves once and hands the result
    to the stages."""
    resolved = apply_preset(cfg, registry)
    return few_image_recipe(resolved, cfg, console) if images else resolved


def open_house(cfg: Any, root: Path, existing: House | None, teacher: Any, partition: Partition,
               split: Any, size: int, weights: str, console: Any) -> House:
    """The house at ``root``: ``existing`` resumed (a killed torchrun build's shards merged), or a
    new one created for this teacher and these images."""
    if existing is not None:
        house = existing
        house.check_teacher(cfg.teacher, size)
        house.merge_shards()  # results of a killed torchrun build
        console.print(f"resuming the model house {root}")
        for line in segment_settings_changed(house, cfg):
            console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
        return house
    return House.create(root, TeacherInfo(
        name=cfg.teacher, weights=weights, input_size=size, params=count_params(teacher),
        flops=int(count_flops(teacher, (1, 3, size, size)) or 0),
        num_cut_points=len(partition.cut_points), num_classes=own_classes(cfg.teacher, teacher)),
        build=cfg.build.model_dump(mode="json") | {"seed": cfg.seed},
        data={"source": split.source, "train_images": len(split.train), "balance": split.balance,
              "pool_images": split.pool_images,
              "val_images": split.val_images, "val_views": split.val_views, "labelled": split.labelled})


def draw_segments(cfg: Any, partition: Partition, house: House) -> list[Any]:
    """The house's segments: those it holds, or (a new house) those the build settings draw."""
    if house.manifest.segments:
        return list(house.manifest.segments)
    b = cfg.build
    if b.enumerate_max_len:
        segments = partition.enumerate_segments(b.enumerate_max_len)
    elif b.segments:
        segments = partition.sample_segments(b.segments, b.max_fraction, seed=cfg.seed)
    else:
        segments = []
    extra = []
    if b.tiles:  # guarantee a non-overlapping set that covers the network
        extra += partition.tile_segments(b.tiles)
    if b.modules:  # the network's own blocks and stages
        extra += partition.module_segments(b.max_fraction)
    if b.whole_sources:  # image to logits, for the sources that offer whole networks
        extra.append(partition.whole_segment())
    if b.stitch_sources:  # before and after each point where stages meet: stitched stages
        extra += partition.stitched_segments(b.stitch_span)
    if extra:
        segments = sorted({(s.start, s.end): s for s in [*extra, *segments]}.values(),
                          key=lambda s: (s.start, s.end))
    if not segments:
        raise UsageError(f"no segments of {cfg.teacher} to build alternatives for: the "
                         "build settings found none (build.modules finds only blocks and stages "
                         "mapping a cut point to a cut point); set build.segments or build.tiles")
    return segments


def own_classes(ref: str, model: Any) -> int | None:
    """The teacher's classes when its classifier is not its architecture's default (a network
    fine-tuned on its own task): what rebuilding it without weights needs."""
    from bespoke.models import num_classes

    n = num_classes(model)
    if n is None:
        return None
    try:
        default = num_classes(load_model(ref, weights=None))
    except Exception:
        return None
    return n if n != default else None


def offered_sources(cfg: Any, partition: Partition) -> dict[str, set[str]]:
    """Which block sources may propose for which segment, where not every source may: the
    stitched segments (``build.stitch_sources``) go to the sources named there only."""
    named = stitch_sources(cfg)
    if not named:
        return {}
    return {seg.id: named for seg in partition.stitched_segments(cfg.build.stitch_span)}


def note_teacher_top1(house: House, partition: Partition, split: Any, settings: Any) -> None:
    """The teacher's own top-1 on labelled held-out images, recorded once."""
    if house.manifest.teacher.val_top1 is None and split.labelled and len(split.val):
        house.manifest.teacher.val_top1 = teacher_top1(partition, split.val, settings)
        house.save()


def segment_settings_changed(house: House, cfg: Any) -> list[str]:
    """Why a resumed house does not follow this configuration's segment settings, if it doesn't:
    its segments were drawn once, when it was created, and are kept."""
    if not house.manifest.segments:
        return []
    stored = house.manifest.build or {}
    build = cfg.build.model_dump(mode="json")  # as the manifest stores it (a tuple is a list there)
    now = {**{k: build[k] for k in ("segments", "tiles", "modules", "max_fraction", "enumerate_max_len",
                                    "whole_sources", "stitch_sources", "stitch_span")},
           "seed": cfg.seed}
    changed = [f"{'' if k == 'seed' else 'build.'}{k} {stored[k]!r} -> {v!r}"
               for k, v in now.items() if k in stored and stored[k] != v]
    if not changed:
        return []
    return [f"the model house {house.root} was built with other segment settings ({', '.join(changed)}); "
            f"it keeps its {len(house.manifest.segments)} segments and is not resampled. To build with "
            "the new settings, give another --house (or delete this one)."]


def summarise(house: House, root: Path, split: Any, report: Any, console: Any, say_skipped: bool = True) -> None:
    """Record the images that failed to decode; print the house's table and counts, and (unless
    ``say_skipped`` is false: ``bespoke run`` says it at its end) one line naming the skipped."""
    skipped = split.skipped
    if skipped:
        house.manifest.data["skipped"] = sorted(set(house.manifest.data.get("skipped", [])) | set(skipped))
        house.save()
    console.print(summary_table(house, title=f"model house {root}"))
    console.print(HOUSE_LEGEND, highlight=False)
    counts = {s: len(house.by_status(s)) for s in ("trained", "failed", "pending")}
    console.print(f"{counts['trained']} trained, {counts['failed']} failed, {counts['pending']} pending"
                  + (f"; {report.images_per_second:.1f} images/s" if report.images_per_second else ""))
    if skipped and say_skipped:
        console.print(f"[yellow]warning:[/yellow] {escape(images.skipped_line(skipped))}", highlight=False)


__all__ = ["FEW_IMAGE_RECIPE", "check_roles", "draw_segments", "few_image_recipe", "house_dir", "training_images", "load_teacher", "note_teacher_top1", "open_house",
           "prepare_images", "resolve_config", "segment_settings_changed", "summarise"]
