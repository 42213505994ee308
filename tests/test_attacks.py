"""Attack contracts: label recovery, the ignored-layer selection, the L-BFGS family, the
analytic attack, and gradient traces."""

import pytest
import torch
from torch import nn

from gileak.default_plugins.attacks import CPL, DLG, IDLG, Analytic, Ignore, InvertingGradients
from gileak.default_plugins.defenses import NoDefense
from gileak.default_plugins.models import CNN
from gileak.engine.labels import recover_labels
from gileak.errors import NotApplicableError
from gileak.nets import first_stochastic_cut
from gileak.noise import standard_normal
from gileak.threat import Target, shared_gradients


def cnn_target(n=3, bias=True, seed=0, shape=(3, 32, 32), net=None):
    torch.manual_seed(seed)
    net = net or CNN().build(shape, 10)
    if not bias:
        net[-1].register_parameter("bias", None)
    images = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([7, 2, 5, 0, 9][:n])
    gradients = shared_gradients(net, NoDefense(), images, labels, seed=seed)
    return Target(net=net, shared_gradient=gradients, input_shape=shape, num_classes=10, labels=labels), images


@pytest.mark.parametrize("bias", [True, False])
def test_labels_are_recovered_from_the_classifier_gradient(bias):
    target, _ = cnn_target(n=5, bias=bias)
    assert recover_labels(target.net, target.shared_gradient, target.input_shape).tolist() == [7, 2, 5, 0, 9]


class Noisy(nn.Module):
    """A minimal stochastic bottleneck: encoder, random sample, decoder."""

    stochastic = True
    decoder_prefixes = ("decoder",)

    def __init__(self, channels):
        super().__init__()
        self.encoder = nn.Conv2d(channels, channels, 1, bias=False)
        self.decoder = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x):
        z = self.encoder(x)
        return self.decoder(z + torch.randn_like(z))


def test_ignore_keeps_exactly_the_layers_before_the_stochastic_decoder():
    torch.manual_seed(0)
    net = CNN().build((3, 32, 32), 10)
    net[5].insert(Noisy(32))  # slot at position 2
    cut = first_stochastic_cut(net, (3, 32, 32))
    assert cut == ["0.weight", "0.bias", "3.weight", "3.bias", "5.body.0.encoder.weight"]
    target, _ = cnn_target(n=2, net=net)
    reconstruction = Ignore().attack(target, seeds=[0, 1], max_iterations=2)
    assert "matched 5 of" in reconstruction.note
    plain, _ = cnn_target(n=2)
    assert "no stochastic module" in Ignore().attack(plain, seeds=[0, 1], max_iterations=1).note


def test_ig_and_ignore_agree_without_a_stochastic_module():
    target, _ = cnn_target(n=2)
    a = InvertingGradients().attack(target, seeds=[3, 4], max_iterations=5)
    b = Ignore().attack(target, seeds=[3, 4], max_iterations=5)
    torch.testing.assert_close(a.images, b.images)


def test_ig_with_recovered_labels_needs_no_labels():
    target, _ = cnn_target(n=2)
    target.labels = None
    with pytest.raises(NotApplicableError, match="labels=recover"):
        InvertingGradients().attack(target, seeds=[0, 1], max_iterations=1)
    result = InvertingGradients(labels="recover").attack(target, seeds=[0, 1], max_iterations=2)
    assert result.labels.tolist() == [7, 2]


def tiny_mlp_target(n=2, bias=True, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12, bias=bias), nn.Sigmoid(), nn.Linear(12, 4))
    images = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([1, 3][:n])
    gradients = shared_gradients(net, NoDefense(), images, labels, seed=seed)
    return Target(net=net, shared_gradient=gradients, input_shape=(1, 4, 4), num_classes=4, labels=labels), images


def test_analytic_reconstruction_is_exact_on_a_biased_fc_layer():
    target, images = tiny_mlp_target()
    result = Analytic().attack(target, seeds=[0, 1], max_iterations=1)
    torch.testing.assert_close(result.images, images, rtol=1e-4, atol=1e-5)


