"""The built-in defenses: parameter counts against the paper's Table II and Sec. IV, the
stochastic bottlenecks (marking, ignore cut, vmap randomness, KL), DP-SGD through Opacus,
gradient compression, quantisation and bias removal."""

import json
import math

import pytest
import torch
from torch import nn

from gileak.bottlenecks import ConvBottleneck, PrecodeBottleneck, cvb_reference_kl, gaussian_kl
from gileak.default_plugins.defenses import (CVB, DPSGD, GradientCompression, NoBias, Precode, Quantization,
                                             latent_channels)
from gileak.default_plugins.models import CNN
from gileak.errors import ParamsError
from gileak.nets import count_trainable, first_stochastic_cut, is_stochastic, slots
from gileak import registry
from gileak.threat import client_gradient, client_loss, trainable_state

SHAPE = (3, 32, 32)
CNN_PARAMS = 65_962


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These nets are tiny: one thread is as fast, and far faster on a busy machine, where
    CPU threads spin-waiting for each other turn milliseconds into seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(defense=None, shape=SHAPE, seed=0):
    torch.manual_seed(seed)
    net = CNN().build(shape, 10)
    if defense is not None:
        defense.apply(net)
    return net


def test_all_defenses_are_registered_with_descriptions():
    for name in ("none", "precode", "cvb", "dp", "gc", "quant", "nobias"):
        cls = registry.get("defense", name)
        assert cls.description and "\n" not in cls.description
        for _pname, _type, _default, help_text in cls.parameter_table():
            assert help_text


@pytest.mark.parametrize(("position", "total"), [(1, 141_226), (2, 104_362), (3, 72_106)])
def test_precode_parameter_counts_match_table_ii(position, total):
    net = build(Precode(position=position))
    assert count_trainable(net) == total
    bottleneck = slots(net)[position].body[0]
    hwc = math.prod(slots(net)[position].shape)
    assert bottleneck.size == slots(net)[position].shape[0] // 2
    assert total - CNN_PARAMS == 2 * hwc * bottleneck.size + bottleneck.size * hwc


def test_precode_explicit_size():
    net = build(Precode(position=1, size=32))
    assert count_trainable(net) - CNN_PARAMS == 3 * 16 * 14 * 14 * 32


@pytest.mark.parametrize(
    ("kernel", "added", "pct"), [(3, 2_432, 3.68), (5, 6_528, 9.9), (7, 12_672, 19.2), (1, 384, None)]
)
def test_cvb_parameter_counts(kernel, added, pct):
    net = build(CVB(kernel=kernel))
    assert count_trainable(net) - CNN_PARAMS == added == 2 * kernel**2 * 16 * 8 + 8 * 16
    if pct is not None:
        # The paper prints 3.68 / 9.9 / 19.2 % (truncated or rounded to its precision).
        assert 100 * added / CNN_PARAMS == pytest.approx(pct, abs=0.01 if pct < 10 else 0.05)


def test_cvb_several_positions_and_scale():
    assert CVB(position="1+3").params.position == (1, 3)
    assert CVB(position=2).params.position == (2,)
    assert CVB(position="2").params.position == (2,)
    assert CVB(position=[1, 2]).params.position == (1, 2)
    net = build(CVB(position="1+3", kernel=3))
    assert [type(m) for m in slots(net)[1].body] == [ConvBottleneck]
    assert [type(m) for m in slots(net)[3].body] == [ConvBottleneck]
    assert len(slots(net)[2].body) == 0
    expected = (2 * 9 * 16 * 8 + 8 * 16) + (2 * 9 * 64 * 32 + 32 * 64)
    assert count_trainable(net) - CNN_PARAMS == expected
    net = build(CVB(scale=0.25))
    assert slots(net)[1].body[0].latent_channels == 4
    net = build(CVB(scale=0.01))
    assert slots(net)[1].body[0].latent_channels == 1


