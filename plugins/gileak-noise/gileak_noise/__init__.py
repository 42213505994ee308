"""gileak plugin: the `noise` defense — Gaussian noise added to the gradient a client shares."""

from __future__ import annotations

from pydantic import Field

from gileak import Defense, hookimpl

__version__ = "0.1.0"


class GaussianNoise(Defense):
    """Add N(0, std²) to every entry of the shared gradient (no clipping, so no DP guarantee)."""

    name = "noise"
    description = "Gaussian noise on the shared gradient, no clipping (the DLG paper's noise baseline)."

    class Params(Defense.Params):
        std: float = Field(0.01, ge=0, description="standard deviation of the added noise")
        relative: bool = Field(False, description="scale std by each tensor's gradient RMS")

    def transform_gradient(self, gradient, generator=None):
        import torch

        noisy = {}
        for name, g in gradient.items():
            std = self.params.std
            if self.params.relative:
                std = std * float(g.detach().pow(2).mean().sqrt())
            noise = torch.randn(g.shape, generator=generator, dtype=g.dtype, device="cpu").to(g.device)
            noisy[name] = g + std * noise
        return noisy


@hookimpl
def register_defenses(register):
    register(GaussianNoise)
