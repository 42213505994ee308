"""`gileak train`: federated training of one (defended) model; accuracy over seeds, epsilon for
DP, the accuracy curve (CSV + PNG) and a checkpoint of the global model per seed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from gileak.cli import completion
from gileak.cli.state import console as cli_console
from gileak.cli.state import state, styled


#: Training budgets; the other FedAvg settings (10 clients, 1 local epoch, Adam 1e-3, batch 64,
#: patience 40) are the paper's in both.
PROFILES = {"quick": {"rounds": 40, "seeds": 1}, "paper": {"rounds": 300, "seeds": 3}}


def _one(text: str, kind: str, data_root: Path | None = None):
    from gileak.errors import UserInputError
    from gileak.runner import resolve
    from gileak.spec import parse_component

    found = parse_component(text)
    if len(found) != 1:
        raise UserInputError(f"train takes one {kind}, not a grid: '{text}' expands to {len(found)}.")
    return resolve(kind, found[0], data_root=data_root).component


def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Model.", autocompletion=completion.models)] = "cnn",
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset.",
                                         autocompletion=completion.datasets)] = "digits",
    defense: Annotated[str, typer.Option("--defense", help="Defense.", autocompletion=completion.defenses)] = "none",
    profile: Annotated[str, typer.Option(help="quick (fits a laptop CPU: 40 rounds, 1 seed) or paper "
                                              "(Section V-A: 300 rounds, patience 40, 3 seeds); explicit "
                                              "flags override it.")] = "quick",
    rounds: Annotated[Optional[int], typer.Option(min=1, help="Communication rounds. [default: profile's]")] = None,
    clients: Annotated[int, typer.Option(min=1, help="IID clients.")] = 10,
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Local batch size.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Local Adam learning rate.")] = 1e-3,
    patience: Annotated[int, typer.Option(min=1, help="Stop after this many rounds without a lower mean "
                                                      "client validation loss.")] = 40,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Repetitions with different seeds. "
                                                                 "[default: profile's]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output directory. [default: gileak-runs/train-<time>]")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Directory holding downloadable "
                                                      "datasets (mnist, cifar10, MedMNIST). [default: "
                                                      "$GILEAK_DATA, else ~/.cache/gileak]")] = None,
) -> None:
    """Train a (defended) model with federated averaging and report its test accuracy."""
    import time

    import torch

    from gileak import data, fl, metrics
    from gileak.errors import UserInputError
    from gileak.nets import count_trainable
    from gileak.runner import build_net, check_buildable, pick_device

    if profile not in PROFILES:
        raise UserInputError(f"Unknown profile '{profile}'. Use one of: {', '.join(PROFILES)}.")
    if not math.isfinite(lr):
        raise UserInputError(f"--lr must be a finite number, not {lr}.")
    rounds = rounds or PROFILES[profile]["rounds"]
    seeds = seeds or PROFILES[profile]["seeds"]
    model_c, defense_c = _one(model, "model"), _one(defense, "defense")
    dataset_c = _one(dataset, "dataset", data_root=data_root)
    info = dataset_c.info()
    if info.num_classes < 2:
        raise UserInputError(f"{dataset} has {info.num_classes} class(es): a classifier needs at least two.")
    if info.train_size is not None and info.train_size < clients:
        raise UserInputError(f"{dataset} has {info.train_size} training image(s), too few to share among "
                             f"{clients} clients; use --clients {max(1, info.train_size)} or fewer.")
    if info.test_size == 0:
        raise UserInputError(f"{dataset} has no test images to measure accuracy on; give it a test split.")
    check_buildable(model_c, defense_c, info, where=f"{model} + {defense} on {dataset}")
    run_device = pick_device(device)
    out = out or Path("gileak-runs") / time.strftime("train-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    console = cli_console(stderr=json_output)
    splits = dataset_c.load(seed=0)
    input_shape = model_c.input_shape(tuple(splits.train_images.shape[1:]))
    num_classes = info.num_classes
    train_x = data.fit_images(splits.train_images, input_shape)
    test_x = data.fit_images(splits.test_images, input_shape)
    if len(test_x) == 0:
        raise UserInputError(f"{dataset} has no test images to measure accuracy on; give it a test split.")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        for seed in range(seeds):
            task = progress.add_task(f"seed {seed}: training", total=rounds)
            net = build_net(model_c, defense_c, input_shape, num_classes, seed, run_device)
            config = fl.FLConfig(rounds=rounds, clients=clients, local_epochs=local_epochs, batch_size=batch_size,
                                 lr=lr, patience=patience, seed=seed)
            result = fl.federated_train(net, defense_c, train_x, splits.train_labels, test_x, splits.test_labels,
                                        config, device=run_device, progress=lambda _r, t=task: progress.advance(t))
            progress.update(task, completed=rounds)
            torch.save(result.state_dict, out / f"model_seed{seed}.pt")
            results.append(result)
    params = count_trainable(net)
    accuracy_mean, accuracy_std = metrics.summarize([r.accuracy for r in results])
    epsilons = [r.epsilon for r in results if r.epsilon is not None]
    _write_curves(results, out)
    summary = {
        "model": model, "dataset": dataset, "defense": defense, "profile": profile,
        "accuracy_mean": accuracy_mean, "accuracy_std": accuracy_std,
        "accuracies": [r.accuracy for r in results],
        "rounds": max(r.rounds_run for r in results), "rounds_per_seed": [r.rounds_run for r in results],
        "stopped_early": [r.stopped_early for r in results],
        "epsilon": max(epsilons) if epsilons else None, "delta": fl.DP_DELTA if epsilons else None,
        "params": params, "seconds": sum(r.seconds for r in results), "out": str(out),
    }
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
        return
    eps = f", ε = {summary['epsilon']:.3g} at δ = 1e-5" if epsilons else ""
    console.print(styled(
        (f"{model} + {defense} on {dataset}", "bold"), ": test accuracy ",
        (f"{100 * accuracy_mean:.2f} ± {100 * accuracy_std:.2f} %", "bold"),
        f" over {seeds} seed(s); rounds run {summary['rounds_per_seed']}{eps}; {params:,} trainable parameters.",
    ))
    console.print(f"Accuracy curves, checkpoints and summary.json: {out}")


def _write_curves(results, out: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "accuracy.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "round", "test_accuracy", "mean_val_loss"])
        for seed, r in enumerate(results):
            for i, (acc, val) in enumerate(zip(r.accuracy_curve, r.val_loss_curve), start=1):
                writer.writerow([seed, i, f"{acc:.6g}", f"{val:.6g}"])
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    for seed, r in enumerate(results):
        axis.plot(range(1, len(r.accuracy_curve) + 1), [100 * a for a in r.accuracy_curve], label=f"seed {seed}")
    axis.set_xlabel("communication round")
    axis.set_ylabel("test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "accuracy.png")
    plt.close(figure)


def load_checkpoint(path: str | Path):
    """A saved global model state, loaded tensors-only (a run directory may come from someone
    else): a file holding anything else raises RefusedFileError and nothing in it runs."""
    from gileak.safeload import load_tensors

    return load_tensors(path)
