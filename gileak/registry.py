"""Look up components by kind and name, with did-you-mean errors and duplicate detection."""

from __future__ import annotations

import difflib

from gileak.base import KINDS, Component
from gileak.errors import DuplicateComponentError, UnknownComponentError

PLURAL = {"attack": "attacks", "defense": "defenses", "model": "models", "dataset": "datasets", "client": "clients"}


class Registry:
    """Components of each kind by name, and which plugin registered each."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, type[Component]]] = {kind: {} for kind in KINDS}
        self.owners: dict[tuple[str, str], str] = {}
        self.failed_plugins: list[str] = []

    def add(self, kind: str, cls: type[Component], owner: str) -> None:
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"Plugin '{owner}' registered {cls!r} as {kind}, which is not a {base.__name__} subclass")
        if not cls.name:
            raise TypeError(f"Plugin '{owner}' registered {cls.__name__} without a `name`")
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


def get_registry() -> Registry:
    """The registry of every loaded plugin's components, built once."""
    global _registry
    if _registry is not None:
        return _registry
    from gileak.plugins import _records, load_plugins

    pm = load_plugins()
    registry = Registry()
    by_name = {record.name: record for record in _records}
    # Each implementation is called on its own so every component is tied to the plugin that owns it.
    for kind, plural in PLURAL.items():
        for impl in getattr(pm.hook, f"register_{plural}").get_hookimpls():
            collected: list[type[Component]] = []
            try:
                impl.function(register=collected.append)
            except Exception as e:  # a plugin whose hook breaks is reported; the others still load
                if impl.plugin_name not in by_name:
                    raise
                record = by_name[impl.plugin_name]
                record.error = record.error or f"register_{plural} raised {type(e).__name__}: {e}"
                continue
            for cls in collected:
                registry.add(kind, cls, impl.plugin_name)
                if impl.plugin_name in by_name:
                    by_name[impl.plugin_name].registered.setdefault(plural, []).append(cls.name)
    registry.failed_plugins = [r.name for r in _records if r.error]
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
