"""Process-wide CLI state shared by the command modules (debug flag, exit code)."""

from dataclasses import dataclass


@dataclass
class State:
    debug: bool = False
    exit_code: int = 0


state = State()
