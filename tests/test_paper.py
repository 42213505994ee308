"""The paper's published figures (gileak/paper/published.json): transcribed exactly, mapped to
valid components, and matched to leaderboard rows by identity in `gileak leaderboard --paper`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gileak import paper
from gileak.runner import RowSource

ROOT = Path(__file__).resolve().parents[1]
#: The paper's text is not part of the repository; the project's shared folder holds it.
PAPER_TEXT = next((p for p in (ROOT.parent / "shared" / "paper" / "cvb-paper.txt",
                               ROOT.parents[1] / "shared" / "paper" / "cvb-paper.txt") if p.is_file()), None)

# "0.76 (±plus-or-minus\pm0.18)" (Tables III-XII) and "0.87±0.11" (Table II), as the text renders them
PAIR = re.compile(r"(\d+(?:\.\d+)?)\s*\(?\s*±(?:plus-or-minus\\pm)?\s*(\d+(?:\.\d+)?)\)?")
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])")
#: Tables whose rows read as mean ± std pairs with the ASR after the first, and their columns.
PARSED = {"III": ("ssim", "asr"), "IV": ("ssim", "asr", "accuracy"), "V": ("ssim", "asr", "accuracy"),
          "VI": ("ssim", "asr", "accuracy"), "VIII": ("ssim", "asr", "psnr", "mse", "lpips", "accuracy"),
          "IX": ("ssim", "asr", "psnr", "mse", "lpips"), "X": ("ssim", "asr", "psnr", "mse", "lpips", "accuracy"),
          "XI": ("ssim", "asr", "psnr", "mse", "lpips", "accuracy"),
          "XII": ("ssim", "asr", "psnr", "mse", "lpips", "accuracy")}


def _table_rows(lines: list[str], name: str) -> list[list]:
    """Each data row of a table in the text as [(mean, std), asr, (mean, std), ...]."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"TABLE {name}:"))
    rows = []
    for line in lines[start + 2:]:
        if line.startswith("TABLE ") or not PAIR.search(line):
            break
        pairs = list(PAIR.finditer(line))
        values: list = []
        for k, match in enumerate(pairs):
            values.append([float(match.group(1)), float(match.group(2))])
            if k == 0:
                end = pairs[1].start() if len(pairs) > 1 else len(line)
                values.append(float(NUMBER.findall(line[match.end():end])[0]))
        rows.append(values)
    return rows


@pytest.mark.skipif(PAPER_TEXT is None, reason="the paper's text (shared/paper/cvb-paper.txt) is not here")
def test_every_parsed_table_equals_the_paper_text_value_for_value():
    lines = PAPER_TEXT.read_text(encoding="utf-8").splitlines()
    by_table: dict[str, list] = {}
    for entry in paper.entries():
        by_table.setdefault(entry.table, []).append(entry)
    for table, columns in PARSED.items():
        text_rows = _table_rows(lines, table)
        ours = [[entry.values[c] for c in columns] for entry in by_table[table]]
        assert len(text_rows) == len(ours), table
        for row_text, row_ours, entry in zip(text_rows, ours, by_table[table]):
            assert row_ours == row_text, f"Table {table}, {entry.row}"


@pytest.mark.skipif(PAPER_TEXT is None, reason="the paper's text (shared/paper/cvb-paper.txt) is not here")
def test_tables_one_two_and_seven_appear_in_the_paper_text():
    text = PAPER_TEXT.read_text(encoding="utf-8")
    assert "Baseline 59.91 59.98\nPRECODE 59.80 59.67" in text  # Table VII
    table2 = text.split("TABLE II:", 1)[1].split("Tab. II illustrates", 1)[0]
    for entry in (e for e in paper.entries() if e.table == "II"):
        ssim, asr, accuracy, params = (entry.values[k] for k in ("ssim", "asr", "accuracy", "params"))
        assert re.search(rf"{ssim[0]:.2f}\s*±(plus-or-minus\\pm)?\s*{ssim[1]:.2f}", table2), entry.row
        assert f"{asr:.2f}" in table2 and f"{accuracy[0]:.2f}" in table2 and f"{accuracy[1]:.2f}" in table2
        assert f"{params[0]} ({params[1]:g}" in table2.replace("(0.00)", "(0")
    table1 = text.split("TABLE I:", 1)[1].split("Excluding stochastic gradients", 1)[0]
    for entry in (e for e in paper.entries() if e.table == "I"):
        assert f"{entry.values['asr']:g}" in table1


