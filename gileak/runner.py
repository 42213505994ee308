"""Turn a BenchSpec into a plan of cells, run them, and aggregate one row per
(dataset, model, defense, attack)."""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gileak import registry
from gileak.base import Attack, Dataset, Defense, Model
from gileak.errors import GileakError, NotApplicableError, UserInputError
from gileak.spec import BenchSpec, ComponentRef
from gileak.store import CellFacts

#: Spec fields every result of a run directory shares (see gileak.store).
BUDGET_FIELDS = ("victims", "iterations", "rounds", "attack_at", "patience")


@dataclass
class Resolved:
    """A component reference with its instantiated, validated component."""

    ref: ComponentRef
    component: Any

    @property
    def label(self) -> str:
        return self.ref.label


@dataclass
class TrainingCell:
    """Everything that shares one trained model: (dataset, model, defense, seed) and its attacks."""

    dataset: Resolved
    model: Resolved
    defense: Resolved
    seed: int
    attacks: list[Resolved]

    @property
    def key(self) -> str:
        return f"{self.dataset.label} | {self.model.label} | {self.defense.label} | seed {self.seed}"


@dataclass
class Plan:
    spec: BenchSpec
    cells: list[TrainingCell]

    @property
    def rows_expected(self) -> int:
        return len({(c.dataset.label, c.model.label, c.defense.label) for c in self.cells}) * len(self.spec.attacks)


def resolve(kind: str, ref: ComponentRef, data_root: Path | str | None = None) -> Resolved:
    """Instantiate a component. A dataset that takes a `root` parameter gets `data_root` (the
    spec's or --data-root) unless its own parameters name one; the label stays as written."""
    cls = registry.get(kind, ref.name)
    params = dict(ref.params)
    takes_root = kind == "dataset" and "root" in cls.Params.model_fields
    if takes_root and data_root is not None and params.get("root") is None:
        params["root"] = str(data_root)
    return Resolved(ref, cls(**params))


