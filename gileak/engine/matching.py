"""Gradient matching for many independent victims at once with torch.func.

Each victim i has its own dummy image — a batch of M dummies when its client holds M images
(`Target.images_per_victim`), matched jointly — its own Adam state, learning rate, plateau
schedule and stopping; per-victim simulated uploads come from `vmap` over `grad` of the
client's simulation (`Target.simulate`: one gradient on the batch, or the unrolled local steps
of fedavg), so victim i's trajectory depends only on its own seed and upload, batched or alone —
the noise of a stochastic model too, drawn from the victim's own stream (`gileak.noise`), one
sample per image. Where the
model allows it (Conv2d / Linear stacks, with or without the variational bottlenecks), the
factored fast path of `gileak.engine.fast` computes the same per-victim losses and image
gradients from per-layer factors instead of vmap; `MatchingConfig.factored=False` or any other
model uses vmap, and `vectorized=False` the plain per-victim loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad_and_value, vmap

from gileak.base import GradientTrace, Reconstruction
from gileak.engine.schedule import PerVictimAdam, make_schedule
from gileak.noise import VictimStreams, predrawn, record_draws
from gileak.threat import Target


@dataclass
class MatchingConfig:
    """The knobs of an Inverting-Gradients-style attack (defaults: the paper's protocol)."""

    distance: str = "cosine"  # "cosine" (IG) or "euclidean" (DLG)
    tv_weight: float = 0.01
    lr: float = 1.0
    signed: bool = True  # Adam on the sign of the image gradient, as the authors' code does
    #: "plateau": lr x plateau_factor after plateau_patience iterations without a better loss (the
    #: paper's); "step" / "cosine": lr set by the iteration's place in the budget (engine.schedule).
    schedule: str = "plateau"
    plateau_patience: int = 400
    plateau_factor: float = 0.1
    stop_patience: int = 4000
    min_loss: float = 1e-5
    init: str = "randn"
    keep: tuple[str, ...] | None = None  # parameter names whose gradients are matched; None = all
    minmax: bool = True  # attacker-side post-processing: scale each reconstruction to [0, 1]
    trace: bool = False  # record the per-layer cosine(dummy, shared gradient) of every iteration
    vectorized: bool = True  # False: a plain per-victim loop (the reference the tests compare to)
    #: With `vectorized`, use the factored fast path (gileak.engine.fast) where the model allows
    #: it; False (or an unsupported model) uses vmap(grad(...)).
    factored: bool = True


def victim_shape(target: Target) -> tuple[int, ...]:
    """The shape of one victim's dummies: (C, H, W), or (M, C, H, W) when it holds M > 1 images."""
    per_victim = target.images_per_victim
    return tuple(target.input_shape) if per_victim == 1 else (per_victim, *target.input_shape)


def victim_labels(target: Target, labels: torch.Tensor) -> torch.Tensor:
    """Labels listed image by image (N·M,) as (N, M) per victim; (N,) when M = 1."""
    per_victim = target.images_per_victim
    return labels if per_victim == 1 else labels.reshape(-1, per_victim)


def as_images(target: Target, images: torch.Tensor) -> torch.Tensor:
    """Per-victim dummies (N, *victim_shape) listed image by image, (N·M, C, H, W)."""
    return images.reshape(-1, *target.input_shape)


def image_rows(victims: list[int], per_victim: int) -> list[int]:
    """The victim of each row of a batched forward of the victims' images, M rows each: the
    rows a factored engine's forward hands `gileak.noise.VictimStreams.rows`."""
    return [victim for victim in victims for _ in range(per_victim)]


def minmax_scale(images: torch.Tensor) -> torch.Tensor:
    """Each image scaled to [0, 1] by its own min and max: attacker-side post-processing, as the
    paper authors' code does before scoring; it uses no ground truth."""
    flat = images.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (images.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (images.dim() - 1)))
    return (images - lo) / (hi - lo).clamp(min=1e-12)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().mean()
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean()
    return dx + dy


def initial_images(shape: tuple[int, ...], seeds: list[int], init: str, device) -> torch.Tensor:
    """Victim i's starting dummy comes from seeds[i] alone."""
    images = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if init == "randn":
            image = torch.randn(shape, generator=generator)
        elif init == "rand":
            image = torch.rand(shape, generator=generator)
        else:
            raise ValueError(f"Unknown init '{init}' (use randn or rand)")
        images.append(image)
    return torch.stack(images).to(device)


def layer_groups(target: Target) -> dict[str, list[str]]:
    """Trainable parameters grouped by the module that owns them, in forward order."""
    from gileak.nets import forward_order

    order = [n for n in forward_order(target.net, target.input_shape) if n in target.params]
    order += [n for n in target.params if n not in order]
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return groups


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    dot = sum((x * y).sum() for x, y in zip(a, b))
    norm_a = sum(x.pow(2).sum() for x in a).sqrt()
    norm_b = sum(y.pow(2).sum() for y in b).sqrt()
    return dot / (norm_a * norm_b + 1e-12)


