"""Typed errors of the library; the CLI alone turns them into messages and exit codes."""


class GileakError(Exception):
    """Base of every error gileak raises on purpose."""


class UserInputError(GileakError, ValueError):
    """Something the user wrote is wrong: a spec, a flag, a parameter (exit code 2)."""


class UnknownComponentError(UserInputError, KeyError):
    """A component name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ParamsError(UserInputError):
    """A component's parameters failed validation."""


class SpecError(UserInputError):
    """A bench spec (flags or spec file) is malformed."""


class DuplicateComponentError(GileakError):
    """Two plugins registered the same component name."""


class DataUnavailableError(UserInputError):
    """A dataset's files are missing or unreadable."""


class NotApplicableError(GileakError):
    """An attack or defense cannot run on this model (e.g. no biased FC layer)."""


class CellError(GileakError):
    """A benchmark cell failed at run time; the others still run."""


class RefusedFileError(UserInputError):
    """A file that a user or a download put on disk holds something other than the data it should
    (code, unknown types, the wrong tensors); it was not loaded and nothing in it ran (exit 2)."""


class NothingToAttackError(GileakError):
    """A victim's shared gradient is all zeros or not finite: there is nothing an attack could
    measure, so the result fails instead of scoring "no leakage" (exit code 1)."""


class DivergedError(GileakError):
    """A loss or the model's weights became NaN or infinite (training, an attack, a defense's
    noise): the numbers that would follow measure nothing (exit code 1)."""
