"""The engines and attacks on every device there is: each test runs on the CPU and, marked
`cuda`, on a CUDA GPU (skipped without one; `pytest -m cuda tests/test_cuda.py` runs only those,
as benchmarks/gpu_check.sh does). Engine equivalence (chain / factored step against vmap, the
batched Adam and L-BFGS engines against their per-victim loops), fused Adam, every built-in
attack end to end, the engine probe, and a bench through the CLI. On the GPU the comparisons run
in strict float32 (TF32 off: cuDNN's default for convolutions rounds inputs to 10 bits)."""

import dataclasses
import json
import sqlite3

import pytest
import torch
from test_cli import run
from test_engine import assert_same_trajectory

from gileak.default_plugins.attacks import CPL, DLG, IDLG, Analytic, Ignore, InvertingGradients
from gileak.default_plugins.defenses import CVB, NoDefense
from gileak.default_plugins.models import CNN, MLP
from gileak.engine import choice, lbfgs
from gileak.engine.matching import MatchingConfig, factored_engine, gradient_matching, make_victim_loss
from gileak.engine.schedule import PerVictimAdam
from gileak.threat import Target, shared_gradients

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param != "cuda":
        yield request.param
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield "cuda"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        torch.cuda.empty_cache()


def make_target(net, count, device, shape=(3, 32, 32), classes=10, seed=0):
    """`count` victims of `net` (built on the CPU, moved to `device`) with their shared gradients."""
    net = net.to(device)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, *shape, generator=generator).to(device)
    labels = torch.randint(classes, (count,), generator=generator).to(device)
    return Target(net=net, shared_gradient=shared_gradients(net, NoDefense(), images, labels), input_shape=shape,
                  num_classes=classes, labels=labels)


def cnn(defense=None, train=False):
    torch.manual_seed(0)
    net = CNN().build((3, 32, 32), 10)
    if defense is not None:
        defense.apply(net)
    return net.train(train)


