"""Built-in defenses."""

from gileak import Defense, hookimpl


class NoDefense(Defense):
    """The undefended baseline: the model and the shared gradient are left as they are."""

    name = "none"
    description = "No defense: the baseline every other defense is compared against."


@hookimpl
def register_defenses(register):
    register(NoDefense)
