"""Label recovery from the classifier's gradient: one label (iDLG) and the multiset of a batch's
labels with repeats (the bias rule and Wainakh et al.'s LLG), and label accuracy."""

import pytest
import torch
from torch import nn

from gileak.default_plugins.defenses import NoBias, NoDefense
from gileak.default_plugins.models import CNN, MLP
from gileak.engine.labels import label_accuracy, recover_label_counts, recover_labels
from gileak.threat import shared_gradients
from gileak.uploads import aggregate, batch_gradient, local_update, update_as_gradient

SHAPE = (3, 32, 32)
#: Batches with repeated labels, two victims per batch size.
BATCHES = {4: [[3, 3, 3, 1], [2, 2, 2, 2]], 6: [[0, 0, 5, 5, 5, 9], [3, 3, 3, 1, 1, 1]]}


def cnn(bias=True, seed=0):
    torch.manual_seed(seed)
    net = CNN().build(SHAPE, 10).train()
    if not bias:
        NoBias().apply(net)
    return net


def mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return MLP(width=32, bias=bias).build(SHAPE, 10).train()


def stacked_gradients(net, victims, images=None, seed=1):
    """Each victim's batch gradient (its labels given, random images), stacked (N, ...)."""
    generator = torch.Generator().manual_seed(seed)
    uploads = []
    for labels in victims:
        batch = images if images is not None else torch.rand(len(labels), *SHAPE, generator=generator)
        uploads.append(batch_gradient(net, NoDefense(), batch, torch.tensor(labels)))
    return {name: torch.stack([u[name] for u in uploads]) for name in uploads[0]}


def sorted_labels(victims):
    return torch.tensor(victims).sort(dim=1).values


@pytest.mark.parametrize("build", [cnn, mlp], ids=["cnn", "mlp"])
@pytest.mark.parametrize("size", sorted(BATCHES))
@pytest.mark.parametrize("estimate", ["model", "simple"])
def test_the_bias_rule_recovers_repeated_labels_exactly_at_initialisation(build, size, estimate):
    net = build()
    gradient = stacked_gradients(net, BATCHES[size])
    got = recover_label_counts(net, gradient, SHAPE, size, estimate=estimate)
    assert got.dtype == torch.long and got.shape == (2, size)
    assert torch.equal(got, sorted_labels(BATCHES[size]))
    assert label_accuracy(got, torch.tensor(BATCHES[size])) == [1.0, 1.0]


@pytest.mark.parametrize("build", [cnn, mlp], ids=["cnn", "mlp"])
def test_a_large_batch_of_three_classes_at_initialisation(build):
    # B = 48 over three classes: the sums of 48 predictions drift from uniform (the "simple"
    # estimate miscounts 2 of the MLP's 48 labels here); the softmax at the recovered mean
    # embedding stays within 1/2 of them.
    generator = torch.Generator().manual_seed(4)
    victims = [torch.randint(3, (48,), generator=generator).mul(3).tolist() for _ in range(2)]
    net = build()
    got = recover_label_counts(net, stacked_gradients(net, victims), SHAPE, 48)
    assert torch.equal(got, sorted_labels(victims))


def test_far_from_initialisation_the_model_estimate_is_exact_where_the_batch_shares_its_embedding():
    # Large classifier weights make predictions confident (far from uniform); one image
    # repeated gives every label the same embedding, which the gradient then reveals exactly.
    net = cnn()
    with torch.no_grad():
        net[-1].weight.mul_(200)
    image = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(2)).expand(6, -1, -1, -1)
    with torch.no_grad():
        probabilities = net(image[:1]).softmax(-1)[0]
    assert probabilities.max() > 0.5  # far from the uniform 0.1
    # The confidently predicted class k is in both batches, three times in one of them.
    k = int(probabilities.argmax())
    others = [c for c in range(10) if c != k]
    victims = [[k, k, k, others[0], others[0], others[1]], [others[2], others[2], k, others[3], others[3], others[3]]]
    gradient = stacked_gradients(net, victims, images=image)
    assert torch.equal(recover_label_counts(net, gradient, SHAPE, 6), sorted_labels(victims))
    # The uniform-prediction rule is the one that breaks there.
    simple = recover_label_counts(net, gradient, SHAPE, 6, estimate="simple")
    assert not torch.equal(simple, sorted_labels(victims))