def make_victim_loss(target: Target, config: MatchingConfig) -> Callable:
    """loss(images, labels, shared_gradient_tuple) -> (total, aux) for ONE victim: its dummies
    (`victim_shape`), labels (M,) (a scalar when M = 1) or label probabilities (M, classes)
    ((classes,) when M = 1), and its upload in gradient units; aux holds the gradient distance
    and, when tracing, the per-layer cosine similarities (one per layer of
    `victim_loss.layers`). `shared_gradient_tuple` follows `victim_loss.names`."""
    names = list(config.keep) if config.keep is not None else list(target.params)
    groups = layer_groups(target) if config.trace else {}
    # The dummy gradient is taken for the matched parameters only, or for all when tracing.
    wanted = list(dict.fromkeys(names + [n for g in groups.values() for n in g]))

    def dummy_gradient(images, labels):
        if images.dim() == len(target.input_shape):  # one image (the paper's client)
            images, labels = images.unsqueeze(0), labels.unsqueeze(0)
        return target.simulate(target.params, target.frozen, images, labels, wanted)

    def victim_loss(image, label, shared):
        dummy = dummy_gradient(image, label)
        by_name = dict(zip(wanted, shared))
        dummy_flat = [dummy[n] for n in names]
        shared_flat = [by_name[n] for n in names]
        if config.distance == "cosine":
            reconstruction = 1 - _cosine(dummy_flat, shared_flat)
        elif config.distance == "euclidean":
            reconstruction = sum((d - s).pow(2).sum() for d, s in zip(dummy_flat, shared_flat))
        else:
            raise ValueError(f"Unknown distance '{config.distance}'")
        total = reconstruction + config.tv_weight * total_variation(image) if config.tv_weight else reconstruction
        if groups:
            cosines = torch.stack([_cosine([dummy[n] for n in g], [by_name[n] for n in g]) for g in groups.values()])
            return total, (reconstruction, cosines.detach())
        return total, (reconstruction,)

    victim_loss.names = wanted  # type: ignore[attr-defined]
    victim_loss.matched = names  # type: ignore[attr-defined]
    victim_loss.groups = groups  # type: ignore[attr-defined]
    modules = dict(target.net.named_modules())
    victim_loss.layers = [f"{g} ({type(modules[g]).__name__})" if g in modules else g  # type: ignore[attr-defined]
                          for g in groups]
    return victim_loss


def factored_engine(target: Target, config: MatchingConfig, victim_loss: Callable):
    """The factored fast path (gileak.engine.fast) for this attack, or None where it does not
    apply (the per-victim loop, `factored=False`, or a model it does not support)."""
    if not (config.vectorized and config.factored):
        return None
    from gileak.engine.fast import FactoredMatching

    return FactoredMatching.build(target, config, victim_loss.matched, victim_loss.names, victim_loss.groups)


#: Memory the vmap engine may give to per-victim gradients at once (bytes); more victims run
#: in chunks. Measured on a 2-core CPU: ResNet-18 exhausted 24 GiB at 128 victims unchunked, and
#: the ViT ran 3x slower at 128 victims than at 32 (memory-bound), so chunks also help speed.
VMAP_MEMORY = 2 * 1024**3
#: Parameter-sized tensors a victim's double-backward step holds at its peak (gradient, its
#: graph, the second backward's buffers), as observed with the models here.
VMAP_COPIES = 6


#: On a GPU the budget is this share of its memory where that is more than VMAP_MEMORY (2 GiB
#: chunks of 7 ResNet-18 victims would leave an H200's 139 GiB idle; not yet measured there).
VMAP_GPU_SHARE = 0.25


