"""`gileak report DIR`: build the run's HTML report from its directory alone, computing nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def report(
    run_dir: Annotated[Path, typer.Argument(help="A `gileak bench --out` directory.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report to FILE.html. "
                                                   "[default: DIR/report.html]")] = None,
) -> None:
    """Write one self-contained HTML page of a run: leaderboard, reconstructions, figures, spec."""
    from gileak.report.html import human_size, write_report

    info = write_report(run_dir, output)
    typer.echo(f"Report: {info.path} ({human_size(info.size)}, built in {info.seconds:.1f} s)")
