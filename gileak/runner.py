"""Turn a BenchSpec into a plan of cells, run them, and aggregate one row per
(dataset, model, defense, client, attack)."""

from __future__ import annotations

import json
import math
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gileak import registry
from gileak.base import Attack, Client, Dataset, Defense, Model
from gileak.errors import DivergedError, GileakError, NotApplicableError, NothingToAttackError, UserInputError
from gileak.spec import KIND_FIELDS, BenchSpec, ComponentRef
from gileak.store import CellFacts

#: Spec fields every result of a run directory shares (see gileak.store).
BUDGET_FIELDS = ("victims", "iterations", "rounds", "attack_at", "patience")


@dataclass
class Resolved:
    """A component reference with its instantiated, validated component."""

    ref: ComponentRef
    component: Any
    _data_identity: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.ref.label

    def data_identity(self) -> dict[str, Any]:
        """A dataset's `identity()`, taken once: a run keys its results by the data it found
        when it was planned."""
        if self._data_identity is None:
            self._data_identity = self.component.identity() if isinstance(self.component, Dataset) else {}
        return self._data_identity


@dataclass
class Job:
    """One attack on the victims of one client protocol, in a training cell."""

    attack: Resolved
    client: Resolved

    @property
    def label(self) -> str:
        """Unique within a cell (executors and progress refer to a job by it)."""
        return f"{self.attack.label} @ {self.client.label}"


@dataclass
class TrainingCell:
    """Everything that shares one trained model: (dataset, model, defense, seed), its attacks and
    the client protocols whose victims they attack."""

    dataset: Resolved
    model: Resolved
    defense: Resolved
    seed: int
    attacks: list[Resolved]
    clients: list[Resolved] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.dataset.label} | {self.model.label} | {self.defense.label} | seed {self.seed}"

    @property
    def jobs(self) -> list[Job]:
        """Every (client, attack) of the cell, client by client, in the spec's order."""
        return [Job(attack, client) for client in self.clients for attack in self.attacks]


@dataclass
class Plan:
    spec: BenchSpec
    cells: list[TrainingCell]
    #: (kind, label, label kept): spellings dropped because they name a component already planned.
    same: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def rows_expected(self) -> int:
        groups = len({(c.dataset.label, c.model.label, c.defense.label) for c in self.cells})
        return groups * len(self.spec.attacks) * len(self.spec.clients)


def resolve(kind: str, ref: ComponentRef, data_root: Path | str | None = None, profile: str | None = None) -> Resolved:
    """Instantiate a component. A dataset that takes a `root` parameter gets `data_root` (the
    spec's or --data-root) unless its own parameters name one; under `profile`, the component's
    `profile_params` for it fill what the reference leaves unset. The label stays as written."""
    cls = registry.get(kind, ref.name)
    params = {**cls.profile_params.get(profile or "", {}), **ref.params}
    takes_root = kind == "dataset" and "root" in cls.Params.model_fields
    if takes_root and data_root is not None and params.get("root") is None:
        params["root"] = str(data_root)
    return Resolved(ref, cls(**params))


#: More results than this in one run is a slip (a grid or --seeds a few digits too long), not a
#: benchmark anyone could read; it is refused before a cell list of that size is built.
MAX_RESULTS = 1_000_000


def plan(spec: BenchSpec, check_data: bool = True) -> Plan:
    """Resolve every name and validate every component's parameters before anything runs, and
    refuse, as the user's to fix (UserInputError), what would otherwise fail a cell at run time:
    a dataset with fewer than two classes, --victims beyond the attacked client's images, a
    training run without enough images, a slot position or input size a model does not have,
    a model too large for this machine. With `check_data`, a dataset whose files are missing
    stops it here; without, datasets not on disk are checked as far as they declare themselves."""
    datasets = [resolve("dataset", r, data_root=spec.data_root, profile=spec.profile) for r in spec.datasets]
    models = [resolve("model", r, profile=spec.profile) for r in spec.models]
    defenses = [resolve("defense", r, profile=spec.profile) for r in spec.defenses]
    attacks = [resolve("attack", r, profile=spec.profile) for r in spec.attacks]
    clients = [resolve("client", r, profile=spec.profile) for r in spec.clients]
    results = len(datasets) * len(models) * len(defenses) * spec.seeds * len(attacks) * len(clients)
    if results > MAX_RESULTS:
        raise UserInputError(f"This matrix asks for {results:,} results ({len(datasets)} dataset(s) x {len(models)} "
                             f"model(s) x {len(defenses)} defense(s) x {len(attacks)} attack(s) x {len(clients)} "
                             f"client(s) x {spec.seeds} seed(s)); gileak runs at most {MAX_RESULTS:,} in one run. "
                             "Check the grids and --seeds.")
    for dataset in datasets:  # missing files are the user's to fix: say so first
        info = _declared_info(dataset, check_data)
        if info is None:
            continue
        check_dataset(dataset, info, spec)
        check_clients(dataset, info, spec, clients)
        for model in models:
            for defense in defenses:
                check_buildable(model.component, defense.component, info,
                                where=f"{dataset.label} | {model.label} | {defense.label}")
    spec, (datasets, models, defenses, attacks, clients), same = _one_spelling_each(
        spec, (datasets, models, defenses, attacks, clients), data_identity=check_data)
    cells = [
        TrainingCell(dataset, model, defense, seed, attacks, clients)
        for dataset in datasets
        for model in models
        for defense in defenses
        for seed in range(spec.seeds)
    ]
    _check_attacks(datasets, models, defenses, attacks)
    return Plan(spec, cells, same)


def _one_spelling_each(spec: BenchSpec, resolved: tuple[list[Resolved], ...], data_identity: bool):
    """Two spellings of one component (`cvb` and `cvb(kernel=5)`, `gc(ratio=.5)` and
    `gc(ratio=0.5)`, one folder by two paths) are one component: the first spelling is kept, the
    others are dropped and listed, so the component is announced, computed and shown once. The
    returned spec lists the kept spellings (workers plan it again and must find the same cells)."""
    fields = ("datasets", "models", "defenses", "attacks", "clients")
    kept_lists, same = [], []
    for name, components in zip(fields, resolved):
        kept: dict[str, Resolved] = {}
        for component in components:
            key = component_id(component, data_identity=data_identity)
            if key in kept:
                same.append((KIND_FIELDS[name], component.label, kept[key].label))
            else:
                kept[key] = component
        kept_lists.append(list(kept.values()))
    if same:
        spec = spec.model_copy(update={name: [r.ref for r in kept] for name, kept in zip(fields, kept_lists)})
    return spec, tuple(kept_lists), same


def check_clients(dataset: Resolved, info, spec: BenchSpec, clients: list[Resolved]) -> None:
    """Refuse a client protocol whose victims need more images than the attacked client's
    training split of `dataset` holds (where the dataset declares its training size)."""
    from gileak import fl

    train_size = getattr(info, "train_size", None)
    if not train_size:
        return
    config = fl.FLConfig(rounds=max(spec.rounds, 1), patience=spec.patience)
    for client in clients:
        victim_images(train_size, config, spec, client, seed=0, where=f"{dataset.label} with {client.label}")


