"""Attack throughput: victim-iterations per second, batched (vmap) vs a per-victim loop.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", default="1,8,32,128")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--loop-iterations", type=int, default=5, help="iterations for the slower per-victim loop")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} model=cnn input=3x32x32")
    print(f"{'victims':>8} {'batched it/s':>14} {'loop it/s':>12} {'ratio':>7}")
    for count in (int(v) for v in args.victims.split(",")):
        torch.manual_seed(0)
        net = CNN().build((3, 32, 32), 10).to(device)
        images = torch.rand(count, 3, 32, 32, device=device)
        labels = torch.randint(0, 10, (count,), device=device)
        target = Target(net, shared_gradients(net, NoDefense(), images, labels), (3, 32, 32), 10, labels=labels)
        batched = measure(target, labels, args.iterations, vectorized=True)
        looped = measure(target, labels, args.loop_iterations, vectorized=False)
        print(f"{count:>8} {batched:>14.0f} {looped:>12.0f} {batched / looped:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
