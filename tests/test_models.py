"""Model contracts beyond the CNN: the paper's MLP."""

import pytest
import torch

from gileak.default_plugins.attacks import Analytic, Ignore
from gileak.default_plugins.defenses import NoDefense, Precode
from gileak.default_plugins.models import MLP
from gileak.errors import NotApplicableError
from gileak.fl import FLConfig, federated_train
from gileak.nets import count_trainable, slots
from gileak.threat import Target, shared_gradients


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
