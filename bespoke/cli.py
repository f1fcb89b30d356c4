"""The ``bespoke`` command line (typer + rich). Thin: parses flags, calls the stage modules.

Errors bespoke raises on purpose (:class:`bespoke.errors.BespokeError`) print as one clear
message and exit with code 2; no traceback for bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from bespoke.console import make_console
from bespoke.console import table as make_table
from bespoke.errors import BespokeError, UsageError

app = typer.Typer(
    name="bespoke",
    help="Make a pretrained network fast on many target devices at low cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = make_console()
err_console = make_console(stderr=True)

TEACHER_HELP = "timm model name, package.module:attribute, or a checkpoint path (the config key teacher)"
TEACHER_WEIGHTS_HELP = ("the teacher's own weights: a local .safetensors or .pth state dict, e.g. your model fine-tuned "
                        "on your classes (its classifier's size is read from it), or 'packaged' (the config key "
                        "teacher_weights; default: the best real weights available)")
CONFIG_HELP = "YAML/TOML run configuration"
PluginOpt = typer.Option(None, "--plugin", "-p", help="Use this plugin (repeatable); its category says what it replaces. See `bespoke plugins`.")


def _registry():
    from bespoke.plugins import get_registry

    reg = get_registry()
    for w in reg.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    return reg


def _parse_budgets(text: str | None, names: bool = False) -> list[float | str] | None:
    """``--budget``: comma-separated ratios (<= 1) or ms (> 1); with ``names`` (``bespoke run``),
    also donor names (a budget as fast as that model)."""
    if text is None:
        return None
    vals: list[float | str] = []
    for x in (x.strip() for x in text.split(",")):
        if not x:
            continue
        try:
            vals.append(float(x))
        except ValueError:
            if not names:
                raise UsageError(f"--budget {text!r}: give comma-separated numbers, e.g. 0.6,0.8 (ratios) or 12.5 (ms)"
                                 ) from None
            vals.append(x)
    if not vals:
        raise UsageError("--budget is empty; give e.g. 0.6,0.8")
    return vals


def _parse_sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--input-sizes {text!r}: give comma-separated whole pixel sizes, e.g. 240,224") from None


DATA_HELP = ("distillation images: an image folder (flat or class subfolders) or package.module:attribute; "
             "repeat for several, combined")
VAL_DATA_HELP = ("selection images, held out to profile, re-rank and pick (default: split off the distillation "
                 "images); repeat for several")
SCORE_DATA_HELP = ("scoring images, read once at the end to score the teacher and the saved students (report.json: "
                   "score_top1, score_agreement), never to choose; repeat for several")
CLASS_LIST_HELP = "classes.txt of 'index wnid name' lines labelling images named by WordNet id (the config key class_list)"
PRESET_HELP = ("quick (default; minutes), full (the documented defaults) or tiny (a tiny random-weight teacher and "
               "donor on generated images: every stage in about a minute, to try a plugin)")
BALANCE_HELP = ("how the distillation images are drawn: none, class (an equal share per class, for a pool skewed "
                "to a few classes) or root (per --data root) (the config key data_balance)")


def _roots(values: Optional[List[str]]) -> str | list[str] | None:
    """A repeatable image option: not given -> None, once -> the string, several -> the list."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def _config(config: Optional[Path], plugins: Optional[List[str]], **flags: Any):
    """Config file + CLI overrides + --plugin selections, validated, with the registry."""
    from bespoke.config import apply_plugin_flags, check_plugin_selection, load_config

    reg = _registry()
    overrides: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        node = overrides
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    cfg = load_config(config, overrides)
    cfg = apply_plugin_flags(cfg, list(plugins or []), reg)
    check_plugin_selection(cfg, reg)
    return cfg, reg


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table.")) -> None:
    """List installed plugins: name, category, distribution, version, description."""
    reg = _registry()
    rows = [
        {"name": r.name, "category": r.category, "distribution": r.distribution,
         "version": r.version, "description": r.description}
        for r in sorted(reg.records.values(), key=lambda r: (r.category, r.name))
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = make_table("bespoke plugins", *((col, "left") for col in ("name", "category", "distribution",
                                                                       "version", "description")))
    for r in rows:
        table.add_row(*(r[c] for c in ("name", "category", "distribution", "version", "description")))
    console.print(table)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="timm model name, or package.module:attribute returning an nn.Module"),
    input_size: int = typer.Option(None, "--input-size", help="square input resolution (default: the model's own)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the cut points of MODEL: where it splits into single-input/single-output segments."""
    from bespoke.models import inspect_model

    info = inspect_model(model, input_size)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    table = make_table(f"{info['model']}  input {tuple(info['input_shape'])}: {len(info['cut_points'])} cut points",
                       "index", ("node", "left"), ("output shape", "left"), "stride")
    for cp in info["cut_points"]:
        table.add_row(str(cp["index"]), cp["name"], str(tuple(cp["shape"])), str(cp["stride"]))
    console.print(table)


@app.command()
def build(
    config: Optional[Path] = typer.Argument(None, help="YAML/TOML run configuration"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="model house directory"),
    data: Optional[List[str]] = typer.Option(None, "--data", help=DATA_HELP),
    val_data: Optional[List[str]] = typer.Option(None, "--val-data", help=VAL_DATA_HELP),
    class_list: Optional[str] = typer.Option(None, "--class-list", help=CLASS_LIST_HELP),
    data_balance: Optional[str] = typer.Option(None, "--data-balance", help=BALANCE_HELP),
    teacher: Optional[str] = typer.Option(None, "--teacher", help=TEACHER_HELP),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help=TEACHER_WEIGHTS_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", help=PRESET_HELP + "; applied as `bespoke run` applies it"),
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """Build (or resume) a model house: sample segments, create alternatives, distil them."""
    from bespoke import pipeline

    cfg, reg = _config(config, plugin, data=_roots(data), val_data=_roots(val_data), class_list=class_list,
                       data_balance=data_balance, teacher=teacher, teacher_weights=teacher_weights, preset=preset,
                       house=str(out) if out else None)
    pipeline.build(cfg, reg, console=console)


@app.command()
def profile(
    house: Path = typer.Argument(..., help="model house directory"),
    output: Path = typer.Option(..., "--output", "-o", help="latency lookup table (JSON) to write"),
    plugin: Optional[List[str]] = PluginOpt,
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads to measure with (the config key threads): passed to the latency estimator's own threads option when it has one, else a warning says it is not"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/TOML run configuration (e.g. the estimator's plugin_options)"),
) -> None:
    """Measure every alternative and teacher segment of HOUSE on this device; write a LUT."""
    from bespoke import pipeline

    cfg, reg = _config(config, plugin, threads=threads, house=str(house))
    pipeline.profile(cfg, reg, Path(output), console=console)


@app.command()
def search(
    house: Path = typer.Argument(..., help="model house directory (or a search-problem JSON file, see docs/search.md)"),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="comma-separated ratios of the teacher latency (<=1) or ms (>1)"),
    output: Path = typer.Option(Path("search.json"), "--output", "-o", help="search report (JSON) to write; one recipe per budget is written beside it"),
    plugin: Optional[List[str]] = PluginOpt,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: SQLite file beside the output)"),
    study: Optional[str] = typer.Option(None, "--study", help="Optuna study name (processes sharing storage and name cooperate)"),
) -> None:
    """Search which segments to replace under each budget; write recipes (and the Pareto front)."""
    from bespoke import pipeline

    cfg, reg = _config(config, plugin, budgets=_parse_budgets(budget), house=str(house))
    pipeline.search(cfg, reg, Path(output), storage=storage, study=study, console=console)


