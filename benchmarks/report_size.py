"""The HTML run report at scale: its size, the time to build it, and its load time in Chromium
(navigation start to the load event, and to an opened section's images being decoded).

Usage: python benchmarks/report_size.py RUN_DIR [RUN_DIR ...] [--repeats 3]
       python benchmarks/report_size.py --synthetic 36x128 [--repeats 3]

A RUN_DIR is any `gileak bench --out` directory (a real run). `--synthetic ROWSxVICTIMS` writes
a run directory through the store as a bench does — ROWS results of VICTIMS victims each, 32x32
RGB images of uniform noise (the worst case for PNG compression, like an early reconstruction),
a trace PNG per result — to measure pages larger than a CPU run here can make in minutes; its
numbers are made up and only its size matters. Build time is measured in this process after
the imports (`gileak report` adds torch's import); load times are medians over --repeats fresh
pages of Debian's /usr/bin/chromium driven by Playwright.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def synthetic_run(root: Path, rows: int, victims: int) -> Path:
    import json

    import shutil

    import numpy as np
    import torch

    from gileak.base import GradientTrace
    from gileak.report.figures import save_trace
    from gileak.report.images import save_victim_images
    from gileak.report.html import result_stem
    from gileak.store import ResultStore, StoredResult, VictimRecord

    rng = np.random.default_rng(0)
    run_dir = root / f"synthetic-{rows}x{victims}"
    run_dir.mkdir()
    store = ResultStore(run_dir)
    for row in range(rows):
        defense, attack = f"defense{row // 2}", ("ig", "ignore")[row % 2]
        ssim = rng.uniform(0, 1, victims)
        result = StoredResult(
            cell=f"photos | cnn | {defense} | seed=0", attack=attack, dataset="photos", model="cnn", defense=defense,
            seed=0, attack_label=attack, position=row, status="ok", seconds=1.0, accuracy=0.5,
            accuracy_curve=[0.3, 0.4, 0.5], rounds_run=3, attacked_round=3, training_seconds=1.0,
            victims=[VictimRecord(i, i % 10, float(ssim[i]), 12.0, 0.05, None, 20, 0.1) for i in range(victims)],
            env={"gileak": "synthetic"})
        store.put(result)
        stem = result_stem(result)
        images = rng.integers(0, 256, size=(2, victims, 3, 32, 32), dtype=np.uint8)
        save_victim_images(images[0], images[1], run_dir / "reconstructions" / f"{stem}.npz", cell=result.cell,
                           attack=attack, victims=list(range(victims)))
        if row == 0:  # one real trace figure, drawn once and copied: its size is a trace PNG's
            trace = GradientTrace([f"{i} (Conv2d)" for i in range(3)] + ["10 (Linear)"],
                                  torch.rand(20, victims, 4, generator=torch.Generator().manual_seed(0)))
            first = save_trace(trace, run_dir / "traces" / stem, "synthetic")[1]
        else:
            shutil.copyfile(first, run_dir / "traces" / f"{stem}.png")
    store.set_meta("budget", json.dumps({"victims": victims, "iterations": 20, "rounds": 3}))
    store.close()
    return run_dir


_SHOW = """async (selector) => {
    // open the sections, load their lazy images now, and wait until every one is decoded
    const sections = Array.from(document.querySelectorAll(selector));
    sections.forEach(section => { section.open = true; });
    const images = sections.flatMap(section => Array.from(section.querySelectorAll('img')));
    images.forEach(image => { image.loading = 'eager'; });
    await Promise.all(images.map(image => image.decode()));
    return images.length;
}"""


def load_times(report: Path, repeats: int) -> tuple[float, float, float]:
    """Median seconds from navigation start to the load event; to the first row's section
    opened with all its images decoded; and to every section opened and every image decoded."""
    from playwright.sync_api import sync_playwright

    loads, first, everything = [], [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for _ in range(repeats):
            for selector, times in (("details.row:first-of-type", first), ("details.row", everything)):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(report.as_uri(), wait_until="load")
                if selector == "details.row":
                    loads.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd") / 1000)
                started = time.perf_counter()
                page.evaluate(_SHOW, selector)
                times.append(time.perf_counter() - started)
                page.close()
        browser.close()
    return statistics.median(loads), statistics.median(first), statistics.median(everything)


def measure(run_dir: Path, repeats: int) -> None:
    from gileak.report.html import human_size, write_report
    from gileak.store import ResultStore

    store = ResultStore.open_existing(run_dir)
    results = store.results()
    store.close()
    victims = sum(len(r.victims) for r in results)
    builds = []
    for _ in range(repeats):
        info = write_report(run_dir)
        builds.append(info.seconds)
    nan = float("nan")
    load, first, everything = load_times(info.path, repeats) if Path(CHROMIUM).is_file() else (nan, nan, nan)
    print(f"{run_dir}: {len(results)} results, {victims} victims -> {info.path.name} {human_size(info.size)}; "
          f"build {statistics.median(builds):.2f} s; Chromium: load event {load:.2f} s, first section opened "
          f"and decoded {first:.2f} s, every section {everything:.2f} s (medians of {repeats})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*", type=Path)
    parser.add_argument("--synthetic", default=None, help="ROWSxVICTIMS, e.g. 36x128")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import gileak.report.html  # noqa: F401  (imports outside the timed build)
    import gileak.runner  # noqa: F401

    from gileak import metrics

    metrics.lpips_status()  # imports lpips/torchvision once, outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        run_dirs = list(args.run_dirs)
        if args.synthetic:
            rows, victims = (int(n) for n in args.synthetic.lower().split("x"))
            run_dirs.append(synthetic_run(Path(tmp), rows, victims))
        for run_dir in run_dirs:
            measure(run_dir, args.repeats)


if __name__ == "__main__":
    main()
