"""The batched L-BFGS of the DLG family (gileak/engine/lbfgs.py) against its reference, a
per-victim loop of torch.optim.LBFGS (`vectorized=False`): DLG's label optimisation (vmap),
iDLG on the paper's CNN (the factored engine), CPL on both engines, no line search, a history
that wraps around, victims that stop or stall at different iterations, victim groups, the
progress count, and a stochastic model."""

import dataclasses

import pytest
import torch
from test_attacks import cnn_target, tiny_mlp_target

from gileak.default_plugins.attacks import DLG, IDLG
from gileak.default_plugins.defenses import CVB, NoDefense
from gileak.default_plugins.models import CNN
from gileak.engine import lbfgs
from gileak.engine.lbfgs import LBFGSConfig, lbfgs_matching
from gileak.engine.matching import initial_images
from gileak.threat import Target, shared_gradients


def both(target, config, seeds, iterations, labels):
    """(reference, batched) reconstructions with the same arguments."""
    reference = lbfgs_matching(target, dataclasses.replace(config, vectorized=False), seeds=seeds,
                               max_iterations=iterations, labels=labels)
    batched = lbfgs_matching(target, config, seeds=seeds, max_iterations=iterations, labels=labels)
    return reference, batched


def assert_same(reference, batched, atol=1e-4, rtol=1e-4):
    """Same iterations and labels; images to `atol`, best losses to `rtol` (and 1e-7 absolute:
    a loss near 1e-8 is float noise of gradients that match to ~1e-4)."""
    assert batched.iterations == reference.iterations
    torch.testing.assert_close(batched.images, reference.images, atol=atol, rtol=0)
    torch.testing.assert_close(torch.tensor(batched.final_loss, dtype=torch.float64),
                               torch.tensor(reference.final_loss, dtype=torch.float64), rtol=rtol, atol=1e-7)
    assert batched.labels.tolist() == reference.labels.tolist()