def plan(spec: BenchSpec, check_data: bool = True) -> Plan:
    """Resolve every name and validate every component's parameters before anything runs;
    with `check_data`, a dataset whose files are missing stops it here."""
    datasets = [resolve("dataset", r, data_root=spec.data_root) for r in spec.datasets]
    models = [resolve("model", r) for r in spec.models]
    defenses = [resolve("defense", r) for r in spec.defenses]
    attacks = [resolve("attack", r) for r in spec.attacks]
    for dataset in datasets if check_data else ():  # missing files are the user's to fix: say so first
        dataset.component.info()
    cells = [
        TrainingCell(dataset, model, defense, seed, attacks)
        for dataset in datasets
        for model in models
        for defense in defenses
        for seed in range(spec.seeds)
    ]
    return Plan(spec, cells)


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
    no pixel is loaded."""
    from gileak.nets import count_trainable

    info = dataset.info()
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


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    lpips_note: str | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)
    traces: list[Path] = field(default_factory=list)
    out: Path | None = None


def _victim_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def _attack_seed(cell_seed: int, attack_id: str) -> int:
    """The global RNG seed an attack starts from (stochastic modules sample from it): fixed by
    the cell and the attack alone, so an attack run after a resume draws what it would have
    drawn in one uninterrupted run."""
    import zlib

    return (cell_seed * 7_919 + zlib.crc32(attack_id.encode())) % 2**63


@dataclass
class AttackOutcome:
    """One attack on one trained cell, as computed (anywhere); the driver stores it."""

    attack: str  # canonical id
    label: str
    status: str  # ok | failed | not applicable
    error: str | None = None
    note: str = ""
    seconds: float = 0.0
    victims: list[Any] = field(default_factory=list)  # store.VictimRecord
    originals: Any = None  # (N, C, H, W) cpu tensors for the figure
    reconstructions: Any = None
    trace: Any = None  # base.GradientTrace


@dataclass(kw_only=True)
class CellOutcome(CellFacts):
    """A training cell's shared facts (utility, size, notes) and its attacks' outcomes."""

    attacks: list[AttackOutcome] = field(default_factory=list)


def cell_id(cell: TrainingCell) -> str:
    """The store key of a training cell: each component by name and full parameters, and the seed."""
    from gileak.store import canonical

    parts = [canonical(r.ref.name, r.component.params.model_dump(mode="json"))
             for r in (cell.dataset, cell.model, cell.defense)]
    return " | ".join(parts) + f" | seed={cell.seed}"


def attack_id(attack: Resolved) -> str:
    from gileak.store import canonical

    return canonical(attack.ref.name, attack.component.params.model_dump(mode="json"))


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


def execute_cell(cell: TrainingCell, spec: BenchSpec, device: str, attacks: list[Resolved], *,
                 splits: Callable | None = None, lpips_available: bool = False,
                 advance: Callable[[int], None] | None = None, describe: Callable[[str], None] | None = None,
                 on_attack: Callable[[CellOutcome, AttackOutcome], None] | None = None,
                 debug: bool = False) -> CellOutcome:
    """Train one cell (when --rounds > 0) and run `attacks` on its victims. Pure computation: it
    writes nothing, so it runs the same in this process, a worker process or a Ray task.
    `on_attack` is called as each attack finishes. A failure of the training or the victims'
    step fails every attack of the cell; a failing attack fails alone."""
    import torch

    from gileak import data, fl, metrics
    from gileak.nets import count_trainable
    from gileak.store import VictimRecord, environment
    from gileak.threat import Target, shared_gradients

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

    try:
        describe(f"{cell.key}: loading data")
        loaded = splits(cell.dataset, cell.seed)
        info_shape = tuple(loaded.train_images.shape[1:])
        labels_seen = torch.cat([loaded.train_labels, loaded.test_labels])
        num_classes = max(cell.dataset.component.info().num_classes, int(labels_seen.max()) + 1)
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

        victim_idx = data.pick_victims(_victim_pool(len(train_images), fl_config, spec), spec.victims, cell.seed)
        victims = train_images[victim_idx].to(device)
        labels = loaded.train_labels[victim_idx].to(device)
        net.train()  # the victim's step is a training step (the authors attack in train mode)
        gradients = shared_gradients(net, cell.defense.component, victims, labels, seed=cell.seed)
    except Exception as e:
        advance(rounds_left)
        reason = _reason(e, debug)
        status = "not applicable" if isinstance(e, NotApplicableError) else "failed"
        for attack in attacks:
            finish(AttackOutcome(attack_id(attack), attack.label, status, error=reason))
        return outcome

    for attack in attacks:
        describe(f"{cell.dataset.label} | {cell.model.label} | {cell.defense.label} | {attack.label} | seed {cell.seed}")
        started = time.perf_counter()

        def progress(n: int, label: str = attack.label) -> None:
            n = min(n, units_left.get(label, 0))
            units_left[label] = units_left.get(label, 0) - n
            advance(n)

        aid = attack_id(attack)
        try:
            torch.manual_seed(_attack_seed(cell.seed, aid))
            target = Target(net=net, shared_gradient=gradients, input_shape=input_shape,
                            num_classes=num_classes, labels=labels, trace=spec.trace)
            seeds = [_victim_seed(cell.seed, i) for i in range(len(victim_idx))]
            reconstruction = attack.component.attack(target, seeds=seeds, max_iterations=spec.iterations,
                                                     progress=progress)
            seconds = time.perf_counter() - started
            originals = victims.detach().cpu()
            recon = reconstruction.images.clamp(0, 1)
            ssim = metrics.ssim(recon, originals)
            psnr = metrics.psnr(recon, originals)
            mse = metrics.mse(recon, originals)
            lpips = metrics.lpips_distances(recon, originals, device) if lpips_available else None
        except Exception as e:
            status = "not applicable" if isinstance(e, NotApplicableError) else "failed"
            finish(AttackOutcome(aid, attack.label, status, error=_reason(e, debug)))
            continue
        records = [VictimRecord(int(victim_idx[i]), int(labels[i]), ssim[i], _finite(psnr[i]), mse[i],
                                lpips[i] if lpips else None, reconstruction.iterations[i],
                                _finite(float(reconstruction.final_loss[i])))
                   for i in range(len(ssim))]
        finish(AttackOutcome(aid, attack.label, "ok", note=reconstruction.note, seconds=seconds, victims=records,
                             originals=originals, reconstructions=recon, trace=reconstruction.trace))
    return outcome


def _victim_pool(num_train: int, config, spec: BenchSpec):
    """The images the attacked client trains on: the training split of client 0 of the
    federated partition. Before any training (--rounds 0) the partition does not matter yet,
    so a dataset too small for it (a handful of your own images) uses all training images."""
    import torch

    from gileak import data

    if num_train >= config.clients:
        clients = data.iid_partition(num_train, config.clients, config.seed)
        train_idx, _ = data.client_split(clients[0], config.val_fraction, config.seed)
        if spec.rounds > 0 or len(train_idx) >= spec.victims:
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
    from the store. A failing cell is recorded with its reason; the rest go on."""

    def __init__(self, plan: Plan, out: Path, advance: Callable[[int], None] | None = None,
                 describe: Callable[[str], None] | None = None, debug: bool = False,
                 executor: str = "local", workers: int | None = None, ray_address: str | None = None) -> None:
        from gileak.store import ResultStore

        self.plan = plan
        self.spec = plan.spec
        self.out = out
        self.advance = advance or (lambda n: None)
        self.describe = describe or (lambda s: None)
        self.debug = debug
        self.executor = executor
        self.workers = workers
        self.ray_address = ray_address
        self.traces: list[Path] = []
        self.store = ResultStore(out)
        self.store.check_budget({k: getattr(self.spec, k) for k in BUDGET_FIELDS})
        self.resume = ResumeInfo()
        self.todo = self._todo()
        groups = dict.fromkeys((c.dataset.label, c.model.label, c.defense.label) for c in plan.cells)
        self._groups = {group: i for i, group in enumerate(groups)}

    def _todo(self) -> list[tuple[int, list[Resolved]]]:
        """(cell index, attacks still to run) for every cell with something missing. Stored
        `ok` and `not applicable` results are reused; `failed` ones are tried again."""
        stored = self.store.statuses()
        interrupted = set(self.store.interrupted())
        todo = []
        for index, cell in enumerate(self.plan.cells):
            cid = cell_id(cell)
            missing = []
            for attack in cell.attacks:
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

    def run(self) -> RunResult:
        import torch

        from gileak import metrics

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "spec.json").write_text(self.spec.model_dump_json(indent=2))
        self.store.clear_all_running()
        lpips_available, _ = metrics.lpips_status()
        started, completed = time.time(), False
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
            completed = True
        finally:
            write_victims_log(self.store, self.out / "victims.jsonl")
            self.store.record_run(started, time.time(), completed=completed, computed=self.resume.todo,
                                  reused=self.resume.reused)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return build_result(self.store, self._planned_keys(), self.out, traces=self.traces)

    def _worker_devices(self) -> list[str]:
        """Devices of the local worker processes; empty: run in this process."""
        import torch

        device = pick_device(self.spec.device)
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        workers = self.workers if self.workers is not None else (gpus if gpus > 1 else 1)
        if workers <= 1 or len(self.todo) <= 1:
            return []
        if gpus:
            return [f"cuda:{i % gpus}" for i in range(workers)]
        return ["cpu"] * workers

    def _run_local(self, lpips_available: bool) -> None:
        device = pick_device(self.spec.device)
        splits = _Splits()
        for index, attacks in self.todo:
            cell = self.plan.cells[index]
            cid = cell_id(cell)
            self.store.mark_running(cid)
            execute_cell(cell, self.spec, device, attacks, splits=splits, lpips_available=lpips_available,
                         advance=self.advance, describe=self.describe, debug=self.debug,
                         on_attack=lambda outcome, result, i=index: self.persist(i, outcome, result))
            self.store.clear_running(cid)

    def persist(self, index: int, outcome: CellOutcome, result: AttackOutcome) -> None:
        """Store one finished attack (one transaction) and write its figure and trace files."""
        from gileak.report.figures import save_reconstruction_grid
        from gileak.store import StoredResult

        cell = self.plan.cells[index]
        position = self._group_position(cell) * len(self.spec.attacks) + \
            [a.label for a in cell.attacks].index(result.label)
        key = (cell.dataset.label, cell.model.label, cell.defense.label, result.label)
        slug = _slug("__".join(key)) + f"__seed{cell.seed}"
        note = result.note or None
        if result.status == "ok":
            from gileak.report.images import save_victim_images

            save_reconstruction_grid(result.originals, result.reconstructions,
                                     self.out / "reconstructions" / f"{slug}.png")
            save_victim_images(result.originals, result.reconstructions, self.out / "reconstructions" / f"{slug}.npz",
                               cell=cell_id(cell), attack=result.attack, victims=[v.victim for v in result.victims])
            if self.spec.trace:
                if result.trace is None:
                    note = "; ".join(filter(None, [note, "this attack does not record gradient traces"]))
                else:
                    from gileak.report.figures import save_trace

                    self.traces += save_trace(result.trace, self.out / "traces" / slug, " | ".join(key))
        self.store.put(StoredResult(
            cell=cell_id(cell), attack=result.attack, dataset=key[0], model=key[1], defense=key[2],
            seed=cell.seed, attack_label=key[3], position=position, status=result.status, error=result.error,
            note=note, seconds=result.seconds, victims=result.victims, **outcome.facts(),
        ))

    def _group_position(self, cell: TrainingCell) -> int:
        return self._groups[(cell.dataset.label, cell.model.label, cell.defense.label)]

    def _planned_keys(self) -> set[tuple[str, str]]:
        return {(cell_id(c), attack_id(a)) for c in self.plan.cells for a in c.attacks}


