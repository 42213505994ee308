"""BenchSpec: what a benchmark run is made of, from CLI flags or a TOML spec file, and the
component mini-syntax `name(key=value,...)` where `a|b|c` expands into a grid."""

from __future__ import annotations

import itertools
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gileak.errors import SpecError

KIND_FIELDS = {"models": "model", "datasets": "dataset", "defenses": "defense", "attacks": "attack",
               "clients": "client"}


class ComponentRef(BaseModel):
    """One component of the matrix: its registered name, its raw parameters, and the label the
    user wrote for it (one grid point of it), which is what the leaderboard shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str = ""

    def model_post_init(self, _context: Any) -> None:
        if not self.label:
            object.__setattr__(self, "label", format_label(self.name, self.params))


def format_label(name: str, params: dict[str, Any]) -> str:
    if not params:
        return name
    inner = ",".join(f"{k}={_format_value(v)}" for k, v in params.items())
    return f"{name}({inner})"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "+".join(_format_value(v) for v in value)
    return str(value)


def _split_top_level(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"Unbalanced ')' in '{text}'.")
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise SpecError(f"Unbalanced '(' in '{text}': write name(key=value,...).")
    parts.append("".join(current))
    return parts


def parse_component(text: str) -> list[ComponentRef]:
    """`dp(sigma=0.001|0.01,clip=20)` -> two refs. Values stay strings here; each component's
    own Params validates and converts them."""
    text = text.strip()
    if not text:
        raise SpecError("Empty component name in a comma-separated list.")
    if "(" not in text:
        if ")" in text or "=" in text:
            raise SpecError(f"Cannot read '{text}': write name or name(key=value,...).")
        return [ComponentRef(name=text, label=text)]
    if not text.endswith(")"):
        raise SpecError(f"Cannot read '{text}': parameters go in parentheses at the end, name(key=value,...).")
    name, inner = text[: text.index("(")].strip(), text[text.index("(") + 1 : -1]
    if not name:
        raise SpecError(f"Cannot read '{text}': the component name is missing before '('.")
    grid: dict[str, list[str]] = {}
    for item in _split_top_level(inner, ","):
        if not item.strip():
            continue
        if "=" not in item:
            raise SpecError(f"Cannot read parameter '{item.strip()}' of '{name}': write key=value.")
        key, value = (s.strip() for s in item.split("=", 1))
        if not key or not value:
            raise SpecError(f"Cannot read parameter '{item.strip()}' of '{name}': write key=value.")
        if key in grid:
            raise SpecError(f"Parameter '{key}' is given twice in '{text}'.")
        grid[key] = [v.strip() for v in value.split("|")]
    return _expand(name, grid, original=text)


#: Grid points one component may expand into: beyond it a grid is a slip, refused before the
#: product is built (a few `|` values over many keys would otherwise fill memory).
MAX_GRID_POINTS = 10_000


def _expand(name: str, grid: dict[str, list[Any]], original: str | None = None) -> list[ComponentRef]:
    if not grid:
        return [ComponentRef(name=name, label=original or name)]
    points = math.prod(len(values) for values in grid.values())
    if points > MAX_GRID_POINTS:
        raise SpecError(f"The grid of '{name}' has {points:,} points ({' x '.join(str(len(v)) for v in grid.values())}); "
                        f"at most {MAX_GRID_POINTS:,} are allowed in one component.")
    keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in keys)))
    refs = []
    for combo in combos:
        params = dict(zip(keys, combo))
        label = original if len(combos) == 1 and original else format_label(name, params)
        refs.append(ComponentRef(name=name, params=params, label=label))
    return refs


def parse_components(text: str) -> list[ComponentRef]:
    """A comma-separated list of components, each possibly a grid."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # labels go into the store, the exports and the terminal as UTF-8
        raise SpecError(f"{text!r} is not valid text ({e.reason} at position {e.start}); undecodable bytes "
                        "in the command line or spec file?") from e
    refs: list[ComponentRef] = []
    for item in _split_top_level(text, ","):
        refs.extend(parse_component(item))
    return refs


def _from_spec_value(value: Any, field: str) -> list[ComponentRef]:
    """A spec file may give components as a string, a list of strings, or tables
    {name = "dp", sigma = [0.001, 0.01]} where a list value is a grid."""
    items = value if isinstance(value, list) else [value]
    refs: list[ComponentRef] = []
    for item in items:
        if isinstance(item, str):
            refs.extend(parse_components(item))
        elif isinstance(item, dict) and set(item) == {"name", "params", "label"} and isinstance(item["params"], dict):
            refs.append(ComponentRef(**item))  # a spec written by gileak itself (spec.json, a worker's copy)
        elif isinstance(item, dict):
            if "name" not in item:
                raise SpecError(f"An entry of '{field}' is a table without a 'name' key: {item}.")
            params = {k: v for k, v in item.items() if k != "name"}
            grid = {k: (v if isinstance(v, list) else [v]) for k, v in params.items()}
            refs.extend(_expand(str(item["name"]), grid))
        else:
            raise SpecError(f"Cannot read an entry of '{field}': {item!r}. Use a string or a table.")
    return refs


