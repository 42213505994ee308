"""The results store: one SQLite database per run directory (`results.sqlite`).

Every finished (training cell, attack) result — its per-victim metrics, the cell's utility curve,
timings and the environment it ran in — is written in one transaction the moment it finishes, so
a process killed at any point (even `kill -9`) loses at most the work in flight, and SQLite's
journal keeps the file consistent. Running the same bench into the same directory again reads
what is there and computes only the rest; the leaderboard is always rebuilt from the store, so
a resumed run and an uninterrupted one print the same rows.

Identity. A result is keyed by its cell (dataset, model, defense — each by name and its full,
validated parameters, defaults included — and seed) and its attack (name and parameters). The
display labels are kept beside them. The budget (victims, iterations, rounds, attacked round) is
the directory's: a run asking for another budget is refused, never mixed in. A different matrix
with the same budget is merged cell by cell.
"""

from __future__ import annotations

import json
import platform
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gileak.errors import UserInputError

FILENAME = "results.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    cell TEXT NOT NULL, attack TEXT NOT NULL,
    dataset TEXT NOT NULL, model TEXT NOT NULL, defense TEXT NOT NULL, seed INTEGER NOT NULL,
    attack_label TEXT NOT NULL, position INTEGER NOT NULL,
    status TEXT NOT NULL, error TEXT, note TEXT,
    seconds REAL, accuracy REAL, epsilon REAL, params INTEGER, params_added_pct REAL,
    rounds_run INTEGER, attacked_round INTEGER, training_seconds REAL,
    accuracy_curve TEXT, cell_notes TEXT, env TEXT, finished REAL NOT NULL,
    PRIMARY KEY (cell, attack)
);
CREATE TABLE IF NOT EXISTS victims (
    cell TEXT NOT NULL, attack TEXT NOT NULL, idx INTEGER NOT NULL,
    victim INTEGER, label INTEGER, ssim REAL, psnr REAL, mse REAL, lpips REAL,
    iterations INTEGER, loss REAL,
    PRIMARY KEY (cell, attack, idx)
);
CREATE TABLE IF NOT EXISTS running (cell TEXT PRIMARY KEY, started REAL NOT NULL, pid INTEGER);
"""

def canonical(name: str, params: dict[str, Any]) -> str:
    """A component's identity: its name and full parameters, in a stable text form. A dataset's
    `root` is where its files are, not what they are, so it is left out."""
    params = {k: v for k, v in sorted(params.items()) if k != "root"}
    return f"{name}{json.dumps(params, sort_keys=True, default=str, separators=(',', ':'))}"


def environment(device: str) -> dict[str, Any]:
    """Versions and device a result was computed with."""
    import torch

    import gileak

    env = {
        "gileak": gileak.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


@dataclass
class VictimRecord:
    victim: int
    label: int
    ssim: float
    psnr: float | None
    mse: float
    lpips: float | None
    iterations: int
    loss: float | None


@dataclass(kw_only=True)
class CellFacts:
    """What a training cell's attacks share: utility, size, training, notes, environment."""

    accuracy: float | None = None
    epsilon: float | None = None
    params: int | None = None
    params_added_pct: float | None = None
    rounds_run: int | None = None
    attacked_round: int | None = None
    training_seconds: float | None = None
    accuracy_curve: list[float] = field(default_factory=list)
    cell_notes: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)

    def facts(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(CellFacts)}


@dataclass(kw_only=True)
class StoredResult(CellFacts):
    """One (cell, attack) as stored: an `ok` result has victims; `failed` and `not applicable`
    carry the reason in `error`."""

    cell: str
    attack: str
    dataset: str
    model: str
    defense: str
    seed: int
    attack_label: str
    position: int
    status: str
    error: str | None = None
    note: str | None = None
    seconds: float | None = None
    victims: list[VictimRecord] = field(default_factory=list)


