"""The client component kind: what a victim uploads (gradient on a batch, fedavg's local update,
secure aggregation) through the component, the attacks' simulation of it, batched-vs-alone
victims for every client kind on every engine, the victims' images, and the CLI."""

import json

import pytest
import torch
from torch import nn

from gileak.cli import main
from gileak.default_plugins.attacks import DLG, IDLG, Analytic, InvertingGradients, _labels
from gileak.default_plugins.clients import FedAvgClient, GradientClient
from gileak.default_plugins.defenses import CVB, NoDefense
from gileak.engine.fast import FactoredMatching
from gileak.engine.lbfgs import LBFGSConfig, lbfgs_matching
from gileak.engine.matching import MatchingConfig, gradient_matching, make_victim_loss
from gileak.errors import NotApplicableError
from gileak.threat import Target, client_gradient, shared_gradients

SHAPE = (1, 8, 8)
CLASSES = 4


def tiny_cnn(seed=0, defense=None):
    """A convolution, ReLU, an insertion position and a classifier: a plain chain (the factored
    engine's chain path) until a defense inserts a bottleneck."""
    from gileak.nets import Slot

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), Slot(1, (4, 3, 3)), nn.Flatten(),
                        nn.Linear(36, CLASSES))
    if defense is not None:
        defense.apply(net)
    return net


def data(n, seed=1, labels=None):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *SHAPE, generator=generator)
    if labels is None:
        labels = torch.randint(CLASSES, (n,), generator=generator)
    return images, torch.as_tensor(labels)


def target_for(client, victims=3, net=None, labels=None, seed=1):
    net = net or tiny_cnn()
    images, labels = data(victims * client.images_per_victim(), seed=seed, labels=labels)
    uploads = shared_gradients(net, NoDefense(), images, labels, seed=0, client=client)
    return Target(net=net, shared_gradient=uploads, input_shape=SHAPE, num_classes=CLASSES, labels=labels,
                  client=client), images


def alone(target, victim):
    """The same target with victim `victim` alone."""
    per_victim = target.images_per_victim
    rows = slice(victim * per_victim, (victim + 1) * per_victim)
    return Target(net=target.net, shared_gradient={k: v[victim : victim + 1] for k, v in target.shared_gradient.items()},
                  input_shape=target.input_shape, num_classes=target.num_classes, labels=target.labels[rows],
                  client=target.client)


def assert_uploads_close(got, expected, atol=1e-6, rtol=1e-5):
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=rtol)


# --- the uploads, through the component ---------------------------------------------------------


def test_a_gradient_clients_upload_is_the_mean_of_its_images_single_image_gradients():
    net = tiny_cnn().train()
    images, labels = data(6)
    uploads = shared_gradients(net, NoDefense(), images, labels, client=GradientClient(batch=3))
    assert all(u.shape[0] == 2 for u in uploads.values())  # two victims of three images
    for victim in range(2):
        singles = [client_gradient(net, NoDefense(), images[i : i + 1], labels[i : i + 1])
                   for i in range(3 * victim, 3 * victim + 3)]
        expected = {n: torch.stack([s[n] for s in singles]).mean(0) for n in singles[0]}
        assert_uploads_close({n: u[victim] for n, u in uploads.items()}, expected)


def test_the_paper_client_is_the_single_image_gradient_bit_for_bit():
    net = tiny_cnn().train()
    images, labels = data(3)
    paper = shared_gradients(net, NoDefense(), images, labels, seed=4)
    through = shared_gradients(net, NoDefense(), images, labels, seed=4, client=GradientClient())
    assert all(torch.equal(paper[n], through[n]) for n in paper)
    assert GradientClient().is_single_image_gradient() and not GradientClient(batch=2).is_single_image_gradient()
    assert not GradientClient(aggregate=2).is_single_image_gradient()


def test_secure_aggregation_shows_the_mean_of_the_clients_uploads():
    net = tiny_cnn().train()
    images, labels = data(4)
    client = GradientClient(batch=2, aggregate=2)
    seen = client.victim_upload(net, NoDefense(), images, labels)
    parts = [client.upload(net, NoDefense(), images[k : k + 2], labels[k : k + 2]) for k in (0, 2)]
    assert_uploads_close(seen, {n: (parts[0][n] + parts[1][n]) / 2 for n in seen})
    # without batch norm: the gradient of the mean loss over all four images
    assert_uploads_close(seen, GradientClient(batch=4).upload(net, NoDefense(), images, labels))