def test_bad_positions_are_clear_errors():
    with pytest.raises(ParamsError, match=r"position 4.*1, 2, 3"):
        build(CVB(position=4))
    with pytest.raises(ParamsError, match=r"position 5.*1, 2, 3"):
        build(CVB(position="1+5"))
    with pytest.raises(ParamsError, match=r"position 0.*1, 2, 3"):
        build(Precode(position=0))
    with pytest.raises(ParamsError, match="position"):
        CVB(position="one+three")
    with pytest.raises(ParamsError, match="twice"):
        CVB(position="1+1")
    with pytest.raises(ParamsError):
        Quantization(bits=1)
    with pytest.raises(ParamsError):
        GradientCompression(ratio=1.5)
    with pytest.raises(ParamsError):
        DPSGD(clip=0)


@pytest.mark.parametrize("defense", [Precode(position=1), Precode(position=3), CVB(), CVB(position="1+2+3", kernel=3)])
def test_bottlenecks_keep_shapes_and_are_stochastic_in_train_mode_only(defense):
    net = build(defense)
    bottlenecks = [m for m in net.modules() if is_stochastic(m)]
    assert bottlenecks and all(m.decoder_prefixes == ("decoder",) for m in bottlenecks)
    for slot in slots(net).values():
        for module in slot.body:
            features = torch.rand(2, *slot.shape)
            assert module(features).shape == features.shape
    images = torch.rand(2, *SHAPE)
    net.train()
    assert net(images).shape == (2, 10)
    assert not torch.equal(net(images), net(images))
    net.eval()
    assert torch.equal(net(images), net(images))


def test_ignore_cut_keeps_encoder_drops_decoder_and_classifier():
    net = build(Precode(position=3))
    names = dict(net.named_parameters())
    cut = first_stochastic_cut(net, SHAPE)
    assert cut == ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias", "8.body.0.encoder.weight"]
    assert "8.body.0.decoder.weight" in names and "10.weight" in names
    net = build(CVB())
    assert first_stochastic_cut(net, SHAPE) == ["0.weight", "0.bias", "2.body.0.mu.weight", "2.body.0.sigma.weight"]
    assert first_stochastic_cut(build(), SHAPE) is None


@pytest.mark.parametrize("module", [PrecodeBottleneck((16, 5, 5), 8, 0.1), ConvBottleneck((16, 5, 5), 3, 8, 0.1)])
def test_vmap_different_randomness_draws_different_noise(module):
    module.train()
    same = torch.rand(1, 1, 16, 5, 5).expand(4, 1, 16, 5, 5)
    out = torch.func.vmap(module, randomness="different")(same)
    assert out.shape == same.shape
    assert not torch.allclose(out[0], out[1])
    out = torch.func.vmap(module, randomness="same")(same)
    assert torch.allclose(out[0], out[1])


def test_vmapped_client_gradients_differ_per_victim_with_a_bottleneck():
    net = build(CVB(kernel=3)).train()
    params, frozen = trainable_state(net)
    images = torch.rand(1, 1, *SHAPE).expand(3, 1, *SHAPE)
    labels = torch.zeros(3, 1, dtype=torch.long)

    def gradient(image, label):
        return torch.func.grad(lambda p: client_loss(net, {**p, **frozen}, image, label))(params)

    grads = torch.func.vmap(gradient, randomness="different")(images, labels)
    assert not torch.allclose(grads["2.body.0.decoder.weight"][0], grads["2.body.0.decoder.weight"][1])


def test_kl_is_nonnegative_zero_at_the_prior_and_becomes_aux_loss():
    assert gaussian_kl(torch.zeros(3, 8), torch.ones(3, 8)).item() == 0.0
    for _ in range(5):
        mu, sigma = torch.randn(4, 8), torch.rand(4, 8) * 3 + 1e-3
        assert gaussian_kl(mu, sigma).item() >= 0
    # Summed over the channels (dim 1), averaged over the batch and the positions: 8 channels of
    # KL 0.5 at every position of the first of two images.
    mu = torch.zeros(2, 8, 3, 3)
    mu[0] = 1.0
    assert gaussian_kl(mu, torch.ones_like(mu)).item() == pytest.approx(8 * 0.5 / 2)
    module = PrecodeBottleneck((16, 5, 5), 8, beta=0.5)
    module(torch.rand(3, 16, 5, 5))
    assert module.aux_loss.item() >= 0 and module.aux_loss.requires_grad


