"""The automatic engine choice (gileak/engine/choice.py): the rule (the default), the opt-in
probe and its cache in the run directory, the override, and that a run records the engine of
every result and computes what the chosen engine computes alone (the probe leaves no trace in
the results); and that a rule-chosen run is reproducible (another run gives the same rows)."""

import json
import sqlite3

import pytest
import torch
from test_attacks import cnn_target, tiny_mlp_target
from test_cli import run

from gileak.default_plugins.attacks import DLG, IDLG, Analytic, InvertingGradients
from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import MLP
from gileak.engine import choice
from gileak.engine.matching import MatchingConfig, gradient_matching
from gileak.errors import UserInputError
from gileak.threat import Target, shared_gradients


def batch_norm_target(n=3):
    """A tiny MLP with batch norm: off the factored step, so the batched engine is vmap."""
    torch.manual_seed(0)
    net = MLP(width=8).build((1, 4, 4), 4)
    images = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3, 0, 2][:n])
    return Target(net=net, shared_gradient=shared_gradients(net, NoDefense(), images, labels), input_shape=(1, 4, 4),
                  num_classes=4, labels=labels)


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("GILEAK_ENGINE", raising=False)


def test_the_factored_step_is_taken_by_rule_without_a_probe(monkeypatch):
    monkeypatch.setattr(choice, "_rate", lambda *args: pytest.fail("probed"))
    target, _ = cnn_target(n=3)
    chosen = choice.choose(InvertingGradients(), target, [0, 1, 2])
    assert (chosen.engine, chosen.path, chosen.how, chosen.rates) == ("batched", "chain", "rule", {})
    assert choice.choose(IDLG(labels="known"), target, [0, 1, 2]).path == "chain"  # the L-BFGS evaluator's


def test_vmap_on_a_cpu_is_batched_for_a_small_model_and_the_loop_for_a_large_one_by_rule(monkeypatch):
    monkeypatch.setattr(choice, "_rate", lambda *args: pytest.fail("probed"))
    target = batch_norm_target()
    small = choice.choose(InvertingGradients(), target, [0, 1, 2])
    assert (small.engine, small.path, small.how, small.rates) == ("batched", "vmap", "rule", {})
    monkeypatch.setattr(choice, "VMAP_LOOP_PARAMS", 100)  # the tiny MLP as if it were ResNet-18
    large = choice.choose(DLG(), target, [0, 1, 2])
    assert (large.engine, large.how) == ("loop", "rule") and "parameters" in large.reason


def test_a_vmap_model_is_probed_and_the_faster_engine_taken(monkeypatch):
    monkeypatch.setenv("GILEAK_ENGINE", "probe")
    target = batch_norm_target()
    rates = {"batched": 5.0, "loop": 9.0}
    seen = []

    def fake_rate(attack, subset, seeds, engine):
        seen.append((engine, subset.num_victims, len(seeds)))
        return rates[engine]

    monkeypatch.setattr(choice, "_rate", fake_rate)
    chosen = choice.choose(InvertingGradients(), target, [0, 1, 2])
    assert (chosen.engine, chosen.path, chosen.how) == ("loop", "vmap", "probe")
    assert chosen.rates == rates and "loop 9" in chosen.reason
    assert seen == [("batched", 3, 3), ("loop", 1, 1)]  # batched on (up to two chunks of) the victims, loop on one
    rates["batched"] = 20.0
    assert choice.choose(DLG(), target, [0, 1, 2]).engine == "batched"


def test_the_probe_measures_both_engines_for_real(monkeypatch):
    monkeypatch.setenv("GILEAK_ENGINE", "probe")
    chosen = choice.choose(InvertingGradients(), batch_norm_target(), [0, 1, 2])
    assert chosen.how == "probe" and set(chosen.rates) == {"batched", "loop"}
    assert all(rate > 0 for rate in chosen.rates.values())
    assert chosen.engine == max(chosen.rates, key=chosen.rates.get)


def test_one_victim_on_vmap_takes_the_loop_by_rule(monkeypatch):
    monkeypatch.setattr(choice, "_rate", lambda *args: pytest.fail("probed"))
    chosen = choice.choose(InvertingGradients(), batch_norm_target(n=1), [0])
    assert (chosen.engine, chosen.how) == ("loop", "rule")


def test_an_attack_off_the_engines_runs_as_it_is():
    target, _ = tiny_mlp_target()
    chosen = choice.choose(Analytic(), target, [0, 1])
    assert chosen.engine == "own" and chosen.forced is None