def _declared_info(dataset: Resolved, check_data: bool):
    """The dataset's DatasetInfo; without `check_data`, what it declares when its files are not
    here (None when it declares nothing without them)."""
    from gileak.errors import DataUnavailableError

    if check_data:
        return dataset.component.info()
    try:
        return dataset.component.info()
    except DataUnavailableError:
        declared = getattr(dataset.component, "declared_info", None)
        return declared() if callable(declared) else None


def check_dataset(dataset: Resolved, info, spec: BenchSpec) -> None:
    """Refuse a dataset the plan cannot use: fewer than two classes (the cross-entropy of a
    one-output classifier and its gradient are zero: nothing to attack), and, where it declares
    its split sizes, --victims beyond the attacked client's images or training without enough."""
    from gileak import fl

    if info.num_classes < 2:
        raise UserInputError(
            f"{dataset.label} has {info.num_classes} class(es): a classifier needs at least two, or its "
            "cross-entropy and shared gradient are zero and there is nothing to attack.")
    if info.train_size is None:
        return
    config = fl.FLConfig(rounds=max(spec.rounds, 1), patience=spec.patience)
    if spec.rounds > 0:
        if info.train_size < config.clients:
            raise UserInputError(
                f"{dataset.label} has {info.train_size} training image(s), too few to share among the "
                f"{config.clients} federated clients of --rounds {spec.rounds}; use --rounds 0 or more images.")
        if info.test_size == 0:
            raise UserInputError(f"{dataset.label} has no test images, so training accuracy cannot be "
                                 "measured; give it a test split or use --rounds 0.")
    pool = len(_victim_pool(info.train_size, config, spec))
    if spec.victims > pool:
        raise UserInputError(
            f"--victims {spec.victims} asks for more images than the attacked client's training split of "
            f"{dataset.label} holds ({pool}). Use --victims {pool} or fewer, or a larger dataset.")


def _memory_bytes() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


#: Parameter-sized copies a cell holds at least at once (weights, gradient, Adam's two moments
#: in training; shared and dummy gradients in an attack): a model whose copies exceed this
#: machine's memory cannot run here.
MODEL_COPIES = 4


def check_buildable(model: Model, defense: Defense, info, where: str) -> None:
    """Build the defended model on PyTorch's meta device (shapes only, no memory, no time) to
    refuse at plan time what a cell would fail on: a slot position the model does not have, an
    input too small for it, a model with fewer than two outputs, or one too large for this
    machine. A defense that does not apply (NotApplicableError), or anything a meta build
    cannot tell, is left to the cell, which reports it in its row."""
    import math

    import torch

    input_shape = model.input_shape(info.shape)
    try:
        with torch.device("meta"):
            net = model.build(input_shape, info.num_classes)
            defense.apply(net)
    except UserInputError as e:
        raise type(e)(f"{where}: {e}") from e
    except Exception:  # noqa: BLE001 — not applicable, or a build that needs real tensors: the cell says
        return
    parameters = sum(p.numel() * p.element_size() for p in net.parameters())
    memory = _memory_bytes()
    if memory and MODEL_COPIES * parameters > memory:
        raise UserInputError(
            f"{where}: the defended model has {sum(p.numel() for p in net.parameters()):,} parameters "
            f"({parameters / 2**30:.1f} GiB); training or attacking it holds at least {MODEL_COPIES} copies, more "
            f"than this machine's {memory / 2**30:.0f} GiB of memory. Check the model's and defense's sizes.")
    try:
        with torch.no_grad():
            logits = net.eval()(torch.empty((1, *input_shape), device="meta"))
    except Exception:  # noqa: BLE001 — an op without a meta kernel: the cell runs it for real
        return
    outputs = math.prod(logits.shape[1:]) if isinstance(logits, torch.Tensor) and logits.dim() >= 2 else None
    if outputs is not None and outputs < 2:
        raise UserInputError(
            f"{where}: the model outputs {outputs} class score(s) per image; a classifier needs at least two, or its "
            "cross-entropy and shared gradient are zero and there is nothing to attack.")


class _Unbuildable(Exception):
    """The model cannot be built for this dataset here; the run reports why."""


def _check_attacks(datasets: list[Resolved], models: list[Resolved], defenses: list[Resolved],
                   attacks: list[Resolved]) -> None:
    """Attacks that check their parameters against a model (`Attack.check`: exclude= names a
    layer) do it here, on every defended model they will meet, built (only when an attack asks)
    on the dataset's declared shape: a user's mistake stops the run before any work. A
    combination that cannot be built here, or a dataset that cannot declare its shape, is
    checked when it runs."""
    checking = [a for a in attacks if type(a.component).check is not Attack.check]
    if not checking:
        return
    import torch

    for dataset in datasets:
        declared = getattr(dataset.component, "declared_info", None)  # downloadable ones: without their files
        try:
            info = declared() if callable(declared) else dataset.component.info()
        except GileakError:
            continue
        for model in models:
            for defense in defenses:
                built: list = []

                def build(model=model, defense=defense, built=built):
                    if not built:
                        try:
                            input_shape = model.component.input_shape(info.shape)
                            with torch.random.fork_rng(devices=[]):
                                built.append(build_net(model.component, defense.component, input_shape,
                                                       info.num_classes, 0, "cpu"))
                        except Exception as e:  # noqa: BLE001 — it fails (or is not applicable) when it runs
                            raise _Unbuildable() from e
                    return built[0]

                for attack in checking:
                    try:
                        attack.component.check(build, model.component.input_shape(info.shape))
                    except _Unbuildable:
                        break
                    except UserInputError as e:
                        raise type(e)(f"{attack.label} on {model.label} + {defense.label} ({dataset.label}): {e}") from e


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for, but torch sees no CUDA device here. Use --device auto or cpu.")
    return device


def build_net(model: Model, defense: Defense | None, input_shape, num_classes: int, seed: int, device: str):
    """The model, transformed by the defense, with weights from `seed`."""
    import torch

    torch.manual_seed(seed)
    net = model.build(input_shape, num_classes)
    if defense is not None:
        defense.apply(net)
    return net.to(device)


def model_summary(model: Model, defense: Defense, dataset: Dataset) -> dict[str, Any]:
    """Parameter counts and upload size of a (model, defense) on a dataset's declared shape —
    no pixel is loaded and the dataset's files need not be there."""
    from gileak.nets import count_trainable

    info = dataset.declared_info()
    if info.num_classes < 2:
        raise UserInputError(f"{dataset.name} has {info.num_classes} class(es): a classifier needs at least two.")
    check_buildable(model, defense, info, where=f"{dataset.name} | {model.name} | {defense.name}")
    input_shape = model.input_shape(info.shape)
    base = model.build(input_shape, info.num_classes)
    defended = build_net(model, defense, input_shape, info.num_classes, seed=0, device="cpu")
    params = count_trainable(defended)
    base_params = count_trainable(base)
    upload = sum(p.numel() * p.element_size() for p in defended.parameters() if p.requires_grad)
    return {
        "input_shape": list(input_shape),
        "num_classes": info.num_classes,
        "params": params,
        "base_params": base_params,
        "params_added": params - base_params,
        "params_added_pct": 100.0 * (params - base_params) / base_params if base_params else 0.0,
        "upload_bytes": upload,
        "net": defended,
    }


