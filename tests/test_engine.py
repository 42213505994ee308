"""The vectorized engine: per-victim optimizer semantics and batch/alone equivalence."""

import math

import pytest
import torch

from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import CNN
from gileak.engine import MatchingConfig, gradient_matching, total_variation
from gileak.engine.schedule import PerVictimAdam, PlateauAndStop
from gileak.nets import forward_order
from gileak.threat import Target, shared_gradients


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("rates", [(0.1, 0.5, 0.1), (0.1, 0.1, 0.1)])
def test_per_victim_adam_matches_torch_adam_and_respects_the_mask(fused, rates):
    torch.manual_seed(0)
    start = torch.randn(3, 5)
    lrs = torch.tensor(rates)  # victims 0 and 2 share a learning rate (one fused call)
    adam = PerVictimAdam(lrs.clone(), fused=fused)
    ours = start.clone()
    references = [start[i].clone().requires_grad_(True) for i in range(3)]
    optimizers = [torch.optim.Adam([references[i]], lr=float(lrs[i])) for i in range(3)]
    for step in range(8):
        # all in step for two steps (with one rate: one fused call for the batch), then
        # victim 1 sits out every other step
        active = torch.tensor([True, step < 2 or step % 2 == 0, True])
        grads = torch.stack([(r.detach() ** 3 - 1) for r in references])
        ours = adam.step(ours, grads, active)
        for i, (r, opt) in enumerate(zip(references, optimizers)):
            if active[i]:
                opt.zero_grad()
                r.grad = grads[i].clone()
                opt.step()
    torch.testing.assert_close(ours, torch.stack([r.detach() for r in references]), atol=1e-4, rtol=1e-4)


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


def assert_same_trajectory(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4, flips: float = 1e-3) -> None:
    """Reconstructions of two engines agree to `atol`, except at most a `flips` share of pixels:
    engines sum in different orders, and the signed update (Adam of the gradient's sign, as the
    paper's code does) turns a last-bit difference in a near-zero gradient component into a
    full learning-rate step for that pixel."""
    off = (a - b).abs() > atol
    assert off.float().mean() <= flips, f"{int(off.sum())} of {off.numel()} pixels differ by more than {atol}"


def test_vectorized_engine_matches_the_per_victim_loop(small_target):
    net, gradients, labels = small_target
    batched = _attack(net, gradients, labels, [0, 1, 2], seeds=[1, 2, 3])
    looped = _attack(net, gradients, labels, [0, 1, 2], seeds=[1, 2, 3], vectorized=False)
    assert_same_trajectory(batched.images, looped.images)


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


# --- the factored fast path (gileak.engine.fast) ---------------------------------------------

from torch.func import grad_and_value, vmap  # noqa: E402

from gileak.engine.fast import FactoredMatching, _low_rank  # noqa: E402
from gileak.engine.matching import factored_engine, make_victim_loss  # noqa: E402


def _steps(target, config, images):
    """One step's image gradients, losses and (traced) cosines by vmap and by the fast path."""
    victim_loss = make_victim_loss(target, config)
    shared = tuple(target.shared_gradient[n] for n in victim_loss.names)
    labels = target.labels
    reference, (losses, aux) = vmap(grad_and_value(victim_loss, has_aux=True), randomness="different")(
        images, labels, shared)
    fast = factored_engine(target, config, victim_loss)
    assert isinstance(fast, FactoredMatching)
    grads, fast_losses, cosines = fast.step(images, labels, shared)
    return (reference, losses, aux[1] if config.trace else None), (grads, fast_losses, cosines), (fast, shared)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("trace", [False, True])
def test_factored_step_matches_the_vmap_step(small_target, distance, trace):
    net, gradients, labels = small_target
    target = Target(net, gradients, (3, 32, 32), 10, labels=labels)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    config = MatchingConfig(distance=distance, trace=trace)
    (ref, ref_loss, ref_cos), (ours, loss, cos), _ = _steps(target, config, images)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    if trace:
        torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-6)


def _unpacked(kept: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, shape) -> torch.Tensor:
    """`_compacted`'s matrices back at their rows and columns of (N, a, b) zeros."""
    n, a, b = shape
    full = kept.new_zeros(n, a + 1, b + 1)
    for i in range(n):
        full[i, rows[i].unsqueeze(1), columns[i].unsqueeze(0)] = kept[i]
    return full[:, :a, :b]


