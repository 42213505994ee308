"""What a client uploads: one gradient on a batch, the weight change of several local SGD steps
(FedAvg), or the mean of several clients' uploads (secure aggregation); and the attacker's
differentiable simulation of the local steps."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from gileak.errors import ParamsError
from gileak.threat import client_gradient, client_loss, trainable_state


def _check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.shape[0] == 0:
        raise ValueError("a client needs at least one image")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")


def batch_gradient(net: nn.Module, defense, images: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The upload of `gradient(batch=B)`: one training step's gradient of the mean client loss
    over the B images (cross-entropy averaged over the batch, plus the modules' aux terms, which
    average over the batch too), then the defense's upload transform — `threat.client_gradient`,
    which already treats its images as one batch:

    - Without batch norm in training mode the loss is a mean of per-image terms, so the upload
      before the defense's transform is exactly the mean of the B single-image gradients.
    - Batch norm in training mode normalises with the batch's statistics, which couple the
      images: the gradient is that of the batch's mean loss with those statistics (the mean of
      per-image gradients *within the batch's forward*), not the mean of single-image steps.
      Running statistics are left untouched either way.
    - Stochastic modules (variational bottlenecks) draw one noise sample per image from the
      global stream in a single forward.
    - DP-SGD (`defense.client_gradient`) replaces the step as Opacus runs it on a batch:
      per-sample gradients clipped to C, summed, Gaussian noise of std σ·C added once, divided
      by B. gc/quant prune or round the batch's gradient once.

    Images (B, C, H, W) and labels (B,) of one client; the engine will stack clients as victims
    (`threat.shared_gradients` does it for B = 1)."""
    _check_batch(images, labels)
    return client_gradient(net, defense, images, labels, generator)


