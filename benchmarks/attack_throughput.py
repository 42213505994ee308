"""Attack throughput: victim-iterations per second of the batched engine (the factored fast
path where the model allows it — "chain" where it is a plain Conv2d / Linear / ReLU chain
stepped without autograd — else vmap), of vmap(grad(...)) alone, and of a per-victim loop;
and the useful FLOP/s — the FLOPs of one victim's attack step in the original formulation
(torch.utils.flop_counter on a single-victim, vmap-free step) x victim-iterations per second —
as a share of a square float32 matmul's FLOP/s measured in the same run (2048 on a CPU, 8192 on
a GPU; on a GPU also as a share of the same matmul in TF32, `allow_tf32`, the tensor cores'
float32 rate). The attack itself runs with PyTorch's precision settings as they are (printed:
cuDNN convolutions default to TF32 on a GPU, matmuls to strict float32).

Usage: python benchmarks/attack_throughput.py [--models cnn] [--victims 1,8,32,128] [--iterations 20]
       [--repeats 3] [--attacks ig,idlg] [--device auto] [--json rows.json] [--clock wall|cpu]

`--attacks idlg` adds the L-BFGS family (dlg, idlg and cpl share its solver): victim-iterations/s
of the batched L-BFGS (timed --repeats times before the loop and --repeats times after it, the
median of all: the loop takes minutes, over which a shared machine's speed drifts by 10-20%,
and so the two sample the same stretch of time) and of the per-victim torch.optim.LBFGS loop (timed over the same
iterations on 16 of the N victims spread evenly, with their own seeds — `--loop-victims 0` times
it on all N, `--loop-repeats 1` once: each victim's searches take their own number of
evaluations, 23 to 181 in 20 iterations of the CNN, so a few victims are a sample: 4 of 128 gave
the loop 19 to 33 it/s against 20 for all 128), the evaluations of loss and gradient per
victim-iteration (the line search's), and useful FLOP/s counted per evaluation.

`--batch 1,4,16` (or `--clients "gradient(batch=4),fedavg(batch=4,steps=5)"`) attacks victims that
upload a batch's gradient (or another client protocol) instead: for each client it reports the
engine, victim-iterations/s and victim-images/s — victims x images per victim x iterations per
second, the rate at which images are attacked — of the default engine and of vmap alone.

Each figure is the median of --repeats timed runs; the machine's other load shows up as spread
between repeats, so run it on an otherwise idle machine, or on a shared one with one thread and
`--clock cpu`. The same script runs on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import CNN, MLP, ResNet18, ViT
from gileak.engine import MatchingConfig, gradient_matching
from gileak.threat import Target, shared_gradients

MODELS = {"cnn": CNN, "mlp": MLP, "resnet18": ResNet18, "vit": ViT}
#: The clock the runs are timed with: wall time, or (--clock cpu) this process's CPU time, which a
#: shared machine's other load disturbs less (with one thread it is the time the work ran).
_clock = time.perf_counter
INPUT = (3, 32, 32)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(target: Target, labels: torch.Tensor, iterations: int, repeats: int, **engine) -> float:
    """Victim-iterations per second (median of `repeats`); stopping rules are off so every
    victim runs every iteration. `engine`: MatchingConfig's vectorized / factored."""
    config = MatchingConfig(min_loss=0.0, stop_patience=10**9, **engine)
    seeds = list(range(target.num_victims))
    gradient_matching(target, config, seeds=seeds, max_iterations=1, labels=labels)  # warm-up
    rates = []
    for _ in range(repeats):
        _sync(target.device)
        started = _clock()
        gradient_matching(target, config, seeds=seeds, max_iterations=iterations, labels=labels)
        _sync(target.device)
        rates.append(target.num_victims * iterations / (_clock() - started))
    return statistics.median(rates)


