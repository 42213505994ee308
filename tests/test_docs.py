"""Keep the user documentation in step with the code: hooks, commands, options, links, and the
plugin examples in docs/writing-plugins.md (compiled, and the attacks run on a tiny target)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pluggy
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = ("getting-started.md", "cli.md", "writing-plugins.md", "hooks.md", "security.md", "threat-models.md")


def _read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _hookspecs() -> dict[str, str]:
    """name -> 'name(args)' of every hookspec, found through pluggy as gileak's manager does."""
    from gileak import hookspecs

    pm = pluggy.PluginManager("gileak")
    pm.add_hookspecs(hookspecs)
    specs = {}
    for name in dir(pm.hook):
        caller = getattr(pm.hook, name)
        if name.startswith("_") or not isinstance(caller, pluggy.HookCaller) or caller.spec is None:
            continue
        function = caller.spec.function
        specs[name] = f"{name}({', '.join(inspect.signature(function).parameters)})"
    return specs


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


# --- hooks.md ---------------------------------------------------------------------------------


def test_every_hookspec_is_documented_with_its_signature():
    specs = _hookspecs()
    assert specs, "no hookspecs found in gileak.hookspecs"
    headings = set(re.findall(r"^## (\w+\(.*?\))\s*$", _read("hooks.md"), flags=re.MULTILINE))
    for name, signature in specs.items():
        assert signature in headings, f"docs/hooks.md lacks a heading '## {signature}'"


def test_hooks_md_documents_no_hook_that_does_not_exist():
    specs = _hookspecs()
    documented = re.findall(r"^## (\w+)\(", _read("hooks.md"), flags=re.MULTILINE)
    assert documented
    unknown = sorted(set(documented) - set(specs))
    assert not unknown, f"docs/hooks.md documents hooks that gileak.hookspecs does not define: {unknown}"


# --- cli.md -----------------------------------------------------------------------------------


def _commands() -> dict[str, object]:
    from gileak.cli import app

    commands = {}
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        commands[name] = info.callback
    return commands


def test_every_command_has_a_heading_in_cli_md():
    commands = _commands()
    assert {"bench", "list", "plugins", "inspect"} <= set(commands)
    headings = set(re.findall(r"^## gileak (\S+)", _read("cli.md"), flags=re.MULTILINE))
    missing = sorted(set(commands) - headings)
    assert not missing, f"docs/cli.md lacks '## gileak <cmd>' headings for: {missing}"
    extra = sorted(headings - set(commands))
    assert not extra, f"docs/cli.md has headings for commands that do not exist: {extra}"


def _option_names(callback) -> list[str]:
    """--kebab-name of each option of a command: the declared names when given, else the parameter's."""
    import typing

    hints = typing.get_type_hints(callback, include_extras=True)  # the CLI modules use string annotations
    names = []
    for parameter in inspect.signature(callback).parameters.values():
        info = None
        for meta in getattr(hints.get(parameter.name), "__metadata__", ()):
            info = meta
        if info is None and parameter.default is not inspect.Parameter.empty:
            info = parameter.default
        # In Annotated[..., typer.Option("--json")] typer keeps the first declaration as `default`.
        candidates = [getattr(info, "default", None), *(getattr(info, "param_decls", None) or ())]
        declared = [d for d in candidates if isinstance(d, str) and d.startswith("--")]
        if "ArgumentInfo" in {cls.__name__ for cls in type(info).__mro__}:
            continue
        names.extend(declared or ["--" + parameter.name.replace("_", "-")])
    return names


def test_every_bench_option_is_in_cli_md():
    cli = _read("cli.md")
    options = _option_names(_commands()["bench"])
    assert "--victims" in options and "--spec" in options
    missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", cli)]
    assert not missing, f"docs/cli.md does not mention these bench options: {missing}"


def test_every_option_of_the_other_commands_is_in_cli_md():
    cli = _read("cli.md")
    for name, callback in _commands().items():
        for option in _option_names(callback):
            assert re.search(re.escape(option) + r"(?![\w-])", cli), f"docs/cli.md misses {option} of {name}"


# --- README -----------------------------------------------------------------------------------


def test_readme_links_to_every_doc_and_they_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in DOC_FILES:
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
        assert f"(docs/{name})" in readme, f"README.md does not link to docs/{name}"


def test_relative_links_between_docs_resolve():
    for name in DOC_FILES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(name)):
            if "://" in target:
                continue
            assert (DOCS / target).exists(), f"docs/{name} links to missing {target}"


