"""The plugin facade: the one place that discovers, loads and constructs plugins.

Built-in plugins (``bespoke_plugins``) are entry points of our own distribution, loaded exactly
like a third party's. Loading is one entry point at a time: one that fails to import or register
becomes a warning naming its distribution, and everything else keeps working.

The rest of bespoke constructs plugins only through the typed methods of :class:`Registry`
(:meth:`~Registry.block_sources`, :meth:`~Registry.block_source`, :meth:`~Registry.distill_loss`,
:meth:`~Registry.latency_estimator`, :meth:`~Registry.search_strategy`), never through a record's
factory. What those return is checked where it crosses back into bespoke, and each breach is a
:class:`bespoke.UsageError` naming the plugin:

- a latency estimator that answers a query with a negative, NaN or infinite latency, or leaves
  a query unanswered;
- a search strategy that returns ``None``, something other than one ``Solution`` per budget, or
  a solution choosing a candidate index the problem does not have (``bespoke.search`` then checks
  overlaps, latency and loss);
- a block source whose created module does not map the segment's input shape to its output shape
  (checked on one zero input at batch 1 when the alternative is created; the house records that
  alternative as failed, with this message, and the build goes on).

Options the user gives on the command line that a plugin may not take (``--threads`` for a latency
estimator, ``--storage``/``--study`` for a search strategy) are passed on when the plugin's options
model has that field, and otherwise refused with a warning line naming the plugin and the option
(the run goes on: the option keeps its meaning elsewhere, e.g. ``--threads`` still sets torch's
thread count); never dropped silently.

Environment variables:

- ``BESPOKE_LOAD_PLUGINS``: comma-separated entry-point names; when set, only these load
  (set it empty to load none).
- ``BESPOKE_DISABLE_PLUGINS``: comma-separated entry-point names that do not load.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings as _warnings
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Callable, Iterable, Sequence

import pluggy

from bespoke import hookspecs
from bespoke.errors import UsageError
from bespoke.types import CATEGORIES, LatencyQuery, PluginRecord, SearchProblem, Solution

ENTRY_POINT_GROUP = "bespoke"

HOOKS_BY_CATEGORY = {
    "block-source": "register_block_sources",
    "distill-loss": "register_distill_losses",
    "latency": "register_latency_estimators",
    "search": "register_search_strategies",
}


class DuplicatePluginError(UsageError):
    """Two plugins registered one name."""


@dataclass
class Registry:
    """Every registered implementation, by name; names are unique across categories."""

    records: dict[str, PluginRecord] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # name -> every record claiming it, when more than one plugin does; using the name is an error
    conflicts: dict[str, list[PluginRecord]] = field(default_factory=dict)
    loaded: list[tuple[str, str, str]] = field(default_factory=list)  # (entry point, dist, version)

    def add(self, record: PluginRecord) -> None:
        if record.category not in CATEGORIES:
            raise UsageError(
                f"plugin {record.plugin!r} ({record.distribution}) registered {record.name!r} "
                f"with unknown category {record.category!r}; use one of {', '.join(CATEGORIES)}"
            )
        prior = self.records.get(record.name)
        if prior is not None:
            # Not fatal at load time (the rest of the CLI keeps working, `bespoke plugins` shows
            # it); selecting the contested name is an error naming both.
            claims = self.conflicts.setdefault(record.name, [prior])
            claims.append(record)
            self.warnings.append(self._conflict_message(record.name))
            return
        self.records[record.name] = record

    def _conflict_message(self, name: str) -> str:
        claims = " and ".join(
            f"{r.plugin!r} from distribution {r.distribution!r}" for r in self.conflicts[name]
        )
        return (
            f"two plugins claim the name {name!r}: {claims}. Uninstall one, or disable one with "
            f"BESPOKE_DISABLE_PLUGINS=<entry point name>"
        )

    def by_category(self, category: str) -> list[PluginRecord]:
        return [r for r in self.records.values() if r.category == category]

    def names(self) -> dict[str, list[str]]:
        return {c: sorted(r.name for r in self.by_category(c)) for c in CATEGORIES}

    def get(self, name: str, category: str | None = None) -> PluginRecord:
        if name in self.conflicts:
            raise DuplicatePluginError(self._conflict_message(name))
        rec = self.records.get(name)
        if rec is None or (category is not None and rec.category != category):
            want = f" {category}" if category else ""
            raise UsageError(
                f"unknown{want} plugin {name!r}. Available:\n" + self.describe_available()
            )
        return rec

    def describe_available(self) -> str:
        lines = []
        for cat, names in self.names().items():
            lines.append(f"  {cat}: {', '.join(names) if names else '(none installed)'}")
        return "\n".join(lines)

    def option_fields(self, name: str) -> set[str]:
        """The option names plugin ``name`` takes (empty when it has no options model or is not
        installed): what a preset or a command-line flag may pass on to it."""
        rec = self.records.get(name)
        model = rec.options_model if rec is not None else None
        return set(getattr(model, "model_fields", None) or {})

    def instantiate(self, name: str, options: dict[str, Any] | None = None,
                    category: str | None = None) -> Any:
        """Validate ``options`` with the plugin's own model, then call its factory.

        The generic, unchecked constructor, for tools and tests that make any plugin by name;
        bespoke's own stages use the typed methods below, which add the boundary checks."""
        rec = self.get(name, category)
        opts: Any = None
        if rec.options_model is not None:
            from bespoke.config import validate_plugin_options

            opts = validate_plugin_options(rec, options or {})
        elif options:
            raise UsageError(
                f"plugin {name!r} takes no options, but plugin_options.{name} gives "
                f"{sorted(options)}; remove them"
            )
        return rec.factory(opts)

    # -- the typed facade ------------------------------------------------------------------

    def block_source(self, name: str, options: dict[str, Any] | None = None, *,
                     donors: Sequence[str] | None = None) -> Any:
        """Block source ``name`` with ``options`` (its ``plugin_options``; none is enough to
        rebuild a saved alternative). ``donors`` (the configuration's ``donors``) is the default
        of a ``donors`` option, for a source that has one."""
        options = dict(options or {})
        if donors is not None and "donors" in self.option_fields(name) and "donors" not in options:
            options["donors"] = list(donors)
        return CheckedBlockSource(self.instantiate(name, options, category="block-source"), name)

    def block_sources(self, cfg: Any, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Every block source ``cfg.plugins.block_sources`` enables, by name. One that is not
        implemented yet is skipped (``warn`` says so); none usable at all is a UsageError."""
        from bespoke.errors import NotImplementedYet

        out: dict[str, Any] = {}
        for name in cfg.plugins.block_sources:
            try:
                out[name] = self.block_source(name, cfg.plugin_options.get(name), donors=cfg.donors)
            except NotImplementedYet as exc:
                if warn:
                    warn(f"block source {name!r} is skipped: {exc}")
        if not out:
            raise UsageError(f"none of the block sources {cfg.plugins.block_sources} is usable; "
                             f"enable one that is installed (see `bespoke plugins`), e.g. --plugin skip")
        return out

    def distill_loss(self, name: str, options: dict[str, Any] | None = None) -> Any:
        """Distillation loss ``name`` with ``options`` (its ``plugin_options``)."""
        return self.instantiate(name, options, category="distill-loss")

    def latency_estimator(self, name: str, options: dict[str, Any] | None = None, *,
                          threads: int | None = None, warn: Callable[[str], None] | None = None) -> Any:
        """Latency estimator ``name`` with ``options``, its answers checked (finite, >= 0, one per
        query). ``threads`` (``--threads``) is passed on as its ``threads`` option when it has one
        and ``options`` do not set it; otherwise refused with a warning line (``warn``)."""
        options = dict(options or {})
        if threads:
            if "threads" in self.option_fields(name):
                options.setdefault("threads", threads)
            else:
                self._refuse(warn, f"--threads {threads} is not passed to latency estimator {name!r}: it "
                                   "has no `threads` option, so it runs at its own thread count")
        return CheckedEstimator(self.instantiate(name, options, category="latency"), name)

    def search_strategy(self, name: str, options: dict[str, Any] | None = None, *, storage: str | None = None,
                        study: str | None = None, warn: Callable[[str], None] | None = None) -> Any:
        """Search strategy ``name`` with ``options``, its answers checked. ``storage``/``study``
        (``--storage``/``--study``) are passed on when it has those options; otherwise refused
        with a warning line (``warn``)."""
        options = dict(options or {})
        fields = self.option_fields(name)
        for key, value in (("storage", storage), ("study", study)):
            if value is None:
                continue
            if key in fields:
                options[key] = value
            else:
                self._refuse(warn, f"--{key} is ignored: search strategy {name!r} keeps no study "
                                   f"(it has no `{key}` option)")
        return CheckedStrategy(self.instantiate(name, options, category="search"), name)

    def preflight(self, cfg: Any, kinds: Sequence[str] = ("block-source", "distill-loss", "latency", "search"),
                  ) -> None:
        """Make every plugin of ``kinds`` that ``cfg`` selects once, before any work (the
        stages make them again; the warnings are theirs). Their options are validated and every
        file an option names is read (a latency table's path), so a wrong one is a
        :class:`UsageError` within seconds, not after a build of minutes."""
        quiet = lambda _message: None  # noqa: E731
        if "block-source" in kinds:
            self.block_sources(cfg, warn=quiet)
        if "distill-loss" in kinds:
            self.distill_loss(cfg.plugins.distill_loss, cfg.plugin_options.get(cfg.plugins.distill_loss))
        if "latency" in kinds:
            self.latency_estimator(cfg.plugins.latency, cfg.plugin_options.get(cfg.plugins.latency),
                                   threads=cfg.threads, warn=quiet)
        if "search" in kinds:
            self.search_strategy(cfg.plugins.search, cfg.plugin_options.get(cfg.plugins.search))

    def has(self, name: str, category: str | None = None) -> bool:
        """Whether plugin ``name`` (of ``category``) is installed (a contested name too: using it
        is the error that names both claimants)."""
        rec = self.records.get(name)
        return rec is not None and (category is None or rec.category == category)

    @staticmethod
    def _refuse(warn: Callable[[str], None] | None, message: str) -> None:
        if warn is not None:
            warn(message)
        else:
            _warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------------------
# What plugins return, checked where it crosses into bespoke
# --------------------------------------------------------------------------------------------


class _Checked:
    """A plugin object with its contract's results checked; everything else passes through
    (``table``, ``options``, ``latency_samples``, ...)."""

    def __init__(self, inner: Any, name: str):
        self.inner, self.plugin_name = inner, name

    def __getattr__(self, attr: str) -> Any:
        if attr in ("inner", "plugin_name") or attr.startswith("__"):  # copy/pickle before __init__
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.plugin_name!r}, {self.inner!r})"


class CheckedEstimator(_Checked):
    def device(self) -> Any:
        return self.inner.device()

    def latencies(self, queries: Sequence[LatencyQuery]) -> dict[str, float]:
        queries = list(queries)
        ms = self.inner.latencies(queries)
        check_latencies(self.plugin_name, queries, ms)
        return ms


def check_latencies(name: str, queries: Sequence[LatencyQuery], ms: Any) -> None:
    """``ms`` answers every query with a finite latency >= 0, or a UsageError names ``name``."""
    if not isinstance(ms, dict):
        raise UsageError(f"latency estimator {name!r} returned {type(ms).__name__}, not a dict of "
                         "milliseconds by query key; it breaks the LatencyEstimator contract")
    for q in queries:
        if q.key not in ms or ms[q.key] is None:
            raise UsageError(f"latency estimator {name!r} gave no latency for query {q.key} (input "
                             f"{tuple(q.input_shape)}); an estimator answers every query, or raises")
        v = ms[q.key]
        try:
            ok = math.isfinite(float(v)) and float(v) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"latency estimator {name!r} gave latency {v!r} ms for query {q.key} (input "
                             f"{tuple(q.input_shape)}); latencies are finite milliseconds >= 0")


class CheckedStrategy(_Checked):
    def search(self, problem: SearchProblem, budgets_ms: Sequence[float], *, seed: int = 0,
               workdir: str | None = None) -> list[Solution]:
        sols = self.inner.search(problem, budgets_ms, seed=seed, workdir=workdir)
        check_solutions(self.plugin_name, problem, budgets_ms, sols)
        return sols


def check_solutions(name: str, problem: SearchProblem, budgets_ms: Sequence[float], sols: Any) -> None:
    """One :class:`Solution` per budget, each choosing candidates the problem has."""
    if sols is None or not isinstance(sols, (list, tuple)):
        raise UsageError(f"search strategy {name!r} returned {type(sols).__name__}, not a list of one "
                         f"Solution per budget ({len(budgets_ms)} budgets); it breaks the SearchStrategy contract")
    if len(sols) != len(budgets_ms):
        raise UsageError(f"search strategy {name!r} returned {len(sols)} solutions for "
                         f"{len(budgets_ms)} budgets; it breaks the SearchStrategy contract")
    n = len(problem.candidates)
    for b, s in zip(budgets_ms, sols):
        if not isinstance(s, Solution):
            raise UsageError(f"search strategy {name!r} returned {type(s).__name__} for budget {b:.3f} ms, "
                             "not a bespoke.Solution")
        bad = [i for i in s.chosen if not isinstance(i, numbers.Integral) or not 0 <= i < n]
        if bad:
            raise UsageError(f"search strategy {name!r} chose unknown candidate(s) {bad} for budget "
                             f"{b:.3f} ms; the problem has candidates 0..{n - 1}")


class CheckedBlockSource(_Checked):
    def propose(self, ctx: Any, segment: Any) -> Any:
        return self.inner.propose(ctx, segment)

    def rebuild(self, ctx: Any, segment: Any, spec: Any) -> Any:
        return self.inner.rebuild(ctx, segment, spec)

    def create(self, ctx: Any, segment: Any, spec: Any) -> Any:
        module, full = self.inner.create(ctx, segment, spec)
        check_block_shape(self.plugin_name, module, segment, spec)
        return module, full


def check_block_shape(name: str, module: Any, segment: Any, spec: Any) -> None:
    """``module`` maps the segment's input shape to its output shape (one zero input at batch 1),
    or a UsageError names the source. A module whose forward raises is left to distillation,
    which records that failure itself."""
    import torch

    param = next(module.parameters(), None)
    x = torch.zeros((1, *tuple(segment.in_shape)[1:]), device=param.device if param is not None else "cpu")
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            out = module(x)
    except Exception:
        return
    finally:
        module.train(was_training)
    want = (1, *tuple(segment.out_shape)[1:])
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != want:
        raise UsageError(f"block source {name!r} created {getattr(spec, 'label', spec)!r} for segment "
                         f"{segment.id}, which maps input {tuple(x.shape)} to {got}, not to the segment's "
                         f"output {want}")


def _split_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


def _entry_points() -> Iterable[metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen = set()
    for ep in sorted(eps, key=lambda e: (e.dist.name if e.dist else "", e.name)):
        key = (ep.name, ep.value)
        if key in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(key)
        yield ep


def _collect(plugin: Any, name: str, dist: str, version: str) -> list[PluginRecord]:
    """Call the plugin's hooks one by one, tagging each record with where it came from.

    Records are returned, not added, so a plugin that fails half-way registers nothing.
    """
    records: list[PluginRecord] = []
    for category, hook_name in HOOKS_BY_CATEGORY.items():
        impl = getattr(plugin, hook_name, None)
        if impl is None:
            continue

        def register(record: PluginRecord, _cat: str = category, _hook: str = hook_name) -> None:
            if not isinstance(record, PluginRecord):
                raise TypeError(f"{_hook} must register bespoke.PluginRecord objects, got {record!r}")
            if record.category != _cat:
                raise UsageError(
                    f"plugin {name!r} registered {record.name!r} as {record.category!r} "
                    f"from {_hook}, which is for {_cat!r}"
                )
            if not callable(record.factory):
                raise TypeError(f"{record.name!r}: factory must be callable")
            records.append(replace(record, distribution=dist, version=version, plugin=name))

        impl(register=register)
    return records


def load_registry(extra_plugins: Iterable[Any] = ()) -> Registry:
    """Load every allowed entry point of group ``bespoke`` and collect what they register.

    ``extra_plugins`` (objects or modules with hook implementations) are registered after the
    entry points, as tests and embedding applications do.
    """
    registry = Registry()
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    only = _split_env("BESPOKE_LOAD_PLUGINS")
    disabled = _split_env("BESPOKE_DISABLE_PLUGINS") or set()
    for ep in _entry_points():
        if (only is not None and ep.name not in only) or ep.name in disabled:
            continue
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            records = _collect(plugin, ep.name, dist, version)
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            registry.warnings.append(
                f"plugin {ep.name!r} from distribution {dist!r} {version} failed to load and "
                f"was skipped: {type(exc).__name__}: {exc}"
            )
            try:
                pm.unregister(name=ep.name)
            except Exception:
                pass
            continue
        for record in records:
            registry.add(record)
        registry.loaded.append((ep.name, dist, version))
    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", f"extra-{i}")
        pm.register(plugin, name=name)
        for record in _collect(plugin, name, "(in-process)", ""):
            registry.add(record)
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def reset_registry() -> None:
    global _REGISTRY
    _REGISTRY = None
