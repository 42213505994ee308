"""`gileak list` and `gileak plugins`: what is installed and what it takes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from gileak.cli.state import console as cli_console

from gileak.errors import UserInputError

KIND_ARGS = {"attacks": "attack", "defenses": "defense", "models": "model", "datasets": "dataset",
             "clients": "client"}


def _format_default(value) -> str:
    from gileak.base import REQUIRED

    if value is REQUIRED:
        return "(required)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def list_components(
    kind: Annotated[
        Optional[str], typer.Argument(help="attacks, defenses, models, datasets or clients (all when left out).")
    ] = None,
) -> None:
    """List components with their one-line description and parameters (defaults)."""
    from gileak.registry import get_registry

    registry = get_registry()
    if kind is not None and kind not in KIND_ARGS:
        import difflib

        close = difflib.get_close_matches(kind, list(KIND_ARGS), n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise UserInputError(f"Unknown kind '{kind}'.{hint} Use one of: {', '.join(KIND_ARGS)}.")
    console = cli_console()
    for plural, singular in KIND_ARGS.items():
        if kind is not None and plural != kind:
            continue
        table = Table(title=plural.capitalize(), title_justify="left", show_lines=False)
        table.add_column("Name", style="bold cyan", no_wrap=True)
        table.add_column("Description")
        table.add_column("Parameters (default)")
        table.add_column("Plugin", style="dim")
        for name in registry.names(singular):
            cls = registry.get(singular, name)
            params = Text("\n").join(
                Text.assemble(f"{p}: {t} = {_format_default(d)}", (f"  {desc}" if desc else "", "dim"))
                for p, t, d, desc in cls.parameter_table()
            ) or Text("—")
            table.add_row(Text(name), Text(str(cls.description)), params, Text(registry.owners[(singular, name)]))
        console.print(table)


def plugins(
    json_output: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
) -> None:
    """Show which plugins were loaded, what each registered, and which failed (with the reason)."""
    from gileak.plugins import plugin_records

    records = plugin_records()
    if json_output:
        import json

        typer.echo(json.dumps([r.__dict__ for r in records], indent=2))
        return
    console = cli_console()
    table = Table(title="Plugins", title_justify="left")
    table.add_column("Plugin", style="bold")
    table.add_column("Distribution")
    table.add_column("Registered")
    table.add_column("Status")
    for record in records:
        registered = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in record.registered.items()) or "—"
        status = Text(f"failed: {record.error}", style="red") if record.error else Text("loaded", style="green")
        table.add_row(Text(record.name), Text(record.distribution), Text(registered), status)
    console.print(table)