def test_analytic_is_not_applicable_without_a_biased_first_fc_layer():
    target, _ = tiny_mlp_target(bias=False)
    with pytest.raises(NotApplicableError, match="input of the first biased FC"):
        Analytic().attack(target, seeds=[0, 1], max_iterations=1)
    cnn, _ = cnn_target(n=1, bias=False)
    with pytest.raises(NotApplicableError, match="nobias"):
        Analytic().attack(cnn, seeds=[0], max_iterations=1)


def test_dlg_reconstructs_a_small_input_and_finds_its_label():
    target, images = tiny_mlp_target()
    result = DLG().attack(target, seeds=[0, 1], max_iterations=60)
    assert result.labels.tolist() == [1, 3]
    raw = DLG()
    raw_config = raw.lbfgs_config(None)
    raw_config.minmax = False
    from gileak.engine.lbfgs import lbfgs_matching

    exact = lbfgs_matching(target, raw_config, seeds=[0, 1], max_iterations=60, labels=None)
    assert (exact.images[0] - images[0]).abs().max() < 1e-2  # victim 1 may stop in a local minimum, as in DLG
    assert exact.final_loss[0] < 1e-6


@pytest.mark.parametrize("attack", [DLG(), IDLG(), CPL()])
def test_lbfgs_attacks_give_a_victim_the_same_result_alone_or_in_a_batch(attack):
    target, _ = tiny_mlp_target()
    both = attack.attack(target, seeds=[5, 6], max_iterations=4)
    alone_target = Target(net=target.net, shared_gradient={k: v[1:] for k, v in target.shared_gradient.items()},
                          input_shape=target.input_shape, num_classes=4, labels=target.labels[1:])
    alone = attack.attack(alone_target, seeds=[6], max_iterations=4)
    # A 2-row and a 1-row matmul round differently; the line search's cubic interpolation
    # carries that last-bit difference into the step size (~1e-5 relative), nothing more.
    torch.testing.assert_close(both.images[1:], alone.images, atol=1e-4, rtol=0)


def test_idlg_and_cpl_use_recovered_labels():
    target, _ = tiny_mlp_target()
    target.labels = None
    assert IDLG().attack(target, seeds=[0, 1], max_iterations=2).labels.tolist() == [1, 3]
    assert CPL().attack(target, seeds=[0, 1], max_iterations=2).labels.tolist() == [1, 3]


def test_trace_records_a_cosine_per_layer_per_iteration():
    target, _ = cnn_target(n=2)
    target.trace = True
    result = InvertingGradients().attack(target, seeds=[0, 1], max_iterations=6)
    trace = result.trace
    assert trace.layers == ["0 (Conv2d)", "3 (Conv2d)", "6 (Conv2d)", "10 (Linear)"]
    assert trace.cosine.shape == (6, 2, 4)
    assert bool(((trace.cosine >= -1.0001) & (trace.cosine <= 1.0001)).all())
    # the distance IG minimises is 1 - cosine over all layers together; per layer it starts low
    assert trace.cosine[-1, :, -1].mean() > 0.5


def test_trace_files_are_written(tmp_path):
    from gileak.report.figures import save_trace

    target, _ = cnn_target(n=2)
    target.trace = True
    trace = InvertingGradients().attack(target, seeds=[0, 1], max_iterations=3).trace
    csv_path, png_path = save_trace(trace, tmp_path / "cell", "title")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "iteration,victim,0 (Conv2d),3 (Conv2d),6 (Conv2d),10 (Linear)"
    assert len(lines) == 1 + 3 * 2 and png_path.stat().st_size > 1000


@pytest.mark.parametrize("attack", [DLG, IDLG, CPL])
def test_lbfgs_attacks_give_their_line_search_budget_to_the_solver(attack):
    """The budget is a parameter, so it is part of a stored result's identity: results of the
    old, budget-less search (line_search=0) are not taken for today's."""
    assert attack().lbfgs_config(None).line_search_evals == 25
    assert attack(line_search=0).lbfgs_config(None).line_search_evals == 0


def test_dlg_with_its_line_search_gets_further_than_without():
    target, _ = tiny_mlp_target()
    stalled = DLG(line_search=0).attack(target, seeds=[5, 6], max_iterations=15)
    searched = DLG().attack(target, seeds=[5, 6], max_iterations=15)
    assert stalled.final_loss[0] > 0.1 > 1e-3 > searched.final_loss[0]  # measured: 0.60 against 1.9e-4


