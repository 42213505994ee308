"""The rich leaderboard: one row per (dataset, model, defense, attack), best privacy last."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return fmt.format(value)


def render_leaderboard(rows: list[dict[str, Any]], console: Console | None = None,
                       title: str = "gileak leaderboard") -> Table:
    """Print the leaderboard; failed cells stay in it with their reason. Returns the table."""
    console = console or Console()
    table = Table(title=title, title_style="bold", show_lines=False)
    for header, justify in (
        ("dataset", "left"), ("model", "left"), ("defense", "left"), ("attack", "left"),
        ("SSIM ↓", "right"), ("ASR %", "right"), ("PSNR", "right"), ("MSE", "right"), ("LPIPS", "right"),
        ("acc %", "right"), ("params (+%)", "right"), ("victims", "right"), ("time s", "right"),
    ):
        table.add_column(header, justify=justify, overflow="fold")
    has_accuracy = any(r.get("accuracy_mean") is not None for r in rows)
    for row in rows:
        names = [str(row[k]) for k in ("dataset", "model", "defense", "attack")]
        if row.get("status") == "failed":
            reason = (row.get("error") or "unknown reason").strip().splitlines()[0]
            table.add_row(*names, f"[red]failed: {escape(reason)}[/]", *[""] * 8)
            continue
        if row.get("status") == "not applicable":
            table.add_row(*names, "[yellow]not applicable[/] (see note)", *[""] * 8)
            continue
        ssim = f"{_num(row.get('ssim_mean'))} ± {_num(row.get('ssim_std'))}"
        accuracy = "—"
        if row.get("accuracy_mean") is not None:
            accuracy = f"{_num(100 * row['accuracy_mean'], '{:.1f}')} ± {_num(100 * row['accuracy_std'], '{:.1f}')}"
            if row.get("epsilon") is not None:
                accuracy += f" (ε={_num(row['epsilon'], '{:.3g}')})"
        params = "—" if row.get("params") is None else f"{row['params']:,} (+{row['params_added_pct']:.1f}%)"
        table.add_row(
            *names, ssim, _num(row.get("asr"), "{:.1f}"), _num(row.get("psnr_mean"), "{:.2f}"),
            _num(row.get("mse_mean"), "{:.4f}"), _num(row.get("lpips_mean")), accuracy, params,
            str(row.get("victims", "—")), _num(row.get("seconds"), "{:.1f}"),
        )
    notes = []
    lpips_notes = sorted({r["lpips_note"] for r in rows if r.get("lpips_note")})
    notes += [f"LPIPS —: {note}" for note in lpips_notes]
    measured = [r for r in rows if r.get("status") not in ("failed", "not applicable")]
    if not has_accuracy and measured:
        notes.append("acc —: no federated training in this run (--rounds 0); accuracy not measured")
    if any(r.get("epsilon") is not None for r in rows):
        notes.append("ε: DP-SGD privacy spent in training at δ = 1e-5 (Opacus RDP accountant; the client that spent most)")
    notes.append("ASR = share of victims reconstructed with SSIM >= 0.5; lower SSIM/ASR = better privacy")
    partial = [r for r in rows if r.get("status") == "partial"]
    notes += [f"partial: {' | '.join(str(r[k]) for k in ('dataset', 'model', 'defense', 'attack'))}: "
              f"{escape(str(r.get('error')))}" for r in partial]
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    console.print(table)
    return table


#: The leaderboard's columns (header, justification) for other renderings of it (the HTML report).
TABLE_COLUMNS = (
    ("dataset", "left"), ("model", "left"), ("defense", "left"), ("attack", "left"), ("status", "left"),
    ("SSIM ↓", "right"), ("ASR %", "right"), ("PSNR", "right"), ("MSE", "right"), ("LPIPS", "right"),
    ("acc %", "right"), ("params (+%)", "right"), ("victims", "right"), ("time s", "right"),
)


def metric_cells(row: dict[str, Any]) -> list[str]:
    """The texts of the metric columns (SSIM ↓ to time s) of a measured row, as the table prints them."""
    ssim = f"{_num(row.get('ssim_mean'))} ± {_num(row.get('ssim_std'))}"
    accuracy = "—"
    if row.get("accuracy_mean") is not None:
        accuracy = f"{_num(100 * row['accuracy_mean'], '{:.1f}')} ± {_num(100 * row['accuracy_std'], '{:.1f}')}"
        if row.get("epsilon") is not None:
            accuracy += f" (ε={_num(row['epsilon'], '{:.3g}')})"
    params = "—" if row.get("params") is None else f"{row['params']:,} (+{row['params_added_pct']:.1f}%)"
    return [ssim, _num(row.get("asr"), "{:.1f}"), _num(row.get("psnr_mean"), "{:.2f}"),
            _num(row.get("mse_mean"), "{:.4f}"), _num(row.get("lpips_mean")), accuracy, params,
            str(row.get("victims", "—")), _num(row.get("seconds"), "{:.1f}")]


def leaderboard_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The notes under the leaderboard, as plain text: failed rows, why a column shows —, what ε
    and ASR mean, partial rows."""
    notes = [f"LPIPS —: {note}" for note in sorted({r["lpips_note"] for r in rows if r.get("lpips_note")})]
    measured = [r for r in rows if r.get("status") not in ("failed", "not applicable")]
    if measured and not any(r.get("accuracy_mean") is not None for r in rows):
        notes.append("acc —: no federated training in this run (--rounds 0); accuracy not measured")
    if any(r.get("epsilon") is not None for r in rows):
        notes.append("ε: DP-SGD privacy spent in training at δ = 1e-5 (Opacus RDP accountant; the client that spent most)")
    notes.append("ASR = share of victims reconstructed with SSIM >= 0.5; lower SSIM/ASR = better privacy")
    notes += [f"partial (some seeds failed; scored on the others): "
              f"{' | '.join(str(r[k]) for k in ('dataset', 'model', 'defense', 'attack'))}: {r.get('error')}"
              for r in rows if r.get("status") == "partial"]
    failed = sum(r.get("status") == "failed" for r in rows)
    if failed:
        notes.insert(0, f"FAILED: {failed} row(s) measured nothing (reason in the row); they are not privacy")
    return notes
