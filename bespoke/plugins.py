"""The plugin manager: loads entry points of group ``bespoke`` and collects their registrations.

Built-in plugins (``bespoke_plugins``) are entry points of our own distribution, loaded exactly
like a third party's. Loading is one entry point at a time: one that fails to import or register
becomes a warning naming its distribution, and everything else keeps working.

Environment variables:

- ``BESPOKE_LOAD_PLUGINS``: comma-separated entry-point names; when set, only these load
  (set it empty to load none).
- ``BESPOKE_DISABLE_PLUGINS``: comma-separated entry-point names that do not load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Iterable

import pluggy

from bespoke import hookspecs
from bespoke.errors import UsageError
from bespoke.types import CATEGORIES, PluginRecord

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

    def instantiate(self, name: str, options: dict[str, Any] | None = None,
                    category: str | None = None) -> Any:
        """Validate ``options`` with the plugin's own model, then call its factory."""
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