def write_victims_log(store, path: Path) -> None:
    """victims.jsonl, rebuilt from the store (so a resumed run never lists a victim twice)."""
    lines = []
    for r in store.results():
        for v in r.victims:
            lines.append(json.dumps({
                "dataset": r.dataset, "model": r.model, "defense": r.defense, "attack": r.attack_label,
                "seed": r.seed, "victim": v.victim, "label": v.label, "ssim": v.ssim, "psnr": v.psnr, "mse": v.mse,
                "lpips": v.lpips, "iterations": v.iterations, "loss": v.loss,
            }))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


def build_result(store, keys: set[tuple[str, str]] | None, out: Path | None, traces=None) -> RunResult:
    """The leaderboard rows, notes and failures of the stored results (`keys` only, when given),
    in planned order; rows aggregate seeds."""
    from gileak import metrics

    results: dict[tuple[str, str, str, str], list[AttackResult]] = {}
    failures: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    lpips_missing = False
    for r in store.results(keys):
        key = (r.dataset, r.model, r.defense, r.attack_label)
        where = " | ".join(key)
        results.setdefault(key, [])
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
        results[key].append(AttackResult(
            [v.ssim for v in r.victims], [v.psnr if v.psnr is not None else math.inf for v in r.victims],
            [v.mse for v in r.victims], None if any(v is None for v in lpips) else lpips,
            [v.iterations for v in r.victims], r.seconds or 0.0, r.accuracy, r.params or 0,
            r.params_added_pct or 0.0, r.epsilon,
        ))
    lpips_reason = None
    if lpips_missing:
        available, reason = metrics.lpips_status()
        lpips_reason = reason if not available else "LPIPS was not computed when these results were made"
    rows = _rows(results, failures, lpips_reason)
    real_failures = [(w, r) for w, r in failures if not r.startswith(NOT_APPLICABLE)]
    notes += [(w, r) for w, r in failures if r.startswith(NOT_APPLICABLE)]
    return RunResult(rows, real_failures, lpips_reason, out=out, notes=notes, traces=list(traces or []))


