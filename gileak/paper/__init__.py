"""The paper's published figures (Tables I-XII of Scheliga, Mäder, Seeland) as data, and their
comparison with leaderboard rows by canonical identity, for `gileak leaderboard DIR --paper`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from gileak.errors import UserInputError

#: Published metrics that depend on the attack, and those that depend on the cell alone
#: (dataset, model, defense: training and structure).
PRIVACY = ("ssim", "asr", "psnr", "mse", "lpips")
UTILITY = ("accuracy", "params")
#: Where several tables report one cell, figures are taken from the first of this order: the
#: main text, then the Supplementary's fuller tables.
TABLE_ORDER = ("II", "III", "IV", "V", "VI", "VII", "VIII", "I", "IX", "X", "XI", "XII")
#: Leaderboard metric each published one is compared with, and the scale that brings ours to the
#: paper's unit (accuracy: a fraction here, % there).
OURS = {"ssim": ("ssim_mean", 1.0), "asr": ("asr", 1.0), "psnr": ("psnr_mean", 1.0), "mse": ("mse_mean", 1.0),
        "lpips": ("lpips_mean", 1.0), "accuracy": ("accuracy_mean", 100.0), "params": ("params", 1)}


@dataclass(frozen=True)
class Published:
    """One published row of one table: the components it was measured with, as gileak names
    them, and its figures (see `units` in published.json)."""

    table: str
    row: str
    dataset: str
    model: str
    defense: str
    attack: str | None  # None: the table reports utility only (Table VII)
    values: dict[str, Any]
    note: str | None = None


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    text = resources.files("gileak.paper").joinpath("published.json").read_text(encoding="utf-8")
    return json.loads(text)


def protocol() -> dict[str, int]:
    """The paper's budget: victims per cell, attack iterations, rounds, patience, seeds."""
    return dict(_document()["protocol"])


def entries() -> list[Published]:
    """Every transcribed row, in the tables' order."""
    found = []
    for item in _document()["entries"]:
        values = {k: item[k] for k in (*PRIVACY, *UTILITY) if k in item}
        found.append(Published(item["table"], item["row"], item["dataset"], item["model"], item["defense"],
                               item["attack"], values, item.get("note")))
    return found


def _canonical(kind: str, text: str) -> str:
    """A component written in the CLI syntax, resolved under the paper profile, as the store
    identifies it."""
    from gileak.runner import resolve
    from gileak.spec import parse_component
    from gileak.store import canonical

    refs = parse_component(text)
    if len(refs) != 1:
        raise UserInputError(f"'{text}' names {len(refs)} {kind}s, not one")
    resolved = resolve(kind, refs[0], profile="paper")
    return canonical(refs[0].name, resolved.component.params.model_dump(mode="json"))


def identity(entry: Published) -> tuple[tuple[str, str, str], str | None]:
    """((dataset, model, defense), attack) of a published row, each canonical."""
    cell = (_canonical("dataset", entry.dataset), _canonical("model", entry.model),
            _canonical("defense", entry.defense))
    return cell, (_canonical("attack", entry.attack) if entry.attack else None)


@lru_cache(maxsize=1)
def _indexed() -> list[tuple[Published, tuple[str, str, str], str | None]]:
    return [(entry, *identity(entry)) for entry in entries()]


def parse_stand_ins(texts: list[str]) -> dict[str, tuple[str, str, str]]:
    """`photos=cifar10` -> {canonical photos: (canonical cifar10, 'photos', 'cifar10')}: rows
    measured on the left dataset are compared with the paper's figures for the right one."""
    from gileak.spec import _split_top_level

    paper_datasets = {e.dataset for e in entries()}
    found = {}
    for text in texts:
        for item in _split_top_level(text, ","):
            parts = _split_top_level(item.strip(), "=")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise UserInputError(f"Cannot read --paper-stand-in '{item}': write DATASET=PAPER_DATASET, "
                                     "e.g. photos=cifar10.")
            ours, theirs = (p.strip() for p in parts)
            if theirs not in paper_datasets:
                raise UserInputError(f"--paper-stand-in: the paper publishes no figures for '{theirs}'; "
                                     f"it has: {', '.join(sorted(paper_datasets))}.")
            found[_canonical("dataset", ours)] = (_canonical("dataset", theirs), ours, theirs)
    return found


