"""The rich leaderboard: one row per (dataset, model, defense, client, attack), best privacy last."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

#: What a row that is not a measurement says in place of its SSIM, so it cannot be read as one.
STATUS_STYLE = {"failed": "bold red", "not applicable": "yellow", "partial": "yellow"}


#: The columns that name a row.
NAME_COLUMNS = ("dataset", "model", "defense", "client", "attack")


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return fmt.format(value)


def _published(value: Any, difference: float | None, fmt: str) -> str:
    """'0.87 ± 0.11 (Δ −0.05)': a published figure and this run's difference from it."""
    if value is None:
        return ""
    if isinstance(value, list):
        text = fmt.format(value[0]) + ("" if value[1] is None else " ± " + fmt.format(value[1]))
    else:
        text = fmt.format(value)
    if difference is not None:
        text += f" (Δ {fmt.format(difference).replace('-', '−')})" if difference < 0 else \
            f" (Δ +{fmt.format(difference)})"
    return text


def _paper_cells(comparison) -> list[Text]:
    if comparison is None or not comparison.values:
        return [Text(""), Text(""), Text(""),
                Text("attack differs" if comparison is not None and comparison.attack_differs else "")]
    values, differences = comparison.values, comparison.differences
    where = Text(",".join(comparison.tables))
    if comparison.smaller_budget:
        where.append(" *", style="yellow")
    if comparison.stand_in:
        where.append(" †", style="yellow")
    return [Text(_published(values.get("ssim"), differences.get("ssim"), "{:.2f}")),
            Text(_published(values.get("asr"), differences.get("asr"), "{:.1f}")),
            Text(_published(values.get("accuracy"), differences.get("accuracy"), "{:.1f}")), where]


def render_leaderboard(rows: list[dict[str, Any]], console: Console | None = None,
                       title: str = "gileak leaderboard", comparisons: list | None = None,
                       extra_notes: list[str] | None = None) -> Table:
    """Print the leaderboard; failed cells stay in it with their reason. With `comparisons`
    (gileak.paper.compare, one per row), the published figures and the differences sit beside
    each matching row. Returns the table. Every cell is rich Text: labels, paths and reasons
    print as written on any console."""
    console = console or Console()
    table = Table(title=Text(title, style="bold"), show_lines=False)
    headers = list(TABLE_COLUMNS)
    if comparisons is not None:
        headers += [("paper SSIM (Δ)", "right"), ("paper ASR % (Δ)", "right"), ("paper acc % (Δ)", "right"),
                    ("paper table", "left")]
    for header, justify in headers:
        table.add_column(Text(header), justify=justify, overflow="fold")
    for index, row in enumerate(rows):
        names = [Text(str(row.get(k, "gradient" if k == "client" else ""))) for k in NAME_COLUMNS]
        paper = _paper_cells(comparisons[index]) if comparisons is not None else []
        status = str(row.get("status") or "ok")
        status_cell = Text(status.upper() if status == "failed" else status, style=STATUS_STYLE.get(status, "green"))
        blank = [Text("")] * (len(TABLE_COLUMNS) - len(NAME_COLUMNS) - 2)
        if status == "failed":
            reason = (row.get("error") or "unknown reason").strip().splitlines()[0]
            table.add_row(*names, status_cell, Text(f"failed: {reason}", style="red"), *blank, *paper)
            continue
        if status == "not applicable":
            table.add_row(*names, status_cell, Text("— (see note)", style="yellow"), *blank, *paper)
            continue
        table.add_row(*names, status_cell, *[Text(cell) for cell in metric_cells(row)], *paper)
    notes = leaderboard_notes(rows) + list(extra_notes or [])
    table.caption = Text("\n".join(notes))
    table.caption_justify = "left"
    console.print(table)
    return table


#: The leaderboard's columns (header, justification) for other renderings of it (the HTML report).
TABLE_COLUMNS = (
    ("dataset", "left"), ("model", "left"), ("defense", "left"), ("client", "left"), ("attack", "left"),
    ("status", "left"),
    ("SSIM ↓", "right"), ("ASR %", "right"), ("PSNR", "right"), ("MSE", "right"), ("LPIPS", "right"),
    ("labels (blind)", "right"), ("acc %", "right"), ("params (+%)", "right"), ("victims", "right"),
    ("time s", "right"),
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
    labels = "—"
    if row.get("label_accuracy") is not None:
        labels = f"{_num(row['label_accuracy'], '{:.2f}')} ({_num(row.get('label_baseline'), '{:.2f}')})"
    victims = str(row.get("victims", "—"))
    if row.get("images") and row.get("images") != row.get("victims"):
        victims += f" ({row['images']} img)"
    return [ssim, _num(row.get("asr"), "{:.1f}"), _num(row.get("psnr_mean"), "{:.2f}"),
            _num(row.get("mse_mean"), "{:.4f}"), _num(row.get("lpips_mean")), labels, accuracy, params,
            victims, _num(row.get("seconds"), "{:.1f}")]


def leaderboard_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The notes under the leaderboard, as plain text: failed rows, why a column shows —, what ε
    and ASR mean, partial rows."""
    notes = [f"LPIPS —: {note}" for note in sorted({r["lpips_note"] for r in rows if r.get("lpips_note")})]
    measured = [r for r in rows if r.get("status") not in ("failed", "not applicable")]
    if measured and not any(r.get("accuracy_mean") is not None for r in rows):
        notes.append("acc —: no federated training in this run (--rounds 0); accuracy not measured")
    if any(r.get("epsilon") is not None for r in rows):
        notes.append("ε: DP-SGD privacy spent in training at δ = 1e-5 (Opacus RDP accountant; the client that spent most)")
    notes.append("ASR = share of images reconstructed with SSIM >= 0.5; lower SSIM/ASR = better privacy")
    if any(r.get("label_accuracy") is not None for r in rows):
        notes.append("labels: share of each victim's labels the attack found itself (as multisets); in brackets, "
                     "what a guess without the gradient gets on the same labels (the batch spread evenly over the "
                     "classes): only the excess over it is leakage")
    if any(r.get("images") and r.get("images") != r.get("victims") for r in rows):
        notes.append("victims (img): attacked uploads, and the images behind them; SSIM, ASR, PSNR, MSE and LPIPS "
                     "are per image, each reconstruction paired with an original by the assignment of highest "
                     "total SSIM (an evaluation step that uses the ground truth)")
    notes += [f"partial (some seeds failed; scored on the others): "
              f"{' | '.join(str(r.get(k, '')) for k in NAME_COLUMNS)}: {r.get('error')}"
              for r in rows if r.get("status") == "partial"]
    failed = sum(r.get("status") == "failed" for r in rows)
    if failed:
        notes.insert(0, f"FAILED: {failed} row(s) measured nothing (reason in the row); they are not privacy")
    return notes
