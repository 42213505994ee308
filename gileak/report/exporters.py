"""Leaderboard rows to Markdown, CSV and JSON; the format follows the file's suffix."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from gileak.errors import UserInputError

#: Export columns, in order. Rows may carry more keys (status, error, lpips_note, ...).
COLUMNS = (
    "dataset", "model", "defense", "client", "attack", "ssim_mean", "ssim_std", "asr", "psnr_mean", "mse_mean",
    "lpips_mean", "label_accuracy", "label_baseline", "accuracy_mean", "accuracy_std", "epsilon", "params",
    "params_added_pct", "victims", "images", "seconds", "iterations_mean", "status", "error",
)


def _clean(value: Any) -> Any:
    """NaN and infinities are not JSON; they become null (unknown / not computed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rows(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> list[dict[str, Any]]:
    keys = list(columns) + sorted({k for r in rows for k in r} - set(columns))
    return [{k: _clean(r.get(k)) for k in keys} for r in rows]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS, notes: list[str] | None = None) -> str:
    clean = _rows(rows, columns)
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join(
        "| " + " | ".join(" ".join(_cell(r[k]).replace("|", "\\|").split()) for k in columns) + " |\n"
        for r in clean
    )
    notes = sorted({r["lpips_note"] for r in clean if r.get("lpips_note")}) + list(notes or [])
    return head + body + "".join(f"\n{note}\n" for note in notes)


def to_text(rows: list[dict[str, Any]], fmt: str, columns: tuple[str, ...] = COLUMNS,
            notes: list[str] | None = None) -> str:
    """`rows` as md, csv or json text; `columns` lead (md shows only them), `notes` follow a
    Markdown table."""
    clean = _rows(rows, columns)
    if fmt == "json":
        return json.dumps(clean, indent=2) + "\n"
    if fmt == "csv":
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(clean[0]) if clean else list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(clean)
        return buffer.getvalue()
    if fmt == "md":
        return to_markdown(rows, columns, notes)
    raise UserInputError(f"Unknown format '{fmt}': use md, csv or json.")


def check_output_path(path: str | Path) -> None:
    """Refuse, before any work, a file path that names a directory, sits under a file, or is in a
    place this process cannot write."""
    import os

    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"Cannot write '{path}': it is a directory; give a file name.")
    existing = path.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"Cannot write '{path}': {existing} is a file, not a directory.")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserInputError(f"Cannot write '{path}': the file is read-only for this process.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"Cannot write '{path}': {existing} is read-only for this process.")


def check_export_path(path: str | Path) -> None:
    """An export's suffix and place, checked before a run."""
    path = Path(path)
    if path.suffix.lower() not in (".md", ".csv", ".json"):
        raise UserInputError(f"Cannot export to '{path}': use a .md, .csv or .json file name.")
    check_output_path(path)


def export(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write `rows` to `path`: .md (a Markdown table), .csv, or .json (a list of row objects);
    whole or not at all (a reader never finds half an export)."""
    from gileak.store import atomic_write_text

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".md", ".csv", ".json"):
        raise UserInputError(f"Cannot export to '{path}': use a .md, .csv or .json file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, to_text(rows, suffix[1:]), newline="" if suffix == ".csv" else None)
