"""What the automatic engine choice (gileak.engine.choice) decides for each model and number of
victims on this machine, and whether the faster engine is what it decides: both engines timed
as `GILEAK_ENGINE=probe` times them (the batched one on up to two vmap chunks of the victims, the
loop on one victim; a warm-up and two timed iterations each, --repeats times, the median).

Usage: python benchmarks/engine_choice.py [--models cnn,mlp,resnet18,vit] [--victims 8,32,128]
       [--attack ig] [--repeats 3] [--device auto] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from gileak.default_plugins.attacks import DLG, IDLG, InvertingGradients
from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import CNN, MLP, ResNet18, ViT
from gileak.engine import choice
from gileak.engine.matching import vmap_chunk
from gileak.threat import Target, shared_gradients

MODELS = {"cnn": CNN, "mlp": MLP, "resnet18": ResNet18, "vit": ViT}
ATTACKS = {"ig": InvertingGradients, "idlg": lambda: IDLG(labels="known"), "dlg": DLG}
INPUT = (3, 32, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp,resnet18,vit")
    parser.add_argument("--victims", default="8,32,128")
    parser.add_argument("--attack", default="ig", choices=sorted(ATTACKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} attack={args.attack}")
    print(f"{'model':>9} {'victims':>8} {'rule':>8} {'path':>9} {'batched it/s':>13} {'loop it/s':>10} "
          f"{'batched / loop':>15} {'rule right':>11}")
    rows = []
    for model_name in args.models.split(","):
        for count in (int(v) for v in args.victims.split(",")):
            torch.manual_seed(0)
            net = MODELS[model_name]().build(INPUT, 10).to(device).train()
            images = torch.rand(count, *INPUT, device=device)
            labels = torch.randint(0, 10, (count,), device=device)
            target = Target(net, shared_gradients(net, NoDefense(), images, labels), INPUT, 10, labels=labels)
            attack = ATTACKS[args.attack]()
            chosen = choice.choose(attack, target, list(range(count)))
            chunk = vmap_chunk(target, count) or count
            probed = count if chosen.path in ("chain", "factored") else min(count, max(2, 2 * chunk))
            seeds = list(range(count))
            batched = statistics.median(choice._rate(attack, choice._subset(target, probed), seeds[:probed], "batched")
                                        for _ in range(args.repeats))
            loop = statistics.median(choice._rate(attack, choice._subset(target, 1), seeds[:1], "loop")
                                     for _ in range(args.repeats))
            faster = "batched" if batched >= loop else "loop"
            right = chosen.engine == faster
            print(f"{model_name:>9} {count:>8} {chosen.engine:>8} {chosen.path:>9} {batched:>13.1f} {loop:>10.1f} "
                  f"{batched / loop:>14.2f}x {'yes' if right else 'NO':>11}", flush=True)
            rows.append({"model": model_name, "victims": count, "choice": chosen.as_dict(), "batched_its": batched,
                         "loop_its": loop, "batched_victims": probed, "rule_right": right})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "torch": torch.__version__, "attack": args.attack, "rows": rows}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
