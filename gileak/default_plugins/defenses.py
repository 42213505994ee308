"""Built-in defenses: none, PRECODE, CVB, DP-SGD (Opacus), gradient compression, quantisation,
bias removal."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from gileak import Defense, hookimpl
from gileak.errors import NotApplicableError, ParamsError

if TYPE_CHECKING:
    import torch
    from torch import nn


class NoDefense(Defense):
    """The undefended baseline: the model and the shared gradient are left as they are."""

    name = "none"
    description = "No defense: the baseline every other defense is compared against."


def _slot_at(defense: Defense, net: nn.Module, position: int):
    """The model's slot at `position`, or a ParamsError naming the positions it has."""
    from gileak.nets import slots

    available = slots(net)
    if position not in available:
        have = ", ".join(str(p) for p in sorted(available)) or "none"
        raise ParamsError(
            f"{defense.name}: the model has no insertion position {position}; its positions are: {have}."
        )
    return available[position]


class Precode(Defense):
    """PRECODE: a fully connected variational bottleneck inserted at one position."""

    name = "precode"
    description = "PRECODE: fully connected variational bottleneck (encoder to 2K, sample, decoder) + beta*KL."

    class Params(Defense.Params):
        position: int = Field(1, description="slot position the bottleneck goes into (CNN: 1, 2 or 3)")
        size: int | None = Field(
            None, ge=1, description="bottleneck size K; default: half the feature's channels (CNN: 8, 16, 32)"
        )
        beta: float = Field(0.001, ge=0, description="weight of the KL term (in bits) in the client loss; "
                            "PRECODE's own default")

    def apply(self, net):
        from gileak.bottlenecks import PrecodeBottleneck

        slot = _slot_at(self, net, self.params.position)
        size = self.params.size if self.params.size is not None else max(1, slot.shape[0] // 2)
        slot.insert(PrecodeBottleneck(slot.shape, size, self.params.beta))


def _positions(value: Any) -> Any:
    """1 -> (1,); "1+3" or [1, 3] -> (1, 3): several positions are joined by '+'."""
    if isinstance(value, bool):
        raise ValueError("a position is an integer")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        parts = [p.strip() for p in value.split("+")]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"cannot read positions '{value}': write one integer or several joined by '+', "
                             "like 1+3") from None
    if isinstance(value, (list, tuple)):
        return tuple(p for v in value for p in _positions(v))
    return value


class CVB(Defense):
    """The paper's Convolutional Variational Bottleneck at one or several positions."""

    name = "cvb"
    description = "Convolutional Variational Bottleneck (the paper's): conv mu/sigma, sample, 1x1 decoder, beta*KL."

    class Params(Defense.Params):
        position: tuple[int, ...] = Field(
            (1,), description="slot position(s) the CVB goes into; several joined by '+', e.g. 1+3"
        )
        kernel: int = Field(5, ge=1, description="kernel size k_E of the mu and sigma convolutions")
        scale: float = Field(0.5, gt=0, description="s_E: latent channels K_E = floor(scale * c) (at least 1) for "
                             "c >= 8 input channels; below 8, at least 8 (the authors' rule: c/2, else 8)")
        beta: float = Field(0.1, ge=0, description="weight of the KL term in the client loss")
        kl: Literal["reference", "gaussian"] = Field(
            "reference", description="reference: the authors' term -1/2 sum_c (1 + s - mu^2 - e^s), s the softplus "
            "sigma (the paper's numbers); gaussian: KL(N(mu, sigma^2) || N(0, 1)); both summed over channels, "
            "averaged over batch and positions")

        @field_validator("position", mode="before")
        @classmethod
        def _read_positions(cls, value: Any) -> Any:
            return _positions(value)

        @field_validator("position")
        @classmethod
        def _some_position(cls, value: tuple[int, ...]) -> tuple[int, ...]:
            if not value:
                raise ValueError("give at least one position")
            if len(set(value)) != len(value):
                raise ValueError(f"a position is listed twice: {'+'.join(map(str, value))}")
            return value

    def apply(self, net):
        from gileak.bottlenecks import ConvBottleneck

        targets = [_slot_at(self, net, position) for position in self.params.position]
        for slot in targets:  # check every position before changing the model
            square_tokens = len(slot.shape) == 2 and math.isqrt(slot.shape[1]) ** 2 == slot.shape[1]
            if len(slot.shape) != 3 and not square_tokens:
                raise NotApplicableError(
                    f"cvb: position {slot.position} has features {slot.shape}, which a convolution cannot take."
                )
        for slot in targets:
            channels = slot.shape[0]  # image channels, or tokens as channels (each token a square image)
            latent = latent_channels(channels, self.params.scale)
            slot.insert(ConvBottleneck(slot.shape, self.params.kernel, latent, self.params.beta, self.params.kl))


def latent_channels(channels: int, scale: float) -> int:
    """K_E for a CVB on `channels` input channels: floor(scale * channels), at least 1 — the
    paper's K_E = s_E * K_{E-1} (Sec. VI-A3: s_E = 1/16 of 16 channels is K_E = 1) — and, below
    8 input channels, at least 8: the authors' code sizes its CVB as c // 2 for c >= 8, else 8,
    which this reproduces at the default scale 1/2."""
    latent = max(1, math.floor(scale * channels + 1e-9))  # (0.29 * 100 is 28.999...)
    return latent if channels >= 8 else max(8, latent)