def test_compacted_matrices_leave_out_only_zero_rows_and_columns():
    """Each victim's all-zero rows and columns left out (their own numbers of them; padding to
    the most kept with an index past the end and zeros), a NaN kept; products through the
    kept indices are the full products (the terms left out are zeros)."""
    from gileak.engine.fast import _compacted, _picked, _placed

    generator = torch.Generator().manual_seed(0)
    m = torch.randn(4, 6, 9, generator=generator)
    m[0, [1, 4]] = 0  # victim 0: two zero rows
    m[1, :, [0, 3, 8]] = 0  # victim 1: three zero columns
    m[2] = 0  # victim 2: nothing at all
    m[3, 2, 5] = math.nan  # victim 3: a NaN, kept
    m[3, :, 6] = 0
    m[3, 2, 6] = -0.0
    kept, rows, columns = _compacted(m)
    assert kept.shape == (4, 6, 9) and rows.shape == (4, 6) and columns.shape == (4, 9)  # the most any keeps
    assert rows[0].tolist() == [0, 2, 3, 5, 6, 6] and rows[2].tolist() == [6] * 6  # padded with 6
    assert columns[1].tolist() == [1, 2, 4, 5, 6, 7, 9, 9, 9] and columns[3].tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert torch.equal(_unpacked(kept, rows, columns, m.shape).nan_to_num(), m.nan_to_num())
    assert kept[3].isnan().sum() == 1
    u, g = torch.randn(4, 9, generator=generator), torch.randn(4, 6, generator=generator)
    mu = _placed(torch.bmm(kept, _picked(u, columns).unsqueeze(2)).squeeze(2), rows, 6)
    gm = _placed(torch.bmm(_picked(g, rows).unsqueeze(1), kept).squeeze(1), columns, 9)
    torch.testing.assert_close(mu[:3], torch.bmm(m, u.unsqueeze(2)).squeeze(2)[:3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gm[:3], torch.bmm(g.unsqueeze(1), m).squeeze(1)[:3], rtol=1e-6, atol=1e-6)
    assert mu[3, 2].isnan() and not mu[3, [0, 1, 3, 4, 5]].isnan().any() and mu[2].eq(0).all()
    none = _compacted(torch.zeros(0, 6, 9))
    assert [tuple(t.shape) for t in none] == [(0, 0, 0), (0, 0), (0, 0)]


def test_euclidean_one_position_layers_are_rank_one_products_formed_in_float64(small_target, monkeypatch):
    """Euclidean matching of a one-position layer (the CNN's last convolution and classifier)
    does not materialise G = g u^T: ||G − S||^2 = |g|^2 |u|^2 − 2 g.(S u) + ||S||^2 in float64
    from S in float64. The same step as the materialised one (EUCLIDEAN_GHOST_MEMORY 0), and
    float64 models — where float64 gives the cancelling terms no extra digits — stay
    materialised."""
    from gileak.engine import fast as fast_module

    net, gradients, labels = small_target
    target = Target(net, gradients, (3, 32, 32), 10, labels=labels)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    config = MatchingConfig(distance="euclidean", trace=True)
    victim_loss = make_victim_loss(target, config)
    shared = tuple(target.shared_gradient[n] for n in victim_loss.names)
    rank_one = factored_engine(target, config, victim_loss)
    assert [layer.ghost for layer in rank_one.layers] == [False, False, True, True]
    # S = L R^T + E: rank 1, E kept without its zero rows and columns (ReLU's)
    left, right, kept, constants, rows, columns = rank_one._prepare(shared)[0]["6.weight"]
    s = gradients["6.weight"].flatten(2).double()
    assert kept.shape[1] < 64 and kept.shape[2] < 800
    residual = _unpacked(kept, rows, columns, s.shape)
    assert left.shape[2] == 1 and residual.abs().max() < 1e-5 * s.abs().max()
    rebuilt = torch.bmm(left.double(), right.double().transpose(1, 2)) + residual.double()
    assert (rebuilt - s).abs().max() < 1e-12 * s.abs().max()
    grads, losses, cosines = rank_one.step(images, labels, shared)
    part_grads, part_losses, _ = rank_one.step(images, labels, shared, torch.tensor([2, 0]))
    torch.testing.assert_close(part_grads, grads[[2, 0]])
    torch.testing.assert_close(part_losses, losses[[2, 0]])
    noisy = {**gradients, "6.weight": gradients["6.weight"] + 1e-3 * torch.randn_like(gradients["6.weight"])}
    noisy_target = Target(net, noisy, (3, 32, 32), 10, labels=labels)
    noisy_shared = tuple(noisy[n] for n in victim_loss.names)
    full_rank = factored_engine(noisy_target, config, victim_loss)
    layout = full_rank._prepare(noisy_shared)[0]["6.weight"]  # not of low rank: S in float64
    assert len(layout) == 3 and layout[0].dtype == torch.float64
    assert torch.equal(_unpacked(*layout, s.shape), noisy["6.weight"].flatten(2).double())  # noise: nothing left out
    noisy_step = full_rank.step(images, labels, noisy_shared)
    monkeypatch.setattr(fast_module, "EUCLIDEAN_GHOST_MEMORY", 0)
    for engine, inputs, step in ((factored_engine(target, config, victim_loss), shared, (grads, losses, cosines)),
                                 (factored_engine(noisy_target, config, victim_loss), noisy_shared, noisy_step)):
        assert not any(layer.ghost for layer in engine.layers)
        for ours, theirs in zip(step, engine.step(images, labels, inputs)):
            assert ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())
    monkeypatch.undo()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        wide_net = CNN().build((3, 32, 32), 10)
        wide = Target(wide_net, shared_gradients(wide_net, NoDefense(), images[:2].double(), labels[:2]),
                      (3, 32, 32), 10, labels=labels[:2])
        wide_engine = factored_engine(wide, config, make_victim_loss(wide, config))
    finally:
        torch.set_default_dtype(previous)
    assert wide_engine is not None and not any(layer.ghost for layer in wide_engine.layers)