def softmax_features_net():
    """Non-negative classifier inputs that sum to 1 for every input, and a zero classifier:
    exactly LLG's assumptions (a common feature sum S, uniform predictions)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 12), nn.Softmax(dim=1), nn.Linear(12, 10, bias=False))
    with torch.no_grad():
        net[-1].weight.zero_()
    return net


@pytest.mark.parametrize("size", sorted(BATCHES))
def test_llg_is_exact_where_its_assumptions_hold(size):
    net = softmax_features_net()
    gradient = stacked_gradients(net, BATCHES[size])
    got = recover_label_counts(net, gradient, SHAPE, size)  # auto: no bias, so llg
    assert torch.equal(got, sorted_labels(BATCHES[size]))


@pytest.mark.parametrize("build", [lambda: cnn(bias=False), lambda: mlp(bias=False)], ids=["cnn", "mlp"])
@pytest.mark.parametrize("estimate", ["model", "simple"])
def test_llg_recovers_distinct_labels_of_a_small_batch_at_initialisation(build, estimate):
    # B well below C: every label's row sum is negative, so stage 1 alone finds them.
    net = build()
    victims = [[7, 2, 5, 0], [1, 3, 8, 9]]
    got = recover_label_counts(net, stacked_gradients(net, victims), SHAPE, 4, estimate=estimate)
    assert torch.equal(got, sorted_labels(victims))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("build", [cnn, mlp], ids=["cnn", "mlp"])
def test_batch_size_one_agrees_with_recover_labels(build, bias):
    net = build(bias=bias)
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.rand(6, *SHAPE, generator=generator), torch.tensor([7, 2, 5, 0, 9, 7])
    gradient = shared_gradients(net, NoDefense(), images, labels)
    single = recover_labels(net, gradient, SHAPE)
    assert single.tolist() == labels.tolist()
    for estimate in ("model", "simple"):
        assert recover_label_counts(net, gradient, SHAPE, 1, estimate=estimate).squeeze(1).tolist() == single.tolist()


def test_labels_from_a_local_update_and_from_an_aggregate():
    net = cnn()
    generator = torch.Generator().manual_seed(5)
    images, labels = torch.rand(6, *SHAPE, generator=generator), torch.tensor([0, 0, 5, 5, 5, 9])
    # Two local steps of three images: the mean step gradient carries all six labels.
    update = local_update(net, NoDefense(), images, labels, steps=2, batch=3, lr=0.01)
    gradient = {n: g.unsqueeze(0) for n, g in update_as_gradient(update, lr=0.01, steps=2).items()}
    assert recover_label_counts(net, gradient, SHAPE, 6).tolist() == [[0, 0, 5, 5, 5, 9]]
    # Two clients of three images under secure aggregation: their six labels together.
    uploads = [batch_gradient(net, NoDefense(), images[:3], labels[:3]),
               batch_gradient(net, NoDefense(), images[3:], labels[3:])]
    gradient = {n: g.unsqueeze(0) for n, g in aggregate(uploads).items()}
    assert recover_label_counts(net, gradient, SHAPE, 6).tolist() == [[0, 0, 5, 5, 5, 9]]


def test_label_count_recovery_leaves_the_random_stream_and_the_model_alone():
    net = mlp(bias=False)  # llg with the model estimate runs the model on dummies
    gradient = stacked_gradients(net, BATCHES[4])
    state = {n: v.clone() for n, v in net.state_dict().items()}
    torch.manual_seed(11)
    recover_label_counts(net, gradient, SHAPE, 4)
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(after, torch.rand(3))
    assert all(torch.equal(state[n], v) for n, v in net.state_dict().items())


def test_clear_errors():
    no_classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    gradient = {"0.weight": torch.zeros(1, 4, 3, 3, 3), "0.bias": torch.zeros(1, 4)}
    with pytest.raises(ValueError, match="no fully connected layer"):
        recover_label_counts(no_classifier, gradient, SHAPE, 4)
    net = cnn(bias=False)
    gradient = stacked_gradients(net, BATCHES[4])
    with pytest.raises(ValueError, match="has no bias"):
        recover_label_counts(net, gradient, SHAPE, 4, method="bias")
    with pytest.raises(ValueError, match="batch_size"):
        recover_label_counts(net, gradient, SHAPE, 0)
    with pytest.raises(ValueError, match="unknown label-count method"):
        recover_label_counts(net, gradient, SHAPE, 4, method="yin")
    with pytest.raises(ValueError, match="unknown estimate"):
        recover_label_counts(net, gradient, SHAPE, 4, estimate="oracle")
    broken = dict(gradient, **{"10.weight": gradient["10.weight"] * float("nan")})
    with pytest.raises(ValueError, match="not finite"):
        recover_label_counts(net, broken, SHAPE, 4)
    unstacked = {n: g[0] for n, g in gradient.items()}
    with pytest.raises(ValueError, match="stacked over victims"):
        recover_label_counts(net, unstacked, SHAPE, 4)


def test_a_zero_gradient_still_gives_a_full_batch_of_labels():
    # Nothing to read (a pruned or vanished gradient): every method still returns B labels per
    # victim rather than failing or returning fewer; how good they are is label accuracy's job.
    for bias in (True, False):
        net = cnn(bias=bias)
        gradient = {n: torch.zeros(2, *p.shape) for n, p in net.named_parameters()}
        for estimate in ("model", "simple"):
            got = recover_label_counts(net, gradient, SHAPE, 5, estimate=estimate)
            assert got.shape == (2, 5) and ((got >= 0) & (got < 10)).all()


def test_label_accuracy_compares_multisets_per_victim():
    recovered = torch.tensor([[0, 0, 5], [1, 2, 3], [4, 4, 4]])
    true = torch.tensor([[5, 0, 1], [3, 2, 1], [4, 7, 7]])
    assert label_accuracy(recovered, true) == pytest.approx([2 / 3, 1.0, 1 / 3])
    assert label_accuracy(torch.tensor([2, 2]), torch.tensor([2, 3])) == [0.5]
    with pytest.raises(ValueError, match="should both be"):
        label_accuracy(recovered, true[:, :2])
    with pytest.raises(ValueError, match="never negative"):
        label_accuracy(torch.tensor([[-1]]), torch.tensor([[0]]))