def test_fedavg_one_step_uploads_minus_lr_times_the_gradient_clients_upload():
    net = tiny_cnn().train()
    images, labels = data(6)
    lr = 0.05
    gradient = shared_gradients(net, NoDefense(), images, labels, client=GradientClient(batch=3))
    fedavg = FedAvgClient(batch=3, steps=1, lr=lr)
    update = shared_gradients(net, NoDefense(), images, labels, client=fedavg)
    assert all(torch.equal(update[n], -lr * gradient[n]) for n in gradient)
    assert_uploads_close(fedavg.to_gradient(update), gradient, rtol=1e-4)
    assert fedavg.is_mean_gradient() and not FedAvgClient(batch=2, steps=2).is_mean_gradient()


@pytest.mark.parametrize("client", [GradientClient(batch=3), GradientClient(batch=2, aggregate=2),
                                    FedAvgClient(batch=2, steps=3, lr=0.3), FedAvgClient(batch=2, steps=3, data=5),
                                    FedAvgClient(batch=2, steps=1, aggregate=2)], ids=repr)
def test_the_attackers_simulation_on_the_true_data_is_the_upload_in_gradient_units(client):
    target, images = target_for(client, victims=1)
    target.net.eval()  # (nothing stochastic here; train and eval agree for this CNN)
    params, frozen = target.params, target.frozen
    names = list(params)
    simulated = target.simulate(params, frozen, images, target.labels, names)
    expected = {n: v[0] for n, v in target.shared_in_gradient_units().items()}
    assert_uploads_close(simulated, expected, atol=1e-6, rtol=1e-4)
    # one-hot probabilities are the same targets as the class indices
    onehot = torch.nn.functional.one_hot(target.labels, CLASSES).float()
    assert_uploads_close(target.simulate(params, frozen, images, onehot, names), expected, atol=1e-6, rtol=1e-4)


def test_client_parameters_are_validated():
    from gileak.errors import ParamsError

    for bad in (dict(batch=0), dict(aggregate=0), dict(lr=float("inf")), dict(lr=float("nan")), dict(lr=0),
                dict(steps=10**9), dict(batch=2, steps=2, data=5), dict(batch=4, data=3)):
        with pytest.raises(ParamsError):
            FedAvgClient(**bad)
    assert FedAvgClient(batch=2, steps=3, data=5).images_per_client() == 5
    assert FedAvgClient(batch=2, steps=3, data=5, aggregate=2).labels_per_upload() == 12
    assert GradientClient(batch=4, aggregate=3).images_per_victim() == 12


# --- the engines: batched victims equal victims alone -------------------------------------------


CLIENTS = [GradientClient(), GradientClient(batch=3), GradientClient(batch=2, aggregate=2),
           FedAvgClient(batch=2, steps=2, lr=0.1)]


@pytest.mark.parametrize("client", CLIENTS, ids=repr)
@pytest.mark.parametrize("factored", [True, False], ids=["factored", "vmap"])
def test_gradient_matching_gives_a_victim_the_same_result_batched_or_alone(client, factored):
    target, _ = target_for(client)
    config = MatchingConfig(factored=factored, plateau_patience=2, stop_patience=4)
    together = gradient_matching(target, config, seeds=[5, 6, 7], max_iterations=6, labels=target.labels)
    single = gradient_matching(alone(target, 1), config, seeds=[6], max_iterations=6,
                               labels=alone(target, 1).labels)
    per_victim = client.images_per_victim()
    assert together.images.shape == (3 * per_victim, *SHAPE)
    torch.testing.assert_close(single.images, together.images[per_victim : 2 * per_victim], atol=1e-4, rtol=0)
    assert single.iterations == together.iterations[1:2]


@pytest.mark.parametrize("client", CLIENTS, ids=repr)
@pytest.mark.parametrize("attack", [DLG(), IDLG(labels="known")], ids=["dlg", "idlg"])
def test_lbfgs_gives_a_victim_the_same_result_batched_or_alone(client, attack):
    target, _ = target_for(client)
    config = attack.lbfgs_config(None)
    config.minmax = False
    labels = None if config.optimise_labels else target.labels
    together = lbfgs_matching(target, config, seeds=[5, 6, 7], max_iterations=3, labels=labels)
    part = alone(target, 1)
    single = lbfgs_matching(part, config, seeds=[6], max_iterations=3, labels=None if labels is None else part.labels)
    per_victim = client.images_per_victim()
    torch.testing.assert_close(single.images, together.images[per_victim : 2 * per_victim], atol=1e-4, rtol=0)
    assert single.labels.tolist() == together.labels[per_victim : 2 * per_victim].tolist()
    assert together.labels.shape == (3 * per_victim,)  # DLG: one soft label per image


