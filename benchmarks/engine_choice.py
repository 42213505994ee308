"""What the automatic engine choice (gileak.engine.choice) decides for each model and number of
victims on this machine, with the rates its probe measured and what the probe cost.

Usage: python benchmarks/engine_choice.py [--models cnn,mlp,resnet18,vit] [--victims 8,32,128]
       [--attack ig] [--device auto] [--json rows.json]

Each row runs `choose()` as the runner does at the start of a cell: by rule where the batched
engine is the factored step (no timing), else a probe of the batched engine on up to two vmap
chunks of the victims against the loop on one victim (a warm-up and two timed iterations each).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gileak.default_plugins.attacks import DLG, IDLG, InvertingGradients
from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import CNN, MLP, ResNet18, ViT
from gileak.engine import choice
from gileak.threat import Target, shared_gradients

MODELS = {"cnn": CNN, "mlp": MLP, "resnet18": ResNet18, "vit": ViT}
ATTACKS = {"ig": InvertingGradients, "idlg": lambda: IDLG(labels="known"), "dlg": DLG}
INPUT = (3, 32, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp,resnet18,vit")
    parser.add_argument("--victims", default="8,32,128")
    parser.add_argument("--attack", default="ig", choices=sorted(ATTACKS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} attack={args.attack}")
    print(f"{'model':>9} {'victims':>8} {'engine':>8} {'path':>9} {'how':>6} {'batched it/s':>13} {'loop it/s':>10} "
          f"{'probe s':>8}")
    rows = []
    for model_name in args.models.split(","):
        for count in (int(v) for v in args.victims.split(",")):
            torch.manual_seed(0)
            net = MODELS[model_name]().build(INPUT, 10).to(device).train()
            images = torch.rand(count, *INPUT, device=device)
            labels = torch.randint(0, 10, (count,), device=device)
            target = Target(net, shared_gradients(net, NoDefense(), images, labels), INPUT, 10, labels=labels)
            started = time.perf_counter()
            chosen = choice.choose(ATTACKS[args.attack](), target, list(range(count)))
            seconds = time.perf_counter() - started
            rates = chosen.rates
            print(f"{model_name:>9} {count:>8} {chosen.engine:>8} {chosen.path:>9} {chosen.how:>6} "
                  f"{rates.get('batched', float('nan')):>13.1f} {rates.get('loop', float('nan')):>10.1f} "
                  f"{seconds:>8.1f}", flush=True)
            rows.append({"model": model_name, "victims": count, **chosen.as_dict(), "seconds": seconds})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "torch": torch.__version__, "attack": args.attack, "rows": rows}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
