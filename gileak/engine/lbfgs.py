"""The L-BFGS family (DLG, iDLG, CPL): Euclidean gradient matching with L-BFGS.

Each victim is solved by L-BFGS exactly as `torch.optim.LBFGS(max_iter=1, max_eval=1 +
line_search_evals, history_size=history, line_search_fn="strong_wolfe" or None)` would solve it
alone, one `step` per iteration, but all victims at once (`LBFGSConfig.vectorized`, the
default): the per-victim losses and gradients of every round come from ONE batched call of the
engine IG uses (the factored fast path of `gileak.engine.fast` where the model allows it and the
labels are fixed, else chunked `vmap(grad_and_value(...), randomness="different")`), and the
L-BFGS bookkeeping — curvature pairs in a per-victim ring buffer, the two-loop recursion (in
its Gram form, `_History`: the recursion's coefficients from the pairs' inner products, the same
direction to rounding), the step length — runs as tensor operations over the victims, each
victim keeping its own history, step and stopping. `vectorized=False` is the reference: a plain loop of torch.optim.LBFGS per
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
torch's types (its 0-d tensors as NumPy scalars of their dtype, which round as they do on the
CPU: see `_cubic_interpolate`) — as a generator: it yields its trial t, an engine call evaluates the trial
point x + t d, and the generator takes its (f, g, g.d) and yields its next t or returns (f, g,
t, evaluations). The victims are not kept in step (`_solve_group`): a victim whose search
ends starts its next step at once, so each round's ONE engine call carries every victim still
running — those in the middle of a search and those starting a step alike — and the calls are
as many as the most evaluations one victim needs, not (as in lockstep, every victim's step k
before anyone's step k + 1) the sum over iterations of the longest search.
For a deterministic model the search's f and g at its final point are the ones the next `step`
starts from (torch evaluates there again: x + t d is the same float operation, trial and
final), so the batched solver evaluates each victim once at its start and then only at trial
points. A deterministic victim that does not move — max|g| <= 1e-7 or g.d > -1e-9 at any step,
or a search that leaves x where it was at any step but its first (whose t is min(1, 1/|g|_1)
lr, the next ones' lr) — would repeat that step unchanged until the end (no pair stored, the
same d and the same search): it is held there, its iterations counted, without evaluations. A
model with stochastic modules in training mode (a variational bottleneck, dropout) is evaluated
afresh at x every iteration, as torch does; each victim's bottleneck noise comes from its own
stream (`gileak.noise`), in the order of its own evaluations, in every engine and in the
reference, so there too the results follow the reference (dropout still draws from the global
RNG: only in distribution). Victims attacked together or alone get the same result up to float
summation order: nothing couples them — but the search's cubic interpolation, on a nearly
linear stretch, amplifies a 1-ulp difference of the loss (a batch of 2 vs 1 in a matmul) to
~1e-5 in t — so do the batched engines against the reference loop."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gileak.base import Reconstruction
from gileak.engine import choice
from gileak.engine.compat import DROPOUT
from gileak.engine.matching import (MatchingConfig, as_images, factored_engine, image_rows, initial_images,
                                    make_victim_loss, minmax_scale, victim_labels, victim_shape, vmap_chunk)
from gileak.nets import batch_statistics_only, is_stochastic
from gileak.noise import VictimStreams, predrawn, record_draws
from gileak.threat import Target

#: torch.optim.LBFGS's defaults, which the reference loop uses.
TOLERANCE_GRAD = 1e-7
TOLERANCE_CHANGE = 1e-9
#: Memory the batched solver may give to the victims' curvature histories at once (bytes); more
#: victims run in groups, one after another (each victim's result does not depend on its group).
HISTORY_MEMORY = 2 * 1024**3

#: What the last batched run did, for tests and benchmarks: engine ("factored" or "vmap"),
#: evaluations (victim-evaluations of loss and gradient, all of them), victim_evaluations (each
#: victim's), victims_per_call (evaluations / calls), iterations
#: (victim-iterations, held ones included: the reference's count), stepped (victim-iterations
#: actually computed, held ones excluded), calls (batched engine calls), groups, reused (a
#: deterministic model: the search's last evaluation starts the next step); of the line search:
#: searches (victim line searches run), search_evaluations (their evaluations, the trial points),
#: zoom_evaluations (those made in the zoom phase), long_searches (searches of more than 2
#: evaluations), longest_search (most evaluations in one search); moves (victim-iterations in
#: which x changed); lockstep_calls (the calls a lockstep schedule of the same searches would
#: make — every victim's k-th search before anyone's k + 1-th: one call at the start, then per
#: round the longest k-th search; for a deterministic model).
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
    config = choice.applied(config)  # an engine the runner chose (gileak.engine.choice)
    if len(seeds) != target.num_victims:
        raise ValueError(f"{len(seeds)} seeds for {target.num_victims} victims")
    if labels is None and not config.optimise_labels:
        raise ValueError("labels are needed unless they are optimised")
    if config.line_search_evals < 0:
        raise ValueError("line_search_evals must be at least 0")
    if config.vectorized and not WEAK_PYTHON_SCALARS:  # a NumPy 1: the search would not round as torch's
        config = dataclasses.replace(config, vectorized=False)
    if not config.vectorized:
        choice.record("loop")
    solve = _lbfgs_batched if config.vectorized else _lbfgs_loop
    return solve(target, config, seeds, max_iterations, labels, progress)


def _lbfgs_loop(target: Target, config: LBFGSConfig, seeds: list[int], max_iterations: int,
                labels: torch.Tensor | None, progress: Callable[[int], None] | None) -> Reconstruction:
    """The reference: each victim in turn, torch.optim.LBFGS with max_iter=1 per iteration."""
    device = target.device
    num_victims = target.num_victims
    matching = MatchingConfig(distance=config.distance, tv_weight=config.tv_weight, keep=config.keep)
    victim_loss = make_victim_loss(target, matching)
    uploads = target.shared_in_gradient_units()
    shared = [tuple(uploads[n][i].to(device) for n in victim_loss.names) for i in range(num_victims)]
    state = {**target.params, **target.frozen}
    shape = victim_shape(target)
    per_victim = target.images_per_victim
    labels = None if labels is None else victim_labels(target, labels)
    label_shape = (target.num_classes,) if per_victim == 1 else (per_victim, target.num_classes)

    images, found_labels, iterations, best_losses = [], [], [], []
    reported = 0
    streams = VictimStreams(seeds, "attack")  # victim i's noise: its own stream (gileak.noise)
    for i, seed in enumerate(seeds):
        torch.manual_seed(int(seed))  # modules that still sample from the global stream (dropout)
        image = initial_images(shape, [seed], "randn", device)[0].requires_grad_(True)
        variables = [image]
        if config.optimise_labels:  # one soft label per image
            generator = torch.Generator().manual_seed(int(seed) + 1)
            label_logits = torch.randn(label_shape, generator=generator).to(device).requires_grad_(True)
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
            with streams.victim(i):
                total, _ = victim_loss(image, current_label(), shared[i])
                if config.label_weight:
                    logits = functional_call(target.net, state, (image.reshape(-1, *target.input_shape),))
                    onehot = F.one_hot(labels[i].to(device).reshape(-1), target.num_classes).float()
                    total = total + config.label_weight * (logits.softmax(-1) - onehot).pow(2).sum()
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

    final = as_images(target, torch.stack(images))
    final = minmax_scale(final) if config.minmax else final.clamp(*target.pixel_range)
    return Reconstruction(images=final.detach().cpu(), iterations=iterations, final_loss=best_losses,
                          labels=torch.stack(found_labels).reshape(-1).cpu())


# ---------------------------------------------------------------------------------- batched


def _stochastic(net: nn.Module) -> bool:
    """Whether a forward draws randomness: a stochastic module or dropout in training mode."""
    for module in net.modules():
        if not module.training:
            continue
        if is_stochastic(module):
            return True
        if isinstance(module, DROPOUT) and module.p > 0:
            return True
    return False


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (n, D) tensors: each row reduced alone, so a victim's
    products do not depend on the others in the call (a batched matrix product of n 1 x D x 1
    products — as before — took 5-10x as long on a CPU and rounded by the batch's size)."""
    return torch.linalg.vecdot(a, b)


