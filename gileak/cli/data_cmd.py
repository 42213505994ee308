"""`gileak data`: where the downloadable datasets (MNIST, CIFAR-10, MedMNIST) are looked for,
whether they are there, and fetching them with torchvision's and medmnist's own download code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from gileak.cli import completion
from gileak.cli.state import console, styled
from gileak.errors import GileakError

app = typer.Typer(
    name="data",
    help="Downloadable datasets (mnist, cifar10, MedMNIST): where gileak looks for them, and fetching them.",
    no_args_is_help=True,
)

DataRootOption = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Directory the datasets live in, as torchvision and medmnist lay them out. "
                        "[default: $GILEAK_DATA, else ~/.cache/gileak]")]


class DownloadError(GileakError):
    """A download failed: no network, a server error, or a file that did not match its checksum (exit 1)."""


def _downloadable() -> dict[str, type]:
    """Every registered dataset that can fetch itself (built-in or from a plugin)."""
    from gileak.registry import get_registry

    registry = get_registry()
    found = {}
    for name in registry.names("dataset"):
        cls = registry.get("dataset", name)
        if callable(getattr(cls, "fetch", None)) and callable(getattr(cls, "files", None)):
            found[name] = cls
    return found


def _network_problem(error: BaseException) -> BaseException | None:
    """The network error behind `error` (the libraries wrap it in RuntimeError), if there is one."""
    import http.client
    import socket
    import urllib.error

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (urllib.error.URLError, socket.gaierror, socket.timeout, ConnectionError,
                              TimeoutError, http.client.HTTPException)):
            return error
        if "urlopen error" in str(error) or "Name or service not known" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def _resolve(text: str, data_root: Path | None):
    from gileak.errors import UserInputError
    from gileak.runner import resolve
    from gileak.spec import parse_component

    refs = parse_component(text)
    if len(refs) != 1:
        raise UserInputError(f"gileak data takes one dataset per name, not a grid: '{text}'.")
    downloadable = _downloadable()
    if refs[0].name not in downloadable:
        from gileak.registry import get_registry

        get_registry().get("dataset", refs[0].name)  # an unknown name: UnknownComponentError with suggestions
        raise UserInputError(
            f"'{refs[0].name}' is not a downloadable dataset; it needs no fetching. "
            f"Downloadable: {', '.join(sorted(downloadable))}."
        )
    return resolve("dataset", refs[0], data_root=data_root).component


@app.command("list")
def list_data(
    data_root: DataRootOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show each downloadable dataset, the files gileak looks for, and whether they are there."""
    from gileak.data import data_root as resolve_root

    root = resolve_root(data_root)
    rows = []
    for name, cls in sorted(_downloadable().items()):
        dataset = cls(root=str(root))
        files = dataset.files()
        rows.append({"name": name, "present": dataset.present(), "files": [str(f) for f in files],
                     "missing": [str(f) for f in dataset.missing()], "source": getattr(cls, "source", "")})
    if json_output:
        typer.echo(json.dumps({"data_root": str(root), "datasets": rows}, indent=2))
        return
    from rich.table import Table

    out = console()
    table = Table(title=Text(f"Datasets under {root}"), title_justify="left")
    table.add_column("dataset", style="bold")
    table.add_column("present")
    table.add_column("looked for (relative to the data root)")
    table.add_column("fetched from")
    for row in rows:
        shown = [str(Path(f).relative_to(root)) for f in row["files"]]
        present = Text("yes", style="green") if row["present"] else Text("no", style="red")
        table.add_row(Text(row["name"]), present, Text(", ".join(shown)), Text(row["source"]))
    out.print(table)
    if not all(row["present"] for row in rows):
        out.print(styled("Fetch one with ", ("gileak data fetch NAME", "bold"), " (add --data-root DIR for another "
                         "directory), or copy files you already have to the paths above."), highlight=False)


@app.command("fetch")
def fetch(
    names: Annotated[list[str], typer.Argument(help="Datasets to download, e.g. mnist or "
                                                    "'pneumoniamnist(size=64)'; 'all' for every one.",
                                               autocompletion=completion.datasets)],
    data_root: DataRootOption = None,
) -> None:
    """Download datasets into the data root with torchvision's and medmnist's own download code."""
    if any(name.strip() == "all" for name in names):
        names = sorted(_downloadable())
    datasets = [_resolve(name, data_root) for name in names]  # every name is checked before any download
    out = console(stderr=True)
    for text, dataset in zip(names, datasets):
        root = dataset.root()
        if dataset.present():
            out.print(f"{text}: already in {root}", highlight=False)
            continue
        out.print(f"{text}: downloading into {root} ...", highlight=False)
        try:
            dataset.fetch()
        except Exception as e:  # the libraries raise RuntimeError, URLError, OSError alike
            problem = _network_problem(e)
            detail = " ".join(str(problem or e).split())
            if problem is not None:
                raise DownloadError(
                    f"Could not download {text}: the network cannot be reached from here ({detail}). "
                    f"The download into {root} did not complete. On a machine with internet access run "
                    f"`gileak data fetch {text} --data-root DIR` and copy DIR's contents to {root}, or put "
                    f"the dataset files you already have there (`gileak data list` shows the paths gileak "
                    f"looks for)."
                ) from e
            raise DownloadError(
                f"Could not download {text} into {root}: {detail}. `gileak data list` shows the files "
                f"gileak looks for; you can also copy them there yourself."
            ) from e
        if not dataset.present():
            raise DownloadError(f"{text}: the download finished but these files are still missing: "
                                f"{', '.join(str(p) for p in dataset.missing())}.")
        out.print(f"{text}: ready in {root}", highlight=False)