def test_the_batched_lbfgs_follows_its_reference_loop_on_a_local_update():
    target, _ = target_for(FedAvgClient(batch=2, steps=2, lr=0.1), victims=2)
    config = LBFGSConfig(minmax=False, optimise_labels=True)
    batched = lbfgs_matching(target, config, seeds=[1, 2], max_iterations=3, labels=None)
    config.vectorized = False
    reference = lbfgs_matching(target, config, seeds=[1, 2], max_iterations=3, labels=None)
    torch.testing.assert_close(batched.images, reference.images, atol=1e-4, rtol=0)
    assert batched.labels.tolist() == reference.labels.tolist()


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("defense", [None, CVB(kernel=3)], ids=["chain", "autograd"])
def test_the_factored_engine_computes_the_vmap_losses_and_image_gradients_for_batches(distance, defense):
    net = tiny_cnn(defense=defense).eval()  # eval: the bottleneck passes its mean, deterministic
    client = GradientClient(batch=3, aggregate=2)
    target, _ = target_for(client, victims=2, net=net)
    target.trace = True
    config = MatchingConfig(distance=distance, trace=True, tv_weight=0.05)
    victim_loss = make_victim_loss(target, config)
    fast = FactoredMatching.build(target, config, victim_loss.matched, victim_loss.names, victim_loss.groups)
    assert fast is not None and (fast.chain is not None) == (defense is None)
    images = torch.randn(2, 6, *SHAPE, generator=torch.Generator().manual_seed(3))
    labels = target.labels.view(2, 6)
    shared = tuple(target.shared_gradient[n] for n in victim_loss.names)
    grads, losses, cosines = fast.step(images, labels, shared)
    step = torch.func.vmap(torch.func.grad_and_value(victim_loss, has_aux=True))
    expected_grads, (expected_losses, aux) = step(images, labels, shared)
    torch.testing.assert_close(losses, expected_losses, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads, expected_grads, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(cosines, aux[1], atol=1e-5, rtol=1e-4)


def test_local_steps_are_not_factored_and_fall_back_to_vmap():
    target, _ = target_for(FedAvgClient(batch=2, steps=2), victims=1)
    config = MatchingConfig()
    victim_loss = make_victim_loss(target, config)
    assert FactoredMatching.build(target, config, victim_loss.matched, victim_loss.names, victim_loss.groups) is None


# --- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [GradientClient(batch=4), FedAvgClient(batch=4, steps=1, lr=0.5),
                                    GradientClient(batch=2, aggregate=2), FedAvgClient(batch=2, steps=2, lr=0.01)],
                         ids=repr)
def test_labels_recover_reads_a_batchs_label_counts_repeats_included(client):
    labels = [2, 2, 0, 2] * 2
    target, _ = target_for(client, victims=2, labels=labels)
    found = _labels(target, "recover", "idlg")
    assert found.shape == (8,)
    assert [sorted(found[:4].tolist()), sorted(found[4:].tolist())] == [[0, 2, 2, 2]] * 2


def test_attacks_mark_the_labels_they_were_given():
    target, _ = target_for(GradientClient(batch=2), victims=1)
    given = InvertingGradients(labels="known").attack(target, seeds=[0], max_iterations=1)
    found = InvertingGradients(labels="recover").attack(target, seeds=[0], max_iterations=1)
    assert given.labels_known and not found.labels_known and found.labels.shape == (2,)


def test_analytic_is_not_applicable_to_a_batch():
    target, _ = target_for(GradientClient(batch=2), victims=1)
    with pytest.raises(NotApplicableError, match="batch"):
        Analytic().attack(target, seeds=[0], max_iterations=1)
    assert not Analytic.handles_clients and InvertingGradients.handles_clients and DLG.handles_clients


def test_label_blind_baseline_is_exact_on_constructed_batches():
    from gileak.engine.labels import label_blind_accuracy

    # B = 1: 1/C. B = C with every class once: the even spread is exactly right.
    assert label_blind_accuracy(torch.tensor([[3]]), 10) == pytest.approx([0.1])
    assert label_blind_accuracy(torch.arange(4).view(1, 4), 4) == pytest.approx([1.0])
    # B = 4 of one class among C = 2: the spread guesses 2 of it.
    assert label_blind_accuracy(torch.tensor([[1, 1, 1, 1]]), 2) == pytest.approx([0.5])
    # B = 3, C = 4, labels {0, 0, 1}: 3 extra labels to random classes hit class 0 and 1 with 3/4 each.
    assert label_blind_accuracy(torch.tensor([[0, 0, 1]]), 4) == pytest.approx([(0.75 + 0.75) / 3])