class BenchSpec(BaseModel):
    """A benchmark matrix and its budgets. Defaults are the quick profile: about a minute on a CPU."""

    model_config = ConfigDict(extra="forbid")

    models: list[ComponentRef] = Field(default_factory=lambda: [ComponentRef(name="cnn")])
    datasets: list[ComponentRef] = Field(default_factory=lambda: [ComponentRef(name="photos")])
    defenses: list[ComponentRef] = Field(default_factory=lambda: [ComponentRef(name="none")])
    attacks: list[ComponentRef] = Field(default_factory=lambda: [ComponentRef(name="ig")])
    #: What each attacked client uploads; the default is the paper's threat model.
    clients: list[ComponentRef] = Field(default_factory=lambda: [ComponentRef(name="gradient")])
    profile: Literal["quick", "paper"] = Field("quick", description="budget preset the other values start from")
    victims: int = Field(8, ge=1, description="attacked uploads (victims) per cell and client")
    iterations: int = Field(5000, ge=1, description="attack iteration cap per victim")
    rounds: int = Field(0, ge=0, description="federated training rounds before the attack")
    patience: int = Field(40, ge=1, description="early stopping: rounds without a better validation loss")
    seeds: int = Field(1, ge=1, description="independent repetitions (model init, training, victims)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: Path | None = None
    exports: list[Path] = Field(default_factory=list)
    attack_at: str = Field("final", description="model state attacked: init, final, or a round number")
    trace: bool = Field(False, description="record per-layer gradient cosine similarity per attack iteration")
    data_root: Path | None = Field(None, description="directory of downloadable datasets (MNIST, CIFAR-10, "
                                   "MedMNIST); default $GILEAK_DATA, else ~/.cache/gileak")

    @field_validator("attack_at", mode="before")
    @classmethod
    def _attack_at(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text in ("init", "final") or (text.isdigit() and int(text) >= 0):
            return text
        raise ValueError(f"must be init, final or a round number, not '{value}'")

    @model_validator(mode="after")
    def _attack_round_exists(self):
        if self.attack_at.isdigit() and int(self.attack_at) > self.rounds:
            raise ValueError(f"--attack-at {self.attack_at} is after the last of --rounds {self.rounds}")
        return self

    @field_validator("models", "datasets", "defenses", "attacks", "clients", mode="before")
    @classmethod
    def _components(cls, value: Any, info) -> Any:
        if isinstance(value, (str, dict)) or (isinstance(value, list) and value and not isinstance(value[0], ComponentRef)):
            return _from_spec_value(value, info.field_name)
        return value

    @field_validator("models", "datasets", "defenses", "attacks", "clients")
    @classmethod
    def _not_empty(cls, value: list[ComponentRef], info) -> list[ComponentRef]:
        if not value:
            raise ValueError(f"at least one of {info.field_name} is needed")
        labels = [ref.label for ref in value]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"listed twice: {', '.join(duplicates)}")
        return value


#: Budgets of `--profile`. quick is BenchSpec's defaults (a laptop CPU); paper is the paper's
#: protocol: 128 victims, a 20,000-iteration cap, 300 rounds of FedAvg with early stopping after
#: 40 rounds without a better validation loss, 3 seeds. A component's own protocol settings for a
#: profile are its `profile_params` (ig/ignore: the paper's schedule, lr 1, TV 0.01).
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {},
    "paper": {"victims": 128, "iterations": 20_000, "rounds": 300, "patience": 40, "seeds": 3},
}


def build_spec(spec_file: Path | None = None, **overrides: Any) -> BenchSpec:
    """The profile's budgets first, then spec-file values, then every explicit (non-None)
    override from the CLI. The profile comes from the `profile` override or the file."""
    file_values: dict[str, Any] = read_spec_file(spec_file) if spec_file is not None else {}
    profile = overrides.get("profile") or file_values.get("profile") or "quick"
    if profile not in PROFILES:
        raise SpecError(f"Unknown profile '{profile}'. Use one of: {', '.join(PROFILES)}.")
    values: dict[str, Any] = dict(PROFILES[profile])
    values.update(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["profile"] = profile
    try:
        return BenchSpec(**values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in e.errors()
        )
        where = f" in {spec_file}" if spec_file else ""
        raise SpecError(f"Invalid benchmark spec{where}: {problems}.") from e


def read_spec_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"Spec file '{path}' does not exist.")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"Spec file '{path}' is not valid TOML: {e}.") from e
    allowed = set(BenchSpec.model_fields)
    unknown = sorted(set(data) - allowed)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise SpecError(f"Spec file '{path}' has unknown keys: {', '.join(hints)}. Allowed: {', '.join(sorted(allowed))}.")
    return data