@dataclass
class AttackResult:
    """Per-victim metrics of one attack on one training cell."""

    ssim: list[float]
    psnr: list[float]
    mse: list[float]
    lpips: list[float] | None
    iterations: list[int]
    seconds: float
    accuracy: float | None
    params: int
    params_added_pct: float
    epsilon: float | None = None
    uploads: int = 0  # victims (attacked uploads); the metrics above are per image
    label_accuracy: list[float] | None = None  # per victim, where the attack found the labels itself
    label_baseline: list[float] | None = None  # per victim: a label-blind guess's expected accuracy


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    lpips_note: str | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)
    traces: list[Path] = field(default_factory=list)
    out: Path | None = None
    #: What each row aggregates, by (dataset, model, defense, client, attack) label.
    sources: dict[tuple[str, str, str, str, str], RowSource] = field(default_factory=dict)


@dataclass
class RowSource:
    """The canonical identities and seeds behind one leaderboard row: labels are what the user
    wrote, these are what ran (`gileak leaderboard --paper` matches on them)."""

    cells: set[str] = field(default_factory=set)  # cell ids without the seed
    attacks: set[str] = field(default_factory=set)
    seeds: set[int] = field(default_factory=set)


def _victim_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def _attack_seed(cell_seed: int, attack_id: str) -> int:
    """The global RNG seed an attack starts from (for modules that sample from the global stream,
    e.g. dropout; variational bottlenecks draw from each victim's own stream): fixed by the cell
    and the attack alone, so an attack run after a resume draws what it would have drawn in one
    uninterrupted run."""
    import zlib

    return (cell_seed * 7_919 + zlib.crc32(attack_id.encode())) % 2**63


@dataclass
class AttackOutcome:
    """One attack on one trained cell, as computed (anywhere); the driver stores it."""

    attack: str  # store key: the attack's canonical id (and the client's, when not the default)
    label: str  # the job's label
    status: str  # ok | failed | not applicable
    error: str | None = None
    note: str = ""
    seconds: float = 0.0
    victims: list[Any] = field(default_factory=list)  # store.VictimRecord
    originals: Any = None  # (N, C, H, W) cpu tensors for the figure
    reconstructions: Any = None
    trace: Any = None  # base.GradientTrace
    #: The engine it ran on (gileak.engine.choice.EngineChoice.as_dict); stored in the result's
    #: env as "engine".
    engine: dict[str, Any] = field(default_factory=dict)
    engine_key: str = ""  # its key in the run directory's engine cache


@dataclass(kw_only=True)
class CellOutcome(CellFacts):
    """A training cell's shared facts (utility, size, notes) and its attacks' outcomes."""

    attacks: list[AttackOutcome] = field(default_factory=list)


def component_id(resolved: Resolved, data_identity: bool = True) -> str:
    """A component's identity in the store: its name, its full validated parameters, and for a
    dataset what its data is (`Dataset.identity()`, whose keys override parameters of the same
    name, as a folder's resolved path overrides the path as written)."""
    from gileak.store import canonical

    params = resolved.component.params.model_dump(mode="json")
    if data_identity:
        params.update(resolved.data_identity())
    return canonical(resolved.ref.name, params)


def cell_id(cell: TrainingCell) -> str:
    """The store key of a training cell: each component's identity, and the seed."""
    parts = [component_id(r) for r in (cell.dataset, cell.model, cell.defense)]
    return " | ".join(parts) + f" | seed={cell.seed}"


def attack_id(attack: Resolved | Job) -> str:
    """The store key of an attack's results: the attack's `component_id` and, unless the client
    is the paper's gradient(batch=1) (whose results were stored before clients existed and keep
    their key), ` @ ` and the client's."""
    if isinstance(attack, Job):
        key = component_id(attack.attack)
        client = client_id(attack.client)
        return key if client == DEFAULT_CLIENT else f"{key} @ {client}"
    return component_id(attack)


def client_id(client: Resolved) -> str:
    return component_id(client)


#: The identity of the paper's threat model, gradient(batch=1): its results keep their old key.
DEFAULT_CLIENT = 'gradient{"aggregate":1,"batch":1}'


