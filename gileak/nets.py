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


def call_order(net: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Names of the net's modules in the order they are first called forward (a parent before
    its children), traced once on a dry run in eval mode with hooks; the root is ""."""
    called: dict[nn.Module, None] = {}

    def record(module, _inputs):
        called.setdefault(module, None)

    handles = [m.register_forward_pre_hook(record) for m in net.modules()]
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
    module_names = {module: name for name, module in net.named_modules()}
    return [module_names[module] for module in called if module in module_names]


def forward_order(net: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Names of trainable parameters in the order their modules run forward, traced once on a
    dry run with hooks (a module called twice counts at its first call)."""
    modules = dict(net.named_modules())
    order: list[str] = []
    for prefix in call_order(net, input_shape):
        for pname, param in modules[prefix].named_parameters(recurse=False):
            if param.requires_grad:
                order.append(f"{prefix}.{pname}" if prefix else pname)
    return order


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def first_stochastic_cut(net: nn.Module, input_shape: tuple[int, ...]) -> list[str] | None:
    """The parameters "ignore" keeps (paper Eq. 4), in forward order: those that run before the
    decoder of the first stochastic module *that runs* (traced, not registration order), or None
    when no stochastic module runs. A stochastic module names its decoder's parameter prefixes
    (relative) in `decoder_prefixes`; the cut is at the first decoder parameter that runs, and
    it and everything after it are dropped. A module that names no decoder is cut at its own
    first parameter (or, owning none, at the first parameter that runs after it is called).
    Raises NotApplicableError when the named decoder has no trainable parameter that runs: the
    attack as defined (drop the decoder and what follows) cannot be applied, and matching every
    gradient instead would silently be a different attack."""
    from gileak.errors import NotApplicableError

    modules = dict(net.named_modules())
    called = call_order(net, input_shape)
    first = next((name for name in called if is_stochastic(modules[name])), None)
    if first is None:
        return None
    module = modules[first]
    order = forward_order(net, input_shape)
    declared = tuple(getattr(module, "decoder_prefixes", ()) or ())
    if declared:
        decoder = [f"{first}.{p}" if first else p for p in declared]
        for index, name in enumerate(order):
            if any(_under(name, d) for d in decoder):
                return order[:index]
        label = first or "the model itself"
        raise NotApplicableError(
            f"the first stochastic module that runs ({label}, {type(module).__name__}) names its decoder "
            f"{', '.join(repr(d) for d in declared)}, but no trainable parameter of it runs, so the cut before "
            "its decoder is undefined")
    after = set(called[called.index(first):])  # the module, its children and every module called later
    owner = {f"{prefix}.{pname}" if prefix else pname: prefix
             for prefix in called for pname, _ in modules[prefix].named_parameters(recurse=False)}
    for index, name in enumerate(order):
        if owner.get(name) in after:
            return order[:index]
    return order