def test_the_cvb_reference_term_is_the_authors_on_a_hand_computed_tensor():
    """-1/2 sum_c (1 + s - mu^2 - e^s), averaged over batch and positions (their EncoderBase.loss)."""
    mu = torch.tensor([[[[0.0, 1.0]], [[2.0, 0.0]]]])  # (batch 1, channels 2, h 1, w 2)
    s = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.0]]]])
    # position 0: channel 1 gives -1/2 (1 + 0.5 - 4 - e^0.5); position 1: channel 0, -1/2 (1 + 1 - 1 - e)
    expected = ((2.5 + math.exp(0.5)) / 2 + (math.e - 1) / 2) / 2
    assert cvb_reference_kl(mu, s).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.4667508, rel=1e-6)
    # Smallest at s = 0 (sigma -> 0 noise), not at sigma = 1 as the Gaussian KL.
    zero = torch.zeros(1, 1, 1, 1)
    assert cvb_reference_kl(zero, zero).item() == 0.0
    assert cvb_reference_kl(zero, torch.ones_like(zero)).item() > 0


@pytest.mark.parametrize("kl", ["reference", "gaussian"])
def test_the_cvb_module_takes_its_term_from_its_own_sampling_sigma(kl):
    torch.manual_seed(0)
    module = ConvBottleneck((4, 3, 3), 3, 2, beta=0.3, kl=kl)
    with torch.no_grad():
        module.sigma.weight.mul_(40)  # raw outputs beyond the clip at +-5
    features = torch.randn(5, 4, 3, 3)
    module.train()
    module(features)
    raw = module.sigma(features)
    assert raw.abs().max() > 5
    mu, sigma = module.mu(features), torch.nn.functional.softplus(raw.clamp(-5, 5))
    if kl == "reference":
        term = (-0.5 * (1 + sigma - mu**2 - sigma.exp())).sum(1).mean()
    else:
        normal = torch.distributions.Normal
        term = torch.distributions.kl_divergence(normal(mu, sigma), normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(module.aux_loss, 0.3 * term)
    assert CVB().params.kl == "reference"
    assert build(CVB(kl=kl)).get_submodule("2.body.0").kl == kl
    with pytest.raises(ParamsError):
        CVB(kl="textbook")


def test_the_gaussian_term_is_torch_distributions_kl_summed_over_channels_averaged_over_the_rest():
    torch.manual_seed(1)
    mu, sigma = torch.randn(3, 5, 4, 2), torch.rand(3, 5, 4, 2) * 2 + 0.05
    normal = torch.distributions.Normal
    reference = torch.distributions.kl_divergence(normal(mu, sigma), normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl(mu, sigma), reference.sum(dim=1).mean())
    torch.testing.assert_close(gaussian_kl(mu[:, :, 0, 0], sigma[:, :, 0, 0]),
                               reference[:, :, 0, 0].sum(dim=1).mean())


def test_precode_takes_its_authors_kl_summed_over_k_averaged_over_the_batch_in_bits():
    torch.manual_seed(2)
    module = PrecodeBottleneck((6,), 4, beta=0.2)
    features = torch.randn(7, 6)
    module(features)
    mu, raw = module.encoder(features).chunk(2, dim=1)
    sigma = torch.nn.functional.softplus(raw)
    normal = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(normal(mu, sigma), normal(0.0, 1.0)).sum(dim=1).mean()
    torch.testing.assert_close(module.aux_loss, 0.2 * kl / math.log(2))
    # their expression, -1/2 (1 + 2 log sigma - mu^2 - sigma^2) summed over K, batch mean, / ln 2
    theirs = (-0.5 * (1 + 2 * sigma.log() - mu.pow(2) - sigma.pow(2))).sum(1).mean().div(math.log(2))
    torch.testing.assert_close(module.aux_loss, 0.2 * theirs)
    assert Precode().params.beta == 1e-3  # their VariationalBottleneck's default


@pytest.mark.parametrize(("channels", "scale", "latent"), [
    (16, 0.5, 8), (32, 0.5, 16), (64, 0.5, 32), (65, 0.5, 32), (11, 0.5, 5),  # the authors' c // 2
    (3, 0.5, 8), (6, 0.5, 8),  # the authors' 8 below 8 channels
    (16, 1 / 16, 1), (16, 0.25, 4), (16, 1, 16), (16, 2, 32), (16, 4, 64),  # the paper's Fig. 9(c) sweep
    (100, 0.29, 29), (4, 4, 16), (16, 0.01, 1),
])
def test_cvb_latent_channels_follow_the_authors_and_the_papers_sweep(channels, scale, latent):
    assert latent_channels(channels, scale) == latent
def _per_sample_clipped_mean(net, images, labels, clip):
    none = build_defense("none")
    grads = [client_gradient(net, none, images[i : i + 1], labels[i : i + 1]) for i in range(len(images))]
    clipped = []
    for g in grads:
        norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        clipped.append({n: t * factor for n, t in g.items()})
    return {n: sum(c[n] for c in clipped) / len(images) for n in grads[0]}


def build_defense(name, **params):
    return registry.get("defense", name)(**params)


@pytest.mark.parametrize("defense", [None, CVB(kernel=3), Precode(position=2)])
def test_dp_without_noise_is_the_per_sample_clipped_mean(defense):
    # Bottlenecks in eval mode are deterministic but still add their KL term to the loss.
    net = build(defense).train(defense is None)
    torch.manual_seed(1)
    images, labels = torch.rand(6, *SHAPE), torch.randint(10, (6,))
    expected = _per_sample_clipped_mean(net, images, labels, clip=0.5)
    got = DPSGD(clip=0.5, sigma=0).client_gradient(net, images, labels, torch.Generator().manual_seed(0))
    assert list(got) == [n for n, _ in net.named_parameters()]
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-4), name
    if defense is not None:
        return
    # A clip larger than every per-sample norm gives the plain mean gradient.
    plain = client_gradient(net, build_defense("none"), images, labels)
    got = DPSGD(clip=1e6, sigma=0).client_gradient(net, images, labels, None)
    for name in plain:
        assert torch.allclose(got[name], plain[name], atol=1e-6, rtol=1e-4), name


