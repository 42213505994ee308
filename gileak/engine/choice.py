"""Which engine runs an attack: the batched one or the per-victim loop, whichever is faster for
this model, attack, number of victims and device — by a rule that measurements back, or (opt-in,
`GILEAK_ENGINE=probe`) by a short probe whose verdict the runner caches in the run directory
(`engines.json`).

Both engines are exact: the loop is the reference the batched engine is tested against (equal
up to float summation order). But float summation order is all it takes for two L-BFGS or
signed-Adam trajectories to part (tests/test_lbfgs.py), so the engine is part of what a result
is: a timing probe on a shared machine can choose differently in a resumed run or another
worker, and the rows would differ. The default is therefore a rule, decided from what the run
is — the path the batched engine takes, found by one iteration on two victims, the victims, the
device, the model's size — never from timing (docs/performance.md has the measurements):

* the factored step ("chain" or "factored": Conv2d / Linear stacks): batched — 2.4x the loop at
  one victim, 13-37x at 128 on a 2-core CPU;
* vmap (batch norm, attention, DLG's optimised labels) with one victim: the loop (vmap gains
  0.8-1.0x);
* vmap on a GPU: batched (a one-victim step leaves a GPU idle; to be measured by
  benchmarks/gpu_check.sh);
* vmap on a CPU: the loop for a model of more than VMAP_LOOP_PARAMS trainable parameters
  (ResNet-18, 11.2 M: each victim's vmapped gradient is the size of the model, and its batched
  step ran at 0.4-1.3x the loop), else batched (the MLP, 6.3 M: 1.3-1.4x; the ViT, 3.2 M:
  1.6-1.9x).

`GILEAK_ENGINE=batched|loop` forces an engine; `GILEAK_ENGINE=probe` times a warm-up and two
iterations of the batched engine on up to two vmap chunks of the victims (a chunk's cost is
linear in its victims) against the loop on one victim, and takes the faster."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gileak.errors import GileakError

ENGINES = ("batched", "loop")
CACHE_FILE = "engines.json"
#: Iterations each probe times (after a one-iteration warm-up), per engine.
PROBE_ITERATIONS = 2
#: On a CPU the vmap engine runs models with more trainable parameters than this on the loop
#: (between the MLP's 6.3 M, where vmap won, and ResNet-18's 11.2 M, where it lost).
VMAP_LOOP_PARAMS = 8_000_000

_forced: ContextVar[str | None] = ContextVar("gileak_engine", default=None)
_seen: ContextVar[list[str] | None] = ContextVar("gileak_engine_seen", default=None)


@dataclass
class EngineChoice:
    """engine: "batched", "loop", or "own" (the attack runs on none of gileak's engines);
    path: what the batched engine computes a step with ("chain", "factored", "vmap"; "" when
    unknown); how: "rule", "probe", "cache" or "GILEAK_ENGINE"; reason: one line for people;
    rates: victim-iterations per second the probe measured, by engine; seconds: what choosing
    took (the probe's runs; set by the runner)."""

    engine: str
    path: str = ""
    how: str = "rule"
    reason: str = ""
    rates: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def forced(self) -> str | None:
        """The engine to force on the attack (None: leave it as it is)."""
        return self.engine if self.engine in ENGINES else None

    def label(self) -> str:
        """Short text for tables: "batched (chain)", "loop (probe)"."""
        detail = self.path if self.engine == "batched" and self.path else self.how
        return f"{self.engine} ({detail})" if detail else self.engine

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineChoice:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@contextmanager
def use(engine: str | None) -> Iterator[None]:
    """Run the engines' attacks inside on `engine` ("batched", "loop"; None: as configured)."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (use {', '.join(ENGINES)})")
    token = _forced.set(engine)
    try:
        yield
    finally:
        _forced.reset(token)


def applied(config):
    """`config` (a MatchingConfig or LBFGSConfig) with the engine forced by `use`, if any."""
    engine = _forced.get()
    if engine is None or config.vectorized == (engine == "batched"):
        return config
    return dataclasses.replace(config, vectorized=engine == "batched")


def record(path: str) -> None:
    """Called by the engines with the path a run takes ("chain", "factored", "vmap", "loop")."""
    seen = _seen.get()
    if seen is not None:
        seen.append(path)


@contextmanager
def _watching() -> Iterator[list[str]]:
    seen: list[str] = []
    token = _seen.set(seen)
    try:
        yield seen
    finally:
        _seen.reset(token)


def _subset(target, count: int):
    """The first `count` victims of `target` (a victim's labels are its images' labels, M each)."""
    labels = None if target.labels is None else target.labels[:count * target.images_per_victim]
    return dataclasses.replace(target, shared_gradient={n: g[:count] for n, g in target.shared_gradient.items()},
                               labels=labels)


def _timed_run(attack, target, seeds, iterations: int) -> tuple[float, list[str]]:
    import torch

    with _watching() as seen:
        if target.device.type == "cuda":
            torch.cuda.synchronize(target.device)
        started = time.perf_counter()
        attack.attack(target, seeds=seeds, max_iterations=iterations)
        if target.device.type == "cuda":
            torch.cuda.synchronize(target.device)
        return time.perf_counter() - started, list(seen)


def _rate(attack, target, seeds, engine: str) -> float:
    """Victim-iterations per second of `attack` on `engine`: a warm-up run of one iteration,
    then the difference of a (1 + PROBE_ITERATIONS)- and a 1-iteration run (setup excluded)."""
    with use(engine):
        _timed_run(attack, target, seeds, 1)
        once, _ = _timed_run(attack, target, seeds, 1)
        more, _ = _timed_run(attack, target, seeds, 1 + PROBE_ITERATIONS)
    return PROBE_ITERATIONS * len(seeds) / max(more - once, 1e-9)


def choose(attack, target, seeds: list[int], known: dict[str, Any] | None = None) -> EngineChoice:
    """The engine for `attack` on `target`'s victims (`known`: a cached probe verdict, taken as
    it is when probing). Runs the attack itself for one iteration on up to two victims to see
    which path its batched engine takes, and more where it probes; the global RNG is not
    restored (the runner seeds each attack afterwards)."""
    mode = os.environ.get("GILEAK_ENGINE", "").strip().lower()
    if mode in ENGINES:
        return EngineChoice(mode, how="GILEAK_ENGINE", reason=f"GILEAK_ENGINE={mode}")
    if mode not in ("", "rule", "probe"):
        from gileak.errors import UserInputError

        raise UserInputError(f"GILEAK_ENGINE={mode!r}: use batched, loop, rule (the default) or probe "
                             "(or unset it)")
    probing = mode == "probe"
    if probing and known:
        cached = EngineChoice.from_dict(known)
        cached.how = "cache" if cached.how == "probe" else cached.how
        cached.seconds = 0.0
        return cached
    how = "probe" if probing else "rule"
    count = len(seeds)
    few = min(count, 2)
    try:
        with use("batched"):
            _, paths = _timed_run(attack, _subset(target, few), seeds[:few], 1)
    except GileakError:  # not applicable, a user's mistake: the attack itself says so
        raise
    except Exception as e:  # noqa: BLE001 — the batched engine cannot run it here; the loop may
        return _batched_failed(e, "", how)
    batched_paths = [p for p in paths if p != "loop"]
    if not paths:
        return EngineChoice("own", how="rule", reason="the attack runs on none of gileak's engines")
    path = batched_paths[0] if batched_paths else ""
    if path in ("chain", "factored"):
        return EngineChoice("batched", path, "rule", "the factored step: 2.4x the loop at one victim, 13-37x at "
                            "128 on a 2-core CPU")
    if count == 1:
        return EngineChoice("loop", path, "rule", "one victim: vmap gains nothing over the loop (0.8-1.0x)")
    if not probing:
        return _rule(target, path)
    from gileak.engine.matching import vmap_chunk

    chunk = vmap_chunk(target, count) or count
    probed = min(count, max(2, 2 * chunk))
    try:
        batched = _rate(attack, _subset(target, probed), seeds[:probed], "batched")
    except GileakError:
        raise
    except Exception as e:  # noqa: BLE001 — e.g. out of memory with this many victims at once
        return _batched_failed(e, path, how)
    loop = _rate(attack, _subset(target, 1), seeds[:1], "loop")
    engine = "batched" if batched >= loop else "loop"
    return EngineChoice(engine, path, "probe",
                        f"probe: batched {batched:.3g} victim-iterations/s on {probed} victims, loop {loop:.3g}",
                        {"batched": batched, "loop": loop})


def _rule(target, path: str) -> EngineChoice:
    """The vmap engine against the loop, by the device and the model's size."""
    if target.device.type == "cuda":
        return EngineChoice("batched", path, "rule", "a GPU: one-victim steps leave it idle (not yet measured)")
    size = sum(p.numel() for p in target.params.values())
    if size > VMAP_LOOP_PARAMS:
        return EngineChoice("loop", path, "rule", f"a CPU and {size / 1e6:.1f} M parameters (> "
                            f"{VMAP_LOOP_PARAMS / 1e6:.0f} M): vmap's per-victim gradients make it slower than the loop")
    return EngineChoice("batched", path, "rule", f"a CPU and {size / 1e6:.1f} M parameters (<= "
                        f"{VMAP_LOOP_PARAMS / 1e6:.0f} M): vmap beats the loop")


def _batched_failed(error: Exception, path: str, how: str) -> EngineChoice:
    """The loop, where the batched engine raised (out of memory, say): the attack then runs on
    the loop, which fails with its own reason if it cannot run either."""
    return EngineChoice("loop", path, how, f"the batched engine failed ({type(error).__name__}: "
                        f"{str(error)[:200]}); the loop runs it")


def cache_key(cell: str, attack: str, victims: int, device: str) -> str:
    """What a cached choice is valid for: the cell without its seed (dataset, model, defense
    by full parameters), the attack by full parameters, the number of victims and the device."""
    return f"{cell} | {attack} | victims={victims} | device={device}"


def load(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    """The run directory's cached choices ({} when there are none or the file is unreadable:
    the engines are then probed again, which costs time, not correctness)."""
    if run_dir is None:
        return {}
    try:
        data = json.loads((Path(run_dir) / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and v.get("engine") in (*ENGINES, "own")}


def remember(run_dir: Path, key: str, choice: EngineChoice) -> None:
    """Add a probed choice to the run directory's cache (written whole to a temporary file and
    renamed: a reader never sees half a file; the driver alone writes it)."""
    run_dir = Path(run_dir)
    data = load(run_dir)
    data[key] = choice.as_dict()
    temporary = run_dir / f".{CACHE_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temporary, run_dir / CACHE_FILE)
