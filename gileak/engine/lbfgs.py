"""The L-BFGS family (DLG, iDLG, CPL): Euclidean gradient matching with L-BFGS.

Each victim is solved by L-BFGS exactly as `torch.optim.LBFGS(max_iter=1, history_size=history,
line_search_fn="strong_wolfe" or None)` would solve it alone, one `step` per iteration, but all
victims at once (`LBFGSConfig.vectorized`, the default): the per-victim losses and gradients of
every round come from ONE batched call of the engine IG uses (the factored fast path of
`gileak.engine.fast` where the model allows it and the labels are fixed, else chunked
`vmap(grad_and_value(...), randomness="different")`), and the L-BFGS bookkeeping — curvature
pairs in a per-victim ring buffer, the two-loop recursion, the step length, the line search —
runs as tensor operations over the victims, each victim keeping its own history, step and
stopping. `vectorized=False` is the reference: a plain loop of torch.optim.LBFGS per victim.

What `torch.optim.LBFGS.step` does with max_iter=1 (torch 2.x, `torch/optim/lbfgs.py`):

* evaluate f(x), g(x); stop there (no state change) when max|g| <= tolerance_grad (1e-7);
* on its first iteration d = -g, t = min(1, 1/|g|_1) lr; later: y = g - g_prev, s = d_prev t_prev,
  the pair (y, s, 1/ys) is stored when ys > 1e-10 (FIFO of `history`) and H_diag = ys / yy, then
  d = the two-loop recursion on -g, t = lr;
* stop there (t and d kept) when g.d > -tolerance_change (1e-9);
* line search: max_eval defaults to max_iter * 5 // 4 = 1, so `_strong_wolfe` gets max_ls =
  max_eval - 1 = 0: it evaluates the trial point x + t d once, finds its bracketing loop and
  its zoom loop both empty and returns the lower of [f(x), f(x + t d)] — t if f(x + t d) < f(x)
  (or is NaN), else 0 (x + 0 d). That is the whole search: one extra evaluation per iteration;
* without line search: x += t d and no evaluation (max_iter = 1 is the last iteration).

For a deterministic model the gradient at the trial point is the one the next `step` starts
from (x + t d is the same float operation both times), and a rejected step (t = 0) leaves x
where it was; so the batched solver evaluates each victim ONCE per iteration and reuses that
evaluation where torch evaluates twice. For the same reason a victim that does not move — max|g| <=
1e-7 or g.d > -1e-9 at any step, or its step rejected at any step but its first (whose t is
at most lr) — would repeat that step unchanged until the end: it is held there, its
iterations counted, without evaluations. A model with stochastic modules in training mode (a
variational bottleneck, dropout) is evaluated afresh at x every iteration, as torch does; its
victims draw independent noise (vmap randomness="different"), so there the results follow the
reference only in distribution. Victims attacked together or alone get the same result (up to
float summation order) with a deterministic model: nothing couples them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gileak.base import Reconstruction
from gileak.engine.matching import (MatchingConfig, factored_engine, initial_images, make_victim_loss, minmax_scale,
                                    vmap_chunk)
from gileak.nets import batch_statistics_only, is_stochastic
from gileak.threat import Target

#: torch.optim.LBFGS's defaults, which the reference loop uses.
TOLERANCE_GRAD = 1e-7
TOLERANCE_CHANGE = 1e-9
#: Memory the batched solver may give to the victims' curvature histories at once (bytes); more
#: victims run in groups, one after another (each victim's result does not depend on its group).
HISTORY_MEMORY = 2 * 1024**3

#: What the last batched run did, for tests and benchmarks: engine ("factored" or "vmap"),
#: evaluations (victim-evaluations of loss and gradient), iterations (victim-iterations run),
#: calls (batched engine calls), groups.
last_run: dict = {}


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
    #: All victims in one batched L-BFGS (each exactly torch.optim.LBFGS's); False: the reference,
    #: a per-victim loop of torch.optim.LBFGS.
    vectorized: bool = True


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
    if len(seeds) != target.num_victims:
        raise ValueError(f"{len(seeds)} seeds for {target.num_victims} victims")
    if labels is None and not config.optimise_labels:
        raise ValueError("labels are needed unless they are optimised")
    if config.vectorized:
        return _lbfgs_batched(target, config, seeds=seeds, max_iterations=max_iterations, labels=labels,
                              progress=progress)
    return _lbfgs_loop(target, config, seeds=seeds, max_iterations=max_iterations, labels=labels,
                       progress=progress)


def _lbfgs_loop(
    target: Target,
    config: LBFGSConfig,
    *,
    seeds: list[int],
    max_iterations: int,
    labels: torch.Tensor | None,
    progress: Callable[[int], None] | None = None,
) -> Reconstruction:
    """The reference: each victim in turn, torch.optim.LBFGS with max_iter=1 per iteration."""
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


# ---------------------------------------------------------------------------------- batched


def _stochastic(net: nn.Module) -> bool:
    """Whether a forward draws randomness: a stochastic module or dropout in training mode."""
    for module in net.modules():
        if not module.training:
            continue
        if is_stochastic(module):
            return True
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
    return False


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (n, D) tensors."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _Evaluator:
    """Per-victim losses and gradients (w.r.t. each victim's flat variables: the image, then
    DLG's label logits) for any subset of one group's victims, in one batched call."""

    def __init__(self, target: Target, config: LBFGSConfig, labels: torch.Tensor | None) -> None:
        self.target = target
        self.config = config
        device = target.device
        self.shape = tuple(target.input_shape)
        self.pixels = math.prod(self.shape)
        matching = MatchingConfig(distance=config.distance, tv_weight=config.tv_weight, keep=config.keep)
        self.victim_loss = make_victim_loss(target, matching)
        self.state = {**target.params, **target.frozen}
        num_victims = target.num_victims
        self.labels = (labels.to(device) if labels is not None
                       else torch.zeros(num_victims, dtype=torch.long, device=device))
        self.onehot = F.one_hot(self.labels, target.num_classes).float()
        # The factored engine needs fixed labels; CPL's label term is added by a plain batched
        # forward (every model the factored engine supports acts on each sample alone).
        self.fast = None if config.optimise_labels else factored_engine(target, matching, self.victim_loss)
        self.engine = "factored" if self.fast is not None else "vmap"
        self.batched = vmap(grad_and_value(self._objective), randomness="different",
                            chunk_size=vmap_chunk(target, num_victims))
        self.calls = 0
        self.evaluations = 0

    def group(self, ids: torch.Tensor) -> None:
        """Work on the victims `ids` (their shared gradients, labels) from now on."""
        device = self.target.device
        self.ids = ids
        self.shared = tuple(self.target.shared_gradient[n].to(device)[ids] for n in self.victim_loss.names)
        self.group_labels = self.labels[ids]
        self.group_onehot = self.onehot[ids]

    def _objective(self, flat, label, onehot, shared):
        """One victim's total loss, as the reference loop's closure computes it."""
        config = self.config
        image = flat[: self.pixels].view(self.shape)
        current = flat[self.pixels:].softmax(-1) if config.optimise_labels else label
        total, _ = self.victim_loss(image, current, shared)
        if config.label_weight:
            with batch_statistics_only(self.target.net):
                logits = functional_call(self.target.net, self.state, (image.unsqueeze(0),))
            total = total + config.label_weight * (logits.softmax(-1)[0] - onehot).pow(2).sum()
        return total

    def _label_term(self, images: torch.Tensor, onehot: torch.Tensor):
        """CPL's label term and its image gradient for a batch of victims (factored path)."""
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            with batch_statistics_only(self.target.net):
                logits = functional_call(self.target.net, self.state, (x,))
            term = self.config.label_weight * (logits.softmax(-1) - onehot).pow(2).sum(1)
            (grads,) = torch.autograd.grad(term.sum(), x)
        return term.detach(), grads

    def __call__(self, points: torch.Tensor, index: torch.Tensor | None):
        """(losses (n,), gradients (n, D)) at `points` (the group's (N, D) tensor) for the
        victims `index` of the group (None: all)."""
        self.calls += 1
        self.evaluations += points.shape[0] if index is None else index.numel()
        if self.fast is not None:
            images = points.view(-1, *self.shape)
            grads, losses, _ = self.fast.step(images, self.group_labels, self.shared, index)
            grads, losses = grads.reshape(grads.shape[0], -1), losses.detach()
            if self.config.label_weight:
                onehot = self.group_onehot if index is None else self.group_onehot[index]
                term, term_grads = self._label_term(images if index is None else images[index], onehot)
                losses = losses + term
                grads = grads + term_grads.reshape(grads.shape)
            return losses, grads.detach()
        if index is None:
            grads, losses = self.batched(points, self.group_labels, self.group_onehot, self.shared)
        else:
            grads, losses = self.batched(points[index], self.group_labels[index], self.group_onehot[index],
                                         tuple(s[index] for s in self.shared))
        return losses.detach(), grads.detach()


class _History:
    """Each victim's curvature pairs (y, s, 1/ys) — torch's FIFO of `size` pairs, the oldest
    dropped when a new one arrives — in ring buffers shared by all victims and kept aligned:
    every victim's newest pair lies in slot (pushed - 1) % size, its k-th newest in
    (pushed - 1 - k) % size, so the two-loop recursion reads one contiguous (n, D) slice per
    pair for all victims at once. A round in which some victims store a pair and others do not
    (ys <= 1e-10) advances the shared pointer; the others' rings are rotated by one slot, which
    keeps their pairs and their order."""

    def __init__(self, size: int, count: int, dim: int, device) -> None:
        self.size = size
        self.dirs = torch.zeros(size, count, dim, device=device)  # y
        self.stps = torch.zeros(size, count, dim, device=device)  # s
        self.ro = torch.zeros(size, count, device=device)
        self.lengths = torch.zeros(count, dtype=torch.long, device=device)
        self.pushed = 0  # rounds in which some victim stored a pair

    def push(self, update: torch.Tensor, y: torch.Tensor, s: torch.Tensor, ro: torch.Tensor,
             needed: torch.Tensor) -> None:
        """Store (y, s, ro) for the victims `update`; `needed`: victims whose history is still used."""
        rotate = needed & ~update & (self.lengths > 0)
        if bool(rotate.any()):
            index = rotate.nonzero().squeeze(1)
            for buffer in (self.dirs, self.stps, self.ro):
                buffer[:, index] = buffer[:, index].roll(1, dims=0)
        slot = self.pushed % self.size
        if bool(update.all()):
            self.dirs[slot] = y
            self.stps[slot] = s
            self.ro[slot] = ro
        else:
            column = update.unsqueeze(1)
            self.dirs[slot] = torch.where(column, y, self.dirs[slot])
            self.stps[slot] = torch.where(column, s, self.stps[slot])
            self.ro[slot] = torch.where(update, ro, self.ro[slot])
        self.pushed += 1
        self.lengths = torch.where(update, (self.lengths + 1).clamp(max=self.size), self.lengths)

    def direction(self, g: torch.Tensor, h_diag: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """torch's two-loop recursion, d = -H g, for every victim (meaningful for `rows`, a mask)."""
        q = g.neg()
        lengths = self.lengths
        longest = int(lengths[rows].max()) if bool(rows.any()) else 0
        al = []
        for rank in range(longest):  # newest to oldest
            slot = (self.pushed - 1 - rank) % self.size
            a = torch.where(rank < lengths, _dot(self.stps[slot], q) * self.ro[slot], 0.0)
            q.addcmul_(self.dirs[slot], a.unsqueeze(1), value=-1)
            al.append(a)
        r = q.mul_(h_diag.unsqueeze(1))
        for rank in range(longest - 1, -1, -1):  # oldest to newest
            slot = (self.pushed - 1 - rank) % self.size
            be = _dot(self.dirs[slot], r) * self.ro[slot]
            r.addcmul_(self.stps[slot], torch.where(rank < lengths, al[rank] - be, 0.0).unsqueeze(1))
        return r


def _lbfgs_batched(
    target: Target,
    config: LBFGSConfig,
    *,
    seeds: list[int],
    max_iterations: int,
    labels: torch.Tensor | None,
    progress: Callable[[int], None] | None = None,
) -> Reconstruction:
    """All victims at once, each exactly as `_lbfgs_loop` solves it (see the module's doc)."""
    if config.history < 1:
        raise ValueError("history must be at least 1")
    device = target.device
    num_victims = target.num_victims
    evaluate = _Evaluator(target, config, labels)
    pixels = evaluate.pixels
    dim = pixels + (target.num_classes if config.optimise_labels else 0)
    size = max(1, min(config.history, max_iterations - 1))  # no victim stores more pairs than that
    per_victim = 2 * size * dim * 4 + 16 * dim * 4
    group_size = max(1, min(num_victims, HISTORY_MEMORY // per_victim))
    groups = [list(range(start, min(start + group_size, num_victims))) for start in range(0, num_victims, group_size)]
    stochastic = _stochastic(target.net)
    if stochastic and seeds:
        torch.manual_seed(int(seeds[0]))  # reproducible noise (each victim draws its own)

    images, found, iterations, best_losses = [], [], [], []
    reported = 0
    for number, members in enumerate(groups):
        ids = torch.tensor(members, dtype=torch.long, device=device)
        evaluate.group(ids)

        def report(done_iterations: int, number: int = number) -> None:
            """progress() so that the calls add up to max_iterations over all groups."""
            nonlocal reported
            if progress is None:
                return
            share = (number * max_iterations + done_iterations) // len(groups)
            if share > reported:
                progress(share - reported)
                reported = share

        result = _solve_group(evaluate, config, [seeds[i] for i in members], max_iterations, size, stochastic,
                              target, report)
        images.append(result[0])
        found.append(result[1])
        iterations += result[2]
        best_losses += result[3]
    last_run.clear()
    last_run.update(engine=evaluate.engine, evaluations=evaluate.evaluations, calls=evaluate.calls,
                    iterations=sum(iterations), groups=len(groups), reused=not stochastic)

    final = torch.cat(images)
    final = minmax_scale(final) if config.minmax else final.clamp(*target.pixel_range)
    chosen = torch.cat(found) if config.optimise_labels else evaluate.labels
    return Reconstruction(images=final.detach().cpu(), iterations=iterations, final_loss=best_losses,
                          labels=chosen.cpu())


def _solve_group(evaluate: _Evaluator, config: LBFGSConfig, seeds: list[int], max_iterations: int, size: int,
                 stochastic: bool, target: Target, report: Callable[[int], None]):
    device = target.device
    count = len(seeds)
    pixels = evaluate.pixels
    x = initial_images(target.input_shape, seeds, "randn", device).reshape(count, -1)
    if config.optimise_labels:
        logits = torch.stack([torch.randn(target.num_classes, generator=torch.Generator().manual_seed(int(seed) + 1))
                              for seed in seeds]).to(device)
        x = torch.cat([x, logits], dim=1)
    dim = x.shape[1]
    lr = float(config.lr)

    f = torch.full((count,), math.nan, device=device)  # loss at x (valid where `fresh`)
    g = torch.zeros(count, dim, device=device)  # gradient at x
    fresh = torch.zeros(count, dtype=torch.bool, device=device)
    d = torch.zeros(count, dim, device=device)
    t = torch.zeros(count, device=device)
    prev_g = torch.zeros(count, dim, device=device)
    h_diag = torch.ones(count, device=device)
    n_iter = torch.zeros(count, dtype=torch.long, device=device)
    history = _History(size, count, dim, device)

    active = torch.ones(count, dtype=torch.bool, device=device)
    best = torch.full((count,), math.inf, dtype=torch.float64, device=device)
    best_x = x[:, :pixels].clone()
    done = torch.zeros(count, dtype=torch.long, device=device)
    frozen = torch.zeros(count, dtype=torch.bool, device=device)  # held where they are (see below)

    for iteration in range(max_iterations):
        if not bool(active.any()):
            break
        # f(x), g(x) where they are not known yet (torch's closure at the start of `step`)
        need = active & ~fresh
        if bool(need.any()):
            index = None if bool(need.all()) else need.nonzero().squeeze(1)
            losses, grads = evaluate(x, index)
            if index is None:
                f, g = losses.clone(), grads.clone()
            else:
                f = f.index_copy(0, index, losses)
                g = g.index_copy(0, index, grads)
            fresh = fresh | need
        loss = f.double()  # the loss of x, before the step

        # --- torch.optim.LBFGS.step, max_iter = 1, per victim
        optimal = g.abs().amax(1) <= TOLERANCE_GRAD  # NaN: False, as in torch
        proceed = active & ~optimal
        first = proceed & (n_iter == 0)
        later = proceed & (n_iter > 0)
        n_iter = n_iter + proceed.long()
        direction = -g
        if bool(later.any()):
            y = g - prev_g
            s = d * t.unsqueeze(1)
            ys = _dot(y, s)
            update = later & (ys > 1e-10)
            if bool(update.any()):
                history.push(update, y, s, 1.0 / ys, active)
                h_diag = torch.where(update, ys / _dot(y, y), h_diag)
            direction = torch.where(later.unsqueeze(1), history.direction(g, h_diag, later), direction)
        d = torch.where(proceed.unsqueeze(1), direction, d)
        prev_g = torch.where(proceed.unsqueeze(1), g, prev_g)
        inverse = 1.0 / g.abs().sum(1)
        start = torch.where(inverse < 1.0, inverse, torch.ones_like(inverse)) * lr  # min(1, 1/|g|_1) lr
        t = torch.where(first, start, torch.where(proceed, torch.full_like(t, lr), t))
        gtd = _dot(g, d)
        step = proceed & ~(gtd > -TOLERANCE_CHANGE)

        x_new = x
        reject = torch.zeros_like(step)
        if bool(step.any()):
            index = None if bool(step.all()) else step.nonzero().squeeze(1)
            trial = x + t.unsqueeze(1) * d
            if config.line_search:
                # _strong_wolfe with max_ls = 0: one evaluation, keep the lower of f(x), f(x + t d)
                losses, grads = evaluate(trial, index)
                f_new = losses if index is None else torch.zeros_like(f).index_copy(0, index, losses)
                accept = step & ~(f <= f_new)
                reject = step & ~accept
                t = torch.where(reject, torch.zeros_like(t), t)
                x_new = torch.where(accept.unsqueeze(1), trial, x)
                if bool(reject.any()):  # x + 0 d: x itself unless d is not finite
                    x_new = torch.where(reject.unsqueeze(1), x + 0.0 * d, x_new)
                if not stochastic:  # the next step starts where the trial was (accepted) or where x was
                    g_new = grads if index is None else torch.zeros_like(g).index_copy(0, index, grads)
                    f = torch.where(accept, f_new, f)
                    g = torch.where(accept.unsqueeze(1), g_new, g)
            else:
                x_new = torch.where(step.unsqueeze(1), trial, x)
                fresh = fresh & ~step
        if stochastic:
            fresh = fresh & ~active  # a stochastic model is evaluated afresh every step, as torch does
            hold = torch.zeros_like(active)
        else:
            # A deterministic victim that did not move this step — max|g| <= tolerance_grad (no
            # state change), g.d > -tolerance_change (the next step stores no pair, y = 0, and
            # finds the same d), or a line search that kept x on a step after the first (the
            # next one stores no pair, s = 0, and tries the same x + lr d again) — repeats this
            # step, loss and all, until max_iterations: it is held there without evaluations.
            hold = active & (optimal | (proceed & ~step) | (later & reject))

        # --- the reference loop's bookkeeping: best point, stopping
        done = done + active.long()
        improved = active & torch.isfinite(loss) & (loss < best)
        best = torch.where(improved, loss, best)
        best_x = torch.where(improved.unsqueeze(1), x[:, :pixels], best_x)
        stop = ~torch.isfinite(loss) | ~torch.isfinite(x_new[:, :pixels]).all(1) | (loss < config.min_loss)
        active = active & ~stop
        frozen = frozen | (active & hold)
        active = active & ~hold
        x = x_new
        report(iteration + 1)
    report(max_iterations)

    done = torch.where(frozen, torch.full_like(done, max_iterations), done)
    found = x[:, pixels:].softmax(-1).argmax(-1) if config.optimise_labels else None
    return (best_x.view(count, *target.input_shape), found, done.cpu().tolist(),
            best.cpu().tolist())