@pytest.mark.parametrize("layout", ["residual", "float64"])
@pytest.mark.parametrize("gap", [1e-1, 1e-2, 1e-3, 1e-4])
def test_rank_one_euclidean_distance_is_exact_where_float32_g_minus_s_is_not(gap, layout):
    """Near a match (||G − S|| = gap ||S||) the rank-one distance — from S = L R^T + E or from
    S in float64 — is closer to the exact distance of the same float32 factors than float32's
    materialised G − S: 9-170,000x (the residual layout) and 200-3,000,000x (float64)."""
    from gileak.engine.fast import _compacted, _rank_one_euclidean, _residual_layout

    generator = torch.Generator().manual_seed(0)
    g0, u = torch.randn(4, 64, generator=generator), torch.randn(4, 800, generator=generator)
    s = g0.unsqueeze(2) * u.unsqueeze(1)  # (n, fan_out, fan_in): a single image's gradient
    direction = torch.randn(4, 64, generator=generator)
    g = g0 + gap * direction * g0.norm(dim=1, keepdim=True) / direction.norm(dim=1, keepdim=True)
    exact = (g.double().unsqueeze(2) * u.double().unsqueeze(1) - s.double()).square().flatten(1).sum(1)
    s64 = s.double()
    shared = _residual_layout(s) if layout == "residual" else _compacted(s64)
    assert len(shared) == (6 if layout == "residual" else 3)
    ours = _rank_one_euclidean(g, u, shared, s64.square().flatten(1).sum(1))["distance"]
    float32 = (g.unsqueeze(2) * u.unsqueeze(1) - s).square().flatten(1).sum(1).double()
    ours_error, float32_error = ((ours - exact).abs() / exact).max(), ((float32 - exact).abs() / exact).max()
    # measured: residual 5e-13 / 5e-11 / 6e-9 / 6e-7 (E u's float32 rounding, ~1e-14 of ||S||^2),
    # float64 3e-14 ... 2e-8, float32 9e-8 / 9e-8 / 5e-7 / 5e-6
    assert ours_error < 1e-11 / gap**2 and ours_error < float32_error / 5


