"""`gileak bench`: compose a defense x attack x model x dataset matrix, run it, print the leaderboard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from gileak.cli import completion
from gileak.cli.state import console as cli_console
from gileak.cli.state import state, styled


def _default_out() -> Path:
    base = Path("gileak-runs") / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _write_report(run_dir: Path, console: Console) -> None:
    """The run's HTML report, `run_dir/report.html`. The results are stored before it is built,
    so a report that fails loses nothing: it says why, and `gileak report DIR` builds it again."""
    from rich.text import Text

    from gileak.errors import GileakError
    from gileak.report.html import human_size, write_report

    try:
        report = write_report(run_dir)
    except Exception as e:
        if state.debug:
            raise
        reason = str(e) if isinstance(e, GileakError) else f"{type(e).__name__}: {e}"
        console.print(Text.assemble(("Report not written", "red"), f": {reason}; `gileak report {run_dir}` "
                                    "builds it again."), highlight=False)
        state.exit_code = 1
        return
    console.print(Text(f"Report: {report.path} ({human_size(report.size)})"), highlight=False)


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
    clients: Annotated[Optional[str], typer.Option(help="What each attacked client uploads: gradient(batch=B) "
                                                    "or fedavg(batch=B,steps=S,lr=L), each with aggregate=K "
                                                    "for secure aggregation. [default: gradient, the paper's "
                                                    "batch=1]", autocompletion=completion.clients)] = None,
    spec: Annotated[Optional[Path], typer.Option("--spec", help="TOML spec file; flags override its values.")] = None,
    victims: Annotated[Optional[int], typer.Option(help="Attacked uploads (victims) per cell and client; "
                                                   "each holds the client's images. [default: 8]")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Attack iteration cap per victim. [default: 5000]")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Budget preset: quick (a laptop CPU: 8 victims x 5000 "
                                                       "iterations, no training) or paper (128 victims x 20000, "
                                                       "300 rounds, patience 40, 3 seeds). Explicit flags "
                                                       "override it. [default: quick]")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Federated training rounds before the attack; "
                                                       "0 attacks the freshly initialised model. [default: 0]")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop training after this many rounds without a "
                                                         "better validation loss. [default: 40]")] = None,
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (cells, budgets, cost estimated by "
                                          "short probes on this device) and run nothing.")] = False,
    executor: Annotated[str, typer.Option(help="local (this machine; every local GPU) or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join "
                                                       "(e.g. ray://head:10001 or auto). [default: a local "
                                                       "Ray instance]")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Local executor: cells run in this many worker "
                                                   "processes. [default: one per GPU when there are several, "
                                                   "else 1]")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads PyTorch computes with (split between "
                                                   "--workers). [default: PyTorch's, one per core]")] = None,
) -> None:
    """Train (optionally) and attack every cell of the matrix; print a leaderboard."""
    from gileak.errors import UserInputError
    from gileak.runner import Runner, plan
    from gileak.spec import build_spec

    bench_spec = build_spec(
        spec, models=models, datasets=datasets, defenses=defenses, attacks=attacks, clients=clients,
        victims=victims,
        iterations=iterations, rounds=rounds, seeds=seeds, device=device, out=out, exports=export or None,
        trace=trace, attack_at=attack_at, data_root=data_root, profile=profile, patience=patience,
    )
    if executor not in ("local", "ray"):
        raise UserInputError(f"Unknown executor '{executor}'. Use local or ray.")
    from gileak.report.exporters import check_export_path

    for path in bench_spec.exports:
        check_export_path(path)
    console = cli_console()
    if threads is not None:
        import os

        import torch

        cores = os.cpu_count() or 1
        if threads > cores:  # more only adds waiting (and OpenMP allocates per thread: 10^9 is out of memory)
            raise UserInputError(f"--threads {threads} is more than this machine's {cores} cores")
        torch.set_num_threads(threads)
    if dry_run:
        _dry_run(bench_spec, console)
        return
    the_plan = plan(bench_spec)
    _warn_if_busy(bench_spec.device, console)
    run_dir = bench_spec.out or _default_out()
    state.run_dir = run_dir
    # Everything that can refuse the command (device, executor, --out, the directory's lock and
    # budget) is checked here, before any file is written.
    with Runner(the_plan, run_dir, debug=state.debug, executor=executor, workers=workers,
                ray_address=ray_address) as runner:
        _run(runner, the_plan, bench_spec, run_dir, console)


def busy_hint(busy: float, cores: int, threads: int) -> str | None:
    """A hint for a CPU run whose threads outnumber the cores other processes leave free (`busy`:
    the cores they kept busy just before the run): PyTorch's threads then spin-wait for one
    another at every operation, and the run can be several times slower than with fewer threads
    (docs/performance.md: 3-17x with other work on 2 cores). None when they fit."""
    free = max(1, int(cores - busy + 0.5))
    if threads <= free:
        return None
    return (f"this machine is busy (other processes keep {busy:.1f} of its {cores} cores busy) and PyTorch "
            f"computes with {threads} threads: they wait for each other where a core is taken, which can make "
            f"the run several times slower. --threads {free} fits the free cores.")


def busy_cores(seconds: float = 0.1) -> float | None:
    """How many cores were busy over the next `seconds` (Linux's /proc/stat; this process sleeps
    meanwhile, so it is the other processes' load, now — not the load average, which still
    counts what ended a minute ago). None where /proc/stat cannot be read."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # all, idle + iowait

    try:
        total_a, idle_a = sample()
        time.sleep(seconds)
        total_b, idle_b = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total_b <= total_a:
        return None
    import os

    return (os.cpu_count() or 1) * (1 - (idle_b - idle_a) / (total_b - total_a))


