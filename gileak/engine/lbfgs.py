"""The L-BFGS family (DLG, iDLG, CPL): Euclidean gradient matching with L-BFGS.

L-BFGS keeps curvature pairs and runs a line search per victim, so victims are solved one
after another (a vmapped L-BFGS would not be the same algorithm); each victim's randomness
still comes from its own seed only, so attacking it alone gives the same result."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from gileak.base import Reconstruction
from gileak.engine.matching import MatchingConfig, initial_images, make_victim_loss, minmax_scale
from gileak.threat import Target


@dataclass
class LBFGSConfig:
    distance: str = "euclidean"
    lr: float = 1.0
    history: int = 100
    line_search: bool = True  # strong-Wolfe line search; DLG's original takes plain lr=1 steps
    keep: tuple[str, ...] | None = None
    optimise_labels: bool = False  # DLG: dummy label logits optimised jointly with the image
    label_weight: float = 0.0  # CPL: weight of ||softmax(F(x')) - onehot(y)||^2
    tv_weight: float = 0.0
    min_loss: float = 1e-9
    minmax: bool = True


def lbfgs_matching(
    target: Target,
    config: LBFGSConfig,
    *,
    seeds: list[int],
    max_iterations: int,
    labels: torch.Tensor | None,
    progress: Callable[[int], None] | None = None,
) -> Reconstruction:
    """Reconstruct every victim by L-BFGS on the gradient distance (+ CPL's label term)."""
    device = target.device
    num_victims = target.num_victims
    if len(seeds) != num_victims:
        raise ValueError(f"{len(seeds)} seeds for {num_victims} victims")
    if labels is None and not config.optimise_labels:
        raise ValueError("labels are needed unless they are optimised")
    matching = MatchingConfig(distance=config.distance, tv_weight=config.tv_weight, keep=config.keep)
    victim_loss = make_victim_loss(target, matching)
    shared = [tuple(target.shared_gradient[n][i].to(device) for n in victim_loss.names) for i in range(num_victims)]
    state = {**target.params, **target.frozen}

    images, found_labels, iterations, best_losses = [], [], [], []
    reported = 0
    for i, seed in enumerate(seeds):
        torch.manual_seed(int(seed))  # stochastic modules sample from the global stream
        image = initial_images(target.input_shape, [seed], "randn", device)[0].requires_grad_(True)
        variables = [image]
        if config.optimise_labels:
            generator = torch.Generator().manual_seed(int(seed) + 1)
            label_logits = torch.randn(target.num_classes, generator=generator).to(device).requires_grad_(True)
            variables.append(label_logits)
        optimizer = torch.optim.LBFGS(variables, lr=config.lr, max_iter=1, history_size=config.history,
                                      line_search_fn="strong_wolfe" if config.line_search else None)

        def current_label():
            if config.optimise_labels:
                return label_logits.softmax(-1)
            return labels[i].to(device)

        def closure():
            optimizer.zero_grad()
            total, _ = victim_loss(image, current_label(), shared[i])
            if config.label_weight:
                logits = functional_call(target.net, state, (image.unsqueeze(0),))
                onehot = F.one_hot(labels[i].to(device), target.num_classes).float()
                total = total + config.label_weight * (logits.softmax(-1)[0] - onehot).pow(2).sum()
            total.backward()
            return total

        best, best_image, done = math.inf, image.detach().clone(), 0
        for _ in range(max_iterations):
            before = image.detach().clone()
            loss = float(optimizer.step(closure).detach())  # the loss of `before`, not of the new image
            done += 1
            if math.isfinite(loss) and loss < best:
                best, best_image = loss, before
            if not math.isfinite(loss) or not torch.isfinite(image).all() or loss < config.min_loss:
                break
        images.append(best_image)
        iterations.append(done)
        best_losses.append(best)
        found_labels.append(current_label().argmax(-1) if config.optimise_labels else labels[i].to(device))
        if progress is not None:  # the runner counts max_iterations units per attack
            share = (i + 1) * max_iterations // num_victims
            progress(share - reported)
            reported = share

    final = torch.stack(images)
    final = minmax_scale(final) if config.minmax else final.clamp(*target.pixel_range)
    return Reconstruction(images=final.detach().cpu(), iterations=iterations, final_loss=best_losses,
                          labels=torch.stack(found_labels).cpu())
