"""Model contracts beyond the CNN: ResNet-18, the ViT and the MLP — layouts, parameter counts,
defenses at every position, batch norm in the victim step, the vectorized attack and FedAvg."""

import pytest
import torch
from torch.func import vmap

from gileak.default_plugins.attacks import CPL, Analytic, Ignore, InvertingGradients
from gileak.default_plugins.defenses import CVB, NoDefense, Precode
from gileak.default_plugins.models import MLP, ResNet18, ViT
from gileak.engine import MatchingConfig, gradient_matching
from gileak.engine.matching import make_victim_loss
from gileak.errors import NotApplicableError
from gileak.fl import FLConfig, federated_train
from gileak.nets import count_trainable, first_stochastic_cut, forward_order, slots
from gileak.threat import Target, shared_gradients

# Small variants keep the attack tests fast; the layout tests use the paper's sizes.
SMALL = {
    "resnet18": (lambda: ResNet18(width=8), (3, 16, 16)),
    "vit": (lambda: ViT(dim=16, heads=4, mlp_dim=32), (3, 8, 8)),
    "mlp": (lambda: MLP(width=32), (1, 8, 8)),
}


def mlp_target(bias=True, defense=None, n=2, width=32):
    torch.manual_seed(0)
    net = MLP(bias=bias, width=width).build((1, 8, 8), 10)
    defense = defense or NoDefense()
    defense.apply(net)
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 8][:n])
    net.train()
    gradients = shared_gradients(net, defense, images, labels)
    return Target(net=net, shared_gradient=gradients, input_shape=(1, 8, 8), num_classes=10, labels=labels), images


def test_mlp_layout_and_parameter_count():
    net = MLP().build((3, 32, 32), 10)
    linear = 3072 * 1024 + 1024 + 3 * (1024 * 1024 + 1024) + 1024 * 10 + 10
    batchnorm = 4 * 2 * 1024
    assert count_trainable(net) == linear + batchnorm
    assert {p: s.shape for p, s in slots(net).items()} == {p: (1024,) for p in (1, 2, 3, 4)}
    no_bias = MLP(bias=False).build((3, 32, 32), 10)
    assert all(m.bias is None for m in no_bias.modules() if isinstance(m, torch.nn.Linear))
    assert net(torch.rand(5, 3, 32, 32)).shape == (5, 10)


def test_a_single_sample_training_step_uses_running_statistics():
    net = MLP(width=16).build((1, 4, 4), 3).train()
    one = torch.rand(1, 1, 4, 4)
    out_train = net(one)
    net.eval()
    torch.testing.assert_close(out_train, net(one))


def test_analytic_is_exact_on_the_mlp_and_not_applicable_without_bias():
    target, images = mlp_target()
    result = Analytic().attack(target, seeds=[0, 1], max_iterations=1)
    torch.testing.assert_close(result.images, images, rtol=1e-3, atol=1e-4)
    target, _ = mlp_target(bias=False)
    with pytest.raises(NotApplicableError):
        Analytic().attack(target, seeds=[0, 1], max_iterations=1)


def test_precode_on_the_mlp_and_ignore_cuts_before_its_decoder():
    target, _ = mlp_target(defense=Precode(position=2, size=4))
    result = Ignore().attack(target, seeds=[0, 1], max_iterations=2)
    # positions 1-2: 2 x (Linear weight, bias + BatchNorm weight, bias) = 8, plus the encoder = 9 of 20
    assert "matched 9 of 20" in result.note
    assert result.images.shape == (2, 1, 8, 8)


def test_the_mlp_trains_with_fedavg():
    torch.manual_seed(0)
    net = MLP(width=32).build((1, 8, 8), 10)
    x, y = torch.rand(60, 1, 8, 8), torch.randint(0, 10, (60,))
    result = federated_train(net, NoDefense(), x, y, x[:10], y[:10], FLConfig(rounds=1, clients=2))
    assert result.rounds_run == 1 and 0 <= result.accuracy <= 1


# --- ResNet-18 and ViT --------------------------------------------------------------------------


def test_resnet18_layout_and_parameter_count():
    net = ResNet18().build((3, 32, 32), 10)
    assert count_trainable(net) == 11_173_962  # the usual CIFAR ResNet-18 for 10 classes
    assert {p: s.shape for p, s in slots(net).items()} == {
        1: (64, 32, 32), 2: (64, 32, 32), 3: (128, 16, 16), 4: (256, 8, 8), 5: (512, 4, 4)}
    assert {s.kind for s in slots(net).values()} == {"image"}
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    grouped = ResNet18(norm="group").build((3, 32, 32), 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in grouped.modules())
    assert count_trainable(grouped) == 11_173_962


def test_vit_layout_and_parameter_count():
    net = ViT().build((3, 32, 32), 10)
    embedding = 3 * 16 * 256 + 256 + 256 + 65 * 256
    block = 2 * 512 + (256 * 768 + 768) + (256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 256 + 256)
    assert count_trainable(net) == embedding + 4 * block + 512 + 256 * 10 + 10 == 3_191_562
    assert {p: (s.shape, s.kind) for p, s in slots(net).items()} == {p: ((65, 256), "tokens") for p in (1, 2, 3, 4)}
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_slot_shapes_match_the_features_that_flow_through_them():
    for make, shape in SMALL.values():
        net = make().build(shape, 10)
        seen = {}
        for position, slot in slots(net).items():
            slot.register_forward_hook(lambda m, i, o, p=position: seen.__setitem__(p, tuple(o.shape[1:])))
        net(torch.rand(2, *shape))
        assert seen == {p: s.shape for p, s in slots(net).items()}


