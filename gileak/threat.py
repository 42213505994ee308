"""What the server sees: the client step that produces a shared gradient, and the attack target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gileak.nets import aux_loss, batch_statistics_only


def client_loss(net: nn.Module, state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                *, update_running_stats: bool = True):
    """The loss a client trains on: cross-entropy plus the defense's terms (β·KL), with the
    model's parameters and buffers taken from `state`. Batch norms in training mode use the
    batch's statistics either way; `update_running_stats=False` (a victim's step as the server
    sees it, and every attack's dummy step) leaves their running statistics alone, while
    federated training updates them."""
    if update_running_stats:
        logits = functional_call(net, state, (images,))
    else:
        with batch_statistics_only(net):
            logits = functional_call(net, state, (images,))
    return F.cross_entropy(logits, labels) + aux_loss(net)


def trainable_state(net: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable parameters, everything else: frozen parameters and buffers), detached. Buffers
    are copies, so a forward that still updates batch-norm running statistics through this state
    (an attack's own functional call in training mode) cannot change the model's."""
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in net.named_parameters() if not p.requires_grad}
    frozen.update({n: b.detach().clone() for n, b in net.named_buffers()})
    return params, frozen


def client_gradient(net: nn.Module, defense, images: torch.Tensor, labels: torch.Tensor,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One training step's gradient on (images, labels) as the client would upload it: the
    training loss's gradient, then the defense's upload transform. A defense may replace the
    whole step with its own `client_gradient(net, images, labels, generator)` (DP-SGD)."""
    custom = getattr(defense, "client_gradient", None)
    if custom is not None:
        return custom(net, images, labels, generator)
    params, frozen = trainable_state(net)
    gradient = torch.func.grad(lambda p: client_loss(net, {**p, **frozen}, images, labels,
                                                            update_running_stats=False))(params)
    return defense.transform_gradient(gradient, generator)


def shared_gradients(net: nn.Module, defense, images: torch.Tensor, labels: torch.Tensor,
                     seed: int = 0, *, seeds: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Each victim's shared gradient from a training step on that image alone, stacked (N, ...).
    Victim i's randomness comes from its own seed alone — seeds[i], or seed * 100_003 + i — so
    its gradient is the same in any batch: its stochastic modules draw from its "upload" stream
    (`gileak.noise`), a defense's transform gets a generator seeded by it."""
    from gileak.noise import VictimStreams

    if seeds is None:
        seeds = [seed * 100_003 + index for index in range(images.shape[0])]
    if len(seeds) != images.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {images.shape[0]} victims")
    per_victim = []
    for index, victim_seed in enumerate(seeds):
        generator = torch.Generator(device="cpu").manual_seed(int(victim_seed))
        torch.manual_seed(int(victim_seed))  # modules that still sample from the global stream (dropout)
        with VictimStreams([victim_seed], "upload").rows([0]):
            per_victim.append(client_gradient(net, defense, images[index : index + 1], labels[index : index + 1],
                                              generator))
    return {name: torch.stack([g[name] for g in per_victim]) for name in per_victim[0]}


@dataclass
class Target:
    """Everything an honest-but-curious server knows when it attacks: the model and its weights,
    the loss, each victim's shared gradient, and the labels when the threat model grants them."""

    net: nn.Module
    shared_gradient: dict[str, torch.Tensor]
    input_shape: tuple[int, int, int]
    num_classes: int
    labels: torch.Tensor | None = None
    pixel_range: tuple[float, float] = (0.0, 1.0)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Asked by `--trace`: attacks that can, record per-layer gradient similarity per iteration.
    trace: bool = False

    def __post_init__(self) -> None:
        if not self.params:
            self.params, self.frozen = trainable_state(self.net)

    @property
    def num_victims(self) -> int:
        return next(iter(self.shared_gradient.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def loss(self, state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor):
        return client_loss(self.net, state, images, labels, update_running_stats=False)
