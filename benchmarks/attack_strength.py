"""Attack strength against the iteration budget: SSIM of Inverting Gradients' learning-rate
schedules (and learning rate / TV weight) at each cap, on the undefended CNN, offline data.

Three stages, each result cached in a JSON-lines file so a rerun (or a killed run) only computes
what is missing:

1. tune — choose by: `photos` victims of seed 0 (`--tune-victims`), cap `--tune-budget` (1,000). Every schedule (paper: the
   paper's plateau rule scaled to the cap, gileak's default before this study; plateau: fixed
   patiences 100 / 1,000; step: Inverting Gradients' own x0.1 at 3/8, 5/8, 7/8 of the cap; cosine)
   at lr 1, 0.1 and 0.03 with the paper's TV 0.01; then each schedule's best lr at TV 0.05 and 0.2.
2. eval — held out: images and victims nothing was chosen by: `photos` victims of seed 1 (none
   of the tuning victims), `digits`, `lfw`, and crops of scikit-learn's two sample photos (china,
   flower: used by no gileak dataset), `--victims` each, at the caps of `--budgets`: the old
   default, each schedule's tuned best, and breaching's shipped recipe (step, lr 0.1, TV 0.2).
3. long — the larger caps of `--long` for the old default and the strongest tuned candidate
   only (ranked by the tuning SSIM, so this stage can run in a second process once tuning is
   cached), on the first `--long-victims` of each set: 3,000 on every held-out set, 10,000 on
   photos (add e.g. 20000:1:photos where the machine allows).

Prints one table (mean SSIM over the held-out sets per candidate and cap, and per dataset) and
writes PNG curves. `--plot-only` redraws from the cache.

Usage: python benchmarks/attack_strength.py [--budgets 100,300,1000]
       [--long 3000:1:all,10000:1:photos] [--victims 16] [--long-victims 8]
       [--tune-victims 16] [--tune-budget 1000]
       [--cache FILE] [--figure PNG] [--threads 1] [--stages tune,eval,long] [--plot-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

OLD_DEFAULT = ("paper", 1.0, 0.01)
BREACHING = ("step", 0.1, 0.2)
SCHEDULES = ("paper", "plateau", "step", "cosine")
TUNE_LRS = (1.0, 0.1, 0.03)
TUNE_TVS = (0.05, 0.2)
HELD_OUT = ("photos", "digits", "lfw", "unseen")


def label(config) -> str:
    schedule, lr, tv = config
    return f"ig(schedule={schedule},lr={lr:g},tv={tv:g})"


class Cache:
    """Results by (dataset, seed, victims, config, budget), one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    @staticmethod
    def key(dataset, seed, victims, config, budget) -> str:
        return f"{dataset}|{seed}|{victims}|{label(config)}|{budget}"

    def get(self, *args):
        return self.rows.get(self.key(*args))

    def first(self, dataset, seed, victims, config, budget):
        """The result for the first `victims` victims, taken from a run on at least as many: the
        victims of a set are the first entries of one seeded permutation, and each victim's
        reconstruction depends on its own seed alone, so the first 8 of 16 are the 8-victim run."""
        runs = [r for r in self.rows.values() if r["dataset"] == dataset and r["seed"] == seed and r["budget"] == budget
                and (r["schedule"], r["lr"], r["tv"]) == config and r["victims"] >= victims]
        if not runs:
            return None
        row = min(runs, key=lambda r: r["victims"])
        ssim = row["ssim"][:victims]
        mean = sum(ssim) / victims
        return {**row, "victims": victims, "ssim": ssim, "ssim_mean": mean,
                "ssim_std": (sum((v - mean) ** 2 for v in ssim) / victims) ** 0.5,
                "asr": 100.0 * sum(v >= 0.5 for v in ssim) / victims}

    def put(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def unseen_folder(root: Path) -> Path:
    """32x32 crops (1/8 of the photo's height, stride half that) of scikit-learn's china.jpg and
    flower.jpg, flat ones included (near-uniform crops are where a weak attack fails)."""
    from paper_findings import write_unseen_images  # benchmarks/, this script's directory

    folder = root / "unseen-crops"
    if folder.is_dir() and any(folder.rglob("*.png")):
        return folder
    write_unseen_images(folder, size=32, min_std=0.0)
    return folder


def victims_target(dataset: str, seed: int, count: int, work: Path, exclude=None):
    """The undefended CNN (weights of `seed`, untrained: --rounds 0), `count` victims of the
    dataset's training split and their shared gradients, as `gileak bench` builds them."""
    import torch

    from gileak import data
    from gileak.default_plugins.defenses import NoDefense
    from gileak.default_plugins.models import CNN
    from gileak.runner import build_net, resolve
    from gileak.spec import ComponentRef
    from gileak.threat import Target, shared_gradients

    ref = ComponentRef(name="folder", params={"path": str(unseen_folder(work))}) if dataset == "unseen" \
        else ComponentRef(name=dataset)
    component = resolve("dataset", ref).component
    splits = component.load(seed=seed)
    model = CNN()
    shape = model.input_shape(tuple(splits.train_images.shape[1:]))
    images = data.fit_images(splits.train_images, shape)
    num_classes = max(component.info().num_classes, int(splits.train_labels.max()) + 1)
    excluded = {bytes(image.numpy()) for image in exclude} if exclude is not None else set()
    pool = torch.tensor([i for i in range(len(images)) if bytes(images[i].numpy()) not in excluded])
    index = data.pick_victims(pool, count, seed)
    net = build_net(model, NoDefense(), shape, num_classes, seed, "cpu")
    net.train()
    victims, labels = images[index], splits.train_labels[index]
    gradients = shared_gradients(net, NoDefense(), victims, labels, seed=seed)
    target = Target(net=net, shared_gradient=gradients, input_shape=shape, num_classes=num_classes, labels=labels)
    return target, victims


def run(cache: Cache, prepared: dict, dataset: str, seed: int, victims: int, config, budget: int) -> dict:
    from gileak import metrics
    from gileak.default_plugins.attacks import InvertingGradients

    row = cache.get(dataset, seed, victims, config, budget)
    if row is not None:
        return row
    target, originals = prepared[(dataset, seed, victims)]
    schedule, lr, tv = config
    attack = InvertingGradients(schedule=schedule, lr=lr, tv=tv)
    started = time.perf_counter()
    result = attack.attack(target, seeds=[seed * 1_000_003 + i for i in range(victims)], max_iterations=budget)
    seconds = time.perf_counter() - started
    ssim = metrics.ssim(result.images.clamp(0, 1), originals)
    mean, std = metrics.summarize(ssim)
    row = {"key": cache.key(dataset, seed, victims, config, budget), "dataset": dataset, "seed": seed,
           "victims": victims, "schedule": schedule, "lr": lr, "tv": tv, "budget": budget, "ssim": ssim,
           "ssim_mean": mean, "ssim_std": std, "asr": metrics.attack_success_rate(ssim), "seconds": seconds,
           "iterations_mean": sum(result.iterations) / victims}
    cache.put(row)
    print(f"  {dataset:7s} seed {seed} {label(config):40s} cap {budget:>6}: SSIM {mean:.3f} ± {std:.3f}  "
          f"({seconds:.0f} s, {row['iterations_mean']:.0f} it)", flush=True)
    return row


def tuned(cache: Cache, prepared, victims: int, budget: int) -> dict[str, tuple]:
    """Each schedule's best (lr, TV) on the tuning victims at the tuning cap."""
    best = {}
    for schedule in SCHEDULES:
        by_lr = {lr: run(cache, prepared, "photos", 0, victims, (schedule, lr, 0.01), budget)["ssim_mean"]
                 for lr in TUNE_LRS}
        lr = max(by_lr, key=by_lr.get)
        by_tv = {tv: run(cache, prepared, "photos", 0, victims, (schedule, lr, tv), budget)["ssim_mean"]
                 for tv in (0.01, *TUNE_TVS)}
        best[schedule] = (schedule, lr, max(by_tv, key=by_tv.get))
    return best


def held_out_mean(cache: Cache, config, budget: int, victims: int) -> tuple[float, int] | None:
    """(mean SSIM over the held-out sets measured at this cap, how many sets that is)."""
    values = [v for d in HELD_OUT if (v := cache.first(d, 1, victims, config, budget)) is not None]
    if not values:
        return None
    return sum(v["ssim_mean"] for v in values) / len(values), len(values)


def table(cache: Cache, candidates: list, budgets: list[int], victims: int) -> str:
    lines = ["Mean SSIM over the held-out sets (" + ", ".join(HELD_OUT) + f"; the first {victims} victims of "
             "each; '(1 set)': a long cap ran on fewer sets), undefended CNN, --rounds 0:", ""]
    head = "| candidate | " + " | ".join(f"{b:,}" for b in budgets) + " |"
    lines += [head, "|---|" + "---:|" * len(budgets)]
    for config in candidates:
        cells = []
        for budget in budgets:
            value = held_out_mean(cache, config, budget, victims)
            if value is None:
                cells.append("—")
            else:
                sets = "" if value[1] == len(HELD_OUT) else f" ({value[1]} set{'s' if value[1] > 1 else ''})"
                cells.append(f"{value[0]:.3f}{sets}")
        lines.append(f"| {label(config)} | " + " | ".join(cells) + " |")
    lines += ["", "Per dataset (SSIM mean ± std, ASR %):", ""]
    lines += ["| candidate | dataset | " + " | ".join(f"{b:,}" for b in budgets) + " |",
              "|---|---|" + "---:|" * len(budgets)]
    for config in candidates:
        for dataset in HELD_OUT:
            cells = []
            for budget in budgets:
                row = cache.first(dataset, 1, victims, config, budget)
                cells.append("—" if row is None else f"{row['ssim_mean']:.2f} ± {row['ssim_std']:.2f} ({row['asr']:.0f})")
            lines.append(f"| {label(config)} | {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_table(cache: Cache, victims: int, budget: int) -> str:
    lines = [f"Tuning (photos, seed 0, {victims} victims, cap {budget:,}): SSIM mean", "",
             "| schedule | lr | TV | SSIM | ASR % | iterations run |", "|---|---:|---:|---:|---:|---:|"]
    for row in sorted((r for r in cache.rows.values() if r["seed"] == 0 and r["budget"] == budget
                       and r["dataset"] == "photos" and r["victims"] == victims),
                      key=lambda r: (SCHEDULES.index(r["schedule"]), -r["lr"], r["tv"])):
        lines.append(f"| {row['schedule']} | {row['lr']:g} | {row['tv']:g} | {row['ssim_mean']:.3f} | "
                     f"{row['asr']:.0f} | {row['iterations_mean']:.0f} |")
    return "\n".join(lines)


def plot(cache: Cache, candidates: list, budgets: list[int], victims: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean", *HELD_OUT]  # the mean panel: caps every held-out set ran
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True)
    for ax, panel in zip(axes, panels):
        for config in candidates:
            points = []
            for budget in budgets:
                if panel == "mean":
                    found = held_out_mean(cache, config, budget, victims)
                    value = found[0] if found and found[1] == len(HELD_OUT) else None
                else:
                    row = cache.first(panel, 1, victims, config, budget)
                    value = row["ssim_mean"] if row else None
                if value is not None:
                    points.append((budget, value))
            if points:
                style = "--" if config == OLD_DEFAULT else "-"
                ax.plot(*zip(*points), style, marker="o", label=label(config).removeprefix("ig"))
        ax.set_xscale("log")
        ax.set_title("held-out mean" if panel == "mean" else panel)
        ax.set_xlabel("iteration cap")
        ax.axhline(0.5, color="red", linewidth=0.6)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SSIM (mean)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Inverting Gradients on the undefended CNN: SSIM against the iteration cap")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="100,300,1000", help="caps every candidate runs on every held-out set")
    parser.add_argument("--long", default="3000:1:all,10000:1:photos",
                        help="CAP:TOP:DATASETS,...: the old default and the TOP strongest tuned candidates at CAP "
                        "on DATASETS (all, or names joined by +)")
    parser.add_argument("--victims", type=int, default=16, help="victims per held-out set (eval)")
    parser.add_argument("--long-victims", type=int, default=8, help="victims per held-out set at the long caps "
                        "(the first of the eval victims); the curves use this many at every cap")
    parser.add_argument("--tune-victims", type=int, default=16)
    parser.add_argument("--tune-budget", type=int, default=1000)
    parser.add_argument("--stages", default="tune,eval,long")
    parser.add_argument("--cache", type=Path, default=Path("gileak-runs/attack-strength/results.jsonl"))
    parser.add_argument("--figure", type=Path, default=Path("gileak-runs/attack-strength/attack-strength.png"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    budgets = [int(b) for b in args.budgets.split(",") if b]
    long_plan = []
    for item in filter(None, args.long.split(",")):
        cap, top, datasets = item.split(":")
        long_plan.append((int(cap), int(top), HELD_OUT if datasets == "all" else tuple(datasets.split("+"))))
    long_budgets = [cap for cap, _, _ in long_plan]
    stages = set(args.stages.split(","))
    cache = Cache(args.cache)
    work = args.cache.parent
    prepared: dict = {}
    if not args.plot_only:
        target, tuning_victims = victims_target("photos", 0, args.tune_victims, work)
        prepared[("photos", 0, args.tune_victims)] = (target, tuning_victims)
        for dataset in HELD_OUT:
            exclude = tuning_victims if dataset == "photos" else None
            for count in {args.victims, args.long_victims}:
                prepared[(dataset, 1, count)] = victims_target(dataset, 1, count, work, exclude)

    def candidates() -> tuple[list, list]:
        """(every candidate, the tuned candidates strongest first by the tuning SSIM)."""
        best = tuned(cache, prepared, args.tune_victims, args.tune_budget)
        score = {c: cache.get("photos", 0, args.tune_victims, c, args.tune_budget)["ssim_mean"] for c in best.values()}
        ranked = sorted((c for c in best.values() if c != OLD_DEFAULT), key=lambda c: -score[c])
        return list(dict.fromkeys([OLD_DEFAULT, *best.values(), BREACHING])), ranked

    if args.plot_only:
        found = {(r["schedule"], r["lr"], r["tv"]) for r in cache.rows.values() if r["seed"] == 1}
        ordered = [OLD_DEFAULT, *sorted(found - {OLD_DEFAULT, BREACHING}), BREACHING]
        chosen = [c for c in ordered if c in found]
    else:
        if "tune" in stages:
            print(f"tune: photos seed 0, {args.tune_victims} victims, cap {args.tune_budget}", flush=True)
        chosen, strongest = candidates()
        if "eval" in stages:
            print("eval: " + ", ".join(label(c) for c in chosen), flush=True)
            for budget in budgets:
                for config in chosen:
                    for dataset in HELD_OUT:
                        run(cache, prepared, dataset, 1, args.victims, config, budget)
        if "long" in stages:
            for budget, top, datasets in long_plan:
                for config in [OLD_DEFAULT, *strongest[:top]]:
                    for dataset in datasets:
                        run(cache, prepared, dataset, 1, args.long_victims, config, budget)
    all_budgets = sorted({*budgets, *long_budgets})
    print()
    print(tuning_table(cache, args.tune_victims, args.tune_budget))
    print()
    print(table(cache, chosen, budgets, args.victims))
    print()
    print(table(cache, chosen, all_budgets, args.long_victims))
    plot(cache, chosen, all_budgets, args.long_victims, args.figure)
    print(f"\nwall time: {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