def test_the_environment_overrides_and_a_bad_value_is_a_user_error(monkeypatch):
    target, _ = cnn_target(n=2)
    monkeypatch.setenv("GILEAK_ENGINE", "loop")
    assert choice.choose(InvertingGradients(), target, [0, 1]).forced == "loop"
    monkeypatch.setenv("GILEAK_ENGINE", "gpu")
    with pytest.raises(UserInputError, match="GILEAK_ENGINE='gpu'"):
        choice.choose(InvertingGradients(), target, [0, 1])


def test_a_forced_engine_is_the_one_that_runs_and_gives_the_engines_result():
    target, _ = tiny_mlp_target()
    config = MatchingConfig(min_loss=0.0)
    results = {}
    for engine in ("loop", "batched"):
        with choice.use(engine), choice._watching() as seen:
            results[engine] = gradient_matching(target, config, seeds=[0, 1], max_iterations=5, labels=target.labels)
        assert seen == (["loop"] if engine == "loop" else ["factored"])  # (a sigmoid: off the chain)
    configured = gradient_matching(target, MatchingConfig(min_loss=0.0, vectorized=False), seeds=[0, 1],
                                   max_iterations=5, labels=target.labels)
    assert torch.equal(results["loop"].images, configured.images)
    with pytest.raises(ValueError, match="unknown engine"):
        with choice.use("gpu"):
            pass


def test_the_cache_round_trips_and_ignores_what_it_cannot_read(tmp_path, monkeypatch):
    monkeypatch.setenv("GILEAK_ENGINE", "probe")
    assert choice.load(tmp_path) == {} and choice.load(None) == {}
    made = choice.EngineChoice("loop", "vmap", "probe", "probe: ...", {"batched": 1.0, "loop": 2.0})
    choice.remember(tmp_path, "key", made)
    assert choice.load(tmp_path)["key"]["engine"] == "loop"
    cached = choice.choose(InvertingGradients(), batch_norm_target(), [0, 1, 2], choice.load(tmp_path)["key"])
    assert (cached.engine, cached.how, cached.rates) == ("loop", "cache", made.rates)
    assert not list(tmp_path.glob(".*.tmp"))
    for text in ("{not json", "[1, 2]", json.dumps({"key": {"engine": "rm -rf"}, "other": 3})):
        (tmp_path / choice.CACHE_FILE).write_text(text)
        assert choice.load(tmp_path) == {}


def test_a_run_records_each_results_engine_by_rule_and_writes_no_cache(capsys, tmp_path):
    code, text, _ = run(capsys, "bench", "--datasets", "digits", "--models", "cnn,mlp(width=16)", "--attacks",
                        "ig,dlg", "--victims", "2", "--iterations", "2", "--out", str(tmp_path / "run"))
    assert code == 0, text
    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as db:
        stored = {(m, a): json.loads(env)["engine"] for m, a, env in db.execute("SELECT model, attack_label, env "
                                                                              "FROM results")}
    assert {(key, e["engine"], e["path"], e["how"]) for key, e in stored.items()} == {
        (("cnn", "ig"), "batched", "chain", "rule"), (("cnn", "dlg"), "batched", "vmap", "rule"),
        (("mlp(width=16)", "ig"), "batched", "vmap", "rule"), (("mlp(width=16)", "dlg"), "batched", "vmap", "rule")}
    assert not (tmp_path / "run" / choice.CACHE_FILE).exists()