@pytest.mark.parametrize("model", SMALL)
def test_precode_and_cvb_fit_every_position(model):
    make, shape = SMALL[model]
    for position in slots(make().build(shape, 10)):
        for defense in (Precode(position=position), CVB(position=position)):
            net = make().build(shape, 10)
            if model == "mlp" and defense.name == "cvb":
                with pytest.raises(NotApplicableError, match="convolution cannot take"):
                    defense.apply(net)
                continue
            defense.apply(net)
            assert net(torch.rand(2, *shape)).shape == (2, 10)


# --- victim step and attacks --------------------------------------------------------------------


def _target(model, defense, n=2, seed=0):
    make, shape = SMALL[model]
    torch.manual_seed(seed)
    net = make().build(shape, 10)
    defense.apply(net)
    net.train()
    images = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed + 1))
    labels = torch.tensor([3, 8, 1, 5][:n])
    gradients = shared_gradients(net, defense, images, labels)
    return Target(net=net, shared_gradient=gradients, input_shape=shape, num_classes=10, labels=labels), images


@pytest.mark.parametrize("defense", ["none", "cvb", "precode"])
@pytest.mark.parametrize("model", SMALL)
def test_every_model_and_defense_is_attacked_by_ig_and_ignore(model, defense):
    chosen = {"none": NoDefense(), "cvb": CVB(position=1), "precode": Precode(position=1)}[defense]
    if model == "mlp" and defense == "cvb":
        with pytest.raises(NotApplicableError):
            _target(model, chosen)
        return
    target, _ = _target(model, chosen)
    for attack in (InvertingGradients(), Ignore()):
        result = attack.attack(target, seeds=[0, 1], max_iterations=2)
        assert result.images.shape == (2, *target.input_shape) and torch.isfinite(result.images).all()
    cut = first_stochastic_cut(target.net, target.input_shape)
    if defense == "none":
        assert cut is None and "no stochastic module" in result.note
    else:  # the encoder is kept, its decoder and everything after it dropped
        net = target.net
        bottleneck = next(n for n, m in net.named_modules() if m is slots(net)[1]) + ".body.0."
        order = forward_order(net, target.input_shape)
        assert cut == order[: len(cut)] and cut[-1].startswith(bottleneck)
        assert order[len(cut)] == bottleneck + "decoder.weight"
        assert f"matched {len(cut)} of {len(target.params)}" in result.note


def test_the_victim_step_and_the_attack_leave_running_statistics_alone():
    target, _ = _target("resnet18", NoDefense())
    before = {n: b.clone() for n, b in target.net.named_buffers()}
    for attack in (InvertingGradients(), CPL()):  # CPL's label term calls the net outside the engine
        attack.attack(target, seeds=[0, 1], max_iterations=1)
    assert all(torch.equal(before[n], b) for n, b in target.net.named_buffers())


@pytest.mark.parametrize("model", SMALL)
def test_the_attack_sees_the_victims_gradient_at_the_true_image(model):
    """Victim step and dummy step normalise alike (batch statistics; the MLP's one-sample batch
    norm uses running statistics in both), so the true image matches its gradient exactly."""
    target, images = _target(model, NoDefense())
    victim_loss = make_victim_loss(target, MatchingConfig(tv_weight=0.0))
    shared = tuple(target.shared_gradient[n] for n in victim_loss.names)
    distance, _ = vmap(victim_loss, randomness="different")(images, target.labels, shared)
    torch.testing.assert_close(distance, torch.zeros(2), atol=1e-5, rtol=0)


def test_a_resnet18_victim_attacked_in_a_batch_matches_it_attacked_alone():
    target, _ = _target("resnet18", NoDefense(), n=3)

    def attack(indices, seeds):
        part = Target(target.net, {k: v[indices] for k, v in target.shared_gradient.items()}, target.input_shape,
                      10, labels=target.labels[indices])
        config = MatchingConfig(lr=0.1, minmax=False)
        return gradient_matching(part, config, seeds=seeds, max_iterations=4, labels=target.labels[indices])

    together = attack([0, 1, 2], [10, 11, 12])
    alone = attack([1], [11])
    torch.testing.assert_close(together.images[1:2], alone.images, atol=1e-4, rtol=0)
    assert together.final_loss[1] == pytest.approx(alone.final_loss[0], rel=1e-4)


def test_analytic_does_not_apply_to_resnet18_or_vit():
    for model in ("resnet18", "vit"):
        target, _ = _target(model, NoDefense())
        with pytest.raises(NotApplicableError):
            Analytic().attack(target, seeds=[0, 1], max_iterations=1)


def test_resnet18_trains_with_fedavg_and_updates_its_running_statistics():
    make, shape = SMALL["resnet18"]
    torch.manual_seed(0)
    net = make().build(shape, 10)
    x, y = torch.rand(40, *shape), torch.randint(0, 10, (40,))
    before = net[1].running_mean.clone()
    result = federated_train(net, NoDefense(), x, y, x[:8], y[:8], FLConfig(rounds=1, clients=2))
    assert result.rounds_run == 1 and 0 <= result.accuracy <= 1
    assert not torch.equal(before, net[1].running_mean)
