"""The run report: one self-contained HTML page per run directory (Jinja2 template, matplotlib
figures and victim thumbnails as data URIs), built from the directory's store and files alone."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gileak.errors import UserInputError
from gileak.report.leaderboard import NAME_COLUMNS

REPORT_NAME = "report.html"
#: Victim images are shown at least this many CSS pixels wide (integer nearest-neighbour
#: upscaling), and larger images are reduced to at most `MAX_THUMB` pixels in the page.
THUMB_MIN = 96
MAX_THUMB = 128
#: Sections open by default while the page holds at most this many victims in all; beyond, every
#: section starts closed so a large run's page loads fast (the browser skips closed content).
OPEN_VICTIMS = 64
#: spec.json beyond this size is not shown (it is always small; a huge one is not ours).
MAX_SPEC_BYTES = 1_000_000


@dataclass
class Thumb:
    src: str
    width: int
    height: int


@dataclass
class VictimView:
    victim: int
    label: int
    ssim: float | None
    psnr: float | None
    iterations: int
    leaked: bool
    original: Thumb | None = None
    reconstruction: Thumb | None = None


@dataclass
class ResultView:
    seed: int
    status: str
    error: str | None
    note: str | None
    seconds: float | None
    training_seconds: float | None
    rounds_run: int | None
    attacked_round: int | None
    victims: list[VictimView] = field(default_factory=list)
    images_note: str | None = None
    strip: Thumb | None = None
    trace: Thumb | None = None
    trace_csv: str | None = None
    files: list[tuple[str, str]] = field(default_factory=list)
    engine: str | None = None  # the engine the attack ran on, and why (gileak.engine.choice)

    @property
    def leaked(self) -> int:
        return sum(v.leaked for v in self.victims)


@dataclass
class RowView:
    index: int
    names: list[str]
    status: str
    reason: str | None
    cells: list[str]
    sort_keys: list[Any]
    results: list[ResultView]

    @property
    def anchor(self) -> str:
        return f"row-{self.index}"

    @property
    def victims(self) -> int:
        return sum(len(r.victims) for r in self.results)

    @property
    def leaked(self) -> int:
        return sum(r.leaked for r in self.results)


@dataclass
class ReportInfo:
    """What `write_report` wrote: where, how many bytes, how long it took."""

    path: Path
    size: int
    seconds: float


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _plot(data: bytes) -> Thumb | None:
    """A PNG figure as a data URI with its pixel size (read from the PNG header, so the page
    lays out before it decodes); None for bytes that are not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return Thumb(_png_data_uri(data), int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))


def _thumb(image) -> Thumb:
    """A (C, H, W) uint8 image as a PNG data URI at its own resolution (reduced when large) and
    the size to show it at: the browser upscales it by an integer factor, nearest neighbour
    (`image-rendering: pixelated`), so no pixel is invented and the page stays small."""
    import numpy as np
    from PIL import Image

    array = np.ascontiguousarray(image.transpose(1, 2, 0))
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB")
    if max(picture.size) > MAX_THUMB:
        picture.thumbnail((MAX_THUMB, MAX_THUMB), Image.Resampling.LANCZOS)
    width, height = picture.size
    scale = max(1, math.ceil(THUMB_MIN / max(width, height)))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return Thumb(_png_data_uri(buffer.getvalue()), width * scale, height * scale)


