"""What a client uploads (gileak.uploads): a batch's gradient, FedAvg's local update, secure
aggregation, and the attacker's differentiable simulation of the local steps."""

import pytest
import torch
import torch.nn.functional as F

from gileak.default_plugins.defenses import CVB, DPSGD, GradientCompression, NoDefense, Precode, Quantization
from gileak.default_plugins.models import CNN, MLP
from gileak.errors import ParamsError
from gileak.threat import client_gradient, trainable_state
from gileak.uploads import (
    aggregate,
    batch_gradient,
    local_batches,
    local_update,
    simulate_local_update,
    update_as_gradient,
)

SHAPE = (3, 32, 32)


def cnn(defense=None, seed=0, classes=10):
    torch.manual_seed(seed)
    net = CNN().build(SHAPE, classes)
    if defense is not None:
        defense.apply(net)
    return net


def batch(size, seed=1, shape=SHAPE, classes=10):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, *shape, generator=generator), torch.randint(classes, (size,), generator=generator)


def assert_close(got, expected, atol=1e-6, rtol=1e-5):
    assert list(got) == list(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=atol, rtol=rtol), (
            name, (got[name] - expected[name]).abs().max().item())


def snapshot(net):
    return {name: value.detach().clone() for name, value in net.state_dict().items()}


# --- gradient(batch=B) ------------------------------------------------------------------------


@pytest.mark.parametrize("defense", [None, CVB(kernel=3), Precode(position=2)])
def test_a_batch_gradient_is_the_mean_of_its_single_image_gradients(defense):
    # Bottlenecks in eval mode are deterministic; their KL term averages over the batch too.
    net = cnn(defense).train(defense is None)
    images, labels = batch(5)
    got = batch_gradient(net, NoDefense(), images, labels)
    singles = [client_gradient(net, NoDefense(), images[i : i + 1], labels[i : i + 1]) for i in range(5)]
    assert_close(got, {name: torch.stack([s[name] for s in singles]).mean(0) for name in got})


def test_batch_norm_couples_a_batch_and_its_gradient_is_the_batch_mean_loss_s():
    torch.manual_seed(0)
    net = MLP(width=16).build((1, 8, 8), 10).train()
    images, labels = batch(6, shape=(1, 8, 8))
    before = snapshot(net)
    got = batch_gradient(net, NoDefense(), images, labels)
    assert all(torch.equal(before[n], v) for n, v in net.state_dict().items())  # running statistics untouched

    # The guarantee: the gradient of the mean over the batch's per-image losses of ONE forward
    # with the batch's statistics, computed here image by image with plain autograd.
    params = [p for p in net.parameters()]
    net_copy_state = snapshot(net)
    per_image = []
    for i in range(6):
        losses = F.cross_entropy(net(images), labels, reduction="none")
        per_image.append(torch.autograd.grad(losses[i], params))
        net.load_state_dict(net_copy_state)  # this forward updated the running statistics
    names = [n for n, _ in net.named_parameters()]
    expected = {n: torch.stack([g[k] for g in per_image]).mean(0) for k, n in enumerate(names)}
    assert_close(got, expected)

    # ...which is not the mean of single-image steps: the statistics couple the images.
    singles = [client_gradient(net, NoDefense(), images[i : i + 1], labels[i : i + 1]) for i in range(6)]
    single_mean = {n: torch.stack([s[n] for s in singles]).mean(0) for n in got}
    assert (got["1.weight"] - single_mean["1.weight"]).abs().max() > 1e-3

    # In eval mode batch norm is a fixed affine map and the mean of single images holds again.
    net.eval()
    got = batch_gradient(net, NoDefense(), images, labels)
    singles = [client_gradient(net, NoDefense(), images[i : i + 1], labels[i : i + 1]) for i in range(6)]
    assert_close(got, {n: torch.stack([s[n] for s in singles]).mean(0) for n in got})


def test_batch_gradient_refuses_mismatched_or_empty_batches():
    net = cnn()
    images, labels = batch(3)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        batch_gradient(net, NoDefense(), images, labels[:2])
    with pytest.raises(ValueError, match="at least one image"):
        batch_gradient(net, NoDefense(), images[:0], labels[:0])


# --- fedavg(batch, steps, lr) -----------------------------------------------------------------


@pytest.mark.parametrize("defense", [NoDefense(), CVB(kernel=3), Precode(position=2), DPSGD(clip=1.0, sigma=0.3)],
                         ids=["none", "cvb", "precode", "dp"])
