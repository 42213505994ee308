"""Figures (matplotlib, PNG): reconstruction grids, gradient traces, privacy–utility, per-victim SSIM
distributions and accuracy curves."""

from __future__ import annotations

from pathlib import Path

import torch


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                             columns: int = 16, min_side: int = 64) -> Path:
    """Save a PNG: each band of up to `columns` images shows originals on top and their
    reconstructions under them — for victims of several images, the reconstructions as the
    runner paired them with the originals (`metrics.match_reconstructions`), listed victim by
    victim; small images are upscaled (nearest) so one can see them."""
    import torch.nn.functional as F
    from PIL import Image

    originals = originals.detach().float().cpu().clamp(0, 1)
    reconstructions = reconstructions.detach().float().cpu().clamp(0, 1)
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} differ")
    n, c, h, w = originals.shape
    scale = max(1, -(-min_side // min(h, w)))
    if scale > 1:
        originals = F.interpolate(originals, scale_factor=scale, mode="nearest")
        reconstructions = F.interpolate(reconstructions, scale_factor=scale, mode="nearest")
    if c == 1:
        originals, reconstructions = originals.expand(-1, 3, -1, -1), reconstructions.expand(-1, 3, -1, -1)
    h, w, pad = h * scale, w * scale, 2
    columns = min(columns, n)
    bands = -(-n // columns)
    canvas = torch.ones(3, bands * (2 * h + 3 * pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        band, col = divmod(i, columns)
        top = pad + band * (2 * h + 3 * pad)
        left = pad + col * (w + pad)
        canvas[:, top:top + h, left:left + w] = originals[i]
        canvas[:, top + h + pad:top + 2 * h + pad, left:left + w] = reconstructions[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)
    return path


def save_trace(trace, stem: str | Path, title: str = "") -> list[Path]:
    """Write a gradient trace as `<stem>.csv` (iteration, victim, one cosine column per layer)
    and `<stem>.png` (mean cosine over victims per layer vs iteration, as paper Fig. 6). The
    suffixes are appended to the whole stem, which may hold dots (`dp(sigma=0.1)`)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    cosine = trace.cosine.float()  # (T, N, L)
    steps, victims, _ = cosine.shape
    csv_path = stem.with_name(stem.name + ".csv")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "victim", *trace.layers])
        for t in range(steps):
            for i in range(victims):
                values = cosine[t, i]
                if bool(values.isnan().all()):
                    continue
                writer.writerow([t + 1, i, *(f"{v:.6g}" for v in values.tolist())])
    mean = cosine.nanmean(dim=1)  # (T, L)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    colours = plt.cm.viridis(torch.linspace(0, 0.9, len(trace.layers)).tolist())
    x = torch.arange(1, steps + 1)
    for layer, name in enumerate(trace.layers):
        axis.plot(x, mean[:, layer], label=name, color=colours[layer], linewidth=1)
    axis.set_xlabel("attack iteration")
    axis.set_ylabel("cosine(dummy, victim gradient)")
    axis.set_ylim(-1.05, 1.05)
    axis.set_title(title or "gradient similarity per layer", fontsize=9)
    axis.legend(fontsize=7, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    png_path = stem.with_name(stem.name + ".png")
    figure.savefig(png_path)
    plt.close(figure)
    return [csv_path, png_path]


#: Figure formats matplotlib writes with its own backends (no LaTeX, no optional codec).
FIGURE_FORMATS = (".png", ".pdf", ".svg")


def check_figure_path(path: str | Path) -> None:
    """Refuse, before any work, a figure path whose suffix matplotlib cannot write."""
    from gileak.errors import UserInputError
    from gileak.report.exporters import check_output_path

    path = Path(path)
    if path.suffix.lower() not in FIGURE_FORMATS:
        raise UserInputError(f"Cannot draw a figure to '{path}': gileak draws figures as "
                             f"{', '.join(FIGURE_FORMATS)} files; give a file name ending in one of them.")
    check_output_path(path)


def save_privacy_utility(rows, path: str | Path, threshold: float = 0.5) -> Path | None:
    """Draw `privacy_utility_figure` to `path` (the format follows its suffix); None (and no
    file) when no row has both an accuracy and an SSIM."""
    figure = privacy_utility_figure(rows, threshold)
    if figure is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def short_labels(keys: list[tuple[str, ...]], keep: int = 1) -> tuple[list[str], str]:
    """Labels of `keys` (tuples like (dataset, model, defense, attack)) that leave out the parts
    every key shares, and those shared parts joined: ("digits | cnn", labels "none | ig", ...).
    The last `keep` parts stay even when shared, so no label is empty."""
    if not keys:
        return [], ""
    width = len(keys[0])
    varying = [i for i in range(width) if len({k[i] for k in keys}) > 1]
    shown = sorted(set(varying) | set(range(width - keep, width)))
    shared = " | ".join(str(keys[0][i]) for i in range(width) if i not in shown)
    return [" | ".join(str(k[i]) for i in shown) for k in keys], shared


def _figure(width: float, height: float, dpi: int):
    """A matplotlib Figure and its axes without pyplot: no global state, so reports can be drawn
    from several threads at once."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _palette(count: int):
    import matplotlib

    return matplotlib.colormaps["tab10" if count <= 10 else "tab20"].colors


def figure_png(figure, dpi: int = 110) -> bytes:
    """A figure as PNG bytes (tight bounding box, so legends beside the axes are kept)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")


def privacy_utility_figure(rows, threshold: float = 0.5):
    """Accuracy against privacy (1 − SSIM) per leaderboard row, as the paper's Fig. 11: the
    further up and right, the better a defense. Colour names the defense (with dataset and model
    when they vary), the hollow marker the attack, both in legends beside the axes — so rows at
    the same point stay readable instead of printing their labels over each other. Undefended
    rows are black; the ASR threshold (SSIM = 0.5) is dashed. None when no row has both numbers."""
    from matplotlib.lines import Line2D

    points = [r for r in rows if r.get("accuracy_mean") is not None and r.get("ssim_mean") is not None]
    if not points:
        return None
    group_keys = [(r["dataset"], r["model"], r["defense"]) for r in points]
    group_labels, shared = short_labels(group_keys)
    groups = list(dict.fromkeys(group_labels))
    attacks = list(dict.fromkeys(r["attack"] for r in points))
    palette = _palette(len(groups))
    colours, colour_index = {}, 0
    for group, key in dict(zip(group_labels, group_keys)).items():
        if key[2] == "none":
            colours[group] = "black"
        else:
            colours[group] = palette[colour_index % len(palette)]
            colour_index += 1
    markers = {attack: _MARKERS[i % len(_MARKERS)] for i, attack in enumerate(attacks)}
    figure, axis = _figure(6.5, 4.5, dpi=120)
    axis.axvline(1 - threshold, color="grey", linestyle="--", linewidth=1)
    axis.text(1 - threshold, 0.02, " SSIM = 0.5 (ASR threshold)", color="grey", fontsize=7,
              transform=axis.get_xaxis_transform())
    for row, group in zip(points, group_labels):
        x, y = 1 - row["ssim_mean"], 100 * row["accuracy_mean"]
        axis.errorbar(x, y, xerr=row.get("ssim_std") or 0, yerr=100 * (row.get("accuracy_std") or 0),
                      fmt=markers[row["attack"]], color=colours[group], markerfacecolor="none",
                      markersize=7, markeredgewidth=1.3, capsize=2, linewidth=0.8)
    axis.set_xlabel("privacy: 1 − SSIM (higher is more private)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_xlim(0, 1.05)
    axis.grid(alpha=0.3)
    axis.set_title("privacy–utility" + (f" ({shared})" if shared else ""), fontsize=9)
    defense_legend = axis.legend(
        handles=[Line2D([], [], color=colours[g], marker="o", markerfacecolor="none", linestyle="") for g in groups],
        labels=groups, title="defense (colour)", fontsize=7, title_fontsize=7, loc="upper left",
        bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    axis.add_artist(defense_legend)
    defense_legend.set_clip_on(False)  # add_artist clips to the axes, which would cut it from the saved PNG
    figure.canvas.draw()  # place the attack legend under the defense legend, whatever its height
    below = defense_legend.get_window_extent().transformed(axis.transAxes.inverted()).y0
    axis.legend(handles=[Line2D([], [], color="dimgrey", marker=markers[a], markerfacecolor="none", linestyle="")
                         for a in attacks], labels=attacks, title="attack (marker)", fontsize=7,
                title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, below - 0.04), borderaxespad=0)
    return figure


def ssim_distribution_figure(rows: list[tuple[str, list[float]]], threshold: float = 0.5):
    """Every victim's SSIM per leaderboard row (a box plot with each victim as a jittered dot;
    victims at or above the ASR threshold in red): a mean ± std hides the victims that leak.
    `rows` are (label, SSIM values); None when no row has a value."""
    import numpy as np

    rows = [(label, [v for v in values if v is not None and np.isfinite(v)]) for label, values in rows]
    rows = [(label, values) for label, values in rows if values]
    if not rows:
        return None
    height = 1.0 + 0.38 * len(rows)
    figure, axis = _figure(7.5, height, dpi=110)
    positions = np.arange(len(rows))[::-1]  # the first row on top, as in the leaderboard
    import inspect

    # matplotlib 3.10 names it `orientation` and deprecates `vert`, which older releases need
    sideways = ({"orientation": "horizontal"} if "orientation" in inspect.signature(axis.boxplot).parameters
                else {"vert": False})
    axis.boxplot([values for _, values in rows], positions=positions, **sideways, widths=0.6,
                 showfliers=False, medianprops={"color": "black"}, boxprops={"color": "grey"},
                 whiskerprops={"color": "grey"}, capprops={"color": "grey"})
    jitter = np.random.default_rng(0)  # fixed: the same run draws the same figure
    for position, (_, values) in zip(positions, rows):
        values = np.asarray(values, dtype=float)
        offsets = jitter.uniform(-0.22, 0.22, size=len(values))
        leaked = values >= threshold
        axis.scatter(values[~leaked], position + offsets[~leaked], s=9, color="tab:blue", alpha=0.7, linewidths=0)
        axis.scatter(values[leaked], position + offsets[leaked], s=11, color="tab:red", alpha=0.8, linewidths=0)
    axis.axvline(threshold, color="grey", linestyle="--", linewidth=1)
    axis.set_yticks(positions, [label for label, _ in rows], fontsize=7)
    axis.set_xlim(min(-0.05, min(min(v) for _, v in rows) - 0.05), 1.02)
    axis.set_ylim(-0.7, len(rows) - 0.3)
    axis.set_xlabel("SSIM per victim (red: SSIM ≥ 0.5, a successful reconstruction)")
    axis.grid(axis="x", alpha=0.3)
    return figure


def accuracy_curves_figure(curves: list[tuple[str, list[float]]]):
    """Test accuracy after every federated round, one line per training cell; None when no
    cell trained. `curves` are (label, accuracies in 0..1)."""
    curves = [(label, curve) for label, curve in curves if curve]
    if not curves:
        return None
    figure, axis = _figure(6.5, 4, dpi=110)
    palette = _palette(len(curves))
    styles = ("-", "--", ":", "-.")
    for i, (label, curve) in enumerate(curves):
        rounds = range(1, len(curve) + 1)
        axis.plot(rounds, [100 * a for a in curve], label=label, color=palette[i % len(palette)],
                  linestyle=styles[(i // len(palette)) % len(styles)], marker="o" if len(curve) < 15 else None,
                  markersize=3, linewidth=1.2)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("federated round")
    axis.set_ylabel("test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return figure
