"""Leaderboard rendering, exports and figures."""

import csv
import io
import json
import math

import pytest
import torch
from PIL import Image
from rich.console import Console

from gileak.errors import UserInputError
from gileak.report import COLUMNS, export, render_leaderboard
from gileak.report.figures import save_reconstruction_grid

ROWS = [
    {"dataset": "photos", "model": "cnn", "defense": "cvb(kernel=3)", "client": "gradient(batch=4)", "attack": "ig",
     "ssim_mean": 0.61234, "label_accuracy": 0.75, "label_baseline": 0.36, "images": 16,
     "ssim_std": 0.1, "asr": 75.0, "psnr_mean": math.inf, "mse_mean": 0.01, "lpips_mean": None,
     "accuracy_mean": None, "accuracy_std": None, "params": 70000, "params_added_pct": 6.1, "victims": 4,
     "seconds": 1.5, "iterations_mean": 10.0, "status": "ok", "error": None,
     "lpips_note": "LPIPS unavailable: no weights"},
    {"dataset": "photos", "model": "cnn", "defense": "none", "client": "gradient", "attack": "broken", "ssim_mean": None,
     "status": "failed", "error": "RuntimeError: boom [x]\nsecond line"},
]


def test_json_export_has_the_contract_keys_and_no_nan(tmp_path):
    path = export(ROWS, tmp_path / "sub" / "lb.json")
    rows = json.loads(path.read_text())
    assert [r["defense"] for r in rows] == ["cvb(kernel=3)", "none"]
    assert set(COLUMNS) <= set(rows[0])
    assert rows[0]["psnr_mean"] is None and rows[0]["lpips_mean"] is None  # inf and unavailable -> null
    assert rows[0]["ssim_mean"] == 0.61234 and rows[1]["status"] == "failed"


def test_csv_and_markdown_exports(tmp_path):
    with open(export(ROWS, tmp_path / "lb.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["attack"] == "ig" and rows[0]["ssim_mean"] == "0.61234" and rows[0]["psnr_mean"] == ""
    assert rows[0]["client"] == "gradient(batch=4)" and rows[0]["label_accuracy"] == "0.75"
    assert rows[0]["label_baseline"] == "0.36" and rows[0]["images"] == "16"
    md = export(ROWS, tmp_path / "lb.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("| dataset | model | defense | client | attack | ssim_mean")
    assert lines[1].count("---") == len(COLUMNS)
    assert "| cvb(kernel=3) |" in md and "0.6123" in md and "LPIPS unavailable" in md


def test_unknown_export_format_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match=r"\.md, \.csv or \.json"):
        export(ROWS, tmp_path / "lb.xlsx")


def test_leaderboard_shows_rows_failures_and_the_lpips_reason():
    buffer = io.StringIO()
    render_leaderboard(ROWS, console=Console(file=buffer, width=250))
    text = buffer.getvalue()
    assert "cvb(kernel=3)" in text and "0.612 ± 0.100" in text and "75.0" in text
    assert "failed: RuntimeError: boom [x]" in text and "second line" not in text
    assert "LPIPS unavailable: no weights" in text
    assert "70,000 (+6.1%)" in text
    # the client column, label accuracy beside its label-blind baseline, and images per victim
    assert "gradient(batch=4)" in text and "0.75 (0.36)" in text and "4 (16 img)" in text
    assert "only the excess over it is leakage" in " ".join(text.split())


def test_reconstruction_grid_puts_originals_above_reconstructions(tmp_path):
    originals = torch.zeros(3, 1, 8, 8)
    reconstructions = torch.ones(3, 1, 8, 8)
    path = save_reconstruction_grid(originals, reconstructions, tmp_path / "grid.png", min_side=32)
    import numpy as np

    image = np.asarray(Image.open(path).convert("L"))
    height, width = image.shape
    assert width == 3 * 32 + 4 * 2  # three victims of 32 px (8 px upscaled 4x) with 2 px gaps
    assert image[2 + 16, 2 + 16] == 0  # an original (black) on top
    assert image[2 + 32 + 2 + 16, 2 + 16] == 255  # its reconstruction (white) below


def test_privacy_utility_figure_needs_accuracy(tmp_path):
    from gileak.report.figures import save_privacy_utility

    assert save_privacy_utility(ROWS, tmp_path / "pu.png") is None
    rows = [dict(ROWS[0], accuracy_mean=0.9, accuracy_std=0.01),
            dict(ROWS[0], defense="none", ssim_mean=0.8, accuracy_mean=0.88, accuracy_std=0.0)]
    path = save_privacy_utility(rows, tmp_path / "pu.png")
    assert path.stat().st_size > 5000