# --- Ignore's cut follows the forward pass; gradient subsets (exclude=) ----------------------

from gileak.bottlenecks import ConvBottleneck  # noqa: E402
from gileak.errors import ParamsError  # noqa: E402


class BottlenecksRegisteredBackwards(nn.Module):
    """Two CVBs registered in the opposite order to their use: `late` first, `early` runs first."""

    def __init__(self):
        super().__init__()
        self.late = ConvBottleneck((4, 6, 6), 3, 2, beta=0.1)
        self.head = nn.Linear(144, 3)
        self.early = ConvBottleneck((4, 6, 6), 3, 2, beta=0.1)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        features = self.late(self.early(torch.relu(self.stem(x))))
        return self.head(features.flatten(1))


def tiny_target(net, n=2, shape=(1, 6, 6), classes=3):
    torch.manual_seed(0)
    images = torch.rand(n, *shape, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0, 1][:n])
    gradients = shared_gradients(net, NoDefense(), images, labels)
    return Target(net=net, shared_gradient=gradients, input_shape=shape, num_classes=classes, labels=labels)


def test_ignore_cuts_before_the_decoder_of_the_bottleneck_that_runs_first_not_the_one_registered_first():
    torch.manual_seed(0)
    net = BottlenecksRegisteredBackwards().train()
    assert next(name for name, m in net.named_modules() if getattr(m, "stochastic", False)) == "late"
    cut = first_stochastic_cut(net, (1, 6, 6))
    assert cut == ["stem.weight", "stem.bias", "early.mu.weight", "early.sigma.weight"]
    result = Ignore().attack(tiny_target(net), seeds=[0, 1], max_iterations=2)
    assert "matched 4 of 10" in result.note


class NoiseWithoutDecoderParameters(nn.Module):
    """Declares a decoder but has none with parameters: the cut before it is undefined."""

    stochastic = True
    decoder_prefixes = ("decoder",)

    def forward(self, x):
        return x + standard_normal(x) if self.training else x


class PlainNoise(nn.Module):
    """Stochastic, no decoder declared, no parameters: everything after it is affected."""

    stochastic = True

    def forward(self, x):
        return x + standard_normal(x) if self.training else x


def test_a_declared_decoder_without_parameters_makes_ignore_not_applicable_instead_of_matching_everything():
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), NoiseWithoutDecoderParameters(), nn.Linear(8, 3)).train()
    with pytest.raises(NotApplicableError, match="decoder"):
        first_stochastic_cut(net, (1, 6, 6))
    with pytest.raises(NotApplicableError, match="no trainable parameter"):
        Ignore().attack(tiny_target(net), seeds=[0, 1], max_iterations=1)
    with pytest.raises(NotApplicableError):
        IDLG(labels="known", ignore_stochastic=True).attack(tiny_target(net), seeds=[0, 1], max_iterations=1)


def test_a_stochastic_module_without_a_decoder_is_cut_where_it_runs():
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), PlainNoise(), nn.Linear(8, 3)).train()
    assert first_stochastic_cut(net, (1, 6, 6)) == ["1.weight", "1.bias"]


def tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))


def garbage_in(target, names):
    """The same target with the shared gradients of `names` replaced by noise of another scale."""
    gradients = dict(target.shared_gradient)
    for name in names:
        gradients[name] = 1e3 * torch.randn(gradients[name].shape, generator=torch.Generator().manual_seed(7))
    return Target(net=target.net, shared_gradient=gradients, input_shape=target.input_shape,
                  num_classes=target.num_classes, labels=target.labels)


@pytest.mark.parametrize("attack", [InvertingGradients(exclude="3"), Ignore(exclude="3.weight+3.bias"),
                                    IDLG(labels="known", exclude="3"), CPL(labels="known", exclude=3),
                                    DLG(exclude="3", line_search=3)])
def test_excluded_gradients_are_not_matched(attack):
    target = tiny_target(tiny_classifier())
    honest = attack.attack(target, seeds=[0, 1], max_iterations=4)
    spoiled = attack.attack(garbage_in(target, ["3.weight", "3.bias"]), seeds=[0, 1], max_iterations=4)
    torch.testing.assert_close(spoiled.images, honest.images, rtol=0, atol=0)
    assert spoiled.final_loss == honest.final_loss
    assert "matched 2 of 4" in honest.note and "excluded: 3" in honest.note
    # without exclude= the garbage is matched, and the result changes
    plain = type(attack)(**{k: v for k, v in attack.params.model_dump().items() if k != "exclude"})
    assert plain.attack(target, seeds=[0, 1], max_iterations=4).final_loss != \
        plain.attack(garbage_in(target, ["3.weight", "3.bias"]), seeds=[0, 1], max_iterations=4).final_loss