def test_factored_step_of_a_subset_of_victims_matches_the_full_step(small_target):
    net, gradients, labels = small_target
    target = Target(net, gradients, (3, 32, 32), 10, labels=labels)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for distance in ("cosine", "euclidean"):
        _, (grads, losses, _), (fast, shared) = _steps(target, MatchingConfig(distance=distance), images)
        other = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        other_grads, other_losses, _ = fast.step(other, labels, shared)
        # a subset, the same subset again (its shared gradients gathered once) at other points, another subset
        for index, points, expected in ((torch.tensor([0, 2]), images, (grads, losses)),
                                        (torch.tensor([0, 2]), other, (other_grads, other_losses)),
                                        (torch.tensor([1, 2]), images, (grads, losses)),
                                        (torch.tensor([1]), other, (other_grads, other_losses))):
            part_grads, part_losses, _ = fast.step(points, labels, shared, index)
            torch.testing.assert_close(part_grads, expected[0][index])
            torch.testing.assert_close(part_losses, expected[1][index])


def test_factored_engine_matches_vmap_and_the_per_victim_loop(small_target):
    net, gradients, labels = small_target
    target = Target(net, gradients, (3, 32, 32), 10, labels=labels)
    assert factored_engine(target, MatchingConfig(), make_victim_loss(target, MatchingConfig())) is not None
    results = {}
    for name, engine in {"factored": {}, "vmap": {"factored": False}, "loop": {"vectorized": False}}.items():
        config = MatchingConfig(lr=0.1, minmax=False, **engine)
        results[name] = gradient_matching(target, config, seeds=[1, 2, 3], max_iterations=25, labels=labels)
    for other in ("vmap", "loop"):
        assert_same_trajectory(results["factored"].images, results[other].images)
        # a flipped pixel moves the cosine distance (in [0, 2]) by up to ~1e-3
        assert results["factored"].final_loss == pytest.approx(results[other].final_loss, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("defense", ["cvb", "precode"])
@pytest.mark.parametrize("ignore", [False, True])
def test_factored_step_serves_defended_models_and_the_ignore_attack(defense, ignore):
    from gileak.default_plugins.defenses import CVB, Precode
    from gileak.nets import first_stochastic_cut

    torch.manual_seed(0)
    net = CNN().build((3, 32, 32), 10)
    (CVB(position=[2]) if defense == "cvb" else Precode(position=1)).apply(net)
    net.eval()  # deterministic bottlenecks: the two engines see the same sample
    images = torch.rand(2, 3, 32, 32)
    labels = torch.tensor([3, 8])
    target = Target(net, shared_gradients(net, NoDefense(), images, labels), (3, 32, 32), 10, labels=labels)
    keep = tuple(first_stochastic_cut(net, (3, 32, 32))) if ignore else None
    dummies = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    (ref, ref_loss, _), (ours, loss, _), _ = _steps(target, MatchingConfig(keep=keep), dummies)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_factored_step_draws_independent_noise_per_victim():
    from gileak.default_plugins.defenses import CVB

    torch.manual_seed(0)
    net = CNN().build((3, 32, 32), 10)
    CVB(position=[2]).apply(net)  # training mode: the bottleneck samples
    image, label = torch.rand(1, 3, 32, 32), torch.tensor([2])
    one = shared_gradients(net, NoDefense(), image, label)
    gradients = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in one.items()}
    target = Target(net, gradients, (3, 32, 32), 10, labels=label.repeat(2))
    config = MatchingConfig()
    fast = factored_engine(target, config, make_victim_loss(target, config))
    shared = tuple(gradients[n] for n in make_victim_loss(target, config).names)
    grads, _, _ = fast.step(torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1), target.labels, shared)
    assert not torch.allclose(grads[0], grads[1])  # same victim twice, different samples


def test_models_the_fast_path_does_not_cover_fall_back_to_vmap():
    from gileak.default_plugins.models import MLP

    torch.manual_seed(0)
    net = MLP(width=16).build((3, 8, 8), 10)  # batch norm: the victims of a batch would interact
    images, labels = torch.rand(2, 3, 8, 8), torch.tensor([0, 5])
    target = Target(net, shared_gradients(net, NoDefense(), images, labels), (3, 8, 8), 10, labels=labels)
    assert factored_engine(target, MatchingConfig(), make_victim_loss(target, MatchingConfig())) is None
    auto = gradient_matching(target, MatchingConfig(lr=0.1, minmax=False), seeds=[1, 2], max_iterations=3,
                             labels=labels)
    plain = gradient_matching(target, MatchingConfig(lr=0.1, minmax=False, factored=False), seeds=[1, 2],
                              max_iterations=3, labels=labels)
    torch.testing.assert_close(auto.images, plain.images)


