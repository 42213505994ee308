"""The vectorized engine: per-victim optimizer semantics and batch/alone equivalence."""

import pytest
import torch

from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import CNN
from gileak.engine import MatchingConfig, gradient_matching, total_variation
from gileak.engine.schedule import PerVictimAdam, PlateauAndStop
from gileak.nets import forward_order
from gileak.threat import Target, shared_gradients


def test_per_victim_adam_matches_torch_adam_and_respects_the_mask():
    torch.manual_seed(0)
    start = torch.randn(3, 5)
    lrs = torch.tensor([0.1, 0.5, 0.01])
    adam = PerVictimAdam(lrs.clone())
    ours = start.clone()
    references = [start[i].clone().requires_grad_(True) for i in range(3)]
    optimizers = [torch.optim.Adam([references[i]], lr=float(lrs[i])) for i in range(3)]
    for step in range(6):
        active = torch.tensor([True, step % 2 == 0, True])  # victim 1 sits out every other step
        grads = torch.stack([(r.detach() ** 3 - 1) for r in references])
        ours = adam.step(ours, grads, active)
        for i, (r, opt) in enumerate(zip(references, optimizers)):
            if active[i]:
                opt.zero_grad()
                r.grad = grads[i].clone()
                opt.step()
    torch.testing.assert_close(ours, torch.stack([r.detach() for r in references]))


def test_plateau_schedule_matches_reduce_lr_on_plateau():
    losses = [1.0, 0.9, 0.9, 0.95, 0.91, 0.92, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
    schedule = PlateauAndStop(1, factor=0.1, patience=2, stop_patience=100)
    lr = torch.ones(1)
    active = torch.ones(1, dtype=torch.bool)
    for loss in losses:
        reference.step(loss)
        lr, _, active = schedule.update(torch.tensor([loss]), lr, active)
        assert lr.item() == pytest.approx(optimizer.param_groups[0]["lr"])


def test_stopping_rules_stop_each_victim_on_its_own():
    schedule = PlateauAndStop(2, patience=100, stop_patience=3, min_loss=1e-5)
    lr, active = torch.ones(2), torch.ones(2, dtype=torch.bool)
    history = []
    for loss0, loss1 in [(1.0, 1.0), (1e-6, 0.9), (1e-6, 0.95), (1e-6, 0.95), (1e-6, 0.95)]:
        lr, _, active = schedule.update(torch.tensor([loss0, loss1]), lr, active)
        history.append(active.tolist())
    assert history[1] == [False, True]  # victim 0 is below min_loss
    assert history[-1] == [False, False]  # victim 1 made no progress for 3 iterations


def test_total_variation_of_a_constant_image_is_zero_and_of_a_checkerboard_is_two():
    assert total_variation(torch.full((1, 4, 4), 0.3)).item() == 0.0
    board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    assert total_variation(board[None].float()).item() == pytest.approx(2.0)


@pytest.fixture(scope="module")
def small_target():
    torch.manual_seed(0)
    net = CNN().build((3, 32, 32), 10)
    images = torch.rand(3, 3, 32, 32)
    labels = torch.tensor([1, 4, 7])
    gradients = shared_gradients(net, NoDefense(), images, labels)
    return net, gradients, labels


def _attack(net, gradients, labels, indices, seeds, vectorized=True, iterations=25):
    target = Target(net, {k: v[indices] for k, v in gradients.items()}, (3, 32, 32), 10, labels=labels[indices])
    config = MatchingConfig(lr=0.1, vectorized=vectorized, minmax=False)
    return gradient_matching(target, config, seeds=seeds, max_iterations=iterations, labels=labels[indices])


def test_a_victim_attacked_in_a_batch_matches_it_attacked_alone(small_target):
    net, gradients, labels = small_target
    together = _attack(net, gradients, labels, [0, 1, 2], seeds=[10, 11, 12])
    alone = _attack(net, gradients, labels, [1], seeds=[11])
    torch.testing.assert_close(together.images[1:2], alone.images, atol=1e-4, rtol=0)
    assert together.final_loss[1] == pytest.approx(alone.final_loss[0], rel=1e-4)


def test_vectorized_engine_matches_the_per_victim_loop(small_target):
    net, gradients, labels = small_target
    batched = _attack(net, gradients, labels, [0, 1, 2], seeds=[1, 2, 3])
    looped = _attack(net, gradients, labels, [0, 1, 2], seeds=[1, 2, 3], vectorized=False)
    torch.testing.assert_close(batched.images, looped.images, atol=1e-4, rtol=0)


def test_matching_the_true_gradient_makes_progress(small_target):
    net, gradients, labels = small_target
    short = _attack(net, gradients, labels, [0], seeds=[5], iterations=2)
    longer = _attack(net, gradients, labels, [0], seeds=[5], iterations=60)
    assert longer.final_loss[0] < 0.5 * short.final_loss[0]


def test_forward_order_follows_the_forward_pass_not_the_names():
    net = CNN().build((1, 32, 32), 10)
    order = forward_order(net, (1, 32, 32))
    assert order[0] == "0.weight" and order[-1].endswith("bias")
    assert order == [n for n, _ in net.named_parameters()]  # a Sequential runs in definition order
