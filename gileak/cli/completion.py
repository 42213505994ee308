"""Shell completion of component names from the registry."""

from __future__ import annotations


def _complete(kind: str, incomplete: str) -> list[str]:
    from gileak.registry import get_registry

    head, _, last = incomplete.rpartition(",")
    prefix = head + "," if head else ""
    return [prefix + name for name in get_registry().names(kind) if name.startswith(last)]


def attacks(incomplete: str) -> list[str]:
    return _complete("attack", incomplete)


def defenses(incomplete: str) -> list[str]:
    return _complete("defense", incomplete)


def models(incomplete: str) -> list[str]:
    return _complete("model", incomplete)


def datasets(incomplete: str) -> list[str]:
    return _complete("dataset", incomplete)


def clients(incomplete: str) -> list[str]:
    return _complete("client", incomplete)