def test_dp_noise_scale_and_seeding():
    net = build().train()
    images, labels = torch.rand(4, *SHAPE), torch.randint(10, (4,))
    clean = DPSGD(clip=2.0, sigma=0).client_gradient(net, images, labels, torch.Generator().manual_seed(0))
    dp = DPSGD(clip=2.0, sigma=0.5)
    noisy = dp.client_gradient(net, images, labels, torch.Generator().manual_seed(7))
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.03)
    again = dp.client_gradient(net, images, labels, torch.Generator().manual_seed(7))
    other = dp.client_gradient(net, images, labels, torch.Generator().manual_seed(8))
    assert all(torch.equal(noisy[n], again[n]) for n in noisy)
    assert not torch.equal(noisy["6.weight"], other["6.weight"])


def test_dp_with_a_bottleneck_and_a_stale_aux_loss():
    net = build(Precode(position=2)).train()
    images, labels = torch.rand(2, *SHAPE), torch.randint(10, (2,))
    net(images)  # leaves a non-leaf aux_loss tensor on the module
    got = DPSGD(clip=5.0, sigma=0.01).client_gradient(net, images, labels, torch.Generator().manual_seed(0))
    assert set(got) == {n for n, _ in net.named_parameters()}
    assert all(torch.isfinite(t).all() for t in got.values())
    assert all(p.grad is None for p in net.parameters())  # the client's own model is untouched


