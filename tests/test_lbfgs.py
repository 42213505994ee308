"""The batched L-BFGS of the DLG family (gileak/engine/lbfgs.py) against its reference, a
per-victim loop of torch.optim.LBFGS (`vectorized=False`), with torch's full strong-Wolfe line
search (max_ls = line_search_evals = 25; bracketing and zoom phases) and with the old max_ls = 0
(line_search_evals=0): DLG's label optimisation (vmap), iDLG on the paper's CNN (the factored
engine), CPL on both engines, no line search, a history that wraps around, victims that stop or
are held at different iterations, victim groups, the progress count, a stochastic model; that
the victims run out of step (no barrier between their iterations: every engine call carries
every victim still running); and that the full search makes progress where max_ls = 0 stalls.
Comparisons on real models run in float64, some in float32 too (see `float64`, `assert_same`):
in float32 an ulp of summation order can legitimately flip a decision."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from test_attacks import cnn_target, tiny_mlp_target

from gileak.default_plugins.attacks import DLG, IDLG
from gileak.default_plugins.defenses import CVB, NoDefense
from gileak.default_plugins.models import CNN
from gileak.engine import lbfgs
from gileak.engine.lbfgs import LBFGSConfig, lbfgs_matching
from gileak.engine.matching import initial_images
from gileak.threat import Target, shared_gradients


def both(target, config, seeds, iterations, labels):
    """(reference, batched) reconstructions with the same arguments."""
    reference = lbfgs_matching(target, dataclasses.replace(config, vectorized=False), seeds=seeds,
                               max_iterations=iterations, labels=labels)
    batched = lbfgs_matching(target, config, seeds=seeds, max_iterations=iterations, labels=labels)
    return reference, batched


#: Tolerances of a comparison with the reference, by dtype: images (absolute), best losses
#: (relative), and the noise floor — below it a gradient-matching loss of these tiny problems is
#: rounding noise. In float32 the two solvers' losses, equal to ~1e-7 relative at the start (a
#: batched kernel sums in another order than a one-victim one), drift apart as L-BFGS amplifies
#: the difference, to ~1% near 1e-5 and 10-100% near 1e-9 (measured on the DLG runs below); in
#: float64 they agree to ~1e-14 (1e-9 in the images of DLG's plain lr = 1 steps).
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4, floor=1e-7),
              torch.float64: dict(atol=1e-7, rtol=1e-7, floor=1e-16)}


def assert_same(reference, batched, atol=None, rtol=None, min_loss=LBFGSConfig.min_loss):
    """Same iterations and labels; images to `atol`, best losses to `rtol` (and the noise floor
    absolute: in float32 a loss near 1e-8 is float noise of gradients that match to ~1e-4);
    by default the tolerances of the results' dtype (TOLERANCES).

    One exception: with a `min_loss` below the noise floor (float32 and the default 1e-9),
    stopping (loss < min_loss) compares rounding noise with a threshold, so where a victim
    reached the floor the solvers may stop it at different iterations (seen in float32: 22
    against 23 and 36 against 40 on an Intel AVX-512 CPU, equal counts on the CPU the tests were
    written on). There the earlier one must have stopped by that rule, the other have reached
    the floor too, and the images (of different iterations, both at the floor) agree to 10
    atol. (The other decisions can flip in float32 too, on an ill-conditioned line search:
    the comparisons that meet one run in float64, see the `float64` fixture.)"""
    tolerance = TOLERANCES[reference.images.dtype]
    atol = tolerance["atol"] if atol is None else atol
    rtol = tolerance["rtol"] if rtol is None else rtol
    floor = tolerance["floor"]
    image_atol = torch.full((len(reference.iterations),), atol, dtype=torch.float64)
    for k, (ours, theirs) in enumerate(zip(batched.iterations, reference.iterations)):
        if ours == theirs:
            continue
        assert min_loss < floor, f"victim {k}: {ours} iterations, the reference {theirs}"
        earlier = batched if ours < theirs else reference
        later = reference if ours < theirs else batched
        assert earlier.final_loss[k] < min_loss, f"victim {k} stopped at {min(ours, theirs)}, not by min_loss"
        assert later.final_loss[k] < floor, f"victim {k}: {ours} iterations, the reference {theirs}"
        image_atol[k] = 10 * atol
    assert batched.images.dtype == reference.images.dtype
    difference = (batched.images - reference.images).abs().flatten(1).amax(1).double()
    assert (difference <= image_atol).all(), f"images differ by {difference.tolist()} (atol {image_atol.tolist()})"
    torch.testing.assert_close(torch.tensor(batched.final_loss, dtype=torch.float64),
                               torch.tensor(reference.final_loss, dtype=torch.float64), rtol=rtol, atol=floor)
    assert batched.labels.tolist() == reference.labels.tolist()


def _default_dtype(dtype):
    """A fixture body: the default dtype `dtype` for the test (targets built inside it are of
    that dtype, and so the solvers' variables), restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield dtype
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def float64():
    """Run a test in float64. The comparisons of the batched solver with the reference loop
    on real models run here: in float32 the engines' summation orders (a batched kernel
    against a one-victim one; and which kernel, AVX2 or AVX-512, is the CPU's) make the two
    solvers' losses differ by an ulp, and torch's cubic interpolation, ill-conditioned along a
    nearly linear stretch (d1^2 - g1 g2 ~ 0), can turn that into another trial point: the
    trajectories part (iDLG on the CNN, seeds 0, 1, 2, 5: victim 2 on an AVX-512 CPU, victims
    0 and 2 with AVX2 kernels). In float64 the same differences are ~1e-16 and the solvers
    agree to ~1e-14 on every CPU: every decision — stopping, holding, each line-search branch —
    taken alike."""
    yield from _default_dtype(torch.float64)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    """float32 (what attacks run in; min_loss ties allowed, see assert_same) and float64."""
    yield from _default_dtype(request.param)


def three_mlp_victims():
    """The tiny MLP with three victims (its helper has labels for two)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Sigmoid(), torch.nn.Linear(12, 4))
    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3, 0])
    gradients = shared_gradients(net, NoDefense(), images, labels)
    return Target(net=net, shared_gradient=gradients, input_shape=(1, 4, 4), num_classes=4, labels=labels)


def test_config_defaults_to_the_batched_solver_and_torchs_line_search_budget():
    assert LBFGSConfig().vectorized is True
    assert LBFGSConfig().line_search_evals == 25  # torch's _strong_wolfe default max_ls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_the_search_generator_takes_torchs_strong_wolfe_steps_bit_for_bit(dtype):
    """The batched solver's `_strong_wolfe` (a generator on NumPy scalars, which stand for 0-d
    tensors) against torch's own on 0-d tensors, on random 1-D slices of a bumpy function
    (some with a lying gradient, some linear, some with a tiny or huge direction): the same
    trial steps, bit for bit, the same end point and evaluation count, through every branch —
    bracketing, zoom, the max_ls exit and the tolerance_change exit."""
    import torch.optim.lbfgs as torch_lbfgs

    scalar = lbfgs._SEARCH_SCALAR[dtype]
    seen = dict(zoom=0, max_ls=0, tiny_bracket=0, short=0)
    for seed in range(150):
        generator = torch.Generator().manual_seed(seed)

        def uniform(*shape, low=0.0, high=1.0):
            return torch.rand(*shape, generator=generator, dtype=dtype) * (high - low) + low

        curve, bump, frequency = uniform(4, high=3.0), uniform(4), uniform(4, high=20.0)
        lie = float(uniform(1)) < 0.2  # the gradient's slope sign flipped: every point along -g is higher
        linear = seed % 5 == 0  # no minimum along -g: bracketing runs to the max_ls exit

        def loss_and_grad(z):
            z = z.detach().requires_grad_(True)
            if linear:
                loss = (frequency * z).sum()
            else:
                loss = (curve * z * z + bump * torch.sin(frequency * z)).sum()
            (grad,) = torch.autograd.grad(loss, z)
            if lie:
                loss = loss - 3 * (grad.detach() * z).sum()
            return float(loss.detach()), grad

        x = uniform(4, low=-2.0, high=2.0)
        f, g = loss_and_grad(x)
        d = -g * 10 ** float(uniform(1, low=-9.0, high=1.0))
        t = min(1.0, 1.0 / g.abs().sum()) if seed % 2 else float(uniform(1, high=2.0))  # a tensor or a float
        gtd = g.dot(d)

        trials = []

        def evaluate(x, t, d):
            trials.append(float(t))
            return loss_and_grad(x + t * d)

        theirs = torch_lbfgs._strong_wolfe(evaluate, x, t, d, f, g, gtd, max_ls=25)
        search = lbfgs._strong_wolfe(scalar(float(t)) if isinstance(t, torch.Tensor) else t, f, g, scalar(float(gtd)),
                                     scalar(float(d.abs().max())), 25)
        ours, trial = [], next(search)
        try:
            while True:
                ours.append(float(trial))
                f_new, g_new = loss_and_grad(x + torch.tensor(float(trial), dtype=dtype) * d)
                with np.errstate(all="ignore"):  # as the solver runs it
                    trial = search.send((f_new, g_new, scalar(float(g_new.dot(d)))))
        except StopIteration as end:
            result = end.value
        assert ours == trials, f"seed {seed}"
        assert (result[0], float(result[2]), result[3]) == (theirs[0], float(theirs[2]), theirs[3]), f"seed {seed}"
        assert torch.equal(result[1], theirs[1])
        seen["zoom"] += result[4] > 0
        seen["max_ls"] += result[3] == 26
        seen["tiny_bracket"] += 1 < result[3] < 26 and float(result[2]) == 0.0
        seen["short"] += result[3] <= 2
    assert all(count > 0 for count in seen.values()), seen


def _hostile_values(dtype):
    """Values that break naive float code: signed zeros, infinities, nan, the dtype's largest
    and subnormal values, ones whose products and sums overflow it; and random magnitudes."""
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -2.5, 1 / 3, math.pi * 1e-3, 1e30, -7e37, info.max, -info.max, info.tiny,
              info.tiny / 8, math.inf, -math.inf, math.nan, 1e-7, 3.0]
    generator = torch.Generator().manual_seed(0)
    return values + (torch.randn(12, generator=generator, dtype=torch.float64) * 10 ** torch.randint(
        -20, 20, (12,), generator=generator)).tolist()


def _same(ours, theirs, what):
    """Bit for bit (sign of zero included, nan for nan), a NumPy scalar or Python value against
    a torch 0-d tensor or Python value."""
    theirs = float(theirs) if isinstance(theirs, torch.Tensor) else theirs
    ours = float(ours) if isinstance(ours, np.floating) else ours
    assert (ours == theirs and math.copysign(1, ours) == math.copysign(1, theirs)) or (
        ours != ours and theirs != theirs), f"{what}: {ours!r} against torch's {theirs!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_numpy_scalar_arithmetic_is_torchs_0d_tensor_arithmetic_on_hostile_values(dtype):
    """The search's arithmetic on NumPy scalars (which stand for its 0-d tensors) against the
    same Python operators on torch 0-d tensors, bit for bit: with each other and with Python
    numbers (beyond the dtype's range, ints) on either side, division by zero, abs, negation;
    `number / scalar` as `_divide` forms it (plain NumPy division rounds once where torch
    multiplies by the reciprocal), `** 2` as a product and sqrt as `_torch_sqrt` (the forms
    `_cubic_interpolate` writes)."""
    import itertools

    assert lbfgs.WEAK_PYTHON_SCALARS, f"NumPy {np.__version__} does not combine scalars with numbers as torch does"
    scalar = lbfgs._SEARCH_SCALAR[dtype]
    values = _hostile_values(dtype)
    numbers = [0, 2, 3, 0.1, 1e-4, 0.9, -1e39, 1e300, math.inf, math.nan, -0.0]

    def tensor(value):
        return torch.tensor(value, dtype=dtype)

    operators = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                 "/": lbfgs._divide, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
                 ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
    with np.errstate(all="ignore"):  # as the solver runs the searches
        for a, b in itertools.product(values, repeat=2):
            for name, op in operators.items():
                _same(op(scalar(a), scalar(b)), op(tensor(a), tensor(b)), f"{a!r} {name} {b!r}")
        for a, number in itertools.product(values, numbers):
            for name, op in operators.items():
                _same(op(scalar(a), number), op(tensor(a), number), f"{a!r} {name} {number!r}")
                if name in "+-*/":
                    _same(op(number, scalar(a)), op(number, tensor(a)), f"{number!r} {name} {a!r}")
        for a in values:
            _same(scalar(a) * scalar(a), tensor(a) ** 2, f"{a!r} ** 2")
            _same(abs(scalar(a)), abs(tensor(a)), f"abs({a!r})")
            _same(-scalar(a), -tensor(a), f"-{a!r}")
            _same(lbfgs._torch_sqrt(scalar(a)), tensor(a).sqrt(), f"sqrt({a!r})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cubic_interpolation_is_torchs_bit_for_bit_on_hostile_values(dtype):
    """Our `_cubic_interpolate` (on NumPy scalars) against torch's own (on 0-d tensors), each
    argument position a Python float, an int or a scalar as `_strong_wolfe` passes them (f
    always a Python float, g always a scalar), with and without bounds, on hostile values:
    the same value bit for bit, and of a scalar type exactly where torch's is a tensor."""
    import itertools

    import torch.optim.lbfgs as torch_lbfgs

    scalar = lbfgs._SEARCH_SCALAR[dtype]
    values = _hostile_values(dtype)[::2] + [0.5, -1.25, 2.0]
    generator = torch.Generator().manual_seed(3)
    cases = 0
    with np.errstate(all="ignore"):
        for x1, x2, g1, g2 in itertools.product(values[:9], values[:9], values[::3], values[1::3]):
            f1, f2 = (torch.randn(2, generator=generator, dtype=torch.float64) * 3).tolist()
            for as_scalar in itertools.product((False, True), repeat=2):  # each x a number or a 0-d tensor
                ours_x = [scalar(x) if s else x for x, s in zip((x1, x2), as_scalar)]
                theirs_x = [torch.tensor(x, dtype=dtype) if s else x for x, s in zip((x1, x2), as_scalar)]
                for bounds in (None, (0.25, 4.0)):
                    try:
                        theirs = torch_lbfgs._cubic_interpolate(theirs_x[0], f1, torch.tensor(g1, dtype=dtype),
                                                                theirs_x[1], f2, torch.tensor(g2, dtype=dtype), bounds)
                    except ZeroDivisionError:  # x1 == x2, both Python floats: ours must raise too
                        with pytest.raises(ZeroDivisionError):
                            lbfgs._cubic_interpolate(ours_x[0], f1, scalar(g1), ours_x[1], f2, scalar(g2), bounds)
                        continue
                    ours = lbfgs._cubic_interpolate(ours_x[0], f1, scalar(g1), ours_x[1], f2, scalar(g2), bounds)
                    what = f"x {ours_x} g {(g1, g2)} f {(f1, f2)} bounds {bounds}"
                    _same(ours, theirs, what)
                    assert isinstance(ours, np.floating) == isinstance(theirs, torch.Tensor), what
                    cases += 1
    assert cases > 5000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_the_search_sqrt_is_torchs_on_many_values(dtype):
    """torch's CPU sqrt is not always correctly rounded (on this machine 0.6% of float32 values
    differ from IEEE's in their last bit): `_torch_sqrt` must be torch's own, bit for bit."""
    scalar = lbfgs._SEARCH_SCALAR[dtype]
    generator = torch.Generator().manual_seed(1)
    values = (torch.rand(5000, generator=generator, dtype=torch.float64)
              * 10.0 ** torch.randint(-30, 30, (5000,), generator=generator)).to(dtype).tolist()
    ours = [float(lbfgs._torch_sqrt(scalar(v))) for v in values]
    theirs = [torch.tensor(v, dtype=dtype).sqrt().item() for v in values]
    assert ours == theirs


@pytest.mark.parametrize("evals", [25, 3, 0])
def test_the_reference_gives_torchs_line_search_max_ls_equal_to_line_search_evals(evals, monkeypatch):
    """torch.optim.LBFGS passes max_ls = max_eval - 1 (the evaluation at x); its max_iter=1
    default max_eval = 1 * 5 // 4 = 1 gives max_ls = 0."""
    import torch.optim.lbfgs as torch_lbfgs

    seen = []
    original = torch_lbfgs._strong_wolfe

    def recording(*args, max_ls, **kwargs):
        seen.append(max_ls)
        return original(*args, max_ls=max_ls, **kwargs)

    monkeypatch.setattr(torch_lbfgs, "_strong_wolfe", recording)
    target, _ = tiny_mlp_target()
    lbfgs_matching(target, LBFGSConfig(line_search_evals=evals, vectorized=False), seeds=[0, 1], max_iterations=2,
                   labels=target.labels)
    assert seen and set(seen) == {evals}


@pytest.mark.parametrize("line_search, evals", [(True, 25), (True, 0), (False, 25)])
def test_dlg_with_label_optimisation_matches_the_reference(line_search, evals, dtype):
    target, _ = tiny_mlp_target()
    config = LBFGSConfig(optimise_labels=True, line_search=line_search, line_search_evals=evals, minmax=False)
    reference, batched = both(target, config, [0, 1], 30, None)
    assert lbfgs.last_run["engine"] == "vmap"  # label logits are variables: vmap(grad) over victims
    assert batched.images.dtype == dtype
    assert_same(reference, batched)
    # it made progress (not a comparison of two idle runs): a victim converged, label and all
    converged = [k for k, loss in enumerate(batched.final_loss) if loss < 1e-4]
    assert converged and all(int(batched.labels[k]) == [1, 3][k] for k in converged)
    run = lbfgs.last_run
    if line_search and evals:
        assert run["zoom_evaluations"] > 0  # the zoom phase ran
    if line_search:  # one evaluation at each victim's start, then only the searches' trial points
        assert run["evaluations"] == 2 + run["search_evaluations"]
        assert run["longest_search"] <= 1 + evals


def test_idlg_on_the_cnn_takes_the_factored_engine_and_matches_the_reference(float64):
    # In float64 (see the fixture): in float32 torch's cubic interpolation, ill-conditioned
    # along the first, nearly linear direction (d1^2 - g1 g2 ~ 0), turns a loss 1 ulp off (the
    # factored engine's summation order) into another trial point for some seeds on some CPUs.
    target, _ = cnn_target(n=5)
    config = LBFGSConfig(minmax=False)
    seeds = [0, 1, 2, 3, 4]
    reference, batched = both(target, config, seeds, 8, target.labels)
    run = lbfgs.last_run
    assert run["engine"] == "factored"
    assert_same(reference, batched)
    # the first step (t = 1/|g|_1) is far too short: bracketing then zoom, up to the max_ls exit
    assert run["zoom_evaluations"] > 10 and run["long_searches"] >= 3 and run["longest_search"] == 26
    # the search's evaluation at its final point is where the next step starts (torch
    # evaluates there again): one evaluation per victim, then only the trial points
    assert run["evaluations"] == 5 + run["search_evaluations"]
    start = initial_images(target.input_shape, seeds, "randn", "cpu").clamp(0, 1)
    assert (batched.images - start).abs().max() > 1e-2  # the victims moved


@pytest.mark.parametrize("engine", ["factored", "vmap"])
def test_cpl_matches_the_reference_on_both_engines(engine, monkeypatch, float64):
    if engine == "vmap":
        monkeypatch.setattr(lbfgs, "factored_engine", lambda *args: None)
    target = three_mlp_victims()
    config = LBFGSConfig(label_weight=0.5, minmax=False)
    reference, batched = both(target, config, [4, 5, 6], 10, target.labels)
    assert lbfgs.last_run["engine"] == engine
    assert lbfgs.last_run["zoom_evaluations"] > 0
    assert_same(reference, batched)
    without = lbfgs_matching(target, dataclasses.replace(config, label_weight=0.0), seeds=[4, 5, 6],
                             max_iterations=10, labels=target.labels)
    assert (without.images - batched.images).abs().max() > 1e-3  # the label term is in the objective


def test_victims_run_out_of_step_so_every_engine_call_carries_every_victim_still_running():
    """No barrier between the victims' iterations: a victim whose line search ends starts its
    next step in the same round, so every round evaluates every victim still running and the
    engine calls are as many as ONE victim's evaluations — the most any victim needs — where
    the lockstep solver (all victims' step k before anyone's step k + 1) made one call per
    round of the longest search of every iteration (`lockstep_calls`: here 1.5-2x as many, by
    thread count; where one victim has the longest search of every round the two are equal).
    Progress still adds up to max_iterations, reported as the slowest running victim advances."""
    target, _ = cnn_target(n=5, seed=3)
    counted = []
    result = lbfgs_matching(target, LBFGSConfig(minmax=False), seeds=[0, 1, 2, 3, 4], max_iterations=10,
                            labels=target.labels, progress=counted.append)
    run = lbfgs.last_run
    per_victim = run["victim_evaluations"]
    assert result.iterations == [10] * 5 and 40 < run["stepped"] <= 50  # (3 held)
    assert sum(per_victim) == run["evaluations"] and min(per_victim) < max(per_victim) / 2  # unequal searches
    assert run["calls"] == max(per_victim)
    assert run["victims_per_call"] == pytest.approx(run["evaluations"] / run["calls"])
    assert run["lockstep_calls"] > 1.4 * run["calls"]  # a lockstep schedule of the same searches
    assert sum(counted) == 10 and len(counted) >= 5


def test_out_of_step_victims_follow_their_own_trajectories_bit_for_bit(monkeypatch):
    """Victims at different iterations share rounds (and the two-loop recursion takes each
    one's own pairs from its own ring position), yet each follows exactly the trajectory it
    follows alone — bit for bit, once the engine gives each victim the same rounding whatever
    the others in the call (here: one engine call per victim; the solver's row-wise dot
    products reduce each row alone, the recursion's batched products and solves each
    victim alone). A history of 3 wraps around at different rounds; the recursion's history
    gathered for all victims at once or one victim at a time, alike."""
    original = lbfgs._Evaluator.__call__

    def one_at_a_time(self, points, index):
        rows = torch.arange(points.shape[0]) if index is None else index
        parts = [original(self, points, rows[j:j + 1]) for j in range(rows.numel())]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    monkeypatch.setattr(lbfgs._Evaluator, "__call__", one_at_a_time)
    target, _ = cnn_target(n=4)
    config = LBFGSConfig(minmax=False, history=3)
    seeds = [0, 1, 2, 3]
    together = lbfgs_matching(target, config, seeds=seeds, max_iterations=8, labels=target.labels)
    per_victim = lbfgs.last_run["victim_evaluations"]
    assert min(per_victim) < max(per_victim) / 2  # out of step
    with monkeypatch.context() as patch:  # the two-loop recursion gathering one victim at a time
        patch.setattr(lbfgs._History, "GATHER_MEMORY", 1)
        blocks = lbfgs_matching(target, config, seeds=seeds, max_iterations=8, labels=target.labels)
    assert torch.equal(blocks.images, together.images) and blocks.final_loss == together.final_loss
    for k in range(4):
        own = {n: g[k:k + 1] for n, g in target.shared_gradient.items()}
        alone_target = Target(net=target.net, shared_gradient=own, input_shape=target.input_shape,
                              num_classes=target.num_classes, labels=target.labels[k:k + 1])
        alone = lbfgs_matching(alone_target, config, seeds=[seeds[k]], max_iterations=8, labels=target.labels[k:k + 1])
        assert torch.equal(alone.images[0], together.images[k])
        assert alone.final_loss[0] == together.final_loss[k] and alone.iterations[0] == together.iterations[k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trial_points_round_as_torchs_add_with_alpha(dtype):
    """x + t d as torch.optim.LBFGS forms it, `p.add_(d, alpha=t)` per parameter (one
    rounding: a fused multiply-add), bit for bit — for rows of the image alone and of an
    image and label logits, lengths with and without a vector tail, steps and directions
    over many scales. (`x + t * d`, which rounds twice, differed in ~20% of the elements.)"""
    generator = torch.Generator().manual_seed(0)
    for sizes in ((3072,), (784, 10), (1000,), (7,), (33, 3)):
        x = torch.randn(20, sum(sizes), generator=generator, dtype=dtype)
        scales = 10.0 ** torch.randint(-6, 3, (20, 1), generator=generator)
        d = torch.randn(20, sum(sizes), generator=generator, dtype=dtype) * scales.to(dtype)
        t = torch.rand(20, generator=generator, dtype=dtype) * (10.0 ** torch.randint(-8, 2, (20,), generator=generator))
        ours = lbfgs._moved(x, d, t.to(dtype))
        for j in range(20):
            parameters = list(x[j].clone().split(sizes))
            for p, update in zip(parameters, d[j].split(sizes)):
                p.add_(update, alpha=float(t[j].to(dtype)))
            assert torch.equal(ours[j], torch.cat(parameters)), (sizes, j)
    twice = x + t.to(dtype).unsqueeze(1) * d
    assert dtype == torch.float64 or not torch.equal(twice, ours)  # the two roundings differ (float32 here)


def _torchs_two_loop(g, pairs, h_diag):
    """torch.optim.LBFGS.step's two-loop recursion, as torch writes it; pairs (y, s, ro)
    oldest first."""
    q = g.neg()
    al = [None] * len(pairs)
    for i in range(len(pairs) - 1, -1, -1):
        y, s, ro = pairs[i]
        al[i] = s.dot(q) * ro
        q.add_(y, alpha=-al[i])
    d = r = torch.mul(q, h_diag)
    for i in range(len(pairs)):
        y, s, ro = pairs[i]
        be_i = y.dot(r) * ro
        r.add_(s, alpha=al[i] - be_i)
    return d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_gram_form_of_the_two_loop_recursion_is_torchs_recursion(dtype):
    """`_History.direction` (the recursion's coefficients from inner products, by two
    triangular solves) against torch's own recursion on each victim's pairs: victims out of
    step, a history of 4 wrapping around, ranks some victims lack, subsets of victims, and a
    victim pushed twice with no direction between (its inner products filled in at the second
    push). float64: to 1e-13 of |d|; float32: within float32's own error of the recursion
    (measured: 1e-7 of |d|, as torch's float32 recursion against float64's)."""
    from gileak.engine.lbfgs import _History

    generator = torch.Generator().manual_seed(0)
    dim, size, count = 300, 4, 5
    curvature = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    curvature = curvature @ curvature.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    history = _History(size, count, dim, "cpu")
    history.pairs, history.ro = history.pairs.to(dtype), history.ro.to(dtype)
    kept: dict[int, list] = {k: [] for k in range(count)}
    for step in range(9):
        victims = torch.tensor([k for k in range(count) if (step + k) % 3 != 0 or step == 4])
        s = 0.1 * torch.randn(len(victims), dim, generator=generator, dtype=torch.float64)
        y = s @ curvature
        ro = 1.0 / (y * s).sum(1)
        history.push(victims, y.to(dtype), s.to(dtype), ro.to(dtype))
        for j, k in enumerate(victims.tolist()):
            kept[k] = (kept[k] + [(y[j].to(dtype), s[j].to(dtype), ro[j].to(dtype))])[-size:]
        if step == 3:
            continue  # step 4 pushes every victim again before any direction
        asked = torch.tensor([k for k in range(count) if (step + k) % 2 == 0 or k in victims.tolist()])
        g = torch.randn(len(asked), dim, generator=generator, dtype=torch.float64).to(dtype)
        h_diag = (0.5 + torch.rand(len(asked), generator=generator, dtype=torch.float64)).to(dtype)
        ours = history.direction(g, h_diag, asked)
        assert ours.dtype == dtype
        for j, k in enumerate(asked.tolist()):
            exact = _torchs_two_loop(g[j].double(), [tuple(t.double() for t in p) for p in kept[k]], h_diag[j].double())
            error = float((ours[j].double() - exact).norm() / exact.norm())
            if dtype == torch.float64:
                assert error < 1e-13, (step, k, error)
            else:
                theirs = _torchs_two_loop(g[j], kept[k], h_diag[j])
                own = float((theirs.double() - exact).norm() / exact.norm())
                assert error < max(4 * own, 1e-6), (step, k, error, own)
    pushed = history.pushed.tolist()
    assert min(pushed) > size and len(set(pushed)) > 1, pushed  # every ring wrapped, out of step


def test_a_history_shorter_than_the_run_wraps_around_as_torch_drops_its_oldest_pairs(float64):
    target, _ = tiny_mlp_target()
    config = LBFGSConfig(history=3, optimise_labels=True, minmax=False)
    reference, batched = both(target, config, [0, 1], 12, None)
    assert_same(reference, batched)
    longer = lbfgs_matching(target, dataclasses.replace(config, history=100, vectorized=False), seeds=[0, 1],
                            max_iterations=12, labels=None)
    assert (longer.images - reference.images).abs().max() > 1e-3  # the history size matters here


def test_victims_stopping_or_stalling_at_different_iterations_match_the_reference(dtype):
    """Victim 0's shared gradient is its own starting dummy's: loss ~0 at once, it stops after
    one iteration; victim 1 reaches min_loss later. With DLG and the old max_ls = 0 search, one
    victim (1 in float32, 0 in float64: other starting dummies) stalls: its full step is
    rejected and it stays there until the end, as in torch — held by the batched solver, not
    re-evaluated."""
    target, _ = tiny_mlp_target()
    start = initial_images(target.input_shape, [0], "randn", "cpu")
    own = shared_gradients(target.net, NoDefense(), start, target.labels[:1])
    gradients = {n: torch.cat([own[n], g[1:]]) for n, g in target.shared_gradient.items()}
    stopper = Target(net=target.net, shared_gradient=gradients, input_shape=target.input_shape, num_classes=4,
                     labels=target.labels)
    reference, batched = both(stopper, LBFGSConfig(minmax=False, min_loss=1e-7), [0, 1], 12, stopper.labels)
    assert reference.iterations[0] == 1 and 1 < reference.iterations[1] < 12
    assert_same(reference, batched, min_loss=1e-7)  # no tie at 1e-7: the counts must agree

    old = LBFGSConfig(optimise_labels=True, minmax=False, line_search_evals=0)
    reference, batched = both(target, old, [0, 1], 40, None)
    # one victim stalls for good; the other converges (in float32 to the noise floor, where it
    # stops by min_loss = 1e-9 or at 40 is a float tie: 36 on an AVX-512 CPU, 40 with AVX2)
    stalled = 1 if dtype == torch.float32 else 0
    assert reference.final_loss[stalled] > 0.1 and reference.iterations[stalled] == 40
    assert reference.final_loss[1 - stalled] < 1e-5
    assert_same(reference, batched)
    assert lbfgs.last_run["stepped"] < sum(batched.iterations) - 10  # the stalled one is held
    assert lbfgs.last_run["evaluations"] < 2 + sum(batched.iterations) - 10  # and not re-evaluated


def test_the_full_line_search_makes_progress_where_max_ls_0_stalls():
    """The bug: torch.optim.LBFGS(max_iter=1) gives its line search max_ls = 0 by default, so a
    victim whose one trial step fails never moves again (every paper-CNN victim within a few
    iterations). With line_search_evals = 25 the victims keep moving and get further."""
    target, _ = cnn_target(n=3)
    runs = {}
    for evals in (25, 0):
        result = lbfgs_matching(target, LBFGSConfig(minmax=False, line_search_evals=evals), seeds=[0, 1, 2],
                                max_iterations=20, labels=target.labels)
        runs[evals] = result, dict(lbfgs.last_run)
    (full, full_run), (none, none_run) = runs[25], runs[0]
    assert none_run["stepped"] <= 30 and none_run["moves"] <= 24  # all stalled (held) early
    assert full_run["moves"] >= 40 and full_run["moves"] > 2 * none_run["moves"]
    assert none_run["longest_search"] == 1 and full_run["longest_search"] > 2
    # every victim gets further, together by a third (victim 1's search is ill-conditioned: 7%
    # further in the reference loop, and 50% in the batched solver of a 2-thread summation order)
    assert all(better < worse for better, worse in zip(full.final_loss, none.final_loss))
    assert sum(full.final_loss) < 0.8 * sum(none.final_loss)

    # DLG on the tiny MLP, the reference loop alone: seed 1 stalls at a loss ~0.3 with
    # max_ls = 0 and converges with the full search
    mlp, _ = tiny_mlp_target()
    dlg = LBFGSConfig(optimise_labels=True, minmax=False, vectorized=False)
    fixed = lbfgs_matching(mlp, dlg, seeds=[0, 1], max_iterations=30, labels=None)
    stalled = lbfgs_matching(mlp, dataclasses.replace(dlg, line_search_evals=0), seeds=[0, 1], max_iterations=30,
                             labels=None)
    assert stalled.final_loss[1] > 0.1 and fixed.final_loss[1] < 1e-6


def test_victim_groups_give_the_same_result_and_progress_adds_up(monkeypatch):
    target = three_mlp_victims()
    config = LBFGSConfig(minmax=False)
    counted = []
    whole = lbfgs_matching(target, config, seeds=[1, 2, 3], max_iterations=7, labels=target.labels,
                           progress=counted.append)
    assert sum(counted) == 7 and len(counted) == 7 and lbfgs.last_run["groups"] == 1
    monkeypatch.setattr(lbfgs, "HISTORY_MEMORY", 1)  # one victim per group
    counted.clear()
    grouped = lbfgs_matching(target, config, seeds=[1, 2, 3], max_iterations=7, labels=target.labels,
                             progress=counted.append)
    assert lbfgs.last_run["groups"] == 3 and sum(counted) == 7
    torch.testing.assert_close(grouped.images, whole.images)
    assert grouped.final_loss == pytest.approx(whole.final_loss, rel=1e-4, abs=1e-8)


def test_progress_reports_the_remainder_when_every_victim_stops_early():
    target = three_mlp_victims()
    counted = []
    result = lbfgs_matching(target, LBFGSConfig(min_loss=1e9), seeds=[1, 2, 3], max_iterations=9,
                            labels=target.labels, progress=counted.append)
    assert result.iterations == [1, 1, 1]
    assert sum(counted) == 9  # no victim left running after the first: the whole remainder at once


def test_a_stochastic_model_runs_with_independent_noise_and_finite_results():
    torch.manual_seed(0)
    net = CNN().build((3, 32, 32), 10)
    CVB(position=1).apply(net)
    net.train()
    target, _ = cnn_target(n=2, net=net)
    for attack in (IDLG(labels="known"), DLG()):
        result = attack.attack(target, seeds=[0, 1], max_iterations=3)
        assert not lbfgs.last_run["reused"]  # evaluated afresh at x every step, as torch does
        assert lbfgs.last_run["evaluations"] > sum(result.iterations)
        assert torch.isfinite(result.images).all() and all(torch.isfinite(torch.tensor(result.final_loss)))
    twice = [IDLG(labels="known").attack(target, seeds=[0, 1], max_iterations=3) for _ in range(2)]
    torch.testing.assert_close(twice[0].images, twice[1].images)  # its noise is seeded


def made_up_target(monkeypatch, seeds, parameters):
    """Victims on made-up landscapes along w (|w| = 1, |w|_1 = 4), u = w.x, one row of
    `parameters` (centre, slope, curve, bump, fake) each: f = 100 + slope u + curve (u - centre)^2
    + bump exp(-((u - centre) / 0.05)^2), and with fake = 1 a lying gradient: f's value has
    -slope u instead of +slope u while its gradient keeps +slope w (uphill along -g)."""
    w = torch.full((16,), 0.25)

    def made_up_loss(target, matching):
        def victim_loss(image, label, shared):
            centre, slope, curve, bump, fake = shared[0].unbind()
            u = (image.flatten() * w).sum()
            total = (100.0 + slope * u + curve * (u - centre) ** 2 + bump * torch.exp(-((u - centre) / 0.05) ** 2)
                     - 2 * fake * slope * u.detach())
            return total, (total,)

        victim_loss.names = ["landscape"]
        return victim_loss

    monkeypatch.setattr(lbfgs, "make_victim_loss", made_up_loss)
    monkeypatch.setattr(lbfgs, "factored_engine", lambda *args: None)
    target, _ = tiny_mlp_target()
    made_up = Target(net=target.net, shared_gradient={"landscape": torch.tensor(parameters)},
                     input_shape=(1, 4, 4), num_classes=4, labels=torch.arange(len(seeds)))
    start = initial_images((1, 4, 4), seeds, "randn", "cpu").flatten(1) @ w
    return made_up, start


def test_a_rejected_first_step_is_retried_with_the_full_step_as_torch_does(monkeypatch):
    """With the old max_ls = 0 search: f = 100 + u + a bump a quarter below the start. torch's
    first step (t = 1/|g|_1 = 1/4) lands on the bump and is rejected; its second (t = lr = 1,
    d = -g) clears it, so that victim must not be held after its first rejection. Victim 1 has
    no bump; victim 2 a zero gradient (torch returns at once, every step)."""
    seeds = [3, 4, 5]
    start = initial_images((1, 4, 4), seeds, "randn", "cpu").flatten(1) @ torch.full((16,), 0.25)
    parameters = [[float(start[0]) - 0.25, 1.0, 0.0, 1.0, 0.0], [float(start[1]) + 50.0, 1.0, 0.0, 1.0, 0.0],
                  [float(start[2]) + 50.0, 0.0, 0.0, 1.0, 0.0]]
    made_up, start = made_up_target(monkeypatch, seeds, parameters)
    config = LBFGSConfig(minmax=False, line_search_evals=0)
    one = lbfgs_matching(made_up, config, seeds=seeds, max_iterations=2, labels=made_up.labels)
    assert one.final_loss[0] == pytest.approx(100.0 + float(start[0]), abs=1e-4)  # the first step was rejected
    reference, batched = both(made_up, config, seeds, 5, made_up.labels)
    assert reference.final_loss[0] < 100.0 + float(start[0]) - 0.9  # and the second taken
    assert reference.iterations == [5, 5, 5] and reference.final_loss[2] == pytest.approx(100.0)
    assert_same(reference, batched)


def test_a_victim_the_full_search_cannot_move_is_held_as_torch_repeats_its_step(monkeypatch):
    """Victim 0's gradient lies (every point along -g is higher): each search brackets [0, t],
    zooms towards 0 and returns t = 0 once the bracket is below tolerance_change. Its first step is retried with
    t = lr (not held); after its second torch would repeat the same step forever (no pair,
    same d, same search): it is held, as is victim 2 (zero gradient, held at once). Victim 1
    descends a bowl to its bottom."""
    seeds = [3, 4, 5]
    start = initial_images((1, 4, 4), seeds, "randn", "cpu").flatten(1) @ torch.full((16,), 0.25)
    parameters = [[0.0, 1.0, 0.0, 0.0, 1.0], [float(start[1]) + 1.0, 0.0, 1.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0]]
    made_up, start = made_up_target(monkeypatch, seeds, parameters)
    reference, batched = both(made_up, LBFGSConfig(minmax=False), seeds, 6, made_up.labels)
    assert reference.iterations == [6, 6, 6]
    assert reference.final_loss[0] == pytest.approx(100.0 - float(start[0]), abs=1e-4)  # never moved
    assert reference.final_loss[1] == pytest.approx(100.0, abs=1e-4) and reference.final_loss[2] == 100.0
    assert_same(reference, batched)
    run = lbfgs.last_run
    # victim 0's searches end by the zoom's tolerance_change exit (bracket [0, t] too small);
    # only its first two run: then it is held (run on, it would search again every step)
    assert run["long_searches"] == 2 and run["zoom_evaluations"] > 10
    assert run["stepped"] == 2 + 3 + 1 and run["moves"] == 2  # the bowl: two steps to its bottom


def test_dropout_in_training_mode_counts_as_stochastic():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Dropout(0.5), torch.nn.Sigmoid(),
                              torch.nn.Linear(12, 4))
    images = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])
    target = Target(net=net, shared_gradient=shared_gradients(net, NoDefense(), images, labels), input_shape=(1, 4, 4),
                    num_classes=4, labels=labels)
    lbfgs_matching(target, LBFGSConfig(), seeds=[0, 1], max_iterations=3, labels=labels)
    assert not lbfgs.last_run["reused"]
    assert lbfgs.last_run["evaluations"] == 3 * 2 + lbfgs.last_run["search_evaluations"]  # x every step
    net.eval()  # deterministic: each victim's first evaluation, then only the searches' trial points
    lbfgs_matching(target, LBFGSConfig(), seeds=[0, 1], max_iterations=3, labels=labels)
    assert lbfgs.last_run["reused"] and lbfgs.last_run["evaluations"] == 2 + lbfgs.last_run["search_evaluations"]