def test_one_local_step_uploads_minus_lr_times_the_batch_gradient(defense):
    net = cnn(defense).train()
    images, labels = batch(4)
    lr = 0.05
    torch.manual_seed(3)  # the bottlenecks' noise: the same draws in both calls
    expected = batch_gradient(net, defense, images, labels, torch.Generator().manual_seed(9))
    torch.manual_seed(3)
    got = local_update(net, defense, images, labels, steps=1, batch=4, lr=lr, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(got[n], -lr * g) for n, g in expected.items())
    assert_close(update_as_gradient(got, lr=lr, steps=1), expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("defense", [GradientCompression(ratio=0.9), Quantization(bits=4)], ids=["gc", "quant"])
def test_gc_and_quant_apply_once_to_the_uploaded_weight_change(defense):
    net = cnn().train()
    images, labels = batch(6)
    plain = local_update(net, NoDefense(), images, labels, steps=3, batch=2, lr=0.1)
    got = local_update(net, defense, images, labels, steps=3, batch=2, lr=0.1)
    expected = defense.transform_gradient(plain)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert any(not torch.equal(got[n], plain[n]) for n in plain)


def hand_unrolled_sgd(net, images, labels, batches, lr):
    """The reference: torch.optim.SGD on a copy of the net, one step per mini-batch, with
    plain autograd (batch norms would update their statistics here; the nets below have none)."""
    import copy

    local = copy.deepcopy(net)
    optimizer = torch.optim.SGD(local.parameters(), lr=lr)
    for positions in batches:
        optimizer.zero_grad()
        F.cross_entropy(local(images[positions]), labels[positions]).backward()
        optimizer.step()
    return {n: p.detach() - q.detach() for (n, p), (_, q) in zip(local.named_parameters(), net.named_parameters())}


def test_two_local_steps_are_two_hand_unrolled_sgd_steps_and_leave_the_net_alone():
    net = cnn().train()
    images, labels = batch(4)
    before = snapshot(net)
    got = local_update(net, NoDefense(), images, labels, steps=2, batch=2, lr=0.5)
    assert all(torch.equal(before[n], v) for n, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert_close(got, hand_unrolled_sgd(net, images, labels, [[0, 1], [2, 3]], lr=0.5), atol=1e-7)
    # A second step really moved on from the first: one step's upload is not half of it.
    one = local_update(net, NoDefense(), images[:2], labels[:2], steps=1, batch=2, lr=0.5)
    assert not torch.allclose(got["10.weight"], one["10.weight"], atol=1e-6)


def test_fewer_images_than_batch_times_steps_cycle_through_them_in_order():
    assert local_batches(6, steps=3, batch=2).tolist() == [[0, 1], [2, 3], [4, 5]]
    assert local_batches(3, steps=3, batch=2).tolist() == [[0, 1], [2, 0], [1, 2]]
    net = cnn().train()
    images, labels = batch(3)
    got = local_update(net, NoDefense(), images, labels, steps=3, batch=2, lr=0.2)
    assert_close(got, hand_unrolled_sgd(net, images, labels, [[0, 1], [2, 0], [1, 2]], lr=0.2), atol=1e-7)


@pytest.mark.parametrize(("data", "kwargs", "message"), [
    (1, dict(steps=1, batch=2, lr=0.1), "cannot fill a batch of 2"),
    (4, dict(steps=0, batch=2, lr=0.1), "steps must be a positive integer"),
    (4, dict(steps=1, batch=0, lr=0.1), "batch must be a positive integer"),
    (4, dict(steps=1.5, batch=2, lr=0.1), "steps must be a positive integer"),
    (4, dict(steps=1, batch=2, lr=float("nan")), "lr must be a positive finite number"),
    (4, dict(steps=1, batch=2, lr=0.0), "lr must be a positive finite number"),
])
def test_bad_local_training_parameters_are_parameter_errors(data, kwargs, message):
    images, labels = batch(data)
    with pytest.raises(ParamsError, match=message):
        local_update(cnn(), NoDefense(), images, labels, **kwargs)


def test_dp_noises_every_local_step_afresh_and_reproducibly():
    net = cnn().train()
    images, labels = batch(4)
    dp = DPSGD(clip=1.0, sigma=0.5)

    def run(seed):
        return local_update(net, dp, images, labels, steps=2, batch=2, lr=0.1, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.allclose(first["10.weight"], other["10.weight"])

    # The same by hand: DP-SGD's client step at the moving weights, one generator for both steps.
    generator = torch.Generator().manual_seed(7)
    clean = DPSGD(clip=1.0, sigma=0.0)
    worker = cnn().train()
    noises = []
    for positions in ([0, 1], [2, 3]):
        step = dp.client_gradient(worker, images[positions], labels[positions], generator)
        noises.append(torch.cat([(step[n] - g).flatten() for n, g in
                                 clean.client_gradient(worker, images[positions], labels[positions]).items()]))
        with torch.no_grad():
            for name, p in worker.named_parameters():
                p.sub_(0.1 * step[name])
    expected = {n: p.detach() - q.detach() for (n, p), (_, q) in zip(worker.named_parameters(), net.named_parameters())}
    assert_close(first, expected, atol=1e-7)
    # Each step drew its own noise, of std clip * sigma / batch.
    assert not torch.allclose(noises[0], noises[1])
    for noise in noises:
        assert noise.std().item() == pytest.approx(1.0 * 0.5 / 2, rel=0.05)


# --- aggregate=K -------------------------------------------------------------------------------


def test_aggregate_is_the_key_by_key_mean():
    net = cnn()
    images, labels = batch(6)
    upload = batch_gradient(net, NoDefense(), images, labels)
    assert_close(aggregate([upload] * 3), upload, atol=0, rtol=1e-6)
    other = batch_gradient(net, NoDefense(), images[:2], labels[:2])
    assert_close(aggregate([upload, other]), {n: (upload[n] + other[n]) / 2 for n in upload}, atol=0, rtol=1e-6)
    # Uploads stacked over victims average victim by victim.
    stacked = {n: torch.stack([upload[n], other[n]]) for n in upload}
    assert_close(aggregate([stacked, stacked]), stacked, atol=0, rtol=1e-6)


def test_aggregate_refuses_nothing_and_mismatched_uploads():
    with pytest.raises(ValueError, match="at least one upload"):
        aggregate([])
    with pytest.raises(ValueError, match="parameters"):
        aggregate([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}])
    with pytest.raises(ValueError, match="shape"):
        aggregate([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}])


# --- the attacker's simulation -----------------------------------------------------------------


def test_the_simulation_reproduces_the_local_update_on_true_data_bottleneck_noise_included():
    net = cnn(CVB(kernel=3)).train()  # stochastic: the same global stream gives the same noise
    images, labels = batch(6)
    torch.manual_seed(5)
    upload = local_update(net, NoDefense(), images, labels, steps=3, batch=2, lr=0.1)
    params, frozen = trainable_state(net)
    torch.manual_seed(5)
    simulated = simulate_local_update(net, params, frozen, images, labels, steps=3, batch=2, lr=0.1)
    assert_close(simulated, upload, atol=1e-7)


def test_the_simulation_is_differentiable_in_the_dummies_and_soft_labels():
    net = cnn().train()
    images, labels = batch(4)
    upload = local_update(net, NoDefense(), images, labels, steps=2, batch=2, lr=0.1)
    params, frozen = trainable_state(net)
    dummies = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    label_logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    simulated = simulate_local_update(net, params, frozen, dummies, label_logits, steps=2, batch=2, lr=0.1)
    distance = sum((simulated[n] - upload[n]).pow(2).sum() for n in upload)
    image_gradient, label_gradient = torch.autograd.grad(distance, (dummies, label_logits))
    for gradient in (image_gradient, label_gradient):
        assert torch.isfinite(gradient).all() and gradient.abs().max() > 0
    # Both steps shape the result: the second step's images get a gradient too.
    assert image_gradient[2:].abs().max() > 0


def test_the_simulation_vectorises_over_victims_with_vmap():
    net = cnn().train()
    params, frozen = trainable_state(net)
    victims = [batch(4, seed=s) for s in (1, 2)]
    uploads = [local_update(net, NoDefense(), x, y, steps=2, batch=2, lr=0.1) for x, y in victims]
    dummies = torch.rand(2, 4, *SHAPE, generator=torch.Generator().manual_seed(4))
    labels = torch.stack([y for _, y in victims])
    shared = {n: torch.stack([u[n] for u in uploads]) for n in uploads[0]}

    def distance(victim_dummies, victim_labels, victim_upload):
        simulated = simulate_local_update(net, params, frozen, victim_dummies, victim_labels, steps=2, batch=2, lr=0.1)
        return sum((simulated[n] - victim_upload[n]).pow(2).sum() for n in victim_upload)

    batched = torch.func.vmap(torch.func.grad_and_value(distance))(dummies, labels, shared)
    for i in range(2):
        alone = dummies[i].clone().requires_grad_(True)
        value = distance(alone, labels[i], uploads[i])
        (gradient,) = torch.autograd.grad(value, alone)
        assert torch.allclose(batched[1][i], value, rtol=1e-5)
        assert torch.allclose(batched[0][i], gradient, atol=1e-8, rtol=1e-4)


def test_the_simulation_vectorises_over_victims_through_a_stochastic_bottleneck():
    # Variational bottlenecks draw noise in every step: vmap needs randomness="different".
    net = cnn(CVB(kernel=3)).train()
    params, frozen = trainable_state(net)
    dummies, labels = torch.rand(2, 4, *SHAPE), torch.randint(10, (2, 4))

    def size(victim_dummies, victim_labels):
        simulated = simulate_local_update(net, params, frozen, victim_dummies, victim_labels, steps=2, batch=2, lr=0.1)
        return sum(v.pow(2).sum() for v in simulated.values())

    gradients, values = torch.func.vmap(torch.func.grad_and_value(size), randomness="different")(dummies, labels)
    assert torch.isfinite(gradients).all() and (gradients.flatten(1).abs().amax(1) > 0).all()
    assert torch.isfinite(values).all()
