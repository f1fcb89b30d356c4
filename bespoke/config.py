"""Run configuration: one pydantic model, loaded from YAML or TOML, overridable from the CLI.

Each plugin validates its own options (``plugin_options.<name>``) with its own pydantic model.
Every validation problem becomes a :class:`bespoke.errors.UsageError` naming the file, the key,
the value and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bespoke.errors import UsageError

CONFIG_SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuildConfig(Strict):
    """The one-time stage: segments, alternatives, block-level distillation."""

    segments: int = Field(12, ge=0, description="segments to sample from the teacher (0: none; then tiles or modules give the segments)")
    max_fraction: float = Field(0.3, gt=0, le=1, description="longest segment, as a fraction of the remaining cut points")
    tiles: int = Field(0, ge=0, description="also cut the network into this many consecutive segments, so one non-overlapping set covers all of it (0: sampling only)")
    whole_sources: list[str] = Field(default_factory=list, description="also the whole network as one segment (image to logits), for these block sources only (e.g. [timm-donors]: each donor whole, its classes the teacher's, distilled from the teacher's logits like any alternative); a student may then be a donor distilled from the teacher, which the search weighs against the assembled ones. Empty: no whole-network segment (build.tiles 1 gives one for every source)")
    enumerate_max_len: int | None = Field(None, ge=1, description="instead of sampling, take every segment up to this many cut points")
    stitch_sources: list[str] = Field(default_factory=list, description="stitched stages: at each point where the teacher's stages meet (for each stride but the last, the cut point with the smallest activation: Partition.stitch_points), the network before it and the network after it become two more segments, offered to these block sources only (e.g. [timm-donors]: a donor's early stages then the teacher's later ones, or the teacher's early stages then a donor's later ones, joined by one adapter fitted in closed form and then distilled). They fill the space between the donors; the search takes them like any alternative. Empty: none")
    stitch_span: tuple[float, float] = Field((0.3, 0.65), description="the stitched segments kept: those spanning this fraction of the teacher's cut points, at least the first and at most the second (shorter ones are a few early blocks or the head, which the other segments cover; near-whole ones cost a whole network's distillation for each). Lite2 keeps four: to and from the points at strides 8 and 16")
    modules: bool = Field(False, description="also one segment per block and stage of the network (every submodule mapping a cut point to a cut point, up to max_fraction of the network): where skip, pruning and same-family donors fit best")
    epochs: int = Field(1, ge=0, description="passes over the training images distilling the alternatives (0: none; every alternative stays as its block source fitted it, in closed form, and is only profiled)")
    few_images: int = Field(300, ge=0, description="with fewer training images than this, a run switches to the few-image recipe wherever the configuration leaves the keys unset: no block distillation by SGD (build.epochs 0; the block sources' closed-form fits on build.calibration_images augmented views of the images), no fine-tuning and no BatchNorm recalibration (finetune.epochs, steps, bn_recalibration_batches 0). SGD on a few images overfits and destroys the student (issue 23). 0: never")
    steps_per_epoch: int | None = Field(None, ge=1, description="cap the steps per epoch")
    batch_size: int = Field(16, ge=1, description="images per distillation step")
    bunch_size: int = Field(64, ge=1, description="alternatives trained together per teacher forward")
    lr: float = Field(1e-3, gt=0, description="learning rate of block-level distillation (Adam)")
    freeze_batchnorm: bool = Field(True, description="distil with every BatchNorm of an alternative in eval mode: its running statistics stay as the block source made them (the teacher's, the donor's or fitted) and only its scale and shift train. Off: batches of 16 augmented crops replace them, and on Lite2 after 1,024 images 43 of 85 alternatives scored worse on the held-out images than before training (5 with it on; median KL 12 % lower)")
    cache_activations: bool = Field(True, description="cache teacher activations at cut points after the first epoch (later epochs then replay the first epoch's augmented views); only when they fit in BESPOKE_CACHE_LIMIT_MB, without successive halving, and not after a resume inside the stream")
    calibration_images: int = Field(64, ge=1, description="images used to initialise adapters and choose channels")
    validation_images: int = Field(64, ge=0, description="held-out images for the distillation error and replace-one scores")
    validation_views: int = Field(1, ge=1, description="count each held-out image this many times: itself and fixed crops and flips of it, the same at every input size (the few-image recipe sets 8): more inputs for the proxy scores, re-ranking and agreement when the held-out images are a handful; intervals still count distinct images")
    augment: bool = Field(False, description="timm's train-time augmentation on the training images (useful with few images)")
    workers: int = Field(1, ge=0, description="DataLoader worker processes that decode and augment the training images while the alternatives train (0: in the training process)")
    checkpoint_minutes: float = Field(5.0, gt=0, description="while distilling, write each bunch's training state (weights, optimiser state, position in the image stream) at most this many minutes apart, atomically, so a killed build resumes inside the epoch and loses at most this much work")
    halving: int = Field(0, ge=0, description="successive halving: train every alternative on this many images first, profile them on the held-out images, stop those no cheaper than the teacher's own segment, those clearly dominated in their segment (another alternative with no more FLOPs and parameters and a clearly lower replace-one KL) and those that stalled, and train the rest on halving_eta times as many images, and so on until the epochs are done. Stopped alternatives stay in the house, trained as far as they got. 0: off (every alternative sees every image)")
    halving_eta: float = Field(3.0, gt=1, description="growth of the image slices between rounds of successive halving")
    halving_stall: float = Field(0.05, ge=0, lt=1, description="successive halving also stops an alternative whose replace-one KL improved by less than this fraction over the last round")
    halving_margin: float = Field(0.2, ge=0, lt=1, description="an alternative is clearly dominated when a no-costlier one of its segment has a replace-one KL lower by more than this fraction of its own")

    @field_validator("stitch_span")
    @classmethod
    def _span(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1] <= 1:
            raise ValueError(f"build.stitch_span {list(v)} must be two fractions 0 <= low <= high <= 1")
        return v

    @model_validator(mode="after")
    def _some_segments(self) -> "BuildConfig":
        if not (self.segments or self.tiles or self.modules or self.enumerate_max_len or self.whole_sources
                or self.stitch_sources):
            raise ValueError("no segments would be made: set build.segments, build.tiles, build.modules, "
                             "build.whole_sources, build.stitch_sources or build.enumerate_max_len")
        return self


class FinetuneConfig(Strict):
    """Fine-tuning each assembled student with distillation from the teacher."""

    epochs: int = Field(1, ge=0, description="passes over the training images (0: BatchNorm recalibration only)")
    steps: int | None = Field(None, ge=0, description="cap the total fine-tuning steps")
    batch_size: int = Field(16, ge=1, description="images per fine-tuning step")
    lr: float = Field(1e-4, gt=0, description="learning rate of fine-tuning")
    beta: float = Field(0.3, ge=0, description="weight of the distillation terms")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy term (used only when the images are labelled)")
    label_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term on labelled images; 0: distillation from the teacher only (labels skewed to a few classes pull the student's prior toward them)")
    mixup: float = Field(0.0, ge=0, description="mixup's Beta(a, a) parameter for each fine-tuning batch (the teacher sees the mixed images too: function matching); 0: off")
    crop_scale: float = Field(1.0, gt=0, le=1, description="random resized crops of each fine-tuning image, at least this fraction of its area (the teacher sees the same crops); 1: off (flips only)")
    freeze_classifier: bool = Field(False, description="keep the student's classifier (its last linear layer) as the teacher's while fine-tuning: the rest learns to feed it what the teacher's features fed it")
    bn_recalibration_batches: int = Field(8, ge=0, description="batches of training images that recompute BatchNorm statistics after assembly (0: off)")
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable checkpoints (one is always written at the end)")
    keep_best: bool = Field(True, description="in `bespoke run` and `bespoke finetune`, keep the fine-tuned student only when it agrees with the teacher on the held-out images at least as well as the assembled one did; else save the assembled student (the report says which)")


class SearchConfig(Strict):
    """The search stage; the strategy's own options live in ``plugin_options.<strategy>``."""

    proxy: Literal["replace-one", "replace-one-kl", "distill-error"] = Field("replace-one", description="accuracy-loss proxy per alternative: replace-one disagreement with the teacher (percentage points), replace-one KL divergence to the teacher's output (x100; continuous, best with few held-out images) or the normalised distillation error")
    lam: float = Field(0.1, ge=0, description="weight of the loss in the scalar score max(L/L*, 1) + lam * loss")
    rerank: bool = Field(True, description="in `bespoke run`, assemble the best rerank_top_k proxy candidates per budget and keep the one that agrees best with the teacher on the held-out images (ties: lower KL); the proxy adds replace-one losses, which ignores how replacements interact")
    rerank_top_k: int = Field(3, ge=1, description="best proxy candidates per budget assembled and scored for real")
    rerank_tighten: int = Field(1, ge=0, description="when every re-ranked candidate of a budget measures over it, search again at the budget divided by how much the measurements exceeded the predictions (median), this many times at most, and keep the new pick when it measures within the budget or faster; 0: off")
    rerank_latency: bool = Field(True, description="re-ranking also measures each candidate end to end beside the teacher (the latency estimator's own measurement, or measured-latency when it is a table) and drops those over the budget")
    pick_train_images: int = Field(0, ge=0, description="with input_sizes, the final pick of each budget (one re-ranked candidate per input size) counts agreement with the teacher on the held-out images plus this many training images (a fixed subset, at the eval transforms): with few held-out images, candidates that differ by one image are within noise; training images add evidence without choosing on the images the report scores. 0: held-out images only")
    pick_remeasure: int = Field(0, ge=0, description="with input_sizes, time each finalist of a budget whose measured ratio lies within pick_margin of the budget this many more times beside the teacher, and judge it by the median of all its measurements: one measurement of a latency ratio is noisy, so a candidate just over the budget may well be within it (and one just under may not be)")
    pick_margin: float = Field(0.03, ge=0, lt=1, description="relative distance to the budget within which pick_remeasure times a finalist again")
    budget_tolerance: float = Field(0.02, ge=0, lt=1, description="after saving, each student is timed again as saved, beside the teacher; it is over its budget when it measures more than this relative margin above it, or when it measures above it and so does its whole 95 % interval (the measured noise). An over-budget student is flagged in the table and listed in report.json's unmet_budgets")
    usable_agreement: float = Field(0.6, ge=0, le=1, description="a student whose agreement with the teacher on the held-out images is surely below this (its whole 95 % interval) is marked unusable in the table and report.json (usable: false), one whose interval straddles it unproven (usable: null)")
    check_repeats: int = Field(3, ge=1, description="after saving, each student is timed beside the teacher in this many separate calls and judged by the median ratio (bespoke.evaluate.measure_ratios, repeats): two single calls can put the same student 5-9 % apart on a busy CPU, so one call cannot check a budget to a few per cent. The pick's pick_remeasure times its finalists the same way (1 + pick_remeasure calls)")
    zoo: bool = Field(True, description="in `bespoke run`, the networks the run already holds compete in the final pick of every budget, as they are: each donor (its own weights, input size and preprocessing; offered only when its outputs are the teacher's classes) and the teacher at each searched input size, timed as shipped and judged on the selection images like the mixed students; the answer is the best within the budget, so it is never worse on those images than a donor that fits, and the best mixed student is saved and reported beside it. Needs held-out images (rerank)")
    pick_fallbacks: int = Field(2, ge=0, description="when a saved student measures over its budget, make (fine-tune, save, time) up to this many of the budget's other finalists that the pick measured within it, best held-out agreement first, and keep the first that stays within; 0: keep the over-budget student and only flag it")
    zoo_confidence: float = Field(0.95, ge=0, lt=1, description="with search.zoo, how sure the selection images must be that the best mixed student agrees with the teacher better than the best network of the zoo within the same budget before it becomes the answer: the lower bound of a paired bootstrap interval at this confidence of the difference in agreement, image by image on the pick's images, must be above zero; else the zoo's network is the answer (it is what the user has, and a difference the images cannot resolve is no reason to hand back something else). At a budget named by a donor, another network of the zoo (the teacher at a lower input size, another donor) displaces that donor only on the same evidence. 0: the better score wins, however small the difference")
    zoo_evidence: Literal["labels", "agreement"] = Field("labels", description="what the rule of evidence (search.zoo_confidence) compares image by image: labels: whether each candidate's top-1 class is the label, on the pick's images that are labelled (the held-out images, when their file or folder names give the teacher's classes), and agreement with the teacher's top-1 where none is; agreement: always agreement. Agreement favours what inherits the teacher's mistakes (the teacher at a lower size, a student distilled from it) over a donor trained on its own; the labels judge both alike")
    fallback_max_drop: float = Field(0.03, ge=0, le=1, description="when the finalist that would replace a saved student over its budget (search.pick_fallbacks) agreed with the teacher on the pick's own images more than this much less than the pick did (0.03: 3 points), first search again with the same strategy at the budget divided by how much the student measured over it (the candidates re-ranked against the budget as given), and keep that search's best student within the budget when it agrees better than the finalist and stays within the budget once saved; else fall back to the finalist. A network of the zoo (a donor, or the teacher at a size, as it is) is not searched again: it is timed again (search.check_repeats more calls) and kept when the mean of both timings is within its budget. The student's plan records what happened (fallback_detail; also OUT/students/budget-B/fallback.json). 1: always take the finalist")
    input_sizes: list[int] = Field(default_factory=list, description="in `bespoke run`, also search students that run at these input resolutions (px, square): each size gets its own latency table and search, budgets stay ratios of the teacher at its own size, and re-ranking picks per budget the best candidate over all sizes (fine-tuned against the teacher at its own size). Needs rerank and held-out images; empty: the teacher's size only")

    @field_validator("input_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 16 <= int(s) <= 4096]
        if bad:
            raise ValueError(f"input sizes must be between 16 and 4096 px, got {bad}")
        return sorted(set(int(s) for s in v), reverse=True)

    @model_validator(mode="after")
    def _sizes_need_rerank(self) -> "SearchConfig":
        if self.input_sizes and not self.rerank:
            raise ValueError("search.input_sizes needs search.rerank: students at different input sizes are "
                             "compared by their real agreement with the teacher, which re-ranking measures")
        return self


class ExportConfig(Strict):
    """Exporting each student (ONNX, torch.export, safetensors)."""

    dynamic_batch: bool = Field(False, description="export every student's ONNX file and torch.export program with a symbolic batch axis (named batch; checked with onnxruntime at batches 1, 2 and 3); false: batch 1, the batch the latency was measured at")


class PluginSelection(Strict):
    """Which implementation of each family runs; names come from ``bespoke plugins``."""

    block_sources: list[str] = Field(default_factory=lambda: ["timm-donors", "pruned-self", "lowrank", "skip"],
                                     description="block sources that propose alternatives")
    distill_loss: str = Field("mse", description="loss of block-level distillation and of the students' per-segment distillation terms")
    latency: str = Field("measured-latency", description="latency estimator: measured on this device, or a lookup table")
    search: str = Field("optuna", description="search strategy")


def _number_or_name(b: float | str) -> float | str:
    """A budget as given: a number (also when written as a string, "0.5"), else a model's name."""
    if isinstance(b, str):
        try:
            return float(b)
        except ValueError:
            return b.strip()
    return b


class RunConfig(Strict):
    schema_version: int = Field(CONFIG_SCHEMA_VERSION, description="version of this configuration format")
    teacher: str = Field("tf_efficientnet_lite2", description="timm name, package.module:attribute, or a checkpoint path")
    teacher_weights: str | None = Field(None, description="checkpoint file for the teacher ('packaged' = the packaged Lite weights)")
    donors: list[str] = Field(default_factory=lambda: ["tf_efficientnet_lite0", "tf_efficientnet_lite1"], description="donor networks for the timm-donors block source (timm names, package.module:attribute, checkpoints)")
    input_size: int | None = Field(None, ge=16, description="square input resolution; default: the teacher's own")
    data: str | list[str] | None = Field(None, description="the distillation images: an image folder (flat, or one subfolder per class), package.module:attribute, or a list of them, combined (labelled only when every one is, the same way); default: sample photos shipped by scikit-image")
    val_data: str | list[str] | None = Field(None, description="the selection images, held out to profile alternatives, re-rank and pick students: a folder, package.module:attribute, or a list of them; must share no image with data; default: build.validation_images split off data")
    score_data: str | list[str] | None = Field(None, description="the scoring images: a folder, package.module:attribute, or a list of them, read once at the end of `bespoke run` to score the teacher and each saved student (report.json: score_top1, score_agreement); nothing that chooses reads them, and they must share no image with data or the selection images; default: none")
    data_balance: Literal["none", "class", "root"] = Field("none", description="how the distillation images are drawn: none (each once per epoch, as the folders hold them), class (as many draws, an equal share for every class -- unlabelled images count by root --, so a pool skewed to a few classes trains the blocks on all of them; the images of small classes repeat, each draw under its own augmentation) or root (an equal share for every root of data). The held-out selection images are taken off first and are never redrawn")
    class_list: str | None = Field(None, description="classes.txt mapping WordNet ids to indices, for files named by WordNet id")
    budgets: list[float | str] = Field(default_factory=lambda: [0.7, 0.85], description="latency budgets: ratios of the teacher (<= 1), milliseconds (> 1), or the name of one of `donors` (in `bespoke run`): as fast as that model is on the target device, its latency ratio timed beside the teacher (search.check_repeats calls, the median) before the search; the model itself then meets its own budget by definition, however the device's timings drift, and competes in the pick as it is (search.zoo)")
    out: str = Field("bespoke-out", description="output directory")
    house: str | None = Field(None, description="model house directory; default: OUT/house")
    seed: int = Field(0, description="random seed of every stage")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    device: str = Field("cpu", description="cpu or cuda")
    preset: Literal["quick", "full", "tiny"] = Field("quick", description="schedule preset filling every key the configuration leaves unset: quick (minutes), full (the documented defaults) or tiny (a tiny random-weight teacher, donor and generated images: every stage in about a minute, for trying plugins)")
    plugins: PluginSelection = Field(default_factory=PluginSelection)
    plugin_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="each plugin's own options, under its name (see docs/plugins.md)")
    build: BuildConfig = Field(default_factory=BuildConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    reference_models: list[str] = Field(default_factory=list, description="models drawn on the Pareto plot for comparison (e.g. the donors)")

    @field_validator("data", "val_data", "score_data", mode="before")
    @classmethod
    def _roots(cls, v: Any) -> Any:
        if v is None:
            return v
        many = isinstance(v, (list, tuple))
        items = list(v) if many else [v]
        if many and not items:
            raise ValueError("an empty list: give one or more folders (or package.module:attribute), or leave the key out")
        out = []
        for item in items:
            if hasattr(item, "__fspath__"):
                item = str(item)
            if not isinstance(item, str) or not item.strip():
                what = "an empty string" if isinstance(item, str) else f"{type(item).__name__} {item!r}"
                raise ValueError(f"{what} is not an image source: give a folder path or package.module:attribute"
                                 + (", or a list of them" if not many else " in each entry of the list"))
            out.append(item)
        twice = sorted({x for x in out if out.count(x) > 1})
        if twice:
            raise ValueError(f"lists {twice[0]!r} twice; give each folder once")
        return out if many else out[0]

    @field_validator("budgets")
    @classmethod
    def _budgets_positive(cls, v: list[float | str]) -> list[float | str]:
        if not v:
            raise ValueError("give at least one budget")
        v = [_number_or_name(b) for b in v]
        for b in v:
            if isinstance(b, str):
                if not b:
                    raise ValueError("a budget named by a model needs the model's name (one of donors)")
                continue
            if b <= 0:
                raise ValueError(f"budget {b} must be > 0 (a ratio of the teacher's latency, or milliseconds)")
        return v


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        value = err.get("input")
        try:
            shown = json.dumps(value, default=str)
        except Exception:
            shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = str(err.get("msg", "")).removeprefix("Value error, ")  # our validators' words, as written
        lines.append(f"  {key} = {shown}: {msg}")
    return "\n".join(lines)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) file into a dict; clear errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} does not exist; give the path to a .yaml or .toml file")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml", ".json"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise UsageError(f"config file {str(p)!r}: unknown extension {suffix!r}; use .yaml, .yml or .toml")
    except UsageError:
        raise
    except Exception as exc:  # parse errors from yaml/tomllib carry line numbers
        raise UsageError(f"config file {str(p)!r} could not be parsed: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load ``path`` (optional), apply ``overrides`` (nested dict from CLI flags), validate."""
    data: dict[str, Any] = read_config_file(path) if path else {}
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        source = f"{path}" if path else "command-line options"
        if path and overrides:
            source = f"{path} (with command-line overrides)"
        raise UsageError(format_validation_error(exc, source)) from None


def apply_plugin_flags(cfg: RunConfig, names: list[str], registry: Any) -> RunConfig:
    """``--plugin NAME``: each name's category (from its registration) says what it replaces.

    Latency and search names replace the configured one; distill-loss too; block-source names,
    when any are given, become the list of enabled sources.
    """
    sel = cfg.plugins.model_copy(deep=True)
    sources: list[str] = []
    for name in names:
        rec = registry.get(name)
        if rec.category == "latency":
            sel.latency = name
        elif rec.category == "search":
            sel.search = name
        elif rec.category == "distill-loss":
            sel.distill_loss = name
        elif rec.category == "block-source":
            sources.append(name)
    if sources:
        sel.block_sources = sources
    return cfg.model_copy(update={"plugins": sel})


def check_plugin_selection(cfg: RunConfig, registry: Any) -> None:
    """Every configured name exists in its category; every plugin's options validate."""
    sel = cfg.plugins
    for name in sel.block_sources:
        registry.get(name, "block-source")
    registry.get(sel.distill_loss, "distill-loss")
    registry.get(sel.latency, "latency")
    registry.get(sel.search, "search")
    whole_sources(cfg)
    stitch_sources(cfg)
    for name, opts in cfg.plugin_options.items():
        rec = registry.get(name)
        if rec.options_model is not None:
            validate_plugin_options(rec, opts)


def whole_sources(cfg: RunConfig) -> set[str] | None:
    """The block sources that may propose for the whole-network segment (None: every source,
    as for any segment), checked against the run's block sources."""
    return _named_sources(cfg, "whole_sources")


def stitch_sources(cfg: RunConfig) -> set[str] | None:
    """The block sources that propose for the stitched segments (``build.stitch_sources``; None:
    no stitched segments), checked against the run's block sources."""
    return _named_sources(cfg, "stitch_sources")


def _named_sources(cfg: RunConfig, key: str) -> set[str] | None:
    wanted = list(getattr(cfg.build, key))
    if not wanted:
        return None
    known = list(cfg.plugins.block_sources)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UsageError(f"build.{key} names {', '.join(map(repr, unknown))}, not among this run's "
                         f"block sources ({', '.join(known) or 'none'}); name some of those, or add it to "
                         "plugins.block_sources")
    return set(wanted)


def validate_plugin_options(record: Any, options: dict[str, Any]) -> Any:
    try:
        return record.options_model.model_validate(options or {})
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, f"plugin_options.{record.name}")) from None


