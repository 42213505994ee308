"""The `gileak` command line: errors become messages and exit codes here, and only here."""

from __future__ import annotations

import sys
import warnings

import typer

from gileak.cli import bench, catalog, data_cmd, inspect_cmd, leaderboard_cmd, report_cmd, train_cmd
from gileak.cli.state import state

app = typer.Typer(
    name="gileak",
    help="Benchmark gradient-inversion attacks and defenses for federated learning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-paragraph errors."),
) -> None:
    state.debug = debug


app.command("bench")(bench.bench)
app.command("list")(catalog.list_components)
app.command("plugins")(catalog.plugins)
app.command("inspect")(inspect_cmd.inspect)
app.command("train")(train_cmd.train)
app.command("leaderboard")(leaderboard_cmd.leaderboard)
app.command("report")(report_cmd.report)
app.add_typer(data_cmd.app, name="data")

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gileak` script. Returns (and exits with) the exit code."""
    from gileak.cli.state import console, styled
    from gileak.errors import GileakError, UserInputError

    args = sys.argv[1:] if argv is None else argv
    _forgiving_output()
    state.debug = "--debug" in args
    shown = warnings.showwarning
    if not state.debug:
        _plain_warnings()
    state.exit_code = 0
    state.run_dir = None
    err = console(stderr=True)
    try:
        returned = app(args=args, prog_name="gileak", standalone_mode=False)
        code = state.exit_code
        if returned == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130) and returns its code
            raise KeyboardInterrupt
        if isinstance(returned, int) and returned:
            code = returned
    except UserInputError as e:
        if state.debug:
            raise
        err.print(styled(("Error:", "bold red"), f" {e}"), highlight=False)
        code = EXIT_USER_ERROR
    except GileakError as e:
        if state.debug:
            raise
        err.print(styled(("Error:", "bold red"), f" {e}"), highlight=False)
        code = EXIT_RUN_FAILED
    except KeyboardInterrupt:
        where = f" (--out {state.run_dir})" if state.run_dir else ""
        err.print(styled(("Interrupted.", "yellow"), f" Finished results are in the run directory{where}; run the "
                         "same command with that --out again to resume."), highlight=False)
        code = EXIT_INTERRUPTED
    except Exception as e:  # the command-line parser's own usage errors, exits and aborts
        code = _parser_exit_code(e)
        if code is None:
            raise
    finally:
        warnings.showwarning = shown
    if args and not {"--help", "--install-completion", "--show-completion"} & set(args):  # help stays fast
        _notice_failed_plugins()
    if argv is None:
        sys.exit(code)
    return code


def _notice_failed_plugins() -> None:
    """Every command says, in one line on stderr, when a plugin failed to load: its components
    are missing from every list and run, and `gileak plugins` tells why."""
    from gileak.plugins import failed_plugins_notice

    try:
        notice = failed_plugins_notice()
    except Exception:  # noqa: BLE001 — loading failed outright; the command itself has said so
        return
    if notice:
        print(notice, file=sys.stderr)


def _forgiving_output() -> None:
    """A path or label that is not valid UTF-8 (undecodable bytes in argv arrive as surrogates)
    prints with backslash escapes instead of crashing the print after a run did its work."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change its error handler keeps its own
                pass


def _plain_warnings() -> None:
    """Our own warnings (a dataset that is not the official release, ...) as one line each,
    without the source line Python shows by default; `--debug` keeps the default."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def _parser_exit_code(error: Exception) -> int | None:
    """Exit code for click's (or typer's vendored click's) exceptions; None for anything else.
    Usage errors are shown as click shows them (a usage line and the problem, exit 2)."""
    kinds = {cls.__name__ for cls in type(error).__mro__}
    if "ClickException" in kinds:
        error.show()
        return int(error.exit_code)
    if "Exit" in kinds and hasattr(error, "exit_code"):
        return int(error.exit_code)
    if "Abort" in kinds:
        return 1
    return None