@dataclass
class Comparison:
    """The published figures beside one leaderboard row."""

    values: dict[str, Any] = field(default_factory=dict)  # metric -> published value
    differences: dict[str, float] = field(default_factory=dict)  # metric -> ours - paper (paper's unit)
    tables: list[str] = field(default_factory=list)
    smaller_budget: list[str] = field(default_factory=list)
    stand_in: str | None = None  # "digits for the paper's mnist"
    notes: list[str] = field(default_factory=list)
    attack_differs: bool = False  # the cell was published, this attack's parameters were not


def _budget_shortfall(budget: dict[str, Any], seeds: int) -> list[str]:
    paper = protocol()
    if not budget:
        return ["budget unknown: the run directory records none"]
    short = []
    for key in ("victims", "iterations", "rounds"):
        ours = budget.get(key)
        if ours is not None and ours < paper[key]:
            short.append(f"{key} {ours:,} of {paper[key]:,}")
    if budget.get("rounds") and budget.get("patience") is not None and budget["patience"] < paper["patience"]:
        short.append(f"patience {budget['patience']} of {paper['patience']}")
    if seeds < paper["seeds"]:
        short.append(f"seeds {seeds} of {paper['seeds']}")
    attack_at = str(budget.get("attack_at", "final"))
    if attack_at != "final":
        short.append(f"model attacked at round {attack_at}, the paper's after training")
    return short


def compare(rows: list[dict[str, Any]], sources: dict, budget: dict[str, Any],
            stand_ins: dict[str, tuple[str, str, str]] | None = None) -> list[Comparison | None]:
    """For each row, the published figures of the same (dataset, model, defense[, attack]) —
    matched by canonical identity, never by label — or None. Privacy figures need the attack to
    match too; accuracy and parameter counts need the cell only."""
    stand_ins = stand_ins or {}
    order = {t: i for i, t in enumerate(TABLE_ORDER)}
    indexed = sorted(_indexed(), key=lambda item: order[item[0].table])
    out: list[Comparison | None] = []
    for row in rows:
        # rows name their client (results store their sources by it); rows without one are the paper's
        names = (row["dataset"], row["model"], row["defense"], row["attack"])
        source = sources.get((*names[:3], row["client"], names[3]) if "client" in row else names)
        if source is None or len(source.cells) != 1 or len(source.attacks) != 1:
            out.append(None)  # unknown, or one label over several parameter sets: nothing to match
            continue
        parts = next(iter(source.cells)).split(" | ")
        if len(parts) != 3:
            out.append(None)
            continue
        stand_in = stand_ins.get(parts[0])
        cell = (stand_in[0] if stand_in else parts[0], parts[1], parts[2])
        attack = next(iter(source.attacks))
        same_cell = [(e, a) for e, c, a in indexed if c == cell]
        same_attack = [e for e, a in same_cell if a == attack]
        attack_name = attack.split("{", 1)[0]
        differs = not same_attack and any(a is not None and a.split("{", 1)[0] == attack_name for _, a in same_cell)
        if not same_cell:
            out.append(None)
            continue
        comparison = Comparison(stand_in=f"{stand_in[1]} for the paper's {stand_in[2]}" if stand_in else None,
                                attack_differs=differs)
        published: dict[str, dict[str, list[str]]] = {}  # metric -> value as text -> tables
        # Accuracy and parameter counts belong to the cell, whatever attacked it; privacy figures
        # only to the same attack with the same parameters.
        matched = [e for e, _ in same_cell if e in same_attack or any(m in UTILITY for m in e.values)]
        for entry in matched:
            for metric, value in entry.values.items():
                if metric in PRIVACY and entry not in same_attack:
                    continue
                comparison.values.setdefault(metric, value)
                tables = published.setdefault(metric, {}).setdefault(_plain(value), [])
                if entry.table not in tables:
                    tables.append(entry.table)
            if entry.table not in comparison.tables:
                comparison.tables.append(entry.table)
            if entry.note and f"{_where(row)}: {entry.note}" not in comparison.notes:
                comparison.notes.append(f"{_where(row)}: {entry.note}")
        for metric, by_value in published.items():
            if len(by_value) > 1:  # the paper's tables disagree about this cell
                listed = "; ".join(f"{value} (Table{'s' if len(t) > 1 else ''} {', '.join(t)})"
                                   for value, t in by_value.items())
                comparison.notes.append(f"{_where(row)}: the paper's tables publish different {metric} for this "
                                        f"cell: {listed}; the first is shown")
        for metric, value in comparison.values.items():
            if metric not in OURS:
                continue
            key, scale = OURS[metric]
            ours = row.get(key)
            paper_value = value[0] if isinstance(value, list) else value
            if ours is None or paper_value is None or (isinstance(ours, float) and not math.isfinite(ours)):
                continue
            comparison.differences[metric] = ours * scale - paper_value
        comparison.smaller_budget = _budget_shortfall(budget, len(source.seeds))
        out.append(comparison)
    return out