def three_mlp_victims():
    """The tiny MLP with three victims (its helper has labels for two)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Sigmoid(), torch.nn.Linear(12, 4))
    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3, 0])
    gradients = shared_gradients(net, NoDefense(), images, labels)
    return Target(net=net, shared_gradient=gradients, input_shape=(1, 4, 4), num_classes=4, labels=labels)


def test_config_defaults_to_the_batched_solver():
    assert LBFGSConfig().vectorized is True


@pytest.mark.parametrize("line_search", [True, False])
def test_dlg_with_label_optimisation_matches_the_reference(line_search):
    target, _ = tiny_mlp_target()
    config = LBFGSConfig(optimise_labels=True, line_search=line_search, minmax=False)
    reference, batched = both(target, config, [0, 1], 20, None)
    assert lbfgs.last_run["engine"] == "vmap"  # label logits are variables: vmap(grad) over victims
    assert_same(reference, batched)
    assert batched.labels.tolist() == [1, 3]
    assert batched.final_loss[0] < 1e-4  # it made progress: not a comparison of two idle runs


def test_idlg_on_the_cnn_takes_the_factored_engine_and_matches_the_reference():
    target, _ = cnn_target(n=3)
    config = LBFGSConfig(minmax=False)
    reference, batched = both(target, config, [0, 1, 2], 5, target.labels)
    assert lbfgs.last_run["engine"] == "factored"
    # L-BFGS amplifies float summation order: after the tiny first step (t = 1/|g|_1) the first
    # curvature pair y = g' - g is a small difference of large gradients; the vmap engine (the
    # reference's per-victim arithmetic, batched) differs from the loop by ~7e-5 here too.
    assert_same(reference, batched, atol=3e-4)
    # one evaluation per victim-iteration, plus each victim's first: the trial point's gradient
    # is where the next step starts (torch evaluates twice per iteration)
    assert lbfgs.last_run["evaluations"] <= 3 + sum(batched.iterations)
    start = initial_images(target.input_shape, [0, 1, 2], "randn", "cpu").clamp(0, 1)
    assert (batched.images - start).abs().max() > 1e-2  # the victims moved


@pytest.mark.parametrize("engine", ["factored", "vmap"])
def test_cpl_matches_the_reference_on_both_engines(engine, monkeypatch):
    if engine == "vmap":
        monkeypatch.setattr(lbfgs, "factored_engine", lambda *args: None)
    target = three_mlp_victims()
    config = LBFGSConfig(label_weight=0.5, minmax=False)
    reference, batched = both(target, config, [4, 5, 6], 10, target.labels)
    assert lbfgs.last_run["engine"] == engine
    assert_same(reference, batched)
    without = lbfgs_matching(target, dataclasses.replace(config, label_weight=0.0), seeds=[4, 5, 6],
                             max_iterations=10, labels=target.labels)
    assert (without.images - batched.images).abs().max() > 1e-3  # the label term is in the objective


def test_a_history_shorter_than_the_run_wraps_around_as_torch_drops_its_oldest_pairs():
    target, _ = tiny_mlp_target()
    config = LBFGSConfig(history=3, optimise_labels=True, minmax=False)
    reference, batched = both(target, config, [0, 1], 12, None)
    assert_same(reference, batched)
    longer = lbfgs_matching(target, dataclasses.replace(config, history=100, vectorized=False), seeds=[0, 1],
                            max_iterations=12, labels=None)
    assert (longer.images - reference.images).abs().max() > 1e-3  # the history size matters here


def test_victims_stopping_or_stalling_at_different_iterations_match_the_reference():
    """Victim 0's shared gradient is its own starting dummy's: loss ~0 at once, it stops after
    one iteration. With DLG, victim 1 (seed 1) stalls in a local minimum: its full step is
    rejected by the line search and it stays there until the end, as in torch."""
    target, _ = tiny_mlp_target()
    start = initial_images(target.input_shape, [0], "randn", "cpu")
    own = shared_gradients(target.net, NoDefense(), start, target.labels[:1])
    gradients = {n: torch.cat([own[n], g[1:]]) for n, g in target.shared_gradient.items()}
    stopper = Target(net=target.net, shared_gradient=gradients, input_shape=target.input_shape, num_classes=4,
                     labels=target.labels)
    reference, batched = both(stopper, LBFGSConfig(minmax=False), [0, 1], 12, stopper.labels)
    assert reference.iterations == [1, 12]
    assert_same(reference, batched)

    dlg = LBFGSConfig(optimise_labels=True, minmax=False)
    reference, batched = both(target, dlg, [0, 1], 40, None)
    assert reference.final_loss[1] > 0.1 and reference.iterations == [40, 40]
    assert_same(reference, batched)
    assert lbfgs.last_run["evaluations"] < 2 + sum(batched.iterations) - 10  # the stalled one is not re-evaluated


def test_victim_groups_give_the_same_result_and_progress_adds_up(monkeypatch):
    target = three_mlp_victims()
    config = LBFGSConfig(minmax=False)
    counted = []
    whole = lbfgs_matching(target, config, seeds=[1, 2, 3], max_iterations=7, labels=target.labels,
                           progress=counted.append)
    assert sum(counted) == 7 and len(counted) == 7 and lbfgs.last_run["groups"] == 1
    monkeypatch.setattr(lbfgs, "HISTORY_MEMORY", 1)  # one victim per group
    counted.clear()
    grouped = lbfgs_matching(target, config, seeds=[1, 2, 3], max_iterations=7, labels=target.labels,
                             progress=counted.append)
    assert lbfgs.last_run["groups"] == 3 and sum(counted) == 7
    torch.testing.assert_close(grouped.images, whole.images)
    assert grouped.final_loss == pytest.approx(whole.final_loss, rel=1e-4)


def test_progress_reports_the_remainder_when_every_victim_stops_early():
    target = three_mlp_victims()
    counted = []
    result = lbfgs_matching(target, LBFGSConfig(min_loss=1e9), seeds=[1, 2, 3], max_iterations=9,
                            labels=target.labels, progress=counted.append)
    assert result.iterations == [1, 1, 1]
    assert sum(counted) == 9 and counted[0] == 1


def test_a_stochastic_model_runs_with_independent_noise_and_finite_results():
    torch.manual_seed(0)
    net = CNN().build((3, 32, 32), 10)
    CVB(position=1).apply(net)
    net.train()
    target, _ = cnn_target(n=2, net=net)
    for attack in (IDLG(labels="known"), DLG()):
        result = attack.attack(target, seeds=[0, 1], max_iterations=3)
        assert not lbfgs.last_run["reused"]  # evaluated afresh at x every step, as torch does
        assert lbfgs.last_run["evaluations"] > sum(result.iterations)
        assert torch.isfinite(result.images).all() and all(torch.isfinite(torch.tensor(result.final_loss)))
    twice = [IDLG(labels="known").attack(target, seeds=[0, 1], max_iterations=3) for _ in range(2)]
    torch.testing.assert_close(twice[0].images, twice[1].images)  # its noise is seeded


def test_a_rejected_first_step_is_retried_with_the_full_step_as_torch_does(monkeypatch):
    """A made-up landscape along w (|w| = 1, |w|_1 = 4): f = 100 + slope (w.x) + a bump a quarter
    below the start. torch's first step (t = 1/|g|_1 = 1/4) lands on the bump and is rejected;
    its second (t = lr = 1, d = -g) clears it, so that victim must not be held after its first
    rejection. Victim 1 has no bump; victim 2 a zero gradient (torch returns at once, every step)."""
    shape = (1, 4, 4)
    w = torch.full((16,), 0.25)
    seeds = [3, 4, 5]
    start = initial_images(shape, seeds, "randn", "cpu").flatten(1) @ w
    centres = torch.stack([start[0] - 0.25, start[1] + 50.0, start[2] + 50.0])
    slopes = torch.tensor([1.0, 1.0, 0.0])

    def made_up_loss(target, matching):
        def victim_loss(image, label, shared):
            centre, slope = shared[0][0], shared[0][1]
            u = (image.flatten() * w).sum()
            total = 100.0 + slope * u + torch.exp(-((u - centre) / 0.05) ** 2)
            return total, (total,)

        victim_loss.names = ["landscape"]
        return victim_loss

    monkeypatch.setattr(lbfgs, "make_victim_loss", made_up_loss)
    monkeypatch.setattr(lbfgs, "factored_engine", lambda *args: None)
    target, _ = tiny_mlp_target()
    made_up = Target(net=target.net, shared_gradient={"landscape": torch.stack([centres, slopes], dim=1)},
                     input_shape=shape, num_classes=4, labels=torch.tensor([0, 1, 2]))
    one = lbfgs_matching(made_up, LBFGSConfig(minmax=False), seeds=seeds, max_iterations=2, labels=made_up.labels)
    assert one.final_loss[0] == pytest.approx(100.0 + float(start[0]), abs=1e-4)  # the first step was rejected
    reference, batched = both(made_up, LBFGSConfig(minmax=False), seeds, 5, made_up.labels)
    assert reference.final_loss[0] < 100.0 + float(start[0]) - 0.9  # and the second taken
    assert reference.iterations == [5, 5, 5] and reference.final_loss[2] == pytest.approx(100.0)
    assert_same(reference, batched)


def test_dropout_in_training_mode_counts_as_stochastic():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Dropout(0.5), torch.nn.Sigmoid(),
                              torch.nn.Linear(12, 4))
    images = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])
    target = Target(net=net, shared_gradient=shared_gradients(net, NoDefense(), images, labels), input_shape=(1, 4, 4),
                    num_classes=4, labels=labels)
    lbfgs_matching(target, LBFGSConfig(), seeds=[0, 1], max_iterations=3, labels=labels)
    assert not lbfgs.last_run["reused"]
    net.eval()  # deterministic: each victim-iteration takes one evaluation (+ each victim's first)
    result = lbfgs_matching(target, LBFGSConfig(), seeds=[0, 1], max_iterations=3, labels=labels)
    assert lbfgs.last_run["reused"] and lbfgs.last_run["evaluations"] <= 2 + sum(result.iterations)
