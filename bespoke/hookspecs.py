"""The four plugin families bespoke knows, as pluggy hook specifications.

Every hook receives a ``register`` callback. A plugin calls it once per implementation it
provides, with a :class:`bespoke.api.PluginRecord`, so one plugin package may provide several
named implementations (and each with its own options model). The built-in plugins in
``bespoke_plugins`` use exactly these hooks, loaded through the ``bespoke`` entry-point group, like
any third-party package.

Plugins import everything from :mod:`bespoke.api`; ``docs/plugins.md`` documents each hook and
type, and ``examples/plugin-templates/`` holds one runnable plugin per family.

Example (a third-party latency plugin)::

    from bespoke.api import hookimpl, PluginRecord

    @hookimpl
    def register_latency_estimators(register):
        register(PluginRecord(name="my-board", category="latency",
                              factory=MyBoardEstimator, description="..."))
"""

from __future__ import annotations

from typing import Callable

import pluggy

from bespoke.types import PluginRecord

PROJECT_NAME = "bespoke"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[PluginRecord], None]


@hookspec
def register_block_sources(register: Register) -> None:
    """Register block sources: producers of alternatives for a teacher segment.

    Called once when the plugin manager loads, before any command runs.

    :param register: call ``register(PluginRecord(category="block-source", ...))`` once per
        source. ``factory(options)`` must return an object implementing
        :class:`bespoke.api.BlockSource`; ``options`` is an instance of the record's
        ``options_model`` (or ``None`` when it has none).
    """


@hookspec
def register_distill_losses(register: Register) -> None:
    """Register distillation losses used to train alternatives and fine-tune students.

    Called once when the plugin manager loads.

    :param register: call ``register(PluginRecord(category="distill-loss", ...))`` once per
        loss. ``factory(options)`` returns a :class:`bespoke.api.DistillLoss`: a callable
        ``loss(student_out, teacher_out) -> scalar tensor``.
    """


@hookspec
def register_latency_estimators(register: Register) -> None:
    """Register latency estimators: measured on this device, or read from a lookup table.

    Called once when the plugin manager loads.

    :param register: call ``register(PluginRecord(category="latency", ...))`` once per
        estimator. ``factory(options)`` returns a :class:`bespoke.api.LatencyEstimator`. The
        run's ``threads`` reaches it as its ``threads`` option when its options model has one.
    """


@hookspec
def register_search_strategies(register: Register) -> None:
    """Register search strategies that pick which segments to replace under a budget.

    Called once when the plugin manager loads.

    :param register: call ``register(PluginRecord(category="search", ...))`` once per
        strategy. ``factory(options)`` returns a :class:`bespoke.api.SearchStrategy`, whose
        solutions are built with :func:`bespoke.api.finalize`.
    """