# --- the victims' images -----------------------------------------------------------------------


def _resolved(text):
    from gileak.runner import resolve
    from gileak.spec import parse_component

    return resolve("client", parse_component(text)[0])


def test_victims_images_are_distinct_and_an_aggregate_draws_from_several_clients():
    from gileak import data, fl
    from gileak.runner import _victim_pool, victim_images
    from gileak.spec import BenchSpec

    spec = BenchSpec(victims=3)
    config = fl.FLConfig(rounds=1, seed=0)
    paper = victim_images(1000, config, spec, _resolved("gradient"), seed=0)
    assert paper.tolist() == data.pick_victims(_victim_pool(1000, config, spec), 3, 0).tolist()  # as always
    batch = victim_images(1000, config, spec, _resolved("gradient(batch=5)"), seed=0)
    assert len(batch) == 15 and len(set(batch.tolist())) == 15
    aggregate = victim_images(1000, config, spec, _resolved("gradient(batch=4,aggregate=3)"), seed=0).view(3, 3, 4)
    pools = [set(_victim_pool(1000, config, spec, client_index=k).tolist()) for k in range(3)]
    for k in range(3):  # client k of every victim trains on client k's split
        assert set(aggregate[:, k].flatten().tolist()) <= pools[k]
    # more images than the split holds for all victims at once: each victim's batch its own draw
    many = victim_images(1000, config, BenchSpec(victims=40), _resolved("fedavg(batch=8,steps=2)"), seed=0)
    assert all(len(set(v.tolist())) == 16 for v in many.view(40, 16))


# --- the command line --------------------------------------------------------------------------


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_clients(capsys):
    code, out, _ = run(capsys, "list", "clients")
    assert code == 0 and "gradient" in out and "fedavg" in out and "aggregate" in out and "steps" in out


def test_a_clients_grid_runs_and_every_export_carries_the_client(capsys, tmp_path):
    out = tmp_path / "run"
    code, text, err = run(capsys, "bench", "--datasets", "digits", "--victims", "2", "--iterations", "3",
                          "--attacks", "ig(labels=recover),analytic", "--clients", "gradient(batch=1|2)",
                          "--out", out, "--export", tmp_path / "lb.csv", "--export", tmp_path / "lb.json")
    assert code == 0, err
    assert "gradient(batch=1)" in text and "gradient(batch=2)" in text
    rows = json.loads((tmp_path / "lb.json").read_text())
    by = {(r["client"], r["attack"]): r for r in rows}
    assert set(by) == {(c, a) for c in ("gradient(batch=1)", "gradient(batch=2)")
                       for a in ("ig(labels=recover)", "analytic")}
    batch = by[("gradient(batch=2)", "ig(labels=recover)")]
    assert batch["victims"] == 2 and batch["images"] == 4 and 0 <= batch["label_accuracy"] <= 1
    assert batch["label_baseline"] is not None
    assert by[("gradient(batch=2)", "analytic")]["status"] == "not applicable"
    assert "client" in (tmp_path / "lb.csv").read_text().splitlines()[0].split(",")
    lines = [json.loads(line) for line in (out / "victims.jsonl").read_text().splitlines()]
    batched = [line for line in lines if line["client"] == "gradient(batch=2)" and line["attack"] == "ig(labels=recover)"]
    assert len(batched) == 4 and sorted({line["upload"] for line in batched}) == [0, 1]
    code, text, _ = run(capsys, "leaderboard", out, "--format", "csv")
    assert code == 0 and "gradient(batch=2)" in text
    # the paper's client keeps its store key: a run without --clients reuses those results
    code, text, err = run(capsys, "bench", "--datasets", "digits", "--victims", "2", "--iterations", "3",
                          "--attacks", "ig(labels=recover)", "--out", out)
    assert code == 0 and "1 finished result(s) reused" in text, err