def test_a_handful_of_values_typed_from_the_paper():
    """Independent of the parser: values read off the paper by eye."""
    found = {(e.table, e.row): e.values for e in paper.entries()}
    assert found[("II", "Position 1")] == {"ssim": [0.30, 0.09], "asr": 0.78, "accuracy": [60.24, 0.90],
                                           "params": [141226, 114.1]}
    assert found[("IV", "CIFAR-10 / Ours (5, 1/2)")] == {"ssim": [0.21, 0.08], "asr": 0.0, "accuracy": [67.17, 0.58]}
    assert found[("IV", "MNIST / GC 0.99")]["accuracy"] == [23.08, 9.39]
    assert found[("VIII", "Ours / P=1, k_E=5, s_E=1/2, beta=10^-5")]["asr"] == 0.78
    assert found[("VIII", "Ours / P=(1,2,3), k_E=1, s_E=1/2, beta=10^-1")]["lpips"] == [0.51, 0.06]
    assert found[("XI", "MNIST / ResNet-18 / None")]["ssim"] == [0.47, 0.11]  # Table V says 0.51 ± 0.12
    assert found[("V", "MNIST / ResNet-18 / None")]["asr"] == 53.91
    assert found[("VII", "PRECODE / No Bias")] == {"accuracy": [59.67, None]}
    assert found[("I", "P=2 / Ignore / decoder and every later layer ignored")] == {"asr": 7.81}


def test_every_entry_names_valid_components_that_build_together():
    from gileak.runner import build_net, resolve
    from gileak.spec import ComponentRef, parse_component

    entries = paper.entries()
    tables = {e.table for e in entries}
    assert tables == {"I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII"}
    assert paper.protocol() == {"victims": 128, "iterations": 20000, "rounds": 300, "patience": 40, "seeds": 3}
    built = set()
    for entry in entries:
        cell, attack = paper.identity(entry)  # resolves every name and parameter through the registry
        assert all(cell) and (attack is not None) == (entry.attack is not None)
        assert set(entry.values) <= set(paper.PRIVACY + paper.UTILITY) and entry.values
        if (entry.dataset, entry.model, entry.defense) in built:
            continue
        built.add((entry.dataset, entry.model, entry.defense))
        components = [resolve(kind, parse_component(text)[0]).component
                      for kind, text in (("dataset", entry.dataset), ("model", entry.model), ("defense", entry.defense))]
        dataset, model, defense = components
        info = dataset.declared_info()  # no file of the real datasets is needed
        build_net(model, defense, model.input_shape(info.shape), info.num_classes, 0, "cpu")
    assert resolve("attack", ComponentRef(name="ig"), profile="paper").component.params.schedule == "paper"


def test_the_paper_attacks_defended_cells_with_ignore_and_the_baseline_with_ig():
    for entry in paper.entries():
        if entry.attack is None:
            continue
        defended = entry.defense != "none"
        stochastic = entry.defense.startswith(("cvb", "precode"))
        if entry.table == "I":
            continue  # Table I attacks PRECODE with both
        if stochastic:
            assert entry.attack in ("ignore", "idlg(ignore_stochastic=true)", "cpl(ignore_stochastic=true)"), entry
        elif not defended:
            assert entry.attack in ("ig", "idlg", "cpl"), entry
        else:
            assert entry.attack == "ig", entry


# --- matching -----------------------------------------------------------------------------------


def _source(dataset: str, model: str, defense: str, attack: str, seeds=(0, 1, 2)) -> RowSource:
    cell = " | ".join(paper._canonical(kind, text) for kind, text in
                      (("dataset", dataset), ("model", model), ("defense", defense)))
    return RowSource({cell}, {paper._canonical("attack", attack)}, set(seeds))


