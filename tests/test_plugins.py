"""Plugins: discovery through the `gileak` entry-point group, failures reported not fatal,
and the out-of-tree gileak-noise distribution running through `gileak bench`."""

import importlib.metadata
import json

import pytest
import torch

from gileak import registry
from gileak.cli import main
from gileak.errors import DuplicateComponentError, UnknownComponentError
from gileak.plugins import PluginLoadError, load_plugins, plugin_records, reset


@pytest.fixture(autouse=True)
def fresh_plugins():
    reset()
    yield
    reset()


class FakeEntryPoint:
    """Stands in for an installed distribution's entry point."""

    def __init__(self, name, value, loader):
        self.name, self.value, self._loader = name, value, loader
        self.dist = type("Dist", (), {"name": f"fake-{name}", "version": "9.9"})()

    def load(self):
        return self._loader()


def with_entry_points(monkeypatch, *extra):
    real = importlib.metadata.entry_points

    def entry_points(group=None, **kwargs):
        found = list(real(group=group, **kwargs)) if group else real(**kwargs)
        return found + list(extra) if group == "gileak" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_the_noise_distribution_is_found_through_its_entry_point():
    assert "noise" in registry.defenses()
    record = next(r for r in plugin_records() if r.name == "noise")
    assert record.distribution.startswith("gileak-noise") and record.error is None
    assert record.registered == {"defenses": ["noise"]}
    assert registry.get_registry().owners[("defense", "noise")] == "noise"


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_still_load(monkeypatch, capsys):
    def broken():
        raise ImportError("No module named 'gileak_missing'")

    with_entry_points(monkeypatch, FakeEntryPoint("missing", "gileak_missing", broken))
    assert "ig" in registry.attacks() and "noise" in registry.defenses()
    record = next(r for r in plugin_records() if r.name == "missing")
    assert "gileak_missing" in record.error

    reset()
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "missing" in out and "failed" in out and "gileak_missing" in out and "noise" in out

    reset()
    with pytest.raises(UnknownComponentError, match="failed to load.*missing"):
        registry.get("attack", "from_the_missing_plugin")


def test_strict_mode_re_raises_a_broken_plugin(monkeypatch):
    with_entry_points(monkeypatch, FakeEntryPoint("missing", "gileak_missing", lambda: 1 / 0))
    with pytest.raises(PluginLoadError, match="missing"):
        load_plugins(strict=True)


def test_a_plugin_whose_hook_raises_is_reported_not_fatal(monkeypatch):
    from gileak import hookimpl

    class Plugin:
        @staticmethod
        @hookimpl
        def register_attacks(register):
            raise RuntimeError("half-written plugin")

    with_entry_points(monkeypatch, FakeEntryPoint("halfway", "halfway", lambda: Plugin))
    assert "ig" in registry.attacks()
    record = next(r for r in plugin_records() if r.name == "halfway")
    assert "half-written plugin" in record.error


def test_two_plugins_registering_the_same_name_is_a_clear_error(monkeypatch):
    from gileak import Attack, hookimpl

    class FakeIG(Attack):
        name = "ig"
        description = "an impostor"

    class Plugin:
        @staticmethod
        @hookimpl
        def register_attacks(register):
            register(FakeIG)

    with_entry_points(monkeypatch, FakeEntryPoint("impostor", "impostor", lambda: Plugin))
    with pytest.raises(DuplicateComponentError, match="'ig'.*impostor"):
        registry.attacks()


def test_unknown_names_suggest_the_closest_component():
    with pytest.raises(UnknownComponentError, match="Did you mean: noise"):
        registry.get("defense", "nois")


def test_noise_changes_the_gradient_by_the_requested_amount():
    from gileak_noise import GaussianNoise

    gradient = {"w": torch.full((200, 200), 2.0), "b": torch.zeros(10)}
    noisy = GaussianNoise(std=0.5).transform_gradient(gradient, torch.Generator().manual_seed(0))
    assert (noisy["w"] - 2.0).std().item() == pytest.approx(0.5, rel=0.02)
    relative = GaussianNoise(std=0.5, relative=True).transform_gradient(gradient, torch.Generator().manual_seed(0))
    assert (relative["w"] - 2.0).std().item() == pytest.approx(1.0, rel=0.02)  # 0.5 x RMS 2
    assert torch.equal(relative["b"], gradient["b"])  # RMS 0: nothing to scale
    again = GaussianNoise(std=0.5).transform_gradient(gradient, torch.Generator().manual_seed(0))
    assert torch.equal(noisy["w"], again["w"])


def test_gileak_bench_runs_the_out_of_tree_defense_and_noise_hurts_the_attack(tmp_path, capsys):
    out = tmp_path / "lb.json"
    code = main(["bench", "--datasets", "digits", "--defenses", "none,noise(std=1)", "--victims", "2",
                 "--iterations", "150", "--out", str(tmp_path / "run"), "--export", str(out)])
    assert code == 0, capsys.readouterr()
    rows = {row["defense"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"none", "noise(std=1)"}
    assert rows["noise(std=1)"]["params_added_pct"] == 0
    assert rows["noise(std=1)"]["mse_mean"] > rows["none"]["mse_mean"]