def test_low_rank_factors_reproduce_a_rank_one_shared_gradient_and_decline_a_full_rank_one():
    generator = torch.Generator().manual_seed(0)
    rank_one = torch.randn(4, 64, 1, generator=generator) * torch.randn(4, 1, 800, generator=generator)
    left, right = _low_rank(rank_one)
    assert left.shape == (4, 64, 1) and right.shape == (4, 800, 1)
    torch.testing.assert_close(left @ right.transpose(1, 2), rank_one, rtol=1e-5, atol=1e-6)
    assert _low_rank(torch.randn(4, 64, 800, generator=generator)) is None


# --- the plain-chain step (derivatives written out) and its split across threads -----------

def _chain_net():
    from torch import nn

    from gileak.nets import Slot

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Slot(1, (8, 12, 12)),  # 3 channels in: fold; 8: transposed conv
        nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2), nn.ReLU(), nn.Identity(),
        nn.Flatten(), nn.Linear(6 * 6 * 6, 12), nn.ReLU(), nn.Linear(12, 10),
    )


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("keep", [False, True])
def test_chain_step_matches_the_autograd_path_and_vmap(distance, keep):
    torch.manual_seed(0)
    net = _chain_net()
    images, labels = torch.rand(3, 3, 12, 12), torch.tensor([2, 5, 9])
    target = Target(net, shared_gradients(net, NoDefense(), images, labels), (3, 12, 12), 10, labels=labels)
    config = MatchingConfig(distance=distance, trace=True, keep=("3.weight", "7.bias") if keep else None)
    dummies = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    (ref, ref_loss, ref_cos), (ours, loss, cos), (fast, shared) = _steps(target, config, dummies)
    assert fast.chain is not None
    fast.chain, fast._prepared = None, None  # the autograd path of the same engine
    plain, plain_loss, plain_cos = fast.step(dummies, labels, shared)
    for grads in (ours, plain):
        torch.testing.assert_close(grads, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    for losses in (loss, plain_loss):
        torch.testing.assert_close(losses, ref_loss, rtol=1e-5, atol=1e-6)
    for cosines in (cos, plain_cos):
        torch.testing.assert_close(cosines, ref_cos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("few", [True, False])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_the_chain_steps_ways_for_few_and_many_victims_agree(small_target, monkeypatch, few, distance):
    """Few victims: convolutions through the unfolded input and one matmul; many: the
    library's (transposed) convolutions. The threshold forced each way: the same step as vmap,
    on the paper's CNN and on a chain with padding, dilation and an image input of 3 channels."""
    from gileak.engine import fast

    monkeypatch.setattr(fast, "_FEW_COLUMNS", 2**62 if few else 0)
    net, gradients, labels = small_target
    torch.manual_seed(0)
    chain = _chain_net()
    small, small_labels = torch.rand(3, 3, 12, 12), torch.tensor([2, 5, 9])
    targets = [(Target(net, gradients, (3, 32, 32), 10, labels=labels), torch.rand(3, 3, 32, 32)),
               (Target(chain, shared_gradients(chain, NoDefense(), small, small_labels), (3, 12, 12), 10,
                       labels=small_labels), torch.rand(3, 3, 12, 12))]
    for target, dummies in targets:
        (ref, ref_loss, _), (ours, loss, _), (fast_engine, _) = _steps(target, MatchingConfig(distance=distance),
                                                                       dummies)
        assert fast_engine.chain is not None
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_the_paper_cnn_takes_the_chain_step_and_a_bottleneck_does_not(small_target):
    from gileak.default_plugins.defenses import CVB

    net, gradients, labels = small_target
    target = Target(net, gradients, (3, 32, 32), 10, labels=labels)
    assert factored_engine(target, MatchingConfig(), make_victim_loss(target, MatchingConfig())).chain is not None
    torch.manual_seed(0)
    defended = CNN().build((3, 32, 32), 10)
    CVB(position=[2]).apply(defended)
    image, label = torch.rand(1, 3, 32, 32), torch.tensor([2])
    target = Target(defended, shared_gradients(defended, NoDefense(), image, label), (3, 32, 32), 10, labels=label)
    fast = factored_engine(target, MatchingConfig(), make_victim_loss(target, MatchingConfig()))
    assert fast is not None and fast.chain is None


@pytest.mark.parametrize("args", [
    {"kernel_size": (5, 5), "dilation": (1, 1), "padding": (0, 0), "stride": (2, 2)},
    {"kernel_size": (3, 2), "dilation": (2, 1), "padding": (1, 2), "stride": (1, 2)},
    {"kernel_size": (3, 3), "dilation": (1, 1), "padding": (0, 0), "stride": (1, 1)},
])
@pytest.mark.parametrize("size", [(2, 3, 9, 11), (2, 3, 20, 21), (1, 1, 7, 7)])
def test_fold_by_index_add_is_torchs_fold_bit_for_bit(args, size):
    """One index_add_ of the columns into the padded input adds what col2im adds, in its
    order: the same bits (padding, dilation and strides included; the index is cached)."""
    import torch.nn.functional as F

    from gileak.engine.fast import _fold

    cols = F.unfold(torch.randn(size), **args)
    for _ in range(2):  # the second time from the cached index
        cols = torch.randn_like(cols)
        assert torch.equal(_fold(cols, torch.Size(size), args), F.fold(cols, size[2:], **args))


@pytest.mark.parametrize("args", [
    {"kernel_size": (5, 5), "dilation": (1, 1), "padding": (0, 0), "stride": (2, 2)},
    {"kernel_size": (3, 2), "dilation": (2, 1), "padding": (1, 2), "stride": (1, 2)},
    {"kernel_size": (3, 3), "dilation": (1, 1), "padding": (1, 1), "stride": (1, 1)},
])
@pytest.mark.parametrize("size", [(2, 3, 9, 11), (2, 3, 32, 32), (2, 16, 14, 14)])  # short rows and long ones
def test_unfold_by_windows_or_index_is_torchs_unfold(args, size):
    """Both ways of `_unfold` (strided windows for long output rows, an index_select for short
    ones or a dilation), into a buffer or not, copy exactly F.unfold's columns."""
    import torch.nn.functional as F

    from gileak.engine.fast import _unfold

    x = torch.randn(size)
    expected = F.unfold(x, **args)
    buffer = torch.full((expected.shape[0] + 1, *expected.shape[1:]), math.nan)  # a larger, stale buffer
    assert torch.equal(_unfold(x, args), expected)
    assert torch.equal(_unfold(x, args, lambda shape: buffer[: shape[0]]), expected)


def test_vmap_runs_in_memory_sized_chunks_with_the_same_result(monkeypatch):
    """A large model's victims run through vmap in chunks (memory); chunking changes nothing."""
    from gileak.default_plugins.models import MLP
    from gileak.engine import matching
    from gileak.engine.matching import MatchingConfig, gradient_matching, vmap_chunk
    from gileak.threat import Target, shared_gradients

    torch.manual_seed(0)
    net = MLP(width=16).build((1, 6, 6), 4).train()
    images, labels = torch.rand(5, 1, 6, 6), torch.randint(4, (5,))
    target = Target(net, shared_gradients(net, NoDefense(), images, labels), (1, 6, 6), 4, labels=labels)
    config = MatchingConfig(factored=False)
    whole = gradient_matching(target, config, seeds=list(range(5)), max_iterations=4, labels=labels)
    assert vmap_chunk(target, 5) is None
    per_victim = matching.VMAP_COPIES * sum(p.numel() * 4 for p in target.params.values())
    monkeypatch.setattr(matching, "VMAP_MEMORY", 2 * per_victim)
    assert vmap_chunk(target, 5) == 2
    chunked = gradient_matching(target, config, seeds=list(range(5)), max_iterations=4, labels=labels)
    assert torch.allclose(whole.images, chunked.images, atol=1e-5)
