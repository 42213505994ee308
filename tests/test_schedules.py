"""IG's learning-rate schedules (paper, plateau, step, cosine), how `--profile paper` selects the
paper's, and `gileak inspect` without a dataset's files."""

from __future__ import annotations

import json

import pytest
import torch

from gileak.default_plugins.attacks import PAPER_PROTOCOL, InvertingGradients
from gileak.engine import MatchingConfig, gradient_matching
from gileak.engine.schedule import BudgetDecayAndStop, budget_factor
from gileak.errors import ParamsError


@pytest.mark.parametrize("total", [7, 100, 1000])
def test_step_schedule_is_inverting_gradients_multistep_lr(total):
    """Geiping et al.'s code: MultiStepLR(milestones=[T // 2.667, T // 1.6, T // 1.142], gamma=0.1),
    stepped once per iteration."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[total // 2.667, total // 1.6, total // 1.142], gamma=0.1)
    for iteration in range(total):
        assert budget_factor("step", iteration, total) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        reference.step()


@pytest.mark.parametrize("total", [10, 300])
def test_cosine_schedule_is_cosine_annealing_to_zero(total):
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    for iteration in range(total):
        assert budget_factor("cosine", iteration, total) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-9)
        optimizer.step()
        reference.step()


def test_budget_decay_sets_active_victims_learning_rates_and_stops_each_on_its_own():
    schedule = BudgetDecayAndStop(2, "step", initial_lr=0.5, total=8, stop_patience=3, min_loss=1e-5)
    lr, active = torch.full((2,), 0.5), torch.ones(2, dtype=torch.bool)
    history = []
    for loss0, loss1 in [(1.0, 1.0), (0.9, 1e-6), (0.8, 1e-6), (0.8, 1e-6), (0.8, 1e-6), (0.8, 1e-6)]:
        lr, _, active = schedule.update(torch.tensor([loss0, loss1]), lr, active)
        history.append((lr.tolist(), active.tolist()))
    assert history[0][0] == pytest.approx([0.5, 0.5])
    assert history[1] == (pytest.approx([0.05, 0.05]), [True, False])  # 8 // 2.667 = 2; victim 1 below min_loss
    assert history[4][0] == pytest.approx([0.005, 0.05])  # 8 // 1.6 = 5; the stopped victim keeps its lr
    assert history[-1][1] == [False, False]  # victim 0: three iterations without a better loss
    with pytest.raises(ValueError):
        BudgetDecayAndStop(1, "linear", initial_lr=1.0, total=10)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_budget_schedules_keep_each_victim_independent_of_the_batch(schedule):
    from gileak.default_plugins.defenses import NoDefense
    from gileak.default_plugins.models import CNN
    from gileak.threat import Target, shared_gradients

    torch.manual_seed(0)
    net = CNN().build((3, 32, 32), 10)
    images, labels = torch.rand(3, 3, 32, 32), torch.tensor([1, 4, 7])
    gradients = shared_gradients(net, NoDefense(), images, labels)
    config = MatchingConfig(schedule=schedule, lr=0.1, minmax=False)
    both = gradient_matching(Target(net, gradients, (3, 32, 32), 10, labels=labels), config, seeds=[5, 6, 7],
                             max_iterations=12, labels=labels)
    alone = gradient_matching(Target(net, {k: v[1:2] for k, v in gradients.items()}, (3, 32, 32), 10,
                                     labels=labels[1:2]), config, seeds=[6], max_iterations=12, labels=labels[1:2])
    torch.testing.assert_close(both.images[1], alone.images[0], atol=1e-5, rtol=1e-4)


def test_ig_schedules_configure_the_engine():
    default = InvertingGradients().config(max_iterations=1000)
    assert (default.schedule, default.lr, default.tv_weight) == ("cosine", 0.1, 0.05)  # docs/attack-strength.md
    paper = InvertingGradients(**PAPER_PROTOCOL)
    at_cap = paper.config(max_iterations=20_000)
    assert (at_cap.schedule, at_cap.lr, at_cap.tv_weight, at_cap.plateau_patience, at_cap.stop_patience) == \
        ("plateau", 1.0, 0.01, 400, 4000)
    scaled = paper.config(max_iterations=1000)
    assert (scaled.plateau_patience, scaled.stop_patience) == (20, 200)
    fixed = InvertingGradients(schedule="plateau").config(max_iterations=1000)
    assert (fixed.schedule, fixed.plateau_patience, fixed.stop_patience) == ("plateau", 100, 1000)
    assert InvertingGradients(schedule="plateau", plateau=30, stop_patience=300).config().stop_patience == 300
    step = InvertingGradients(schedule="step").config(max_iterations=1000)
    assert step.schedule == "step" and step.stop_patience >= 10**9
    assert InvertingGradients(schedule="cosine", stop_patience=500).config().stop_patience == 500
    with pytest.raises(ParamsError, match="plateau=100 applies to schedule=paper or schedule=plateau"):
        InvertingGradients(schedule="step", plateau=100)
    with pytest.raises(ParamsError):
        InvertingGradients(schedule="linear")


def test_profile_paper_selects_the_papers_schedule_unless_the_user_chose_one():
    from gileak.runner import attack_id, plan
    from gileak.spec import build_spec

    attacks = "ig,ignore,ig(schedule=step),ig(lr=0.5),dlg"
    paper = plan(build_spec(profile="paper", attacks=attacks, iterations=10, victims=1, seeds=1), check_data=False)
    quick = plan(build_spec(attacks=attacks), check_data=False)
    by_label = {a.label: a.component.params for a in paper.cells[0].attacks}
    assert by_label["ig"].schedule == by_label["ignore"].schedule == "paper"
    assert (by_label["ig"].lr, by_label["ig"].tv) == (1.0, 0.01)
    assert by_label["ig(schedule=step)"].schedule == "step"  # the user's choice wins
    assert by_label["ig(lr=0.5)"].schedule == "paper" and by_label["ig(lr=0.5)"].lr == 0.5
    quick_params = {a.label: a.component.params for a in quick.cells[0].attacks}
    default = InvertingGradients().params
    assert quick_params["ig"] == default and quick_params["ig(schedule=step)"].schedule == "step"
    # the schedule is part of a result's identity: the two profiles' `ig` are different results
    assert (attack_id(paper.cells[0].attacks[0]) == attack_id(quick.cells[0].attacks[0])) == (default.schedule == "paper")


@pytest.mark.parametrize("dataset,defense,params", [
    ("cifar10", "precode(position=3)", 72106),
    ("cifar10", "none", 65962),
    ("mnist", "cvb", None),
    ("bloodmnist(size=64)", "none", None),
])
def test_inspect_needs_no_dataset_files(tmp_path, monkeypatch, capsys, dataset, defense, params):
    from gileak.cli import main

    monkeypatch.setenv("GILEAK_DATA", str(tmp_path))  # an empty data root
    assert main(["inspect", "--model", "cnn", "--dataset", dataset, "--defense", defense, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_classes"] in (8, 10) and summary["input_shape"][1:] == [32, 32]
    if params is not None:
        assert summary["params"] == params
    assert not any(tmp_path.iterdir())  # nothing was downloaded or written
    assert main(["bench", "--datasets", dataset, "--victims", "1", "--iterations", "1",
                 "--out", str(tmp_path / "run")]) == 2  # a run still needs the files, and says so
