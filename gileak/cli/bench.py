"""`gileak bench`: compose a defense x attack x model x dataset matrix, run it, print the leaderboard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from gileak.cli import completion
from gileak.cli.state import state


def _default_out() -> Path:
    base = Path("gileak-runs") / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _console() -> Console:
    """A terminal gets its own width; a pipe or a log file gets a wide table, not an 80-column squeeze."""
    import os
    import sys

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=180)


def bench(
    models: Annotated[Optional[str], typer.Option(help="Models, comma-separated: name or name(key=value,...); "
                                                   "a value a|b expands into a grid. [default: cnn]",
                                                   autocompletion=completion.models)] = None,
    datasets: Annotated[Optional[str], typer.Option(help="Datasets. [default: photos]",
                                                     autocompletion=completion.datasets)] = None,
    defenses: Annotated[Optional[str], typer.Option(help="Defenses. [default: none]",
                                                     autocompletion=completion.defenses)] = None,
    attacks: Annotated[Optional[str], typer.Option(help="Attacks. [default: ig]",
                                                    autocompletion=completion.attacks)] = None,
    spec: Annotated[Optional[Path], typer.Option("--spec", help="TOML spec file; flags override its values.")] = None,
    victims: Annotated[Optional[int], typer.Option(help="Images attacked per cell. [default: 8]")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Attack iteration cap per victim. [default: 5000]")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Federated training rounds before the attack; "
                                                       "0 attacks the freshly initialised model. [default: 0]")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Repetitions with different seeds. [default: 1]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda. [default: auto]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory. [default: gileak-runs/<time>]")] = None,
    export: Annotated[Optional[list[Path]], typer.Option(help="Write the leaderboard to PATH (.md, .csv, .json); "
                                                              "repeatable.")] = None,
    attack_at: Annotated[Optional[str], typer.Option("--attack-at", help="Which global model the victims' "
                                                     "gradients are computed on: init, final, or a round "
                                                     "number R (1..--rounds). [default: final]")] = None,
    trace: Annotated[Optional[bool], typer.Option("--trace", help="Record, per attack iteration, the cosine "
                                                  "similarity of dummy and victim gradient for every layer; "
                                                  "writes a CSV and a PNG per cell under traces/.")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Directory holding downloadable "
                                                      "datasets (mnist, cifar10, MedMNIST), as torchvision and "
                                                      "medmnist lay them out. [default: $GILEAK_DATA, else "
                                                      "~/.cache/gileak]")] = None,
) -> None:
    """Train (optionally) and attack every cell of the matrix; print a leaderboard."""
    from gileak.report import export as export_rows
    from gileak.report import render_leaderboard
    from gileak.runner import Runner, plan
    from gileak.spec import build_spec

    bench_spec = build_spec(
        spec, models=models, datasets=datasets, defenses=defenses, attacks=attacks, victims=victims,
        iterations=iterations, rounds=rounds, seeds=seeds, device=device, out=out, exports=export or None,
        trace=trace, attack_at=attack_at, data_root=data_root,
    )
    for path in bench_spec.exports:
        if path.suffix.lower() not in (".md", ".csv", ".json"):
            from gileak.errors import UserInputError

            raise UserInputError(f"Cannot export to '{path}': use a .md, .csv or .json file name.")
    the_plan = plan(bench_spec)
    run_dir = bench_spec.out or _default_out()
    console = _console()
    console.print(
        f"[bold]gileak bench[/]: {len(the_plan.cells)} training cell(s) -> {the_plan.rows_expected} row(s); "
        f"{bench_spec.victims} victims x {bench_spec.iterations} iterations per attack, "
        f"{bench_spec.rounds} training round(s); run directory {run_dir}"
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    ) as progress:
        task = progress.add_task("starting", total=the_plan.work_units())
        runner = Runner(
            the_plan, run_dir,
            advance=lambda n: progress.advance(task, n),
            describe=lambda text: progress.update(task, description=text),
            debug=state.debug,
        )
        result = runner.run()
    render_leaderboard(result.rows, console=console, title="gileak leaderboard")
    for path in bench_spec.exports:
        export_rows(result.rows, path)
        console.print(f"Exported {path}")
    export_rows(result.rows, run_dir / "leaderboard.json")
    console.print(f"Reconstructions (originals above, reconstructions below): {run_dir / 'reconstructions'}")
    from gileak.report.figures import save_privacy_utility

    figure = save_privacy_utility(result.rows, run_dir / "privacy_utility.png")
    if figure is not None:
        console.print(f"Privacy-utility figure: {figure}")
    if result.traces:
        console.print(f"Gradient traces (CSV + PNG per cell): {run_dir / 'traces'}")
    for where, note in result.notes:
        console.print(f"  [yellow]note[/] {escape(where)}: {escape(note)}", highlight=False)
    if result.failures:
        console.print(f"[bold red]{len(result.failures)} failure(s):[/]")
        for where, reason in result.failures:
            console.print(f"  [red]{escape(where)}[/]: {escape(reason)}", highlight=False)
        state.exit_code = 1
