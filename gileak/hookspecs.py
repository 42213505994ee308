"""Every hook a gileak plugin can implement."""

import pluggy

hookspec = pluggy.HookspecMarker("gileak")


@hookspec
def register_attacks(register):
    """Register Attack subclasses: call register(AttackClass) for each."""


@hookspec
def register_defenses(register):
    """Register Defense subclasses: call register(DefenseClass) for each."""


@hookspec
def register_models(register):
    """Register Model subclasses: call register(ModelClass) for each."""


@hookspec
def register_datasets(register):
    """Register Dataset subclasses: call register(DatasetClass) for each."""


@hookspec
def register_clients(register):
    """Register Client subclasses: call register(ClientClass) for each."""