class _Splits:
    """Per-process cache of loaded datasets: every cell of a dataset and seed shares one load."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, int], Any] = {}

    def __call__(self, dataset: Resolved, seed: int):
        key = (dataset.label, seed)
        if key not in self.cache:
            self.cache[key] = dataset.component.load(seed=seed)
        return self.cache[key]


def _reason(error: BaseException, debug: bool = False) -> str:
    if isinstance(error, NotApplicableError):
        return f"{NOT_APPLICABLE}{error}"
    if isinstance(error, GileakError):
        return str(error)
    text = f"{type(error).__name__}: {error}"
    if debug:
        text += "\n" + traceback.format_exc()
    return text


def engine_key(cell: TrainingCell, attack: str, victims: int, device: str) -> str:
    """The key of an attack's engine choice in the run directory's cache: the cell's components
    without its seed (every seed of a group runs on the engine the first one chose)."""
    from gileak.engine.choice import cache_key

    return cache_key(cell_id(cell).rpartition(" | seed=")[0], attack, victims, device)


def execute_cell(cell: TrainingCell, spec: BenchSpec, device: str, attacks: list[Job], *,
                 splits: Callable | None = None, lpips_available: bool = False,
                 advance: Callable[[int], None] | None = None, describe: Callable[[str], None] | None = None,
                 on_attack: Callable[[CellOutcome, AttackOutcome], None] | None = None,
                 debug: bool = False, engines: dict[str, Any] | None = None) -> CellOutcome:
    """Train one cell (when --rounds > 0) and run its jobs `attacks` (attack x client) on their
    victims. Pure computation: it writes nothing, so it runs the same in this process, a worker
    process or a Ray task. `on_attack` is called as each job finishes. A failure of the
    training fails every job of the cell; a failure of a client's uploads fails that client's
    jobs; a failing attack fails alone. `engines`: engine choices already made (the run
    directory's cache); the others are made here (gileak.engine.choice) and come back in each
    AttackOutcome for the driver to cache."""
    import torch

    from gileak import data, fl
    from gileak.nets import count_trainable
    from gileak.store import environment
    from gileak.threat import nothing_to_attack

    advance = advance or (lambda n: None)
    describe = describe or (lambda s: None)
    splits = splits or _Splits()
    outcome = CellOutcome(env=environment(device))
    units_left = {a.label: spec.iterations for a in attacks}
    rounds_left = spec.rounds

    def finish(result: AttackOutcome) -> None:
        advance(units_left.pop(result.label, 0))
        outcome.attacks.append(result)
        if on_attack is not None:
            on_attack(outcome, result)

    def fail(jobs: list[Job], error: BaseException) -> None:
        reason = _reason(error, debug)
        status = "not applicable" if isinstance(error, NotApplicableError) else "failed"
        for job in jobs:
            finish(AttackOutcome(attack_id(job), job.label, status, error=reason))

    try:
        describe(f"{cell.key}: loading data")
        loaded = splits(cell.dataset, cell.seed)
        info_shape = tuple(loaded.train_images.shape[1:])
        labels_seen = torch.cat([loaded.train_labels, loaded.test_labels])
        num_classes = max(cell.dataset.component.info().num_classes, int(labels_seen.max()) + 1)
        if num_classes < 2:  # the plan refuses these; a dataset whose info() and load() disagree lands here
            raise UserInputError(f"{cell.dataset.label} has {num_classes} class(es): a classifier needs at least "
                                 "two, or there is nothing to attack.")
        if spec.rounds > 0 and len(loaded.test_images) == 0:
            raise UserInputError(f"{cell.dataset.label} has no test images, so training accuracy cannot be "
                                 "measured; give it a test split or use --rounds 0.")
        input_shape = cell.model.component.input_shape(info_shape)
        train_images = data.fit_images(loaded.train_images, input_shape)
        test_images = data.fit_images(loaded.test_images, input_shape)

        net = build_net(cell.model.component, cell.defense.component, input_shape, num_classes, cell.seed, device)
        base_params = count_trainable(cell.model.component.build(input_shape, num_classes))
        outcome.params = count_trainable(net)
        outcome.params_added_pct = 100.0 * (outcome.params - base_params) / base_params if base_params else 0.0
        fl_config = fl.FLConfig(rounds=max(spec.rounds, 1), seed=cell.seed, patience=spec.patience)
        outcome.attacked_round = 0
        if spec.rounds > 0:
            clients = data.iid_partition(len(train_images), fl_config.clients, cell.seed)
            describe(f"{cell.key}: federated training")
            keep = (0,) if spec.attack_at == "init" else (int(spec.attack_at),) if spec.attack_at.isdigit() else ()

            def one_round(_round: int) -> None:
                nonlocal rounds_left
                rounds_left -= 1
                advance(1)

            trained = fl.federated_train(
                net, cell.defense.component, train_images, loaded.train_labels, test_images, loaded.test_labels,
                fl_config, device=device, progress=one_round, client_indices=clients, keep_rounds=keep,
            )
            advance(rounds_left)
            rounds_left = 0
            outcome.accuracy, outcome.epsilon = trained.accuracy, trained.epsilon
            outcome.accuracy_curve = list(trained.accuracy_curve)
            outcome.rounds_run, outcome.training_seconds = trained.rounds_run, trained.seconds
            outcome.attacked_round = trained.rounds_run
            if keep:
                if keep[0] in trained.snapshots:
                    net.load_state_dict(trained.snapshots[keep[0]])
                    outcome.attacked_round = keep[0]
                else:  # early stopping ended training before that round
                    outcome.cell_notes.append(f"training stopped after round {trained.rounds_run}, before "
                                         f"--attack-at {spec.attack_at}; the final model was attacked")
    except Exception as e:
        advance(rounds_left)
        fail(attacks, e)
        return outcome

    by_client: dict[str, list[Job]] = {}
    for job in attacks:
        by_client.setdefault(job.client.label, []).append(job)
    for jobs in by_client.values():
        client = jobs[0].client
        try:
            victim_idx = victim_images(len(train_images), fl_config, spec, client, cell.seed,
                                       where=f"{cell.dataset.label} with {client.label}")
            victims = train_images[victim_idx].to(device)
            labels = loaded.train_labels[victim_idx].to(device)
            net.train()  # the victim's step is a training step (the authors attack in train mode)
            describe(f"{cell.key} | {client.label}: the victims' uploads")
            per_victim = client.component.images_per_victim()
            # Victim i's randomness, in its own step and in every attack on it, comes from its seed.
            victim_seeds = [_victim_seed(cell.seed, i) for i in range(len(victim_idx) // per_victim)]
            gradients = shared_gradients_of(net, cell.defense.component, client.component, victims, labels,
                                            victim_seeds)
            victim_names = ["+".join(str(int(i)) for i in victim_idx[v : v + per_victim])
                            for v in range(0, len(victim_idx), per_victim)]
            problem = nothing_to_attack(gradients, victim_names)
            if problem is not None:
                raise NothingToAttackError(problem)
        except Exception as e:
            fail(jobs, e)
            continue
        for job in jobs:
            finish(_run_attack(cell, spec, job, net, gradients, victims, labels, victim_idx, victim_names,
                               victim_seeds, input_shape, num_classes, device, units_left, advance, describe,
                               lpips_available, debug, engines))
    return outcome


def shared_gradients_of(net, defense: Defense, client: Client, victims, labels, seeds: list[int]):
    """Every victim's upload under `client`, victim i's randomness from seeds[i]; the paper's
    gradient(batch=1) exactly as it always was."""
    from gileak.threat import shared_gradients

    if client.is_single_image_gradient():
        return shared_gradients(net, defense, victims, labels, seeds=seeds)
    return shared_gradients(net, defense, victims, labels, seeds=seeds, client=client)


def _run_attack(cell: TrainingCell, spec: BenchSpec, job: Job, net, gradients, victims, labels, victim_idx,
                victim_names: list[str], victim_seeds: list[int], input_shape, num_classes: int, device: str,
                units_left: dict, advance, describe, lpips_available: bool, debug: bool,
                engines: dict[str, Any] | None = None) -> AttackOutcome:
    """One job: the attack on the client's victims, on the engine chosen for it (the cached
    choice in `engines`, else gileak.engine.choice), scored per image."""
    from gileak.threat import Target

    attack, client = job.attack, job.client
    describe(f"{cell.dataset.label} | {cell.model.label} | {cell.defense.label} | {client.label} | {attack.label} "
             f"| seed {cell.seed}")

    def progress(n: int, label: str = job.label) -> None:
        n = min(n, units_left.get(label, 0))
        units_left[label] = units_left.get(label, 0) - n
        advance(n)

    aid = attack_id(job)
    per_victim = client.component.images_per_victim()
    key = engine_key(cell, aid, len(victim_seeds), device)
    try:
        target = Target(net=net, shared_gradient=gradients, input_shape=input_shape, num_classes=num_classes,
                        labels=labels, trace=spec.trace, client=client.component)
        originals = victims.detach().cpu()
        attacked = attack_uploads(
            attack, client, target, victim_seeds, victim_names, spec.iterations, _attack_seed(cell.seed, aid),
            tuple(originals.shape), cached=(engines or {}).get(key), progress=progress,
            on_chosen=lambda chosen: describe(f"{cell.dataset.label} | {cell.model.label} | {cell.defense.label} | "
                                              f"{client.label} | {attack.label} | seed {cell.seed} ({chosen.engine})"))
        reconstruction = attacked.reconstruction
        scores = score_batches(attacked.images.clamp(0, 1), originals, per_victim, device, lpips_available)
        label_scores = score_labels(reconstruction, labels.cpu(), per_victim, num_classes)
    except Exception as e:
        status = "not applicable" if isinstance(e, NotApplicableError) else "failed"
        return AttackOutcome(aid, job.label, status, error=_reason(e, debug))
    records = victim_records([int(i) for i in victim_idx], labels.cpu(), scores, label_scores, reconstruction,
                             per_victim)
    return AttackOutcome(aid, job.label, "ok", note=reconstruction.note, seconds=attacked.seconds, victims=records,
                         originals=originals, reconstructions=scores.matched, trace=reconstruction.trace,
                         engine=attacked.chosen.as_dict(), engine_key=key)


@dataclass
class Attacked:
    """What `attack_uploads` gives back."""

    reconstruction: Any  # base.Reconstruction
    images: Any  # its images, on the CPU
    chosen: Any  # the engine it ran on (gileak.engine.choice.EngineChoice)
    seconds: float  # the attack's own time (choosing the engine is chosen.seconds)


def attack_uploads(attack: Resolved, client: Resolved, target, seeds: list[int], names: list[str],
                   max_iterations: int, attack_seed: int, expected_shape: tuple[int, ...], *,
                   cached: dict[str, Any] | None = None, progress: Callable[[int], None] | None = None,
                   on_chosen: Callable[[Any], None] | None = None) -> Attacked:
    """One attack on `target`'s uploads, as every caller runs it (a bench's cell, the Flower
    audit): not applicable where the attack does not handle the client; on the engine
    gileak.engine.choice picks (`cached`: a choice made before; `on_chosen` hears it); the
    global RNG seeded with `attack_seed` after the choice, so the attack draws as if alone;
    DivergedError where a victim's loss or reconstruction is not finite (`names` name them);
    GileakError where its images are not `expected_shape`."""
    import torch

    from gileak.engine import choice as engine_choice

    if not client.component.is_single_image_gradient() and not attack.component.handles_clients:
        raise NotApplicableError(f"{attack.label} reconstructs single images from one gradient step; "
                                 f"it does not handle the client {client.label}")
    started = time.perf_counter()
    chosen = engine_choice.choose(attack.component, target, seeds, cached)
    chosen.seconds = time.perf_counter() - started
    if on_chosen is not None:
        on_chosen(chosen)
    started = time.perf_counter()
    torch.manual_seed(attack_seed)
    with engine_choice.use(chosen.forced):
        reconstruction = attack.component.attack(target, seeds=seeds, max_iterations=max_iterations,
                                                 progress=progress or (lambda n: None))
    problem = unscorable(reconstruction, names)
    if problem is not None:
        raise DivergedError(problem)
    seconds = time.perf_counter() - started
    images = reconstruction.images.detach().cpu()
    if tuple(images.shape) != tuple(expected_shape):
        raise GileakError(f"{attack.label} returned images of shape {tuple(images.shape)} for {len(seeds)} "
                          f"victim(s) of {client.component.images_per_victim()} image(s) {tuple(expected_shape[1:])}")
    return Attacked(reconstruction, images, chosen, seconds)


def victim_records(victims: list[int], labels, scores: BatchScores, label_scores, reconstruction,
                   per_victim: int) -> list:
    """The store's per-image records of a scored attack: image i's victim index (training image,
    or a Flower sample), label, metrics, and its upload's iterations, loss and label accuracy."""
    from gileak.store import VictimRecord

    records = []
    for i in range(len(victims)):
        upload = i // per_victim
        accuracy, baseline = label_scores[upload] if label_scores else (None, None)
        records.append(VictimRecord(
            victims[i], int(labels[i]), scores.ssim[i], _finite(scores.psnr[i]), scores.mse[i],
            scores.lpips[i] if scores.lpips else None, reconstruction.iterations[upload],
            _finite(float(reconstruction.final_loss[upload])), upload, accuracy, baseline))
    return records