def matmul_flops(device: str, size: int = 2048, repeats: int = 10, tf32: bool = False) -> float:
    """FLOP/s of a size x size float32 matmul on this machine (best of `repeats`; on a GPU each
    timing covers 10 products, launches being asynchronous); `tf32`: with
    torch.backends.cuda.matmul.allow_tf32 (tensor cores, 10-bit mantissas), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        a @ b
        products = 10 if torch.device(device).type == "cuda" else 1
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            for _ in range(products):
                a @ b
            _sync(device)
            best = min(best, (time.perf_counter() - started) / products)
        return 2 * size**3 / best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def step_flops(target: Target, labels: torch.Tensor, **matching) -> float:
    """FLOPs of ONE victim's attack step in the original formulation (dummy gradient +
    distance + its gradient w.r.t. the image, no vmap), whatever engine runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    from gileak.engine.matching import make_victim_loss

    victim_loss = make_victim_loss(target, MatchingConfig(**matching))
    shared = tuple(target.shared_gradient[n][0] for n in victim_loss.names)
    image = torch.rand(target.input_shape, device=target.device)
    with FlopCounterMode(display=False) as counter:
        torch.func.grad_and_value(victim_loss, has_aux=True)(image, labels[0], shared)
    return float(counter.get_total_flops())


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (else argparse's usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def measure_lbfgs(target: Target, labels: torch.Tensor, iterations: int, repeats: int,
                  vectorized: bool, seeds: list[int] | None = None) -> list[tuple[float, float]]:
    """(victim-iterations/s, victim-evaluations/s) of each of `repeats` timed runs of iDLG's
    L-BFGS; no victim stops early (min_loss 0). `seeds`: the victims' (default 0, 1, ...)."""
    from gileak.engine import lbfgs

    config = lbfgs.LBFGSConfig(min_loss=0.0, vectorized=vectorized)
    seeds = list(range(target.num_victims)) if seeds is None else seeds
    lbfgs.lbfgs_matching(target, config, seeds=seeds, max_iterations=1, labels=labels)  # warm-up
    rates = []
    for _ in range(repeats):
        counter = _EvaluationCounter(target) if not vectorized else None
        _sync(target.device)
        started = _clock()
        lbfgs.lbfgs_matching(target, config, seeds=seeds, max_iterations=iterations, labels=labels)
        _sync(target.device)
        seconds = _clock() - started
        evaluations = lbfgs.last_run.get("evaluations", 0) if vectorized else counter.close()
        rates.append((target.num_victims * iterations / seconds, evaluations / seconds))
    return rates


