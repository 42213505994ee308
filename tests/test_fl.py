"""FedAvg simulation: averaging, partitioning, early stopping, and that training learns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gileak import data, fl
from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import CNN
from gileak.fl import FLConfig, evaluate, fedavg, federated_train


def _random_data(num_train=200, num_test=50, shape=(1, 32, 32), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.rand((num_train, *shape), generator=generator),
        torch.randint(0, 10, (num_train,), generator=generator),
        torch.rand((num_test, *shape), generator=generator),
        torch.randint(0, 10, (num_test,), generator=generator),
    )


def _batchnorm_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_fedavg_is_the_weighted_mean_of_parameters_and_float_buffers():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    states = []
    for fill, batches in ((1.0, 5), (5.0, 7)):
        state = {name: torch.full_like(value, fill) for name, value in net.state_dict().items()}
        state["1.num_batches_tracked"] = torch.tensor(batches)
        states.append(state)
    averaged = fedavg(states, [3, 1])
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(averaged[name], torch.full_like(states[0][name], 0.75 * 1.0 + 0.25 * 5.0))
    assert averaged["1.num_batches_tracked"].dtype == torch.long
    assert int(averaged["1.num_batches_tracked"]) == 5
    net.load_state_dict(averaged)  # the result is a loadable state of the same model


def test_fedavg_rejects_mismatched_or_zero_weights():
    state = {"w": torch.ones(2)}
    with pytest.raises(ValueError):
        fedavg([state, state], [1.0])
    with pytest.raises(ValueError):
        fedavg([state], [0.0])


def test_partition_covers_every_index_once_and_splits_keep_a_tenth_for_validation():
    parts = data.iid_partition(200, 10, seed=3)
    assert len(parts) == 10
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(200))
    assert all(torch.equal(a, b) for a, b in zip(parts, data.iid_partition(200, 10, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(parts, data.iid_partition(200, 10, seed=4)))
    for indices in parts:
        train, val = data.client_split(indices, 0.1, seed=3)
        assert (len(train), len(val)) == (18, 2)
        assert torch.equal(torch.cat([train, val]).sort().values, indices.sort().values)


def test_training_steps_through_client_loss_once_per_mini_batch(monkeypatch):
    calls = []
    real_client_loss = fl.client_loss

    def counting_client_loss(net, state, images, labels):
        calls.append(len(labels))
        return real_client_loss(net, state, images, labels)

    monkeypatch.setattr(fl, "client_loss", counting_client_loss)
    train_images, train_labels, test_images, test_labels = _random_data()
    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    config = FLConfig(rounds=1, batch_size=8, seed=0)
    federated_train(net, NoDefense(), train_images, train_labels, test_images, test_labels, config)
    # 10 clients with 18 training images each: batches of 8, 8, 2.
    assert calls == [8, 8, 2] * 10


def test_early_stopping_when_validation_loss_stops_improving():
    train_images, train_labels, test_images, test_labels = _random_data()
    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    rounds_seen = []
    config = FLConfig(rounds=10, lr=0.0, patience=2, seed=0)  # lr 0: the validation loss never moves
    result = federated_train(net, NoDefense(), train_images, train_labels, test_images, test_labels, config,
                             progress=rounds_seen.append)
    assert result.stopped_early
    assert result.rounds_run == 3 < config.rounds
    assert rounds_seen == [0, 1, 2]
    assert result.best_round == 0
    assert len(result.accuracy_curve) == len(result.val_loss_curve) == 3
    assert result.accuracy == result.accuracy_curve[-1] == result.accuracy_at_best_val


def test_batchnorm_statistics_are_averaged_and_runs_are_reproducible():
    train_images, train_labels, test_images, test_labels = _random_data(shape=(1, 8, 8))
    results, nets = [], []
    for _ in range(2):
        torch.manual_seed(0)
        net = _batchnorm_net()
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        results.append(federated_train(net, NoDefense(), train_images, train_labels, test_images, test_labels,
                                       FLConfig(rounds=2, seed=1)))
        nets.append(net)
    final = results[0].state_dict
    assert not torch.equal(final["1.running_mean"], initial["1.running_mean"])
    assert not torch.equal(final["0.weight"], initial["0.weight"])
    assert int(final["1.num_batches_tracked"]) == 2  # one batch per client per round
    for name, value in final.items():
        assert value.device.type == "cpu"
        assert torch.equal(value, results[1].state_dict[name])
        assert torch.equal(value, nets[0].state_dict()[name])  # the net holds the final global model


def test_client_indices_replace_the_partition():
    train_images, train_labels, test_images, test_labels = _random_data()
    clients = [torch.arange(0, 100), torch.arange(100, 150)]
    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    result = federated_train(net, NoDefense(), train_images, train_labels, test_images, test_labels,
                             FLConfig(rounds=1, seed=0), client_indices=clients)
    assert result.rounds_run == 1


def test_evaluate_reports_cross_entropy_and_accuracy():
    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    images, labels, _, _ = _random_data(num_train=30)
    net.train()
    loss, accuracy = evaluate(net, images, labels, batch_size=7)
    assert net.training  # restored to the mode it was in
    net.eval()
    with torch.no_grad():
        logits = net(images)
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_a_few_rounds_on_digits_beat_chance_by_far():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = F.interpolate(torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16, size=(32, 32),
                           mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    result = federated_train(net, NoDefense(), images[train], labels[train], images[test], labels[test],
                             FLConfig(rounds=8, seed=0))
    assert result.rounds_run == 8 and not result.stopped_early
    assert result.accuracy > 0.5  # chance is 0.1; about 0.8 after 8 rounds
    assert result.val_loss_curve[-1] < result.val_loss_curve[0]


def _small_cnn_data():
    train_x, train_y, test_x, test_y = _random_data(num_train=100, num_test=20, shape=(1, 32, 32))
    return train_x, train_y, test_x, test_y


def test_dp_training_reports_a_finite_epsilon_that_grows_with_rounds_and_falls_with_noise():
    from gileak.default_plugins.defenses import DPSGD

    data_ = _small_cnn_data()
    epsilons = {}
    for sigma, rounds in ((1.0, 1), (1.0, 2), (2.0, 2)):
        torch.manual_seed(0)
        net = CNN().build((1, 32, 32), 10)
        result = federated_train(net, DPSGD(sigma=sigma, clip=1.0), *data_,
                                 FLConfig(rounds=rounds, clients=2, batch_size=16))
        assert result.epsilon is not None and 0 < result.epsilon < float("inf")
        epsilons[(sigma, rounds)] = result.epsilon
    assert epsilons[(1.0, 2)] > epsilons[(1.0, 1)] > 0
    assert epsilons[(2.0, 2)] < epsilons[(1.0, 2)]
    torch.manual_seed(0)
    plain = federated_train(CNN().build((1, 32, 32), 10), NoDefense(), *data_, FLConfig(rounds=1, clients=2))
    assert plain.epsilon is None


def test_dp_noise_changes_what_training_learns():
    from gileak.default_plugins.defenses import DPSGD

    data_ = _small_cnn_data()
    states = []
    for sigma in (0.0, 5.0):
        torch.manual_seed(0)
        net = CNN().build((1, 32, 32), 10)
        states.append(federated_train(net, DPSGD(sigma=sigma, clip=1.0), *data_,
                                      FLConfig(rounds=1, clients=2, batch_size=16)).state_dict)
    assert not torch.allclose(states[0]["0.weight"], states[1]["0.weight"])


def test_upload_transforms_apply_to_each_clients_model_update():
    from gileak.default_plugins.defenses import GradientCompression

    data_ = _small_cnn_data()
    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    # one client: the global update is that client's pruned update
    federated_train(net, GradientCompression(ratio=0.9), *data_, FLConfig(rounds=1, clients=1))
    for name, param in net.named_parameters():
        changed = (param.detach() != start[name]).sum().item()
        assert changed <= param.numel() - int(param.numel() * 0.9), name


def test_snapshots_keep_the_initial_and_chosen_round_states():
    data_ = _small_cnn_data()
    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    result = federated_train(net, NoDefense(), *data_, FLConfig(rounds=2, clients=2), keep_rounds=(0, 1))
    assert set(result.snapshots) == {0, 1}
    torch.testing.assert_close(result.snapshots[0]["0.weight"], initial["0.weight"])
    assert not torch.equal(result.snapshots[1]["0.weight"], result.state_dict["0.weight"])
