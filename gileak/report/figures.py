"""Figures: the reconstruction grid of a cell (originals above reconstructions)."""

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
    """Accuracy against privacy (1 − SSIM) per leaderboard row, as the paper's Fig. 11: the
    further up and right, the better a defense. The ASR threshold (SSIM = 0.5) is marked;
    undefended rows are drawn differently. None when no row has both numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("accuracy_mean") is not None and r.get("ssim_mean") is not None]
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    axis.axvline(1 - threshold, color="grey", linestyle="--", linewidth=1)
    axis.text(1 - threshold, 0.02, " SSIM = 0.5 (ASR threshold)", color="grey", fontsize=7,
              transform=axis.get_xaxis_transform())
    for row in points:
        undefended = row["defense"] == "none"
        x, y = 1 - row["ssim_mean"], 100 * row["accuracy_mean"]
        axis.errorbar(x, y, xerr=row.get("ssim_std") or 0, yerr=100 * (row.get("accuracy_std") or 0),
                      fmt="s" if undefended else "o", color="black" if undefended else "tab:blue",
                      markersize=6, capsize=2, linewidth=0.8)
        axis.annotate(f"{row['defense']} / {row['attack']}", (x, y), fontsize=6, xytext=(3, 3),
                      textcoords="offset points")
    axis.set_xlabel("privacy: 1 − SSIM (higher is more private)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_xlim(0, 1.05)
    axis.grid(alpha=0.3)
    axis.set_title("privacy–utility (squares: undefended)", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