@pytest.mark.parametrize("defended", [False, True], ids=["chain", "factored"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_the_factored_steps_match_vmap(device, defended, distance):
    from torch.func import grad_and_value, vmap

    target = make_target(cnn(CVB(position=[2]) if defended else None), 3, device)
    config = MatchingConfig(distance=distance)
    victim_loss = make_victim_loss(target, config)
    shared = tuple(target.shared_gradient[n] for n in victim_loss.names)
    fast = factored_engine(target, config, victim_loss)
    assert (fast.chain is None) == defended
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)
    reference, (losses, _) = vmap(grad_and_value(victim_loss, has_aux=True), randomness="different")(
        images, target.labels, shared)
    grads, fast_losses, _ = fast.step(images, target.labels, shared)
    assert grads.device.type == torch.device(device).type
    torch.testing.assert_close(grads, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())
    torch.testing.assert_close(fast_losses, losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_the_batched_adam_engine_matches_the_per_victim_loop(device, model):
    if model == "cnn":
        target = make_target(cnn(), 3, device)
    else:  # batch norm: the vmap engine
        torch.manual_seed(0)
        target = make_target(MLP(width=16).build((3, 8, 8), 10).train(), 3, device, shape=(3, 8, 8))
    results = {}
    for engine in ("batched", "loop"):
        with choice.use(engine), choice._watching() as seen:
            results[engine] = gradient_matching(target, MatchingConfig(lr=0.1, minmax=False), seeds=[1, 2, 3],
                                                max_iterations=15, labels=target.labels)
        assert seen == ["chain" if model == "cnn" else "vmap"] if engine == "batched" else seen == ["loop"]
    assert_same_trajectory(results["batched"].images, results["loop"].images)


def test_fused_per_victim_adam_matches_torch_adam(device):
    params = torch.randn(3, 5, device=device)
    grads = [torch.randn(3, 5, device=device) for _ in range(4)]
    adam = PerVictimAdam(torch.tensor([0.1, 0.5, 0.1], device=device))
    ours = params.clone()
    for g in grads:
        adam.step(ours, g, torch.ones(3, dtype=torch.bool, device=device))
    for i, lr in enumerate([0.1, 0.5, 0.1]):
        theirs = params[i].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([theirs], lr=lr)
        for g in grads:
            theirs.grad = g[i].clone()
            optimizer.step()
        torch.testing.assert_close(ours[i], theirs.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attack", ["idlg", "dlg"])
def test_the_batched_lbfgs_matches_the_reference_loop(device, attack):
    """In float64 (see test_lbfgs.py's `float64`): every decision taken alike."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if attack == "idlg":  # the factored evaluator
            target = make_target(cnn(), 3, device)
            config, labels, iterations = lbfgs.LBFGSConfig(minmax=False), target.labels, 6
        else:  # DLG's optimised labels: the vmap evaluator
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Sigmoid(),
                                      torch.nn.Linear(12, 4))
            target = make_target(net, 2, device, shape=(1, 4, 4), classes=4)
            config, labels, iterations = lbfgs.LBFGSConfig(optimise_labels=True, minmax=False), None, 15
        reference = lbfgs.lbfgs_matching(target, dataclasses.replace(config, vectorized=False),
                                         seeds=[0, 1, 2][:target.num_victims], max_iterations=iterations,
                                         labels=labels)
        batched = lbfgs.lbfgs_matching(target, config, seeds=[0, 1, 2][:target.num_victims],
                                       max_iterations=iterations, labels=labels)
    finally:
        torch.set_default_dtype(previous)
    assert lbfgs.last_run["engine"] == ("factored" if attack == "idlg" else "vmap")
    assert lbfgs.last_run["search_evaluations"] > target.num_victims  # the line search ran
    assert batched.iterations == reference.iterations
    torch.testing.assert_close(batched.images, reference.images, atol=1e-7, rtol=0)
    torch.testing.assert_close(torch.tensor(batched.final_loss), torch.tensor(reference.final_loss), rtol=1e-7,
                               atol=1e-16)
    assert batched.labels.tolist() == reference.labels.tolist()


@pytest.mark.parametrize("attack", [InvertingGradients(), Ignore(), DLG(), IDLG(labels="known"), CPL(), Analytic()],
                         ids=lambda a: a.name)
def test_every_attack_runs_on_the_device(device, attack):
    train = attack.name == "ignore"  # the CVB sampling: the stochastic path, the noise drawn on the device
    if attack.name == "analytic":  # it needs a biased FC layer first
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 12), torch.nn.Sigmoid(),
                                  torch.nn.Linear(12, 10))
        target = make_target(net, 2, device)
    else:
        target = make_target(cnn(CVB(position=[1]) if train else None, train=train), 2, device)
    result = attack.attack(target, seeds=[0, 1], max_iterations=3)
    assert result.images.shape == (2, 3, 32, 32) and torch.isfinite(result.images).all()
    assert all(torch.isfinite(torch.tensor(result.final_loss))) and len(result.iterations) == 2


def test_the_engine_probe_runs_on_the_device(device, monkeypatch):
    monkeypatch.setenv("GILEAK_ENGINE", "probe")
    torch.manual_seed(0)
    target = make_target(MLP(width=8).build((1, 4, 4), 4).train(), 3, device, shape=(1, 4, 4), classes=4)
    chosen = choice.choose(InvertingGradients(), target, [0, 1, 2])
    assert chosen.how == "probe" and chosen.path == "vmap" and min(chosen.rates.values()) > 0


def test_a_bench_runs_on_the_device_and_records_it(device, capsys, tmp_path):
    out = tmp_path / "run"
    code, text, _ = run(capsys, "bench", "--device", device, "--datasets", "digits", "--models", "cnn,mlp(width=16)",
                        "--attacks", "ig,idlg", "--victims", "2", "--iterations", "3", "--out", str(out))
    assert code == 0, text
    with sqlite3.connect(out / "results.sqlite") as db:
        envs = [json.loads(env) for env, in db.execute("SELECT env FROM results WHERE status = 'ok'")]
    assert len(envs) == 4 and {env["device"] for env in envs} == {device}
    assert all(env["engine"]["engine"] in ("batched", "loop") for env in envs)