def plugin_options(cfg: RunConfig, name: str) -> dict[str, Any]:
    return dict(cfg.plugin_options.get(name, {}))


# --------------------------------------------------------------------------------------------
# Presets: schedules for `bespoke run --preset quick|full|tiny`
# --------------------------------------------------------------------------------------------

# ``quick``: a small but real run that finishes in minutes on a laptop CPU (the offline default).
# Values apply only where the configuration did not set the key itself.
QUICK_PRESET: dict[str, Any] = {
    "input_size": 160,
    # Long segments (up to 0.7 of the remaining cut points) so that the non-overlapping ones
    # cover most of the network: budgets of 0.6 need that much to replace.
    # The sample photos are few: distil on augmented crops of them (no labels needed).
    # Every epoch sees new augmented views, so the activation cache (which would replay the
    # first epoch's views) is off.
    "build": {"segments": 6, "tiles": 6, "max_fraction": 0.5, "epochs": 30, "batch_size": 8,
              "calibration_images": 32, "validation_images": 32, "augment": True,
              "cache_activations": False},
    # With a handful of held-out images agreement moves in coarse steps; KL is continuous.
    "search": {"proxy": "replace-one-kl"},
    "finetune": {"epochs": 50, "steps": 40, "batch_size": 8, "bn_recalibration_batches": 4},
}
QUICK_PLUGIN_OPTIONS: dict[str, dict[str, Any]] = {
    "measured-latency": {"warmup": 3, "runs": 15},
    "onnxruntime-latency": {"warmup": 3, "runs": 15},
    "optuna": {"n_trials": 60},
    "pruned-self": {"ratios": [0.5, 0.75]},
}