def test_exclude_reads_names_joined_by_plus_and_refuses_malformed_ones():
    assert InvertingGradients(exclude="8.body.0.decoder+10").params.exclude == ("8.body.0.decoder", "10")
    assert IDLG(exclude=10).params.exclude == ("10",)
    assert CPL(exclude=["0", "3.bias"]).params.exclude == ("0", "3.bias")
    assert DLG().params.exclude == ()
    for bad in ("8.body.0.decoder++10", "10+10", True, "+"):
        with pytest.raises(ParamsError):
            InvertingGradients(exclude=bad)


def test_an_unknown_layer_name_is_a_params_error_that_lists_the_layers():
    from gileak.default_plugins.defenses import Precode

    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    Precode(position=3).apply(net)
    target = tiny_target(net, shape=(1, 32, 32), classes=10)
    with pytest.raises(ParamsError) as info:
        InvertingGradients(exclude="8.body.0.decodr").attack(target, seeds=[0, 1], max_iterations=1)
    message = str(info.value)
    assert "did you mean '8.body.0.decoder'" in message
    assert "0, 3, 6, 8.body.0.encoder, 8.body.0.decoder, 10" in message


def test_excluding_every_gradient_is_an_error_also_after_ignores_cut():
    from gileak.default_plugins.defenses import CVB

    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    CVB().apply(net)
    target = tiny_target(net, shape=(1, 32, 32), classes=10)
    with pytest.raises(ParamsError, match="leaves no gradient"):
        InvertingGradients(exclude="0+2+3+6+10").attack(target, seeds=[0, 1], max_iterations=1)
    # the cut keeps conv 0, mu and sigma; 0 and the whole bottleneck excluded leave nothing
    with pytest.raises(ParamsError, match="after the cut"):
        Ignore(exclude="0+2").attack(target, seeds=[0, 1], max_iterations=1)


def test_exclude_composes_with_ignores_cut():
    from gileak.default_plugins.attacks import _kept
    from gileak.default_plugins.defenses import CVB

    torch.manual_seed(0)
    net = CNN().build((1, 32, 32), 10)
    CVB().apply(net)
    keep, note = _kept(net, (1, 32, 32), True, ("0",), "ignore")
    assert keep == ("2.body.0.mu.weight", "2.body.0.sigma.weight")
    assert "matched 2 of" in note
    keep, _ = _kept(net, (1, 32, 32), False, ("2.body.0.decoder", "10"), "ig")
    assert "2.body.0.decoder.weight" not in keep and "10.weight" not in keep and "6.weight" in keep


def test_exclude_is_checked_at_plan_time_and_is_part_of_the_attacks_identity(capsys):
    from gileak.cli import main
    from gileak.runner import attack_id, plan
    from gileak.spec import build_spec

    spec = build_spec(datasets="digits", models="cnn", defenses="none,precode(position=3)",
                      attacks="ig(exclude=8.body.0.decoder)")
    with pytest.raises(ParamsError, match=r"on cnn \+ none \(digits\).*8.body.0.decoder"):
        plan(spec)  # the undefended CNN has no such layer: stopped before any work
    spec = build_spec(datasets="digits", models="cnn", defenses="precode(position=3)",
                      attacks="ig,ig(exclude=8.body.0.decoder+10),ignore(exclude=6)")
    ids = [attack_id(a) for a in plan(spec).cells[0].attacks]
    assert len(set(ids)) == 3 and '"exclude":["8.body.0.decoder","10"]' in ids[1]
    assert [a.label for a in plan(spec).cells[0].attacks][1] == "ig(exclude=8.body.0.decoder+10)"
    code = main(["bench", "--datasets", "digits", "--defenses", "precode(position=3)",
                 "--attacks", "ig(exclude=8.body.0.decodr)", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean" in err.replace("\n", " ") and "Traceback" not in err