def _row(label_defense: str, label_attack: str = "ig", **metrics) -> dict:
    return {"dataset": "d", "model": "m", "defense": label_defense, "attack": label_attack, **metrics}


FULL = {"victims": 128, "iterations": 20000, "rounds": 300, "patience": 40, "attack_at": "final"}


def test_rows_match_by_identity_not_by_label():
    rows = [_row("my protected model", "targeted", ssim_mean=0.25, asr=0.0, accuracy_mean=0.6),
            _row("cvb", "ignore", ssim_mean=0.3),  # labelled cvb, but k_E = 3 on CIFAR-10: never published
            _row("none", "ig", ssim_mean=0.9, asr=100.0, accuracy_mean=0.625, params=65962)]
    sources = {("d", "m", "my protected model", "targeted"): _source("cifar10", "cnn", "cvb", "ignore"),
               ("d", "m", "cvb", "ignore"): _source("mnist", "cnn", "cvb(kernel=3)", "ignore"),
               ("d", "m", "none", "ig"): _source("cifar10", "cnn", "none", "ig")}
    first, second, third = paper.compare(rows, sources, FULL)
    assert first.values["ssim"] == [0.21, 0.08] and first.values["asr"] == 0.0
    assert first.values["accuracy"] == [67.17, 0.58]
    assert first.differences["ssim"] == pytest.approx(0.04)
    assert first.differences["accuracy"] == pytest.approx(60 - 67.17)
    assert first.smaller_budget == [] and first.stand_in is None
    assert first.tables[:3] == ["III", "IV", "V"]
    assert second is None
    assert third.values["ssim"] == [0.87, 0.11] and third.values["params"] == [65962, 0.0]  # Table II's count
    assert third.differences["asr"] == pytest.approx(100 - 96.88) and third.differences["params"] == 0


def test_another_attack_configuration_compares_accuracy_only_and_says_so():
    rows = [_row("none", "ig", ssim_mean=0.5, asr=50.0, accuracy_mean=0.6)]
    sources = {("d", "m", "none", "ig"): _source("cifar10", "cnn", "none", "ig(schedule=step)")}
    (comparison,) = paper.compare(rows, sources, FULL)
    assert "ssim" not in comparison.values and "asr" not in comparison.values
    assert comparison.values["accuracy"] == [62.53, 0.16] and comparison.attack_differs
    assert any("attack parameters differ" in line for line in paper.caption([comparison]))


def test_smaller_budgets_stand_ins_and_mixed_rows():
    rows = [_row("none", "ig", ssim_mean=0.8, asr=90.0), _row("mixed", "ig", ssim_mean=0.5)]
    mixed = _source("cifar10", "cnn", "none", "ig")
    mixed.cells.add(next(iter(_source("cifar10", "cnn", "cvb", "ig").cells)))
    sources = {("d", "m", "none", "ig"): _source("photos", "cnn", "none", "ig", seeds=(0,)),
               ("d", "m", "mixed", "ig"): mixed}
    small = {"victims": 8, "iterations": 1000, "rounds": 10, "patience": 40, "attack_at": "final"}
    assert paper.compare(rows, sources, small) == [None, None]  # photos is not a paper dataset; mixed is two cells
    stand_ins = paper.parse_stand_ins(["photos=cifar10"])
    comparison, mixed_row = paper.compare(rows, sources, small, stand_ins)
    assert mixed_row is None
    assert comparison.values["ssim"] == [0.87, 0.11]
    assert comparison.stand_in == "photos for the paper's cifar10"
    assert comparison.smaller_budget == ["victims 8 of 128", "iterations 1,000 of 20,000", "rounds 10 of 300",
                                         "seeds 1 of 3"]
    assert paper.compare(rows[:1], sources, {}, stand_ins)[0].smaller_budget == [
        "budget unknown: the run directory records none"]
    lines = "\n".join(paper.caption([comparison, None]))
    assert "smaller budget" in lines and "not a replication" in lines and "stand-in data" in lines


