"""`gileak inspect`: a model's layers, parameter counts and upload size, without loading data."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from gileak.cli import completion
from gileak.cli.state import console as cli_console
from gileak.cli.state import styled


def inspect(
    model: Annotated[str, typer.Option("--model", "-m", help="Model, e.g. cnn.", autocompletion=completion.models)],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset whose declared shape and classes to use.",
                                         autocompletion=completion.datasets)],
    defense: Annotated[str, typer.Option("--defense", help="Defense applied to the model.",
                                         autocompletion=completion.defenses)] = "none",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Print the model's layers, trainable parameters, what the defense adds, and the upload size."""
    from gileak.runner import model_summary, resolve
    from gileak.spec import parse_component

    refs = {kind: parse_component(text) for kind, text in (("model", model), ("dataset", dataset), ("defense", defense))}
    for kind, found in refs.items():
        if len(found) != 1:
            from gileak.errors import UserInputError

            raise UserInputError(f"inspect takes one {kind}, not a grid: '{found[0].label}' expands to {len(found)}.")
    model_c = resolve("model", refs["model"][0]).component
    dataset_c = resolve("dataset", refs["dataset"][0]).component
    defense_c = resolve("defense", refs["defense"][0]).component
    summary = model_summary(model_c, defense_c, dataset_c)
    net = summary.pop("net")
    layers = _layers(net)
    if json_output:
        summary.update(model=model, dataset=dataset, defense=defense, layers=layers)
        typer.echo(json.dumps(summary, indent=2))
        return
    console = cli_console()
    table = Table(title=Text(f"{model} + {defense} on {dataset}: input {tuple(summary['input_shape'])}, "
                             f"{summary['num_classes']} classes"), title_justify="left")
    table.add_column("Layer", style="cyan")
    table.add_column("Module")
    table.add_column("Params", justify="right")
    for layer in layers:
        table.add_row(Text(layer["name"]), Text(layer["module"]), Text(f"{layer['params']:,}"))
    console.print(table)
    console.print(styled(
        "Trainable parameters: ", (f"{summary['params']:,}", "bold"),
        f" (+{summary['params_added']:,}, +{summary['params_added_pct']:.2f}% over the undefended {model}: "
        f"{summary['base_params']:,})",
    ))
    console.print(styled("Upload per client per round: ", (f"{summary['upload_bytes']:,}", "bold"),
                         f" bytes ({summary['upload_bytes'] / 2**20:.3f} MiB of float gradients or weights)"))


def _layers(net) -> list[dict]:
    """Leaf modules (and slots) in definition order with their own trainable parameter counts."""
    from gileak.nets import Slot

    rows = []
    for name, module in net.named_modules():
        if not name:
            continue
        if isinstance(module, Slot):
            rows.append({"name": name, "module": f"Slot(position={module.position}, shape={module.shape})",
                         "params": 0})
            continue
        if any(True for _ in module.children()):
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        rows.append({"name": name, "module": repr(module), "params": params})
    return rows
