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
    """A terminal gets its own width; a pipe or a log file gets a wide table, not an 80-column squeeze.
    Text is text: strings (labels, paths, parameter values, plugin descriptions, error messages)
    print as written, never read as rich markup ('[/]' would crash it) or emoji codes; our own
    styling is given as rich.text.Text (see `styled`)."""
    import os
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 180
    return Console(stderr=stderr, width=width, markup=False, emoji=False)


def styled(*parts):
    """One line of literal text with some parts styled: styled(("Error:", "bold red"), " ", message).
    Plain strings are taken literally, whatever brackets they hold."""
    from rich.text import Text

    return Text.assemble(*parts)
