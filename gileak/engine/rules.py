"""Per-module rules of the factored engine (`gileak.engine.fast`): what each module type does
to a batch, registered by type — as Opacus registers a grad sampler per layer type — so that a
third party's module (a stochastic bottleneck, an activation) is handled without editing the
engine. A model holding a module without a rule runs on the vmap engine instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from gileak.nets import Slot

Role = Literal["factored", "per_sample", "composite"]


@dataclass(frozen=True)
class ModuleRule:
    """How the factored engine treats one module type.

    - `factored`: a layer whose per-sample weight gradient is a product of two factors, its
      unfolded input and its output gradient (Conv2d, Linear); the engine computes its
      gradients itself, so only these two types can hold parameters there.
    - `per_sample`: a module without parameters or buffers that acts on each sample alone
      (activations, pooling, reshapes, dropout); it runs as it is.
    - `composite`: a module whose own forward acts on each sample alone and whose parameters all
      live in its children (containers, variational bottlenecks whose encoder and decoder are
      Linear or Conv2d layers); it runs as it is, its children by their own rules. It may draw
      noise per sample (`stochastic = True`).

    `batch_mean_aux`: the module's `aux_loss` (a loss term it adds, such as a bottleneck's β·KL)
    is the mean over the batch of per-sample terms; the engine, which runs many victims in one
    batch, scales it back to each victim's own mean. Any other `aux_loss` is not supported."""

    role: Role
    batch_mean_aux: bool = False


_RULES: dict[type[nn.Module], ModuleRule] = {}


def register_module_rule(*module_types: type[nn.Module], role: Role = "per_sample",
                         batch_mean_aux: bool = False) -> Callable:
    """Declare how the factored engine treats `module_types` — exact types: a subclass may
    override `forward` and needs its own rule. Call it with the types, or use it as a class
    decorator (`@register_module_rule(role="composite", batch_mean_aux=True)`). A type registered
    again takes the new rule."""
    if role not in ("factored", "per_sample", "composite"):
        raise ValueError(f"unknown role {role!r}: use factored, per_sample or composite")
    if role == "factored" and any(t not in (nn.Conv2d, nn.Linear) for t in module_types):
        raise ValueError("only Conv2d and Linear are factored: the engine computes their gradients itself")
    rule = ModuleRule(role, batch_mean_aux)
    for module_type in module_types:
        _RULES[module_type] = rule

    def decorate(module_type: type[nn.Module]) -> type[nn.Module]:
        _RULES[module_type] = rule
        return module_type

    return decorate


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of the module's exact type, or None."""
    return _RULES.get(type(module))


register_module_rule(nn.Conv2d, nn.Linear, role="factored")
register_module_rule(
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
    role="per_sample",
)
register_module_rule(nn.Sequential, Slot, role="composite")
