"""Variational bottleneck modules that defenses insert into a model's slots.

Both modules are stochastic: in training mode they draw a reparameterised sample
b = mu + sigma * eps with eps ~ N(0, 1) from `gileak.noise.standard_normal` (the global RNG in
training; each victim's own stream inside an attack, so a victim's noise does not depend on
the victims attacked beside it). In eval mode they are deterministic and pass mu to the decoder.
Every forward (train or eval) leaves `self.aux_loss = beta * KL term` (each module's own, as its
authors compute it: see `cvb_reference_kl`, `gaussian_kl`); the client loss adds it
(`gileak.nets.aux_loss`).

They declare `stochastic = True` and `decoder_prefixes = ("decoder",)`, so that
`gileak.nets.first_stochastic_cut` keeps the encoder's parameters and drops the decoder and
everything after it (the "ignore" attack of the paper, Eq. 4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gileak.engine.rules import register_module_rule
from gileak.noise import standard_normal


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per element, 1/2 (sigma^2 + mu^2 - 1 - log sigma^2), summed
    over dimension 1 (PRECODE's K, a CVB's latent channels) and averaged over every other one
    (the batch, and a CVB's positions h, w). Zero exactly when mu = 0 and sigma = 1; never
    negative."""
    log_var = 2.0 * torch.log(sigma.clamp_min(1e-12))
    per_element = 0.5 * (sigma.square() + mu.square() - 1.0 - log_var)
    return per_element.sum(dim=1).mean()


def cvb_reference_kl(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The CVB authors' term (their `EncoderBase.loss`, which the paper's numbers come from):
    -1/2 (1 + s - mu^2 - e^s) per element, with s the softplus output the module samples with
    as its sigma, summed over the latent channels (dimension 1) and averaged over the batch and
    the positions. It is the log-variance form of the KL read with s = log sigma^2, applied to
    sigma itself: it is smallest at s = 0, so it pulls the noise towards zero rather than sigma
    towards 1."""
    return (-0.5 * (1.0 + s - mu.square() - s.exp())).sum(dim=1).mean()


def _sample(mu: torch.Tensor, sigma: torch.Tensor, training: bool) -> torch.Tensor:
    if not training:
        return mu
    return mu + sigma * standard_normal(mu)


# Each samples per image and averages its KL over the batch: the factored engine may run them
# (their encoder and decoder are Linear or Conv2d layers) with many victims in one batch.
@register_module_rule(role="composite", batch_mean_aux=True)
class PrecodeBottleneck(nn.Module):
    """PRECODE's fully connected variational bottleneck (Scheliga et al., WACV 2022).

    The features (without batch) are flattened to `hwc` values; `encoder` =
    Linear(hwc, 2K, bias=False) gives mu and the raw sigma, sigma = softplus(raw). In training
    mode b = mu + sigma * eps; in eval mode b = mu (deterministic). `decoder` =
    Linear(K, hwc, bias=False) maps b back, reshaped to the input's feature shape. Parameters
    added: 2(hwc*K) + (K*hwc). Sets `aux_loss = beta * KL / ln 2` on every forward, as PRECODE's
    own code (after 1Konny's VIB) computes it: KL(N(mu, sigma^2) || N(0, 1)) summed over K and
    averaged over the batch, in bits.
    """

    stochastic = True
    decoder_prefixes = ("decoder",)

    def __init__(self, shape: tuple[int, ...], size: int, beta: float) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.size = int(size)
        self.beta = float(beta)
        features = math.prod(self.shape)
        self.encoder = nn.Linear(features, 2 * self.size, bias=False)
        self.decoder = nn.Linear(self.size, features, bias=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch_shape = features.shape[: features.dim() - len(self.shape)]
        flat = features.reshape(-1, self.encoder.in_features)
        mu, raw_sigma = self.encoder(flat).chunk(2, dim=1)
        sigma = F.softplus(raw_sigma)
        self.aux_loss = self.beta * gaussian_kl(mu, sigma) / math.log(2)
        sample = _sample(mu, sigma, self.training)
        return self.decoder(sample).reshape(*batch_shape, *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, K={self.size}, beta={self.beta}"


@register_module_rule(role="composite", batch_mean_aux=True)
class ConvBottleneck(nn.Module):
    """The Convolutional Variational Bottleneck (CVB) of the paper (Sec. IV, Fig. 8).

    `mu` and `sigma` are kernel x kernel Conv2d(c, K_E, bias=False, padding="same");
    sigma = softplus(clamp(raw, -5, 5)). In training mode b = mu + sigma * eps; in eval mode
    b = mu (deterministic). `decoder` = 1x1 Conv2d(K_E, c, bias=False). Parameters added:
    2(k^2*c*K_E) + (K_E*c). Sets `aux_loss` on every forward: beta * `cvb_reference_kl` (kl =
    "reference", the authors' term) or beta * `gaussian_kl` (kl = "gaussian"), both summed over
    the latent channels and averaged over the batch and the positions.

    Image features are (c, h, w). Token features (P, F) with F a perfect square are viewed as
    (P, sqrt F, sqrt F), tokens as channels, as the paper does for the ViT.
    """

    stochastic = True
    decoder_prefixes = ("decoder",)

    def __init__(self, shape: tuple[int, ...], kernel: int, latent_channels: int, beta: float,
                 kl: str = "reference") -> None:
        super().__init__()
        self.shape = tuple(shape)
        if len(self.shape) == 3:
            self.image_shape = self.shape
        elif len(self.shape) == 2 and math.isqrt(self.shape[1]) ** 2 == self.shape[1]:
            side = math.isqrt(self.shape[1])
            self.image_shape = (self.shape[0], side, side)
        else:
            raise ValueError(
                "A convolutional bottleneck needs features (C, H, W) or tokens (P, F) with F a square; "
                f"got {self.shape}"
            )
        channels = self.image_shape[0]
        self.kernel = int(kernel)
        self.latent_channels = int(latent_channels)
        self.beta = float(beta)
        if kl not in ("reference", "gaussian"):
            raise ValueError(f"kl is 'reference' or 'gaussian', not {kl!r}")
        self.kl = kl
        self.mu = nn.Conv2d(channels, self.latent_channels, self.kernel, padding="same", bias=False)
        self.sigma = nn.Conv2d(channels, self.latent_channels, self.kernel, padding="same", bias=False)
        self.decoder = nn.Conv2d(self.latent_channels, channels, 1, bias=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch_shape = features.shape[: features.dim() - len(self.shape)]
        images = features.reshape(-1, *self.image_shape)
        mu = self.mu(images)
        sigma = F.softplus(self.sigma(images).clamp(-5.0, 5.0))
        term = cvb_reference_kl(mu, sigma) if self.kl == "reference" else gaussian_kl(mu, sigma)
        self.aux_loss = self.beta * term
        sample = _sample(mu, sigma, self.training)
        return self.decoder(sample).reshape(*batch_shape, *self.shape)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, kernel={self.kernel}, K_E={self.latent_channels}, beta={self.beta}, "
                f"kl={self.kl}")
