"""Process-wide CLI state shared by the command modules (debug flag, exit code)."""

from dataclasses import dataclass


@dataclass
class State:
    debug: bool = False
    exit_code: int = 0
    #: The run directory of a bench in progress (for the message when it is interrupted).
    run_dir: object = None


state = State()


def console(stderr: bool = False):
    """A terminal gets its own width; a pipe or a log file gets a wide table, not an 80-column squeeze."""
    import os
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=180)
