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

    def work_units(self) -> int:
        """Progress units: one per training round and one per attack iteration."""
        return sum(self.spec.rounds + len(c.attacks) * self.spec.iterations for c in self.cells)


def resolve(kind: str, ref: ComponentRef, data_root: Path | str | None = None) -> Resolved:
    """Instantiate a component. A dataset that takes a `root` parameter gets `data_root` (the
    spec's or --data-root) unless its own parameters name one; the label stays as written."""
    cls = registry.get(kind, ref.name)
    params = dict(ref.params)
    takes_root = kind == "dataset" and "root" in cls.Params.model_fields
    if takes_root and data_root is not None and params.get("root") is None:
        params["root"] = str(data_root)
    return Resolved(ref, cls(**params))


def plan(spec: BenchSpec) -> Plan:
    """Resolve every name and validate every component's parameters before anything runs."""
    datasets = [resolve("dataset", r, data_root=spec.data_root) for r in spec.datasets]
    models = [resolve("model", r) for r in spec.models]
    defenses = [resolve("defense", r) for r in spec.defenses]
    attacks = [resolve("attack", r) for r in spec.attacks]
    for dataset in datasets:  # a missing folder or file is the user's to fix: say so before anything runs
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


class Runner:
    """Runs a plan cell by cell. A failing cell is recorded with its reason; the rest go on."""

    def __init__(self, plan: Plan, out: Path, advance: Callable[[int], None] | None = None,
                 describe: Callable[[str], None] | None = None, debug: bool = False) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.out = out
        self.advance = advance or (lambda n: None)
        self.describe = describe or (lambda s: None)
        self.debug = debug
        self._data_cache: dict[tuple[str, int], Any] = {}
        self.notes: list[tuple[str, str]] = []
        self.attacked_round: dict[str, int] = {}
        self.traces: list[Path] = []

    def _splits(self, dataset: Resolved, seed: int):
        key = (dataset.label, seed)
        if key not in self._data_cache:
            self._data_cache[key] = dataset.component.load(seed=seed)
        return self._data_cache[key]

    def run(self) -> RunResult:
        import torch

        from gileak import metrics

        device = pick_device(self.spec.device)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "spec.json").write_text(self.spec.model_dump_json(indent=2))
        lpips_available, lpips_reason = metrics.lpips_status()
        results: dict[tuple[str, str, str, str], list[AttackResult]] = {}
        failures: list[tuple[str, str]] = []
        per_victim_log = (self.out / "victims.jsonl").open("a")
        try:
            for cell in self.plan.cells:
                cell_units = self.spec.rounds + len(cell.attacks) * self.spec.iterations
                try:
                    self._run_cell(cell, device, results, failures, lpips_available, per_victim_log)
                except Exception as e:  # one broken cell must not lose the others
                    reason = self._reason(e)
                    for attack in cell.attacks:
                        key = (cell.dataset.label, cell.model.label, cell.defense.label, attack.label)
                        results.setdefault(key, [])
                        failures.append((" | ".join(key), reason))
                    self.advance(cell_units)
        finally:
            per_victim_log.close()
        rows = self._rows(results, failures, lpips_reason if not lpips_available else None)
        torch.cuda.empty_cache() if device == "cuda" else None
        real_failures = [(w, r) for w, r in failures if not r.startswith(NOT_APPLICABLE)]
        notes = self.notes + [(w, r) for w, r in failures if r.startswith(NOT_APPLICABLE)]
        return RunResult(rows, real_failures, None if lpips_available else lpips_reason, out=self.out, notes=notes,
                         traces=self.traces)

    def _reason(self, error: Exception) -> str:
        if isinstance(error, NotApplicableError):
            return f"{NOT_APPLICABLE}{error}"
        if isinstance(error, GileakError):
            return str(error)
        text = f"{type(error).__name__}: {error}"
        if self.debug:
            text += "\n" + traceback.format_exc()
        return text

    def _run_cell(self, cell: TrainingCell, device, results, failures, lpips_available, log) -> None:
        import torch

        from gileak import data, fl, metrics
        from gileak.nets import count_trainable
        from gileak.report.figures import save_reconstruction_grid
        from gileak.threat import Target, shared_gradients

        spec = self.spec
        self.describe(f"{cell.key}: loading data")
        splits = self._splits(cell.dataset, cell.seed)
        info_shape = tuple(splits.train_images.shape[1:])
        labels_seen = torch.cat([splits.train_labels, splits.test_labels])
        num_classes = max(cell.dataset.component.info().num_classes, int(labels_seen.max()) + 1)
        if spec.rounds > 0 and len(splits.test_images) == 0:
            raise UserInputError(f"{cell.dataset.label} has no test images, so training accuracy cannot be "
                                 "measured; give it a test split or use --rounds 0.")
        input_shape = cell.model.component.input_shape(info_shape)
        train_images = data.fit_images(splits.train_images, input_shape)
        test_images = data.fit_images(splits.test_images, input_shape)

        net = build_net(cell.model.component, cell.defense.component, input_shape, num_classes, cell.seed, device)
        base_params = count_trainable(cell.model.component.build(input_shape, num_classes))
        params = count_trainable(net)
        accuracy = None
        epsilon = None
        fl_config = fl.FLConfig(rounds=max(spec.rounds, 1), seed=cell.seed)
        if spec.rounds > 0:
            clients = data.iid_partition(len(train_images), fl_config.clients, cell.seed)
            self.describe(f"{cell.key}: federated training")
            keep = (0,) if spec.attack_at == "init" else (int(spec.attack_at),) if spec.attack_at.isdigit() else ()
            trained = fl.federated_train(
                net, cell.defense.component, train_images, splits.train_labels, test_images, splits.test_labels,
                fl_config, device=device, progress=lambda _round: self.advance(1), client_indices=clients,
                keep_rounds=keep,
            )
            self.advance(spec.rounds - trained.rounds_run)
            accuracy = trained.accuracy
            epsilon = trained.epsilon
            if keep:
                if keep[0] in trained.snapshots:
                    net.load_state_dict(trained.snapshots[keep[0]])
                else:  # early stopping ended training before that round
                    self.notes.append((cell.key, f"training stopped after round {trained.rounds_run}, before "
                                                 f"--attack-at {spec.attack_at}; the final model was attacked"))
            self.attacked_round[cell.key] = keep[0] if keep and keep[0] in trained.snapshots else trained.rounds_run

        victim_idx = data.pick_victims(self._victim_pool(len(train_images), fl_config, spec), spec.victims, cell.seed)
        victims = train_images[victim_idx].to(device)
        labels = splits.train_labels[victim_idx].to(device)
        net.train()  # the victim's step is a training step (the authors attack in train mode)
        gradients = shared_gradients(net, cell.defense.component, victims, labels, seed=cell.seed)

        for attack in cell.attacks:
            key = (cell.dataset.label, cell.model.label, cell.defense.label, attack.label)
            self.describe(f"{' | '.join(key)} | seed {cell.seed}")
            started = time.perf_counter()
            done = 0

            def progress(n: int) -> None:
                nonlocal done
                done += n
                self.advance(n)

            try:
                target = Target(net=net, shared_gradient=gradients, input_shape=input_shape,
                                num_classes=num_classes, labels=labels, trace=spec.trace)
                seeds = [_victim_seed(cell.seed, i) for i in range(len(victim_idx))]
                reconstruction = attack.component.attack(target, seeds=seeds, max_iterations=spec.iterations,
                                                         progress=progress)
            except Exception as e:
                self.advance(spec.iterations - done)
                results.setdefault(key, [])
                failures.append((" | ".join(key), self._reason(e)))
                continue
            self.advance(spec.iterations - done)
            seconds = time.perf_counter() - started
            originals = victims.detach().cpu()
            recon = reconstruction.images.clamp(0, 1)
            ssim = metrics.ssim(recon, originals)
            psnr = metrics.psnr(recon, originals)
            mse = metrics.mse(recon, originals)
            lpips = metrics.lpips_distances(recon, originals, device) if lpips_available else None
            results.setdefault(key, []).append(AttackResult(
                ssim, psnr, mse, lpips, reconstruction.iterations, seconds, accuracy, params,
                100.0 * (params - base_params) / base_params if base_params else 0.0, epsilon,
            ))
            slug = _slug("__".join(key)) + f"__seed{cell.seed}"
            save_reconstruction_grid(originals, recon, self.out / "reconstructions" / f"{slug}.png")
            if reconstruction.note:
                self.notes.append((" | ".join(key), reconstruction.note))
            if spec.trace:
                if reconstruction.trace is None:
                    self.notes.append((" | ".join(key), f"{attack.component.name} does not record gradient traces"))
                else:
                    from gileak.report.figures import save_trace

                    self.traces += save_trace(reconstruction.trace, self.out / "traces" / slug, " | ".join(key))
            for i in range(len(ssim)):
                log.write(json.dumps({
                    "dataset": key[0], "model": key[1], "defense": key[2], "attack": key[3], "seed": cell.seed,
                    "victim": int(victim_idx[i]), "label": int(labels[i]), "ssim": ssim[i], "psnr": _finite(psnr[i]),
                    "mse": mse[i], "lpips": lpips[i] if lpips else None,
                    "iterations": reconstruction.iterations[i], "loss": reconstruction.final_loss[i],
                }) + "\n")
            log.flush()
        del gradients
        torch.cuda.empty_cache() if device == "cuda" else None

    @staticmethod
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

    def _rows(self, results, failures, lpips_reason) -> list[dict[str, Any]]:
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