def _median(rates: list[tuple[float, float]]) -> tuple[float, float]:
    """The run of median victim-iterations/s (its evaluations/s with it)."""
    return sorted(rates)[len(rates) // 2]


class _EvaluationCounter:
    """Counts the reference loop's evaluations (forward passes of the victim's model)."""

    def __init__(self, target: Target) -> None:
        self.count = 0
        self.handle = target.net.register_forward_pre_hook(self._seen)

    def _seen(self, module, inputs) -> None:
        self.count += 1

    def close(self) -> int:
        self.handle.remove()
        return self.count


def engine_name(target: Target) -> str:
    from gileak.engine.matching import factored_engine, make_victim_loss

    config = MatchingConfig()
    fast = factored_engine(target, config, make_victim_loss(target, config))
    if fast is None:
        return "vmap"
    return "chain" if fast.chain is not None else "factored"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--victims", default="1,8,32,128")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--loop-iterations", type=int, default=5, help="iterations for the slower per-victim loop")
    parser.add_argument("--loop-victims", type=int, default=None,
                        help="time the loop on at most this many victims; default: all for ig (its rate does not "
                             "depend on N), 16 for idlg (spread evenly over the N: their searches differ; 0: all)")
    parser.add_argument("--loop-repeats", type=_positive, default=None, help="timed runs of the loop (default: --repeats)")
    parser.add_argument("--repeats", type=_positive, default=3, help="timed runs per figure; the median is shown")
    parser.add_argument("--no-vmap", action="store_true", help="skip the vmap column (slow for large models)")
    parser.add_argument("--attacks", default="ig", help="ig (Adam: ig, ignore) and/or idlg (L-BFGS: dlg, idlg, cpl)")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes B: attack gradient(batch=B) "
                        "victims and report victim-images/s")
    parser.add_argument("--clients", default=None, help="client protocols in gileak's component syntax, "
                        "e.g. \"gradient(batch=4),fedavg(batch=4,steps=5)\"")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--matmul-size", type=int, default=None, help="default: 2048 on a CPU, 8192 on a GPU")
    parser.add_argument("--json", default=None, help="also write the rows (and the matmul rates) to this file")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time with the wall clock or this process's CPU time (a CPU, one thread: less "
                             "disturbed by a shared machine's other load)")
    args = parser.parse_args()
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.batch or args.clients:
        clients_table(args)
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = torch.device(device).type == "cuda"
    size = args.matmul_size or (8192 if cuda else 2048)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"input={'x'.join(map(str, INPUT))} clock={args.clock}")
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "matmul_size": size,
            "clock": args.clock}
    if cuda:
        info.update(gpu=torch.cuda.get_device_name(torch.device(device)),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        print(f"gpu={info['gpu']} attack precision: cudnn.allow_tf32={info['cudnn_allow_tf32']} "
              f"cuda.matmul.allow_tf32={info['matmul_allow_tf32']}")
    peak = matmul_flops(device, size)
    peak_tf32 = matmul_flops(device, size, tf32=True) if cuda else None
    info.update(matmul_fp32_flops=peak, matmul_tf32_flops=peak_tf32)
    print(f"{size}x{size} float32 matmul: {peak / 1e9:.1f} GFLOP/s"
          + (f"; TF32: {peak_tf32 / 1e9:.1f} GFLOP/s" if peak_tf32 else ""))
    rows = []
    attacks = args.attacks.split(",")
    for model_name in args.models.split(","):
        for attack in attacks:
            tail = f" {'of TF32':>8}" if cuda else ""
            if attack == "ig":
                print(f"{'model':>8} {'engine':>9} {'victims':>8} {'batched it/s':>13} {'vmap it/s':>10} "
                      f"{'loop it/s':>10} {'ratio':>7} {'useful GFLOP/s':>15} {'of matmul':>10}{tail}")
            elif attack == "idlg":
                print(f"{'model':>8} {'L-BFGS':>9} {'victims':>8} {'batched it/s':>13} {'evals/it':>10} "
                      f"{'loop it/s':>10} {'ratio':>7} {'useful GFLOP/s':>15} {'of matmul':>10}{tail}")
            else:
                raise SystemExit(f"--attacks: unknown '{attack}' (use ig, idlg)")
            for count in (int(v) for v in args.victims.split(",")):
                if cuda:
                    torch.cuda.reset_peak_memory_stats(torch.device(device))
                torch.manual_seed(0)
                net = MODELS[model_name]().build(INPUT, 10).to(device)
                images = torch.rand(count, *INPUT, device=device)
                labels = torch.randint(0, 10, (count,), device=device)
                target = Target(net, shared_gradients(net, NoDefense(), images, labels), INPUT, 10, labels=labels)
                if attack == "ig":
                    batched = measure(target, labels, args.iterations, args.repeats)
                    vmapped = float("nan") if args.no_vmap else measure(target, labels, args.iterations, args.repeats,
                                                                           factored=False)
                    few = min(count, args.loop_victims or count)
                    subset = Target(net, {k: v[:few] for k, v in target.shared_gradient.items()}, INPUT, 10,
                                    labels=labels[:few])
                    looped = measure(subset, labels[:few], args.loop_iterations, args.loop_repeats or args.repeats,
                                     vectorized=False)
                    useful = step_flops(target, labels) * batched
                    middle = f"{vmapped:>10.0f}"
                    name = engine_name(target)
                else:
                    from gileak.engine import lbfgs

                    runs = measure_lbfgs(target, labels, args.iterations, args.repeats, True)
                    name = lbfgs.last_run.get("engine", "?")
                    # The loop solves victims one after another: it is timed on a few victims
                    # (the same ones, with their seeds), spread evenly over the N — their searches
                    # take 23 to 181 evaluations in 20 iterations, so the first few are no sample
                    # — over the same iterations (a search takes more evaluations later on).
                    wanted = 16 if args.loop_victims is None else args.loop_victims
                    few = count if wanted <= 0 else min(count, wanted)
                    picked = torch.linspace(0, count - 1, few).round().long().unique()
                    subset = Target(net, {k: v[picked] for k, v in target.shared_gradient.items()}, INPUT, 10,
                                    labels=labels[picked])
                    looped, _ = _median(measure_lbfgs(subset, labels[picked], args.iterations,
                                                      args.loop_repeats or args.repeats, False, seeds=picked.tolist()))
                    # and the batched solver again after the loop: both then sample the machine
                    # over the same stretch of time (a shared machine's speed drifts by 10-20%
                    # over the loop's minutes); the median of the runs before and after
                    runs += measure_lbfgs(target, labels, args.iterations, args.repeats, True)
                    batched, evaluations = _median(runs)
                    useful = step_flops(target, labels, distance="euclidean", tv_weight=0.0) * evaluations
                    middle = f"{evaluations / batched:>10.2f}"
                share_tf32 = useful / peak_tf32 if peak_tf32 else None
                print(f"{model_name:>8} {name:>9} {count:>8} {batched:>13.0f} {middle} {looped:>10.0f} "
                      f"{batched / looped:>6.1f}x {useful / 1e9:>15.2f} {100 * useful / peak:>9.1f}%"
                      + (f" {100 * share_tf32:>7.1f}%" if share_tf32 is not None else ""), flush=True)
                rows.append({"model": model_name, "attack": attack, "engine": name, "victims": count,
                             "loop_victims": few,
                             "batched_its": batched, "loop_its": looped, "ratio": batched / looped,
                             "vmap_its": None if attack != "ig" or args.no_vmap else vmapped,
                             "evaluations_per_iteration": evaluations / batched if attack == "idlg" else 1.0,
                             "useful_flops": useful, "share_fp32": useful / peak, "share_tf32": share_tf32,
                             "peak_memory": torch.cuda.max_memory_allocated(torch.device(device)) if cuda else None})
                if args.json:  # rewritten after every row: a run cut short keeps what it measured
                    _write_json(args.json, info, rows)
    if args.json:
        _write_json(args.json, info, rows)


def _write_json(path: str, info: dict, rows: list[dict]) -> None:
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps({**info, "rows": rows}, indent=1))


