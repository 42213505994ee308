"""The run directory holds one run's truth: one writer at a time (readers beside it, and on a
read-only directory), a message of its own for every kind of broken store, nothing written by a
refused command, file names that never collide, results keyed by their data, one cell per
component however it is spelled, and worker processes that end with their bench."""

import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from gileak.cli import main
from gileak.store import FILENAME, LOCK_FILENAME, ResultStore

TINY = ["--datasets", "digits", "--victims", "1", "--iterations", "2"]


@pytest.fixture(autouse=True)
def _no_lpips(monkeypatch):
    monkeypatch.setenv("GILEAK_NO_LPIPS", "1")


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def says(text: str, expected: str) -> bool:
    """`expected` is in `text`, however the terminal wrapped it (rich breaks long paths anywhere)."""
    return "".join(expected.split()) in "".join(text.split())


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its content (missing directory: {})."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def stored_count(out: Path) -> int:
    db = sqlite3.connect(f"file:{out / FILENAME}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # the writer has not created its tables yet
        return 0
    finally:
        db.close()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (two results); tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    os.environ["GILEAK_NO_LPIPS"] = "1"
    assert main(["bench", *TINY, "--attacks", "ig,ignore", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@contextmanager
def read_only(directory: Path):
    """Make `directory` and everything in it read-only for this process, for real. Not as root:
    chmod. As root chmod stops nothing (root writes anyway), so the immutable attribute
    (chattr +i), which stops root too; where neither works (a filesystem without it) the test
    is skipped, because a read-only directory cannot be made here."""
    paths = [directory, *sorted(directory.rglob("*"))]
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in reversed(paths):
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a directory read-only here")
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    try:
        if done.returncode:
            pytest.skip(f"chattr +i is not supported here ({done.stderr.strip()}): no read-only directory")
        with pytest.raises(OSError):  # the directory really is read-only, root included
            (directory / "probe").touch()
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)


# -- one writer, readers beside it, no stale lock --------------------------------------------

def _bench_process(out: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-c", "from gileak.cli import main; main()", "bench", *args, "--out", str(out)]
    env = dict(os.environ, GILEAK_NO_LPIPS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the bench ended early ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("the bench never got there")
        time.sleep(0.05)


def test_a_second_writer_is_refused_at_once_readers_work_beside_and_kill_9_leaves_no_lock(capsys, tmp_path):
    out = tmp_path / "run"
    # The first writer stores `analytic` (not applicable to the CNN: stored at once), then spends
    # minutes on `ig`: a writer holding the directory with a finished result in it.
    first_args = ["--datasets", "digits", "--victims", "1", "--iterations", "20000", "--attacks", "analytic,ig"]
    first = _bench_process(out, *first_args)
    try:
        _wait_for(lambda: (out / FILENAME).exists() and stored_count(out) >= 1, first)

        code, text, err = run(capsys, "leaderboard", out, "--format", "json")  # a reader beside the writer
        assert code == 0, err
        assert [r["attack"] for r in json.loads(text)] == ["analytic"]

        before = snapshot(out)
        started = time.perf_counter()
        code, text, err = run(capsys, "bench", "--datasets", "digits", "--victims", "2", "--iterations", "2",
                              "--out", out)
        refused_in = time.perf_counter() - started
        assert code == 2 and "Traceback" not in err
        assert says(err, f"{out} is being written by another gileak bench (pid {first.pid})")
        assert refused_in < 30  # at once: it never waited for the first writer
        after = snapshot(out)
        assert after["spec.json"] == before["spec.json"] and json.loads(after["spec.json"])["victims"] == 1
        assert {k: v for k, v in after.items() if not k.startswith(FILENAME)} == \
            {k: v for k, v in before.items() if not k.startswith(FILENAME)}
        assert first.poll() is None  # the first writer was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)

    # kill -9 released the lock with the process: the same budget resumes at once.
    code, text, err = run(capsys, "bench", *first_args[:6], "--attacks", "analytic", "--out", out)
    assert code == 0, err
    assert says(text, "1 finished result(s) reused")
    assert all(r["victims"] in (None, 1) for r in json.loads((out / "leaderboard.json").read_text()))


def test_two_writers_in_one_process_exclude_each_other_and_the_lock_is_released_on_close(tmp_path):
    from gileak.errors import UserInputError
    from gileak.store import RunLock

    lock = RunLock(tmp_path)
    lock.claim()
    with pytest.raises(UserInputError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()
    assert (tmp_path / LOCK_FILENAME).read_text().strip() == str(os.getpid())


# -- broken stores: each its own message, exit 2, nothing written ------------------------------

def _overwrite_page(path: Path, page: int) -> None:
    data = bytearray(path.read_bytes())
    page_size = 4096
    page = page % (len(data) // page_size)
    noise = random.Random(page).randbytes(page_size)
    data[page * page_size:(page + 1) * page_size] = noise
    path.write_bytes(bytes(data))


def _foreign(path: Path) -> None:
    path.unlink()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (name TEXT, taken REAL)")
    db.execute("INSERT INTO photos VALUES ('holiday.jpg', 1.0)")
    db.commit()
    db.close()


STORE_FAULTS = {
    "first page overwritten": (lambda p: _overwrite_page(p, 0), "is not an SQLite database, or its first page is damaged"),
    "second page overwritten": (lambda p: _overwrite_page(p, 1), "is damaged"),
    "last page overwritten": (lambda p: _overwrite_page(p, -1), "is damaged"),
    "zero bytes": (lambda p: p.write_bytes(b""), "is an empty file (0 bytes)"),
    "foreign SQLite database": (_foreign, "is an SQLite database that gileak did not write (its tables: photos)"),
    "text file": (lambda p: p.write_text("not a database\n" * 400), "is not an SQLite database"),
}


@pytest.mark.parametrize("command", ["leaderboard", "bench"])
@pytest.mark.parametrize("fault", list(STORE_FAULTS))
def test_a_broken_store_is_named_for_what_it_is_and_nothing_is_written(capsys, run_copy, fault, command):
    out = run_copy
    for leftover in ("spec.json", "leaderboard.json"):
        (out / leftover).unlink()
    break_it, expected = STORE_FAULTS[fault]
    break_it(out / FILENAME)
    before = snapshot(out)
    args = ["leaderboard", out, "--format", "json"] if command == "leaderboard" else ["bench", *TINY, "--out", out]
    code, text, err = run(capsys, *args)
    assert code == 2 and "Traceback" not in err and "ssim" not in text.lower()  # no rows, not even empty ones
    assert says(err, f"{out / FILENAME} {expected}")
    assert not says(err, "not a gileak results store")  # the old catch-all
    after = snapshot(out)
    if command == "leaderboard":  # a read-only SQLite connection leaves its (empty) WAL and WAL index
        assert after.pop(f"{FILENAME}-wal", b"") == b""
        after.pop(f"{FILENAME}-shm", None)
    assert after == before  # the store left as it was, the lock file too
    assert not (out / "spec.json").exists() and not (out / "leaderboard.json").exists()


@pytest.mark.parametrize("command", ["leaderboard", "bench"])
def test_a_store_another_program_locks_is_called_locked(capsys, run_copy, monkeypatch, command):
    import gileak.store

    monkeypatch.setattr(gileak.store, "BUSY_TIMEOUT", 0.2)
    holder = sqlite3.connect(run_copy / FILENAME, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        args = ["leaderboard", run_copy] if command == "leaderboard" else ["bench", *TINY, "--out", run_copy]
        code, _, err = run(capsys, *args)
    finally:
        holder.close()
    assert code == 2 and says(err, f"{run_copy / FILENAME} is locked by another process")


# -- read-only run directories ------------------------------------------------------------------

def _store_with_a_result_in_its_wal(source: Path, target: Path, keep_shm: bool) -> None:
    """`target`: a copy of the run `source` as a writer killed mid-run leaves it, one more
    committed result only in the WAL (not yet checkpointed into the database file)."""
    from gileak.store import StoredResult, VictimRecord

    work = target.with_name("work")
    shutil.copytree(source, work)
    store = ResultStore(work)
    store.db.execute("PRAGMA wal_autocheckpoint=0")
    store.put(StoredResult(cell="c", attack="a", dataset="digits", model="cnn", defense="from-the-wal", seed=0,
                           attack_label="ig", position=9, status="ok",
                           victims=[VictimRecord(0, 1, 0.25, 10.0, 0.1, None, 2, 0.5)]))
    target.mkdir()
    for name in os.listdir(work):  # copied while the writer still holds it open, as kill -9 leaves it
        if os.path.isfile(work / name) and (keep_shm or not name.endswith("-shm")):
            shutil.copyfile(work / name, target / name)
    store.close()
    assert (target / f"{FILENAME}-wal").stat().st_size > 0


@pytest.mark.parametrize("state", ["closed cleanly", "results in the WAL, -shm kept", "results in the WAL, no -shm"])
def test_leaderboard_reads_a_read_only_run_directory(capsys, finished, tmp_path, state):
    out = tmp_path / "ro"
    if state == "closed cleanly":
        shutil.copytree(finished, out)
        expected = ["none", "none"]
    else:
        _store_with_a_result_in_its_wal(finished, out, keep_shm="kept" in state)
        expected = ["none", "none", "from-the-wal"]
    with read_only(out):
        before = snapshot(out)
        code, text, err = run(capsys, "leaderboard", out, "--format", "json")
        assert snapshot(out) == before
    assert code == 0, err
    assert [r["defense"] for r in json.loads(text)] == expected


def test_the_read_only_open_uses_the_immutable_flag_only_where_the_directory_cannot_be_written(
        finished, tmp_path, monkeypatch):
    """Without root or chattr, this is what can be checked of the read-only path: with the
    directory reported unwritable and SQLite's WAL index not creatable, the store is opened with
    the flags of that path and read. It does not prove the OS refuses writes (the test above does)."""
    import gileak.store

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    opened = []
    real_connect = sqlite3.connect

    def connect(target, *args, **kwargs):
        opened.append(str(target))
        if "mode=ro" in str(target) and "immutable=1" not in str(target):
            raise sqlite3.OperationalError("unable to open database file")  # what a read-only directory gives
        return real_connect(target, *args, **kwargs)

    monkeypatch.setattr(gileak.store.sqlite3, "connect", connect)
    monkeypatch.setattr(gileak.store.os, "access", lambda path, mode: False)
    store = ResultStore.open_existing(out)
    assert store.count() == 2 and opened[-1].endswith("?mode=ro&immutable=1")
    store.close()


def test_a_bench_into_a_read_only_directory_is_refused_before_anything(capsys, run_copy):
    with read_only(run_copy):
        before = snapshot(run_copy)
        code, _, err = run(capsys, "bench", *TINY, "--attacks", "ig,ignore,dlg", "--out", run_copy)
        assert snapshot(run_copy) == before
    assert code == 2 and says(err, f"--out {run_copy} is read-only")


# -- a store deleted, a disk full during the run --------------------------------------------------

@pytest.mark.parametrize("what", ["the store", "the run directory"])
def test_a_store_deleted_during_the_run_is_an_error_not_a_success(capsys, tmp_path, monkeypatch, what):
    import gileak.store

    out = tmp_path / "run"
    real_put = gileak.store.ResultStore.put

    def put_then_delete(self, result):
        real_put(self, result)
        if what == "the store":
            for name in (FILENAME, f"{FILENAME}-wal", f"{FILENAME}-shm"):
                (out / name).unlink(missing_ok=True)
        else:
            shutil.rmtree(out)
        real_put(self, result)  # what SQLite does next: write on, into the deleted file

    monkeypatch.setattr(gileak.store.ResultStore, "put", put_then_delete)
    code, text, err = run(capsys, "bench", *TINY, "--attacks", "ig,ignore", "--out", out)
    assert code == 1 and "Traceback" not in err
    assert says(err, f"{out / FILENAME} was deleted or replaced while this run was writing it")
    assert not (out / "leaderboard.json").exists() and "gileak leaderboard" not in text
    if what == "the run directory":
        assert not out.exists()  # nothing was written back into a directory that is gone


def test_a_full_disk_keeps_the_finished_results_and_resumes(capsys, tmp_path, monkeypatch):
    """SQLite's own 'database or disk is full': the second result cannot get a page."""
    import gileak.store

    out = tmp_path / "run"
    real_put = gileak.store.ResultStore.put
    calls = []

    def put_on_a_full_disk(self, result):
        calls.append(result)
        if len(calls) == 2:
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            self.db.execute(f"PRAGMA max_page_count = {pages}")
            result.env = {**result.env, "padding": "x" * 40_000}
        real_put(self, result)

    monkeypatch.setattr(gileak.store.ResultStore, "put", put_on_a_full_disk)
    code, _, err = run(capsys, "bench", *TINY, "--attacks", "ig,ignore", "--out", out)
    assert code == 1 and "Traceback" not in err
    assert says(err, f"The disk holding {out} is full") and says(err, "Every result finished before this one is kept")
    assert stored_count(out) == 1

    monkeypatch.setattr(gileak.store.ResultStore, "put", real_put)
    code, text, err = run(capsys, "bench", *TINY, "--attacks", "ig,ignore", "--out", out)
    assert code == 0, err
    assert says(text, "1 finished result(s) reused") and stored_count(out) == 2


@contextmanager
def small_disk(tmp_path: Path, size_kb: int):
    """A real filesystem of `size_kb` KiB (tmpfs), where mounting one is allowed (root with
    CAP_SYS_ADMIN); skipped elsewhere."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small filesystem here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("free_kb", [20, 120])
def test_a_real_full_disk_is_reported_and_leaves_a_readable_store(capsys, tmp_path, free_kb):
    """On a 200 KiB filesystem filled up to `free_kb`: before the store exists (20) or after some
    results (120), the bench exits 1 saying the disk is full, without a traceback, and whatever
    store is left passes SQLite's check and is read by `gileak leaderboard`."""
    with small_disk(tmp_path, 200) as disk:
        (disk / "filler").write_bytes(b"\0" * ((200 - free_kb) * 1024))
        out = disk / "run"
        code, _, err = run(capsys, "bench", *TINY, "--attacks", "ig,ignore,dlg", "--defenses", "none,gc", "--out", out)
        assert code == 1 and "Traceback" not in err and says(err, f"The disk holding {out} is full"), err
        (disk / "filler").unlink()
        if (out / FILENAME).exists():
            code, text, err = run(capsys, "leaderboard", out, "--format", "json")
            assert code == 0, err
            assert len(json.loads(text)) == stored_count(out) < 6


def test_a_figure_that_meets_a_full_disk_costs_no_stored_result(capsys, tmp_path, monkeypatch):
    import gileak.report.figures

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gileak.report.figures, "save_reconstruction_grid", no_space)
    out = tmp_path / "run"
    code, _, err = run(capsys, "bench", *TINY, "--out", out)
    assert code == 1 and says(err, f"The disk holding {out} is full") and "Traceback" not in err
    assert stored_count(out) == 1


# -- refused commands write nothing ----------------------------------------------------------------

def _refusals(tmp_path: Path, monkeypatch) -> dict[str, tuple[list, str]]:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    (tmp_path / "a-dir.json").mkdir()
    return {
        "--out is a file": (["--out", a_file], f"--out {a_file} is a file, not a directory"),
        "--out under a file": (["--out", a_file / "run"], f"{a_file} is a file, not a directory"),
        "--export onto a directory": (["--export", tmp_path / "a-dir.json"], "it is a directory"),
        "--export under a file": (["--export", a_file / "lb.md"], f"{a_file} is a file"),
        "--export with an unknown suffix": (["--export", tmp_path / "lb.xlsx"], "use a .md, .csv or .json"),
        "--device cuda without CUDA": (["--device", "cuda"], "--device cuda was asked for"),
        "another budget": (["--iterations", "3"], "--iterations 2 (this run asks for 3)"),
    }


@pytest.mark.parametrize("case", ["--out is a file", "--out under a file", "--export onto a directory",
                                  "--export under a file", "--export with an unknown suffix",
                                  "--device cuda without CUDA", "another budget"])
def test_a_refused_bench_writes_nothing(capsys, run_copy, tmp_path, monkeypatch, case):
    extra, expected = _refusals(tmp_path, monkeypatch)[case]
    if "--out" in extra:
        targets = [[]]
    elif case == "another budget":
        targets = [["--out", run_copy]]
    else:  # into a finished run, and into a directory that does not exist yet
        targets = [["--out", run_copy], ["--out", tmp_path / "fresh"]]
    for target in targets:
        before = snapshot(tmp_path)
        code, _, err = run(capsys, "bench", *TINY, "--attacks", "ig,ignore", *target, *extra)
        assert code == 2 and says(err, expected) and "Traceback" not in err
        assert snapshot(tmp_path) == before  # not a file written, changed or created


def test_an_export_to_a_read_only_place_is_refused_before_the_run(capsys, tmp_path):
    place = tmp_path / "shared"
    place.mkdir()
    with read_only(place):
        code, _, err = run(capsys, "bench", *TINY, "--out", tmp_path / "run", "--export", place / "lb.csv")
    assert code == 2 and says(err, f"{place} is read-only")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("figure, expected", [("fig.xyz", "gileak draws figures as .png, .pdf, .svg"),
                                              ("fig", "gileak draws figures as .png, .pdf, .svg"),
                                              ("a-dir.png", "it is a directory")])
def test_leaderboard_refuses_a_figure_it_cannot_write_before_anything(capsys, run_copy, tmp_path, figure, expected):
    (tmp_path / "a-dir.png").mkdir()
    before = snapshot(tmp_path)
    code, text, err = run(capsys, "leaderboard", run_copy, "--figure", tmp_path / figure)
    assert code == 2 and says(err, expected) and "Traceback" not in err and text == ""
    assert snapshot(tmp_path) == before


def test_an_export_failing_after_the_run_keeps_leaderboard_json(capsys, tmp_path, monkeypatch):
    import gileak.report

    real_export = gileak.report.export

    def export(rows, path):
        if Path(path).name != "leaderboard.json":
            raise OSError(errno.EACCES, "Permission denied")
        return real_export(rows, path)

    monkeypatch.setattr(gileak.report, "export", export)
    out = tmp_path / "run"
    code, _, err = run(capsys, "bench", *TINY, "--out", out, "--export", tmp_path / "lb.csv")
    assert code == 1 and "Traceback" not in err
    assert says(err, f"The leaderboard is in {out / 'leaderboard.json'}")
    assert [r["attack"] for r in json.loads((out / "leaderboard.json").read_text())] == ["ig"]


# -- file names never collide --------------------------------------------------------------------

def test_slugs_are_injective_suffix_safe_and_short():
    from gileak.runner import _slug

    pairs = [
        (("digits", "cnn", "dp(sigma=0.1)", "ig"), ("digits", "cnn", "dp(sigma=0.1)", "ignore")),
        (("a" * 200 + "1",), ("a" * 200 + "2",)),
        (("x.1",), ("x_1",)), (("x(1)",), ("x_1_",)), (("Cnn",), ("cnn",)),
        (("a__b", "c"), ("a", "b__c")),
        (("ünïcode",), ("_n_code",)),
    ]
    for one, other in pairs:
        assert _slug(*one) != _slug(*other)
        assert _slug(*one).lower() != _slug(*other).lower()  # also on a case-insensitive filesystem
    name = _slug("ü" * 300, "dp(sigma=0.1)")
    assert name.isascii() and len(name.encode()) <= 140 and _slug("ü" * 300, "dp(sigma=0.1)") == name


def test_dp_traces_of_ig_and_ignore_are_two_files_each(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "bench", *TINY, "--defenses", "dp(sigma=0.1)", "--attacks", "ig,ignore", "--trace",
                       "--out", out)
    assert code == 0, err
    traces = sorted(p.name for p in (out / "traces").iterdir())
    assert len(traces) == 4 and {Path(t).suffix for t in traces} == {".csv", ".png"}
    assert sum("ignore" in t for t in traces) == 2 and all("dp_sigma=0.1" in t for t in traces)
    assert len(list((out / "reconstructions").glob("*.png"))) == 2


def _images(folder: Path, seed: int, count: int = 4) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_labels_sharing_their_first_180_characters_get_their_own_files(capsys, tmp_path):
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    _images(deep / "first", 0)
    _images(deep / "second", 1)
    out = tmp_path / "run"
    datasets = f"folder(path={deep / 'first'}),folder(path={deep / 'second'})"
    assert len(f"folder(path={deep / 'first'})") > 180
    code, _, err = run(capsys, "bench", "--datasets", datasets, "--victims", "1", "--iterations", "2", "--out", out)
    assert code == 0, err
    assert len(list((out / "reconstructions").glob("*.png"))) == 2


# -- results follow the data; one cell per component ----------------------------------------------

def test_a_folder_is_identified_by_its_place_and_its_files(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    for place, seed in (("one", 0), ("two", 1)):
        _images(tmp_path / place / "imgs", seed)
    args = ["bench", "--datasets", "folder(path=imgs)", "--victims", "1", "--iterations", "2", "--out", out]

    monkeypatch.chdir(tmp_path / "one")
    assert run(capsys, *args)[0] == 0
    code, text, _ = run(capsys, *args)
    assert code == 0 and says(text, "1 finished result(s) reused, 0 to compute")  # the same data: reused

    monkeypatch.chdir(tmp_path / "two")  # the same text, other images
    code, text, _ = run(capsys, *args)
    assert code == 0 and "reused" not in text and stored_count(out) == 2

    monkeypatch.chdir(tmp_path / "one")
    _images(tmp_path / "one" / "imgs", seed=7, count=1)  # one image changed in place
    code, text, _ = run(capsys, *args)
    assert code == 0 and "reused" not in text and stored_count(out) == 3

    code, text, _ = run(capsys, "leaderboard", out, "--format", "json")
    assert [r["dataset"] for r in json.loads(text)] == \
        ["folder(path=imgs)", "folder(path=imgs) #2", "folder(path=imgs) #3"]  # never pooled into one row
    assert len(list((out / "reconstructions").glob("*.png"))) == 3  # nor drawn into one file


def test_two_spellings_of_one_component_are_one_cell(tmp_path, monkeypatch):
    from gileak.runner import plan
    from gileak.spec import build_spec

    _images(tmp_path / "imgs", 0)
    monkeypatch.chdir(tmp_path)
    spec = build_spec(None, datasets=f"folder(path=imgs),folder(path=./imgs),folder(path={tmp_path / 'imgs'})",
                      defenses="cvb,cvb(kernel=5),gc(ratio=0.5),gc(ratio=.5)", attacks="ig,ignore,ig(signed=true)", victims=1)
    the_plan = plan(spec)
    assert [(c.dataset.label, c.defense.label) for c in the_plan.cells] == \
        [("folder(path=imgs)", "cvb"), ("folder(path=imgs)", "gc(ratio=0.5)")]
    assert [a.label for a in the_plan.cells[0].attacks] == ["ig", "ignore"]
    assert the_plan.same == [("dataset", "folder(path=./imgs)", "folder(path=imgs)"),
                             ("dataset", f"folder(path={tmp_path / 'imgs'})", "folder(path=imgs)"),
                             ("defense", "cvb(kernel=5)", "cvb"), ("defense", "gc(ratio=.5)", "gc(ratio=0.5)"),
                             ("attack", "ig(signed=true)", "ig")]
    assert [r.label for r in the_plan.spec.defenses] == ["cvb", "gc(ratio=0.5)"]  # what workers plan again


def test_two_spellings_are_announced_computed_and_shown_once(capsys, tmp_path):
    out = tmp_path / "run"
    code, text, err = run(capsys, "bench", *TINY, "--defenses", "gc(ratio=0.5),gc(ratio=.5)", "--out", out)
    assert code == 0, err
    assert says(text, "1 training cell(s) -> 1 row(s)")
    assert says(text, "gc(ratio=.5) is the same defense as gc(ratio=0.5)")
    assert stored_count(out) == 1
    assert [r["defense"] for r in json.loads((out / "leaderboard.json").read_text())] == ["gc(ratio=0.5)"]


# -- worker processes end with their bench ---------------------------------------------------------

def _children(pid: int) -> dict[int, str]:
    """Live (not zombie) child processes of `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _computing(pid: int) -> bool:
    """A worker that has loaded torch has run its initializer and is computing its cell."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_worker_processes_end_when_their_bench_is_killed(tmp_path):
    bench = _bench_process(tmp_path / "run", "--datasets", "digits", "--victims", "1", "--iterations", "20000",
                           "--seeds", "2", "--workers", "2")
    workers: dict[int, str] = {}
    try:
        def both_computing() -> bool:
            workers.clear()
            workers.update({p: c for p, c in _children(bench.pid).items() if "spawn_main" in c})
            return len(workers) == 2 and all(_computing(p) for p in workers)

        _wait_for(both_computing, bench)
    finally:
        bench.send_signal(signal.SIGKILL)
        bench.wait(timeout=60)
    deadline = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if _alive(p)]
    for pid in left:  # do not leave them running, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their bench"


WATCHED_CHILD = """
import sys, time
from gileak.executors import die_with_parent
platform, sys.platform = sys.platform, "not-linux"  # no prctl: only the portable watchdog can end it
die_with_parent(int(sys.argv[1]))
sys.platform = platform
print("watching", flush=True)
time.sleep(300)
"""

PARENT = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_the_portable_watchdog_alone_ends_a_worker_whose_parent_was_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WATCHED_CHILD], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "watching"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=60)
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the watchdog did not end the worker of a killed parent")