class _Links:
    """Relative links from the report to files of the run directory, safe in an href."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir.resolve()

    def __call__(self, path: Path) -> str:
        try:
            relative = os.path.relpath(Path(path).resolve(), self.output_dir)
        except ValueError:  # another drive (Windows): an absolute file URL
            return Path(path).resolve().as_uri()
        href = quote(relative.replace(os.sep, "/"), safe="/")
        # './' keeps a directory named like 'javascript:x' a path, never a URL scheme
        return href if href.startswith((".", "/")) else "./" + href


def _images_of(result, stem: Path) -> tuple[list[VictimView], str | None, Path | None]:
    """The result's victims with their thumbnails from `<stem>.npz`; when the file is missing,
    unreadable or belongs to another result, the victims without thumbnails and the reason
    (and the PNG strip, when there is one, for directories written before per-victim images)."""
    from gileak.metrics import ASR_THRESHOLD
    from gileak.report.images import UnreadableImages, load_victim_images

    views = [VictimView(v.victim, v.label, v.ssim, v.psnr, v.iterations,
                        v.ssim is not None and v.ssim >= ASR_THRESHOLD) for v in result.victims]
    npz, strip = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".png")
    strip = strip if strip.is_file() else None
    if not npz.is_file():
        return views, ("no per-victim images were stored for this result (run directories written before "
                       "gileak kept them have only the strip below)" if strip else
                       f"no per-victim images were found ({npz.name} is missing)"), strip
    try:
        images = load_victim_images(npz)
    except UnreadableImages as e:
        return views, f"{npz.name} could not be read: {e}", strip
    stored = [v.victim for v in result.victims]
    if images.cell != result.cell or images.attack != result.attack or images.victims.tolist() != stored:
        return views, f"{npz.name} holds the images of another result, so none are shown here", strip
    for view, original, reconstruction in zip(views, images.originals, images.reconstructions):
        view.original, view.reconstruction = _thumb(original), _thumb(reconstruction)
    return views, None, None


def result_stem(result) -> str:
    """The file name stem `Runner.persist` gave a stored result's images (reconstructions/) and
    trace (traces/)."""
    from gileak.runner import _slug

    return _slug(result.dataset, result.model, result.defense, result.client, result.attack_label,
                 f"seed{result.seed}", identity=f"{result.cell} || {result.attack}")


def _result_view(result, run_dir: Path, link: _Links) -> ResultView:
    view = ResultView(result.seed, result.status, result.error, result.note, result.seconds, result.training_seconds,
                      result.rounds_run, result.attacked_round, engine=_engine_text(result.env))
    if result.status != "ok":
        return view
    stem = result_stem(result)
    view.victims, view.images_note, strip = _images_of(result, run_dir / "reconstructions" / stem)
    if strip is not None:
        view.strip = _plot(strip.read_bytes())
    trace_png = run_dir / "traces" / f"{stem}.png"
    trace_csv = run_dir / "traces" / f"{stem}.csv"
    if trace_png.is_file():
        view.trace = _plot(trace_png.read_bytes())
    if trace_csv.is_file():
        view.trace_csv = link(trace_csv)
    for path in (run_dir / "reconstructions" / f"{stem}.png", run_dir / "reconstructions" / f"{stem}.npz"):
        if path.is_file():
            view.files.append((path.name, link(path)))
    return view


def _sort_keys(row: dict[str, Any]) -> list[Any]:
    """What each leaderboard column sorts by: the names and the status as text, the metrics by
    their number (empty for failed rows, which sort last either way)."""
    names = [str(row.get(k, "gradient" if k == "client" else "")) for k in NAME_COLUMNS] + [str(row.get("status") or "ok")]
    if row.get("status") in ("failed", "not applicable"):
        return names + [""] * 10

    def number(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return "1e308" if isinstance(value, float) and math.isinf(value) else repr(float(value))

    return names + [number(row.get(k)) for k in ("ssim_mean", "asr", "psnr_mean", "mse_mean", "lpips_mean",
                                                   "label_accuracy", "accuracy_mean", "params", "victims",
                                                   "seconds")]


def _row_cells(row: dict[str, Any]) -> list[str]:
    """The names and status of a row, then its metrics when it measured something."""
    from gileak.report.leaderboard import metric_cells

    names = [str(row.get(k, "gradient" if k == "client" else "")) for k in NAME_COLUMNS] + [str(row.get("status") or "ok")]
    if row.get("status") in ("failed", "not applicable"):
        return names
    return names + metric_cells(row)


def _rerun_command(spec: dict[str, Any], run_dir: Path) -> str | None:
    """A `gileak bench` command for the latest spec (labels as the user wrote them), or None
    when spec.json is not a spec."""
    try:
        parts = ["gileak", "bench"]
        for option in ("models", "datasets", "defenses", "attacks"):
            parts += [f"--{option}", ",".join(str(c["label"]) for c in spec[option])]
        if spec.get("clients"):  # (a spec written before clients existed has none: the paper's)
            parts += ["--clients", ",".join(str(c["label"]) for c in spec["clients"])]
        for option in ("victims", "iterations", "rounds", "patience", "seeds"):
            parts += [f"--{option}", str(int(spec[option]))]
        parts += ["--attack-at", str(spec["attack_at"]), "--device", str(spec["device"])]
        if spec.get("trace"):
            parts.append("--trace")
        if spec.get("data_root"):
            parts += ["--data-root", str(spec["data_root"])]
        parts += ["--out", str(run_dir)]
    except (KeyError, TypeError, ValueError):
        return None
    return shlex.join(parts)


def _read_spec(run_dir: Path) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(spec.json as text, parsed, why it is not shown)."""
    path = run_dir / "spec.json"
    if not path.is_file():
        return None, None, "spec.json is missing from the run directory"
    if path.stat().st_size > MAX_SPEC_BYTES:
        return None, None, f"spec.json is larger than {MAX_SPEC_BYTES:,} bytes and is not shown"
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, None, f"spec.json could not be read: {e}"
    if not isinstance(spec, dict):
        return text, None, "spec.json is not a spec"
    return json.dumps(spec, indent=2, ensure_ascii=False), spec, None