# --- writing-plugins.md -----------------------------------------------------------------------


def test_plugin_examples_compile():
    blocks = _python_blocks(_read("writing-plugins.md"))
    assert any("(Attack)" in block for block in blocks), "writing-plugins.md shows no attack"
    for index, block in enumerate(blocks):
        compile(block, f"writing-plugins.md[python block {index}]", "exec")


def test_pyproject_example_declares_the_entry_point_group():
    import tomllib

    toml_blocks = re.findall(r"```toml\n(.*?)```", _read("writing-plugins.md"), flags=re.DOTALL)
    assert toml_blocks
    data = tomllib.loads(toml_blocks[0])
    entry_points = data["project"]["entry-points"]["gileak"]
    assert entry_points == {"myattack": "gileak_myattack"}


def _exec_block(block: str) -> dict:
    namespace: dict = {"__name__": "gileak_docs_example"}
    exec(compile(block, "writing-plugins.md", "exec"), namespace)
    return namespace


def _registered(namespace: dict, hook: str) -> list[type]:
    collected: list[type] = []
    namespace[hook](register=collected.append)
    return collected


@pytest.fixture(scope="module")
def tiny_target():
    import torch
    from torch import nn

    from gileak.default_plugins.defenses import NoDefense
    from gileak.threat import Target, shared_gradients

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images = torch.rand(2, 1, 4, 4)
    labels = torch.tensor([0, 2])
    gradients = shared_gradients(net, NoDefense(), images, labels)
    return Target(net=net, shared_gradient=gradients, input_shape=(1, 4, 4), num_classes=3, labels=labels)


@pytest.mark.parametrize("index", [i for i, b in enumerate(_python_blocks(_read("writing-plugins.md")))
                                   if "(Attack)" in b])
def test_attack_examples_register_and_run(index, tiny_target):
    from gileak import Attack, NotApplicableError, Reconstruction
    from gileak.registry import Registry
    from gileak.threat import Target

    namespace = _exec_block(_python_blocks(_read("writing-plugins.md"))[index])
    classes = _registered(namespace, "register_attacks")
    assert classes and all(issubclass(c, Attack) for c in classes)
    registry = Registry()  # a private registry: the process-wide one is left alone
    for cls in classes:
        registry.add("attack", cls, "docs-example")
        assert registry.get("attack", cls.name) is cls
        assert cls.description
        calls: list[int] = []
        result = cls().attack(tiny_target, seeds=[1, 2], max_iterations=5, progress=calls.append)
        assert isinstance(result, Reconstruction)
        assert tuple(result.images.shape) == (2, 1, 4, 4)
        assert len(result.iterations) == 2 and len(result.final_loss) == 2
        assert 0 < sum(calls) <= 5
        # victim i depends on seeds[i] alone: attacking victim 1 by itself gives the same image
        alone = Target(net=tiny_target.net, shared_gradient={k: v[1:] for k, v in tiny_target.shared_gradient.items()},
                       input_shape=tiny_target.input_shape, num_classes=3, labels=tiny_target.labels[1:])
        single = cls().attack(alone, seeds=[2], max_iterations=5)
        assert (single.images[0] - result.images[1]).abs().max() < 1e-4
        # without labels the attack says it does not apply
        unlabeled = Target(net=tiny_target.net, shared_gradient=tiny_target.shared_gradient,
                           input_shape=tiny_target.input_shape, num_classes=3, labels=None)
        with pytest.raises(NotApplicableError):
            cls().attack(unlabeled, seeds=[1, 2], max_iterations=1)


def test_the_stochastic_module_example_gets_per_victim_noise_and_ignores_cut():
    import torch
    from torch import nn

    from gileak.default_plugins.defenses import NoDefense
    from gileak.nets import first_stochastic_cut
    from gileak.threat import shared_gradients

    block = next(b for b in _python_blocks(_read("writing-plugins.md")) if "class NoisyBottleneck" in b)
    bottleneck = _exec_block(block)["NoisyBottleneck"]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bottleneck(4, 2), nn.Flatten(), nn.Linear(144, 3)).train()
    assert first_stochastic_cut(net, (1, 6, 6)) == ["0.weight", "0.bias", "1.encoder.weight"]
    images, labels = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 2])
    batch = shared_gradients(net, NoDefense(), images, labels, seeds=[4, 5, 6])
    alone = shared_gradients(net, NoDefense(), images[1:2], labels[1:2], seeds=[5])
    assert torch.equal(batch["1.decoder.weight"][1], alone["1.decoder.weight"][0])
    other = shared_gradients(net, NoDefense(), images[1:2], labels[1:2], seeds=[7])
    assert not torch.equal(other["1.decoder.weight"][0], alone["1.decoder.weight"][0])


