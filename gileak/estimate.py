"""What a bench will cost, measured by short probes on this device (`gileak bench --dry-run`).

For every (dataset, model, defense) the probe builds the defended model on the dataset's shape
and times, on random inputs: two training steps of a small client batch (seconds per training
sample, times the training images every round touches) and three batched gradient-matching steps
on eight victims (seconds per victim-iteration; every iterative attack takes one such step per
iteration, so the analytic attack's cost is overstated); an L-BFGS attack (dlg, idlg, cpl),
whose iterations take one or more steps (its line search), is probed on its own solver over its
first iterations — later ones search longer (for the paper CNN, 2 evaluations per iteration at
first, 3.7 on average over 20), so read its figure as a lower bound. Each attack's engine is
chosen as the run will choose it (gileak.engine.choice: by rule, from the run directory's cache
when it has one, else by the same probe on the plan's number of victims); where that is the
per-victim loop, its probed rate prices the attack. The figures scale to the plan's
budget and are upper bounds in one sense — attacks stop on a plateau and training on patience
before their caps — and rough in others: a batched attack gets cheaper per victim as victims
grow, and DP-SGD training (per-sample gradients) costs more than the plain step probed here.
A client protocol other than the paper's gradient(batch=1) is estimated as the single-image
probe times the images its simulation steps through per evaluation (`labels_per_upload`:
batch x aggregate, times the local steps of fedavg) — rough again: a batch is cheaper per image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gileak.engine import choice
from gileak.errors import GileakError


@dataclass
class GroupEstimate:
    dataset: str
    model: str
    defense: str
    train_seconds: float | None = None
    attack_seconds: dict[str, float | None] = field(default_factory=dict)
    #: The engine each attack will run on (gileak.engine.choice.EngineChoice), by attack label.
    engines: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float | None:
        parts = [self.train_seconds, *self.attack_seconds.values()]
        if all(v is None for v in parts):
            return None
        return sum(v for v in parts if v)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def estimate(plan, device: str, probe_victims: int = 8, probe_iterations: int = 3,
             describe=None) -> list[GroupEstimate]:
    import torch
    import torch.nn.functional as F

    from gileak.runner import build_net
    from gileak.threat import Target, shared_gradients

    spec = plan.spec
    describe = describe or (lambda s: None)
    estimates = []
    train_sizes: dict[str, Any] = {}
    groups = list(dict.fromkeys((c.dataset.label, c.model.label, c.defense.label) for c in plan.cells))
    by_label = {(c.dataset.label, c.model.label, c.defense.label): c for c in plan.cells}
    for key in groups:
        cell = by_label[key]
        found = GroupEstimate(*key)
        estimates.append(found)
        describe(f"probing {' | '.join(key)}")
        dataset = cell.dataset.component
        try:
            try:
                info = dataset.info()
            except GileakError as e:
                if not hasattr(dataset, "declared_info"):
                    raise
                info = dataset.declared_info()  # estimate without the files; the run itself needs them
                found.notes.append(f"{dataset.name}: files not found under {dataset.root()}, estimated from its "
                                   "declared shape and official size; the run itself needs them "
                                   f"(gileak data fetch {dataset.name})")
                train_sizes.setdefault(cell.dataset.label, dataset.train_size or None)
            input_shape = cell.model.component.input_shape(info.shape)
            net = build_net(cell.model.component, cell.defense.component, input_shape, info.num_classes, 0, device)
        except GileakError as e:
            found.notes.append(str(e))
            continue
        if spec.rounds > 0:
            if cell.dataset.label not in train_sizes:
                try:
                    train_sizes[cell.dataset.label] = len(cell.dataset.component.load(seed=0).train_images)
                except GileakError as e:
                    train_sizes[cell.dataset.label] = None
                    found.notes.append(str(e))
            size = train_sizes[cell.dataset.label]
            if size:
                batch = 16
                images = torch.rand(batch, *input_shape, device=device)
                labels = torch.randint(info.num_classes, (batch,), device=device)
                optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
                net.train()

                def step():
                    optimizer.zero_grad()
                    F.cross_entropy(net(images), labels).backward()
                    optimizer.step()

                step()
                seconds = _timed(lambda: [step() for _ in range(2)]) / (2 * batch)
                # Every round each client trains one epoch on its 90% training split; the
                # evaluation passes cost about a third of a training step per image.
                per_round = seconds * size * (0.9 + 0.1 / 3) + seconds / 3 * len_test_guess(size)
                found.train_seconds = per_round * spec.rounds * spec.seeds
                if cell.defense.component.dp_sgd() is not None:
                    found.notes.append("DP-SGD training takes per-sample gradients and costs more than estimated")
        victims = torch.rand(probe_victims, *input_shape, device=device)
        labels = torch.randint(info.num_classes, (probe_victims,), device=device)
        net.train()
        try:
            per_iteration = _matching_step_seconds(net, cell.defense.component, victims, labels, input_shape,
                                                   info.num_classes, probe_iterations)
        except Exception as e:  # a model or defense the probe cannot step: say so, estimate the rest
            found.notes.append(f"attack cost not probed: {type(e).__name__}: {e}")
            per_iteration = None
        engines_known = choice.load(spec.out)
        for attack in dict.fromkeys(job.attack.label for job in cell.jobs):
            attack = next(job.attack for job in cell.jobs if job.attack.label == attack)
            seconds = per_iteration
            if per_iteration is not None and hasattr(attack.component, "lbfgs_config"):
                try:
                    seconds = _lbfgs_step_seconds(net, cell.defense.component, attack.component, victims, labels,
                                                  input_shape, info.num_classes, probe_iterations)
                except Exception as e:  # noqa: BLE001 — say so and keep the matching-step figure
                    found.notes.append(f"{attack.label}: L-BFGS not probed ({type(e).__name__}: {e}); "
                                       "estimated as one matching step per iteration")
            for job in (job for job in cell.jobs if job.attack.label == attack.label):
                images = job.client.component.labels_per_upload()
                try:
                    found.engines[job.label] = chosen = _engine_choice(
                        cell, job, net, info, input_shape, spec.victims, device, engines_known)
                except Exception as e:  # noqa: BLE001 — the run will choose again; say so, estimate the rest
                    found.notes.append(f"{job.label}: engine not chosen ({type(e).__name__}: {e})")
                    chosen = None
                if chosen is not None and chosen.engine == "loop" and chosen.rates.get("loop"):
                    found.attack_seconds[job.label] = spec.victims * spec.iterations * spec.seeds / chosen.rates["loop"]
                    continue
                found.attack_seconds[job.label] = (None if seconds is None else
                                                   seconds * images * spec.victims * spec.iterations * spec.seeds)
    return estimates


def _engine_choice(cell, job, net, info, input_shape, victims: int, device: str, known: dict):
    """The engine the job's attack will run on in this cell against its client's uploads (as
    the runner chooses it), found on `victims` random victims of the defended model."""
    import torch

    from gileak.runner import attack_id, engine_key

    cached = known.get(engine_key(cell, attack_id(job), victims, device))
    client = job.client.component
    count = victims * client.images_per_victim()
    images = torch.rand(count, *input_shape, device=device)
    labels = torch.randint(info.num_classes, (count,), device=device)
    net.train()
    target = _probe_target(net, cell.defense.component, images, labels, input_shape, info.num_classes, client)
    with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
        return choice.choose(job.attack.component, target, list(range(victims)), cached)


def _lbfgs_step_seconds(net, defense, attack, victims, labels, input_shape, num_classes, steps: int) -> float:
    """Seconds per victim-iteration of an L-BFGS attack's batched solver (its line search
    included), from the difference of a (1 + 2 steps)- and a 1-iteration run."""
    from gileak.engine.lbfgs import lbfgs_matching

    target = _probe_target(net, defense, victims, labels, input_shape, num_classes)
    config = attack.lbfgs_config(None)
    config.min_loss = 0.0
    seeds = list(range(len(victims)))
    known = None if config.optimise_labels else labels

    def run(iterations: int) -> float:
        return _timed(lambda: lbfgs_matching(target, config, seeds=seeds, max_iterations=iterations, labels=known))

    run(1)  # warm-up
    seconds = run(1 + 2 * steps) - run(1)
    return max(seconds, 1e-9) / (2 * steps * len(victims))


def _matching_step_seconds(net, defense, victims, labels, input_shape, num_classes, steps: int) -> float:
    """Seconds per victim-iteration of the batched gradient-matching engine every iterative
    attack steps with (an L-BFGS one once per evaluation): the difference of a (1 + steps)- and
    a 1-iteration attack, so setup is not counted; no victim stops early."""
    from gileak.engine.matching import MatchingConfig, gradient_matching

    target = _probe_target(net, defense, victims, labels, input_shape, num_classes)
    config = MatchingConfig(plateau_patience=10**9, stop_patience=10**9, min_loss=0.0)
    seeds = list(range(len(victims)))

    def attack(iterations: int) -> float:
        return _timed(lambda: gradient_matching(target, config, seeds=seeds, max_iterations=iterations,
                                                labels=labels))

    attack(1)  # warm-up
    seconds = attack(1 + steps) - attack(1)
    return max(seconds, 1e-9) / (steps * len(victims))


def _probe_target(net, defense, victims, labels, input_shape, num_classes, client=None):
    """The probe victims' uploads (shared gradients, or `client`'s) under the defense, as an
    attack target."""
    from gileak.threat import Target, shared_gradients

    gradients = shared_gradients(net, defense, victims, labels, seed=0, client=client)
    return Target(net=net, shared_gradient=gradients, input_shape=input_shape, num_classes=num_classes,
                  labels=labels, client=client)


def len_test_guess(train_size: int) -> int:
    """Test images evaluated each round, taken as a sixth of the training set (CIFAR-10's ratio)."""
    return train_size // 5


def human(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