def _clock(timestamp: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(timestamp)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "—"


def _duration(seconds: Any) -> str:
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(seconds) or seconds < 0:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _span(run: dict[str, Any]) -> float | None:
    """Seconds a recorded bench invocation took; None when its record is incomplete."""
    try:
        return float(run["ended"]) - float(run["started"])
    except (KeyError, TypeError, ValueError):
        return None


def _engine_text(env: Any) -> str | None:
    """"batched (chain): the factored step ..." from a result's env["engine"] (None: not recorded)."""
    engine = env.get("engine") if isinstance(env, dict) else None
    if not isinstance(engine, dict) or not engine.get("engine"):
        return None
    from gileak.engine.choice import EngineChoice

    try:
        chosen = EngineChoice.from_dict(engine)
        return f"{chosen.label()}: {chosen.reason}" if chosen.reason else chosen.label()
    except (TypeError, ValueError):
        return None


def _environments(stored) -> list[dict[str, Any]]:
    """The distinct environments the results were computed in, each with how many results (the
    engine each attack ran on is shown with its result, not here)."""
    found: dict[str, dict[str, Any]] = {}
    for r in stored:
        env = {k: v for k, v in r.env.items() if k != "engine"} if isinstance(r.env, dict) else r.env
        key = json.dumps(env, sort_keys=True, default=str)
        entry = found.setdefault(key, {"env": env, "results": 0})
        entry["results"] += 1
    return list(found.values())


def _figures(rows: list[RowView], leaderboard: list[dict[str, Any]], stored) -> dict[str, Any]:
    """The page's figures as PNG data URIs (and the label parts their rows share): per-victim
    SSIM per row, privacy–utility, and accuracy per round when the run trained."""
    from gileak.report.figures import (accuracy_curves_figure, figure_png, privacy_utility_figure, short_labels,
                                       ssim_distribution_figure)

    figures: dict[str, Any] = dict.fromkeys(("ssim", "ssim_shared", "privacy", "accuracy", "accuracy_shared"))
    measured = [row for row in rows if any(result.victims for result in row.results)]
    labels, shared = short_labels([tuple(row.names) for row in measured])
    figure = ssim_distribution_figure([(label, [v.ssim for r in row.results for v in r.victims])
                                       for label, row in zip(labels, measured)])
    if figure is not None:
        figures["ssim"], figures["ssim_shared"] = _plot(figure_png(figure)), shared
    figure = privacy_utility_figure(leaderboard)
    if figure is not None:
        figures["privacy"] = _plot(figure_png(figure))
    cells = list({r.cell: r for r in stored if r.accuracy_curve}.values())
    if cells:
        several_seeds = len({r.seed for r in cells}) > 1
        keys = [(r.dataset, r.model, r.defense) + ((f"seed {r.seed}",) if several_seeds else ()) for r in cells]
        labels, shared = short_labels(keys)
        figure = accuracy_curves_figure([(label, r.accuracy_curve) for label, r in zip(labels, cells)])
        figures["accuracy"], figures["accuracy_shared"] = _plot(figure_png(figure)), shared
    return figures


def build_page(run_dir: Path, output: Path) -> str:
    """The report of `run_dir` as HTML text, with links relative to `output`'s directory."""
    import gileak
    from gileak.report.leaderboard import TABLE_COLUMNS, _num, leaderboard_notes
    from gileak.runner import NOT_APPLICABLE, build_result
    from gileak.store import ResultStore

    run_dir = Path(run_dir)
    store = ResultStore.open_existing(run_dir)
    try:
        stored = store.results()
        result = build_result(store, None, run_dir)
        runs = store.runs()
        budget_text = store.get_meta("budget")
    finally:
        store.close()
    try:
        budget = json.loads(budget_text) if budget_text else None
    except json.JSONDecodeError:
        budget = None
    link = _Links(output.parent)

    by_key: dict[tuple[str, str, str, str, str], list] = {}
    for r in stored:
        by_key.setdefault((r.dataset, r.model, r.defense, r.client, r.attack_label), []).append(r)
    rows = []
    for index, row in enumerate(result.rows, start=1):
        key = tuple(str(row.get(k, "gradient" if k == "client" else "")) for k in NAME_COLUMNS)
        rows.append(RowView(index, list(key), row.get("status") or "ok", row.get("error"), _row_cells(row),
                            _sort_keys(row), [_result_view(r, run_dir, link) for r in by_key.get(key, [])]))

    figures = _figures(rows, result.rows, stored)
    spec_text, spec, spec_problem = _read_spec(run_dir)
    attack_seconds = sum(r.seconds or 0.0 for r in stored)
    training_seconds = sum(r.training_seconds or 0.0 for r in {r.cell: r for r in stored}.values())
    victims = sum(row.victims for row in rows)
    statuses = [r.status for r in stored]
    files = [(name, link(run_dir / name)) for name in ("leaderboard.json", "victims.jsonl", "spec.json",
                                                       "results.sqlite", "privacy_utility.png")
             if (run_dir / name).is_file()]
    context = {
        "title": f"gileak report: {run_dir.resolve().name}",
        "run_dir": str(run_dir),
        "generated": _clock(time.time()),
        "version": gileak.__version__,
        "columns": TABLE_COLUMNS,
        "rows": rows,
        "notes": leaderboard_notes(result.rows),
        # a row that does not apply says why in its own line of the table
        "result_notes": [(where, note) for where, note in result.notes if not note.startswith(NOT_APPLICABLE)],
        "failures": result.failures,
        "figures": figures,
        "summary": {
            "rows": len(rows), "ok": statuses.count("ok"), "failed": statuses.count("failed"),
            "not_applicable": statuses.count("not applicable"), "victims": victims,
            "leaked": sum(row.leaked for row in rows),
        },
        "open_sections": victims <= OPEN_VICTIMS,
        "spec_text": spec_text,
        "spec_problem": spec_problem,
        "rerun": _rerun_command(spec, run_dir) if spec else None,
        "budget": budget,
        "seeds": sorted({r.seed for r in stored}),
        "environments": _environments(stored),
        "runs": [{"started": _clock(r.get("started")), "ended": _clock(r.get("ended")), "wall": _duration(_span(r)),
                  "completed": bool(r.get("completed")), "computed": r.get("computed"), "reused": r.get("reused")}
                 for r in runs],
        "wall_total": _duration(sum(_span(r) or 0.0 for r in runs)) if runs else None,
        "attack_seconds": _duration(attack_seconds),
        "training_seconds": _duration(training_seconds),
        "files": files,
        "duration": _duration,
        "num": _num,
    }
    return _environment().get_template("report.html.j2").render(**context)


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("gileak.report", "templates"),
                       autoescape=select_autoescape(default=True, default_for_string=True),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def write_report(run_dir: Path, output: Path | None = None) -> ReportInfo:
    """Build the report of `run_dir` into `output` (default `run_dir/report.html`), written to a
    temporary name first so a reader never sees half a page."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    output = Path(output) if output is not None else run_dir / REPORT_NAME
    if output.is_dir():
        raise UserInputError(f"{output} is a directory; give the report a file name such as {output / REPORT_NAME}.")
    if output.suffix.lower() not in (".html", ".htm"):  # never over a store, a spec or an export by mistake
        raise UserInputError(f"Cannot write the report to '{output}': give a file name ending in .html.")
    page = build_page(run_dir, output)
    # a name of its own: two reports written at once into one place never share a temporary file
    tmp = output.with_name(f".{output.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, output)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserInputError(f"Cannot write the report to {output}: {e.strerror or e}.") from e
    return ReportInfo(output, output.stat().st_size, time.perf_counter() - started)


def human_size(size: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if size < 1000 or unit == "MB":
            return f"{size:,} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} MB"
