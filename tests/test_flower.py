"""The Flower audit: a real Flower ServerApp and ClientApp run in this process, the server's
strategy wrapped by gileak.integrations.flower.AuditStrategy."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn


def _flower_or_skip():
    """flwr, or a skip naming it; with GILEAK_REQUIRE_FLOWER=1 (CI) a missing flwr fails instead."""
    try:
        return importlib.import_module("flwr")
    except ImportError:
        message = "the Flower audit needs flwr: pip install 'gileak[flower]'"
        if os.environ.get("GILEAK_REQUIRE_FLOWER") == "1":
            pytest.fail(message + " (GILEAK_REQUIRE_FLOWER=1)")
        pytest.skip(message, allow_module_level=True)


_flower_or_skip()

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from gileak.cli import main as cli  # noqa: E402
from gileak.errors import UserInputError  # noqa: E402
from gileak.integrations import flower  # noqa: E402
from gileak.store import ResultStore  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower-audit"
SHAPE = (1, 4, 4)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3))


def images_for(indices):
    generator = torch.Generator().manual_seed(7)
    pool = torch.rand(64, *SHAPE, generator=generator)
    labels = torch.arange(64) % 3
    return pool[indices], labels[indices]


def sgd_client(behaviour=None, reveal=True, batch=2, steps=2, lr=0.1) -> ClientApp:
    """A Flower client doing `steps` plain SGD steps on batches of `batch` of its own images;
    `behaviour(node, state, metrics)` may corrupt what it replies (a hostile or broken client)."""
    app = ClientApp(mods=[flower.reveal_samples_mod] if reveal else [])

    @app.train()
    def train(msg, context):
        node = context.node_config["partition-id"]
        net = tiny_net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        indices = list(range(node * batch * steps, (node + 1) * batch * steps))
        flower.record_samples(context, indices)
        images, labels = images_for(indices)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        for step in range(steps):
            rows = slice(step * batch, (step + 1) * batch)
            loss = nn.functional.cross_entropy(net(images[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = dict(net.state_dict())
        metrics = {"num-examples": batch * steps, "batch-size": batch, "local-steps": steps, "lr": lr}
        if behaviour is not None:
            state, metrics = behaviour(node, msg.content["arrays"].to_torch_state_dict(), state, metrics)
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def serve(strategy_factory, rounds=1, nodes=2, result=None):
    """A ServerApp running `strategy_factory(net)` for `rounds` rounds; the final arrays go to `result`."""
    app = ServerApp()

    @app.main()
    def main(grid, context):
        net = tiny_net()
        strategy = strategy_factory(net)
        try:
            outcome = strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()), num_rounds=rounds,
                                     train_config=ConfigRecord({"lr": 0.1}))
        finally:
            getattr(strategy, "close", lambda: None)()
        if result is not None:
            result["arrays"] = outcome.arrays.to_torch_state_dict()

    return app


def fedavg(nodes):
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)


def audit(out, nodes=2, **kwargs):
    settings = dict(input_shape=SHAPE, out=out, attacks="ig", rounds=[1], max_clients=8, iterations=3,
                    dataset="toy", model="tiny", samples=images_for)
    settings.update(kwargs)
    return lambda net: flower.AuditStrategy(fedavg(nodes), net=net, **settings)


def stored(out):
    store = ResultStore.open_existing(out)
    try:
        return store.results()
    finally:
        store.close()


# -- the mapping ----------------------------------------------------------------------------------


def test_a_flower_client_of_E_sgd_steps_on_batches_of_B_is_attacked_as_fedavg_and_matches_gileaks_client(tmp_path):
    from gileak.default_plugins.defenses import NoDefense
    from gileak.threat import trainable_state
    from gileak.uploads import simulate_local_update

    seen = {}

    class Capturing(flower.AuditStrategy):
        def _audit(self, server_round, collected):
            seen["collected"] = collected

    app = serve(lambda net: Capturing(fedavg(2), net=net, input_shape=SHAPE, out=tmp_path / "run", rounds=[1],
                                      samples=images_for), nodes=2)
    flower.run_in_process(app, sgd_client(batch=2, steps=3, lr=0.1), 2)
    kind, uploads, _configs = seen["collected"]
    assert kind == "uploads" and len(uploads) == 2
    net = tiny_net()
    for item in uploads:
        assert item.client.label == "fedavg(batch=2,steps=3,lr=0.1)"
        images, labels = images_for(item.samples)
        assert item.samples == list(range((item.node - 1) * 6, item.node * 6))
        expected = item.client.component.upload(net, NoDefense(), images, labels)
        params, frozen = trainable_state(net)
        simulated = simulate_local_update(net, params, frozen, images, labels, steps=3, batch=2, lr=0.1)
        for name, value in expected.items():
            assert value.abs().max() > 0
            torch.testing.assert_close(item.upload[name], value, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(item.upload[name], simulated[name], rtol=1e-5, atol=1e-7)


def test_one_step_on_all_images_maps_to_the_gradient_client_as_minus_the_update_over_lr():
    ref = flower.declared_client({"batch-size": 4, "local-steps": 1, "lr": 0.5, "num-examples": 4}, {})
    assert (ref.name, ref.params) == ("gradient", {"batch": 4})
    ref = flower.declared_client({"batch-size": 4, "local-epochs": 2, "num-examples": 8}, {"lr": 0.5})
    assert (ref.name, ref.params) == ("fedavg", {"batch": 4, "steps": 4, "lr": 0.5, "data": 8})
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    after = {k: v + 0.25 for k, v in before.items()}
    from gileak.default_plugins.clients import GradientClient

    upload = flower.upload_of(after, before, net, GradientClient(batch=4), 0.5)
    assert all(torch.allclose(v, torch.full_like(v, -0.5)) for v in upload.values())


@pytest.mark.parametrize("metrics, config, reason", [
    ({}, {}, "no learning rate"),
    ({"lr": 0.1}, {}, "no batch size"),
    ({"lr": 0.1, "batch-size": 2}, {}, "neither local-steps nor local-epochs"),
    ({"lr": float("inf"), "batch-size": 2, "local-steps": 1}, {}, "not a positive finite number"),
    ({"lr": "fast", "batch-size": 2, "local-steps": 1}, {}, "not a positive finite number"),
    ({"lr": 0.1, "batch-size": -3, "local-steps": 1}, {}, "not a positive whole number"),
    ({"lr": 0.1, "batch-size": 2.5, "local-steps": 1}, {}, "not a positive whole number"),
    ({"lr": 0.1, "batch-size": 2, "local-epochs": 1}, {}, "not num-examples"),
    ({"lr": 0.1, "batch-size": 4, "local-epochs": 1, "num-examples": 10}, {}, "partial last batch"),
    ({"lr": 0.1, "batch-size": 4, "local-steps": 2, "num-examples": 100}, {}, "cannot train on 100"),
    ({"lr": 0.1, "batch-size": 4, "local-steps": 2, "optimizer": "adam"}, {}, "plain SGD only"),
])
def test_a_missing_or_nonsense_training_config_is_refused_with_its_reason(metrics, config, reason):
    with pytest.raises(flower.UnmappableUpdate, match=reason):
        flower.declared_client(metrics, config)


# -- end to end -----------------------------------------------------------------------------------


def test_the_audit_writes_a_run_directory_that_gileak_leaderboard_and_report_read(tmp_path, capsys):
    out = tmp_path / "run"
    with_audit, without = {}, {}
    flower.run_in_process(serve(audit(out), rounds=2, result=with_audit), sgd_client(), 2)
    flower.run_in_process(serve(lambda net: fedavg(2), rounds=2, result=without), sgd_client(), 2)
    for name, value in without["arrays"].items():  # the audit changes nothing of the training
        assert torch.equal(with_audit["arrays"][name], value), name
    results = stored(out)
    assert [(r.status, r.client, r.seed) for r in results] == [("ok", "fedavg(batch=2,steps=2,lr=0.1)", 1)]
    victims = results[0].victims
    assert sorted(v.victim for v in victims) == list(range(8))  # the samples the two clients disclosed
    assert all(math.isfinite(v.ssim) and -1 <= v.ssim <= 1 for v in victims)
    rows = json.loads((out / "leaderboard.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert rows[0]["victims"] == 2 and rows[0]["images"] == 8 and rows[0]["ssim_mean"] is not None
    assert (out / "report.html").is_file() and (out / "victims.jsonl").read_text().count("\n") == 8
    assert list((out / "reconstructions").glob("*.npz"))
    assert cli(["leaderboard", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "toy" in printed and "fedavg" in printed and "Flower server round" in printed
    assert cli(["report", str(out)]) == 0


def test_without_the_clients_disclosure_rows_are_unscored_never_scored(tmp_path, capsys):
    out = tmp_path / "run"
    flower.run_in_process(serve(audit(out, attacks="ig(labels=recover)")), sgd_client(reveal=False), 2)
    (result,) = stored(out)
    assert result.status == "not applicable" and result.victims == []
    assert "unscored" in result.error and "reveal_samples_mod" in result.error
    assert list((out / "reconstructions").glob("*-unscored.png"))  # attacked all the same, images kept
    rows = json.loads((out / "leaderboard.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert rows[0]["ssim_mean"] is None and rows[0]["asr"] is None
    assert cli(["leaderboard", str(out)]) == 0
    assert "unscored" in capsys.readouterr().out


def test_without_samples_the_server_scores_nothing_and_an_attack_that_needs_labels_says_so(tmp_path):
    out = tmp_path / "run"
    flower.run_in_process(serve(audit(out, samples=None, attacks="ig,ig(labels=recover)")), sgd_client(), 2)
    by_attack = {r.attack_label: r for r in stored(out)}
    assert "labels" in by_attack["ig"].error  # the server is not told the labels
    assert by_attack["ig(labels=recover)"].status == "not applicable"
    assert "unscored" in by_attack["ig(labels=recover)"].error


def _hostile(node, sent, state, metrics):
    if node == 0:  # uploads the weights it was sent: an all-zero update
        return sent, metrics
    if node == 1:
        return {k: v * float("nan") for k, v in state.items()}, metrics
    if node == 2:
        return state, {**metrics, "lr": -1.0}  # FedAvg needs the same metric keys from every client
    return state, metrics


def test_hostile_and_degenerate_clients_fail_with_their_reasons_and_training_goes_on(tmp_path):
    out = tmp_path / "run"
    nodes = 4
    app = serve(audit(out, nodes=nodes), nodes=nodes, result={})
    flower.run_in_process(app, sgd_client(_hostile), nodes)  # FedAvg averages these; training ends normally
    reasons = {r.attack.rsplit(" @ node", 1)[-1]: r.error for r in stored(out) if r.status == "failed"}
    assert "all zeros" in reasons["1"]
    assert "NaN" in reasons["2"]
    assert "lr is -1.0, not a positive finite number" in reasons["3"]
    ok = [r for r in stored(out) if r.status == "ok"]
    assert len(ok) == 1 and ok[0].victims and ok[0].client.startswith("fedavg")
    assert all(not r.victims for r in stored(out) if r.status != "ok")  # no failed row carries a score


def _mismatched(node, sent, state, metrics):
    if node == 0:
        return {**state, "extra.weight": torch.zeros(2)}, metrics
    return {k: v[..., :1] if v.ndim else v for k, v in state.items()}, metrics


def test_weights_that_do_not_fit_the_model_fail_their_rows_and_flowers_own_error_is_unchanged(tmp_path):
    out = tmp_path / "run"
    errors = []
    for strategy in (audit(out), lambda net: fedavg(2)):
        with pytest.raises(Exception) as raised:  # FedAvg refuses these replies, with or without the audit
            flower.run_in_process(serve(strategy), sgd_client(_mismatched), 2)
        errors.append((type(raised.value), str(raised.value)))
    assert errors[0] == errors[1]
    reasons = {r.attack.rsplit(" @ node", 1)[-1]: r.error for r in stored(out)}
    assert "unexpected ['extra.weight']" in reasons["1"]
    assert "shapes" in reasons["2"]


def test_flowers_client_side_clipping_and_local_dp_are_rows_named_after_them(tmp_path):
    from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    out = tmp_path / "run"
    clipped = ClientApp(mods=[flower.reveal_samples_mod, fixedclipping_mod])
    clipped._registered_funcs = sgd_client()._registered_funcs  # the same training, clipped by Flower's mod

    def dp_audit(net):
        strategy = DifferentialPrivacyClientSideFixedClipping(fedavg(2), noise_multiplier=0.1, clipping_norm=0.5,
                                                              num_sampled_clients=2)
        return flower.AuditStrategy(strategy, net=net, input_shape=SHAPE, out=out, attacks="ig", rounds=[1],
                                    iterations=3, max_clients=8, dataset="toy", model="tiny", samples=images_for)

    flower.run_in_process(serve(dp_audit), clipped, 2)
    mod = LocalDpMod(clipping_norm=0.5, sensitivity=0.5, epsilon=10.0, delta=1e-5)
    local = ClientApp(mods=[flower.reveal_samples_mod, mod])
    local._registered_funcs = sgd_client()._registered_funcs
    flower.run_in_process(serve(audit(out, client_mods=[mod])), local, 2)
    defenses = {r.defense: r for r in stored(out)}
    assert set(defenses) == {"none + flower:fixedclipping(clip=0.5)",
                             "none + flower:localdp(clip=0.5,eps=10,delta=1e-05,sensitivity=0.5)"}
    assert all(r.status == "ok" for r in defenses.values())
    assert any("after aggregation" in note for note in defenses["none + flower:fixedclipping(clip=0.5)"].cell_notes)


def test_the_audits_own_mistakes_are_refused_before_training(tmp_path):
    net = tiny_net()
    with pytest.raises(UserInputError, match="Unknown attack"):
        flower.AuditStrategy(fedavg(2), net=net, input_shape=SHAPE, out=tmp_path / "a", attacks="igg")
    with pytest.raises(UserInputError, match="does not take inputs"):
        flower.AuditStrategy(fedavg(2), net=net, input_shape=(3, 9, 9), out=tmp_path / "b")
    with pytest.raises(UserInputError, match="Flower strategy"):
        flower.AuditStrategy(object(), net=net, input_shape=SHAPE, out=tmp_path / "c")
    with pytest.raises(UserInputError, match="rounds"):
        flower.AuditStrategy(fedavg(2), net=net, input_shape=SHAPE, out=tmp_path / "d", rounds=[0])
    with flower.AuditStrategy(fedavg(2), net=net, input_shape=SHAPE, out=tmp_path / "e"):
        with pytest.raises(UserInputError, match="another gileak"):  # one writer per run directory
            flower.AuditStrategy(fedavg(2), net=net, input_shape=SHAPE, out=tmp_path / "e")


def test_the_example_app_runs_end_to_end_with_and_without_cvb(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("run", None)
    run = importlib.import_module("run")
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["run.py", "--out", str(out), "--variants", "none,cvb", "--nodes", "2",
                                      "--rounds", "1", "--audit-rounds", "1", "--audit-clients", "1",
                                      "--attacks", "ig", "--iterations", "2"])
    run.main()
    rows = {(r.defense, r.attack_label): r for r in stored(out)}
    assert rows[("none", "ig")].status == "ok" and rows[("cvb", "ig")].status == "ok"
    assert rows[("cvb", "ignore")].status == "ok"
    assert rows[("cvb", "ig")].params_added_pct > 0 == rows[("none", "ig")].params_added_pct  # against base_net
    assert cli(["leaderboard", str(out)]) == 0


def test_a_round_whose_train_messages_the_audit_never_saw_is_a_failed_row_not_a_crash(tmp_path):
    out = tmp_path / "run"
    with flower.AuditStrategy(fedavg(2), net=tiny_net(), input_shape=SHAPE, out=out, rounds=[1]) as wrapped:
        assert wrapped.fraction_train == 1.0  # everything else is the wrapped strategy's
        assert wrapped.aggregate_train(1, []) == (None, None)  # what FedAvg answers to no replies
    (result,) = stored(out)
    assert result.status == "failed" and "not seen by the audit" in result.error and not result.victims


def test_which_clients_are_audited_does_not_depend_on_the_order_replies_come_in(tmp_path):
    """Flower's sampling shuffles the nodes: the audit takes the max_clients of lowest node id, so
    a rerun of a seeded app attacks the same clients' uploads."""
    import random

    found = []
    for seed in (0, 1, 2, 3):
        random.seed(seed)
        out = tmp_path / f"run{seed}"
        flower.run_in_process(serve(audit(out, nodes=4, max_clients=2), rounds=1), sgd_client(), 4)
        [result] = stored(out)
        found.append(sorted(v.victim for v in result.victims))
    assert len(found[0]) == 8 and all(f == found[0] for f in found)
