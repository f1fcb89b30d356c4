"""The profile stage: latencies of every teacher segment and alternative on the target.

A measuring estimator measures the house into a lookup table (``bespoke profile``; ``bespoke run``
does it once and the search reads the table); a table estimator (a device plugin's) is the
profile already. After the run has measured its students end to end, the table it wrote is
calibrated against those measurements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from bespoke.console import table as make_table
from bespoke.errors import UsageError
from bespoke.house import House
from bespoke.latency import module_signature, profile_house, read_lut, recalibrate_lut, write_lut
from bespoke.stages import pct, warner
from bespoke.stages.build import house_dir


def measure(cfg: Any, registry: Any, output: Path, console: Any, size: int | None = None) -> Any:
    """Measure the house of ``cfg`` with its (measuring) latency estimator at input ``size``;
    write the table to ``output`` (keeping a calibration already there); print a summary."""
    name = cfg.plugins.latency
    estimator = registry.latency_estimator(name, cfg.plugin_options.get(name), threads=cfg.threads,
                                           warn=warner(console))
    if getattr(estimator, "table", None) is not None:
        raise UsageError(f"`bespoke profile` measures, but {name!r} answers from a lookup table; "
                         "pick a measuring estimator: --plugin measured-latency or --plugin onnxruntime-latency")
    root = house_dir(cfg)
    house = House.open(root)
    device = estimator.device()
    px = f" at {size} px" if size else ""
    console.print(f"profiling {root}{px} with {name}: {device.runtime} on {device.name}, "
                  f"{device.threads} thread(s), batch {device.batch}")
    table, mods = profile_house(house, estimator, registry, cfg, batch=device.batch, size=size)
    output = Path(output)
    if output.is_file():  # a calibration fitted for this device stays valid for new measurements
        try:
            old = read_lut(output, device=device)
        except UsageError:
            old = None
        if old is not None and old.calibration is not None:
            table.calibration = old.calibration
            console.print(f"kept the calibration already in {output}")
    write_lut(table, output)
    for alt_id, why in mods.skipped.items():
        console.print(f"[yellow]warning:[/yellow] alternative {alt_id!r} not profiled: {why}", highlight=False)
    console.print(summary_table(table, mods, device))
    console.print(f"teacher {table.teacher.ms:.3f} ms; {len(table.entries)} entries written to {output}")
    return table


def summary_table(table: Any, mods: Any, device: Any) -> Any:
    """Per segment: the teacher's latency, how many alternatives, the fastest of them."""

    def ms(item):
        return table.get_ms(module_signature(item.module, item.input_shape))

    summary = make_table(f"latency on {device.name} ({device.runtime})", ("segment", "left"), "teacher ms",
                         "alts", ("fastest alternative", "left"), "ms")
    for seg_id, item in mods.segments.items():
        alts = [(ms(mods.alternatives[a]), a) for a, s in mods.alt_segment.items() if s == seg_id]
        best = min(alts) if alts else (None, "-")
        summary.add_row(seg_id, f"{ms(item):.3f}", str(len(alts)), best[1],
                        "-" if best[0] is None else f"{best[0]:.3f}")
    return summary


def for_search(cfg: Any, registry: Any, lut_path: Path, console: Any, size: int | None = None, *,
               measure: Callable[..., Any] = measure) -> Any:
    """Latencies of every teacher segment and alternative through the selected estimator (at
    input resolution ``size``; default: the teacher's own).

    A measuring estimator measures once into ``lut_path`` (with ``measure``, :func:`measure` or
    :func:`bespoke.pipeline.profile`) and the search reads that table (no second measurement); a
    table estimator (a device plugin's LUT) is the profile already. Returns the configuration the
    search stage runs with.
    """
    name = cfg.plugins.latency
    probe = registry.latency_estimator(name, cfg.plugin_options.get(name))
    if getattr(probe, "table", None) is not None:
        if size:
            return table_at_size(cfg, name, probe, size, console)
        console.print(f"latencies from the table of {name!r}; nothing to measure")
        return cfg
    measure(cfg, registry, lut_path, console=console, size=size)
    options = {**cfg.plugin_options, "lut-latency": {"path": str(lut_path)}}
    if not registry.has("lut-latency"):
        return cfg
    plugins = cfg.plugins.model_copy(update={"latency": "lut-latency"})
    return cfg.model_copy(update={"plugins": plugins, "plugin_options": options})


def table_at_size(cfg: Any, name: str, probe: Any, size: int, console: Any) -> Any:
    """A table estimator answers at one input size; the table for another size lies beside its
    file as ``<stem>-<size>px.json`` (what `bespoke run` writes). The configuration that reads it."""
    options = dict(cfg.plugin_options.get(name) or {})
    path = Path(options.get("path") or getattr(getattr(probe, "options", None), "path", None) or "")
    sibling = path.with_name(f"{path.stem}-{size}px{path.suffix or '.json'}") if path.name else None
    if sibling is None or not sibling.is_file():
        raise UsageError(f"search.input_sizes asks for students at {size} px, but the latency table of {name!r} "
                         f"({path if path.name else 'no file'}) holds one input size and no table "
                         f"{sibling.name if sibling else f'<table>-{size}px.json'} lies beside it. Profile the "
                         f"house at that size (a `bespoke run` with a measuring estimator, --plugin measured-latency, "
                         "writes one), or leave search.input_sizes empty")
    try:
        noted = json.loads(sibling.read_text(encoding="utf-8")).get("notes", {}).get("input_size")
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"{sibling}: not a readable latency table ({exc})") from None
    if noted is not None and int(noted) != int(size):
        raise UsageError(f"{sibling} was profiled at {noted} px, not {size} px; profile the house again at {size} px")
    console.print(f"latencies at {size} px from {sibling}", highlight=False)
    return cfg.model_copy(update={"plugin_options": {**cfg.plugin_options, name: {**options, "path": str(sibling)}}})


def calibrate_lut(search_cfg: Any, stage: Any, made: list[Any], measured: dict[str, float | None],
                  lut_path: Path, console: Any) -> Any:
    """The students (and the teacher) were just measured end to end: refit the calibration of the
    latency table the search read (when this run wrote it) so later searches predict better."""
    opts = search_cfg.plugin_options.get("lut-latency") or {}
    if search_cfg.plugins.latency != "lut-latency" or Path(opts.get("path", "")) != Path(lut_path):
        return None  # a device plugin's table (or a measuring estimator): nothing of ours to refit
    points = [(m.name, m.plan["latency_ms"], len(m.plan.get("choices", [])), measured.get(m.name)) for m in made]
    try:
        table = recalibrate_lut(lut_path, stage.latency_device, points, teacher_measured_ms=measured.get("teacher"))
    except UsageError as exc:
        console.print(f"[yellow]warning:[/yellow] latency table not calibrated: {exc}", highlight=False)
        return None
    cal = table.calibration
    console.print(f"calibrated {lut_path} from {cal.n} measured model(s): a={cal.a:.3f}, b={cal.b:+.2f} ms, "
                  f"c={cal.c:+.3f} ms per replaced segment; median error {pct(cal.median_abs_rel_error_before)} "
                  f"-> {pct(cal.median_abs_rel_error_after)}", highlight=False)
    return table


__all__ = ["calibrate_lut", "for_search", "measure", "summary_table", "table_at_size"]
