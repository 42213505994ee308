"""The component mini-syntax, grids, labels and spec files."""

import pytest

from gileak.errors import SpecError
from gileak.spec import build_spec, parse_components


def test_plain_names_and_parameters_keep_the_users_label():
    refs = parse_components("none, cvb(kernel=3)")
    assert [(r.name, r.params, r.label) for r in refs] == [("none", {}, "none"), ("cvb", {"kernel": "3"}, "cvb(kernel=3)")]


def test_a_bar_separated_value_expands_into_a_grid():
    refs = parse_components("dp(sigma=0.001|0.01,clip=20)")
    assert [r.label for r in refs] == ["dp(sigma=0.001,clip=20)", "dp(sigma=0.01,clip=20)"]
    assert len(parse_components("x(a=1|2,b=3|4|5)")) == 6


@pytest.mark.parametrize("text", ["dp(sigma=0.1", "dp sigma=1)", "dp(sigma)", "dp(=1)", "(a=1)", "a,,b", "dp(a=1)x"])
def test_malformed_components_are_spec_errors(text):
    with pytest.raises(SpecError):
        parse_components(text)


def test_spec_file_values_are_overridden_by_flags(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('defenses = ["none", {name = "dp", sigma = [0.001, 0.01]}]\nvictims = 4\niterations = 50\n')
    spec = build_spec(path, victims=2)
    assert [d.label for d in spec.defenses] == ["none", "dp(sigma=0.001)", "dp(sigma=0.01)"]
    assert spec.victims == 2 and spec.iterations == 50


def test_spec_file_mistakes_name_the_problem(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text("victim = 3\n")
    with pytest.raises(SpecError, match="did you mean 'victims'"):
        build_spec(path)
    path.write_text("victims = [\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        build_spec(path)
    with pytest.raises(SpecError, match="does not exist"):
        build_spec(tmp_path / "missing.toml")
    with pytest.raises(SpecError, match="victims"):
        build_spec(victims=0)
    with pytest.raises(SpecError, match="listed twice"):
        build_spec(defenses="none,none")