def _warn_if_busy(device: str, console: Console) -> None:
    import os

    import torch

    from gileak.runner import pick_device

    if pick_device(device) != "cpu":
        return
    busy = busy_cores()
    hint = None if busy is None else busy_hint(busy, os.cpu_count() or 1, torch.get_num_threads())
    if hint:
        console.print(styled(("note", "yellow"), f" {hint}"), highlight=False)


def _run(runner, the_plan, bench_spec, run_dir: Path, console: Console) -> None:
    console.print(styled(
        ("gileak bench", "bold"),
        f": {len(the_plan.cells)} training cell(s) -> {the_plan.rows_expected} row(s); "
        f"{bench_spec.victims} victims x {bench_spec.iterations} iterations per attack, "
        f"{bench_spec.rounds} training round(s); run directory {run_dir}",
    ))
    _say_same(the_plan, console)
    resume = runner.resume
    if resume.reused or resume.retried or resume.interrupted:
        parts = [f"{resume.reused} finished result(s) reused"]
        if resume.interrupted:
            parts.append(f"{resume.interrupted} interrupted cell(s) redone")
        if resume.retried:
            parts.append(f"{resume.retried} failed result(s) tried again")
        parts.append(f"{resume.todo} to compute")
        console.print(f"Resuming {run_dir}: " + ", ".join(parts))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        # The description holds the cell's labels: shown as written, not read as markup.
        TextColumn("{task.description}", style="progress.description", markup=False), BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    ) as progress:
        task = progress.add_task("starting", total=runner.work_units())
        runner.advance = lambda n: progress.advance(task, n)
        runner.describe = lambda text: progress.update(task, description=text)
        result = runner.run()
    show_result(result, run_dir, console, bench_spec.exports)
    runner.check_directory()  # the leaderboard was drawn from a store that is still the directory's
    if result.traces:
        console.print(f"Gradient traces (CSV + PNG per cell): {run_dir / 'traces'}")
    _write_report(run_dir, console)
    if result.failures:
        state.exit_code = 1


def show_result(result, run_dir: Path, console: Console, exports=(), title: str = "gileak leaderboard") -> None:
    """The leaderboard, its exports and figures, notes and failures of a run directory."""
    from gileak.errors import GileakError
    from gileak.report import export as export_rows
    from gileak.report import render_leaderboard
    from gileak.report.figures import save_privacy_utility
    from gileak.store import write_error

    def written(path: Path, write) -> Path | None:
        try:
            return write()
        except OSError as e:
            raise write_error(e, path, run_dir) from e

    # The run directory's own leaderboard first: an export that fails later never costs it.
    written(run_dir / "leaderboard.json", lambda: export_rows(result.rows, run_dir / "leaderboard.json"))
    render_leaderboard(result.rows, console=console, title=title)
    for path in exports:
        try:
            written(path, lambda path=path: export_rows(result.rows, path))
        except GileakError as e:
            raise GileakError(f"{e} The leaderboard is in {run_dir / 'leaderboard.json'}; `gileak leaderboard "
                              f"{run_dir} -o FILE` writes it again.") from e
        console.print(f"Exported {path}")
    console.print(f"Reconstructions (originals above, reconstructions below): {run_dir / 'reconstructions'}")
    figure = written(run_dir / "privacy_utility.png",
                     lambda: save_privacy_utility(result.rows, run_dir / "privacy_utility.png"))
    if figure is not None:
        console.print(f"Privacy-utility figure: {figure}")
    for where, note in result.notes:
        console.print(styled("  ", ("note", "yellow"), f" {where}: {note}"), highlight=False)
    if result.failures:
        console.print(styled((f"{len(result.failures)} failure(s):", "bold red")))
        for where, reason in result.failures:
            console.print(styled("  ", (where, "red"), f": {reason}"), highlight=False)


