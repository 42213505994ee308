"""The plugin manager: built-in plugins plus every entry point in the group "gileak"."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field

import pluggy

from gileak import hookspecs

ENTRY_POINT_GROUP = "gileak"
DEFAULT_PLUGINS = (
    "gileak.default_plugins.models",
    "gileak.default_plugins.datasets",
    "gileak.default_plugins.defenses",
    "gileak.default_plugins.attacks",
    "gileak.default_plugins.clients",
)
STRICT_ENV = "GILEAK_STRICT_PLUGINS"
#: The distribution of gileak's own plugins: on a name clash a built-in keeps its name.
BUILT_IN = "gileak (built-in)"


@dataclass
class PluginRecord:
    """A loaded or failed plugin: its name, the distribution it came from, and why it failed."""

    name: str
    distribution: str
    module: str
    error: str | None = None
    registered: dict[str, list[str]] = field(default_factory=dict)


class PluginLoadError(ImportError):
    """A plugin failed to import and strict mode asked for the failure to be raised."""


_pm: pluggy.PluginManager | None = None
_records: list[PluginRecord] = []
_strict: bool | None = None


def strict_mode() -> bool:
    """Whether a failing plugin is raised instead of reported: load_plugins(strict=True), or
    GILEAK_STRICT_PLUGINS set to anything but 0."""
    if _strict is not None:
        return _strict
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("gileak")
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(strict: bool | None = None) -> pluggy.PluginManager:
    """Build the plugin manager once. A plugin that fails to import is recorded and skipped,
    unless strict (argument or GILEAK_STRICT_PLUGINS=1), where it is re-raised."""
    global _pm, _strict
    if _pm is not None:
        return _pm
    _strict = strict
    strict = strict_mode()
    pm = _new_manager()
    records: list[PluginRecord] = []
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        records.append(PluginRecord(module_name, BUILT_IN, module_name))
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry_point, "dist", None)
        dist_name = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        record = PluginRecord(entry_point.name, dist_name, entry_point.value)
        records.append(record)
        if pm.has_plugin(entry_point.name):
            record.error = f"a plugin named '{entry_point.name}' is already loaded"
            continue
        try:
            plugin = entry_point.load()
            pm.register(plugin, name=entry_point.name)
        except Exception as e:  # a broken plugin must not take the others down
            record.error = f"{type(e).__name__}: {e}"
            if strict:
                raise PluginLoadError(
                    f"Plugin '{entry_point.name}' from {dist_name} failed to load: {record.error}"
                ) from e
    _pm = pm
    _records[:] = records
    return pm


def plugin_records() -> list[PluginRecord]:
    """Every plugin that was tried, loaded or failed, with what each registered."""
    from gileak.registry import get_registry

    get_registry()  # fills `registered`
    return list(_records)


def failed_plugins_notice() -> str | None:
    """One line saying which plugins failed to load and where to see why, or None when all
    loaded. Outside strict mode only (there the failure itself is raised)."""
    if strict_mode():
        return None
    from gileak.registry import get_registry

    failed = get_registry().failed_plugins
    if not failed:
        return None
    names = ", ".join(" ".join(str(name).split()) for name in failed)
    return (f"warning: {len(failed)} plugin(s) failed to load and registered nothing ({names}); "
            "`gileak plugins` shows why.")


def reset() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in-process)."""
    global _pm, _strict
    _pm = None
    _strict = None
    _records.clear()
    from gileak import registry

    registry._registry = None
