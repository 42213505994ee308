"""benchmarks/gpu_check.sh's two Python steps: `env` (what the machine and this torch are) and
`summary` (summary.json and summary.md in $OUT from the steps' logs and JSON, with the GPU goals
of issue 18 checked: the CNN at 128 victims >= 50x the per-victim loop and >= 30% of the TF32
matmul in useful work; ResNet-18 and the ViT >= 10x the loop)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

#: (model, attack, victims, ratio at least, share of the TF32 matmul at least)
GOALS = [("cnn", "ig", 128, 50.0, 0.30), ("resnet18", "ig", 128, 10.0, None), ("vit", "ig", 128, 10.0, None)]


def environment(device: str) -> dict:
    import importlib.metadata

    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads(), "device": device}
    try:
        from gileak import __version__
        from gileak.engine.compat import missing
        from gileak.engine.lbfgs import WEAK_PYTHON_SCALARS

        # NumPy 2's promotion, which the batched L-BFGS line search needs (else: the per-victim loop)
        env.update(gileak=__version__, private_torch_apis_missing=missing(), numpy_nep50=WEAK_PYTHON_SCALARS)
    except Exception as e:  # noqa: BLE001 — reported, the rest of the check goes on
        env["gileak_import_error"] = f"{type(e).__name__}: {e}"
    versions = {}
    for name in ("numpy", "torchvision", "pydantic", "pydantic-core", "opacus", "lpips", "medmnist", "scikit-learn",
                 "scikit-image", "typer", "rich", "pluggy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env["packages"] = versions
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        env.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                   capability=f"{properties.major}.{properties.minor}", gpus=torch.cuda.device_count(),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   float32_matmul_precision=torch.get_float32_matmul_precision())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    return env


def _junit(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as e:
        return {"error": str(e)}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            found = case.find(kind)
            if found is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                               "message": (found.get("message") or "")[:300]})
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "seconds": float(suite.get("time", 0.0)), "failed": failed}


def _dry_run(log: Path) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    total = next((line.strip() for line in text.splitlines() if line.startswith("Total: about")), None)
    engines = [line.strip() for line in text.splitlines() if line.strip().startswith("engine ")]
    return {"total": total, "engines": engines, "text": text}


def _goals(throughput: dict) -> list[dict]:
    results = []
    for model, attack, victims, ratio, share in GOALS:
        rows = [r for r in throughput.get(model, {}).get("rows", []) if r["attack"] == attack and r["victims"] == victims]
        goal = f"{model} {attack} at {victims} victims: >= {ratio:g}x the loop" + (
            f" and >= {share:.0%} of the TF32 matmul" if share else "")
        if not rows:
            results.append({"goal": goal, "status": "not measured"})
            continue
        row = rows[0]
        met = row["ratio"] >= ratio and (share is None or (row.get("share_tf32") or 0.0) >= share)
        measured = f"{row['ratio']:.1f}x" + (f", {100 * row['share_tf32']:.1f}% of TF32" if row.get("share_tf32")
                                             is not None else "")
        results.append({"goal": goal, "status": "met" if met else "not met", "measured": measured,
                        "engine": row["engine"]})
    return results


def _engine_rule(throughput: dict) -> list[dict]:
    """gileak.engine.choice's rule runs vmap attacks batched on a GPU (from N = 2): is the batched
    engine the faster there, row by row?"""
    checks = []
    for model, data in throughput.items():
        for row in data.get("rows", []):
            if row["engine"] == "vmap" and row["victims"] > 1:
                checks.append({"model": model, "victims": row["victims"], "ratio": row["ratio"],
                               "rule_right": row["batched_its"] >= row["loop_its"]})
    return checks


def summary(work: Path, out: Path, device: str, rehearse: bool, elapsed: float) -> dict:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, seconds, limit = line.split("\t")
        status = "ok" if rc == "0" else "timeout" if rc in ("124", "137") else "failed"
        steps.append({"step": name, "status": status, "rc": int(rc), "seconds": float(seconds), "limit": int(limit)})
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    throughput = {}
    for path in sorted(work.glob("throughput-*.json")):
        try:
            throughput[path.stem.removeprefix("throughput-")] = json.loads(path.read_text())
        except ValueError as e:
            throughput[path.stem.removeprefix("throughput-")] = {"error": str(e), "rows": []}
    by_model: dict = {}
    for name, data in throughput.items():
        for row in data.get("rows", []):
            by_model.setdefault(row["model"], {"rows": []})["rows"].append(row)
    bench = None
    if (work / "bench.json").exists():
        bench = json.loads((work / "bench.json").read_text())
    dry = {log.stem.removeprefix("dry-"): _dry_run(log) for log in sorted((work / "logs").glob("dry-*.log"))}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device, "rehearsal": rehearse,
        "elapsed_seconds": elapsed, "environment": env, "steps": steps,
        "tests": {"gpu": _junit(work / "junit-tests.xml"), "cpu_side": _junit(work / "junit-cpu-tests.xml")},
        "throughput": throughput, "goals": [] if rehearse else _goals(by_model),
        "engine_rule": [] if rehearse else _engine_rule(by_model), "bench": bench,
        "dry_runs": {name: {k: v for k, v in d.items() if k != "text"} for name, d in dry.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "summary.md").write_text(_markdown(result, dry))
    return result


def _markdown(result: dict, dry: dict) -> str:
    env = result["environment"]
    where = env.get("gpu") or f"{env.get('platform', '?')} (no GPU)"
    lines = [f"# gileak device check{' (rehearsal on the CPU)' if result['rehearsal'] else ''}", "",
             f"{result['date']}, {where}; Python {env.get('python')}, torch {env.get('torch')}, "
             f"gileak {env.get('gileak', '?')}; {result['elapsed_seconds']:.0f} s in all.", ""]
    if env.get("gpu"):
        lines += [f"GPU: {env['gpu']}, {env.get('gpu_memory_gib')} GiB, capability {env.get('capability')}, CUDA "
                  f"{env.get('cuda')}, cuDNN {env.get('cudnn')}, driver {env.get('nvidia_smi')}; attack precision: "
                  f"cudnn.allow_tf32={env.get('cudnn_allow_tf32')}, matmul.allow_tf32={env.get('matmul_allow_tf32')}.",
                  ""]
    if env.get("private_torch_apis_missing"):
        lines += [f"Private torch APIs missing (running on their fallbacks): {env['private_torch_apis_missing']}", ""]
    if env.get("numpy_nep50") is False:
        lines += [f"NumPy {env['packages'].get('numpy')} lacks NumPy 2's scalar promotion (NEP 50): dlg, idlg and cpl "
                  "ran the per-victim torch.optim.LBFGS loop instead of the batched solver.", ""]
    if env.get("gileak_import_error"):
        lines += [f"**gileak did not import**: {env['gileak_import_error']}", ""]
    lines += ["## Steps", "", "| step | status | seconds | limit |", "|---|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['limit']} |" for s in result["steps"]]
    lines += ["", "## Tests", ""]
    for label, junit in result["tests"].items():
        if junit is None:
            lines.append(f"- {label}: no results")
        elif "error" in junit:
            lines.append(f"- {label}: unreadable results ({junit['error']})")
        else:
            lines.append(f"- {label}: {junit['passed']} passed, {junit['failures']} failed, {junit['errors']} errors, "
                         f"{junit['skipped']} skipped ({junit['seconds']:.0f} s)")
            lines += [f"  - FAILED {f['test']}: {f['message']}" for f in junit["failed"]]
    lines += ["", "## Throughput (benchmarks/attack_throughput.py)", ""]
    for name, data in result["throughput"].items():
        fp32, tf32 = data.get("matmul_fp32_flops"), data.get("matmul_tf32_flops")
        lines.append(f"**{name}**: matmul {data.get('matmul_size')}² float32 "
                     f"{(fp32 or 0) / 1e12:.2f} TFLOP/s" + (f", TF32 {tf32 / 1e12:.2f} TFLOP/s" if tf32 else ""))
        lines += ["", "| attack | N | engine | batched it/s | loop it/s | batched / loop | useful TFLOP/s | of fp32 | "
                  "of TF32 | peak memory GiB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in data.get("rows", []):
            tf = f"{100 * r['share_tf32']:.1f}%" if r.get("share_tf32") is not None else "—"
            memory = f"{r['peak_memory'] / 2**30:.1f}" if r.get("peak_memory") else "—"
            lines.append(f"| {r['attack']} | {r['victims']} | {r['engine']} | {_rate(r['batched_its'])} | "
                         f"{_rate(r['loop_its'])} | {r['ratio']:.1f}x | {r['useful_flops'] / 1e12:.3f} | "
                         f"{100 * r['share_fp32']:.1f}% | {tf} | {memory} |")
        lines.append("")
    if result["goals"]:
        lines += ["## Goals (issue 18)", ""]
        lines += [f"- {g['goal']}: **{g['status']}**" + (f" ({g['measured']}, {g['engine']})" if "measured" in g else "")
                  for g in result["goals"]]
        lines.append("")
    if result["engine_rule"]:
        wrong = [c for c in result["engine_rule"] if not c["rule_right"]]
        lines += ["## The engine rule on this GPU", "",
                  "gileak.engine.choice runs vmap attacks batched on a GPU; "
                  + ("the batched engine was the faster in every vmap row." if not wrong else
                     "the loop was faster in: " + ", ".join(f"{c['model']} at {c['victims']} ({c['ratio']:.2f}x)"
                                                           for c in wrong) + " — the rule needs a GPU case."), ""]
    if result["bench"] is not None:
        lines += ["## The quick default bench", ""]
        for row in result["bench"]:
            lines.append(f"- {row.get('dataset')} | {row.get('model')} | {row.get('defense')} | {row.get('attack')}: "
                         f"SSIM {row.get('ssim_mean')}, {row.get('victims')} victims, {row.get('seconds')} s")
        bench_step = next((s for s in result["steps"] if s["step"] == "bench"), None)
        if bench_step:
            lines.append(f"- wall time of the whole command: {bench_step['seconds']:.1f} s")
        lines.append("")
    lines += ["## --dry-run --profile paper (Tables II-VI)", ""]
    for name, d in dry.items():
        lines.append(f"- {name}: {d['total'] or 'no total (see the log)'}")
    for name, d in dry.items():
        table = [line for line in d["text"].splitlines() if line.strip()
                 and not line.startswith(("gileak bench", "  datasets", "  attack:", "  training:"))]
        lines += ["", f"### {name}", "", "```", *table[-60:], "```"]
    return "\n".join(lines) + "\n"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--device", default="cuda")
    env.add_argument("--json", required=True)
    made = sub.add_parser("summary")
    made.add_argument("--work", required=True, type=Path)
    made.add_argument("--out", required=True, type=Path)
    made.add_argument("--device", default="cuda")
    made.add_argument("--rehearse", default="0")
    made.add_argument("--elapsed", type=float, default=0.0)
    args = parser.parse_args()
    if args.command == "env":
        found = environment(args.device)
        Path(args.json).write_text(json.dumps(found, indent=1))
        print(json.dumps(found, indent=1))
        if "gileak_import_error" in found:
            sys.exit(1)
    else:
        result = summary(args.work, args.out, args.device, args.rehearse == "1", args.elapsed)
        failed = [s["step"] for s in result["steps"] if s["status"] != "ok"]
        print(f"summary written to {args.out}; steps not ok: {failed or 'none'}")


if __name__ == "__main__":
    main()
