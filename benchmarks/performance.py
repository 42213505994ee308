"""All performance figures in one run: attack throughput per model (batched vs a per-victim loop,
useful FLOP/s as a share of a 2048^2 float32 matmul measured in the same run), federated
training samples per second, and the wall time and peak memory of the quick default bench.

Each part is its own script (run it alone for more options); this one runs them in turn, in
fresh processes, so one part's memory does not count in the next.

Usage: python benchmarks/performance.py [--models cnn,resnet18,vit,mlp] [--device auto]
       [--quick-bench-args "..."]
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(title: str, args: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    subprocess.run(args, check=True)


def quick_bench(device: str, extra: list[str]) -> None:
    """The README's main job (`gileak bench`, the quick profile) in a child process: wall time
    and the child's peak resident memory."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-c", "from gileak.cli import main; main()", "bench", "--device", device,
                "--out", str(Path(tmp) / "run"), *extra]
        print(f"\n=== Quick default bench\n$ gileak bench --device {device} {' '.join(extra)}", flush=True)
        started = time.perf_counter()
        result = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        if result.returncode != 0:
            print(result.stderr[-2000:])
            raise SystemExit(f"gileak bench failed with exit code {result.returncode}")
        print(f"wall time {seconds:.1f} s, peak memory {peak / 1024:.0f} MiB (resident, the bench process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,resnet18,vit,mlp")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick-bench-args", default="", help="extra arguments for the quick bench")
    parser.add_argument("--skip-attack", action="store_true")
    args = parser.parse_args()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{f' (OMP_NUM_THREADS={env_threads})' if env_threads else ''}, "
          f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    # First: the peak memory of children is the largest of all that ended, so the bench must be
    # the first child.
    quick_bench(args.device, shlex.split(args.quick_bench_args))
    run("Federated training throughput", [sys.executable, str(HERE / "fl_throughput.py"), "--device", args.device])
    if not args.skip_attack:
        models = args.models.split(",")
        script = [sys.executable, str(HERE / "attack_throughput.py"), "--device", args.device]
        if "cnn" in models:
            run("Attack throughput: the CNN (ig: Adam; idlg: the L-BFGS of dlg, idlg, cpl)",
                [*script, "--models", "cnn", "--attacks", "ig,idlg"])
        large = [m for m in models if m != "cnn"]
        if large:
            # A per-victim ResNet-18 step takes ~0.15 s on a 2-core CPU: 128 victims x 20
            # iterations x 3 repeats would take hours. Their engine is vmap, so the vmap column
            # is the batched one.
            light = [] if torch.cuda.is_available() else ["--iterations", "3", "--loop-iterations", "2",
                                                          "--repeats", "1", "--no-vmap"]
            run("Attack throughput: the larger models", [*script, "--models", ",".join(large), *light])


if __name__ == "__main__":
    main()
