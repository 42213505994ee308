"""Per-victim optimizer state: Adam, the plateau schedule and the stopping rules, all vectorized."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PerVictimAdam:
    """torch.optim.Adam's update, with a separate step count and learning rate for each victim.

    `step` updates the params in place. With `fused` (where this PyTorch has it), each group of
    active victims that share a learning rate takes one call of the fused Adam kernel that
    torch.optim.Adam(fused=True) uses — one pass over params, gradients and both moments,
    instead of a dozen element-wise passes over the whole batch (measured on a 2-core CPU at
    128 CIFAR-sized victims: 0.3 ms instead of ~2 ms per iteration, a tenth of the attack step)."""

    lr: torch.Tensor  # (N,)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool = True

    def __post_init__(self) -> None:
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None
        self.steps = torch.zeros_like(self.lr)

    def step(self, params: torch.Tensor, grads: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Update params in place and return them; victims that are not active keep their
        params and state untouched."""
        if self.exp_avg is None:
            self.exp_avg = torch.zeros_like(params)
            self.exp_avg_sq = torch.zeros_like(params)
        if self.fused and _fused_adam_supported(params):
            return self._fused_step(params, grads, active)
        beta1, beta2 = self.betas
        shape = (-1,) + (1,) * (params.dim() - 1)
        mask = active.view(shape)
        self.steps += active.to(self.steps.dtype)
        self.exp_avg = torch.where(mask, beta1 * self.exp_avg + (1 - beta1) * grads, self.exp_avg)
        self.exp_avg_sq = torch.where(mask, beta2 * self.exp_avg_sq + (1 - beta2) * grads * grads, self.exp_avg_sq)
        steps = self.steps.clamp(min=1)
        bias_correction1 = 1 - beta1**steps
        bias_correction2 = 1 - beta2**steps
        step_size = (self.lr / bias_correction1).view(shape)
        denom = self.exp_avg_sq.sqrt() / bias_correction2.sqrt().view(shape) + self.eps
        return params.copy_(torch.where(mask, params - step_size * self.exp_avg / denom, params))

    def _fused_step(self, params: torch.Tensor, grads: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        lrs = self.lr.tolist()
        if bool(active.all()) and min(lrs) == max(lrs) and bool((self.steps == self.steps[0]).all()):
            # every victim in step with one learning rate (the common case): one call for the batch
            self.steps += 1
            torch._fused_adam_([params], [grads], [self.exp_avg], [self.exp_avg_sq], [], [self.steps[0]],
                               lr=lrs[0], beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=self.eps,
                               amsgrad=False, maximize=False)
            return params
        groups: dict[float, list[int]] = {}
        for i in active.nonzero().squeeze(1).tolist():
            groups.setdefault(lrs[i], []).append(i)
        views = params.unbind(0), grads.unbind(0), self.exp_avg.unbind(0), self.exp_avg_sq.unbind(0)
        self.steps += active.to(self.steps.dtype)  # counted before the update, as torch.optim.Adam does
        steps = self.steps.unbind(0)  # 0-dim views: the kernel reads each victim's own count
        for lr, members in groups.items():
            torch._fused_adam_(*([v[i] for i in members] for v in views), [], [steps[i] for i in members],
                               lr=lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=self.eps,
                               amsgrad=False, maximize=False)
        return params


def _fused_adam_supported(params: torch.Tensor) -> bool:
    return (hasattr(torch, "_fused_adam_") and params.device.type in ("cpu", "cuda")
            and params.dtype in (torch.float32, torch.float64) and params.is_contiguous())


def _best_and_stop(schedule, loss: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stopping rules every schedule shares, on its `best`, `since_best`, `min_loss` and
    `stop_patience`: (improved mask, still-active mask) — a victim stops below min_loss or after
    stop_patience iterations without a new best."""
    improved = active & (loss < schedule.best)
    schedule.best = torch.where(improved, loss, schedule.best)
    schedule.since_best = torch.where(improved, torch.zeros_like(schedule.since_best),
                                      torch.where(active, schedule.since_best + 1, schedule.since_best))
    still_active = active & (loss >= schedule.min_loss) & (schedule.since_best < schedule.stop_patience)
    return improved, still_active


@dataclass
class PlateauAndStop:
    """ReduceLROnPlateau (mode min, relative threshold) per victim, plus the paper's stopping
    rules: loss below `min_loss`, no decrease for `stop_patience` iterations."""

    num_victims: int
    factor: float = 0.1
    patience: int = 400
    threshold: float = 1e-4
    stop_patience: int = 4000
    min_loss: float = 1e-5
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        inf = torch.full((self.num_victims,), float("inf"), device=self.device)
        self.plateau_best = inf.clone()
        self.plateau_bad = torch.zeros(self.num_victims, dtype=torch.long, device=self.device)
        self.best = inf.clone()
        self.since_best = torch.zeros(self.num_victims, dtype=torch.long, device=self.device)

    def update(self, loss: torch.Tensor, lr: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Take this iteration's losses; return (new lr, improved mask, still-active mask)."""
        improved_plateau = loss < self.plateau_best * (1 - self.threshold)
        self.plateau_best = torch.where(active & improved_plateau, loss, self.plateau_best)
        self.plateau_bad = torch.where(active & ~improved_plateau, self.plateau_bad + 1,
                                       torch.where(active, torch.zeros_like(self.plateau_bad), self.plateau_bad))
        reduce = active & (self.plateau_bad > self.patience)
        lr = torch.where(reduce, lr * self.factor, lr)
        self.plateau_bad = torch.where(reduce, torch.zeros_like(self.plateau_bad), self.plateau_bad)

        return (lr, *_best_and_stop(self, loss, active))


#: Learning-rate schedules of the gradient-matching engine (MatchingConfig.schedule).
SCHEDULES = ("plateau", "step", "cosine")


def budget_factor(kind: str, iteration: int, total: int) -> float:
    """The share of the initial learning rate at `iteration` (0-based) of a `total`-iteration
    budget: "step" is Inverting Gradients' own schedule, x0.1 at about 3/8, 5/8 and 7/8 of the
    budget (Geiping et al.'s MultiStepLR milestones, total // 2.667, // 1.6, // 1.142); "cosine"
    half a cosine from 1 down to 0."""
    import math

    if kind == "step":
        return 0.1 ** sum(iteration >= total // divisor for divisor in (2.667, 1.6, 1.142))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
    raise ValueError(f"Unknown budget schedule '{kind}' (use step or cosine)")


@dataclass
class BudgetDecayAndStop:
    """A learning rate set by the iteration's place in the budget (`budget_factor`), plus the same
    stopping rules as PlateauAndStop: loss below `min_loss`, no decrease for `stop_patience`
    iterations. Same interface as PlateauAndStop, so the engine loop takes either."""

    num_victims: int
    kind: str
    initial_lr: float
    total: int
    stop_patience: int = 10**9
    min_loss: float = 1e-5
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        budget_factor(self.kind, 0, self.total)  # an unknown kind fails here, not mid-attack
        self.iteration = 0
        self.best = torch.full((self.num_victims,), float("inf"), device=self.device)
        self.since_best = torch.zeros(self.num_victims, dtype=torch.long, device=self.device)

    def update(self, loss: torch.Tensor, lr: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Take this iteration's losses; return (next iteration's lr, improved mask, still-active mask)."""
        self.iteration += 1
        lr = torch.where(active, torch.full_like(lr, self.initial_lr * budget_factor(self.kind, self.iteration, self.total)), lr)
        return (lr, *_best_and_stop(self, loss, active))


def make_schedule(kind: str, num_victims: int, *, lr: float, total: int, plateau_patience: int, plateau_factor: float,
                  stop_patience: int, min_loss: float, device) -> PlateauAndStop | BudgetDecayAndStop:
    """The per-victim schedule of one attack: "plateau" (ReduceLROnPlateau, the paper's rule) or a
    budget decay ("step", "cosine")."""
    if kind == "plateau":
        return PlateauAndStop(num_victims, factor=plateau_factor, patience=plateau_patience,
                              stop_patience=stop_patience, min_loss=min_loss, device=device)
    if kind in ("step", "cosine"):
        return BudgetDecayAndStop(num_victims, kind, lr, total, stop_patience=stop_patience, min_loss=min_loss,
                                  device=device)
    raise ValueError(f"Unknown schedule '{kind}' (use one of: {', '.join(SCHEDULES)})")
