"""Insertion points (slots) that models declare and defenses fill, and helpers over modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class Slot(nn.Module):
    """Insertion point `position` with feature shape `shape` (without batch). Identity until a
    defense inserts a module; `kind` says how features are laid out ("image" C,H,W or "tokens" P,F)."""

    def __init__(self, position: int, shape: tuple[int, ...], kind: str = "image") -> None:
        super().__init__()
        self.position = position
        self.shape = tuple(shape)
        self.kind = kind
        self.body = nn.Sequential()

    def insert(self, module: nn.Module) -> None:
        self.body.append(module)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)

    def extra_repr(self) -> str:
        return f"position={self.position}, shape={self.shape}"


def slots(net: nn.Module) -> dict[int, Slot]:
    """The model's insertion points by position."""
    return {m.position: m for m in net.modules() if isinstance(m, Slot)}


def is_stochastic(module: nn.Module) -> bool:
    """Modules that sample randomness in forward set `stochastic = True` (variational bottlenecks)."""
    return bool(getattr(module, "stochastic", False))


def aux_loss(net: nn.Module) -> torch.Tensor | float:
    """Sum of the loss terms that modules left in `aux_loss` during the last forward (β·KL)."""
    total: torch.Tensor | float = 0.0
    for module in net.modules():
        term = getattr(module, "aux_loss", None)
        if term is not None:
            total = total + term
    return total


@contextmanager
def batch_statistics_only(net: nn.Module) -> Iterator[None]:
    """While inside, batch norms in training mode normalise with the batch's statistics, as in
    training, but leave their running statistics (and batch counter) untouched; eval mode is
    unchanged. The gradient is the same either way (running statistics do not enter a training
    step's output); this keeps a victim's step free of side effects and lets the attack vmap
    over victims, where writing batched statistics into the shared buffers would fail."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


def count_trainable(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def forward_order(net: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Names of trainable parameters in the order their modules run forward, traced once on a
    dry run with hooks (a module called twice counts at its first call)."""
    module_names = {module: name for name, module in net.named_modules()}
    called: list[nn.Module] = []

    def record(module, _inputs):
        if module not in called:
            called.append(module)

    handles = [m.register_forward_pre_hook(record) for m in net.modules() if any(True for _ in m.parameters(recurse=False))]
    was_training = net.training
    try:
        net.eval()
        device = next(net.parameters()).device
        with torch.no_grad():
            net(torch.zeros((1, *input_shape), device=device))
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    order: list[str] = []
    for module in called:
        prefix = module_names[module]
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                order.append(f"{prefix}.{pname}" if prefix else pname)
    return order


def first_stochastic_cut(net: nn.Module, input_shape: tuple[int, ...]) -> list[str] | None:
    """Parameters that run before the first stochastic module's decoder (what "ignore" keeps),
    or None when the model has no stochastic module. A stochastic module declares its decoder's
    parameter prefixes in `decoder_prefixes` (relative names); everything from there on is dropped."""
    order = forward_order(net, input_shape)
    module_names = {module: name for name, module in net.named_modules()}
    for module in net.modules():
        if is_stochastic(module):
            prefix = module_names[module]
            decoder = [f"{prefix}.{p}" if prefix else p for p in getattr(module, "decoder_prefixes", ())]
            for index, name in enumerate(order):
                if any(name.startswith(d + ".") for d in decoder) or (
                    not decoder and name.startswith(prefix + ".")
                ):
                    return order[:index]
            return order
    return None