def local_batches(data: int, *, steps: int, batch: int) -> torch.Tensor:
    """Which of a client's `data` images each local step trains on, as positions (steps, batch).

    The client reads its images in the order they were drawn for it (a random draw, which is
    the client's permutation), `batch` at a time, and starts again from the first when it runs
    out: step t takes positions t·batch … t·batch + batch − 1, modulo `data`. With the default
    data = batch × steps every image is used once; with fewer, later epochs repeat the same
    order. The order is not reshuffled per epoch on purpose: an attacker who knows the protocol
    simulates the same schedule with its dummies (dummy j stands for the image at position j),
    as Inverting Gradients assumed; a secret reshuffle would be another threat model."""
    for name, value in (("steps", steps), ("batch", batch), ("data", data)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParamsError(f"fedavg: {name} must be a positive integer, got {value!r}")
    if data < batch:
        raise ParamsError(f"fedavg: a client with {data} images cannot fill a batch of {batch}; "
                          "give it at least `batch` images")
    return torch.arange(steps * batch).remainder(data).view(steps, batch)


def _check_lr(lr: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ParamsError(f"fedavg: lr must be a positive finite number, got {lr!r}")


def _sgd_update(net: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor, targets: torch.Tensor,
                schedule: torch.Tensor, lr: float, step_gradient) -> dict[str, torch.Tensor]:
    """θ_after − θ_before of plain SGD over the scheduled mini-batches; `step_gradient(θ, x, y)`
    gives each step's gradient. The change is accumulated step by step rather than taken as a
    difference of weights at the end, which would lose the low bits of a small update to
    cancellation (one step's upload is exactly −lr × its gradient). Pure tensor arithmetic, so
    it is differentiable and vmappable whenever `step_gradient` is."""
    change = {name: torch.zeros_like(value) for name, value in params.items()}
    for positions in schedule:
        current = {name: value + change[name] for name, value in params.items()}
        gradient = step_gradient(current, images[positions], targets[positions])
        change = {name: value - lr * gradient[name] for name, value in change.items()}
    return change


def _working_copy(net: nn.Module) -> nn.Module:
    """A deep copy of the net whose parameters a local update may overwrite. A module's aux_loss
    left from an earlier forward is a non-leaf tensor, which deepcopy refuses; the copy starts
    without it."""
    memo = {id(m.aux_loss): None for m in net.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)}
    return copy.deepcopy(net, memo)


def local_update(net: nn.Module, defense, images: torch.Tensor, labels: torch.Tensor, *, steps: int, batch: int,
                 lr: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The upload of `fedavg(batch, steps, lr)`: the client trains `steps` SGD steps of learning
    rate `lr` from the net's weights on its `images` (scheduled by `local_batches`) and uploads
    its weight change Δθ = θ_after − θ_before of every trainable parameter, keyed like a gradient.

    Defenses apply where they belong: the modules' aux loss (β·KL) is in every step's loss;
    a defense with its own `client_gradient` (DP-SGD) replaces every step's gradient with its
    clipped and noised one, drawing fresh noise from `generator` at each step; the upload
    transform (gc, quant) is applied once, to Δθ — as federated training (`gileak.fl`) applies
    it to a client's model update. Stochastic modules draw from the global stream, one forward
    per step. Batch norms use each mini-batch's statistics and their running statistics are
    neither updated nor uploaded (only trainable parameters are). The net itself is untouched.

    With steps = 1 the upload is −lr × `batch_gradient` (the transform of gc/quant aside,
    which commutes with the scaling up to rounding)."""
    _check_batch(images, labels)
    _check_lr(lr)
    schedule = local_batches(len(images), steps=steps, batch=batch).to(images.device)
    params, frozen = trainable_state(net)
    custom = getattr(defense, "client_gradient", None)
    if custom is None:
        def step_gradient(state, step_images, step_labels):
            return torch.func.grad(lambda p: client_loss(net, {**p, **frozen}, step_images, step_labels,
                                                         update_running_stats=False))(state)
    else:
        worker = _working_copy(net)
        worker_params = {name: p for name, p in worker.named_parameters() if p.requires_grad}

        def step_gradient(state, step_images, step_labels):
            with torch.no_grad():
                for name, value in state.items():
                    worker_params[name].copy_(value)
            return custom(worker, step_images, step_labels, generator)

    update = _sgd_update(net, params, images, labels, schedule, lr, step_gradient)
    return defense.transform_gradient(update, generator)


def aggregate(uploads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What the server sees under secure aggregation: the mean of K clients' uploads, key by
    key. Uploads stacked over victims (N, ...) average the same way, victim by victim."""
    if not uploads:
        raise ValueError("aggregate needs at least one upload")
    names = list(uploads[0])
    for index, upload in enumerate(uploads[1:], start=1):
        if list(upload) != names:
            raise ValueError(f"upload {index} has parameters {sorted(upload)}, upload 0 has {sorted(names)}")
        for name in names:
            if upload[name].shape != uploads[0][name].shape:
                raise ValueError(f"upload {index}'s {name} has shape {tuple(upload[name].shape)}, "
                                 f"upload 0's {tuple(uploads[0][name].shape)}")
    return {name: torch.stack([upload[name] for upload in uploads]).mean(dim=0) for name in names}


def update_as_gradient(update: dict[str, torch.Tensor], *, lr: float, steps: int) -> dict[str, torch.Tensor]:
    """−Δθ / (lr · steps): the mean gradient of a local update's steps. With one step it is the
    batch gradient itself; with several, the per-step gradients at the moving weights averaged —
    what a gradient-only tool (label-count recovery over batch × steps labels) can read from an
    upload."""
    _check_lr(lr)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ParamsError(f"fedavg: steps must be a positive integer, got {steps!r}")
    return {name: value / (-lr * steps) for name, value in update.items()}


def simulate_local_update(net: nn.Module, state_params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                          dummy_images: torch.Tensor, dummy_labels: torch.Tensor, *, steps: int, batch: int,
                          lr: float, label_logits: bool = True) -> dict[str, torch.Tensor]:
    """The attacker's simulation of `local_update` from dummies: the same schedule of `steps` SGD
    steps from `state_params` (the trainable weights the server sent; `frozen` the rest and the
    buffers, as `threat.trainable_state` splits them), unrolled so the returned Δθ is
    differentiable w.r.t. the dummy images (and soft labels) — the multi-step attack of
    Inverting Gradients. Each step's gradient is `torch.func.grad` of the client loss, so the
    result composes with autograd and with `torch.func.grad`/`vmap` over victims (dummies
    (N, data, C, H, W)); stochastic modules then need `vmap(..., randomness="different")`.

    `dummy_labels`: class indices (data,), or float label logits (data, classes) whose softmax
    is the soft target (DLG's parametrisation); with `label_logits=False` float labels are the
    soft targets (probabilities) themselves. Given the true images and labels (and the same
    global random stream for stochastic modules) it reproduces the undefended `local_update`."""
    _check_batch(dummy_images, dummy_labels)
    _check_lr(lr)
    schedule = local_batches(dummy_images.shape[0], steps=steps, batch=batch).to(dummy_images.device)
    targets = dummy_labels.softmax(-1) if dummy_labels.is_floating_point() and label_logits else dummy_labels

    def step_gradient(state, step_images, step_targets):
        return torch.func.grad(lambda p: client_loss(net, {**p, **frozen}, step_images, step_targets,
                                                     update_running_stats=False))(state)

    return _sgd_update(net, state_params, dummy_images, targets, schedule, lr, step_gradient)


def simulate_batch_gradient(net: nn.Module, params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                            dummy_images: torch.Tensor, dummy_labels: torch.Tensor, wanted: list[str], *,
                            clients: int = 1) -> dict[str, torch.Tensor]:
    """The attacker's simulation of `batch_gradient` from dummies (B, C, H, W) and labels (B,) or
    soft labels (B, classes) as probabilities: the gradient of the client loss, for the entries
    `wanted` of `params` only (the others held with `frozen`). With `clients` = K > 1 the dummies
    are K clients' batches, one after another, and the result is the mean of their K gradients
    (secure aggregation of `gradient` uploads): one gradient of the mean of K forwards, so batch
    norms see each client's batch alone. Differentiable and vmappable."""
    kept = {name: params[name] for name in wanted}
    rest = {name: value for name, value in params.items() if name not in kept}
    rest.update(frozen)
    if clients == 1:
        return torch.func.grad(lambda p: client_loss(net, {**p, **rest}, dummy_images, dummy_labels,
                                                     update_running_stats=False))(kept)
    images = dummy_images.chunk(clients)
    labels = dummy_labels.chunk(clients)

    def mean_loss(p):
        state = {**p, **rest}
        return sum(client_loss(net, state, x, y, update_running_stats=False) for x, y in zip(images, labels)) / clients

    return torch.func.grad(mean_loss)(kept)
