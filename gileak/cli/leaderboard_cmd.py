"""`gileak leaderboard DIR`: render a run directory's stored results again, computing nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from gileak.cli.state import console


def leaderboard(
    run_dir: Annotated[Path, typer.Argument(help="A `gileak bench --out` directory.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, md, csv or json.")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to FILE instead of the "
                                                   "terminal (md, csv or json).")] = None,
    figure: Annotated[Optional[Path], typer.Option("--figure", help="Also draw the privacy-utility figure "
                                                   "(accuracy against 1 - SSIM, the paper's Fig. 11) of "
                                                   "every stored row to this file (.png, .pdf or .svg).")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="Beside every row that matches a cell the paper "
                                        "published (same dataset, model, defense and attack by canonical "
                                        "identity), show the published figures and the difference.")] = False,
    stand_in: Annotated[Optional[list[str]], typer.Option(
        "--paper-stand-in", help="DATASET=PAPER_DATASET: with --paper, compare rows measured on DATASET with "
        "the paper's figures for PAPER_DATASET (e.g. photos=cifar10), flagged as stand-in data.")] = None,
) -> None:
    """Print the leaderboard of every result stored in a run directory (all its runs, merged)."""
    from gileak.errors import UserInputError
    from gileak.report import render_leaderboard
    from gileak.report.exporters import COLUMNS, to_text
    from gileak.runner import build_result
    from gileak.store import ResultStore

    if fmt not in ("table", "md", "csv", "json"):
        raise UserInputError(f"Unknown format '{fmt}': use table, md, csv or json.")
    if output is not None and fmt == "table":
        suffix = output.suffix.lower().lstrip(".")
        if suffix not in ("md", "csv", "json"):
            raise UserInputError(f"Cannot write a table to '{output}': give --format md, csv or json, or a file "
                                 "ending in .md, .csv or .json.")
        fmt = suffix
    if output is not None:
        from gileak.report.exporters import check_output_path

        check_output_path(output)
    if figure is not None:
        from gileak.report.figures import check_figure_path

        check_figure_path(figure)
    if stand_in and not paper:
        raise UserInputError("--paper-stand-in compares with the paper's figures: give --paper too.")
    store = ResultStore.open_existing(run_dir)
    try:
        result = build_result(store, None, run_dir)
        budget = json.loads(store.get_meta("budget") or "{}")
    finally:
        store.close()
    comparisons, paper_notes = None, []
    if paper:
        from gileak import paper as published

        comparisons = published.compare(result.rows, result.sources, budget,
                                        published.parse_stand_ins(stand_in or []))
        paper_notes = published.caption(comparisons)
    if figure is not None:
        from gileak.report.figures import save_privacy_utility

        drawn = save_privacy_utility(result.rows, figure)
        message = f"Privacy-utility figure: {drawn}" if drawn else ("No privacy-utility figure: no stored row "
                                                                     "has an accuracy (those runs had --rounds 0).")
        typer.echo(message, err=fmt != "table" and output is None)
    if fmt == "table":
        out = console()
        render_leaderboard(result.rows, console=out, title=f"gileak leaderboard: {run_dir}",
                           comparisons=comparisons, extra_notes=paper_notes)
        for where, note in result.notes:
            out.print(f"  note {where}: {note}", highlight=False)
        for where, reason in result.failures:
            out.print(f"  failed {where}: {reason}", highlight=False)
        return
    rows, columns = result.rows, COLUMNS
    if comparisons is not None:
        from gileak import paper as published

        rows, columns = published.annotate(rows, comparisons), COLUMNS + published.COLUMNS
    text = to_text(rows, fmt, columns, notes=paper_notes)
    if output is None:
        typer.echo(text, nl=False)
    else:
        from gileak.store import atomic_write_text

        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, text, newline="" if fmt == "csv" else None)
        typer.echo(f"Wrote {output}")