class ResultStore:
    """The SQLite store of one run directory. Each write is one transaction."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise UserInputError(f"{self.path} is not a gileak results store ({e}); use another --out.") from e
        version = self.get_meta("schema")
        if version is None:
            self.set_meta("schema", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise UserInputError(f"{self.path} was written by another gileak version (store schema {version}, "
                                 f"this gileak reads {SCHEMA_VERSION}); use another --out.")

    @classmethod
    def open_existing(cls, run_dir: Path) -> ResultStore:
        path = Path(run_dir) / FILENAME
        if not path.is_file():
            raise UserInputError(f"{run_dir} holds no gileak results ({FILENAME} not found); "
                                 "give the --out directory of a `gileak bench` run.")
        return cls(run_dir)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def check_budget(self, budget: dict[str, Any]) -> None:
        """The directory's budget is set by its first run; another budget is refused."""
        stored = self.get_meta("budget")
        if stored is None or not self.count():
            self.set_meta("budget", json.dumps(budget, sort_keys=True))
            return
        old = json.loads(stored)
        changed = [k for k in budget if old.get(k) != budget[k]]
        if changed:
            what = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} (this run asks for {budget[k]})" for k in changed)
            raise UserInputError(
                f"{self.path.parent} holds results made with {what}. Results with another budget cannot be "
                "mixed into one leaderboard: use a new --out directory, or the directory's budget to resume it."
            )

    # -- results ----------------------------------------------------------------------------
    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def statuses(self) -> dict[tuple[str, str], str]:
        return {(c, a): s for c, a, s in self.db.execute("SELECT cell, attack, status FROM results")}

    def mark_running(self, cell: str) -> None:
        import os

        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO running VALUES (?, ?, ?)", (cell, time.time(), os.getpid()))

    def clear_running(self, cell: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM running WHERE cell = ?", (cell,))

    def interrupted(self) -> list[str]:
        """Cells a previous process started and did not finish."""
        return [row[0] for row in self.db.execute("SELECT cell FROM running")]

    def clear_all_running(self) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM running")

    def record_run(self, started: float, ended: float, *, completed: bool, computed: int, reused: int) -> None:
        """Append one bench invocation (its wall-clock span, whether it ran to the end, results it
        set out to compute and reused) to the directory's history, for the report's wall time."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'runs'").fetchone()
            try:
                runs = json.loads(row[0]) if row else []
            except (TypeError, ValueError):
                runs = None
            if not isinstance(runs, list):  # a damaged history is started again, never the run's end
                runs = []
            runs.append({"started": started, "ended": ended, "completed": completed, "computed": computed,
                         "reused": reused})
            db.execute("INSERT OR REPLACE INTO meta VALUES ('runs', ?)", (json.dumps(runs),))

    def runs(self) -> list[dict[str, Any]]:
        """The bench invocations recorded by `record_run`, oldest first (empty for directories
        written before it existed)."""
        stored = self.get_meta("runs")
        try:
            runs = json.loads(stored) if stored else []
        except json.JSONDecodeError:
            return []
        return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []

    def put(self, result: StoredResult) -> None:
        """Write one result and its victims, replacing an earlier one with the same key (a
        failed attempt that is retried), in one transaction."""
        with self.transaction() as db:
            db.execute("DELETE FROM victims WHERE cell = ? AND attack = ?", (result.cell, result.attack))
            db.execute(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (result.cell, result.attack, result.dataset, result.model, result.defense, result.seed,
                 result.attack_label, result.position, result.status, result.error, result.note, result.seconds,
                 result.accuracy, result.epsilon, result.params, result.params_added_pct, result.rounds_run,
                 result.attacked_round, result.training_seconds, json.dumps(result.accuracy_curve),
                 json.dumps(result.cell_notes), json.dumps(result.env), time.time()),
            )
            db.executemany(
                "INSERT INTO victims VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(result.cell, result.attack, i, v.victim, v.label, v.ssim, v.psnr, v.mse, v.lpips, v.iterations,
                  v.loss) for i, v in enumerate(result.victims)],
            )

    def results(self, keys: set[tuple[str, str]] | None = None) -> list[StoredResult]:
        """Stored results in the order their cells were planned (`position`), then by seed;
        only `keys` when given."""
        columns = [d[1] for d in self.db.execute("PRAGMA table_info(results)")]
        rows = self.db.execute("SELECT * FROM results ORDER BY position, seed, finished").fetchall()
        victims: dict[tuple[str, str], list[VictimRecord]] = {}
        for cell, attack, _i, *values in self.db.execute("SELECT * FROM victims ORDER BY cell, attack, idx"):
            victims.setdefault((cell, attack), []).append(VictimRecord(*values))
        out = []
        for row in rows:
            values = dict(zip(columns, row))
            if keys is not None and (values["cell"], values["attack"]) not in keys:
                continue
            values.pop("finished")
            for name in ("accuracy_curve", "cell_notes", "env"):
                values[name] = json.loads(values[name]) if values[name] else ([] if name != "env" else {})
            out.append(StoredResult(**values, victims=victims.get((values["cell"], values["attack"]), [])))
        return out