# ``tiny``: every stage on a tiny random-weight teacher and donor and a handful of generated
# images (bespoke.tiny), for plugin authors and the docs' examples. Like ``quick``, values apply
# only where the configuration did not set the key, so `--plugin`, `--teacher` or `--data` swap
# one piece and keep the rest tiny.
TINY_PRESET: dict[str, Any] = {
    "teacher": "bespoke.tiny:teacher",
    "donors": ["bespoke.tiny:donor"],
    "data": "bespoke.tiny:images",
    "input_size": 64,
    "budgets": [0.8],
    "out": "bespoke-tiny",
    "build": {"segments": 3, "tiles": 3, "max_fraction": 0.5, "epochs": 1, "steps_per_epoch": 2,
              "batch_size": 4, "calibration_images": 8, "validation_images": 8},
    "search": {"proxy": "replace-one-kl", "rerank_top_k": 2},
    "finetune": {"epochs": 1, "steps": 2, "batch_size": 4, "bn_recalibration_batches": 1},
}
TINY_PLUGIN_OPTIONS: dict[str, dict[str, Any]] = {
    "measured-latency": {"warmup": 2, "runs": 7},
    "onnxruntime-latency": {"warmup": 2, "runs": 7},
    "optuna": {"n_trials": 20},
    "annealing": {"steps": 300, "restarts": 1},
    "random": {"samples": 200},
    "pruned-self": {"ratios": [0.5]},
    "timm-donors": {"max_per_segment": 1},
    "lowrank": {"fractions": [0.25], "calibration_images": 8},
}
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "quick": (QUICK_PRESET, QUICK_PLUGIN_OPTIONS),
    "tiny": (TINY_PRESET, TINY_PLUGIN_OPTIONS),
}


