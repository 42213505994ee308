"""What the server sees: the client step that produces a shared gradient, and the attack target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
    step's gradient with its own `client_gradient(net, images, labels, generator)` (DP-SGD);
    its upload transform still applies to what is uploaded, as in every protocol."""
    custom = getattr(defense, "client_gradient", None)
    if custom is not None:
        gradient = custom(net, images, labels, generator)
    else:
        params, frozen = trainable_state(net)
        gradient = torch.func.grad(lambda p: client_loss(net, {**p, **frozen}, images, labels,
                                                                update_running_stats=False))(params)
    return defense.transform_gradient(gradient, generator)


def shared_gradients(net: nn.Module, defense, images: torch.Tensor, labels: torch.Tensor,
                     seed: int = 0, *, seeds: Sequence[int] | None = None, client=None) -> dict[str, torch.Tensor]:
    """Each victim's upload as the server sees it, stacked (N, ...). Without a `client`, a
    training step's gradient on each image alone (the paper's threat model); with one, victim i
    holds rows i·M … i·M + M − 1 of `images` (M = client.images_per_victim()) and uploads
    `client.victim_upload` of them. Victim i's randomness comes from its own seed alone —
    seeds[i], or seed * 100_003 + i — so its upload is the same in any batch: its stochastic
    modules draw from its "upload" stream (`gileak.noise`), one sample per image in every
    forward of its step(s), and a defense's transform gets a generator seeded by it."""
    from gileak.noise import VictimStreams

    per_image = 1 if client is None else client.images_per_victim()
    if images.shape[0] % per_image:
        raise ValueError(f"{images.shape[0]} images cannot be split into victims of {per_image}")
    count = images.shape[0] // per_image
    if seeds is None:
        seeds = [seed * 100_003 + index for index in range(count)]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} victims")
    per_victim = []
    for index, victim_seed in enumerate(seeds):
        generator = torch.Generator(device="cpu").manual_seed(int(victim_seed))
        torch.manual_seed(int(victim_seed))  # modules that still sample from the global stream (dropout)
        rows = slice(index * per_image, (index + 1) * per_image)
        streams = VictimStreams([victim_seed], "upload")
        if client is None:
            with streams.rows([0]):
                per_victim.append(client_gradient(net, defense, images[rows], labels[rows], generator))
        else:
            with streams.victim(0):
                per_victim.append(client.victim_upload(net, defense, images[rows], labels[rows], generator))
    return {name: torch.stack([g[name] for g in per_victim]) for name in per_victim[0]}


def nothing_to_attack(shared_gradient: dict[str, torch.Tensor], victim_names: list[str] | None = None) -> str | None:
    """Why these stacked (N, ...) shared gradients cannot be attacked, or None when they can: a
    victim whose gradient is all zeros uploads nothing about its image (a one-output classifier,
    a defense that prunes everything, a saturated softmax), and one with a NaN or infinite entry
    (a defense's noise beyond float range) makes every distance to it meaningless. Either way an
    attack would fail and its low score would read as privacy. `victim_names` name the victims
    in the reason (default: their positions)."""
    tensors = [t.detach() for t in shared_gradient.values()]
    if not tensors or all(t.numel() == 0 for t in tensors):
        return "nothing to attack: the model has no trainable parameters, so no gradient is shared"
    count = tensors[0].shape[0]
    names = victim_names or [str(i) for i in range(count)]
    flat = [t.reshape(count, -1) for t in tensors if t.numel()]
    non_finite = torch.stack([(~torch.isfinite(t)).any(1) for t in flat]).any(0).tolist()
    zero = torch.stack([(t == 0).all(1) for t in flat]).all(0).tolist()
    # Every gradient distance (cosine, Euclidean) sums squares in the gradient's own precision:
    # past its range the distance is inf or NaN, or a constant, and an attack "runs" on nothing.
    squared_norm = torch.stack([t.double().pow(2).sum(1) for t in flat]).sum(0)
    limit = min(torch.finfo(t.dtype).max if t.is_floating_point() else math.inf for t in flat)
    too_large = (squared_norm > limit).tolist()
    problems = []
    bad = [names[i] for i in range(count) if non_finite[i]]
    if bad:
        problems.append(f"the shared gradient of victim {listed_victims(bad)} has NaN or infinite entries (a defense's "
                        "noise or a model beyond float range?)")
    huge = [names[i] for i in range(count) if too_large[i] and not non_finite[i]]
    if huge:
        problems.append(f"the shared gradient of victim {listed_victims(huge)} is too large to compare: its squared norm "
                        f"exceeds the float range ({limit:.3g}), so no gradient distance can be computed (a "
                        "defense's noise beyond float range?)")
    empty = [names[i] for i in range(count) if zero[i] and not non_finite[i]]
    if empty:
        problems.append(f"the shared gradient of victim {listed_victims(empty)} is all zeros (a classifier with one "
                        "output, a defense that removes everything, or a saturated prediction)")
    return "nothing to attack: " + "; ".join(problems) if problems else None


def listed_victims(names: list[str], shown: int = 5) -> str:
    """'3, 17, 40' — the first `shown` victim names, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


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
    #: The protocol that produced each upload (a `gileak.base.Client`); None: the paper's
    #: single-image gradient. Labels (and reconstructions) are listed victim by victim,
    #: `images_per_victim` each.
    client: Any = None

    def __post_init__(self) -> None:
        if not self.params:
            self.params, self.frozen = trainable_state(self.net)

    @property
    def num_victims(self) -> int:
        return next(iter(self.shared_gradient.values())).shape[0]

    @property
    def images_per_victim(self) -> int:
        """Images behind each upload, all to be reconstructed (1 in the paper's threat model)."""
        return 1 if self.client is None else self.client.images_per_victim()

    def shared_in_gradient_units(self) -> dict[str, torch.Tensor]:
        """Each victim's upload in gradient units (`Client.to_gradient`): what attacks match and
        label recovery reads (a local update −Δθ/(lr·steps); a gradient as it is)."""
        if self.client is None:
            return self.shared_gradient
        return self.client.to_gradient(self.shared_gradient)

    def simulate(self, params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], images: torch.Tensor,
                 labels: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        """The attacker's simulation of ONE victim's upload in gradient units from its dummies
        (M, C, H, W) and labels (M,) or probabilities (M, classes): the entries `wanted`.
        Differentiable and vmappable over victims."""
        if self.client is None:
            from gileak.uploads import simulate_batch_gradient

            return simulate_batch_gradient(self.net, params, frozen, images, labels, wanted)
        return self.client.simulate_victim(self.net, params, frozen, images, labels, wanted)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def loss(self, state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor):
        return client_loss(self.net, state, images, labels, update_running_stats=False)
