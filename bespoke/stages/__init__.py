"""The pipeline's stages, one module each; :mod:`bespoke.pipeline` strings them together.

Each stage module is glue: it takes the run configuration, the plugin facade
(:class:`bespoke.plugins.Registry`) and a console, and calls the engine modules (``partition``,
``house``, ``distill``, ``latency``, ``search``, ``finetune``, ``evaluate``, ``export``,
``report``) that do the work.

- :mod:`~bespoke.stages.build`: the teacher, the images, the house created or resumed, its segments.
- :mod:`~bespoke.stages.profile`: latency tables: measured, or a device plugin's; calibration.
- :mod:`~bespoke.stages.search`: the search problem from a house or a file, a strategy run, the report.
- :mod:`~bespoke.stages.pick`: the final pick of each budget over input sizes.
- :mod:`~bespoke.stages.students`: assemble, fine-tune, evaluate, time and export students.
- :mod:`~bespoke.stages.report`: ``report.json``, ``pareto.png``, the summary table; stage timings.
"""

from __future__ import annotations

from typing import Any, Callable


def warner(console: Any) -> Callable[[str], None]:
    """``warn(message)`` printing one yellow warning line on ``console``."""
    return lambda m: console.print(f"[yellow]warning:[/yellow] {m}", highlight=False)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def plain(choices: list[Any]) -> list[dict[str, Any]]:
    """Search choices (objects or dicts) as the dicts a student is assembled from: ``segment``
    (its id, ``"start-end"``), ``start``, ``end``, ``alternative``."""
    def get(c, k):
        return c[k] if isinstance(c, dict) else getattr(c, k)

    return [{"segment": f"{get(c, 'start')}-{get(c, 'end')}", "start": int(get(c, "start")),
             "end": int(get(c, "end")), "alternative": get(c, "alternative")} for c in choices]