def vmap_chunk(target: Target, num_victims: int) -> int | None:
    """Victims per vmap chunk: as many as `VMAP_MEMORY` allows — on a GPU `VMAP_GPU_SHARE` of
    its memory where that is more — (None: all at once)."""
    per_victim = VMAP_COPIES * sum(p.numel() * p.element_size() for p in target.params.values())
    budget = VMAP_MEMORY
    if target.device.type == "cuda":
        total = torch.cuda.get_device_properties(target.device).total_memory
        budget = max(budget, int(VMAP_GPU_SHARE * total))
    chunk = max(1, budget // max(per_victim, 1))
    return None if chunk >= num_victims else int(chunk)


def gradient_matching(
    target: Target,
    config: MatchingConfig,
    *,
    seeds: list[int],
    max_iterations: int,
    labels: torch.Tensor,
    progress: Callable[[int], None] | None = None,
) -> Reconstruction:
    """Reconstruct all of target's victims by matching their shared gradients."""
    from gileak.engine import choice

    config = choice.applied(config)  # an engine the runner chose (gileak.engine.choice)
    device = target.device
    num_victims = target.num_victims
    if len(seeds) != num_victims:
        raise ValueError(f"{len(seeds)} seeds for {num_victims} victims")
    victim_loss = make_victim_loss(target, config)
    uploads = target.shared_in_gradient_units()
    shared = tuple(uploads[n].to(device) for n in victim_loss.names)
    labels = victim_labels(target, labels.to(device))
    low, high = target.pixel_range

    images = initial_images(victim_shape(target), seeds, config.init, device)
    best_images = images.clone()
    lr = torch.full((num_victims,), float(config.lr), device=device)
    adam = PerVictimAdam(lr)
    schedule = make_schedule(config.schedule, num_victims, lr=float(config.lr), total=max_iterations,
                             plateau_patience=config.plateau_patience, plateau_factor=config.plateau_factor,
                             stop_patience=config.stop_patience, min_loss=config.min_loss, device=device)
    active = torch.ones(num_victims, dtype=torch.bool, device=device)
    iterations = torch.zeros(num_victims, dtype=torch.long, device=device)

    trace_rows: list[torch.Tensor] = []
    step = grad_and_value(victim_loss, has_aux=True)
    # Victim i's noise (stochastic modules in training mode) comes from its own stream: under
    # vmap pre-drawn per victim and handed in, elsewhere drawn row by row (gileak.noise).
    streams = VictimStreams(seeds, "attack")
    everyone = list(range(num_victims))
    fast = factored_engine(target, config, victim_loss)
    choice.record(("chain" if fast.chain is not None else "factored") if fast is not None
                  else "vmap" if config.vectorized else "loop")
    draws: list = []
    if fast is None and config.vectorized:
        draws = record_draws(step, images[0], labels[0], tuple(s[0] for s in shared))

    def noisy_step(image, label, shared_gradient, noise):
        with predrawn(noise, [kind for kind, _, _ in draws]):
            return step(image, label, shared_gradient)

    batched_step = vmap(noisy_step, randomness="different", chunk_size=vmap_chunk(target, num_victims))

    for _ in range(max_iterations):
        if not bool(active.any()):
            break
        if fast is not None:
            # Stopped victims are left out of the work; their rows are ignored below.
            index = None if bool(active.all()) else active.nonzero().squeeze(1)
            with streams.rows(image_rows(everyone if index is None else index.tolist(), target.images_per_victim)):
                part_grads, part_losses, part_cosines = fast.step(images, labels, shared, index)
            if index is None:
                image_grads, losses, cosines = part_grads, part_losses, part_cosines
            else:
                image_grads = torch.zeros_like(images).index_copy(0, index, part_grads)
                losses = torch.zeros(num_victims, device=device).index_copy(0, index, part_losses)
                cosines = None
                if part_cosines is not None:
                    cosines = torch.full((num_victims, part_cosines.shape[1]), float("nan"),
                                         device=device).index_copy(0, index, part_cosines)
        elif config.vectorized:
            noise = streams.predraw(everyone, draws, device)
            image_grads, (losses, aux) = batched_step(images, labels, shared, noise)
            cosines = aux[1] if config.trace else None
        else:
            results = []
            for i in range(num_victims):
                if not active[i]:
                    results.append(None)
                    continue
                with streams.victim(i):
                    results.append(step(images[i], labels[i], tuple(s[i] for s in shared)))
            image_grads = torch.stack([r[0] if r is not None else torch.zeros_like(images[i]) for i, r in enumerate(results)])
            losses = torch.stack([r[1][0] if r is not None else torch.zeros((), device=device) for r in results])
            cosines = None
            if config.trace:
                nan = torch.full((len(victim_loss.layers),), float("nan"), device=device)
                cosines = torch.stack([r[1][1][1] if r is not None else nan for r in results])
        if cosines is not None:  # a stopped victim's row is NaN: it no longer moves
            trace_rows.append(torch.where(active.view(-1, 1), cosines, torch.nan).cpu())
        losses = losses.detach()
        losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))

        # The loss is of the current images: remember the best before stepping away from them.
        lr_next, improved, still_active = schedule.update(losses, adam.lr, active)
        best_images = torch.where(improved.view(-1, *[1] * (images.dim() - 1)), images, best_images)
        image_grads = image_grads.detach()
        if config.signed:
            image_grads = image_grads.sign()
        images = adam.step(images, image_grads.contiguous(), active).clamp_(low, high)
        adam.lr = lr_next
        iterations = iterations + active.long()
        active = still_active
        if progress is not None:
            progress(1)

    final = as_images(target, best_images)
    if config.minmax:
        final = minmax_scale(final)
    return Reconstruction(
        images=final.detach().cpu(),
        iterations=iterations.cpu().tolist(),
        final_loss=schedule.best.cpu().tolist(),
        labels=labels.reshape(-1).cpu(),
        trace=GradientTrace(victim_loss.layers, torch.stack(trace_rows)) if config.trace and trace_rows else None,
    )