@dataclass
class BatchScores:
    """Per-image metrics after pairing each victim's reconstructions with its originals."""

    matched: Any  # reconstructions reordered so that row i goes with original i
    ssim: list[float]
    psnr: list[float]
    mse: list[float]
    lpips: list[float] | None


def score_batches(reconstructions, originals, per_victim: int, device: str, lpips_available: bool) -> BatchScores:
    """Per-image SSIM, PSNR, MSE and LPIPS. A victim of several images gets its reconstructions
    paired with its originals first (`metrics.match_reconstructions`, the assignment that
    maximises total SSIM): an evaluation step that uses the ground truth, after the attack."""
    import torch

    from gileak import metrics

    matched = reconstructions
    if per_victim > 1:
        shape = (-1, per_victim, *originals.shape[1:])
        order = metrics.match_reconstructions(reconstructions.view(shape), originals.view(shape))
        matched = reconstructions[(order + torch.arange(len(order)).unsqueeze(1) * per_victim).flatten()]
    lpips = metrics.lpips_distances(matched, originals, device) if lpips_available else None
    return BatchScores(matched, metrics.ssim(matched, originals), metrics.psnr(matched, originals),
                       metrics.mse(matched, originals), lpips)


def score_labels(reconstruction, true_labels, per_victim: int, num_classes: int) -> list[tuple[float, float]] | None:
    """Per victim, (label accuracy, label-blind baseline) of the labels the attack ended with —
    compared as multisets — or None when the attack had the labels from the threat model (or
    returned none). The baseline is the expected accuracy of a guess that knows only the batch
    size and spreads it evenly over the classes, for these victims' actual labels."""
    from gileak.engine.labels import label_accuracy, label_blind_accuracy

    if reconstruction.labels is None or reconstruction.labels_known:
        return None
    found = reconstruction.labels.detach().cpu().long().reshape(-1, per_victim)
    true = true_labels.long().reshape(-1, per_victim)
    if found.shape != true.shape:
        raise GileakError(f"the attack returned {reconstruction.labels.numel()} labels for {true.numel()} images")
    return list(zip(label_accuracy(found, true), label_blind_accuracy(true, num_classes)))


