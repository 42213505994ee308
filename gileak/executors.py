"""Where cells run: local worker processes (one per GPU, or `--workers N`) or Ray tasks.

Either way a cell is computed by `runner.execute_cell` from the spec alone (each worker plans
the spec again and takes its cell by index), and its outcome comes back to the driver, which
alone writes the store, figures and traces — so every executor stores the same results.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gileak.errors import UserInputError

if TYPE_CHECKING:
    from gileak.runner import Runner


def compute_cell(spec_json: str, index: int, attack_labels: list[str], device: str, lpips_available: bool,
                 threads: int | None = None, debug: bool = False, engines: dict | None = None):
    """Run one planned cell's jobs (attack x client) named by `attack_labels` on `device`;
    returns its `CellOutcome`. `engines`: the run directory's cached engine choices, as the
    driver read them at submission."""
    import torch

    from gileak.runner import execute_cell, plan
    from gileak.spec import BenchSpec

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    spec = BenchSpec.model_validate_json(spec_json)
    cell = plan(spec).cells[index]
    attacks = [a for a in cell.jobs if a.label in attack_labels]
    return execute_cell(cell, spec, device, attacks, lpips_available=lpips_available, debug=debug, engines=engines)


def die_with_parent(parent_pid: int) -> None:
    """Run first in each worker process: the worker ends when the process that started it does,
    even when that one is killed with SIGKILL and shuts nothing down (a worker holds a model and
    its data, hundreds of MB, and would compute on for nobody). On Linux the kernel sends the
    worker SIGKILL (prctl PR_SET_PDEATHSIG); everywhere a watchdog thread exits when the parent
    pid changes (the worker was re-parented)."""
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above could take effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="gileak-parent-watch", daemon=True).start()


def _persist(runner: Runner, index: int, get, attacks) -> None:
    """Store what `get()` returns for a cell; a worker that died or raised fails its attacks."""
    from gileak.runner import AttackOutcome, CellOutcome, attack_id, cell_id

    try:
        outcome = get()
    except Exception as e:  # the worker process itself failed (killed, out of memory, ...)
        reason = f"worker failed: {type(e).__name__}: {e}"
        outcome = CellOutcome(attacks=[AttackOutcome(attack_id(a), a.label, "failed", error=reason) for a in attacks])
    for result in outcome.attacks:
        runner.persist(index, outcome, result)
    runner.store.clear_running(cell_id(runner.plan.cells[index]))
    runner.advance(runner.spec.rounds + len(attacks) * runner.spec.iterations)


def run_pool(runner: Runner, lpips_available: bool, devices: list[str]) -> None:
    """Cells in parallel worker processes, one per entry of `devices` (a GPU each, or CPU)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from gileak.runner import cell_id

    spec_json = runner.spec.model_dump_json()
    import torch

    # the threads this process would use (--threads, else one per core), split between workers
    threads = max(1, torch.get_num_threads() // len(devices)) if devices[0] == "cpu" else None
    context = multiprocessing.get_context("spawn")
    pending = list(runner.todo)
    runner.describe(f"{len(pending)} cell(s) on {len(devices)} worker process(es): {', '.join(devices)}")
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=context, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {}
        free = list(devices)

        def submit() -> None:
            while pending and free:
                index, attacks = pending.pop(0)
                device = free.pop(0)
                runner.store.mark_running(cell_id(runner.plan.cells[index]))
                future = pool.submit(compute_cell, spec_json, index, [a.label for a in attacks], device,
                                     lpips_available, threads, runner.debug, runner.engines())
                futures[future] = (index, attacks, device)

        submit()
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                index, attacks, device = futures.pop(future)
                free.append(device)
                _persist(runner, index, future.result, attacks)
            submit()


def run_ray(runner: Runner, lpips_available: bool) -> None:
    """Cells as Ray tasks (one GPU per task where the cluster has GPUs); results come back to
    this driver, which stores them as they finish."""
    try:
        import ray
    except ImportError as e:
        raise UserInputError("--executor ray needs Ray: pip install 'gileak[ray]'") from e
    import logging

    from gileak.runner import cell_id, pick_device

    started_here = not ray.is_initialized()
    if started_here:
        runner.describe(f"starting Ray ({runner.ray_address or 'a local instance'})")
        try:
            ray.init(address=runner.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserInputError(f"Cannot reach the Ray cluster at {runner.ray_address}: {e}") from e
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus:
            options, device = {"num_gpus": 1}, "cuda"
        else:
            wanted = pick_device(runner.spec.device) if runner.spec.device != "auto" else "cpu"
            if wanted == "cuda":
                raise UserInputError("--device cuda with --executor ray, but the Ray cluster has no GPUs.")
            # As many threads as this process would use, so a CPU cell computes exactly what the
            # local executor computes here (float sums depend on the thread count).
            import torch

            threads = min(torch.get_num_threads(), int(ray.cluster_resources().get("CPU", 1)) or 1)
            options, device = {"num_cpus": threads}, "cpu"
        task = ray.remote(**options)(compute_cell)
        spec_json = runner.spec.model_dump_json()
        refs = {}
        for index, attacks in runner.todo:
            runner.store.mark_running(cell_id(runner.plan.cells[index]))
            ref = task.remote(spec_json, index, [a.label for a in attacks], device, lpips_available,
                              None if gpus else threads, runner.debug, runner.engines())
            refs[ref] = (index, attacks)
        runner.describe(f"{len(refs)} cell(s) as Ray tasks ({'1 GPU' if gpus else f'{threads} CPU'} each)")
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                index, attacks = refs.pop(ref)
                _persist(runner, index, lambda: ray.get(ref), attacks)
    finally:
        if started_here:
            ray.shutdown()
