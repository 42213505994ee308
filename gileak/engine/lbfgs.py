"""The L-BFGS family (DLG, iDLG, CPL): Euclidean gradient matching with L-BFGS.

Each victim is solved by L-BFGS exactly as `torch.optim.LBFGS(max_iter=1, max_eval=1 +
line_search_evals, history_size=history, line_search_fn="strong_wolfe" or None)` would solve it
alone, one `step` per iteration, but all victims at once (`LBFGSConfig.vectorized`, the
default): the per-victim losses and gradients of every round come from ONE batched call of the
engine IG uses (the factored fast path of `gileak.engine.fast` where the model allows it and the
labels are fixed, else chunked `vmap(grad_and_value(...), randomness="different")`), and the
L-BFGS bookkeeping — curvature pairs in a per-victim ring buffer, the two-loop recursion, the
step length — runs as tensor operations over the victims, each victim keeping its own history,
step and stopping. `vectorized=False` is the reference: a plain loop of torch.optim.LBFGS per
victim.

What `torch.optim.LBFGS.step` does with max_iter=1 (torch 2.x, `torch/optim/lbfgs.py`):

* evaluate f(x), g(x); stop there (no state change) when max|g| <= tolerance_grad (1e-7);
* on its first iteration d = -g, t = min(1, 1/|g|_1) lr; later: y = g - g_prev, s = d_prev t_prev,
  the pair (y, s, 1/ys) is stored when ys > 1e-10 (FIFO of `history`) and H_diag = ys / yy, then
  d = the two-loop recursion on -g, t = lr;
* stop there (t and d kept) when g.d > -tolerance_change (1e-9);
* line search: `_strong_wolfe(..., max_ls=max_eval - 1)` (the 1: the evaluation at x) from t:
  a bracketing phase (extrapolating by `_cubic_interpolate` within [1.01 t, 10 t] until the
  Armijo condition fails, the loss stops falling, the strong curvature condition holds or g.d
  turns >= 0), then a zoom phase (cubic interpolation in the bracket, pushed 0.1 of its width
  from an end after insufficient progress, until the Wolfe conditions hold or the bracket is
  below tolerance_change / max|d|), both ending after max_ls trial evaluations; it returns the
  bracket's low point t (0 when no trial point was better: x + 0 d) with its f and g, and x
  becomes x + t d;
* without line search: x += t d and no evaluation (max_iter = 1 is the last iteration).

History: torch's max_eval defaults to max_iter * 5 // 4, which is 1 for max_iter = 1, so the
search got max_ls = 0 — one trial evaluation, t kept if f(x + t d) < f(x) else t = 0, and a
victim whose step was rejected after its first never moved again (every paper-CNN victim
within a few iterations): the attacks were under-powered. We pass max_eval = 1 +
`line_search_evals` (default 25, `_strong_wolfe`'s own max_ls default); line_search_evals=0
reproduces the old behaviour.

The batched search runs each victim's `_strong_wolfe` — ported statement for statement, on
torch's types — as a generator, in lockstep: every round, each victim still searching yields
its trial t, ONE engine call evaluates all those victims' trial points x + t d, and each
generator takes its (f, g, g.d) and yields its next t or returns (f, g, t, evaluations).
For a deterministic model the search's f and g at its final point are the ones the next `step`
starts from (torch evaluates there again: x + t d is the same float operation, trial and
final), so the batched solver evaluates each victim once at its start and then only at trial
points. A deterministic victim that does not move — max|g| <= 1e-7 or g.d > -1e-9 at any step,
or a search that leaves x where it was at any step but its first (whose t is min(1, 1/|g|_1)
lr, the next ones' lr) — would repeat that step unchanged until the end (no pair stored, the
same d and the same search): it is held there, its iterations counted, without evaluations. A
model with stochastic modules in training mode (a variational bottleneck, dropout) is evaluated
afresh at x every iteration, as torch does; its victims draw independent noise (vmap
randomness="different"), so there the results follow the reference only in distribution.
Victims attacked together or alone get the same result up to float summation order with a
deterministic model: nothing couples them — but the search's cubic interpolation, on a nearly
linear stretch, amplifies a 1-ulp difference of the loss (a batch of 2 vs 1 in a matmul) to
~1e-5 in t — so do the batched engines against the reference loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.optim.lbfgs import _cubic_interpolate

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
#: evaluations (victim-evaluations of loss and gradient, all of them), iterations
#: (victim-iterations, held ones included: the reference's count), stepped (victim-iterations
#: actually computed, held ones excluded), calls (batched engine calls), groups, reused (a
#: deterministic model: the search's last evaluation starts the next step); of the line search:
#: searches (victim line searches run), search_evaluations (their evaluations, the trial points),
#: zoom_evaluations (those made in the zoom phase), long_searches (searches of more than 2
#: evaluations), longest_search (most evaluations in one search); moves (victim-iterations in
#: which x changed).
last_run: dict = {}


@dataclass
class LBFGSConfig:
    distance: str = "euclidean"
    lr: float = 1.0
    history: int = 100
    line_search: bool = True  # strong-Wolfe line search; DLG's original takes plain lr=1 steps
    #: The line search's budget: torch's `_strong_wolfe` max_ls (its own default, 25), given to
    #: torch.optim.LBFGS as max_eval = 1 + line_search_evals. 0 reproduces torch's max_iter=1
    #: default (max_eval = 1): one trial evaluation per iteration and no search at all.
    line_search_evals: int = 25
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
    if config.line_search_evals < 0:
        raise ValueError("line_search_evals must be at least 0")
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
        # max_eval - 1 (the evaluation at x, done before the search) is the search's max_ls
        optimizer = torch.optim.LBFGS(variables, lr=config.lr, max_iter=1, max_eval=1 + config.line_search_evals,
                                      history_size=config.history,
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


def _strong_wolfe(t, f: float, g: torch.Tensor, gtd: torch.Tensor, d_norm: torch.Tensor, max_ls: int,
                  c1: float = 1e-4, c2: float = 0.9, tolerance_change: float = TOLERANCE_CHANGE):
    """torch's `_strong_wolfe` (torch/optim/lbfgs.py) for ONE victim, as a generator: it yields
    each trial step t and is sent back (f_new, g_new, gtd_new) — the loss (a Python float, as
    torch's `float(closure())`), the flat gradient and g_new.d (a 0-d tensor) at x + t d — so a
    driver can evaluate every victim's trial point in one batched call. Statement for
    statement torch's code, on the same types (f Python floats, t a Python number or a 0-d
    tensor, gtd 0-d tensors), with torch's `_cubic_interpolate`; d enters only through
    d_norm = max|d| (the evaluations are the driver's). Returns (f_new, g_new, t,
    ls_func_evals, zoom_evals) — torch's four, and how many evaluations the zoom phase made."""
    f_new, g_new, gtd_new = yield t
    ls_func_evals = 1
    zoom_evals = 0

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f, bracket_g = [t_prev, t], [f_prev, f_new], [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f, bracket_g = [t_prev, t], [f_prev, f_new], [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        # interpolate
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        # next step
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new, gtd_new = yield t
        ls_func_evals += 1
        ls_iter += 1

    # reached max number of iterations?
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # zoom phase
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        # line-search bracket is so small
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        # compute new trial value
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        # insufficient progress: t close to a boundary twice in a row, or at it
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        # evaluate new point
        f_new, g_new, gtd_new = yield t
        ls_func_evals += 1
        zoom_evals += 1
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not satisfied or not lower than lowest point
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True  # Wolfe conditions satisfied
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # old high becomes new low
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            # new point becomes new low
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals, zoom_evals


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


def _line_search(evaluate: _Evaluator, x: torch.Tensor, d: torch.Tensor, f: torch.Tensor, g: torch.Tensor,
                 gtd: torch.Tensor, rows: list[int], starts: list, max_ls: int, stats: dict):
    """torch's strong-Wolfe line search for the victims `rows` of the group, in lockstep: each
    round, every victim still searching gives its trial step t, ONE batched engine call
    evaluates all their trial points x + t d (and one batched product their g_new.d), and each
    victim's `_strong_wolfe` generator takes its values and gives its next t or its result.
    Returns the victims' final t, f and g (float32 (n,), (n,), (n, D))."""
    d_norm = d.abs().amax(1)
    losses_at_x = f.tolist()
    searches, trials, results = {}, {}, {}
    for k, t in zip(rows, starts):
        searches[k] = _strong_wolfe(t, losses_at_x[k], g[k], gtd[k], d_norm[k], max_ls)
        trials[k] = next(searches[k])
    count = x.shape[0]
    while trials:
        pending = list(trials)  # in row order
        index = torch.tensor(pending, dtype=torch.long, device=x.device)
        steps = torch.zeros(count, dtype=x.dtype, device=x.device)
        steps[index] = torch.tensor([float(trials[k]) for k in pending], dtype=x.dtype, device=x.device)
        # torch: p.add_(d, alpha=t), t cast to float32; _solve_group forms the final x by this same expression
        points = x + steps.unsqueeze(1) * d
        losses, grads = evaluate(points, None if len(pending) == count else index)
        gtd_new = _dot(grads, d[index])
        values = zip(losses.tolist(), grads.unbind(0), gtd_new.unbind(0))
        trials = {}
        for k, value in zip(pending, values):
            try:
                trials[k] = searches[k].send(value)
            except StopIteration as end:
                results[k] = end.value
    stats["searches"] += len(rows)
    for k in rows:
        evaluations, zoom = results[k][3], results[k][4]
        stats["search_evaluations"] += evaluations
        stats["zoom_evaluations"] += zoom
        stats["long_searches"] += evaluations > 2
        stats["longest_search"] = max(stats["longest_search"], evaluations)
    found_t = torch.tensor([float(results[k][2]) for k in rows], dtype=x.dtype, device=x.device)
    found_f = torch.tensor([results[k][0] for k in rows], dtype=f.dtype, device=x.device)
    found_g = torch.stack([results[k][1] for k in rows])
    return found_t, found_f, found_g


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
    # the pairs, the solver's (n, D) tensors, and the line search's gradient rows: up to one
    # per round kept alive (a row is a view of its round's batched gradients)
    searched = config.line_search_evals + 2 if config.line_search else 0
    per_victim = (2 * size + 16 + searched) * dim * 4
    group_size = max(1, min(num_victims, HISTORY_MEMORY // per_victim))
    groups = [list(range(start, min(start + group_size, num_victims))) for start in range(0, num_victims, group_size)]
    stochastic = _stochastic(target.net)
    if stochastic and seeds:
        torch.manual_seed(int(seeds[0]))  # reproducible noise (each victim draws its own)

    images, found, iterations, best_losses = [], [], [], []
    reported = 0
    stats = dict(stepped=0, searches=0, search_evaluations=0, zoom_evaluations=0, long_searches=0,
                 longest_search=0, moves=0)
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
                              target, report, stats)
        images.append(result[0])
        found.append(result[1])
        iterations += result[2]
        best_losses += result[3]
    last_run.clear()
    last_run.update(engine=evaluate.engine, evaluations=evaluate.evaluations, calls=evaluate.calls,
                    iterations=sum(iterations), groups=len(groups), reused=not stochastic, **stats)

    final = torch.cat(images)
    final = minmax_scale(final) if config.minmax else final.clamp(*target.pixel_range)
    chosen = torch.cat(found) if config.optimise_labels else evaluate.labels
    return Reconstruction(images=final.detach().cpu(), iterations=iterations, final_loss=best_losses,
                          labels=chosen.cpu())


def _solve_group(evaluate: _Evaluator, config: LBFGSConfig, seeds: list[int], max_iterations: int, size: int,
                 stochastic: bool, target: Target, report: Callable[[int], None], stats: dict):
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
        stats["stepped"] += int(active.sum())
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
        moved = torch.zeros_like(step)
        if bool(step.any()):
            if config.line_search:
                # torch's _strong_wolfe per victim, all victims' trial points in one call a round
                rows = step.nonzero().squeeze(1).tolist()
                firsts = first.tolist()
                small = (inverse < 1.0).tolist()  # torch: min(1.0, 1 / |g|_1) * lr, a tensor or a float
                starts = [start[k] if firsts[k] and small[k] else 1.0 * lr for k in rows]
                found_t, found_f, found_g = _line_search(evaluate, x, d, f, g, gtd, rows, starts,
                                                         config.line_search_evals, stats)
                index = torch.tensor(rows, dtype=torch.long, device=device)
                t = t.index_copy(0, index, found_t)
                # the same float operation as the trial points' (x + 0 d where the search kept x)
                x_new = torch.where(step.unsqueeze(1), x + t.unsqueeze(1) * d, x)
                if not stochastic:  # the next step starts where the search ended: its f and g
                    f = f.index_copy(0, index, found_f)
                    g = g.index_copy(0, index, found_g)
            else:
                x_new = torch.where(step.unsqueeze(1), x + t.unsqueeze(1) * d, x)
                fresh = fresh & ~step
            moved = step & (x_new != x).any(1)
            stats["moves"] += int(moved.sum())
        if stochastic:
            fresh = fresh & ~active  # a stochastic model is evaluated afresh every step, as torch does
            hold = torch.zeros_like(active)
        else:
            # A deterministic victim that did not move this step repeats it, loss and all, until
            # max_iterations — torch would evaluate the same x again, find the same g and:
            # max|g| <= tolerance_grad: return with no state change; g.d > -tolerance_change:
            # store no pair (y = 0) and find the same d; a line search that left x where it
            # was (t = 0, or x + t d == x) on a step after the first: store no pair (y = 0),
            # find the same d from the same history and H_diag, start from the same t = lr
            # and so run the same search to the same end. It is held there without
            # evaluations. (A first step's search starts from t = min(1, 1/|g|_1) lr, the next
            # from lr: a victim that did not move on its first step is not held.)
            hold = active & (optimal | (proceed & ~step) | (later & step & ~moved))

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
