"""The results store: one SQLite database per run directory (`results.sqlite`).

Every finished (training cell, attack) result — its per-victim metrics, the cell's utility curve,
timings and the environment it ran in — is written in one transaction the moment it finishes, so
a process killed at any point (even `kill -9`) loses at most the work in flight, and SQLite's
journal keeps the file consistent. Running the same bench into the same directory again reads
what is there and computes only the rest; the leaderboard is always rebuilt from the store, so
a resumed run and an uninterrupted one print the same rows.

Identity. A result is keyed by its cell (dataset, model, defense — each by name and its full,
validated parameters, defaults included, and a dataset's data identity, such as a folder's
resolved path and the digest of its files — and seed) and its attack (name and parameters), to
which the client protocol (name and parameters) is added unless it is the paper's
gradient(batch=1) — so results stored before clients existed keep their key and meaning. The
display labels are kept beside them. Per image: its metrics, the victim (upload) it belongs
to, and that victim's iterations, loss and label accuracy. The budget (victims, iterations, rounds, attacked round) is
the directory's: a run asking for another budget is refused, never mixed in. A different matrix
with the same budget is merged cell by cell.

One writer. A bench holds an exclusive lock on the directory (`RunLock`) for as long as it runs;
a second one is refused at once. Readers open the store read-only and need no lock.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gileak.errors import GileakError, UserInputError

FILENAME = "results.sqlite"
LOCK_FILENAME = "gileak.lock"
SCHEMA_VERSION = 2
#: Columns schema 2 added to schema 1's tables. A schema-1 store is upgraded in place when a
#: bench opens it for writing, and read as it is otherwise; its rows mean what they meant: the
#: paper's client, one image per victim.
_ADDED_IN_2 = (
    ("results", "client", "TEXT NOT NULL DEFAULT 'gradient'"),
    ("victims", "upload", "INTEGER"),
    ("victims", "label_accuracy", "REAL"),
    ("victims", "label_baseline", "REAL"),
)
#: Seconds a statement waits for a lock another (non-gileak) process holds on the store.
BUSY_TIMEOUT = 30.0
_TABLES = {"meta", "results", "victims", "running"}
_NUMERIC = ("seed", "position", "seconds", "accuracy", "epsilon", "params", "params_added_pct", "rounds_run",
            "attacked_round", "training_seconds")

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
    client TEXT NOT NULL DEFAULT 'gradient',
    PRIMARY KEY (cell, attack)
);
CREATE TABLE IF NOT EXISTS victims (
    cell TEXT NOT NULL, attack TEXT NOT NULL, idx INTEGER NOT NULL,
    victim INTEGER, label INTEGER, ssim REAL, psnr REAL, mse REAL, lpips REAL,
    iterations INTEGER, loss REAL, upload INTEGER, label_accuracy REAL, label_baseline REAL,
    PRIMARY KEY (cell, attack, idx)
);
CREATE TABLE IF NOT EXISTS running (cell TEXT PRIMARY KEY, started REAL NOT NULL, pid INTEGER);
"""

#: The columns this code writes, by name (so a column added by an upgrade may sit wherever
#: ALTER TABLE put it); reading takes each table's columns by name too.
_RESULT_COLUMNS = (
    "cell", "attack", "dataset", "model", "defense", "seed", "attack_label", "position", "status", "error", "note",
    "seconds", "accuracy", "epsilon", "params", "params_added_pct", "rounds_run", "attacked_round",
    "training_seconds", "accuracy_curve", "cell_notes", "env", "finished", "client",
)
_VICTIM_COLUMNS = ("cell", "attack", "idx", "victim", "label", "ssim", "psnr", "mse", "lpips", "iterations", "loss",
                   "upload", "label_accuracy", "label_baseline")


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
    """One attacked image: its training-set index (`victim`), label and metrics, and the victim
    (upload) it belongs to with that victim's iterations, loss, label accuracy and the
    label-blind baseline (None where the attack was given the labels)."""

    victim: int
    label: int
    ssim: float
    psnr: float | None
    mse: float
    lpips: float | None
    iterations: int
    loss: float | None
    upload: int | None = None
    label_accuracy: float | None = None
    label_baseline: float | None = None


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
    client: str = "gradient"


