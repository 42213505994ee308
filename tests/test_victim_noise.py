"""Per-victim randomness (gileak.noise): with a variational bottleneck in training mode, victim
i's shared gradient, and its reconstruction by every attack in every engine, are the same
whether it is attacked in a batch of three or alone with the same seed — and the engines agree
with each other, since each draws a victim's noise from its own stream in the same order."""

import dataclasses

import pytest
import torch
from torch import nn

from gileak.bottlenecks import ConvBottleneck, PrecodeBottleneck
from gileak.default_plugins.attacks import CPL, DLG, IDLG, Ignore, InvertingGradients
from gileak.default_plugins.defenses import DPSGD, NoDefense
from gileak.engine import MatchingConfig, gradient_matching
from gileak.engine import lbfgs
from gileak.engine.lbfgs import LBFGSConfig, lbfgs_matching
from gileak.engine.matching import factored_engine, make_victim_loss
from gileak.nets import first_stochastic_cut
from gileak.noise import VictimStreams, predrawn, record_draws, standard_normal, stream_seed, uniform
from gileak.threat import Target, shared_gradients

SHAPE = (1, 6, 6)
SEEDS = [10, 11, 12]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(defense: str) -> nn.Module:
    """A convolution, a bottleneck (CVB on the feature map, PRECODE on the flattened features)
    and a classifier, in training mode: every forward samples."""
    torch.manual_seed(0)
    if defense == "cvb":
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), ConvBottleneck((4, 6, 6), 3, 2, beta=0.1),
                            nn.Flatten(), nn.Linear(144, 3))
    else:
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            PrecodeBottleneck((144,), 4, beta=0.1), nn.Linear(144, 3))
    return net.train()


def victims(net, seeds=SEEDS):
    images = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1])
    return images, labels, shared_gradients(net, NoDefense(), images, labels, seeds=seeds)


def target_of(net, gradients, labels, index):
    return Target(net, {k: v[index] for k, v in gradients.items()}, SHAPE, 3, labels=labels[index])


def attack_with(name: str, engine: str, target: Target, seeds: list[int], monkeypatch):
    """The attack's engine call as its Attack class makes it, on the engine asked for."""
    if name in ("ig", "ignore"):
        keep = tuple(first_stochastic_cut(target.net, SHAPE)) if name == "ignore" else None
        config = MatchingConfig(lr=0.1, minmax=False, keep=keep, plateau_patience=2, stop_patience=50,
                                factored=engine == "factored", vectorized=engine != "loop")
        victim_loss = make_victim_loss(target, config)
        assert (factored_engine(target, config, victim_loss) is not None) == (engine == "factored")
        return gradient_matching(target, config, seeds=seeds, max_iterations=6, labels=target.labels)
    config = {"dlg": LBFGSConfig(optimise_labels=True), "idlg": LBFGSConfig(),
              "cpl": LBFGSConfig(label_weight=0.01)}[name]
    config = dataclasses.replace(config, vectorized=engine != "loop", minmax=False)
    if engine == "vmap":
        monkeypatch.setattr(lbfgs, "factored_engine", lambda *args: None)
    labels = None if name == "dlg" else target.labels
    result = lbfgs_matching(target, config, seeds=seeds, max_iterations=4, labels=labels)
    if engine != "loop":
        assert lbfgs.last_run["engine"] == engine and not lbfgs.last_run["reused"]
    return result


ENGINES = {"ig": ("factored", "vmap", "loop"), "ignore": ("factored", "vmap", "loop"),
           "dlg": ("vmap", "loop"), "idlg": ("factored", "vmap", "loop"), "cpl": ("factored", "vmap", "loop")}
CASES = [(attack, engine) for attack, engines in ENGINES.items() for engine in engines]