def apply_preset(cfg: RunConfig, registry: Any = None) -> RunConfig:
    """``cfg`` with its preset's values filled in wherever the configuration left a default.

    ``full`` keeps the documented defaults. ``quick`` shortens every schedule, lowers the input
    size, and draws the donors on the Pareto plot as reference models. ``tiny`` also swaps in the
    tiny teacher, donor and images of :mod:`bespoke.tiny`.
    """
    if cfg.preset not in PRESETS:
        return cfg
    values, plugin_values = PRESETS[cfg.preset]
    update: dict[str, Any] = {}
    for key, value in values.items():
        current = getattr(cfg, key)
        if isinstance(value, dict):
            section = current.model_copy(update={k: v for k, v in value.items()
                                                 if k not in current.model_fields_set})
            update[key] = section
        elif key not in cfg.model_fields_set and (current is None or cfg.preset == "tiny"):
            # tiny replaces set defaults too (the Lite teacher, its donors, the budgets)
            update[key] = value
    donors = update.get("donors", cfg.donors)
    if "reference_models" not in cfg.model_fields_set and not cfg.reference_models:
        update["reference_models"] = list(donors)
    options = {k: dict(v) for k, v in cfg.plugin_options.items()}
    for name, defaults in plugin_values.items():
        fields = registry.option_fields(name) if registry is not None else set()
        mine = options.get(name, {})
        extra = {k: v for k, v in defaults.items() if k in fields and k not in mine}
        if extra:
            options[name] = {**extra, **mine}
    update["plugin_options"] = options
    return cfg.model_copy(update=update)