def _clients(args) -> list:
    """The client components asked for: gradient(batch=B) per --batch entry, then --clients."""
    from gileak.runner import resolve
    from gileak.spec import parse_components

    text = ",".join([f"gradient(batch={b.strip()})" for b in (args.batch or "").split(",") if b.strip()]
                    + ([args.clients] if args.clients else []))
    return [resolve("client", ref) for ref in parse_components(text)]


def clients_table(args) -> None:
    """Victim-iterations/s and victim-images/s of gradient matching on victims of each client."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"input={'x'.join(map(str, INPUT))}")
    print(f"{'model':>8} {'client':>30} {'engine':>9} {'victims':>8} {'img/victim':>11} {'victim it/s':>12} "
          f"{'victim-images/s':>16} {'vmap images/s':>14}")
    for model_name in args.models.split(","):
        for client in _clients(args):
            per_victim = client.component.images_per_victim()
            for count in (int(v) for v in args.victims.split(",")):
                torch.manual_seed(0)
                net = MODELS[model_name]().build(INPUT, 10).to(device)
                images = torch.rand(count * per_victim, *INPUT, device=device)
                labels = torch.randint(0, 10, (count * per_victim,), device=device)
                uploads = shared_gradients(net, NoDefense(), images, labels, client=client.component)
                target = Target(net, uploads, INPUT, 10, labels=labels, client=client.component)
                batched = measure(target, labels, args.iterations, args.repeats)
                name = engine_name(target)
                vmapped = float("nan")
                if not args.no_vmap and name != "vmap":
                    vmapped = measure(target, labels, args.iterations, args.repeats, factored=False) * per_victim
                elif name == "vmap":
                    vmapped = batched * per_victim
                print(f"{model_name:>8} {client.label:>30} {name:>9} {count:>8} {per_victim:>11} {batched:>12.0f} "
                      f"{batched * per_victim:>16.0f} {vmapped:>14.0f}", flush=True)


if __name__ == "__main__":
    main()
