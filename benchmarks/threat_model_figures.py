"""The reconstruction figures of docs/threat-models.md: for each client protocol, Inverting
Gradients (the paper's configuration, labels known) on the paper's CNN at initialisation,
attacking victims of the offline `photos` set; originals above their reconstructions, each paired
with an original by the assignment of highest SSIM (an evaluation step). Prints per-image SSIM.

Usage: python benchmarks/threat_model_figures.py [--victims 2] [--iterations 1000] [--out docs/images]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

#: (file stem, client) — the protocols threat-models.md shows, each at four images per victim
#: except the paper's.
PROTOCOLS = (
    ("gradient-batch1", "gradient(batch=1)"),
    ("gradient-batch4", "gradient(batch=4)"),
    ("fedavg-batch2-steps2", "fedavg(batch=2,steps=2,lr=0.01)"),
    ("gradient-batch2-aggregate2", "gradient(batch=2,aggregate=2)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images")
    args = parser.parse_args()

    from gileak import data, fl
    from gileak.default_plugins.attacks import InvertingGradients
    from gileak.default_plugins.datasets import Photos
    from gileak.default_plugins.defenses import NoDefense
    from gileak.default_plugins.models import CNN
    from gileak.report.figures import save_reconstruction_grid
    from gileak.runner import build_net, resolve, score_batches, victim_images
    from gileak.spec import BenchSpec, parse_component
    from gileak.threat import Target, shared_gradients

    splits = Photos().load(seed=0)
    shape = CNN().input_shape(tuple(splits.train_images.shape[1:]))
    train = data.fit_images(splits.train_images, shape)
    spec = BenchSpec(victims=args.victims, iterations=args.iterations)
    config = fl.FLConfig(rounds=1, seed=0)
    print(f"photos, cnn at initialisation, ig (labels known), {args.victims} victims x {args.iterations} iterations, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'client':>34} {'images':>7} {'SSIM mean':>10} {'SSIM per image':>40} {'seconds':>8}")
    for stem, text in PROTOCOLS:
        client = resolve("client", parse_component(text)[0])
        per_victim = client.component.images_per_victim()
        index = victim_images(len(train), config, spec, client, seed=0)
        images, labels = train[index], splits.train_labels[index]
        net = build_net(CNN(), NoDefense(), shape, 10, seed=0, device="cpu").train()
        seeds = list(range(args.victims))
        uploads = shared_gradients(net, NoDefense(), images, labels, seeds=seeds, client=client.component)
        target = Target(net=net, shared_gradient=uploads, input_shape=shape, num_classes=10, labels=labels,
                        client=client.component)
        torch.manual_seed(0)
        started = time.perf_counter()
        result = InvertingGradients().attack(target, seeds=seeds, max_iterations=args.iterations)
        seconds = time.perf_counter() - started
        scores = score_batches(result.images.clamp(0, 1), images, per_victim, "cpu", False)
        args.out.mkdir(parents=True, exist_ok=True)
        path = save_reconstruction_grid(images, scores.matched, args.out / f"threat-models-{stem}.png",
                                        columns=max(per_victim, 8 // per_victim * per_victim), min_side=48)
        ssim = scores.ssim
        shown = " ".join(f"{value:.2f}" for value in ssim)
        print(f"{text:>34} {len(ssim):>7} {sum(ssim) / len(ssim):>10.3f} {shown:>40} {seconds:>8.0f}  -> {path.name}",
              flush=True)


if __name__ == "__main__":
    main()
