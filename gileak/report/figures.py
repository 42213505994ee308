"""Figures: the reconstruction grid of a cell (originals above reconstructions)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                             columns: int = 16, min_side: int = 64) -> Path:
    """Save a PNG: each band of up to `columns` victims shows originals on top and their
    reconstructions under them; small images are upscaled (nearest) so one can see them."""
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