def _rows(results, failures, lpips_reason) -> list[dict[str, Any]]:
    from gileak import metrics

    failed = {}
    for where, reason in failures:
        failed.setdefault(where, reason)
    rows = []
    for key, parts in results.items():
        row: dict[str, Any] = dict(zip(("dataset", "model", "defense", "attack"), key))
        reason = failed.get(" | ".join(key))
        if not parts:
            row.update({k: None for k in ROW_METRICS})
            status = "not applicable" if reason and reason.startswith(NOT_APPLICABLE) else "failed"
            row.update(status=status, error=reason or "failed")
            rows.append(row)
            continue
        ssim = [v for p in parts for v in p.ssim]
        accuracies = [p.accuracy for p in parts if p.accuracy is not None]
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
            victims=len(ssim),
            seconds=sum(p.seconds for p in parts),
            iterations_mean=sum(v for p in parts for v in p.iterations) / len(ssim),
            status="ok" if reason is None else "partial",
            error=reason,
        )
        if lpips_reason:
            row["lpips_note"] = lpips_reason
        rows.append(row)
    return rows


NOT_APPLICABLE = "not applicable: "
ROW_METRICS = ("ssim_mean", "ssim_std", "asr", "psnr_mean", "mse_mean", "lpips_mean", "accuracy_mean",
               "accuracy_std", "epsilon", "params", "params_added_pct", "victims", "seconds")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=." else "_" for c in text)[:180]