def test_defense_model_dataset_examples_work():
    import torch

    from gileak import Dataset, Defense, Model
    from gileak.nets import Slot, slots

    blocks = _python_blocks(_read("writing-plugins.md"))
    defenses = [c for b in blocks if "(Defense)" in b for c in _registered(_exec_block(b), "register_defenses")]
    models = [c for b in blocks if "(Model)" in b for c in _registered(_exec_block(b), "register_models")]
    datasets = [c for b in blocks if "(Dataset)" in b for c in _registered(_exec_block(b), "register_datasets")]
    assert defenses and models and datasets
    assert all(issubclass(c, Defense) for c in defenses)

    for dataset_cls in datasets:
        assert issubclass(dataset_cls, Dataset)
        dataset = dataset_cls()
        info = dataset.info()
        splits = dataset.load(seed=0)
        assert tuple(splits.train_images.shape[1:]) == info.shape
        assert splits.train_images.min() >= 0 and splits.train_images.max() <= 1
        assert int(splits.train_labels.max()) < info.num_classes and len(splits.test_images) > 0

    for model_cls in models:
        assert issubclass(model_cls, Model)
        model = model_cls()
        shape = model.input_shape(info.shape)
        net = model.build(shape, info.num_classes)
        assert any(isinstance(m, Slot) for m in net.modules())
        for defense_cls in defenses:
            defended = model.build(shape, info.num_classes)
            defense_cls().apply(defended)
            logits = defended(splits.train_images[:3])
            assert tuple(logits.shape) == (3, info.num_classes)
            gradient = {n: torch.randn(p.shape) for n, p in defended.named_parameters()}
            changed = defense_cls().transform_gradient(gradient, torch.Generator().manual_seed(0))
            assert set(changed) == set(gradient)
            assert all(changed[n].shape == gradient[n].shape for n in gradient)
        assert slots(net)


@pytest.mark.parametrize("doc", ["writing-plugins.md", "hooks.md"])
def test_client_examples_register_upload_and_simulate_their_upload(doc):
    """Each client example registers, and its simulation on the true images is its upload in
    gradient units; the built-in attacks run on it (they declare handles_clients)."""
    import torch
    from torch import nn

    from gileak import Client
    from gileak.default_plugins.attacks import InvertingGradients
    from gileak.default_plugins.defenses import NoDefense
    from gileak.registry import Registry
    from gileak.threat import Target, shared_gradients

    blocks = [b for b in _python_blocks(_read(doc)) if "(Client)" in b]
    assert blocks, f"{doc} shows no client"
    for block in blocks:
        for cls in _registered(_exec_block(block), "register_clients"):
            assert issubclass(cls, Client) and cls.description
            Registry().add("client", cls, "docs-example")
            client = cls()
            torch.manual_seed(0)
            net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
            count = client.images_per_victim()
            images = torch.rand(2 * count, 1, 4, 4, generator=torch.Generator().manual_seed(1))
            labels = torch.arange(2 * count) % 3
            uploads = shared_gradients(net, NoDefense(), images, labels, client=client)
            target = Target(net=net, shared_gradient=uploads, input_shape=(1, 4, 4), num_classes=3, labels=labels,
                            client=client)
            simulated = target.simulate(target.params, target.frozen, images[:count], labels[:count],
                                        list(target.params))
            for name, value in target.shared_in_gradient_units().items():
                torch.testing.assert_close(simulated[name], value[0], atol=1e-6, rtol=1e-4)
            result = InvertingGradients().attack(target, seeds=[0, 1], max_iterations=2)
            assert result.images.shape == (2 * count, 1, 4, 4)


def test_every_builtin_component_and_parameter_is_in_components_md():
    from gileak import registry

    text = (ROOT / "docs" / "components.md").read_text()
    reg = registry.get_registry()
    for (kind, name), owner in reg.owners.items():
        if not owner.startswith("gileak.default_plugins"):
            continue
        assert f"### `{name}`" in text, f"{kind} {name} is missing from docs/components.md"
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        for parameter, *_ in reg.components[kind][name].parameter_table():
            assert f"`{parameter}`" in section, f"{kind} {name}: parameter {parameter} undocumented"