class ResultStore:
    """The SQLite store of one run directory. Each write is one transaction.

    `ResultStore(dir)` opens it for writing (creating it when absent) and is for the process
    that holds the directory's `RunLock`; `ResultStore.open_existing(dir)` opens it read-only,
    beside a writer or in a directory this process cannot write. Every SQLite error becomes
    one of the messages of `StoreProblem`: missing, empty, damaged, foreign, locked,
    read-only, disk full, deleted."""

    def __init__(self, run_dir: Path, read_only: bool = False) -> None:
        self.path = Path(run_dir) / FILENAME
        self.read_only = read_only
        if not read_only and not self.path.exists():
            self._create()
        self._refuse_empty_file()
        self.db = self._connect()
        self._inode = _inode(self.path)
        try:
            self._check_ours()
            if not read_only:
                with self._errors("opening"):
                    self.db.execute("PRAGMA journal_mode=WAL")  # readers beside the writer
                if self.get_meta("schema") == "1":
                    self._upgrade_from_1()
        except BaseException:
            self.db.close()
            raise

    def _upgrade_from_1(self) -> None:
        """Add schema 2's columns to a schema-1 store, in one transaction."""
        with self.transaction() as db:
            for table, column, declaration in _ADDED_IN_2:
                present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    @classmethod
    def open_existing(cls, run_dir: Path) -> ResultStore:
        """The store of a finished or running bench, read-only."""
        path = Path(run_dir) / FILENAME
        if not path.exists():
            raise UserInputError(f"{run_dir} holds no gileak results ({FILENAME} not found); "
                                 "give the --out directory of a `gileak bench` run.")
        if not path.is_file():
            raise UserInputError(f"{path} is not a file, so it is not a gileak results store.")
        return cls(run_dir, read_only=True)

    # -- opening ----------------------------------------------------------------------------
    def _create(self) -> None:
        """A new store appears whole or not at all: its schema is written into a side file that
        is then renamed into place, so a process killed while creating it never leaves a store
        without tables (which would be indistinguishable from a foreign or truncated file)."""
        side = self.path.with_name(FILENAME + ".new")
        side_files = [side.with_name(side.name + end) for end in ("", "-journal", "-wal", "-shm")]
        for leftover in side_files:
            leftover.unlink(missing_ok=True)
        try:
            with self._errors("creating"):
                # A rollback journal, not WAL, while creating: every committed byte is then in the
                # one file that is renamed (the writer switches to WAL when it opens the store).
                db = sqlite3.connect(side, isolation_level=None)
                try:
                    db.executescript(_SCHEMA)
                    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                finally:
                    db.close()
            os.replace(side, self.path)
        except OSError as e:
            raise write_error(e, side, self.path.parent) from e
        finally:
            for leftover in side_files:
                leftover.unlink(missing_ok=True)

    def _refuse_empty_file(self) -> None:
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise UserInputError(
                f"{self.path} is an empty file (0 bytes): the results store was truncated or replaced, and "
                "gileak never leaves one empty. Move it aside to start this run directory afresh, or use "
                "another --out.")

    def _connect(self) -> sqlite3.Connection:
        from urllib.parse import quote

        uri = f"file:{quote(str(self.path.resolve()))}"
        with self._errors("opening"):
            if not self.read_only:  # mode=rw: never create a file here (the store may have vanished)
                db = sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
                db.execute("PRAGMA synchronous=FULL")
                return db
            try:
                db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                return db
            except sqlite3.OperationalError:
                if os.access(self.path.parent, os.W_OK):
                    raise
            # A directory this process cannot write: SQLite cannot make the WAL index it reads
            # through, but a store closed cleanly has no WAL to read, so it is read as immutable.
            wal = self.path.with_name(FILENAME + "-wal")
            if wal.is_file() and wal.stat().st_size:
                return self._copy_with_wal(wal)
            return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)

    def _copy_with_wal(self, wal: Path) -> sqlite3.Connection:
        """A read-only directory whose store was left with committed results in its WAL (the
        writer was killed): read a private copy, where SQLite can replay the WAL, so no
        finished result is missed."""
        import shutil
        import tempfile

        copy = Path(tempfile.mkdtemp(prefix="gileak-store-")) / FILENAME
        shutil.copyfile(self.path, copy)
        shutil.copyfile(wal, copy.with_name(FILENAME + "-wal"))
        return sqlite3.connect(copy, isolation_level=None)

    def _check_ours(self) -> None:
        """Refuse a damaged store, or an SQLite database that another program wrote."""
        with self._errors("checking"):
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise UserInputError(self._damaged("; ".join(" ".join(str(p).split()) for p in problems)))
        with self._errors("checking"):
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not _TABLES <= tables:
            shown = ", ".join(sorted(tables)) or "none"
            raise UserInputError(
                f"{self.path} is an SQLite database that gileak did not write (its tables: {shown}); gileak "
                "neither reads its rows as results nor writes into it. Use another --out for the bench, or "
                "give `gileak leaderboard` the directory of a `gileak bench` run.")
        version = self.get_meta("schema")
        if version is None or not version.isdigit():
            raise UserInputError(f"{self.path} has gileak's tables but no store version: it was not written "
                                 "by gileak, or was damaged. Use another --out.")
        if int(version) not in (1, SCHEMA_VERSION):  # 1 is upgraded by a writer, read as it is otherwise
            raise UserInputError(f"{self.path} was written by another gileak version (store schema {version}, "
                                 f"this gileak reads {SCHEMA_VERSION}); use another --out.")

    def _damaged(self, detail: str) -> str:
        return (f"{self.path} is damaged ({detail}), so none of its results can be trusted. Move it aside and "
                "run the bench again into this directory (everything is computed afresh), or use another --out.")

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """SQLite's errors as gileak's: what went wrong with which file, and what to do."""
        try:
            yield
        except sqlite3.Error as e:
            raise self.explain(e, doing) from e

    def explain(self, error: sqlite3.Error, doing: str = "using") -> GileakError:
        text = str(error).lower()
        run_dir = self.path.parent
        if "full" in text or ("i/o error" in text and _nearly_full(run_dir)):  # SQLite says I/O error when its
            return disk_full(run_dir, f"{doing} {self.path.name}", kept=doing != "creating")  # index cannot grow
        if "locked" in text or "busy" in text:
            return UserInputError(
                f"{self.path} is locked by another process that holds it open for writing (SQLite: {error}; "
                f"waited {BUSY_TIMEOUT:g} s). gileak's own writers never do this to each other: look for "
                "another program that opened it (an SQLite browser, a sync client), close it and try again.")
        if "readonly" in text or "read-only" in text:
            return UserInputError(
                f"{run_dir} is read-only for this process (SQLite: {error}): a bench cannot write its results "
                f"there. Use another --out; `gileak leaderboard {run_dir}` reads it as it is.")
        if "not a database" in text:
            return UserInputError(
                f"{self.path} is not an SQLite database, or its first page is damaged (SQLite: {error}): it "
                "is no gileak results store that can be read. Move it aside, or use another --out.")
        if "malformed" in text or "corrupt" in text:
            return UserInputError(self._damaged(str(error)))
        if "no such table" in text or "no such column" in text:
            return UserInputError(f"{self.path} does not have the tables of a gileak results store "
                                  f"(SQLite: {error}). Use another --out.")
        if "unable to open" in text:
            return UserInputError(f"Cannot open {self.path} (SQLite: {error}): check that {run_dir} exists "
                                  "and that this process may read it.")
        return GileakError(f"{self.path}: SQLite failed while {doing} it: {error}.")

    def still_there(self) -> None:
        """Raise when the store file was deleted or replaced while this process wrote it: SQLite
        keeps writing into the deleted file, so the run would seem to succeed and leave nothing."""
        if self.read_only or _inode(self.path) == self._inode:
            return
        raise GileakError(
            f"{self.path} was deleted or replaced while this run was writing it, so the results computed "
            f"since then are not in {self.path.parent}. Run the same command again to compute them into a "
            "fresh store.")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._errors("writing"):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:  # SQLite already rolled back (a full disk does that)
                    pass
                raise
            self.db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._errors("reading"):
            return self.db.execute(sql, args).fetchall()

    # -- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def check_budget(self, budget: dict[str, Any]) -> None:
        """The directory's budget is set by its first run; another budget is refused."""
        stored = self.get_meta("budget")
        if stored is None or not self.count():
            self.set_meta("budget", json.dumps(budget, sort_keys=True))
            return
        try:
            old = json.loads(stored)
            assert isinstance(old, dict)
        except (ValueError, AssertionError) as e:
            raise UserInputError(self._damaged(f"unreadable budget {stored!r}")) from e
        changed = [k for k in budget if old.get(k) != budget[k]]
        if changed:
            what = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} (this run asks for {budget[k]})" for k in changed)
            raise UserInputError(
                f"{self.path.parent} holds results made with {what}. Results with another budget cannot be "
                "mixed into one leaderboard: use a new --out directory, or the directory's budget to resume it."
            )

    # -- results ----------------------------------------------------------------------------
    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM results")[0][0]

    def statuses(self) -> dict[tuple[str, str], str]:
        return {(c, a): s for c, a, s in self._query("SELECT cell, attack, status FROM results")}

    def mark_running(self, cell: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO running VALUES (?, ?, ?)", (cell, time.time(), os.getpid()))

    def clear_running(self, cell: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM running WHERE cell = ?", (cell,))

    def interrupted(self) -> list[str]:
        """Cells a previous process started and did not finish."""
        return [row[0] for row in self._query("SELECT cell FROM running")]

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
                f"INSERT OR REPLACE INTO results ({', '.join(_RESULT_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_RESULT_COLUMNS))})",
                (result.cell, result.attack, result.dataset, result.model, result.defense, result.seed,
                 result.attack_label, result.position, result.status, result.error, result.note, result.seconds,
                 result.accuracy, result.epsilon, result.params, result.params_added_pct, result.rounds_run,
                 result.attacked_round, result.training_seconds, json.dumps(result.accuracy_curve),
                 json.dumps(result.cell_notes), json.dumps(result.env), time.time(), result.client),
            )
            db.executemany(
                f"INSERT INTO victims ({', '.join(_VICTIM_COLUMNS)}) VALUES ({', '.join('?' * len(_VICTIM_COLUMNS))})",
                [(result.cell, result.attack, i, v.victim, v.label, v.ssim, v.psnr, v.mse, v.lpips, v.iterations,
                  v.loss, v.upload, v.label_accuracy, v.label_baseline) for i, v in enumerate(result.victims)],
            )
        self.still_there()

    def results(self, keys: set[tuple[str, str]] | None = None) -> list[StoredResult]:
        """Stored results in the order their cells were planned (`position`), then by seed;
        only `keys` when given."""
        columns = [d[1] for d in self._query("PRAGMA table_info(results)")]
        rows = self._query("SELECT * FROM results ORDER BY position, seed, finished")
        victim_columns = [d[1] for d in self._query("PRAGMA table_info(victims)")]
        victims: dict[tuple[str, str], list[VictimRecord]] = {}
        for row in self._query("SELECT * FROM victims ORDER BY cell, attack, idx"):
            values = dict(zip(victim_columns, row))
            cell, attack = values.pop("cell"), values.pop("attack")
            values.pop("idx")
            if not all(v is None or isinstance(v, (int, float)) for v in values.values()):
                raise UserInputError(self._damaged(f"a victim of {attack} holds a value that is not a number"))
            victims.setdefault((cell, attack), []).append(VictimRecord(**values))
        out = []
        for row in rows:
            values = dict(zip(columns, row))
            values.setdefault("client", "gradient")  # a schema-1 store read as it is
            wrong = [name for name in _NUMERIC if not (values[name] is None or isinstance(values[name], (int, float)))]
            if wrong or values["status"] not in ("ok", "failed", "not applicable"):
                raise UserInputError(self._damaged(f"a result holds an impossible {', '.join(wrong) or 'status'}"))
            if keys is not None and (values["cell"], values["attack"]) not in keys:
                continue
            values.pop("finished")
            try:
                for name in ("accuracy_curve", "cell_notes", "env"):
                    values[name] = json.loads(values[name]) if values[name] else ([] if name != "env" else {})
            except (ValueError, TypeError) as e:  # a damaged page that SQLite's check let through
                raise UserInputError(self._damaged(f"unreadable {name} of a result: {e}")) from e
            out.append(StoredResult(**values, victims=victims.get((values["cell"], values["attack"]), [])))
        return out


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def disk_full(run_dir: Path, doing: str, kept: bool = True) -> GileakError:
    """The message of a full disk (or quota) met while writing a run directory."""
    if not kept:
        return GileakError(f"The disk holding {run_dir} is full (while {doing}); nothing was computed yet. Free "
                           "some space and run the same command again.")
    return GileakError(
        f"The disk holding {run_dir} is full (while {doing}). Every result finished before this one is kept "
        f"in {run_dir / FILENAME}; free some space and run the same command again to resume from there.")


def _nearly_full(directory: Path) -> bool:
    import shutil

    try:
        return shutil.disk_usage(directory).free < 16 * 2**20
    except OSError:
        return False


def write_error(error: OSError, path: Path, run_dir: Path) -> GileakError:
    """A file of a run directory that could not be written, as a message that says where and
    that the finished results are kept."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return disk_full(run_dir, f"writing {path}")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return GileakError(f"Cannot write {path}: {error.strerror}. The finished results are kept in "
                           f"{run_dir / FILENAME} where it could be written; `gileak leaderboard {run_dir}` "
                           "prints them.")
    if error.errno == errno.ENOENT:
        return GileakError(f"Cannot write {path}: its directory vanished while the run wrote it.")
    return GileakError(f"Cannot write {path}: {error.strerror or error}. The finished results are kept in "
                       f"{run_dir / FILENAME}; `gileak leaderboard {run_dir}` prints them.")


def atomic_write_text(path: Path, text: str, newline: str | None = None) -> Path:
    """Write `path` whole or not at all: a reader, or a process killed mid-write, never sees
    half a file. The side file's name appends to the full name (no suffix is replaced)."""
    path = Path(path)
    side = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(side, "w", newline=newline) as f:
            f.write(text)
        os.replace(side, path)
    except BaseException:
        side.unlink(missing_ok=True)
        raise
    return path


def check_run_dir(run_dir: Path) -> None:
    """Refuse, before anything is written, an --out that is a file, sits under a file, or is in a
    place this process cannot write."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"--out {run_dir} is a file, not a directory: give the directory a bench writes "
                             "its run into (it is created when missing).")
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != run_dir and not existing.is_dir():
        raise UserInputError(f"--out {run_dir} cannot be created: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is read-only" if existing == run_dir else f"cannot be created: {existing} is read-only"
        hint = f" `gileak leaderboard {run_dir}` reads it as it is." if (run_dir / FILENAME).is_file() else ""
        raise UserInputError(f"--out {run_dir} {what} for this process: a bench cannot write its results "
                             f"there. Use another --out.{hint}")
    for name, directory in _RUN_DIR_ENTRIES.items():
        entry = run_dir / name
        if entry.exists() and entry.is_dir() != directory:
            what = "a directory" if directory else "a file"
            raise UserInputError(f"{entry} is in the way: a bench writes {what} there. Move it, or use another --out.")


#: What a bench writes into its run directory: name -> whether it is a directory.
_RUN_DIR_ENTRIES = {FILENAME: False, LOCK_FILENAME: False, "spec.json": False, "victims.jsonl": False,
                    "leaderboard.json": False, "privacy_utility.png": False, "reconstructions": True,
                    "traces": True}


class RunLock:
    """One writer per run directory: an exclusive `flock` on `gileak.lock`, held while the
    writer lives. The kernel drops it when the process ends, however it ends (kill -9
    included), so it is never stale; the file's content (the holder's pid) is for messages.
    Readers (`gileak leaderboard`) take no lock."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILENAME
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserInputError(f"Cannot write the run directory {self.run_dir}: {e.strerror}. "
                                 "Use another --out.") from e
        if not _try_lock(self.fd):
            try:
                holder = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(self.fd)
            raise UserInputError(
                f"{self.run_dir} is being written by another gileak bench (pid {holder}); a run directory takes "
                f"one writer at a time, so this one stops before writing anything. Wait for it to finish "
                f"(`gileak leaderboard {self.run_dir}` shows its finished results meanwhile), or use another --out.")
        self._inode = _inode(self.path)

    def claim(self) -> None:
        """Write this process's pid into the lock file, for the message a second writer gets; called
        once every check passed, so a command refused after taking the lock changes nothing."""
        try:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: the lock holds all the same, only its message lacks the pid
            pass

    def still_held(self) -> bool:
        """False when the lock file was deleted or replaced: a second writer could then lock a new one."""
        return _inode(self.path) == self._inode

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: a byte-range lock does the same
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