def _moved(x: torch.Tensor, d: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x + t d per row (t: (n,), of x's dtype), rounded as torch.optim.LBFGS's
    `p.add_(d, alpha=t)`: once — a fused multiply-add on CPUs with FMA (as addcmul's kernel),
    where `x + t * d` rounds twice and differed from it in ~20% of a CNN image's pixels."""
    return torch.addcmul(x, d, t.unsqueeze(1), out=out)


#: The search's stand-in for torch's 0-d tensors of each floating dtype: a NumPy scalar of it (a
#: torch operation on a 0-d tensor costs microseconds, a search makes dozens per trial point,
#: and on a GPU every `if` on one would wait for the device; on a GPU torch's own kernels may
#: round a last bit otherwise, and the batched solver's decisions are those of the CPU rules).
_SEARCH_SCALAR = {torch.float32: np.float32, torch.float64: np.float64}

#: Whether this NumPy combines its scalars with Python numbers as torch combines 0-d tensors
#: with them (NEP 50, NumPy 2: the number is cast to the scalar's dtype, `np.float32(1) * 0.1` is
#: a float32; NumPy 1 gave a float64). Without it the batched search would round otherwise than
#: torch's: `lbfgs_matching` then runs the reference loop.
WEAK_PYTHON_SCALARS = (type(np.float32(1) * 0.1) is np.float32 and type(0.1 - np.float32(1)) is np.float32
                       and not bool(np.float32(1) < 1.0000000001))


def _divide(a, b):
    """a / b as torch divides: `number / tensor` is `tensor.reciprocal() * number` (torch's
    `Tensor.__rdiv__`), where NumPy would divide once; anything else as NumPy (or Python) does."""
    if isinstance(b, np.floating) and not isinstance(a, np.floating):
        kind = type(b)
        return (kind(1) / b) * kind(a)
    return a / b


_SQRT_BUFFERS = threading.local()


def _torch_sqrt(value):
    """torch's own sqrt of one NumPy scalar (MKL's: not always correctly rounded, 0.5% of
    float32 values differ from IEEE's in their last bit), in a 0-d tensor that shares its memory
    with a NumPy array, one per thread and dtype: 2 us where a new tensor took 13 (a line search
    takes one per cubic interpolation)."""
    kind = type(value)
    buffers = getattr(_SQRT_BUFFERS, "by_kind", None)
    if buffers is None:
        buffers = _SQRT_BUFFERS.by_kind = {}
    pair = buffers.get(kind)
    if pair is None:
        array = np.zeros((), dtype=kind)
        pair = buffers[kind] = (array, torch.from_numpy(array))
    array, tensor = pair
    array[()] = value
    tensor.sqrt_()
    return kind(array[()])


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """torch's `_cubic_interpolate` (torch/optim/lbfgs.py), statement for statement, where its
    0-d tensors are NumPy scalars of their dtype (`_strong_wolfe`): the same values bit for bit,
    NumPy rounding as torch's CPU kernels do — a Python number operand cast to the dtype first
    (NEP 50, as a wrapped number does not promote a tensor) — except in three operations,
    written out here as torch computes them: `number / tensor` (`_divide`), `tensor ** 2`
    (torch's pow kernel multiplies) and sqrt (torch's own). `tests/test_lbfgs.py` runs torch's
    on 0-d tensors against it on hostile values, and torch's `_strong_wolfe` against ours."""
    # Compute bounds of interpolation area
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    # Most common case: cubic interpolation of 2 points w/ function and derivative values for both
    d1 = g1 + g2 - _divide(3 * (f1 - f2), x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square >= 0:
        d2 = _torch_sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    else:
        return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(t, f: float, g: torch.Tensor, gtd: np.floating, d_norm: np.floating, max_ls: int,
                  c1: float = 1e-4, c2: float = 0.9, tolerance_change: float = TOLERANCE_CHANGE):
    """torch's `_strong_wolfe` (torch/optim/lbfgs.py) for ONE victim, as a generator: it yields
    each trial step t and is sent back (f_new, g_new, gtd_new) — the loss (a Python float, as
    torch's `float(closure())`), the flat gradient and g_new.d (a 0-d tensor) at x + t d — so a
    driver can evaluate every victim's trial point in one batched call. Statement for
    statement torch's code, on the same types (f Python floats, t a Python number or a 0-d
    tensor, gtd 0-d tensors; here NumPy scalars stand for the 0-d tensors and round as they do),
    with torch's `_cubic_interpolate` (ported: ours); d enters only through d_norm = max|d| (the
    evaluations are the driver's). Returns (f_new, g_new, t, ls_func_evals, zoom_evals) — torch's four, and
    how many evaluations the zoom phase made."""
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

    def __init__(self, target: Target, config: LBFGSConfig, labels: torch.Tensor | None,
                 seeds: list[int] | None = None) -> None:
        self.target = target
        self.config = config
        device = target.device
        self.shape = victim_shape(target)  # one victim's dummies: (C, H, W), or (M, C, H, W)
        self.pixels = math.prod(self.shape)
        self.per_victim = target.images_per_victim
        matching = MatchingConfig(distance=config.distance, tv_weight=config.tv_weight, keep=config.keep)
        self.victim_loss = make_victim_loss(target, matching)
        self.state = {**target.params, **target.frozen}
        num_victims = target.num_victims
        self.labels = victim_labels(target, labels.to(device) if labels is not None else
                                    torch.zeros(num_victims * self.per_victim, dtype=torch.long, device=device))
        self.onehot = F.one_hot(self.labels, target.num_classes).float()
        # The factored engine needs fixed labels; CPL's label term is added by a plain batched
        # forward (every model the factored engine supports acts on each sample alone).
        self.fast = None if config.optimise_labels else factored_engine(target, matching, self.victim_loss)
        self.engine = "factored" if self.fast is not None else "vmap"
        choice.record(self.engine if self.fast is None or self.fast.chain is None else "chain")
        self.batched = vmap(grad_and_value(self._noisy_objective), randomness="different",
                            chunk_size=vmap_chunk(target, num_victims))
        # Each victim's noise from its own stream, in the order of its evaluations (gileak.noise).
        self.streams = VictimStreams(seeds if seeds is not None else range(num_victims), "attack")
        self.draws: list | None = None  # what one evaluation draws, recorded at the first vmap call
        self.calls = 0
        self.evaluations = 0

    def group(self, ids: torch.Tensor) -> None:
        """Work on the victims `ids` (their shared gradients, labels) from now on."""
        device = self.target.device
        self.ids = ids
        uploads = self.target.shared_in_gradient_units()
        self.shared = tuple(uploads[n].to(device)[ids] for n in self.victim_loss.names)
        self.group_labels = self.labels[ids]
        self.group_onehot = self.onehot[ids]

    def _objective(self, flat, label, onehot, shared):
        """One victim's total loss, as the reference loop's closure computes it."""
        config = self.config
        image = flat[: self.pixels].view(self.shape)
        if config.optimise_labels:  # one soft label per image
            logits = flat[self.pixels:]
            current = (logits if self.per_victim == 1 else logits.view(self.per_victim, -1)).softmax(-1)
        else:
            current = label
        total, _ = self.victim_loss(image, current, shared)
        if config.label_weight:
            with batch_statistics_only(self.target.net):
                logits = functional_call(self.target.net, self.state, (image.reshape(-1, *self.target.input_shape),))
            total = total + config.label_weight * (logits.softmax(-1) - onehot.reshape(logits.shape)).pow(2).sum()
        return total

    def _noisy_objective(self, flat, label, onehot, shared, noise):
        with predrawn(noise, [kind for kind, _, _ in self.draws]):
            return self._objective(flat, label, onehot, shared)

    def _label_term(self, images: torch.Tensor, onehot: torch.Tensor):
        """CPL's label term and its image gradient for a batch of victims (factored path)."""
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            with batch_statistics_only(self.target.net):
                logits = functional_call(self.target.net, self.state, (x.reshape(-1, *self.target.input_shape),))
            differences = (logits.softmax(-1) - onehot.reshape(logits.shape)).pow(2)
            term = self.config.label_weight * differences.view(len(x), -1).sum(1)  # per victim
            (grads,) = torch.autograd.grad(term.sum(), x)
        return term.detach(), grads

    def __call__(self, points: torch.Tensor, index: torch.Tensor | None):
        """(losses (n,), gradients (n, D)) at `points` (the group's (N, D) tensor) for the
        victims `index` of the group (None: all)."""
        self.calls += 1
        self.evaluations += points.shape[0] if index is None else index.numel()
        victims = (self.ids if index is None else self.ids[index]).tolist()
        if self.fast is not None:
            images = points.view(-1, *self.shape)
            with self.streams.rows(image_rows(victims, self.per_victim)):
                grads, losses, _ = self.fast.step(images, self.group_labels, self.shared, index)
                grads, losses = grads.reshape(grads.shape[0], -1), losses.detach()
                if self.config.label_weight:
                    onehot = self.group_onehot if index is None else self.group_onehot[index]
                    term, term_grads = self._label_term(images if index is None else images[index], onehot)
                    losses = losses + term
                    grads = grads + term_grads.reshape(grads.shape)
            return losses, grads.detach()
        if self.draws is None:
            self.draws = record_draws(self._objective, points[0], self.group_labels[0], self.group_onehot[0],
                                      tuple(s[0] for s in self.shared))
        noise = self.streams.predraw(victims, self.draws, points.device)
        if index is None:
            grads, losses = self.batched(points, self.group_labels, self.group_onehot, self.shared, noise)
        else:
            grads, losses = self.batched(points[index], self.group_labels[index], self.group_onehot[index],
                                         tuple(s[index] for s in self.shared), noise)
        return losses.detach(), grads.detach()


class _History:
    """Each victim's curvature pairs (y, s, 1/ys) — torch's FIFO of `size` pairs, the oldest
    dropped when a new one arrives — in a ring per victim: victim k's pairs lie in row k of a
    (count, 2 size, D) buffer (slot a: s_a in row 2a, y_a in row 2a + 1), its next pair goes to
    slot pushed[k] % size, its j-th newest is in slot (pushed[k] - 1 - j) % size. The victims
    are not in step (see `_solve_group`), so each keeps its own position. Beside the vectors,
    each victim's inner products s_a . y_b and y_a . y_b of its slots (float64), filled in for
    a new pair by the next `direction` that includes its victim.

    `direction` is torch's two-loop recursion in its Gram form: the recursion's coefficients
    of d over g and the pairs follow from inner products alone — its first loop is a unit
    lower-triangular system, its second a unit upper-triangular one — so one batched product
    gives the inner products (g's, and a new pair's), two triangular solves (float64) the
    coefficients, and one batched product d: two reads of the slots in use where the
    recursion makes four, and a few dozen small kernels per call where it makes ~8 per pair
    over the victims' (n, D) rows. The same recursion and the same d up to rounding: its inner
    products are of the same float vectors, its sums are formed in another order, with
    float64 coefficients (`tests/test_lbfgs.py` measures it against torch's recursion)."""

    #: Bytes of the victims' history gathered at once (a subset's rows, copied); more victims
    #: are taken in chunks (each victim's d depends on its own rows only).
    GATHER_MEMORY = 256 * 1024**2

    def __init__(self, size: int, count: int, dim: int, device) -> None:
        self.size = size
        self.count = count
        self.pairs = torch.zeros(count, 2 * size, dim, device=device)  # s_a, y_a in rows 2a, 2a + 1
        self.ro = torch.zeros(count, size, device=device)
        self.pushed = torch.zeros(count, dtype=torch.long, device=device)  # pairs each victim stored
        wide = dict(dtype=torch.float64, device=device)
        self.sy = torch.zeros(count, size, size, **wide)  # s_a . y_b (slots a, b)
        self.yy = torch.zeros(count, size, size, **wide)  # y_a . y_b
        self.fresh = torch.full((count,), -1, dtype=torch.long, device=device)  # a new pair's slot, its products due
        self._gathered: torch.Tensor | None = None  # the gather's buffer, kept between calls

    def push(self, victims: torch.Tensor, y: torch.Tensor, s: torch.Tensor, ro: torch.Tensor) -> None:
        """Store (y, s, ro) (rows in the order of `victims`) as those victims' newest pairs."""
        due = victims[self.fresh[victims] >= 0]
        if due.numel():  # a pair whose products no direction has filled in yet (not `begin`'s order)
            chunks, everyone = self._chunks(due)
            for rows in chunks:
                self._products(rows, self._block(rows, everyone), None)
        slot = self.pushed[victims] % self.size
        self.pairs[victims, 2 * slot] = s
        self.pairs[victims, 2 * slot + 1] = y
        self.ro[victims, slot] = ro
        self.fresh[victims] = slot
        self.pushed[victims] += 1

    def _everyone(self, victims: torch.Tensor) -> bool:
        return victims.numel() == self.count and bool(
            (victims == torch.arange(self.count, device=victims.device)).all())

    def _chunks(self, victims: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
        """`victims` in chunks whose rows fit GATHER_MEMORY, and whether they are every victim
        in order (then all at once, their rows a view)."""
        if self._everyone(victims):
            return [victims], True
        per_victim = self.pairs[0].numel() * self.pairs.element_size()
        step = max(1, self.GATHER_MEMORY // max(1, per_victim))
        return [victims[start:start + step] for start in range(0, victims.numel(), step)], False

    def _block(self, victims: torch.Tensor, everyone: bool, used: int | None = None) -> torch.Tensor:
        """The victims' slots in use (the first `used`, default the most any of them has
        filled: every slot once a victim's ring has wrapped) as rows (n, 2m, D): a view where
        they are every victim, else gathered into a buffer kept between calls (fresh memory of
        32 MB or more is new pages from the system every time, whose first touch costs several
        times the copy)."""
        if used is None:
            used = min(self.size, int(self.pushed.index_select(0, victims).max())) if victims.numel() else 0
        rows = self.pairs[:, : 2 * used]
        if everyone:
            return rows
        shape = (victims.numel(), *rows.shape[1:])
        if self._gathered is None or self._gathered.numel() < math.prod(shape):
            self._gathered = self.pairs.new_empty(math.prod(shape))
        out = self._gathered[: math.prod(shape)].view(shape)
        torch.index_select(rows, 0, victims, out=out)
        return out

    def _products(self, victims: torch.Tensor, block: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor | None:
        """One batched product of the victims' slots in use with g and each one's new pair (if
        any): fills in the new pairs' inner products; returns g's with every slot in use
        (n, 2m) in float64 (s_a . g in column 2a, y_a . g in 2a + 1), or None without g."""
        used = block.shape[1] // 2
        slot = self.fresh.index_select(0, victims)
        due = slot >= 0
        at = slot.clamp(min=0)
        # each victim's new s and y (any, where it has none), from the ring itself (a block
        # that is a view of a part of it would be copied whole by a reshape)
        rows = self.pairs.view(-1, self.pairs.shape[2])
        first = victims * (2 * self.size) + 2 * at
        columns = [rows.index_select(0, first), rows.index_select(0, first + 1)]
        if g is not None:
            columns.insert(0, g)
        # (the vectors times the block's transpose, (n, 1 + 2, 2m): 2-5x as fast on a CPU as the
        # block times the vectors' transpose, a matrix-vector product over the long side)
        products = torch.bmm(torch.stack(columns, dim=1), block.transpose(1, 2)).double()
        if bool(due.any()):
            which, where = victims[due], at[due]
            new_s, new_y = products[due, -2], products[due, -1]  # . s_new, . y_new
            self.sy[which, where, :used] = new_s[:, 1::2]  # s_new . y_b
            self.sy[which, :used, where] = new_y[:, 0::2]  # s_a . y_new
            self.yy[which, where, :used] = new_y[:, 1::2]  # y_new . y_b
            self.yy[which, :used, where] = new_y[:, 1::2]
            self.fresh[which] = -1
        return products[:, 0] if g is not None else None

    def direction(self, g: torch.Tensor, h_diag: torch.Tensor, victims: torch.Tensor) -> torch.Tensor:
        """torch's two-loop recursion, d = -H g, for the victims `victims` (distinct; g and
        h_diag: their rows)."""
        chunks, everyone = self._chunks(victims)
        if len(chunks) == 1:
            return self._direction(g, h_diag, victims, everyone)
        out, start = torch.empty_like(g), 0
        for rows in chunks:
            stop = start + rows.numel()
            out[start:stop] = self._direction(g[start:stop], h_diag[start:stop], rows, everyone)
            start = stop
        return out

    def _direction(self, g: torch.Tensor, h_diag: torch.Tensor, victims: torch.Tensor,
                   everyone: bool) -> torch.Tensor:
        n = victims.numel()
        pushed = self.pushed.index_select(0, victims)
        lengths = pushed.clamp(max=self.size)
        longest = int(lengths.max()) if n else 0
        if longest == 0:  # no pairs: d = -H_diag g
            return g.neg().mul_(h_diag.unsqueeze(1))
        used = longest  # = min(size, the most pairs any of them pushed): the slots in use
        block = self._block(victims, everyone, used)
        with_g = self._products(victims, block, g)  # (n, 2m): s_a . g, y_a . g
        h = h_diag.double()
        # rank j (0: the newest) of each victim: its slot; ranks it lacks are masked out (and
        # pointed at slot 0)
        ranks = torch.arange(longest, device=g.device)
        valid = ranks < lengths.unsqueeze(1)  # (n, R)
        slots = torch.where(valid, (pushed.unsqueeze(1) - 1 - ranks) % self.size, 0)
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        ro = torch.where(valid, self.ro.index_select(0, victims).gather(1, slots).double(), 0.0)
        gs = torch.where(valid, with_g[:, 0::2].gather(1, slots), 0.0)  # s_j . g
        gy = torch.where(valid, with_g[:, 1::2].gather(1, slots), 0.0)  # y_j . g
        index, picked = slots.unsqueeze(2).expand(-1, -1, self.size), slots.unsqueeze(1).expand(-1, longest, -1)
        sy = torch.where(both, self.sy.index_select(0, victims).gather(1, index).gather(2, picked), 0.0)  # s_i . y_j
        yy = torch.where(both, self.yy.index_select(0, victims).gather(1, index).gather(2, picked), 0.0)
        eye = torch.eye(longest, dtype=torch.float64, device=g.device)
        # first loop, newest to oldest: al_i = ro_i s_i . (-g - sum_{j newer} al_j y_j)
        al = torch.linalg.solve_triangular(eye + (ro.unsqueeze(2) * sy).tril(-1), (-ro * gs).unsqueeze(2),
                                           upper=False, unitriangular=True).squeeze(2)
        # q = -g - sum_j al_j y_j, r = H q; second loop, oldest to newest, with c_i = al_i - be_i:
        # be_i = ro_i y_i . (H q + sum_{j older} c_j s_j)
        yq = -gy - torch.bmm(yy, al.unsqueeze(2)).squeeze(2)  # y_i . q
        c = torch.linalg.solve_triangular(eye + (ro.unsqueeze(2) * sy.transpose(1, 2)).triu(1),
                                          (al - ro * h.unsqueeze(1) * yq).unsqueeze(2), upper=True,
                                          unitriangular=True).squeeze(2)
        # d = H q + sum_j c_j s_j = -H g - H sum_j al_j y_j + sum_j c_j s_j, by slot (a masked
        # rank adds 0 to slot 0)
        on_s = torch.zeros(n, used, dtype=torch.float64, device=g.device).scatter_add_(
            1, slots, torch.where(valid, c, 0.0))
        on_y = torch.zeros_like(on_s).scatter_add_(1, slots, torch.where(valid, -h.unsqueeze(1) * al, 0.0))
        coefficients = torch.stack([on_s, on_y], dim=2).view(n, 1, 2 * used).to(g.dtype)
        start = (g * (-h_diag).unsqueeze(1)).unsqueeze(1)
        return torch.baddbmm(start, coefficients, block).squeeze(1)


def _lbfgs_batched(target: Target, config: LBFGSConfig, seeds: list[int], max_iterations: int,
                   labels: torch.Tensor | None, progress: Callable[[int], None] | None) -> Reconstruction:
    """All victims at once, each exactly as `_lbfgs_loop` solves it (see the module's doc)."""
    if config.history < 1:
        raise ValueError("history must be at least 1")
    device = target.device
    num_victims = target.num_victims
    evaluate = _Evaluator(target, config, labels, seeds)
    pixels = evaluate.pixels
    dim = pixels + (target.num_classes * target.images_per_victim if config.optimise_labels else 0)
    size = max(1, min(config.history, max_iterations - 1))  # no victim stores more pairs than that
    # the pairs, the solver's (n, D) tensors, and the line search's gradient rows: up to one
    # per round kept alive (a row is a view of its round's batched gradients)
    searched = config.line_search_evals + 2 if config.line_search else 0
    per_victim = (2 * size + 16 + searched) * dim * 4 + 2 * size * size * 8  # (+ the pairs' inner products)
    group_size = max(1, min(num_victims, HISTORY_MEMORY // per_victim))
    groups = [list(range(start, min(start + group_size, num_victims))) for start in range(0, num_victims, group_size)]
    stochastic = _stochastic(target.net)
    if stochastic and seeds:
        torch.manual_seed(int(seeds[0]))  # modules that still sample from the global stream (dropout)

    images, found, iterations, best_losses, evaluations = [], [], [], [], []
    reported = 0
    stats = dict(stepped=0, searches=0, search_evaluations=0, zoom_evaluations=0, long_searches=0,
                 longest_search=0, moves=0, lockstep_calls=0)
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
        evaluations += result[4]
    last_run.clear()
    last_run.update(engine=evaluate.engine, evaluations=evaluate.evaluations, calls=evaluate.calls,
                    victims_per_call=evaluate.evaluations / max(1, evaluate.calls), victim_evaluations=evaluations,
                    iterations=sum(iterations), groups=len(groups), reused=not stochastic, **stats)

    final = as_images(target, torch.cat(images))
    final = minmax_scale(final) if config.minmax else final.clamp(*target.pixel_range)
    chosen = torch.cat(found) if config.optimise_labels else evaluate.labels
    return Reconstruction(images=final.detach().cpu(), iterations=iterations, final_loss=best_losses,
                          labels=chosen.reshape(-1).cpu())


def _solve_group(evaluate: _Evaluator, config: LBFGSConfig, seeds: list[int], max_iterations: int, size: int,
                 stochastic: bool, target: Target, report: Callable[[int], None], stats: dict):
    """One group's victims through their iterations (`_GroupSolver`); returns (best images,
    found labels or None, iterations, best losses, evaluations) per victim."""
    return _GroupSolver(evaluate, config, seeds, max_iterations, size, stochastic, target, report, stats).run()


class _GroupSolver:
    """One group's victims, each through its own iterations of torch.optim.LBFGS.step: a
    round-based scheduler with no barrier between the victims' iterations.

    Between rounds a victim is searching (its `_strong_wolfe` generator waits for the
    evaluation of its trial point x + t d), at x (a step is to start at a point whose f and g
    are not known yet: the first step, every step of a stochastic model, every step without
    line search) or out (stopped, held, or at max_iterations). Each round (`run`):

    1. the victims whose search ended in the last round finish their iteration
       (`end_searches`, then `finish`, batched over them): t and x + t d, the search's final f
       and g kept as the next step's (a deterministic model), the reference loop's best point
       and stopping rules, holding. Those that go on with f and g known (deterministic, line
       search) and those whose evaluation at x came back in the last round start their next
       step at once (`begin`, batched over them): max|g|, the curvature pair, the two-loop
       direction from each victim's own history (`_History`), the first trial t, a new search
       generator. A step that ends without a search (max|g| <= tolerance_grad, no descent, no
       line search) is finished on the spot; that victim then needs an evaluation at x, or is out;
    2. every victim that needs an evaluation — a searching one at its trial point, one at x
       at x — is evaluated in ONE engine call (`evaluate_pending`): every victim still running
       is in every call, whatever its iteration;
    3. the results go to their victims (`deliver`): a searching one's generator takes (f, g,
       g.d) and gives its next t or its result; one at x takes its f and g.

    Each victim's trajectory is what it would be alone: the same float operations on its own
    rows (only the engine's summation order may depend on the other victims in a call, as in
    any batched call). The number of calls is the most evaluations one victim needs, not the
    sum over iterations of the longest search. `report` gets the fewest iterations completed
    by a victim still running (the runner's share of max_iterations; the rest at the end)."""

    def __init__(self, evaluate: _Evaluator, config: LBFGSConfig, seeds: list[int], max_iterations: int, size: int,
                 stochastic: bool, target: Target, report: Callable[[int], None], stats: dict) -> None:
        self.evaluate = evaluate
        self.config = config
        self.max_iterations = max_iterations
        self.stochastic = stochastic
        self.target = target
        self.report = report
        self.stats = stats
        device = self.device = target.device
        count = self.count = len(seeds)
        self.pixels = evaluate.pixels
        self.x = self._starting_points(seeds)
        dim = self.x.shape[1]
        self.lr = float(config.lr)
        self.max_ls = config.line_search_evals
        self.scalar = _SEARCH_SCALAR[self.x.dtype]  # the search's 0-d tensors

        # Each victim's state, updated in place row by row (every row handed to a search
        # generator is a copy or a row of an engine call's output, never a view of these).
        self.f = torch.full((count,), math.nan, device=device)  # loss at x (where known)
        self.g = torch.zeros(count, dim, device=device)  # gradient at x
        self.d = torch.zeros(count, dim, device=device)
        self.t = torch.zeros(count, device=device)
        self.prev_g = torch.zeros(count, dim, device=device)
        self.h_diag = torch.ones(count, device=device)
        self.n_iter = torch.zeros(count, dtype=torch.long, device=device)
        self.history = _History(size, count, dim, device)
        self.loss = torch.full((count,), math.nan, dtype=torch.float64, device=device)  # f at the step's start
        # the branches of torch's step the current iteration took (for holding)
        self.optimal = torch.zeros(count, dtype=torch.bool, device=device)
        self.proceed = torch.zeros_like(self.optimal)
        self.stepping = torch.zeros_like(self.optimal)
        self.later = torch.zeros_like(self.optimal)

        self.best = torch.full((count,), math.inf, dtype=torch.float64, device=device)
        self.best_x = self.x[:, :self.pixels].clone()
        self.done = torch.zeros(count, dtype=torch.long, device=device)
        self.frozen = torch.zeros(count, dtype=torch.bool, device=device)  # held where they are
        self.running = torch.full((count,), max_iterations > 0, dtype=torch.bool, device=device)
        self.evaluations = [0] * count
        self.points = torch.empty(count, dim, device=device)

        self.searches_done = [0] * count  # each victim's searches so far
        self.longest: list[int] = []  # per round (a victim's k-th search), the longest search
        self.searches: dict = {}  # victim -> its _strong_wolfe generator
        self.trials: dict = {}  # victim -> the trial t its search waits on
        self.ended: dict = {}  # victim -> its search's result, this round
        self.at_x: list[int] = list(range(count)) if max_iterations > 0 else []  # victims to evaluate at x
        self.ready: list[int] = []  # victims whose step starts now (f and g at x known)

    def _starting_points(self, seeds: list[int]) -> torch.Tensor:
        """Each victim's flat variables at the start, from its seed: its dummies, then DLG's
        label logits (one soft label per image), drawn as the reference loop draws them."""
        evaluate, target = self.evaluate, self.target
        x = initial_images(evaluate.shape, seeds, "randn", self.device).reshape(len(seeds), -1)
        if self.config.optimise_labels:
            label_dim = target.num_classes * evaluate.per_victim
            logits = torch.stack([torch.randn(label_dim, generator=torch.Generator().manual_seed(int(seed) + 1))
                                  for seed in seeds]).to(self.device)
            x = torch.cat([x, logits], dim=1)
        return x

    def run(self):
        """The rounds until no victim needs an evaluation; then the result."""
        reported = 0
        while True:
            # 1. iterations that end, steps that start
            if self.ended:
                self.end_searches()
            if self.ready:
                self.begin(sorted(self.ready))
                self.ready.clear()
            # 2. every victim that needs an evaluation, in one call
            pending = sorted([*self.trials, *self.at_x])
            if not pending:
                break
            index, losses, grads, gtd_new = self.evaluate_pending(pending)
            # 3. the results to their victims
            self.deliver(pending, index, losses, grads, gtd_new)
            if bool(self.running.any()):
                least = int(self.done[self.running].min())
                if least > reported:
                    self.report(least)
                    reported = least
        self.report(self.max_iterations)
        # what a lockstep schedule (every victim's k-th search before anyone's k + 1-th) of the
        # same searches would call: one call at the start, then per round the longest search
        self.stats["lockstep_calls"] += (1 if self.count else 0) + sum(self.longest)
        return self.result()

    def finish(self, rows: torch.Tensor, x_new: torch.Tensor, moved: torch.Tensor) -> list[int]:
        """The end of the victims' `rows` iteration (x_new: their new points): the reference
        loop's bookkeeping (best point, stopping) and holding; returns those that go on."""
        pixels, best, loss = self.pixels, self.best, self.loss
        self.done[rows] += 1
        step_loss = loss[rows]
        improved = torch.isfinite(step_loss) & (step_loss < best[rows])
        best[rows] = torch.where(improved, step_loss, best[rows])
        better = rows[improved]
        if better.numel():
            self.best_x.index_copy_(0, better, self.x.index_select(0, better)[:, :pixels])
        stop = (~torch.isfinite(step_loss) | ~torch.isfinite(x_new[:, :pixels]).all(1)
                | (step_loss < self.config.min_loss))
        if self.stochastic:  # evaluated afresh at x every step, as torch does
            hold = torch.zeros_like(stop)
        else:
            # A deterministic victim that did not move this step would repeat it, loss and
            # all, until max_iterations — torch would evaluate the same x again, find the same
            # g and: max|g| <= tolerance_grad: return with no state change; g.d >
            # -tolerance_change: store no pair (y = 0) and find the same d; a line search that
            # left x where it was (t = 0, or x + t d == x) on a step after the first: store no
            # pair (y = 0), find the same d from the same history and H_diag, start from the
            # same t = lr and so run the same search to the same end. It is held there without
            # evaluations. (A first step's search starts from t = min(1, 1/|g|_1) lr, the next
            # from lr: a victim that did not move on its first step is not held.)
            hold = (self.optimal[rows] | (self.proceed[rows] & ~self.stepping[rows])
                    | (self.later[rows] & self.stepping[rows] & ~moved))
        self.x.index_copy_(0, rows, x_new)
        self.frozen[rows] |= hold & ~stop
        go = ~stop & ~hold & (self.done[rows] < self.max_iterations)
        self.running[rows] = go
        return rows[go].tolist()

    def begin(self, victims: list[int]) -> None:
        """torch.optim.LBFGS.step (max_iter = 1) after its evaluation at x, for `victims`:
        up to the line search's first trial point (or the whole step where there is none)."""
        x, d, t, f, g, lr = self.x, self.d, self.t, self.f, self.g, self.lr
        rows = torch.tensor(victims, dtype=torch.long, device=self.device)
        self.stats["stepped"] += len(victims)
        # (n, D) rows by index_select / index_copy_ (several times as fast as x[rows] on a
        # CPU), and no torch.where over them where every victim takes the same branch
        grad = g.index_select(0, rows)
        self.loss[rows] = f[rows].double()
        absolute = grad.abs()
        is_optimal = absolute.amax(1) <= TOLERANCE_GRAD  # NaN: False, as in torch
        goes = ~is_optimal
        everyone_goes = bool(goes.all())
        first = goes & (self.n_iter[rows] == 0)
        is_later = goes & (self.n_iter[rows] > 0)
        self.n_iter[rows] += goes.long()
        row_d, row_t = d.index_select(0, rows), t[rows]
        later_count = int(is_later.sum())
        direction = grad.neg() if later_count < len(victims) else None
        if later_count:
            y = grad - self.prev_g.index_select(0, rows)
            s = row_d * row_t.unsqueeze(1)
            ys = _dot(y, s)
            update = is_later & (ys > 1e-10)
            if bool(update.all()):  # (no masked copies of the (n, D) rows)
                self.history.push(rows, y, s, 1.0 / ys)
                self.h_diag[rows] = ys / _dot(y, y)
            elif bool(update.any()):
                self.history.push(rows[update], y[update], s[update], (1.0 / ys)[update])
                self.h_diag[rows] = torch.where(update, ys / _dot(y, y), self.h_diag[rows])
            if direction is None:  # every victim past its first step
                direction = self.history.direction(grad, self.h_diag[rows], rows)
            else:
                which = is_later.nonzero().squeeze(1)
                direction[which] = self.history.direction(grad[which], self.h_diag[rows[which]], rows[which])
        row_d = direction if everyone_goes else torch.where(goes.unsqueeze(1), direction, row_d)
        d.index_copy_(0, rows, row_d)
        self.prev_g.index_copy_(0, rows, grad if everyone_goes else torch.where(
            goes.unsqueeze(1), grad, self.prev_g.index_select(0, rows)))
        inverse = 1.0 / absolute.sum(1)
        start = torch.where(inverse < 1.0, inverse, torch.ones_like(inverse)) * lr  # min(1, 1/|g|_1) lr
        row_t = torch.where(first, start, torch.where(goes, torch.full_like(row_t, lr), row_t))
        t[rows] = row_t
        gtd = _dot(grad, row_d)
        step = goes & ~(gtd > -TOLERANCE_CHANGE)
        self.optimal[rows], self.proceed[rows], self.stepping[rows], self.later[rows] = is_optimal, goes, step, is_later

        if not bool(step.all()):  # the step ends here, x unchanged
            idle = rows[~step]
            self.at_x.extend(self.finish(idle, x[idle], torch.zeros_like(idle, dtype=torch.bool)))
        if not bool(step.any()):
            return
        which = step.nonzero().squeeze(1)
        moving = rows[which]
        if self.config.line_search:  # torch's _strong_wolfe, one generator per victim
            scalar = self.scalar
            d_norms = row_d[which].abs().amax(1).tolist()
            losses_at_x, gtds, starts = f[moving].tolist(), gtd[which].tolist(), start[which].tolist()
            firsts, small = first[which].tolist(), (inverse[which] < 1.0).tolist()
            grad_rows = grad.unbind(0)
            for j, (k, row) in enumerate(zip(moving.tolist(), which.tolist())):
                # torch: min(1.0, 1 / |g|_1) * lr on the first step, a tensor or a float
                begin_t = scalar(starts[j]) if firsts[j] and small[j] else 1.0 * lr
                self.searches[k] = _strong_wolfe(begin_t, losses_at_x[j], grad_rows[row], scalar(gtds[j]),
                                                 scalar(d_norms[j]), self.max_ls)
                self.trials[k] = next(self.searches[k])
        else:
            x_new = _moved(x[moving], row_d[which], row_t[which])
            moved = (x_new != x[moving]).any(1)
            self.stats["moves"] += int(moved.sum())
            self.at_x.extend(self.finish(moving, x_new, moved))  # without an evaluation: at x next step

    def end_searches(self) -> None:
        """The victims whose search ended this round: x + t d, and the end of their iteration."""
        x, d, ended, stats = self.x, self.d, self.ended, self.stats
        victims = sorted(ended)
        rows = torch.tensor(victims, dtype=torch.long, device=self.device)
        stats["searches"] += len(victims)
        for k in victims:
            searched, zoom = ended[k][3], ended[k][4]
            round_ = self.searches_done[k]  # the victim's round-th search: a lockstep schedule's round
            self.searches_done[k] += 1
            if round_ == len(self.longest):
                self.longest.append(searched)
            elif searched > self.longest[round_]:
                self.longest[round_] = searched
            stats["search_evaluations"] += searched
            stats["zoom_evaluations"] += zoom
            stats["long_searches"] += searched > 2
            stats["longest_search"] = max(stats["longest_search"], searched)
        found_t = torch.tensor([float(ended[k][2]) for k in victims], dtype=x.dtype, device=self.device)
        self.t[rows] = found_t
        # the same float operation as the trial points' (x + 0 d where the search kept x)
        x_rows = x.index_select(0, rows)
        x_new = _moved(x_rows, d.index_select(0, rows), found_t)
        if not self.stochastic:  # the next step starts where the search ended: its f and g
            self.f[rows] = torch.tensor([ended[k][0] for k in victims], dtype=self.f.dtype, device=self.device)
            self.g.index_copy_(0, rows, torch.stack([ended[k][1] for k in victims]))
        moved = (x_new != x_rows).any(1)
        stats["moves"] += int(moved.sum())
        going = self.finish(rows, x_new, moved)
        (self.at_x if self.stochastic else self.ready).extend(going)
        for k in victims:
            del self.searches[k]
        ended.clear()

    def evaluate_pending(self, pending: list[int]):
        """Step 2: the victims `pending` evaluated in one engine call — a searching one at its
        trial point x + t d, one at x at x. Returns (their rows, losses, gradients, g.d)."""
        x, d, points, device = self.x, self.d, self.points, self.device
        index = torch.tensor(pending, dtype=torch.long, device=device)
        searching = [k for k in pending if k in self.trials]
        steps = torch.tensor([float(self.trials[k]) for k in searching], dtype=x.dtype, device=device)
        everyone = len(pending) == self.count
        d_rows = d if everyone else None  # the pending victims' d
        if len(searching) == self.count:  # every victim at its trial point: no gathers
            _moved(x, d, steps, out=points)
        elif searching:
            all_searching = len(searching) == len(pending)
            rows = index if all_searching else torch.tensor(searching, dtype=torch.long, device=device)
            searched_d = d.index_select(0, rows)
            if all_searching:
                d_rows = searched_d
            # end_searches forms the final x by this same expression
            points.index_copy_(0, rows, _moved(x.index_select(0, rows), searched_d, steps))
        if self.at_x:
            rows = torch.tensor(self.at_x, dtype=torch.long, device=device)
            points.index_copy_(0, rows, x.index_select(0, rows))
        losses, grads = self.evaluate(points, None if everyone else index)
        return index, losses, grads, _dot(grads, d.index_select(0, index) if d_rows is None else d_rows)

    def deliver(self, pending: list[int], index: torch.Tensor, losses: torch.Tensor, grads: torch.Tensor,
                gtd_new: torch.Tensor) -> None:
        """Step 3: each result to its victim — a searching one's generator takes (f, g, g.d) and
        yields its next trial or ends its search; one evaluated at x takes its f and g and
        starts its step next round."""
        # g.d as NumPy scalars of its dtype (the search's 0-d tensors)
        values = zip(losses.tolist(), grads.unbind(0), gtd_new.detach().cpu().numpy())
        fresh = []
        with np.errstate(all="ignore"):  # the searches' arithmetic: inf and nan without a word, as torch's
            for position, (k, value) in enumerate(zip(pending, values)):
                self.evaluations[k] += 1
                if k in self.trials:
                    try:
                        self.trials[k] = self.searches[k].send(value)
                    except StopIteration as end:
                        del self.trials[k]
                        self.ended[k] = end.value
                else:
                    fresh.append(position)
        if fresh:
            where = torch.tensor(fresh, dtype=torch.long, device=self.device)
            rows = index[where]
            self.f[rows] = losses[where]
            self.g.index_copy_(0, rows, grads.index_select(0, where))
            self.ready.extend(rows.tolist())
        self.at_x.clear()

    def result(self):
        """(best images, found labels or None, iterations — a held victim's at max_iterations,
        as the reference counts them — best losses, evaluations) per victim."""
        count, evaluate = self.count, self.evaluate
        done = torch.where(self.frozen, torch.full_like(self.done, self.max_iterations), self.done)
        found = (self.x[:, self.pixels:].view(count, evaluate.per_victim, -1).softmax(-1).argmax(-1)
                 if self.config.optimise_labels else None)
        return (self.best_x.view(count, *evaluate.shape), found, done.cpu().tolist(),
                self.best.cpu().tolist(), self.evaluations)
