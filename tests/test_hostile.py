"""Hostile input: random text, unicode, brackets, NaN/inf/huge numbers in the component syntax,
the spec and every parameter exit 0 or 2, never a traceback; degenerate attacks (one class, zero
or non-finite gradients, NaN losses, diverged training) fail with their reason, never a score;
user text is printed as written."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gileak import Attack, Dataset, DatasetInfo, Model, Splits, hookimpl, registry
from gileak.cli import main
from gileak.errors import ParamsError, SpecError, UserInputError
from gileak.plugins import load_plugins, reset
from gileak.spec import ComponentRef, build_spec, parse_components

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- strategies -----------------------------------------------------------------------------

#: Characters that have broken parsers and printers: the syntax's own, rich markup, emoji codes,
#: quotes, escapes, right-to-left override, NUL, newlines, wide and astral characters.
NASTY = list("()[]/=,|\\ :\"'`$~*.-_+#@!%") + ["[/]", "[/b]", "[red]", ":smile:", "é", "漢", "🙂", "\u202e",
                                               "\x1b[31m", "\n", "\t", "\x00", "\ufeff", "\x7f"]
hostile_text = st.one_of(
    st.lists(st.sampled_from(NASTY), max_size=8).map("".join),
    st.text(max_size=20),
)
hostile_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e-400", "0", "-0", "1e308",
                     "1e39", "1e30", "1_000", "0x10", "1e", ".", "true", "None", "null", "10**9", "1e9"]),
)


def _builtin(kind: str) -> list[str]:
    reg = registry.get_registry()
    return sorted(name for (k, name), owner in reg.owners.items() if k == kind)


@st.composite
def hostile_component(draw, kind: str):
    """A registered component with one or two parameters from the hostile strategies: mostly
    its own parameter names (so validation is reached), sometimes unknown ones or broken syntax."""
    name = draw(st.sampled_from(_builtin(kind)))
    fields = [p for p, *_ in registry.get(kind, name).parameter_table()] or ["x"]
    items = []
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.one_of(st.sampled_from(fields), st.sampled_from(fields), hostile_text))
        value = draw(st.one_of(hostile_number, hostile_number, hostile_text))
        items.append(f"{key}={value}")
    text = f"{name}({','.join(items)})"
    return draw(st.one_of(st.just(text), st.just(text), hostile_text.map(lambda junk: text + junk)))


@contextlib.contextmanager
def no_cost_probes():
    """--dry-run without its cost probes: the plan and the printing are what is under test."""
    with mock.patch("gileak.estimate.estimate", return_value=[]):
        yield


def assert_clean(code, out, err):
    assert code in (0, 2), (code, out, err)
    assert "Traceback" not in out + err


# --- the component syntax and the spec -------------------------------------------------------


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.one_of(hostile_text, st.lists(st.sampled_from(NASTY + ["a", "b", "x=1", "(", ")", ","]),
                                        max_size=12).map("".join)))
def test_the_component_syntax_parses_or_says_why(text):
    try:
        refs = parse_components(text)
    except SpecError:
        return
    assert refs and all(isinstance(ref, ComponentRef) and ref.name for ref in refs)
    assert all(isinstance(v, str) for ref in refs for v in ref.params.values())


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(["victims", "iterations", "rounds", "seeds", "patience", "attack_at",
                                        "device", "profile", "trace", "models", "attacks", "data_root"]),
                       st.one_of(st.integers(-(10**30), 10**30), hostile_text, hostile_number, st.none(),
                                 st.booleans(), st.floats(allow_nan=True)), max_size=5))
def test_build_spec_returns_a_spec_or_a_spec_error(overrides):
    try:
        build_spec(**overrides)
    except SpecError:
        pass


@FAST
@given(kind=st.sampled_from(["attacks", "defenses", "models", "datasets"]), data=st.data())
def test_hostile_parameters_through_the_cli_exit_0_or_2(capsys, kind, data):
    component = data.draw(hostile_component(kind.rstrip("s")))
    argv = ["bench", "--dry-run", "--device", "cpu", f"--{kind}", component]
    if kind != "datasets":
        argv += ["--datasets", "digits"]
    with no_cost_probes():
        code, out, err = run(capsys, *argv)
    assert_clean(code, out, err)
    if code == 0:  # every float the plan accepted is finite
        from gileak.runner import plan

        spec = build_spec(**{kind: component, "datasets": "digits" if kind != "datasets" else component})
        for cell in plan(spec, check_data=False).cells:
            for resolved in (cell.dataset, cell.model, cell.defense, *cell.attacks):
                values = resolved.component.params.model_dump().values()
                assert all(math.isfinite(v) for v in values if isinstance(v, float))


@FAST
@given(flag=st.sampled_from(["--victims", "--iterations", "--rounds", "--seeds", "--patience", "--attack-at",
                             "--device", "--profile"]),
       value=st.one_of(hostile_number, hostile_text))
def test_hostile_budgets_through_the_cli_exit_0_or_2(capsys, flag, value):
    if value.startswith("-"):  # would be read as an option name: the parser's own usage error
        value = " " + value
    with no_cost_probes():
        code, out, err = run(capsys, "bench", "--dry-run", "--device", "cpu", "--datasets", "digits", flag, value)
    assert_clean(code, out, err)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


@FAST
@given(values=st.dictionaries(
    st.sampled_from(["victims", "iterations", "seeds", "defenses", "attacks", "models", "attack_at", "nonsense"]),
    st.one_of(st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
              hostile_text, st.lists(hostile_text, max_size=3)), max_size=4))
def test_hostile_spec_files_exit_0_or_2(capsys, tmp_path_factory, values):
    spec = tmp_path_factory.mktemp("spec") / "bench.toml"
    spec.write_text('datasets = "digits"\n' + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()),
                    encoding="utf-8", errors="surrogatepass")
    with no_cost_probes():
        code, out, err = run(capsys, "bench", "--dry-run", "--device", "cpu", "--spec", str(spec))
    assert_clean(code, out, err)


@FAST
@given(command=st.sampled_from(["list", "inspect", "train", "data", "leaderboard"]), text=hostile_text)
def test_hostile_text_in_other_commands_exits_0_or_2(capsys, command, text):
    argv = {
        "list": ["list", text],
        "inspect": ["inspect", "--model", "cnn", "--dataset", f"folder(path={text})", "--defense", "none"],
        "train": ["train", "--dataset", f"folder(path=/nonexistent-gileak/{text})", "--rounds", "1"],
        "data": ["data", "fetch", text],
        "leaderboard": ["leaderboard", "/nonexistent/" + text.replace("\x00", "")],
    }[command]
    with mock.patch("gileak.default_plugins.datasets.DownloadableDataset.fetch",
                    side_effect=AssertionError("no download in tests")):
        code, out, err = run(capsys, *argv)
    assert_clean(code, out, err)


# --- every float parameter of every built-in is finite -----------------------------------------


def _float_parameters():
    cases = []
    reg = registry.get_registry()
    for (kind, name), owner in sorted(reg.owners.items()):
        if not owner.startswith("gileak.default_plugins") and owner != "noise":
            continue
        for parameter, annotation, *_ in reg.components[kind][name].parameter_table():
            if "float" in str(annotation):
                cases.append((kind, name, parameter))
    return cases


FLOAT_PARAMETERS = _float_parameters()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
@pytest.mark.parametrize("kind,name,parameter", FLOAT_PARAMETERS, ids=[f"{n}.{p}" for _, n, p in FLOAT_PARAMETERS])
def test_every_builtin_float_parameter_refuses_nan_and_infinity(kind, name, parameter, value):
    cls = registry.get(kind, name)
    required = {"path": "."} if name == "folder" else {}
    with pytest.raises(ParamsError, match=parameter):
        cls(**required, **{parameter: value})


def test_there_are_float_parameters_to_check():
    assert len(FLOAT_PARAMETERS) >= 12 and ("defense", "dp", "sigma") in FLOAT_PARAMETERS


def test_dp_sigma_inf_is_refused_at_once_instead_of_hanging(capsys):
    code, _, err = run(capsys, "bench", "--datasets", "digits", "--defenses", "dp(sigma=inf)", "--rounds", "1")
    assert code == 2 and "finite" in err


# --- refused while planning: exit 2, nothing run, nothing written -----------------------------


def write_images(folder: Path, count: int, size: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


class OneClass(Dataset):
    name = "hostile_one_class"
    description = "A dataset that declares a single class."

    def info(self):
        return DatasetInfo((1, 8, 8), 1, ("only",))

    def load(self, seed=0):
        import torch

        return Splits(torch.rand(40, 1, 8, 8), torch.zeros(40, dtype=torch.long), torch.rand(10, 1, 8, 8),
                      torch.zeros(10, dtype=torch.long))


class OneOutput(Model):
    name = "hostile_one_output"
    description = "A model with a single output, whatever the class count."

    def build(self, input_shape, num_classes):
        from torch import nn

        from gileak.nets import Slot

        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 4), Slot(1, (4,), kind="vector"),
                             nn.Linear(4, 1))


class Plugin:
    @staticmethod
    @hookimpl
    def register_datasets(register):
        register(OneClass)

    @staticmethod
    @hookimpl
    def register_models(register):
        register(OneOutput)


@pytest.fixture
def degenerate_plugin():
    reset()
    pm = load_plugins()
    pm.register(Plugin, name="hostile-test-plugin")
    try:
        yield
    finally:
        pm.unregister(name="hostile-test-plugin")
        reset()


def _refusals(tmp: Path):
    flat = write_images(tmp / "flat", 6)
    one_class_tree = tmp / "tree"
    write_images(one_class_tree / "only", 6)
    return {
        "one-class tree": (["--datasets", f"folder(path={one_class_tree})"], "one-class task"),
        "classes=1": (["--datasets", f"folder(path={flat},classes=1)"], "greater than or equal to 2"),
        "classes below the tree's": (["--datasets", f"folder(path={tmp / 'two'},classes=2)"], "3 class sub-folders"),
        "one-class dataset plugin": (["--datasets", "hostile_one_class"], "1 class"),
        "one-output model plugin": (["--datasets", "digits", "--models", "hostile_one_output"], "1 class score"),
        "victims beyond the split": (["--datasets", "digits", "--victims", "5000"], "--victims 5000"),
        "victims beyond a trained client's split": (["--datasets", "digits", "--rounds", "1", "--victims", "200"],
                                                    "(130)"),
        "victims beyond a folder": (["--datasets", f"folder(path={flat})", "--victims", "7"], "holds (5)"),
        "training a folder smaller than the clients": (["--datasets", f"folder(path={flat})", "--rounds", "1"],
                                                       "too few to share"),
        "training without test images": (["--datasets", f"folder(path={tmp / 'two'},test_fraction=0)",
                                          "--rounds", "1", "--victims", "1"], "no test images"),
        "a slot position the CNN lacks": (["--datasets", "digits", "--defenses", "precode(position=7)"],
                                          "no insertion position 7"),
        "a cvb position the CNN lacks": (["--datasets", "digits", "--defenses", "cvb(position=1+4)"],
                                         "no insertion position 4"),
        "a ViT patch that does not tile": (["--datasets", "digits", "--models", "vit(patch=5)"], "patch size 5"),
        "a model too large for the machine": (["--datasets", "digits", "--models", "mlp(width=1000000)"], "GiB"),
        "a grid too large": (["--datasets", "digits", "--defenses",
                              f"dp(sigma={'|'.join(map(str, range(1, 102)))},clip={'|'.join(map(str, range(1, 101)))})"],
                             "10,100 points"),
        "seeds beyond reason": (["--datasets", "digits", "--seeds", "1000000000000"], "results"),
        "a NaN parameter": (["--datasets", "digits", "--attacks", "ig(lr=nan)"], "finite"),
        "a NUL byte in a path": (["--datasets", "folder(path=a\x00b)"], "NUL"),
        "an unknown home directory": (["--datasets", "folder(path=~no_such_user_gileak/x)"], "not a usable path"),
    }


REFUSAL_NAMES = [
    "one-class tree", "classes=1", "classes below the tree's", "one-class dataset plugin", "one-output model plugin",
    "victims beyond the split", "victims beyond a trained client's split", "victims beyond a folder",
    "training a folder smaller than the clients", "training without test images", "a slot position the CNN lacks",
    "a cvb position the CNN lacks", "a ViT patch that does not tile", "a model too large for the machine",
    "a grid too large", "seeds beyond reason", "a NaN parameter", "a NUL byte in a path",
    "an unknown home directory",
]


@pytest.mark.parametrize("case", REFUSAL_NAMES)
def test_the_plan_refuses_before_anything_runs_or_is_written(capsys, tmp_path, degenerate_plugin, case):
    for name in ("a", "b", "c"):
        write_images(tmp_path / "two" / name, 4)
    argv, message = _refusals(tmp_path)[case]
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "bench", "--iterations", "2", "--out", str(out_dir), *argv)
    assert code == 2, (out, err)
    assert message in " ".join(err.split()), err
    assert "Traceback" not in out + err
    assert not out_dir.exists()  # nothing written, no directory tied to this budget


def test_a_refused_plan_does_not_tie_the_run_directory_to_its_budget(capsys, tmp_path):
    out_dir = str(tmp_path / "run")
    assert run(capsys, "bench", "--datasets", "digits", "--victims", "5000", "--out", out_dir)[0] == 2
    code, out, err = run(capsys, "bench", "--datasets", "digits", "--victims", "1", "--iterations", "2",
                         "--out", out_dir)
    assert code == 0, (out, err)


def test_dry_run_plans_datasets_that_are_not_on_disk(capsys, tmp_path):
    with no_cost_probes():
        code, out, err = run(capsys, "bench", "--dry-run", "--device", "cpu", "--datasets", "cifar10,mnist",
                             "--data-root", str(tmp_path / "empty"), "--profile", "paper")
        assert code == 0, err
        code, _, err = run(capsys, "bench", "--dry-run", "--device", "cpu", "--datasets", "retinamnist",
                           "--data-root", str(tmp_path / "empty"), "--profile", "paper")
    assert code == 2 and "(98)" in err  # its declared size is enough to see 128 victims do not fit


def test_the_victim_check_agrees_with_the_victims_a_cell_draws():
    from gileak import data
    from gileak.fl import FLConfig
    from gileak.runner import _victim_pool

    for rounds in (0, 1):
        spec = build_spec(datasets="digits", rounds=rounds, victims=1)
        for num_train in (1, 9, 10, 11, 99, 1438, 60_000):
            config = FLConfig(rounds=max(rounds, 1))
            if rounds and num_train < config.clients:
                continue
            pool = _victim_pool(num_train, config, spec)
            assert len(data.pick_victims(pool, len(pool), seed=3)) == len(pool)
            with pytest.raises(UserInputError):
                data.pick_victims(pool, len(pool) + 1, seed=3)


# --- results that measure nothing fail with their reason ---------------------------------------


DEGENERATE_DEFENSES = {
    "gc(ratio=1)": "is all zeros",
    "noise(std=1e39)": "NaN or infinite entries",
    "dp(sigma=1e30)": "too large to compare",
    "precode(beta=1e300)": "NaN or infinite entries",
}


@pytest.fixture(scope="module")
def degenerate_run(tmp_path_factory):
    """One tiny bench whose rows are all degenerate but one: the control row must score."""
    tmp = tmp_path_factory.mktemp("degenerate")
    exports = {suffix: tmp / f"lb.{suffix}" for suffix in ("json", "csv", "md")}
    argv = ["bench", "--datasets", "digits", "--victims", "2", "--iterations", "3", "--out", str(tmp / "run"),
            "--defenses", ",".join(["none", *DEGENERATE_DEFENSES]), "--attacks", "ig,cpl(label_weight=1e300)"]
    for path in exports.values():
        argv += ["--export", str(path)]
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    rows = {(r["defense"], r["attack"]): r for r in json.loads(exports["json"].read_text())}
    return code, buffer.getvalue(), rows, exports


def test_a_degenerate_run_exits_1_and_its_control_row_scores(degenerate_run):
    code, out, rows, _ = degenerate_run
    assert code == 1
    control = rows[("none", "ig")]
    assert control["status"] == "ok" and 0 <= control["ssim_mean"] <= 1 and control["victims"] == 2


@pytest.mark.parametrize("defense", list(DEGENERATE_DEFENSES))
@pytest.mark.parametrize("attack", ["ig", "cpl(label_weight=1e300)"])
def test_a_gradient_with_nothing_to_attack_fails_the_result_with_its_reason(degenerate_run, defense, attack):
    _, _, rows, _ = degenerate_run
    row = rows[(defense, attack)]
    assert row["status"] == "failed"
    assert "nothing to attack" in row["error"] and DEGENERATE_DEFENSES[defense] in row["error"]
    assert all(row[k] is None for k in ("ssim_mean", "asr", "psnr_mean", "mse_mean", "victims"))


def test_a_non_finite_attack_loss_fails_the_result(degenerate_run):
    _, _, rows, _ = degenerate_run
    row = rows[("none", "cpl(label_weight=1e300)")]
    assert row["status"] == "failed" and "loss is NaN or infinite" in row["error"] and row["ssim_mean"] is None


@pytest.mark.parametrize("fmt", ["csv", "md", "terminal"])
def test_failed_rows_are_unmistakable_in_every_output(degenerate_run, fmt):
    _, out, rows, exports = degenerate_run
    failed = sum(r["status"] == "failed" for r in rows.values())
    if fmt == "csv":
        import csv

        with open(exports["csv"], newline="") as f:
            read = list(csv.DictReader(f))
        assert sum(r["status"] == "failed" for r in read) == failed
        assert all(r["ssim_mean"] == "" and r["error"] for r in read if r["status"] == "failed")
    elif fmt == "md":
        lines = [line for line in exports["md"].read_text().splitlines() if "| failed |" in line]
        assert len(lines) == failed and all("nothing to attack" in line or "NaN" in line for line in lines)
    else:
        assert out.count("FAILED") >= failed and f"FAILED: {failed} row(s) measured nothing" in " ".join(out.split())


@pytest.mark.parametrize("argv,reason", [
    (["--defenses", "noise(std=1e39)", "--rounds", "1"], "global model has NaN or infinite weights"),
    (["--defenses", "precode(beta=1e300)", "--rounds", "1"], "training loss or optimizer state became NaN"),
    (["--defenses", "dp(sigma=1e30)", "--rounds", "1"], "optimizer state became NaN or infinite"),
    (["--defenses", "noise(std=1e19)", "--rounds", "1"], "loss on held-out images is NaN or infinite"),
], ids=["noise-inf", "kl-inf", "dp-overflow", "noise-huge"])
def test_diverged_training_fails_the_cell_and_reports_no_accuracy(capsys, tmp_path, argv, reason):
    export = tmp_path / "lb.json"
    code, out, err = run(capsys, "bench", "--datasets", "digits", "--victims", "1", "--iterations", "2",
                         "--out", str(tmp_path / "run"), "--export", str(export), *argv)
    row = json.loads(export.read_text())[0]
    assert code == 1 and row["status"] == "failed" and reason in row["error"]
    assert row["accuracy_mean"] is None and row["ssim_mean"] is None


@pytest.mark.parametrize("argv", [["--lr", "1e30"], ["--defense", "dp(sigma=1e30)"]], ids=["lr", "dp-noise"])
def test_train_that_diverges_reports_no_accuracy(capsys, tmp_path, argv):
    # dp(sigma=1e30) keeps every loss finite: its noise overflows Adam's squared moment, which
    # froze the weights at their initial values and printed their chance-level accuracy.
    code, out, err = run(capsys, "train", "--dataset", "digits", "--rounds", "1", "--out", str(tmp_path), *argv)
    assert code == 1 and "training diverged" in " ".join(err.split()) and "accuracy" not in out
    assert not (tmp_path / "summary.json").exists()


def test_train_refuses_a_learning_rate_that_is_not_finite(capsys, tmp_path):
    assert run(capsys, "train", "--dataset", "digits", "--lr", "inf", "--out", str(tmp_path / "x"))[0] == 2
    assert not (tmp_path / "x").exists()


def test_a_flat_folder_attacks_like_any_dataset(capsys, tmp_path):
    folder = write_images(tmp_path / "mine", 5)
    export = tmp_path / "lb.json"
    code, out, err = run(capsys, "bench", "--datasets", f"folder(path={folder})", "--victims", "2",
                         "--iterations", "3", "--out", str(tmp_path / "run"), "--export", str(export))
    row = json.loads(export.read_text())[0]
    assert code == 0 and row["status"] == "ok" and row["victims"] == 2
    assert row["params"] == 65_962  # the paper's CNN with 10 outputs; one output had a zero gradient


def test_the_gradient_check_names_the_victims():
    import torch

    from gileak.threat import nothing_to_attack

    gradient = {"w": torch.ones(3, 4), "b": torch.ones(3)}
    assert nothing_to_attack(gradient) is None
    gradient["w"][1] = 0
    gradient["b"][1] = 0
    gradient["b"][2] = float("nan")
    reason = nothing_to_attack(gradient, ["10", "11", "12"])
    assert "victim 11 is all zeros" in reason and "victim 12 has NaN" in reason and "10" not in reason
    assert "no trainable parameters" in nothing_to_attack({})


def test_an_unscorable_reconstruction_is_named():
    import torch

    from gileak.base import Reconstruction
    from gileak.runner import unscorable

    good = Reconstruction(images=torch.zeros(2, 1, 2, 2), iterations=[1, 1], final_loss=[0.5, 0.1])
    assert unscorable(good, ["3", "4"]) is None
    assert "victim 4" in unscorable(Reconstruction(torch.zeros(2, 1, 2, 2), [1, 1], [0.5, math.inf]), ["3", "4"])
    images = torch.zeros(2, 1, 2, 2)
    images[0, 0, 0, 0] = math.nan
    assert "pixels" in unscorable(Reconstruction(images, [1, 1], [0.5, 0.1]), ["3", "4"])


# --- text is text ------------------------------------------------------------------------------


def test_a_run_on_a_folder_with_markup_in_its_path_prints_and_stores_its_leaderboard(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # the long label on one line
    folder = write_images(tmp_path / "[red]my[/b] photos :smile:", 4)
    out_dir = tmp_path / "run [/]"
    code, out, err = run(capsys, "bench", "--datasets", f"folder(path={folder})", "--victims", "1",
                         "--iterations", "2", "--out", str(out_dir))
    assert code == 0, err
    assert "[red]my[/b] photos :smile:" in out and (out_dir / "leaderboard.json").is_file()
    assert "[red]my[/b]" in json.loads((out_dir / "leaderboard.json").read_text())[0]["dataset"]
    code, out, _ = run(capsys, "leaderboard", str(out_dir))
    assert code == 0 and "[red]my[/b] photos :smile:" in out


@pytest.mark.parametrize("argv,shown", [
    (["bench", "--attacks", "[/]"], "Unknown attack '[/]'"),
    (["bench", "--attacks", "ig(lr=[/b])"], "Bad parameters for attack 'ig'"),
    (["bench", "--datasets", "folder(path=[/b]nowhere)"], "folder(path=[/b]nowhere)"),
    (["inspect", "--model", "[red]", "--dataset", "digits"], "Unknown model '[red]'"),
    (["train", "--dataset", "folder(path=:smile:[/])"], "folder(path=:smile:[/])"),
    (["list", "[/b]"], "Unknown kind '[/b]'"),
    (["data", "fetch", "[bold]x"], "[bold]x"),
    (["leaderboard", "[/]nowhere"], "[/]nowhere"),
])
def test_user_text_in_error_messages_is_printed_as_written(capsys, argv, shown):
    code, out, err = run(capsys, *argv)
    assert code == 2 and shown in " ".join(err.split()).replace("( ", "("), err
    assert "Traceback" not in out + err


def test_the_leaderboard_prints_labels_literally_even_on_a_markup_console():
    import io

    from rich.console import Console

    from gileak.report import render_leaderboard

    rows = [{"dataset": "[/]", "model": "[bold]m", "defense": ":smile:", "attack": "a[/b]", "status": "failed",
             "error": "reason [/] here"}]
    buffer = io.StringIO()
    render_leaderboard(rows, console=Console(file=buffer, width=250, markup=True, emoji=True))
    text = buffer.getvalue()
    assert all(s in text for s in ("[/]", "[bold]m", ":smile:", "a[/b]", "reason [/] here", "FAILED"))


def test_undecodable_command_line_text_is_refused_not_crashed(capsys):
    code, out, err = run(capsys, "bench", "--datasets", "folder(path=caf\udce9)", "--dry-run")
    assert code == 2 and "not valid text" in err and "Traceback" not in out + err