def _say_same(the_plan, console: Console) -> None:
    for kind, label, kept in the_plan.same:
        console.print(f"  {label} is the same {kind} as {kept} (the same parameters, defaults included): it is "
                      f"run once and shown as {kept}.", markup=False, highlight=False)


def _dry_run(bench_spec, console: Console) -> None:
    """Print the plan and its estimated cost; run nothing, write nothing."""
    from rich.table import Table

    from gileak.estimate import estimate, human
    from gileak.runner import pick_device, plan

    the_plan = plan(bench_spec, check_data=False)
    s = the_plan.spec  # one spelling of each component
    device = pick_device(s.device)
    console.print(styled(("gileak bench --dry-run", "bold"), f" (profile {s.profile}): {len(the_plan.cells)} "
                         f"training cell(s) -> {the_plan.rows_expected} row(s); nothing is run"))
    console.print(f"  datasets {', '.join(r.label for r in s.datasets)}; models {', '.join(r.label for r in s.models)}; "
                  f"defenses {', '.join(r.label for r in s.defenses)}; attacks {', '.join(r.label for r in s.attacks)}; "
                  f"clients {', '.join(r.label for r in s.clients)}")
    _say_same(the_plan, console)
    console.print(f"  attack: {s.victims} victims per cell, up to {s.iterations:,} iterations each", highlight=False)
    for attack in the_plan.cells[0].attacks if the_plan.cells else ():
        if hasattr(attack.component, "schedule_text"):
            console.print(f"    {attack.label}: {attack.component.schedule_text(s.iterations)}", highlight=False)
    training = (f"{s.rounds} FedAvg round(s), 10 clients, 1 local epoch, batch 64, early stopping after "
                f"{s.patience} round(s) without a better validation loss" if s.rounds else "none (the "
                "freshly initialised model is attacked)")
    console.print(f"  training: {training}; attacked model: {s.attack_at}; seeds: {s.seeds}; device: {device}")
    with console.status("probing the cost on this device"):
        estimates = estimate(the_plan, device)
    table = Table(title=f"Estimated cost on this device ({device})", title_justify="left")
    jobs = the_plan.cells[0].jobs if the_plan.cells else []
    # one client: a column per attack, as always; several: a column per attack and client
    headers = [job.attack.label if len(s.clients) == 1 else job.label for job in jobs]
    for column in ("dataset", "model", "defense", "training", *headers, "total"):
        table.add_column(column, justify="right" if column not in ("dataset", "model", "defense") else "left")
    for e in estimates:
        table.add_row(e.dataset, e.model, e.defense, human(e.train_seconds) if s.rounds else "—",
                      *[human(e.attack_seconds.get(job.label)) for job in jobs], human(e.total))
    console.print(table)
    engines = Table(title=f"Engine per attack on this device ({device}, {s.victims} victims; gileak.engine.choice)",
                    title_justify="left")
    for column in ("dataset", "model", "defense", *headers):
        engines.add_column(column)
    for e in estimates:
        engines.add_row(e.dataset, e.model, e.defense,
                        *[e.engines[job.label].label() if job.label in e.engines else "—" for job in jobs])
    console.print(engines)
    console.print(f"Total: about {human(sum(e.total or 0.0 for e in estimates))} on {device}, at most: attacks stop on "
                  "a plateau and training on patience before their caps; batched attacks get cheaper per victim "
                  "as victims grow (probed with 8).")
    for e in estimates:
        for label, job in zip(headers, jobs):
            chosen = e.engines.get(job.label)
            if chosen is not None and chosen.how in ("probe", "cache"):
                console.print(styled("  ", ("engine", "yellow"), f" {e.dataset} | {e.model} | {e.defense} | "
                                     f"{label}: {chosen.engine}, {chosen.reason}"), highlight=False)
        for note in dict.fromkeys(e.notes):
            console.print(styled("  ", ("note", "yellow"), f" {e.dataset} | {e.model} | {e.defense}: {note}"),
                          highlight=False)
