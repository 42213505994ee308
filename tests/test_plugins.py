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


def _plugin(**hooks):
    """A plugin object whose register_<plural> hooks register the given classes (or raise)."""
    from gileak import hookimpl

    namespace = {}
    for hook, items in hooks.items():
        def implementation(register, items=items):
            if isinstance(items, Exception):
                raise items
            for item in items:
                register(item)

        implementation.__name__ = hook
        namespace[hook] = staticmethod(hookimpl(implementation))
    return type("Plugin", (), namespace)


def _attack(name, description="a test attack"):
    from gileak import Attack

    return type(f"Attack_{name}", (Attack,), {"name": name, "description": description,
                                             "__module__": "tests.fake_plugin"})


def _record(name):
    return next(r for r in plugin_records() if r.name == name)


def test_a_plugin_clashing_with_a_built_in_fails_alone_and_the_built_in_keeps_the_name(monkeypatch, capsys):
    plugin = _plugin(register_attacks=[_attack("ig", "an impostor"), _attack("fine_attack")])
    with_entry_points(monkeypatch, FakeEntryPoint("impostor", "impostor", lambda: plugin))
    from gileak.default_plugins.attacks import InvertingGradients

    assert registry.get("attack", "ig") is InvertingGradients
    assert "fine_attack" not in registry.attacks()  # all or nothing: no half-loaded plugin
    error = _record("impostor").error
    assert "'ig'" in error and "built-in" in error and "gileak.default_plugins.attacks" in error
    assert "Attack_ig" in error  # both owners named
    assert _record("impostor").registered == {}
    assert "noise" in registry.defenses()  # the other plugins are untouched

    reset()
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "impostor" in out and "failed" in out and "noise" in out


def test_two_plugins_claiming_one_name_both_fail_naming_each_other_and_a_third_loads(monkeypatch):
    first = _plugin(register_attacks=[_attack("twin")])
    second = _plugin(register_attacks=[_attack("twin"), _attack("other_of_second")])
    third = _plugin(register_attacks=[_attack("third_attack")])
    with_entry_points(monkeypatch, FakeEntryPoint("first", "first", lambda: first),
                      FakeEntryPoint("second", "second", lambda: second),
                      FakeEntryPoint("third", "third", lambda: third))
    attacks = registry.attacks()
    assert "twin" not in attacks and "other_of_second" not in attacks
    assert "third_attack" in attacks and "ig" in attacks
    assert "'second'" in _record("first").error and "'first'" in _record("second").error
    assert _record("third").error is None
    assert set(registry.get_registry().failed_plugins) == {"first", "second"}


@pytest.mark.parametrize("bad,reason", [
    (lambda: 42, "not a Attack subclass"),
    (lambda: str, "not a Attack subclass"),
    (lambda: __import__("gileak").Defense, "not a Attack subclass"),  # a defense registered as an attack
    (lambda: _attack(""), "without a `name`"),
    (lambda: _attack("two words"), "cannot spell"),
    (lambda: _attack("x(y)"), "cannot spell"),
    (lambda: _attack("[/b]"), "cannot spell"),
])
def test_a_plugin_registering_something_unusable_fails_alone(monkeypatch, bad, reason):
    plugin = _plugin(register_attacks=[_attack("good_one"), bad()], register_defenses=[])
    with_entry_points(monkeypatch, FakeEntryPoint("sloppy", "sloppy", lambda: plugin))
    assert "good_one" not in registry.attacks() and "ig" in registry.attacks()
    assert reason in _record("sloppy").error
    assert "sloppy" in registry.get_registry().failed_plugins


def test_a_hook_that_raises_takes_the_plugins_other_hooks_with_it(monkeypatch):
    from gileak import Defense

    defense = type("HalfDefense", (Defense,), {"name": "half_defense", "description": "d"})
    plugin = _plugin(register_defenses=[defense], register_attacks=RuntimeError("half-written"))
    with_entry_points(monkeypatch, FakeEntryPoint("half", "half", lambda: plugin))
    assert "half_defense" not in registry.defenses() and "noise" in registry.defenses()
    assert "half-written" in _record("half").error


def test_a_plugin_registered_in_process_fails_alone_too():
    pm = load_plugins()
    pm.register(_plugin(register_attacks=[_attack("ig")]), name="in-process-impostor")
    try:
        registry.attacks()
        assert "clashes with the built-in" in _record("in-process-impostor").error
        assert _record("in-process-impostor").distribution == "registered in this process"
    finally:
        pm.unregister(name="in-process-impostor")
        reset()


def test_strict_mode_re_raises_hook_failures_and_clashes_with_the_cause_kept(monkeypatch):
    boom = RuntimeError("half-written")
    with_entry_points(monkeypatch, FakeEntryPoint("half", "half", lambda: _plugin(register_attacks=boom)))
    monkeypatch.setenv("GILEAK_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="half") as caught:
        registry.attacks()
    assert caught.value.__cause__ is boom

    reset()
    monkeypatch.undo()
    monkeypatch.setenv("GILEAK_STRICT_PLUGINS", "1")
    with_entry_points(monkeypatch, FakeEntryPoint("impostor", "impostor", lambda: _plugin(
        register_attacks=[_attack("ig")])))
    with pytest.raises(PluginLoadError, match="impostor") as caught:
        registry.attacks()
    assert isinstance(caught.value.__cause__, DuplicateComponentError)


COMMANDS = [
    ["list", "attacks"],
    ["plugins"],
    ["plugins", "--json"],
    ["inspect", "--model", "cnn", "--dataset", "digits", "--json"],
    ["bench", "--attacks", "igg"],
    ["bench", "--datasets", "digits", "--victims", "5000"],
    ["train", "--lr", "inf"],
    ["data", "list", "--json"],
    ["leaderboard", "/nonexistent-gileak-run"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_says_in_one_stderr_line_that_a_plugin_failed(monkeypatch, capsys, argv):
    with_entry_points(monkeypatch, FakeEntryPoint("sloppy", "sloppy", lambda: _plugin(register_attacks=[42])))
    code = main(argv)
    captured = capsys.readouterr()
    notices = [line for line in captured.err.splitlines() if line.startswith("warning:") and "failed to load" in line]
    assert len(notices) == 1 and "sloppy" in notices[0] and "`gileak plugins`" in notices[0]
    assert "Traceback" not in captured.err and code in (0, 2)

    reset()
    monkeypatch.undo()
    main(argv)
    assert "warning: " not in capsys.readouterr().err  # and none when every plugin loaded


def test_plugin_descriptions_and_reasons_print_literally(monkeypatch, capsys):
    plugin = _plugin(register_attacks=[_attack("bracketed", "[/b] closes nothing [red]:smile:")])
    broken = _plugin(register_attacks=RuntimeError("[/] in a reason"))
    with_entry_points(monkeypatch, FakeEntryPoint("brackets", "brackets", lambda: plugin),
                      FakeEntryPoint("[/]weird", "weird", lambda: broken))
    monkeypatch.setenv("COLUMNS", "400")  # one table line per row
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert "[/b] closes nothing [red]:smile:" in out
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "[/] in a reason" in out and "[/]weird" in out


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