class DPSGD(Defense):
    """DP-SGD as Opacus runs it: per-sample gradients clipped to `clip`, averaged, plus Gaussian
    noise of std clip*sigma/batch_size per entry."""

    name = "dp"
    description = "DP-SGD through Opacus: per-sample clipping to norm C, Gaussian noise of multiplier sigma."

    class Params(Defense.Params):
        clip: float = Field(20.0, gt=0, description="max per-sample gradient norm C")
        sigma: float = Field(0.01, ge=0, description="noise multiplier (noise std = sigma * C per summed gradient)")

    def dp_sgd(self) -> tuple[float, float]:
        return self.params.clip, self.params.sigma

    def apply(self, net) -> None:
        import torch

        norms = [name for name, m in net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if norms:
            raise NotApplicableError(
                f"dp: Opacus cannot take per-sample gradients through batch norm (layer {norms[0]!r}), "
                "which mixes the samples of a batch; use a model without it, e.g. resnet18(norm=group)."
            )

    def client_gradient(self, net, images, labels, generator=None) -> dict[str, torch.Tensor]:
        """What one Opacus client step uploads: the gradient that `DPOptimizer.pre_step()`
        leaves in each trainable parameter's `.grad`, keyed by the net's parameter names. The
        loss is the client loss (cross-entropy + the modules' aux_loss); the noise comes from a
        generator on the parameters' device seeded from `generator` (the global stream if None)."""
        import copy
        import warnings

        import torch
        import torch.nn.functional as F
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from gileak.nets import aux_loss

        # A module's aux_loss left from an earlier forward is a non-leaf tensor, which deepcopy
        # refuses; the copy starts without it.
        memo = {id(m.aux_loss): None for m in net.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)}
        local = copy.deepcopy(net, memo)
        # Opacus records activations only of modules in training mode. The copy keeps the net's
        # modes (a bottleneck in eval mode passes mu), but layers holding trainable parameters
        # are switched to training mode; batch norms, whose output depends on it, are left alone.
        for module in local.modules():
            own = any(p.requires_grad for p in module.parameters(recurse=False))
            if own and not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.training = True
        named = [(n, p) for n, p in local.named_parameters() if p.requires_grad]
        if not named:
            raise NotApplicableError("dp: the model has no trainable parameters.")
        for _, param in named:
            param.grad = None
        device = named[0][1].device
        seed = int(torch.randint(2**62, (1,), generator=generator))
        noise_generator = torch.Generator(device=device).manual_seed(seed)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GradSampleModule(local)
            optimizer = DPOptimizer(
                torch.optim.SGD([p for _, p in named], lr=1.0),
                noise_multiplier=self.params.sigma,
                max_grad_norm=self.params.clip,
                expected_batch_size=len(images),
                generator=noise_generator,
            )
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(images), labels) + aux_loss(local)
                loss.backward()
            optimizer.pre_step()
        gradient = {name: param.grad.detach().clone() for name, param in named}
        model._close()
        return gradient


class GradientCompression(Defense):
    """Per tensor, the `ratio` share of entries with the smallest magnitude is set to zero."""

    name = "gc"
    description = "Gradient compression: per tensor, zero the share `ratio` of entries with the smallest magnitude."

    class Params(Defense.Params):
        ratio: float = Field(0.9, ge=0, le=1, description="share p of each tensor's entries that is pruned")

    def pruned_count(self, numel: int) -> int:
        """How many of `numel` entries are zeroed: floor(ratio * numel)."""
        return min(numel, math.floor(self.params.ratio * numel + 1e-9))

    def transform_gradient(self, gradient, generator=None):
        import torch

        out = {}
        for name, tensor in gradient.items():
            count = self.pruned_count(tensor.numel())
            flat = tensor.reshape(-1).clone()
            if count > 0:
                smallest = torch.argsort(flat.abs(), stable=True)[:count]
                flat[smallest] = 0
            out[name] = flat.view_as(tensor)
        return out


class Quantization(Defense):
    """Uniform symmetric quantisation of each tensor to 2^(bits-1)-1 levels of max|g| per sign."""

    name = "quant"
    description = "Gradient quantisation: per tensor, round to 2^(bits-1)-1 uniform levels of max|g| each side of 0."

    class Params(Defense.Params):
        bits: int = Field(8, ge=2, le=32, description="bits per entry, sign included")

    def transform_gradient(self, gradient, generator=None):
        import torch

        levels = 2 ** (self.params.bits - 1) - 1
        out = {}
        for name, tensor in gradient.items():
            peak = tensor.abs().max() if tensor.numel() else tensor.new_zeros(())
            step = peak / levels
            safe = torch.where(step > 0, step, torch.ones_like(step))
            out[name] = torch.where(step > 0, torch.round(tensor / safe).clamp(-levels, levels) * safe, tensor)
        return out


class NoBias(Defense):
    """Removes the bias of every fully connected layer, which stops the analytic attack."""

    name = "nobias"
    description = "Bias removal: every nn.Linear loses its bias (stops the analytic FC-layer attack)."

    def apply(self, net):
        from torch import nn

        for module in net.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.register_parameter("bias", None)


@hookimpl
def register_defenses(register):
    for defense in (NoDefense, Precode, CVB, DPSGD, GradientCompression, Quantization, NoBias):
        register(defense)