def test_clients_in_a_spec_file(tmp_path):
    from gileak.spec import build_spec

    path = tmp_path / "bench.toml"
    path.write_text('clients = ["gradient(batch=4)", {name = "fedavg", steps = [1, 5], lr = 0.01}]\n')
    spec = build_spec(path)
    assert [c.label for c in spec.clients] == ["gradient(batch=4)", "fedavg(steps=1,lr=0.01)", "fedavg(steps=5,lr=0.01)"]
    assert [c.label for c in build_spec(None).clients] == ["gradient"]
    assert [c.label for c in build_spec(None, profile="paper").clients] == ["gradient"]


@pytest.mark.parametrize("clients, message", [
    ("gradient(batch=0)", "batch"), ("fedavg(aggregate=0)", "aggregate"), ("fedavg(lr=inf)", "finite"),
    ("fedavg(lr=nan)", "finite"), ("fedavg(steps=1000000000)", "steps"), ("fedavg(batch=2,steps=2,data=9)", "data"),
    ("gradient(batch=1000000)", "distinct images"), ("gradeint", "Did you mean: gradient"),
    ("gradient(batch=2", "Unbalanced"),
])
def test_hostile_clients_exit_2_before_anything_runs(capsys, tmp_path, clients, message):
    code, out, err = run(capsys, "bench", "--datasets", "digits", "--victims", "2", "--iterations", "2",
                         "--clients", clients, "--out", tmp_path / "run")
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err + out
    assert not (tmp_path / "run" / "results.sqlite").exists()


# --- per-module rules: a third party's stochastic module in the fast engine ----------------------


def test_a_registered_third_party_stochastic_module_takes_the_factored_engine():
    from gileak.engine import rules
    from gileak.nets import Slot

    class Jitter(nn.Module):
        """Multiplies each sample by its own noise (train mode) and adds a batch-mean penalty."""

        stochastic = True

        def __init__(self):
            super().__init__()
            self.scale = nn.Linear(36, 36)
            self.aux_loss = None

        def forward(self, x):
            shape = x.shape
            h = self.scale(x.flatten(1))
            if self.training:
                h = h * (1 + 0.1 * torch.randn_like(h))
            self.aux_loss = 0.01 * h.pow(2).mean()
            return h.view(shape)

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), Slot(1, (4, 3, 3)), nn.Flatten(),
                            nn.Linear(36, CLASSES))
        net[2].insert(Jitter())
        return net.eval()  # eval: deterministic, so the engines can be compared number for number

    client = GradientClient(batch=2)
    config = MatchingConfig(tv_weight=0.0)
    target, _ = target_for(client, victims=2, net=build())
    victim_loss = make_victim_loss(target, config)
    assert FactoredMatching.build(target, config, victim_loss.matched, victim_loss.names, victim_loss.groups) is None
    try:
        rules.register_module_rule(Jitter, role="composite", batch_mean_aux=True)
        fast = FactoredMatching.build(target, config, victim_loss.matched, victim_loss.names, victim_loss.groups)
        assert fast is not None and fast.chain is None  # the autograd path of the factored engine
        images = torch.randn(2, 2, *SHAPE, generator=torch.Generator().manual_seed(3))
        labels = target.labels.view(2, 2)
        shared = tuple(target.shared_gradient[n] for n in victim_loss.names)
        grads, losses, _ = fast.step(images, labels, shared)
        expected_grads, (expected_losses, _) = torch.func.vmap(
            torch.func.grad_and_value(victim_loss, has_aux=True))(images, labels, shared)
        torch.testing.assert_close(losses, expected_losses, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads, expected_grads, atol=1e-5, rtol=1e-3)
        # its aux loss must be a batch mean: registered without saying so, it is left to vmap
        rules.register_module_rule(Jitter, role="composite")
        assert FactoredMatching.build(target, config, victim_loss.matched, victim_loss.names, victim_loss.groups) is None
    finally:
        rules._RULES.pop(Jitter, None)
    with pytest.raises(ValueError, match="only Conv2d and Linear"):
        rules.register_module_rule(Jitter, role="factored")


# --- stochastic models: each victim's noise from its own stream, one sample per image ------------


@pytest.mark.parametrize("client", [GradientClient(batch=2), GradientClient(batch=2, aggregate=2),
                                    FedAvgClient(batch=2, steps=2, lr=0.1)], ids=repr)
