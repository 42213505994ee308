"""FedAvg simulation for the utility side of the benchmark: train a (defended) model over IID
clients as in the paper's Section V-A and report the global model's test accuracy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gileak.data import client_split, iid_partition
from gileak.errors import DivergedError, UserInputError
from gileak.threat import client_loss


@dataclass
class FLConfig:
    """FedAvg settings; the defaults are the paper's except `rounds` (300 there), kept quick."""

    rounds: int = 10
    clients: int = 10
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    patience: int = 40
    val_fraction: float = 0.1
    seed: int = 0


#: δ of the (ε, δ) guarantee reported for DP training.
DP_DELTA = 1e-5


@dataclass
class FLResult:
    """What a federated run produced. Round indices are 0-based positions in the curves."""

    accuracy: float
    accuracy_curve: list[float] = field(default_factory=list)
    val_loss_curve: list[float] = field(default_factory=list)
    rounds_run: int = 0
    best_round: int | None = None
    accuracy_at_best_val: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    epsilon: float | None = None
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


def _seed(*parts: int) -> int:
    # SeedSequence mixes the parts, so (round, client) pairs never share a stream.
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]) >> 1


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of client states (parameters and floating buffers such as batch-norm
    running statistics). Integer buffers (`num_batches_tracked`) have no meaningful mean and
    take the first client's value: every client starts from the same global count."""
    if not states or len(states) != len(weights):
        raise ValueError(f"fedavg needs one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    shares = [float(w) / total for w in weights]
    averaged: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            averaged[name] = first.detach().clone()
            continue
        # Accumulate in at least float32 so half-precision states don't lose the small shares.
        accumulator_dtype = torch.promote_types(first.dtype, torch.float32)
        mean = torch.zeros_like(first, dtype=accumulator_dtype)
        for state, share in zip(states, shares):
            mean.add_(state[name].detach().to(accumulator_dtype), alpha=share)
        averaged[name] = mean.to(first.dtype)
    return averaged


def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512,
             device: str | torch.device | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `net` in eval mode; `device` defaults to the net's.
    (nan, nan) for an empty set. The net's train/eval mode is restored afterwards."""
    if len(labels) == 0:
        return math.nan, math.nan
    if device is None:
        device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    # Sums stay on the device so the loop doesn't synchronise once per batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    try:
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                batch_images = images[start : start + batch_size].to(device)
                batch_labels = labels[start : start + batch_size].to(device)
                logits = net(batch_images)
                loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum")
                correct += (logits.argmax(dim=1) == batch_labels).sum()
    finally:
        net.train(was_training)
    return loss_sum.item() / len(labels), correct.item() / len(labels)


def _train_client(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: FLConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Local training of one client, in place on `net`, which holds the global state on entry.
    Returns whether every batch's loss was finite (a 0-dim bool tensor, read once per client)."""
    # Each client's Adam is fresh every round: FedAvg shares weights, not optimizer moments.
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=config.lr, betas=config.betas)
    net.train()
    # The Parameters themselves go into the state so gradients reach them and the optimizer,
    # and training uses the very loss the attacked client step uses (β·KL included).
    state = dict(net.named_parameters()) | dict(net.named_buffers())
    finite = torch.ones((), dtype=torch.bool, device=labels.device)
    for _epoch in range(config.local_epochs):
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        for batch in order.split(config.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = client_loss(net, state, images[batch], labels[batch])
            finite &= torch.isfinite(loss.detach())
            loss.backward()
            optimizer.step()
    return finite & _finite_state(optimizer)


def _finite_state(optimizer) -> torch.Tensor:
    """Whether the optimizer's moments are finite (a 0-dim bool tensor). A gradient beyond float
    range (a defense's noise) overflows Adam's squared moment to inf, which freezes the weights
    while every loss stays finite: training has silently stopped."""
    tensors = [value for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all().cpu()


def _train_client_dp(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: FLConfig,
                     generator: torch.Generator, clip: float, sigma: float, accountant) -> torch.Tensor:
    """Local DP-SGD with Opacus: Poisson-sampled batches (rate batch/n, as the accountant
    assumes), per-sample gradients clipped to `clip`, Gaussian noise of std clip·sigma, then
    Adam. Every step is charged to the client's RDP `accountant`. Returns whether every loss
    was finite."""
    import warnings

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from gileak.nets import aux_loss

    n = len(labels)
    sample_rate = min(1.0, config.batch_size / n)
    steps = max(1, round(1 / sample_rate)) * config.local_epochs
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    device = params[0].device
    noise = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    finite = torch.ones((), dtype=torch.bool, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GradSampleModule(net)
        optimizer = DPOptimizer(torch.optim.Adam(params, lr=config.lr, betas=config.betas), noise_multiplier=sigma,
                                max_grad_norm=clip, expected_batch_size=max(1, round(sample_rate * n)),
                                generator=noise)
        try:
            for _ in range(steps):
                chosen = (torch.rand(n, generator=generator) < sample_rate).nonzero().flatten().to(labels.device)
                accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
                if len(chosen) == 0:  # an empty Poisson batch: no update, the step is still charged
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(images[chosen]), labels[chosen]) + aux_loss(net)
                finite &= torch.isfinite(loss.detach())
                loss.backward()
                optimizer.step()
            finite &= _finite_state(optimizer)
        finally:
            model._close()
    for p in params:  # leave no per-sample buffers behind for the next client
        p.grad = None
        for attribute in ("grad_sample", "summed_grad"):
            if hasattr(p, attribute):
                delattr(p, attribute)
    return finite


def _transform_upload(net: nn.Module, global_state: dict[str, torch.Tensor], defense,
                      generator: torch.Generator) -> None:
    """Apply the defense's upload transform (pruning, quantisation, noise) to the client's model
    update, local − global, of every trainable parameter; `net` then holds global + transformed."""
    from gileak.base import Defense

    if defense is None or type(defense).transform_gradient is Defense.transform_gradient:
        return
    with torch.no_grad():
        named = {n: p for n, p in net.named_parameters() if p.requires_grad}
        update = {n: p.detach() - global_state[n] for n, p in named.items()}
        sent = defense.transform_gradient(update, generator)
        for n, p in named.items():
            p.copy_(global_state[n] + sent[n])


def _check_finite_state(state: dict[str, torch.Tensor], round_index: int) -> None:
    """Raise DivergedError when FedAvg produced a NaN or infinite weight (a client's upload
    beyond float range: a defense's noise, a diverged client)."""
    floating = [value for value in state.values() if value.is_floating_point()]
    if floating and not bool(torch.stack([torch.isfinite(value).all() for value in floating]).all()):
        raise DivergedError(
            f"training diverged: the global model has NaN or infinite weights after round {round_index + 1} (a "
            "client's upload beyond float range, e.g. a defense's noise); no accuracy is reported for it.")


def _detached_copy(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in net.state_dict().items()}


def federated_train(net: nn.Module, defense, train_images: torch.Tensor, train_labels: torch.Tensor,
                    test_images: torch.Tensor, test_labels: torch.Tensor, config: FLConfig | None = None,
                    device: str | torch.device = "cpu", progress: Callable[[int], None] | None = None,
                    client_indices: Sequence | None = None, keep_rounds: Sequence[int] = ()) -> FLResult:
    """Train `net` (already transformed by `defense`) with FedAvg over `config.clients` IID
    clients; `net` holds the final global model on return. `client_indices` (one index set per
    client into the training set) replaces the seeded partition; each is split into train and
    validation parts. `progress(round_index)` is called after every round. The global state
    after each round r in `keep_rounds` (1-based; 0 is the initial model) is kept in
    `result.snapshots`. `defense` is taken for
    the client-step changes still to come (DP-SGD); its model transform is already in `net`."""
    config = config or FLConfig()
    started = time.perf_counter()
    device = torch.device(device)
    net.to(device)
    train_images = train_images.to(device)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    test_labels = test_labels.long()

    if client_indices is None:
        if len(train_labels) < config.clients:
            raise UserInputError(f"{len(train_labels)} training images cannot be shared among {config.clients} clients")
        client_indices = iid_partition(len(train_labels), config.clients, config.seed)
    # One seed for every client's split, as the runner uses it to find client 0's training part.
    splits = [client_split(indices, config.val_fraction, config.seed) for indices in client_indices]
    splits = [(train.to(device), val.to(device)) for train, val in splits]
    dp = defense.dp_sgd() if defense is not None and hasattr(defense, "dp_sgd") else None
    accountants = []
    if dp is not None:
        from opacus.accountants import RDPAccountant

        accountants = [RDPAccountant() for _ in splits]
    sizes = [len(train) for train, _ in splits]
    if min(sizes) == 0:
        raise UserInputError("every client needs at least one training image; use fewer clients or more data")
    has_validation = any(len(val) > 0 for _, val in splits)

    global_state = _detached_copy(net)
    result = FLResult(accuracy=math.nan)
    if 0 in keep_rounds:
        result.snapshots[0] = {name: value.cpu() for name, value in global_state.items()}
    best_val = math.inf
    rounds_without_improvement = 0
    for round_index in range(config.rounds):
        client_states = []
        for client, (train, _val) in enumerate(splits):
            net.load_state_dict(global_state)
            shuffle = torch.Generator().manual_seed(_seed(config.seed, round_index, client))
            # Stochastic modules (variational bottlenecks) draw from the global stream.
            torch.manual_seed(_seed(config.seed, round_index, client, 1))
            if dp is not None:
                finite = _train_client_dp(net, train_images[train], train_labels[train], config, shuffle, *dp,
                                          accountants[client])
            else:
                finite = _train_client(net, train_images[train], train_labels[train], config, shuffle)
            if not bool(finite):
                raise DivergedError(
                    f"training diverged: client {client}'s training loss or optimizer state became NaN or infinite "
                    f"in round {round_index + 1} (learning rate {config.lr:g}); no accuracy is reported for a "
                    "model that is numerically broken. Lower the learning rate or check the defense's parameters "
                    "(noise beyond float range?).")
            _transform_upload(net, global_state, defense, shuffle)
            client_states.append(_detached_copy(net))
        global_state = fedavg(client_states, sizes)
        del client_states
        _check_finite_state(global_state, round_index)
        net.load_state_dict(global_state)

        val_losses = [evaluate(net, train_images[val], train_labels[val], device=device)[0]
                      for _train, val in splits if len(val) > 0]
        val_loss = sum(val_losses) / len(val_losses) if val_losses else math.nan
        test_loss, accuracy = evaluate(net, test_images, test_labels, device=device)
        held_out = val_losses + ([test_loss] if len(test_labels) else [])  # an empty set's loss is NaN
        if not all(math.isfinite(loss) for loss in held_out):
            raise DivergedError(
                f"training diverged: the global model's loss on held-out images is NaN or infinite after round "
                f"{round_index + 1}; no accuracy is reported for a model that is numerically broken. Lower the "
                "learning rate or check the defense's parameters.")
        result.val_loss_curve.append(val_loss)
        result.accuracy_curve.append(accuracy)
        result.rounds_run = round_index + 1
        if result.rounds_run in keep_rounds:
            result.snapshots[result.rounds_run] = {name: value.cpu() for name, value in global_state.items()}
        if progress is not None:
            progress(round_index)

        if val_loss < best_val:  # a nan loss never counts as an improvement
            best_val = val_loss
            result.best_round = round_index
            result.accuracy_at_best_val = accuracy
            rounds_without_improvement = 0
        elif has_validation:
            rounds_without_improvement += 1
            if rounds_without_improvement >= config.patience:
                result.stopped_early = round_index + 1 < config.rounds
                break

    # The paper reports the global model after the last round, not the best-validation one.
    if result.accuracy_curve:
        result.accuracy = result.accuracy_curve[-1]
    else:
        result.accuracy = evaluate(net, test_images, test_labels, device=device)[1]
    result.state_dict = {name: value.cpu() for name, value in global_state.items()}
    if accountants:  # the privacy spent by the client that spent the most, at δ = 1e-5
        import warnings

        with warnings.catch_warnings():  # opacus warns when the optimal RDP order is at the range's edge
            warnings.simplefilter("ignore")
            result.epsilon = max(a.get_epsilon(delta=DP_DELTA) for a in accountants)
    result.seconds = time.perf_counter() - started
    return result
