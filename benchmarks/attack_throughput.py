"""Attack throughput: victim-iterations per second, batched (vmap) vs a per-victim loop,
and the useful FLOP/s — the FLOPs of one victim's attack step (torch.utils.flop_counter on a
single-victim step) x victim-iterations per second — as a share of a 2048x2048 float32 matmul's
FLOP/s measured in the same run.

Usage: python benchmarks/attack_throughput.py [--victims 1,8,32,128] [--iterations 20] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch

from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import CNN
from gileak.engine import MatchingConfig, gradient_matching
from gileak.threat import Target, shared_gradients


def measure(target: Target, labels: torch.Tensor, iterations: int, vectorized: bool) -> float:
    """Victim-iterations per second; stopping rules are off so every victim runs every iteration."""
    config = MatchingConfig(vectorized=vectorized, min_loss=0.0, stop_patience=10**9)
    seeds = list(range(target.num_victims))
    gradient_matching(target, config, seeds=seeds, max_iterations=1, labels=labels)  # warm-up
    if target.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    gradient_matching(target, config, seeds=seeds, max_iterations=iterations, labels=labels)
    if target.device.type == "cuda":
        torch.cuda.synchronize()
    return target.num_victims * iterations / (time.perf_counter() - started)


def matmul_flops(device: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a size x size float32 matmul on this machine (best of `repeats`)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def step_flops(target: Target, labels: torch.Tensor) -> float:
    """FLOPs of ONE victim's attack step (dummy gradient + distance + its gradient w.r.t. the image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from gileak.engine.matching import make_victim_loss

    victim_loss = make_victim_loss(target, MatchingConfig())
    shared = tuple(target.shared_gradient[n][0] for n in victim_loss.names)
    image = torch.rand(target.input_shape, device=target.device)
    with FlopCounterMode(display=False) as counter:
        torch.func.grad_and_value(victim_loss, has_aux=True)(image, labels[0], shared)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", default="1,8,32,128")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--loop-iterations", type=int, default=5, help="iterations for the slower per-victim loop")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} model=cnn input=3x32x32")
    peak = matmul_flops(device)
    print(f"2048x2048 float32 matmul: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'victims':>8} {'batched it/s':>14} {'loop it/s':>12} {'ratio':>7} {'useful GFLOP/s':>15} {'of matmul':>10}")
    for count in (int(v) for v in args.victims.split(",")):
        torch.manual_seed(0)
        net = CNN().build((3, 32, 32), 10).to(device)
        images = torch.rand(count, 3, 32, 32, device=device)
        labels = torch.randint(0, 10, (count,), device=device)
        target = Target(net, shared_gradients(net, NoDefense(), images, labels), (3, 32, 32), 10, labels=labels)
        batched = measure(target, labels, args.iterations, vectorized=True)
        looped = measure(target, labels, args.loop_iterations, vectorized=False)
        useful = step_flops(target, labels) * batched
        print(f"{count:>8} {batched:>14.0f} {looped:>12.0f} {batched / looped:>6.1f}x {useful / 1e9:>15.2f} "
              f"{100 * useful / peak:>9.1f}%", flush=True)


if __name__ == "__main__":
    main()