def test_dp_refuses_batch_norm_and_accepts_group_norm():
    from gileak.default_plugins.models import MLP, ResNet18
    from gileak.errors import NotApplicableError

    with pytest.raises(NotApplicableError, match="norm=group"):
        DPSGD().apply(MLP(width=8).build((1, 8, 8), 10))
    net = ResNet18(width=4, norm="group").build((3, 8, 8), 10)
    DPSGD().apply(net)  # group norm is per sample: nothing to refuse
    images, labels = torch.rand(2, 3, 8, 8), torch.randint(10, (2,))
    got = DPSGD(clip=1.0, sigma=0).client_gradient(net.train(), images, labels, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(t).all() for t in got.values())


def test_gc_zeroes_exactly_the_smallest_share():
    torch.manual_seed(0)
    gradient = {"w": torch.randn(40, 25), "b": torch.randn(10), "one": torch.randn(1)}
    for ratio in (0.9, 0.99, 0.5, 0.0):
        out = GradientCompression(ratio=ratio).transform_gradient(gradient)
        for name, tensor in gradient.items():
            count = math.floor(ratio * tensor.numel() + 1e-9)
            assert int((out[name] == 0).sum()) == count
            kept = out[name] != 0
            assert torch.equal(out[name][kept], tensor[kept])
            if 0 < count < tensor.numel():
                assert tensor[~kept].abs().max() <= tensor[kept].abs().min()
            assert out[name].shape == tensor.shape
    assert int((GradientCompression(ratio=1.0).transform_gradient(gradient)["w"] != 0).sum()) == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_levels_and_error(bits):
    torch.manual_seed(bits)
    gradient = {"w": torch.randn(5000) * 3, "zero": torch.zeros(4)}
    out = Quantization(bits=bits).transform_gradient(gradient)
    levels = 2 ** (bits - 1) - 1
    step = gradient["w"].abs().max() / levels
    assert len(torch.unique(out["w"])) <= 2 * levels + 1
    indices = out["w"] / step
    assert torch.allclose(indices, indices.round(), atol=1e-4)  # every value is a multiple of the step
    assert indices.round().abs().max() == levels
    if bits <= 4:  # 5000 Gaussian entries reach every level on the peak's side
        assert len(torch.unique(out["w"])) >= levels + 1
    assert (out["w"] - gradient["w"]).abs().max() <= step / 2 + 1e-5
    assert out["w"].abs().max() == pytest.approx(gradient["w"].abs().max().item())
    assert torch.equal(out["zero"], gradient["zero"])


def test_nobias_removes_every_linear_bias():
    net = build(NoBias())
    classifier = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert classifier and all(m.bias is None for m in classifier)
    assert "10.bias" not in dict(net.named_parameters())
    assert count_trainable(net) == CNN_PARAMS - 10
    assert net(torch.rand(2, *SHAPE)).shape == (2, 10)
    assert all(m.bias is not None for m in net.modules() if isinstance(m, nn.Conv2d))


def test_inspect_reports_the_papers_parameter_counts(capsys):
    from gileak.cli import main

    for defense, params in (("precode(position=1)", 141_226), ("precode(position=2)", 104_362),
                            ("precode(position=3)", 72_106), ("cvb(kernel=3)", CNN_PARAMS + 2_432),
                            ("cvb(position=1+3)", CNN_PARAMS + 6_528 + 104_448)):
        assert main(["inspect", "--model", "cnn", "--dataset", "photos", "--defense", defense, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["params"] == params, defense
    assert main(["inspect", "--model", "cnn", "--dataset", "photos", "--defense", "cvb(position=7)"]) == 2
    assert "1, 2, 3" in capsys.readouterr().err


def test_bench_runs_every_defense_end_to_end(tmp_path):
    from gileak.cli import main

    code = main(["bench", "--datasets", "digits", "--defenses",
                 "precode(position=3),cvb,dp(sigma=0.1),gc(ratio=0.99),quant,nobias",
                 "--victims", "1", "--iterations", "3", "--out", str(tmp_path)])
    assert code == 0