@pytest.mark.parametrize("defense", ["cvb", "precode"])
def test_a_victims_shared_gradient_is_the_same_in_a_batch_and_alone(defense):
    net = tiny_net(defense)
    images, labels, batch = victims(net)
    alone = shared_gradients(net, NoDefense(), images[1:2], labels[1:2], seeds=[SEEDS[1]])
    for name in batch:
        torch.testing.assert_close(batch[name][1], alone[name][0], rtol=0, atol=0)
    other = shared_gradients(net, NoDefense(), images[1:2], labels[1:2], seeds=[99])
    assert not torch.equal(other["0.weight"], alone["0.weight"])  # the seed's noise is really drawn
    net.eval()  # deterministic: the seed no longer matters
    still = shared_gradients(net, NoDefense(), images[1:2], labels[1:2], seeds=[99])
    torch.testing.assert_close(still["0.weight"], shared_gradients(net, NoDefense(), images[1:2], labels[1:2],
                                                                   seeds=[7])["0.weight"], rtol=0, atol=0)


def test_a_dp_victim_with_a_bottleneck_gets_the_same_upload_in_a_batch_and_alone():
    net = tiny_net("cvb")
    images, labels = torch.rand(3, *SHAPE), torch.tensor([0, 1, 2])
    dp = DPSGD(clip=1.0, sigma=0.5)
    batch = shared_gradients(net, dp, images, labels, seeds=SEEDS)
    alone = shared_gradients(net, dp, images[2:], labels[2:], seeds=SEEDS[2:])
    torch.testing.assert_close(batch["2.decoder.weight"][2], alone["2.decoder.weight"][0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("defense", ["cvb", "precode"])
@pytest.mark.parametrize(("attack", "engine"), CASES)
def test_a_victim_attacked_in_a_batch_matches_it_attacked_alone(defense, attack, engine, monkeypatch):
    net = tiny_net(defense)
    _, labels, gradients = victims(net)
    together = attack_with(attack, engine, target_of(net, gradients, labels, [0, 1, 2]), SEEDS, monkeypatch)
    alone = attack_with(attack, engine, target_of(net, gradients, labels, [1]), SEEDS[1:2], monkeypatch)
    torch.testing.assert_close(together.images[1:2], alone.images, atol=1e-4, rtol=0)
    assert together.final_loss[1] == pytest.approx(alone.final_loss[0], rel=1e-4)
    assert together.iterations[1] == alone.iterations[0]
    if attack == "dlg":
        assert together.labels[1] == alone.labels[0]


@pytest.mark.parametrize("defense", ["cvb", "precode"])
@pytest.mark.parametrize("attack", ["ig", "ignore", "idlg", "cpl", "dlg"])
def test_the_engines_agree_on_a_stochastic_model(defense, attack, monkeypatch):
    """Each engine draws victim i's noise from its stream in the same order, so they agree as
    they do on a deterministic model (the L-BFGS reference loop, torch.optim.LBFGS, included)."""
    net = tiny_net(defense)
    _, labels, gradients = victims(net)
    target = target_of(net, gradients, labels, [0, 1, 2])
    results = {}
    for engine in ENGINES[attack]:
        with monkeypatch.context() as patch:
            results[engine] = attack_with(attack, engine, target, SEEDS, patch)
    # The strong-Wolfe search's cubic interpolation turns a last-bit difference of the engines'
    # summation order into ~1e-3 in a pixel now and then (lbfgs.py's docstring; the same holds
    # for deterministic models); different noise would move the whole image.
    atol, rel = (1e-4, 1e-4) if attack in ("ig", "ignore") else (5e-3, 1e-3)
    first, *others = results.values()
    for other in others:
        torch.testing.assert_close(other.images, first.images, atol=atol, rtol=0)
        assert other.final_loss == pytest.approx(first.final_loss, rel=rel, abs=1e-6)


def test_the_attack_draws_other_noise_than_the_victims_own_step():
    """An attack drawing the victim's own noise would be an oracle: the upload and attack streams
    of a seed, and the initial image (seeded by the seed itself), share no numbers."""
    seeds = {stream_seed(11, "upload"), stream_seed(11, "attack"), 11}
    assert len(seeds) == 3
    upload = VictimStreams([11], "upload").draw([0], (50,))
    attack = VictimStreams([11], "attack").draw([0], (50,))
    image = torch.randn((50,), generator=torch.Generator().manual_seed(11))
    assert not torch.allclose(upload, attack) and not torch.allclose(attack, image)


def test_a_victims_stream_gives_the_same_rows_whatever_its_neighbours():
    streams = VictimStreams([1, 2, 3], "attack")
    like = torch.zeros(3, 2, 4)
    with streams.rows([0, 1, 2]):
        together = standard_normal(like)
    alone = VictimStreams([2], "attack")
    with alone.rows([0]):
        single = standard_normal(like[:1])
    torch.testing.assert_close(together[1:2], single, rtol=0, atol=0)
    with streams.rows([0, 1]), pytest.raises(RuntimeError, match="one row per sample"):
        standard_normal(like)  # three rows in a forward of two victims
    torch.manual_seed(0)
    outside = standard_normal(like)  # outside an engine: the global RNG, as torch.randn_like
    torch.manual_seed(0)
    torch.testing.assert_close(outside, torch.randn_like(like))


def test_predrawn_noise_serves_the_recorded_draws_in_order_and_refuses_others():
    def two_draws(x):
        return standard_normal(x) + uniform(x[:, :1])

    draws = record_draws(two_draws, torch.zeros(1, 3))
    assert [(kind, tuple(shape)) for kind, shape, _ in draws] == [("normal", (1, 3)), ("uniform", (1, 1))]
    noise = VictimStreams([5], "attack").predraw([0], draws, "cpu")
    with predrawn([n[0] for n in noise], [kind for kind, _, _ in draws]):
        out = two_draws(torch.zeros(1, 3))
    torch.testing.assert_close(out, noise[0][0] + noise[1][0])
    with predrawn([noise[0][0]], ["normal"]), pytest.raises(RuntimeError, match="more noise"):
        two_draws(torch.zeros(1, 3))
    with predrawn([torch.zeros(2, 3)], ["normal"]), pytest.raises(RuntimeError, match="recorded"):
        standard_normal(torch.zeros(1, 3))


class MaskedNoise(nn.Module):
    """A third-party stochastic module drawing through gileak.noise: a random mask (uniform)."""

    stochastic = True

    def forward(self, x):
        if not self.training:
            return x
        return x * (uniform(x) > 0.3) / 0.7


def test_a_third_party_stochastic_module_gets_per_victim_noise_through_gileak_noise():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), MaskedNoise(), nn.Linear(8, 3)).train()
    _, labels, gradients = victims(net)
    config = MatchingConfig(lr=0.1, minmax=False)
    target = target_of(net, gradients, labels, [0, 1, 2])
    assert factored_engine(target, config, make_victim_loss(target, config)) is None  # the vmap engine
    together = gradient_matching(target, config, seeds=SEEDS, max_iterations=5, labels=target.labels)
    alone = gradient_matching(target_of(net, gradients, labels, [1]), config, seeds=SEEDS[1:2], max_iterations=5,
                              labels=labels[1:2])
    torch.testing.assert_close(together.images[1:2], alone.images, atol=1e-5, rtol=0)
    looped = gradient_matching(target, dataclasses.replace(config, vectorized=False), seeds=SEEDS,
                               max_iterations=5, labels=target.labels)
    torch.testing.assert_close(looped.images, together.images, atol=1e-5, rtol=0)


def test_the_attack_classes_give_a_victim_the_same_result_alone_or_in_a_batch():
    """The wiring through the Attack classes (ignore's cut, exclude=, label modes) on the CVB net."""
    net = tiny_net("cvb")
    _, labels, gradients = victims(net)
    for attack in (Ignore(), InvertingGradients(exclude="4"), IDLG(labels="known", ignore_stochastic=True),
                   CPL(labels="known"), DLG(line_search=3)):
        together = attack.attack(target_of(net, gradients, labels, [0, 1, 2]), seeds=SEEDS, max_iterations=3)
        alone = attack.attack(target_of(net, gradients, labels, [2]), seeds=SEEDS[2:], max_iterations=3)
        torch.testing.assert_close(together.images[2:], alone.images, atol=1e-4, rtol=0)
        assert together.final_loss[2] == pytest.approx(alone.final_loss[0], rel=1e-4)