def victim_images(num_train: int, config, spec: BenchSpec, client: Resolved, seed: int, where: str = ""):
    """The training images of every victim under `client`, as indices listed victim by victim
    (and, within a victim, client by client): --victims uploads of `clients_per_upload()`
    clients holding `images_per_client()` images each.

    A client's images are distinct, drawn from the attacked client's training split (client 0
    of the partition, `_victim_pool`); the K clients of an aggregate are clients 0 … K − 1, each
    from its own split, when there are that many with enough images (else all from client 0's).
    Victims get distinct images while the split holds them all; beyond that each victim's batch
    is its own draw and batches may share images. Raises UserInputError when a client needs
    more images than its split holds (or --victims 1-image victims more than it holds)."""
    import torch

    victims = spec.victims
    per_client = client.component.images_per_client()
    clients = client.component.clients_per_upload()
    separate = 1 < clients <= config.clients and num_train >= config.clients
    if separate:
        pools = [_victim_pool(num_train, config, spec, need=victims * per_client, client_index=k)
                 for k in range(clients)]
        separate = all(len(pool) >= per_client for pool in pools)
    if separate:
        draws = [_draw(pools[k], victims, per_client, seed + 104_729 * k, where) for k in range(clients)]
        return torch.stack(draws, dim=1).reshape(-1)
    pool = _victim_pool(num_train, config, spec, need=victims * clients * per_client)
    return _draw(pool, victims, clients * per_client, seed, where).reshape(-1)


