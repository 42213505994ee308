"""The CLI contract: commands, exit codes, messages without tracebacks, exports."""

import json

import pytest

from gileak import Attack, hookimpl
from gileak.cli import main
from gileak.plugins import load_plugins, reset


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_component_exits_2_with_a_suggestion_and_no_traceback(capsys):
    code, out, err = run(capsys, "bench", "--attacks", "igg", "--datasets", "digits")
    assert code == 2
    assert "Unknown attack 'igg'. Did you mean: ig" in err.replace("\n", " ")
    assert "Traceback" not in out + err


def test_bad_parameter_exits_2_naming_the_parameter(capsys):
    code, _, err = run(capsys, "bench", "--attacks", "ig(lr=fast)")
    assert code == 2 and "lr" in err and "Traceback" not in err
    code, _, err = run(capsys, "bench", "--attacks", "ig(learning_rate=1)")
    assert code == 2 and "learning_rate" in err


def test_bad_flag_value_and_bad_export_suffix_exit_2(capsys):
    assert run(capsys, "bench", "--victims", "0")[0] == 2
    assert run(capsys, "bench", "--export", "out.xlsx")[0] == 2
    assert run(capsys, "bench", "--victims", "many")[0] == 2


def test_list_shows_components_with_parameters_and_defaults(capsys):
    code, out, _ = run(capsys, "list", "attacks")
    assert code == 0 and "ig" in out and "tv" in out and "0.01" in out
    code, out, _ = run(capsys, "list")
    assert code == 0 and all(word in out for word in ("Models", "cnn", "Datasets", "photos", "Defenses", "none"))
    assert run(capsys, "list", "atacks")[0] == 2