def _where(row: dict[str, Any]) -> str:
    return " | ".join(str(row[k]) for k in ("dataset", "model", "defense", "attack"))


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return " ± ".join("—" if v is None else f"{v:g}" for v in value)
    return f"{value:g}"


#: Export columns `--paper` adds (published values in the paper's units: %, dB).
COLUMNS = ("paper_ssim_mean", "paper_ssim_std", "delta_ssim", "paper_asr", "delta_asr", "paper_psnr_mean",
           "delta_psnr", "paper_mse_mean", "delta_mse", "paper_lpips_mean", "delta_lpips", "paper_accuracy_mean",
           "paper_accuracy_std", "delta_accuracy", "paper_params", "delta_params", "paper_tables", "paper_budget",
           "paper_stand_in")


def annotate(rows: list[dict[str, Any]], comparisons: list[Comparison | None]) -> list[dict[str, Any]]:
    """Copies of `rows` with the `COLUMNS` filled where a row matched (None elsewhere)."""
    annotated = []
    for row, comparison in zip(rows, comparisons):
        extra: dict[str, Any] = dict.fromkeys(COLUMNS)
        if comparison is not None and comparison.values:
            for metric, value in comparison.values.items():
                if metric == "params":
                    extra["paper_params"] = value[0]
                elif metric == "asr":
                    extra["paper_asr"] = value
                else:
                    extra[f"paper_{metric}_mean"] = value[0]
                    if f"paper_{metric}_std" in extra:
                        extra[f"paper_{metric}_std"] = value[1]
            for metric, difference in comparison.differences.items():
                extra[f"delta_{metric}"] = difference
            extra["paper_tables"] = ",".join(comparison.tables)
            extra["paper_budget"] = "; ".join(comparison.smaller_budget) or "the paper's"
            extra["paper_stand_in"] = comparison.stand_in
        annotated.append({**row, **extra})
    return annotated


def caption(comparisons: list[Comparison | None]) -> list[str]:
    """The lines under a leaderboard shown with --paper: what was compared and how far it holds."""
    matched = [c for c in comparisons if c is not None and c.values]
    lines = []
    if not matched:
        lines.append("paper: no row matches a published cell (same dataset, model, defense and attack "
                     "parameters as the paper's; see docs/reproducing.md)")
    else:
        lines.append("paper: the figures published for the same dataset, model, defense (and attack) by canonical "
                     "identity; Δ = this run − paper (accuracy and ASR in percentage points)")
    budgets = sorted({"; ".join(c.smaller_budget) for c in matched if c.smaller_budget})
    for budget in budgets:
        lines.append(f"paper *: measured at a smaller budget than the paper's ({budget}): the differences are "
                     "not a replication")
    stand_ins = sorted({c.stand_in for c in matched if c.stand_in})
    for stand_in in stand_ins:
        lines.append(f"paper †: stand-in data, {stand_in}: different images, so the differences are not a "
                     "replication")
    if any(c.attack_differs for c in comparisons if c is not None):
        lines.append("paper: some rows' attack parameters differ from the paper's protocol (e.g. ig's schedule; "
                     "--profile paper sets it), so their SSIM and ASR are not compared")
    notes = sorted({note for c in matched for note in c.notes})
    lines += [f"paper: {note}" for note in notes]
    return lines