def unscorable(reconstruction, victim_names: list[str]) -> str | None:
    """Why an attack's output cannot be scored, or None: a victim whose loss is NaN or infinite
    (the attack never had a finite loss: a parameter beyond float range, gradients too large to
    compare) or whose reconstruction is not finite. Its SSIM would be a number about nothing."""
    import torch

    from gileak.threat import listed_victims

    losses = [float(loss) for loss in reconstruction.final_loss]
    bad = [victim_names[i] if i < len(victim_names) else str(i)
           for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        return (f"the attack's loss is NaN or infinite for victim {listed_victims(bad)}: nothing was reconstructed "
                "(a parameter or the shared gradient beyond float range?)")
    if not bool(torch.isfinite(reconstruction.images).all()):
        return "the attack's reconstructions have NaN or infinite pixels: there is nothing to score"
    return None


def _draw(pool, victims: int, per_victim: int, seed: int, where: str):
    """(victims, per_victim) distinct indices of `pool` per victim; see `victim_images`."""
    import torch

    from gileak import data

    if per_victim > len(pool):
        raise UserInputError(
            f"{where}: each victim needs {per_victim} distinct images, but the attacked client's training split "
            f"holds {len(pool)}. Use a smaller batch, data or aggregate, or a larger dataset.")
    if victims * per_victim <= len(pool):  # one permutation: every image distinct (batch 1: as always)
        return data.pick_victims(pool, victims * per_victim, seed).view(victims, per_victim)
    if per_victim == 1:
        data.pick_victims(pool, victims, seed)  # raises: more 1-image victims than images
    return torch.stack([data.pick_victims(pool, per_victim, seed + 1_000_003 * (i + 1)) for i in range(victims)])


def _victim_pool(num_train: int, config, spec: BenchSpec, need: int | None = None, client_index: int = 0):
    """The images the attacked client trains on: the training split of client 0 (or
    `client_index`) of the federated partition. Before any training (--rounds 0) the partition
    does not matter yet, so where client 0's split holds fewer than `need` images (default
    --victims; a handful of your own images) all training images are used."""
    import torch

    from gileak import data

    need = spec.victims if need is None else need
    if num_train >= config.clients:
        clients = data.iid_partition(num_train, config.clients, config.seed)
        train_idx, _ = data.client_split(clients[client_index], config.val_fraction, config.seed)
        if spec.rounds > 0 or client_index > 0 or len(train_idx) >= need:
            return train_idx
    return torch.arange(num_train)


@dataclass
class ResumeInfo:
    """What a run found in its directory's store."""

    reused: int = 0
    retried: int = 0
    interrupted: int = 0
    todo: int = 0


class Runner:
    """Runs a plan's missing results into the run directory's store, then builds the leaderboard
    from the store. A failing cell is recorded with its reason; the rest go on.

    Creating a Runner checks everything that can be known before a run — the device, the
    executor, that `out` is a directory this process can write, the directory's lock and
    budget — and writes nothing until all of it passed. From then on it holds the directory's
    lock (`store.RunLock`) until `close()` or the end of the process."""

    def __init__(self, plan: Plan, out: Path, advance: Callable[[int], None] | None = None,
                 describe: Callable[[str], None] | None = None, debug: bool = False,
                 executor: str = "local", workers: int | None = None, ray_address: str | None = None) -> None:
        from gileak.store import ResultStore, RunLock, check_run_dir

        self.plan = plan
        self.spec = plan.spec
        self.out = Path(out)
        self.advance = advance or (lambda n: None)
        self.describe = describe or (lambda s: None)
        self.debug = debug
        self.executor = executor
        self.workers = workers
        self.ray_address = ray_address
        self.traces: list[Path] = []
        if executor == "ray":  # the cluster's devices are known once it is reached
            _require_ray()
            self.device = self.spec.device
        else:
            self.device = pick_device(self.spec.device)
        check_run_dir(self.out)
        self.store = None
        self.lock = RunLock(self.out)
        try:
            self.store = ResultStore(self.out)
            self.store.check_budget({k: getattr(self.spec, k) for k in BUDGET_FIELDS})
        except BaseException:
            self.close()
            raise
        self.lock.claim()
        self.resume = ResumeInfo()
        self.todo = self._todo()
        groups = dict.fromkeys((c.dataset.label, c.model.label, c.defense.label) for c in plan.cells)
        self._groups = {group: i for i, group in enumerate(groups)}

    def _todo(self) -> list[tuple[int, list[Job]]]:
        """(cell index, jobs still to run) for every cell with something missing. Stored
        `ok` and `not applicable` results are reused; `failed` ones are tried again."""
        stored = self.store.statuses()
        interrupted = set(self.store.interrupted())
        todo = []
        for index, cell in enumerate(self.plan.cells):
            cid = cell_id(cell)
            missing = []
            for attack in cell.jobs:
                status = stored.get((cid, attack_id(attack)))
                if status in ("ok", "not applicable"):
                    self.resume.reused += 1
                else:
                    self.resume.retried += status == "failed"
                    missing.append(attack)
            if missing:
                todo.append((index, missing))
                self.resume.interrupted += cid in interrupted
                self.resume.todo += len(missing)
        return todo

    def work_units(self) -> int:
        return sum(self.spec.rounds + len(attacks) * self.spec.iterations for _, attacks in self.todo)

    def close(self) -> None:
        """Close the store and release the directory's lock."""
        if self.store is not None:
            self.store.close()
            self.store = None
        self.lock.release()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def run(self) -> RunResult:
        import torch

        from gileak import metrics
        from gileak.store import atomic_write_text

        with self._writing(self.out / "spec.json"):
            atomic_write_text(self.out / "spec.json", self.spec.model_dump_json(indent=2))
        self.store.clear_all_running()
        lpips_available, _ = metrics.lpips_status()
        started = time.time()
        try:
            if self.todo:
                if self.executor == "ray":
                    from gileak.executors import run_ray

                    run_ray(self, lpips_available)
                elif self._worker_devices():
                    from gileak.executors import run_pool

                    run_pool(self, lpips_available, self._worker_devices())
                else:
                    self._run_local(lpips_available)
        except BaseException:
            if self._directory_intact():  # else the error that says so is under way: write nothing
                try:
                    write_victims_log(self.store, self.out / "victims.jsonl")
                    self.store.record_run(started, time.time(), completed=False, computed=self.resume.todo,
                                          reused=self.resume.reused)
                except (OSError, GileakError, sqlite3.Error):  # the error under way (a full disk, Ctrl-C) is the one to tell
                    pass
            raise
        with self._writing(self.out / "victims.jsonl"):
            write_victims_log(self.store, self.out / "victims.jsonl")
        self.store.record_run(started, time.time(), completed=True, computed=self.resume.todo,
                              reused=self.resume.reused)
        self.check_directory()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return build_result(self.store, self._planned_keys(), self.out, traces=self.traces)

    def _directory_intact(self) -> bool:
        try:
            self.check_directory()
        except GileakError:
            return False
        return True

    def check_directory(self) -> None:
        """Raise when the store or the lock file was deleted or replaced during the run (then the
        results are not where the run says, or a second writer may have started)."""
        self.store.still_there()
        if not self.lock.still_held():
            raise GileakError(f"{self.lock.path} was deleted or replaced while this run wrote {self.out}, so "
                              "another bench may have started writing it too. Check the directory, then run "
                              "the same command again: finished results are reused.")

    @contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """A file of the run directory that cannot be written (full disk, read-only, vanished) as
        a message that says where and that finished results are kept."""
        from gileak.store import write_error

        try:
            yield
        except OSError as e:
            raise write_error(e, path, self.out) from e

    def _worker_devices(self) -> list[str]:
        """Devices of the local worker processes; empty: run in this process."""
        import torch

        device = self.device
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        workers = self.workers if self.workers is not None else (gpus if gpus > 1 else 1)
        if workers <= 1 or len(self.todo) <= 1:
            return []
        if gpus:
            return [f"cuda:{i % gpus}" for i in range(workers)]
        return ["cpu"] * workers

    def _run_local(self, lpips_available: bool) -> None:
        device = self.device
        splits = _Splits()
        for index, attacks in self.todo:
            cell = self.plan.cells[index]
            cid = cell_id(cell)
            self.store.mark_running(cid)
            execute_cell(cell, self.spec, device, attacks, splits=splits, lpips_available=lpips_available,
                         advance=self.advance, describe=self.describe, debug=self.debug,
                         on_attack=lambda outcome, result, i=index: self.persist(i, outcome, result),
                         engines=self.engines())
            self.store.clear_running(cid)

    def engines(self) -> dict[str, Any]:
        """The engine choices cached in the run directory (gileak.engine.choice)."""
        from gileak.engine.choice import load

        return load(self.out)

    def persist(self, index: int, outcome: CellOutcome, result: AttackOutcome) -> None:
        """Store one finished attack (one transaction), then write its figure and trace files:
        a figure that cannot be written never costs a stored result."""
        from gileak.report.figures import save_reconstruction_grid
        from gileak.report.images import save_victim_images
        from gileak.store import StoredResult

        cell = self.plan.cells[index]
        jobs = cell.jobs
        job = next(j for j in jobs if j.label == result.label)
        position = self._group_position(cell) * len(jobs) + jobs.index(job)
        key = (cell.dataset.label, cell.model.label, cell.defense.label, job.attack.label)
        named = (*key[:3], job.client.label, key[3])
        slug = _slug(*named, f"seed{cell.seed}", identity=f"{cell_id(cell)} || {result.attack}")
        note = result.note or None
        traced = self.spec.trace and result.status == "ok"
        if traced and result.trace is None:
            note = "; ".join(filter(None, [note, "this attack does not record gradient traces"]))
        facts = outcome.facts()
        if result.engine:  # the engine each result ran on, for reports: env["engine"]
            facts["env"] = {**facts["env"], "engine": result.engine}
            if result.engine.get("how") == "probe" and result.engine_key:
                from gileak.engine.choice import EngineChoice, remember

                remember(self.out, result.engine_key, EngineChoice.from_dict(result.engine))
        self.store.put(StoredResult(
            cell=cell_id(cell), attack=result.attack, dataset=key[0], model=key[1], defense=key[2],
            seed=cell.seed, attack_label=key[3], position=position, status=result.status, error=result.error,
            note=note, seconds=result.seconds, victims=result.victims, client=job.client.label, **facts,
        ))
        self.check_directory()
        if result.status == "ok":
            grid = self.out / "reconstructions" / f"{slug}.png"
            per_victim = job.client.component.images_per_victim()
            with self._writing(grid):  # a victim's batch stays on one line (16 images, or its whole batch)
                save_reconstruction_grid(result.originals, result.reconstructions, grid,
                                         columns=max(per_victim, 16 // per_victim * per_victim))
            images = self.out / "reconstructions" / f"{slug}.npz"
            with self._writing(images):
                save_victim_images(result.originals, result.reconstructions, images, cell=cell_id(cell),
                                   attack=result.attack, victims=[v.victim for v in result.victims])
            if traced and result.trace is not None:
                from gileak.report.figures import save_trace

                with self._writing(self.out / "traces" / slug):
                    self.traces += save_trace(result.trace, self.out / "traces" / slug, " | ".join(named))

    def _group_position(self, cell: TrainingCell) -> int:
        return self._groups[(cell.dataset.label, cell.model.label, cell.defense.label)]

    def _planned_keys(self) -> set[tuple[str, str]]:
        return {(cell_id(c), attack_id(a)) for c in self.plan.cells for a in c.jobs}


def write_victims_log(store, path: Path) -> None:
    """victims.jsonl, rebuilt from the store (so a resumed run never lists a victim twice)."""
    lines = []
    for r in store.results():
        for index, v in enumerate(r.victims):
            lines.append(json.dumps({
                "dataset": r.dataset, "model": r.model, "defense": r.defense, "client": r.client,
                "attack": r.attack_label, "seed": r.seed, "upload": v.upload if v.upload is not None else index,
                "victim": v.victim, "label": v.label, "ssim": v.ssim, "psnr": v.psnr, "mse": v.mse,
                "lpips": v.lpips, "iterations": v.iterations, "loss": v.loss, "label_accuracy": v.label_accuracy,
                "label_baseline": v.label_baseline,
            }))
    from gileak.store import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in lines))


def build_result(store, keys: set[tuple[str, str]] | None, out: Path | None, traces=None) -> RunResult:
    """The leaderboard rows, notes and failures of the stored results (`keys` only, when given),
    in planned order; rows aggregate seeds."""
    from gileak import metrics

    results: dict[tuple[str, str, str, str, str], list[AttackResult]] = {}
    failures: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    lpips_missing = False
    sources: dict[tuple[str, str, str, str, str], RowSource] = {}
    for r in _set_apart(store.results(keys), notes):
        key = (r.dataset, r.model, r.defense, r.client, r.attack_label)
        where = " | ".join(key)
        results.setdefault(key, [])
        source = sources.setdefault(key, RowSource())
        source.cells.add(r.cell.rsplit(" | seed=", 1)[0])
        source.attacks.add(r.attack)
        if r.status == "ok":
            source.seeds.add(r.seed)
        cell_where = f"{r.dataset} | {r.model} | {r.defense} | seed {r.seed}"
        for note in r.cell_notes:
            if (cell_where, note) not in notes:
                notes.append((cell_where, note))
        if r.status != "ok":
            failures.append((where, f"{NOT_APPLICABLE}{r.error.removeprefix(NOT_APPLICABLE)}"
                             if r.status == "not applicable" else (r.error or "failed")))
            continue
        if r.note and (where, r.note) not in notes:
            notes.append((where, r.note))
        lpips = [v.lpips for v in r.victims]
        lpips_missing |= any(v is None for v in lpips)
        # per-victim values are repeated on each of the victim's images; one per victim here
        uploads = list({(v.upload if v.upload is not None else i): v for i, v in enumerate(r.victims)}.values())
        labelled = [v for v in uploads if v.label_accuracy is not None]
        results[key].append(AttackResult(
            [v.ssim for v in r.victims], [v.psnr if v.psnr is not None else math.inf for v in r.victims],
            [v.mse for v in r.victims], None if any(v is None for v in lpips) else lpips,
            [v.iterations for v in uploads], r.seconds or 0.0, r.accuracy, r.params or 0,
            r.params_added_pct or 0.0, r.epsilon, len(uploads),
            [v.label_accuracy for v in labelled] if labelled else None,
            [v.label_baseline for v in labelled] if labelled else None,
        ))
    lpips_reason = None
    if lpips_missing:
        available, reason = metrics.lpips_status()
        lpips_reason = reason if not available else "LPIPS was not computed when these results were made"
    rows = _rows(results, failures, lpips_reason)
    real_failures = [(w, r) for w, r in failures if not r.startswith(NOT_APPLICABLE)]
    notes += [(w, r) for w, r in failures if r.startswith(NOT_APPLICABLE)]
    return RunResult(rows, real_failures, lpips_reason, out=out, notes=notes, traces=list(traces or []),
                     sources=sources)


def _set_apart(results: list, notes: list[tuple[str, str]]) -> list:
    """Results that share their labels but not their identity — a folder whose images changed
    between two runs into one directory, one folder name in two working directories, an attack
    whose parameters gained a default — are different rows, never pooled: the label of the
    component that differs gets a mark (` #2`, ` #3`, ...) in order of appearance, and a note
    says why."""
    firsts: dict[tuple[str, ...], list[list[str]]] = {}
    for r in results:
        labels = (r.dataset, r.model, r.defense, r.client, r.attack_label)
        identity = [*r.cell.rsplit(" | seed=", 1)[0].split(" | "), r.attack]
        known = firsts.setdefault(labels, [])
        if identity not in known:
            known.append(identity)
        number = known.index(identity) + 1
        if number == 1:
            continue
        parts = ["dataset", "model", "defense", "attack"]
        differs = [part for part, mine, first in zip(parts, identity, known[0]) if mine != first] or ["attack"]
        for part in differs:
            name = "attack_label" if part == "attack" else part
            setattr(r, name, f"{getattr(r, name)} #{number}")
        note = (f"results of different {'/'.join(differs)}s are stored under these labels (data or "
                f"parameters changed between runs into this directory); each is its own row, numbered")
        if (" | ".join(labels), note) not in notes:
            notes.append((" | ".join(labels), note))
    return results


def _rows(results, failures, lpips_reason) -> list[dict[str, Any]]:
    from gileak import metrics

    failed = {}
    for where, reason in failures:
        failed.setdefault(where, reason)
    rows = []
    for key, parts in results.items():
        row: dict[str, Any] = dict(zip(("dataset", "model", "defense", "client", "attack"), key))
        reason = failed.get(" | ".join(key))
        if not parts:
            row.update({k: None for k in ROW_METRICS})
            status = "not applicable" if reason and reason.startswith(NOT_APPLICABLE) else "failed"
            row.update(status=status, error=reason or "failed")
            rows.append(row)
            continue
        ssim = [v for p in parts for v in p.ssim]
        accuracies = [p.accuracy for p in parts if p.accuracy is not None]
        label_parts = [p for p in parts if p.label_accuracy is not None]
        uploads = sum(p.uploads for p in parts)
        lpips = [v for p in parts for v in (p.lpips or [])] if all(p.lpips is not None for p in parts) else None
        row.update(
            ssim_mean=metrics.summarize(ssim)[0],
            ssim_std=metrics.summarize(ssim)[1],
            asr=metrics.attack_success_rate(ssim),
            psnr_mean=metrics.summarize([v for p in parts for v in p.psnr])[0],
            mse_mean=metrics.summarize([v for p in parts for v in p.mse])[0],
            lpips_mean=metrics.summarize(lpips)[0] if lpips else None,
            accuracy_mean=metrics.summarize(accuracies)[0] if accuracies else None,
            accuracy_std=metrics.summarize(accuracies)[1] if accuracies else None,
            epsilon=max(eps) if (eps := [p.epsilon for p in parts if p.epsilon is not None]) else None,
            params=parts[0].params,
            params_added_pct=parts[0].params_added_pct,
            victims=uploads,
            images=len(ssim),
            label_accuracy=metrics.summarize([v for p in label_parts for v in p.label_accuracy])[0]
            if label_parts else None,
            label_baseline=metrics.summarize([v for p in label_parts for v in p.label_baseline])[0]
            if label_parts else None,
            seconds=sum(p.seconds for p in parts),
            iterations_mean=sum(v for p in parts for v in p.iterations) / max(1, uploads),
            status="ok" if reason is None else "partial",
            error=reason,
        )
        if lpips_reason:
            row["lpips_note"] = lpips_reason
        rows.append(row)
    return rows


NOT_APPLICABLE = "not applicable: "
ROW_METRICS = ("ssim_mean", "ssim_std", "asr", "psnr_mean", "mse_mean", "lpips_mean", "accuracy_mean",
               "accuracy_std", "epsilon", "params", "params_added_pct", "victims", "images", "label_accuracy",
               "label_baseline", "seconds")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _slug(*parts: str, identity: str = "") -> str:
    """A file name for a result (without suffix): a readable prefix of its labels, and a hash of
    the labels and the result's `identity` (its store key), so two results never share a file
    however alike their labels (cut, case-folded, with their odd characters replaced, or the
    same labels for other data). ASCII only, at most ~140 bytes; dots are kept, so callers
    append suffixes and never replace them (`with_suffix` would eat `.1__ig`)."""
    import hashlib

    readable = "".join(c if (c.isascii() and c.isalnum()) or c in "-_=." else "_" for c in "__".join(parts))
    digest = hashlib.sha256(json.dumps([parts, identity]).encode()).hexdigest()[:12]
    return f"{readable.strip('.')[:120]}-{digest}"


def _require_ray() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserInputError("--executor ray needs Ray: pip install 'gileak[ray]'")