def test_a_probing_run_caches_its_verdicts_and_later_cells_reuse_them(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GILEAK_ENGINE", "probe")
    out = tmp_path / "run"
    args = ["bench", "--datasets", "digits", "--models", "cnn,mlp(width=16)", "--attacks", "ig,idlg", "--victims",
            "2", "--iterations", "2", "--out", str(out)]
    code, text, _ = run(capsys, *args)
    assert code == 0, text
    with sqlite3.connect(out / "results.sqlite") as db:
        stored = {(m, a): json.loads(env)["engine"] for m, a, env in db.execute("SELECT model, attack_label, env "
                                                                              "FROM results")}
    assert stored[("cnn", "ig")]["path"] == "chain" and stored[("cnn", "ig")]["how"] == "rule"
    probed = stored[("mlp(width=16)", "ig")]
    assert probed["how"] == "probe" and probed["path"] == "vmap" and probed["engine"] in ("batched", "loop")
    cache = json.loads((out / choice.CACHE_FILE).read_text())
    assert len(cache) == 2 and all("victims=2 | device=cpu" in key for key in cache)  # the probed ones only
    # more seeds into the same directory: the new cells take the cached choices, no probe
    code, text, _ = run(capsys, *args, "--seeds", "2")
    assert code == 0, text
    with sqlite3.connect(out / "results.sqlite") as db:
        again = [json.loads(env)["engine"] for env, in db.execute("SELECT env FROM results WHERE seed = 1 AND "
                                                                  "model = 'mlp(width=16)'")]
    assert len(again) == 2 and {e["how"] for e in again} == {"cache"}


def test_the_probe_leaves_no_trace_in_the_results(capsys, tmp_path, monkeypatch):
    """A run that probed (and so ran the attack before it) computes what a run forced onto the
    engine the probe chose computes."""
    monkeypatch.setenv("GILEAK_ENGINE", "probe")
    args = ["--datasets", "digits", "--models", "mlp(width=16)", "--attacks", "dlg", "--victims", "2",
            "--iterations", "3", "--export"]
    assert run(capsys, "bench", *args, str(tmp_path / "a.json"), "--out", str(tmp_path / "a"))[0] == 0
    chosen = json.loads((tmp_path / "a" / choice.CACHE_FILE).read_text())
    (engine,) = {c["engine"] for c in chosen.values()}
    monkeypatch.setenv("GILEAK_ENGINE", engine)
    assert run(capsys, "bench", *args, str(tmp_path / "b.json"), "--out", str(tmp_path / "b"))[0] == 0
    rows = [json.loads((tmp_path / f"{name}.json").read_text())[0] for name in "ab"]
    assert rows[0]["ssim_mean"] == rows[1]["ssim_mean"] and rows[0]["mse_mean"] == rows[1]["mse_mean"]


def test_the_dry_run_shows_each_attacks_engine_and_writes_no_cache(capsys, tmp_path):
    out = tmp_path / "never"
    code, text, err = run(capsys, "bench", "--dry-run", "--datasets", "digits", "--models", "cnn,mlp(width=16)",
                          "--defenses", "none,cvb", "--attacks", "ig", "--victims", "3", "--iterations", "10",
                          "--out", out)
    assert code == 0, err
    assert "Engine per attack" in text and "batched (chain)" in text and "batched (factored)" in text  # cnn, cnn + cvb
    assert "batched (vmap)" in text  # the MLP's batch norm
    assert not out.exists()


def test_a_probing_dry_run_shows_the_probes_reason(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GILEAK_ENGINE", "probe")
    code, text, err = run(capsys, "bench", "--dry-run", "--datasets", "digits", "--models", "mlp(width=16)",
                          "--attacks", "ig", "--victims", "3", "--iterations", "10")
    assert code == 0, err
    assert "engine digits | mlp(width=16) | none | ig: " in " ".join(text.split()) and "probe:" in text


def test_a_batched_engine_that_fails_in_the_probe_leaves_the_attack_to_the_loop(monkeypatch):
    from gileak.errors import NotApplicableError

    class Greedy(InvertingGradients):
        """Out of memory on the batched engine, as a large model with many victims can be."""

        def attack(self, target, *, seeds, max_iterations, progress=None):
            if choice._forced.get() == "batched":
                raise RuntimeError("CUDA out of memory")
            return super().attack(target, seeds=seeds, max_iterations=max_iterations, progress=progress)

    chosen = choice.choose(Greedy(), batch_norm_target(), [0, 1, 2])
    assert chosen.engine == "loop" and "out of memory" in chosen.reason

    class Refusing(InvertingGradients):
        def attack(self, target, *, seeds, max_iterations, progress=None):
            raise NotApplicableError("not here")

    with pytest.raises(NotApplicableError):  # the attack's own verdict, not a probe failure
        choice.choose(Refusing(), batch_norm_target(), [0, 1, 2])


def test_victims_of_several_images_are_chosen_for_by_their_own_path(monkeypatch):
    """A client's victims hold M images each: the rule's one-iteration look takes each victim's
    M labels (not one), a batch's gradient stays on the chain step, local steps go to vmap."""
    from test_clients import target_for

    from gileak.default_plugins.clients import FedAvgClient, GradientClient

    monkeypatch.setattr(choice, "_rate", lambda *args: pytest.fail("probed"))
    batch, _ = target_for(GradientClient(batch=4), victims=3)
    chosen = choice.choose(InvertingGradients(), batch, [0, 1, 2])
    assert (chosen.engine, chosen.path) == ("batched", "chain")
    local, _ = target_for(FedAvgClient(batch=2, steps=2), victims=3)
    chosen = choice.choose(InvertingGradients(), local, [0, 1, 2])
    assert (chosen.engine, chosen.path) == ("batched", "vmap")
    assert choice._subset(local, 2).labels.tolist() == local.labels[:8].tolist()
    one, _ = target_for(FedAvgClient(batch=2, steps=2), victims=1)
    assert choice.choose(InvertingGradients(), one, [0]).engine == "loop"
