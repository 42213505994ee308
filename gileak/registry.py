"""Look up components by kind and name, with did-you-mean errors and duplicate detection."""

from __future__ import annotations

import difflib
import re

from pydantic import BaseModel

from gileak.base import KINDS, Component
from gileak.errors import DuplicateComponentError, UnknownComponentError

PLURAL = {"attack": "attacks", "defense": "defenses", "model": "models", "dataset": "datasets", "client": "clients"}


#: How a component name must look so the CLI mini-syntax can spell it: a letter or underscore,
#: then letters, digits, '_', '.' or '-' (no spaces, parentheses, commas, '=', '|').
NAME_PATTERN = re.compile(r"[^\W\d][\w.\-]*")


def component_problem(kind: str, cls: object) -> str | None:
    """Why `cls` cannot be registered as a `kind`, or None: not a subclass of the kind's base
    class, no `name`, or a name the component syntax cannot spell."""
    base = KINDS[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return f"registered {cls!r} as {kind}, which is not a {base.__name__} subclass"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        return f"registered {cls.__module__}.{cls.__qualname__} as {kind} without a `name`"
    if not NAME_PATTERN.fullmatch(name):
        return (f"registered the {kind} {name!r} ({cls.__module__}.{cls.__qualname__}), a name the component "
                "syntax cannot spell (use letters, digits, '_', '.' or '-', starting with a letter)")
    if not (isinstance(getattr(cls, "Params", None), type) and issubclass(cls.Params, BaseModel)):
        return f"registered the {kind} '{name}' whose Params is not a pydantic BaseModel"
    return None


class Registry:
    """Components of each kind by name, and which plugin registered each."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, type[Component]]] = {kind: {} for kind in KINDS}
        self.owners: dict[tuple[str, str], str] = {}
        self.failed_plugins: list[str] = []

    def add(self, kind: str, cls: type[Component], owner: str) -> None:
        problem = component_problem(kind, cls)
        if problem is not None:
            raise TypeError(f"Plugin '{owner}' {problem}")
        existing = self.components[kind].get(cls.name)
        if existing is not None and existing is not cls:
            raise DuplicateComponentError(
                f"Two plugins register the {kind} '{cls.name}': "
                f"'{self.owners[(kind, cls.name)]}' ({existing.__module__}.{existing.__qualname__}) and "
                f"'{owner}' ({cls.__module__}.{cls.__qualname__}). Uninstall one of them."
            )
        self.components[kind][cls.name] = cls
        self.owners[(kind, cls.name)] = owner

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> type[Component]:
        try:
            return self.components[kind][name]
        except KeyError:
            pass
        available = self.names(kind)
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        message = f"Unknown {kind} '{name}'."
        if close:
            message += f" Did you mean: {', '.join(close)}?"
        message += f" Available: {', '.join(available) or 'none'}."
        message += f" See `gileak list {PLURAL[kind]}`."
        if self.failed_plugins:
            message += (
                f" Some plugins failed to load ({', '.join(self.failed_plugins)}); the {kind} may come from one "
                "of them or from a plugin that is not installed — see `gileak plugins`."
            )
        else:
            message += " If it comes from a plugin, that plugin may not be installed."
        raise UnknownComponentError(message)


_registry: Registry | None = None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_registry() -> Registry:
    """The registry of every loaded plugin's components, built once. A plugin registers all of
    its components or none: one whose hook raises, that registers something that is not a
    component (or has no usable name), or whose name another plugin also registers, is marked
    failed with the reason and contributes nothing, so a leaderboard row never measures a
    half-loaded plugin; the others load. A built-in keeps its names; two plugins claiming one
    name both fail (which one a name meant would depend on install order). With
    GILEAK_STRICT_PLUGINS=1 the first failure is raised, its cause kept."""
    global _registry
    if _registry is not None:
        return _registry
    from gileak import plugins

    pm = plugins.load_plugins()
    by_name = {record.name: record for record in plugins._records}
    collected: dict[str, list[tuple[str, type]]] = {}
    causes: dict[str, BaseException] = {}

    def fail(record, reason: str, cause: BaseException) -> None:
        if record.error is None:
            record.error = reason
            causes[record.name] = cause

    # Each implementation is called on its own, so every component is tied to the plugin that owns it.
    for kind, plural in PLURAL.items():
        for impl in getattr(pm.hook, f"register_{plural}").get_hookimpls():
            record = by_name.get(impl.plugin_name)
            if record is None:  # registered in-process (pm.register), not through an entry point
                module = getattr(impl.plugin, "__name__", type(impl.plugin).__name__)
                record = plugins.PluginRecord(impl.plugin_name, "registered in this process", module)
                plugins._records.append(record)
                by_name[record.name] = record
            found: list[object] = []
            try:
                impl.function(register=found.append)
            except Exception as e:  # a plugin whose hook breaks is reported; the others still load
                fail(record, f"register_{plural} raised {type(e).__name__}: {e}", e)
                continue
            for cls in found:
                problem = component_problem(kind, cls)
                if problem is not None:
                    fail(record, problem, TypeError(problem))
                collected.setdefault(record.name, []).append((kind, cls))

    built_in = {record.name for record in plugins._records if record.distribution == plugins.BUILT_IN}
    claims: dict[tuple[str, str], dict[str, type]] = {}
    for owner, items in collected.items():
        if by_name[owner].error:
            continue
        for kind, cls in items:
            mine = claims.setdefault((kind, cls.name), {})
            if owner in mine and mine[owner] is not cls:
                problem = f"registered two different {kind}s named '{cls.name}'"
                fail(by_name[owner], problem, DuplicateComponentError(problem))
            mine.setdefault(owner, cls)
    for (kind, name), owners in claims.items():
        if len({id(cls) for cls in owners.values()}) < 2:
            continue  # one plugin, or the very same class registered twice
        keeper = next((owner for owner in owners if owner in built_in), None)
        for owner, cls in owners.items():
            if owner == keeper:
                continue
            others = [o for o in owners if o != owner]
            described = ", ".join(f"'{o}' ({by_name[o].distribution}: {_qualified(owners[o])})" for o in others)
            if keeper is not None:
                problem = (f"its {kind} '{name}' ({_qualified(cls)}) clashes with the built-in {described}, which "
                           "keeps the name; rename the plugin's component")
            else:
                problem = (f"its {kind} '{name}' ({_qualified(cls)}) is also registered by {described}; a name must "
                           "mean one component, so neither is loaded: uninstall one of them")
            fail(by_name[owner], problem, DuplicateComponentError(problem))

    registry = Registry()
    for owner, items in collected.items():
        record = by_name[owner]
        if record.error:
            continue
        for kind, cls in items:
            registry.add(kind, cls, owner)
            names = record.registered.setdefault(PLURAL[kind], [])
            if cls.name not in names:
                names.append(cls.name)
    failed = [record for record in plugins._records if record.error]
    registry.failed_plugins = [record.name for record in failed]
    if failed and plugins.strict_mode():
        first = failed[0]
        raise plugins.PluginLoadError(
            f"Plugin '{first.name}' from {first.distribution} failed to load: {first.error}"
        ) from causes.get(first.name)
    _registry = registry
    return registry


def get(kind: str, name: str) -> type[Component]:
    return get_registry().get(kind, name)


def attacks() -> dict[str, type[Component]]:
    return dict(get_registry().components["attack"])


def defenses() -> dict[str, type[Component]]:
    return dict(get_registry().components["defense"])


def models() -> dict[str, type[Component]]:
    return dict(get_registry().components["model"])


def datasets() -> dict[str, type[Component]]:
    return dict(get_registry().components["dataset"])


def clients() -> dict[str, type[Component]]:
    return dict(get_registry().components["client"])


def get_attack(name: str):
    return get("attack", name)


def get_defense(name: str):
    return get("defense", name)


def get_model(name: str):
    return get("model", name)


def get_dataset(name: str):
    return get("dataset", name)


def get_client(name: str):
    return get("client", name)