def test_inspect_counts_the_papers_cnn_exactly(capsys):
    code, out, _ = run(capsys, "inspect", "--model", "cnn", "--dataset", "photos", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["params"] == 65962  # paper Table II, CIFAR-10 sized input
    assert summary["params_added"] == 0 and summary["params_added_pct"] == 0
    assert summary["upload_bytes"] == 65962 * 4
    code, out, _ = run(capsys, "inspect", "--model", "cnn", "--dataset", "photos")
    assert code == 0 and "65,962" in out and "Slot(position=2" in out


def test_a_small_bench_prints_a_leaderboard_and_exports_every_format(capsys, tmp_path):
    exports = [tmp_path / "lb.json", tmp_path / "lb.csv", tmp_path / "lb.md"]
    args = ["bench", "--datasets", "digits", "--victims", "2", "--iterations", "5", "--out", str(tmp_path / "run")]
    for path in exports:
        args += ["--export", str(path)]
    code, out, _ = run(capsys, *args)
    assert code == 0, out
    rows = json.loads(exports[0].read_text())
    assert len(rows) == 1
    required = {"dataset", "model", "defense", "attack", "ssim_mean", "ssim_std", "asr", "psnr_mean", "mse_mean",
                "lpips_mean", "accuracy_mean", "accuracy_std", "params", "params_added_pct", "victims", "seconds"}
    assert required <= set(rows[0])
    assert rows[0]["victims"] == 2 and rows[0]["accuracy_mean"] is None and 0 <= rows[0]["ssim_mean"] <= 1
    assert "dataset" in exports[1].read_text().splitlines()[0]
    assert "|" in exports[2].read_text()
    assert list((tmp_path / "run" / "reconstructions").glob("*.png"))
    assert len((tmp_path / "run" / "victims.jsonl").read_text().splitlines()) == 2


class _BrokenAttack(Attack):
    name = "broken"
    description = "Fails on purpose."

    def attack(self, target, *, seeds, max_iterations, progress=None):
        raise RuntimeError("boom")


class _BrokenPlugin:
    @staticmethod
    @hookimpl
    def register_attacks(register):
        register(_BrokenAttack)


@pytest.fixture
def broken_attack_plugin():
    reset()
    pm = load_plugins()
    pm.register(_BrokenPlugin, name="broken-test-plugin")
    try:
        yield
    finally:
        pm.unregister(name="broken-test-plugin")
        reset()


def test_a_failing_cell_is_reported_the_others_finish_and_the_exit_code_is_1(capsys, tmp_path, broken_attack_plugin):
    out_json = tmp_path / "lb.json"
    code, out, _ = run(capsys, "bench", "--attacks", "ig,broken", "--datasets", "digits", "--victims", "1",
                       "--iterations", "3", "--out", str(tmp_path / "run"), "--export", str(out_json))
    assert code == 1
    assert "boom" in out
    rows = {row["attack"]: row for row in json.loads(out_json.read_text())}
    assert rows["ig"]["status"] == "ok" and rows["ig"]["ssim_mean"] is not None
    assert rows["broken"]["status"] == "failed" and "boom" in rows["broken"]["error"]


def test_train_reports_accuracy_epsilon_curves_and_a_safe_checkpoint(capsys, tmp_path):
    import torch

    code, out, _ = run(capsys, "train", "--dataset", "digits", "--defense", "dp(sigma=1)", "--rounds", "2",
                       "--clients", "2", "--out", str(tmp_path), "--json")
    assert code == 0
    summary = json.loads(out)
    assert 0 <= summary["accuracy_mean"] <= 1 and summary["accuracy_std"] == 0
    assert summary["rounds"] == 2 and 0 < summary["epsilon"] < float("inf")
    assert (tmp_path / "accuracy.csv").read_text().count("\n") == 1 + 2
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    state = torch.load(tmp_path / "model_seed0.pt", weights_only=True)
    assert "0.weight" in state
    code, out, _ = run(capsys, "train", "--dataset", "digits", "--rounds", "1", "--out", str(tmp_path / "b"), "--json")
    assert code == 0 and json.loads(out)["epsilon"] is None
    assert run(capsys, "train", "--defense", "dp(sigma=1|2)")[0] == 2


def test_attack_at_is_validated_and_runs(capsys, tmp_path):
    assert run(capsys, "bench", "--rounds", "2", "--attack-at", "5")[0] == 2
    assert run(capsys, "bench", "--attack-at", "later")[0] == 2
    code, out, _ = run(capsys, "bench", "--datasets", "digits", "--victims", "1", "--iterations", "2", "--rounds",
                       "1", "--attack-at", "init", "--out", str(tmp_path / "run"))
    assert code == 0 and (tmp_path / "run" / "privacy_utility.png").exists()


def test_train_profiles(capsys, tmp_path):
    from gileak.cli.train_cmd import PROFILES

    assert PROFILES["paper"] == {"rounds": 300, "seeds": 3}
    assert run(capsys, "train", "--profile", "slow")[0] == 2
    code, out, _ = run(capsys, "train", "--profile", "paper", "--rounds", "1", "--seeds", "1", "--clients", "2",
                       "--out", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["profile"] == "paper" and json.loads(out)["rounds"] == 1


def test_ctrl_c_exits_130_and_says_how_to_resume(capsys, tmp_path, monkeypatch):
    import gileak.runner

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(gileak.runner.Runner, "run", interrupted)
    code, _, err = run(capsys, "bench", "--datasets", "digits", "--out", str(tmp_path / "run"))
    text = " ".join(err.split())
    assert code == 130 and f"--out {tmp_path / 'run'}" in text and "Traceback" not in text


def test_threads_sets_pytorchs_threads_and_a_busy_machine_gets_a_hint(capsys, tmp_path, monkeypatch):
    import os

    import torch

    from gileak.cli.bench import busy_hint
    from gileak.store import ResultStore

    assert busy_hint(0.1, 2, 2) is None  # a quiet machine
    assert busy_hint(1.0, 2, 1) is None  # the threads fit the free core
    hint = busy_hint(1.2, 2, 2)
    assert "--threads 1" in hint and "keep 1.2 of its 2 cores busy" in hint
    assert "--threads 1" in busy_hint(7.5, 4, 4)  # never fewer than one thread

    before = torch.get_num_threads()
    from gileak.cli import bench as bench_command

    monkeypatch.setattr(bench_command, "busy_cores", lambda: float(os.cpu_count() or 1))
    try:
        code, out, err = run(capsys, "bench", "--datasets", "digits", "--victims", "1", "--iterations", "2",
                             "--threads", "1", "--out", str(tmp_path / "run"))
        assert code == 0, out + err
        assert torch.get_num_threads() == 1
        assert "this machine is busy" not in " ".join(out.split())  # one thread fits the one free core
        [result] = ResultStore(tmp_path / "run", read_only=True).results()
        assert result.env["threads"] == 1
        torch.set_num_threads(2)
        code, out, err = run(capsys, "bench", "--datasets", "digits", "--victims", "1", "--iterations", "2",
                             "--out", str(tmp_path / "run2"))
        assert code == 0 and ("this machine is busy" in " ".join(out.split())) == ((os.cpu_count() or 1) >= 2)
    finally:
        torch.set_num_threads(before)
    code, out, err = run(capsys, "bench", "--datasets", "digits", "--threads", "0")
    assert code == 2 and "Traceback" not in out + err
    code, out, err = run(capsys, "bench", "--datasets", "digits", "--threads", "1000000000")
    assert code == 2 and "more than this machine's" in " ".join(err.split()) and "Traceback" not in out + err
    monkeypatch.undo()
    busy = bench_command.busy_cores(0.05)  # measured for real: this process sleeps meanwhile
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