def test_with_a_bottleneck_in_training_a_victim_draws_the_same_noise_batched_alone_and_on_every_engine(client):
    net = tiny_cnn(defense=CVB(kernel=3)).train()
    target, _ = target_for(client, victims=3, net=net)
    config = MatchingConfig(plateau_patience=2, stop_patience=4)
    runs = {}
    for factored in (True, False):
        config.factored = factored
        together = gradient_matching(target, config, seeds=[5, 6, 7], max_iterations=4, labels=target.labels)
        single = gradient_matching(alone(target, 1), config, seeds=[6], max_iterations=4,
                                   labels=alone(target, 1).labels)
        per_victim = client.images_per_victim()
        torch.testing.assert_close(single.images, together.images[per_victim : 2 * per_victim], atol=1e-4, rtol=0)
        runs[factored] = together
    if client.is_mean_gradient():  # the factored engine ran: it draws each image's noise as vmap does
        torch.testing.assert_close(runs[True].images, runs[False].images, atol=1e-4, rtol=0)
    config.vectorized = False  # the per-victim loop
    loop = gradient_matching(target, config, seeds=[5, 6, 7], max_iterations=4, labels=target.labels)
    torch.testing.assert_close(loop.images, runs[False].images, atol=1e-4, rtol=0)


def test_a_victims_upload_noise_is_its_own_in_any_batch():
    net = tiny_cnn(defense=CVB(kernel=3)).train()
    images, labels = data(6)
    client = FedAvgClient(batch=1, steps=2, lr=0.5, aggregate=1)
    both = shared_gradients(net, NoDefense(), images[:4], labels[:4], seeds=[11, 12], client=client)
    second = shared_gradients(net, NoDefense(), images[2:4], labels[2:4], seeds=[12], client=client)
    assert all(torch.equal(both[n][1], second[n][0]) for n in both)
    other = shared_gradients(net, NoDefense(), images[2:4], labels[2:4], seeds=[13], client=client)
    assert any(not torch.equal(other[n][0], second[n][0]) for n in other)  # noise that changes with the seed


def test_leaderboard_paper_compares_a_batched_clients_row_for_accuracy_only():
    from gileak import paper
    from gileak.runner import RowSource

    cell = " | ".join(paper._canonical(kind, text) for kind, text in
                      (("dataset", "cifar10"), ("model", "cnn"), ("defense", "none")))
    ig = paper._canonical("attack", "ig")
    full = {"victims": 128, "iterations": 20000, "rounds": 300, "patience": 40, "attack_at": "final"}
    rows = [{"dataset": "d", "model": "m", "defense": "none", "client": "gradient", "attack": "ig",
             "ssim_mean": 0.9, "asr": 100.0, "accuracy_mean": 0.6},
            {"dataset": "d", "model": "m", "defense": "none", "client": "gradient(batch=4)", "attack": "ig",
             "ssim_mean": 0.1, "asr": 0.0, "accuracy_mean": 0.6}]
    sources = {("d", "m", "none", "gradient", "ig"): RowSource({cell}, {ig}, {0, 1, 2}),
               ("d", "m", "none", "gradient(batch=4)", "ig"):
                   RowSource({cell}, {f'{ig} @ gradient{{"aggregate":1,"batch":4}}'}, {0, 1, 2})}
    single, batched = paper.compare(rows, sources, full)
    assert "ssim" in single.values  # the paper's threat model: its privacy figures
    assert "ssim" not in batched.values and "accuracy" in batched.values  # a batch is another attack setting


def test_a_defenses_own_step_replaces_each_steps_gradient_and_its_transform_applies_to_the_upload():
    """The rule in every protocol: client_gradient (DP-SGD's kind) replaces a training step's
    gradient; transform_gradient applies once, to what is uploaded."""
    from gileak import Defense
    from gileak.threat import client_loss, trainable_state

    class Doubled(Defense):
        name = "doubled"

        def client_gradient(self, net, images, labels, generator=None):
            params, frozen = trainable_state(net)
            gradient = torch.func.grad(lambda p: client_loss(net, {**p, **frozen}, images, labels,
                                                             update_running_stats=False))(params)
            return {name: 2 * value for name, value in gradient.items()}

        def transform_gradient(self, gradient, generator=None):
            return {name: value + 1 for name, value in gradient.items()}

    net = tiny_cnn().train()
    images, labels = data(4)
    plain = GradientClient(batch=4).upload(net, NoDefense(), images, labels)
    defended = GradientClient(batch=4).upload(net, Doubled(), images, labels)
    assert_uploads_close(defended, {n: 2 * v + 1 for n, v in plain.items()})
    lr = 0.1
    one_step = FedAvgClient(batch=4, steps=1, lr=lr).upload(net, Doubled(), images, labels)
    assert_uploads_close(one_step, {n: -lr * 2 * v + 1 for n, v in plain.items()})  # + 1 once, on the update