# --- reproducing.md ---------------------------------------------------------------------------


def _reproduction_commands(text: str | None = None) -> list[list[str]]:
    import shlex

    text = _read("reproducing.md") if text is None else text
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.startswith("gileak ")]


def _planned_reproductions():
    """(argv, plan) of each `gileak bench` line of docs/reproducing.md."""
    import typer.main

    from gileak.cli import app
    from gileak.runner import plan
    from gileak.spec import build_spec

    group = typer.main.get_command(app)
    not_spec = {"dry_run", "executor", "ray_address", "workers"}
    planned = []
    for argv in (c for c in _reproduction_commands() if c[1] == "bench"):
        context = group.commands["bench"].make_context("bench", argv[2:])
        params = {k: v for k, v in context.params.items() if k not in not_spec}
        params["exports"] = params.pop("export") or None
        spec = build_spec(params.pop("spec"), **params)
        planned.append((argv, spec, plan(spec, check_data=False)))
    return planned


def test_every_reproduction_command_parses_and_plans_without_data():
    """Each `gileak bench` line of docs/reproducing.md is a valid command whose matrix plans
    (names, parameters, grids, budgets) — without running it or needing the datasets — and
    computes each point once."""
    import typer.main

    from gileak.cli import app
    from gileak.runner import cell_id

    group = typer.main.get_command(app)
    commands = _reproduction_commands()
    planned = _planned_reproductions()
    assert len(planned) >= 16
    for argv, spec, found in planned:
        assert spec.profile == "paper", argv
        assert found.cells, argv
        ids = [cell_id(cell) for cell in found.cells]
        assert len(ids) == len(set(ids)), f"{argv} plans one cell twice under two labels"
    for argv in commands:
        assert argv[1] in {"bench", "leaderboard", "inspect", "data"}, argv
        context = group.commands[argv[1]]
        if argv[1] != "data":
            context.make_context(argv[1], argv[2:])  # parses


def test_table_i_commands_exclude_layers_the_defended_models_have():
    """Table I's `exclude=` names are checked at plan time against the defended CNN built on
    CIFAR-10's declared shape (no data needed): a misspelt layer would stop the bench."""
    import typer.main

    from gileak.cli import app
    from gileak.errors import ParamsError
    from gileak.runner import plan
    from gileak.spec import build_spec

    group = typer.main.get_command(app)
    section = _read("reproducing.md").split("## Table I ", 1)[1].split("\n## ", 1)[0]
    table1 = [c for c in _reproduction_commands(section) if c[1] == "bench"]
    assert len(table1) == 3 and sum("exclude=" in " ".join(c) for c in table1) == 2

    def planned(argv):
        params = group.commands["bench"].make_context("bench", argv[2:]).params
        spec = build_spec(None, datasets=params["datasets"], models=params["models"],
                          defenses=params["defenses"], attacks=params["attacks"], profile="paper")
        return plan(spec, check_data=False)

    for argv in table1:
        labels = [a.label for a in planned(argv).cells[0].attacks]
        assert all(label.startswith(("ig", "ignore")) for label in labels)
        if "exclude=" in " ".join(argv):
            misspelt = [a.replace(".body.0.decoder", ".body.0.decodr") for a in argv]
            with pytest.raises(ParamsError, match="did you mean"):
                planned(misspelt)


def test_every_published_row_has_a_planned_twin_in_reproducing_md():
    """Every cell (and attack) of the paper's Tables I-XII that gileak transcribed is planned,
    with the same canonical identity, by some command of docs/reproducing.md."""
    from gileak import paper
    from gileak.runner import attack_id, cell_id

    planned_cells, planned = set(), set()
    for _, _, found in _planned_reproductions():
        for cell in found.cells:
            cid = cell_id(cell).rsplit(" | seed=", 1)[0]
            planned_cells.add(cid)
            planned.update((cid, attack_id(attack)) for attack in cell.attacks)
    missing = []
    for entry, cell, attack in paper._indexed():
        cid = " | ".join(cell)
        if (cid not in planned_cells) if attack is None else ((cid, attack) not in planned):
            missing.append(f"Table {entry.table} {entry.row}: {entry.dataset} {entry.model} {entry.defense} {entry.attack}")
    assert not missing, "\n".join(missing)
