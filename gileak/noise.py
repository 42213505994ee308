"""Where stochastic modules get their noise: outside an attack the global RNG, inside one each
victim's own stream, so a victim's result does not depend on the victims attacked beside it.

A stochastic module draws with `standard_normal(like)` (or `uniform(like)`) instead of
`torch.randn_like` (`torch.rand_like`), one row per sample along the first dimension of `like`.
Outside any context this *is* `torch.randn_like`: training follows the global RNG as before.
Inside `VictimStreams.rows(victims)` — a forward whose batch row j is victim `victims[j]` —
row j comes from that victim's generator. Under `torch.func.vmap` a generator cannot be used, so
the engines record the draws one evaluation makes (`record_draws`), pre-draw them per victim
outside the vmapped function (`VictimStreams.predraw`) and hand them in, where
`predrawn(noise)` serves them in order. Every engine draws a victim's noise from its stream in
the same order — per evaluation, per stochastic call, one `torch.randn(sample_shape)` — so the
engines agree with each other too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

_KINDS = ("normal", "uniform")
_source: ContextVar[Any] = ContextVar("gileak_noise_source", default=None)


def standard_normal(like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise shaped like `like` (samples along its first dimension): `torch.randn_like`
    outside an attack, each victim's own stream inside one."""
    source = _source.get()
    return torch.randn_like(like) if source is None else source.draw(like, "normal")


def uniform(like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) noise shaped like `like`, as `standard_normal` (e.g. for a dropout mask)."""
    source = _source.get()
    return torch.rand_like(like) if source is None else source.draw(like, "uniform")


def stream_seed(seed: int, purpose: str) -> int:
    """The seed of a victim's stream for one purpose ("upload": its own training step,
    "attack": every step of an attack on it): the two streams, and the attack's initial image
    (seeded by `seed` itself), share no numbers — an attack drawing the victim's own noise
    would be an oracle."""
    digest = hashlib.blake2b(f"{int(seed)}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _sample(generator: torch.Generator, kind: str, shape, dtype) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.rand(shape, generator=generator, dtype=dtype)


class VictimStreams:
    """One CPU generator per victim, seeded from its seed and a purpose (`stream_seed`). CPU
    generators make a victim's noise the same on every device."""

    def __init__(self, seeds: Sequence[int], purpose: str) -> None:
        self.generators = [torch.Generator().manual_seed(stream_seed(seed, purpose)) for seed in seeds]

    def draw(self, victims: Sequence[int], shape: Sequence[int], kind: str = "normal",
             dtype: torch.dtype = torch.float32, device: Any = "cpu") -> torch.Tensor:
        """(len(victims), *shape): row j the next draw of victim victims[j]'s stream."""
        rows = [_sample(self.generators[v], kind, tuple(shape), dtype) for v in victims]
        if not rows:
            return torch.empty((0, *shape), dtype=dtype, device=device)
        return torch.stack(rows).to(device)

    @contextmanager
    def victim(self, victim: int) -> Iterator[None]:
        """While inside, every forward is victim `victim`'s alone, however many rows it has (a
        client's batch, each of its local steps, each client of an aggregate): row j of a
        forward draws the victim's next sample, as `rows([victim] * rows)` would."""
        token = _source.set(_OneVictim(self, int(victim)))
        try:
            yield
        finally:
            _source.reset(token)

    @contextmanager
    def rows(self, victims: Sequence[int]) -> Iterator[None]:
        """While inside, a forward whose batch row j is victim victims[j] draws row j from its stream."""
        token = _source.set(_Rows(self, [int(v) for v in victims]))
        try:
            yield
        finally:
            _source.reset(token)

    def predraw(self, victims: Sequence[int], draws: Sequence[tuple[str, torch.Size, torch.dtype]],
                device: Any) -> tuple[torch.Tensor, ...]:
        """The draws of one evaluation (`record_draws`) for each of `victims`, each (n, *shape),
        to hand to a vmapped function that serves them with `predrawn`. A draw of R rows (a
        forward of a victim's batch of R images) is R samples, one row after another, as every
        other engine draws them (one row: a single draw of the whole shape, the same numbers)."""
        out = []
        for kind, shape, dtype in draws:
            if len(shape) == 0 or shape[0] == 1:
                out.append(self.draw(victims, shape, kind, dtype, device))
            else:
                rows = [self.draw(victims, shape[1:], kind, dtype, device) for _ in range(shape[0])]
                out.append(torch.stack(rows, dim=1))
        return tuple(out)


class _Rows:
    def __init__(self, streams: VictimStreams, victims: list[int]) -> None:
        self.streams = streams
        self.victims = victims

    def draw(self, like: torch.Tensor, kind: str) -> torch.Tensor:
        if like.dim() == 0 or like.shape[0] != len(self.victims):
            raise RuntimeError(
                f"a stochastic module drew noise for {tuple(like.shape)} in a forward of {len(self.victims)} "
                "victims: gileak.noise draws one row per sample, along the first dimension")
        return self.streams.draw(self.victims, like.shape[1:], kind, like.dtype, like.device)


class _OneVictim:
    def __init__(self, streams: VictimStreams, victim: int) -> None:
        self.streams = streams
        self.victim = victim

    def draw(self, like: torch.Tensor, kind: str) -> torch.Tensor:
        if like.dim() == 0:
            raise RuntimeError("a stochastic module drew a single number: gileak.noise draws one row per sample, "
                               "along the first dimension")
        return self.streams.draw([self.victim] * like.shape[0], like.shape[1:], kind, like.dtype, like.device)


class _Predrawn:
    def __init__(self, noise: Sequence[torch.Tensor], kinds: Sequence[str] | None) -> None:
        self.noise = list(noise)
        self.kinds = list(kinds) if kinds is not None else None
        self.used = 0

    def draw(self, like: torch.Tensor, kind: str) -> torch.Tensor:
        if self.used == len(self.noise):
            raise RuntimeError("a stochastic module drew more noise than the engine recorded for one evaluation; "
                               "its draws must not depend on the input's values")
        noise = self.noise[self.used]
        if tuple(noise.shape) != tuple(like.shape) or (self.kinds is not None and self.kinds[self.used] != kind):
            raise RuntimeError(f"a stochastic module drew {kind} noise of shape {tuple(like.shape)} where the "
                               f"engine recorded {tuple(noise.shape)}; its draws must not depend on the input's values")
        self.used += 1
        return noise


@contextmanager
def predrawn(noise: Sequence[torch.Tensor], kinds: Sequence[str] | None = None) -> Iterator[None]:
    """While inside, the stochastic modules' draws are served from `noise`, in order."""
    token = _source.set(_Predrawn(noise, kinds))
    try:
        yield
    finally:
        _source.reset(token)


class _Recorder:
    def __init__(self) -> None:
        self.draws: list[tuple[str, torch.Size, torch.dtype]] = []

    def draw(self, like: torch.Tensor, kind: str) -> torch.Tensor:
        self.draws.append((kind, like.shape, like.dtype))
        return torch.zeros_like(like)


def record_draws(function: Callable, *args: Any) -> list[tuple[str, torch.Size, torch.dtype]]:
    """The (kind, shape, dtype) of every draw `function(*args)` makes, in order (the noise it
    gets is zeros; the global RNG is left as it was)."""
    recorder = _Recorder()
    token = _source.set(recorder)
    try:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            function(*args)
    finally:
        _source.reset(token)
    return recorder.draws