@app.command()
def finetune(
    recipe: Path = typer.Argument(..., help="a recipe from `bespoke search` (JSON)"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the student"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    data: Optional[List[str]] = typer.Option(None, "--data", help="distillation images: an image folder or package.module:attribute, repeat for several (default: the config's data)"),
    plugin: Optional[List[str]] = PluginOpt,
) -> None:
    """Assemble a student, recalibrate BatchNorm, fine-tune it with distillation (resumable)."""
    from bespoke import pipeline

    cfg, reg = _config(config, plugin, data=_roots(data))
    pipeline.finetune(cfg, reg, recipe, out, console=console)


@app.command()
def export(
    student: Path = typer.Argument(..., help="a saved student directory"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the exported files"),
    formats: str = typer.Option("onnx,torch-export,safetensors", "--formats", help="comma-separated: onnx, torch-export, safetensors"),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch",
                                       help="symbolic batch axis in the ONNX file and the program (default: batch 1)"),
) -> None:
    """Export a student to ONNX (checked with onnxruntime), torch.export and recipe+safetensors."""
    from bespoke import pipeline

    pipeline.export(student, out, [f.strip() for f in formats.split(",") if f.strip()], console=console,
                    dynamic_batch=dynamic_batch)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML/TOML run configuration (optional)"),
    plugin: Optional[List[str]] = PluginOpt,
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="comma-separated ratios (<=1), ms (>1) or donor names (as fast as that model on the device), e.g. 0.5,tf_efficientnet_lite0"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (the config key out)"),
    data: Optional[List[str]] = typer.Option(None, "--data", help=DATA_HELP),
    val_data: Optional[List[str]] = typer.Option(None, "--val-data", help=VAL_DATA_HELP),
    score_data: Optional[List[str]] = typer.Option(None, "--score-data", help=SCORE_DATA_HELP),
    class_list: Optional[str] = typer.Option(None, "--class-list", help=CLASS_LIST_HELP),
    data_balance: Optional[str] = typer.Option(None, "--data-balance", help=BALANCE_HELP),
    teacher: Optional[str] = typer.Option(None, "--teacher", help=TEACHER_HELP),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help=TEACHER_WEIGHTS_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", help=PRESET_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed of every stage (the config key seed)"),
    input_sizes: Optional[str] = typer.Option(None, "--input-sizes",
                                              help="also search students at these input sizes, e.g. 240,224 (search.input_sizes)"),
) -> None:
    """Everything: build (or reuse) the house, profile, search each budget, fine-tune, export, score, report."""
    from bespoke import pipeline

    cfg, reg = _config(config, plugin, budgets=_parse_budgets(budget, names=True), out=str(out) if out else None,
                       data=_roots(data), val_data=_roots(val_data), score_data=_roots(score_data),
                       class_list=class_list, data_balance=data_balance, teacher=teacher,
                       teacher_weights=teacher_weights, preset=preset, seed=seed,
                       **{"search.input_sizes": _parse_sizes(input_sizes)})
    pipeline.run(cfg, reg, console=console)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="bespoke")
    except BespokeError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        raise SystemExit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume where it stopped")
        raise SystemExit(130)


if __name__ == "__main__":
    main()
