"""The results store and what rests on it: resume (also after kill -9), a changed matrix merged
cell by cell, a changed budget refused, `gileak leaderboard`, the executors (worker processes,
Ray) giving the rows of the local one, profiles and --dry-run."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from gileak.cli import main
from gileak.spec import build_spec
from gileak.store import ResultStore, StoredResult, VictimRecord, canonical

TINY = ["--datasets", "digits", "--victims", "2", "--iterations", "8"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out_dir):
    """leaderboard.json without the wall-clock column, which no two runs share."""
    data = json.loads((out_dir / "leaderboard.json").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in data]


def stored(out_dir):
    """(cell, attack) -> finish time of every stored result; {} before the store has its tables."""
    db = sqlite3.connect(out_dir / "results.sqlite")
    try:
        return {(c, a): f for c, a, f in db.execute("SELECT cell, attack, finished FROM results")}
    except sqlite3.OperationalError:  # a process caught between creating the file and its schema
        return {}
    finally:
        db.close()


@pytest.fixture(autouse=True)
def _no_lpips(monkeypatch):
    monkeypatch.setenv("GILEAK_NO_LPIPS", "1")


def test_store_roundtrip_replaces_and_keeps_victims(tmp_path):
    store = ResultStore(tmp_path)
    result = StoredResult(cell="c", attack="a", dataset="d", model="m", defense="f", seed=0, attack_label="ig",
                          position=0, status="failed", error="boom")
    store.put(result)
    result.status, result.error = "ok", None
    result.victims = [VictimRecord(3, 1, 0.5, 12.0, 0.01, None, 7, 0.2), VictimRecord(4, 2, 0.6, None, 0.02, None, 8, None)]
    result.accuracy_curve = [0.1, 0.2]
    store.put(result)  # a retried result replaces the failed one, never adds to it
    [back] = store.results()
    assert back.status == "ok" and back.victims == result.victims and back.accuracy_curve == [0.1, 0.2]
    assert store.count() == 1
    store.close()
    assert ResultStore.open_existing(tmp_path).count() == 1


def test_identity_is_full_parameters_without_the_data_root():
    assert canonical("dp", {"sigma": 0.01, "clip": 20.0}) == canonical("dp", {"clip": 20.0, "sigma": 0.01})
    assert canonical("cifar10", {"root": "/a"}) == canonical("cifar10", {"root": "/b"})
    assert canonical("dp", {"sigma": 0.1}) != canonical("dp", {"sigma": 0.01})


def test_rerun_reuses_everything_and_a_new_defense_is_merged(capsys, tmp_path):
    out = tmp_path / "run"
    code, text, err = run(capsys, "bench", *TINY, "--attacks", "ig,dlg", "--seeds", "2", "--out", out)
    assert code == 0, err
    first, first_rows = stored(out), rows(out)
    assert len(first) == 4 and len((out / "victims.jsonl").read_text().splitlines()) == 8

    code, text, err = run(capsys, "bench", *TINY, "--attacks", "ig,dlg", "--seeds", "2", "--out", out)
    assert code == 0, err
    assert "4 finished result(s) reused" in " ".join(text.split()) and "0 to compute" in text
    assert stored(out) == first and rows(out) == first_rows  # nothing recomputed, nothing counted twice
    assert len((out / "victims.jsonl").read_text().splitlines()) == 8

    # The same attacks written with their default parameters spelled out are the same results.
    code, text, err = run(capsys, "bench", *TINY, "--attacks", "ig,dlg", "--defenses", "none,gc(ratio=0.5)",
                          "--seeds", "2", "--out", out)
    assert code == 0, err
    assert "4 finished result(s) reused" in " ".join(text.split()) and "4 to compute" in text
    now = stored(out)
    assert len(now) == 8 and all(now[k] == first[k] for k in first)
    assert [r["defense"] for r in rows(out)] == ["none", "none", "gc(ratio=0.5)", "gc(ratio=0.5)"]

    code, text, err = run(capsys, "leaderboard", out, "--format", "json")
    assert code == 0 and len(json.loads(text)) == 4
    code, _, _ = run(capsys, "leaderboard", out, "-o", tmp_path / "all.csv")
    assert code == 0 and len((tmp_path / "all.csv").read_text().splitlines()) == 5


def test_another_budget_in_the_same_directory_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "bench", *TINY, "--out", out)[0] == 0
    code, _, err = run(capsys, "bench", "--datasets", "digits", "--victims", "2", "--iterations", "9", "--out", out)
    text = " ".join(err.split())
    assert code == 2 and "--iterations 8 (this run asks for 9)" in text and "Traceback" not in text
    assert len(stored(out)) == 1


def test_leaderboard_of_a_directory_without_results_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "leaderboard", tmp_path)
    assert code == 2 and "results.sqlite" in err


def test_a_failed_result_is_tried_again(capsys, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "bench", *TINY, "--out", out)[0] == 0
    db = sqlite3.connect(out / "results.sqlite")
    db.execute("UPDATE results SET status = 'failed', error = 'worker lost'")
    db.commit()
    db.close()
    code, text, _ = run(capsys, "bench", *TINY, "--out", out)
    assert code == 0 and "1 failed result(s) tried again" in " ".join(text.split())
    assert rows(out)[0]["status"] == "ok"


def _bench_process(out, extra=()):
    args = [sys.executable, "-c", "from gileak.cli import main; main()", "bench", *TINY, "--attacks", "ig,dlg",
            "--seeds", "3", "--rounds", "1", "--iterations", "40", "--out", str(out), *extra]
    env = dict(os.environ, GILEAK_NO_LPIPS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def test_kill_9_at_any_point_then_resume_gives_the_uninterrupted_leaderboard(tmp_path):
    reference = tmp_path / "reference"
    assert _bench_process(reference).wait(timeout=300) == 0
    expected = rows(reference)
    assert len(stored(reference)) == 6

    out = tmp_path / "killed"
    kills = 0
    chance = random.Random(0)
    for attempt in range(12):
        # Even attempts die as soon as they have stored one more result (mid-cell, often between
        # a cell's attacks); odd ones at a random moment (loading, training, attacking, writing).
        before = len(stored(out)) if (out / "results.sqlite").exists() else 0
        started, at = time.time(), chance.uniform(0.5, 4.0)
        process = _bench_process(out)
        while process.poll() is None and time.time() < started + 120:
            grown = (out / "results.sqlite").exists() and len(stored(out)) > before
            if (attempt % 2 == 0 and grown) or (attempt % 2 == 1 and time.time() > started + at):
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        process.wait(timeout=120)
        if process.returncode == 0:
            break
    assert kills >= 2
    assert _bench_process(out).wait(timeout=300) == 0  # one more run after completion reuses all
    assert rows(out) == expected
    assert len((out / "victims.jsonl").read_text().splitlines()) == 12


def test_worker_processes_give_the_rows_of_the_local_executor(capsys, tmp_path):
    args = [*TINY, "--attacks", "ig,dlg", "--seeds", "2", "--rounds", "1"]
    assert run(capsys, "bench", *args, "--out", tmp_path / "local")[0] == 0
    code, _, err = run(capsys, "bench", *args, "--workers", "2", "--out", tmp_path / "pool")
    assert code == 0, err
    assert rows(tmp_path / "pool") == rows(tmp_path / "local")


def test_ray_gives_the_rows_of_the_local_executor(capsys, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional extra gileak[ray]; the test extra installs it")
    args = [*TINY, "--attacks", "ig,dlg", "--seeds", "2", "--rounds", "1"]
    assert run(capsys, "bench", *args, "--out", tmp_path / "local")[0] == 0
    code, _, err = run(capsys, "bench", *args, "--executor", "ray", "--out", tmp_path / "ray")
    assert code == 0, err
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
    env = json.loads(sqlite3.connect(tmp_path / "ray" / "results.sqlite").execute(
        "SELECT env FROM results LIMIT 1").fetchone()[0])
    assert env["device"] == "cpu" and env["torch"]


def test_profiles_set_budgets_and_flags_override_them():
    paper = build_spec(None, profile="paper")
    assert (paper.victims, paper.iterations, paper.rounds, paper.patience, paper.seeds) == (128, 20000, 300, 40, 3)
    assert build_spec(None, profile="paper", victims=4).victims == 4
    quick = build_spec(None)
    assert (quick.profile, quick.victims, quick.iterations, quick.rounds) == ("quick", 8, 5000, 0)


def test_dry_run_prints_the_plan_and_runs_nothing(capsys, tmp_path):
    out = tmp_path / "never"
    code, text, err = run(capsys, "bench", "--profile", "paper", "--dry-run", "--datasets", "digits",
                          "--defenses", "none,cvb", "--rounds", "2", "--out", out)
    text = " ".join(text.split())
    assert code == 0, err
    assert "profile paper" in text and "128 victims" in text and "20,000 iterations" in text
    assert "stop after 4,000" in text and "2 FedAvg round(s)" in text and "seeds: 3" in text
    assert "Estimated cost" in text and "Total: about" in text
    assert not out.exists()