@pytest.mark.parametrize("text", ["photos", "photos=imagenet", "=cifar10", "photos=cifar10=mnist"])
def test_bad_stand_ins_are_user_errors(text):
    from gileak.errors import UserInputError

    with pytest.raises(UserInputError):
        paper.parse_stand_ins([text])


def test_the_papers_disagreeing_tables_are_shown_not_hidden():
    rows = [_row("cvb", "ignore", ssim_mean=0.3, asr=1.0)]
    sources = {("d", "m", "cvb", "ignore"): _source("mnist", "cnn", "cvb", "ignore")}
    (comparison,) = paper.compare(rows, sources, FULL)
    assert comparison.values["asr"] == 1.56  # Table III, the first in TABLE_ORDER that reports it
    assert any("1.56 (Tables III, IX); 0.78 (Tables IV, V, X, XI)" in note for note in comparison.notes)


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from gileak.cli import main

    out = tmp_path_factory.mktemp("paper-run")
    assert main(["bench", "--profile", "paper", "--datasets", "digits", "--models", "cnn", "--defenses",
                 "none,cvb", "--attacks", "ig,ignore", "--victims", "1", "--iterations", "2", "--rounds", "0",
                 "--seeds", "1", "--out", str(out)]) == 0
    return out


def test_leaderboard_paper_shows_published_figures_beside_matching_rows(small_run, capsys, monkeypatch):
    from gileak.cli import main

    monkeypatch.setenv("COLUMNS", "260")  # 18 columns: at the 180 of a pipe the published figures fold

    capsys.readouterr()
    assert main(["leaderboard", str(small_run), "--paper"]) == 0
    out = capsys.readouterr().out
    assert "SSIM (Δ)" in out and "no row matches a published cell" in out  # digits is not a paper dataset
    assert main(["leaderboard", str(small_run), "--paper", "--paper-stand-in", "digits=mnist", "-f", "json"]) == 0
    rows = {(r["defense"], r["attack"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows[("none", "ig")]["paper_ssim_mean"] == 0.95 and rows[("none", "ig")]["paper_asr"] == 100.0
    assert rows[("none", "ig")]["delta_ssim"] == pytest.approx(rows[("none", "ig")]["ssim_mean"] - 0.95)
    assert rows[("cvb", "ignore")]["paper_ssim_mean"] == 0.29
    assert rows[("none", "ignore")]["paper_ssim_mean"] is None  # the paper never attacked the baseline with Ignore
    assert rows[("none", "ignore")]["paper_accuracy_mean"] == 99.1  # but published its accuracy
    assert "iterations 2 of 20,000" in rows[("none", "ig")]["paper_budget"]
    assert rows[("none", "ig")]["paper_stand_in"] == "digits for the paper's mnist"
    assert main(["leaderboard", str(small_run), "--paper", "--paper-stand-in", "digits=mnist"]) == 0
    table = capsys.readouterr().out
    assert "0.95 ± 0.06" in table and "smaller budget" in table and "stand-in data" in table
    assert main(["leaderboard", str(small_run), "--paper", "--paper-stand-in", "digits=mnist", "-f", "md"]) == 0
    markdown = capsys.readouterr().out
    assert "paper_ssim_mean" in markdown.splitlines()[0]
    assert "not a replication" in markdown
    assert main(["leaderboard", str(small_run), "--paper", "--paper-stand-in", "digits=mnist", "-f", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert "paper_ssim_mean" in header and "delta_accuracy" in header


def test_leaderboard_without_paper_is_unchanged(small_run, capsys):
    from gileak.cli import main

    capsys.readouterr()
    assert main(["leaderboard", str(small_run), "-f", "csv"]) == 0
    assert "paper_ssim_mean" not in capsys.readouterr().out
    assert main(["leaderboard", str(small_run), "--paper-stand-in", "digits=mnist"]) == 2
    assert main(["leaderboard", str(small_run), "--paper", "--paper-stand-in", "digits=imagenet"]) == 2
