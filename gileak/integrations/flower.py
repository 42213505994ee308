"""Audit a Flower app: attack the updates its server really receives with gileak's attacks, and
write a normal gileak run directory (store, leaderboard, reconstructions, report.html)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("gileak.integrations.flower needs Flower: pip install 'gileak[flower]'") from e

import torch
from torch import nn

from gileak.errors import GileakError, NotApplicableError, NothingToAttackError, UserInputError

log = logging.getLogger("gileak.flower")

#: The record a client's `reveal_samples_mod` adds to its reply (and `record_samples` keeps in the
#: client's state): which of the app's samples the update was trained on, in training order.
SAMPLES_KEY = "gileak-samples"
#: Flower's key for the clipping norm its DP strategies send to `fixedclipping_mod`
#: (flwr.supercore.differential_privacy.KEY_CLIPPING_NORM).
CLIPPING_NORM_KEY = "clipping_norm"
#: The training config the audit reads, from the reply's metrics first, else the config sent.
DECLARED_KEYS = ("lr", "batch-size", "local-steps", "local-epochs", "num-examples", "optimizer")


class UnmappableUpdate(GileakError):
    """A client's reply cannot be mapped onto a gileak client: its declared training config is
    missing or nonsense, its weights do not fit the model, or it trained in a way gileak does not
    simulate. Its results fail with this reason; training goes on."""


# -- what the client declared ---------------------------------------------------------------


def _declared(metrics: Mapping[str, Any], config: Mapping[str, Any], key: str) -> Any:
    return metrics[key] if key in metrics else config.get(key)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise UnmappableUpdate(f"the declared {key} is {value!r}, not a positive whole number")
    return int(value)


def declared_client(metrics: Mapping[str, Any], config: Mapping[str, Any]):
    """The gileak client (a `spec.ComponentRef`) a Flower client's declared training maps onto.

    Read from the reply's metrics first (what the client says it did), else from the config the
    server sent: `lr`, `batch-size`, and `local-steps` or `local-epochs` (then `num-examples`,
    which must be a multiple of the batch: gileak simulates full batches only). `num-examples`
    is the client's images (fedavg's `data`); an `optimizer` other than `sgd` is refused (gileak
    simulates plain SGD: no momentum, no weight decay). One step on all of its images is
    `gradient(batch=B)` (the upload is then −lr × that gradient); anything else is
    `fedavg(batch=B, steps=E, lr=η, data=N)`. Raises UnmappableUpdate with the reason."""
    from gileak.spec import ComponentRef

    optimizer = _declared(metrics, config, "optimizer")
    if optimizer is not None and str(optimizer).strip().lower() != "sgd":
        raise UnmappableUpdate(f"the client declares optimizer {optimizer!r}; gileak simulates plain SGD only "
                               "(no momentum, no weight decay), so its update cannot be matched")
    lr = _declared(metrics, config, "lr")
    if lr is None:
        raise UnmappableUpdate("the client declares no learning rate (`lr` in its reply's metrics or the train "
                               "config)")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UnmappableUpdate(f"the declared lr is {lr!r}, not a positive finite number")
    batch = _declared(metrics, config, "batch-size")
    if batch is None:
        raise UnmappableUpdate("the client declares no batch size (`batch-size`)")
    batch = _positive_int(batch, "batch-size")
    data = _declared(metrics, config, "num-examples")
    data = None if data is None else _positive_int(data, "num-examples")
    steps, epochs = _declared(metrics, config, "local-steps"), _declared(metrics, config, "local-epochs")
    if steps is not None:
        steps = _positive_int(steps, "local-steps")
    elif epochs is not None:
        epochs = _positive_int(epochs, "local-epochs")
        if data is None:
            raise UnmappableUpdate("the client declares local-epochs but not num-examples, so its steps are unknown")
        if data % batch:
            raise UnmappableUpdate(f"{data} examples in batches of {batch} leave a partial last batch; gileak "
                                   "simulates full batches only (declare local-steps with drop_last, or a "
                                   "num-examples that is a multiple of batch-size)")
        steps = epochs * data // batch
    else:
        raise UnmappableUpdate("the client declares neither local-steps nor local-epochs")
    data = batch * steps if data is None else data
    if data < batch or data > batch * steps:
        raise UnmappableUpdate(f"{steps} step(s) of batch {batch} cannot train on {data} examples (each image must "
                               "be used and every batch full)")
    if steps == 1:
        return ComponentRef(name="gradient", params={"batch": batch})
    params = {"batch": batch, "steps": steps, "lr": float(lr)}
    if data != batch * steps:
        params["data"] = data
    return ComponentRef(name="fedavg", params=params)


def upload_of(reply_state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], net: nn.Module,
              client, lr: float) -> dict[str, torch.Tensor]:
    """One client's upload in the units of gileak's `client` component, from the weights it
    replied with and the global weights it trained from: Δθ of every trainable parameter for
    `fedavg`, −Δθ / lr for `gradient` (one SGD step). Raises UnmappableUpdate when the weights
    do not fit `net` (names, shapes, non-float)."""
    expected = {name: tuple(value.shape) for name, value in net.state_dict().items()}
    for what, state in (("the global weights", global_state), ("the client's reply", reply_state)):
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise UnmappableUpdate(f"{what} do not match the audited model: missing {missing[:5]}, unexpected "
                                   f"{extra[:5]} (give the audit the model the app trains)")
        wrong = [f"{name} {tuple(state[name].shape)} (model {shape})" for name, shape in expected.items()
                 if tuple(state[name].shape) != shape]
        if wrong:
            raise UnmappableUpdate(f"{what} do not match the audited model's shapes: {', '.join(wrong[:3])}")
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    update = {}
    for name in trainable:
        after, before = reply_state[name], global_state[name]
        if not (after.is_floating_point() and before.is_floating_point()):
            raise UnmappableUpdate(f"{name} is not a floating-point array in the reply or the global weights")
        update[name] = after.double().sub(before.double()).to(torch.float32)
    if client.name == "gradient":
        return {name: value / -lr for name, value in update.items()}
    return update


# -- client side: opt-in disclosure of the samples ------------------------------------------


def record_samples(context: Context, indices: Iterable[int]) -> None:
    """Call in a ClientApp's train function with the indices of the samples it trains on, in
    training order. They stay in the client's local state; only `reveal_samples_mod` (installed
    by the app's owner for an audit in simulation) sends them to the server."""
    context.state[SAMPLES_KEY] = ConfigRecord({"indices": [int(i) for i in indices]})


def reveal_samples_mod(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod, opt-in: adds the samples `record_samples` noted to the train reply,
    so the audit can score reconstructions against the real images. Without it nothing leaves
    the client and the audit's rows are unscored."""
    if SAMPLES_KEY in context.state:
        del context.state[SAMPLES_KEY]  # a stale record from an earlier round must never be sent
    reply = call_next(msg, context)
    if SAMPLES_KEY in context.state:
        if not reply.has_error():
            reply.content[SAMPLES_KEY] = context.state[SAMPLES_KEY]
        del context.state[SAMPLES_KEY]
    return reply


def describe_mod(mod: Any) -> str:
    """A row label for a Flower client mod the server cannot see (the app's owner declares it):
    `LocalDpMod` -> `flower:localdp(clip=..,eps=..,delta=..,sensitivity=..)`; a string as is."""
    if isinstance(mod, str):
        return mod
    if type(mod).__name__ == "LocalDpMod":
        return (f"flower:localdp(clip={mod.clipping_norm:g},eps={mod.epsilon:g},delta={mod.delta:g},"
                f"sensitivity={mod.sensitivity:g})")
    name = getattr(mod, "__name__", type(mod).__name__)
    if name == "fixedclipping_mod":
        return "flower:fixedclipping"
    return f"flower:{name}"


# -- the server-side wrapper ------------------------------------------------------------------


@dataclass
class _Upload:
    node: int
    client: Any  # the resolved gileak client (runner.Resolved)
    upload: dict[str, torch.Tensor]
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    samples: list[int] = field(default_factory=list)
    unscored: str = ""


@dataclass
class _Sent:
    global_states: dict[int, dict[str, torch.Tensor]]  # node -> the weights it was sent
    configs: dict[int, dict[str, Any]]


class AuditStrategy(Strategy):
    """Wraps any Flower (message API) strategy: every method is the wrapped strategy's, so
    sampling, aggregation and training go on exactly as without the audit. In the `rounds`
    chosen it keeps the weights each sampled client was sent and, when the replies come, maps
    each client's update onto gileak's `gradient` or `fedavg` client (`declared_client`), runs
    the `attacks` on them and writes `out` as a gileak run directory. Nothing the audit does can
    stop the training: every problem becomes a failed row with its reason (and a log line).

    `net`: the model the app trains (same parameter names and shapes; a gileak model built with
    `runner.build_net` keeps its defense's stochastic modules for `ignore`). `input_shape`:
    (C, H, W) of its inputs, pixels in [0, 1]. `samples(indices) -> (images, labels)`: where the
    audit may see the clients' images (a simulation), the images of the samples a client's
    `reveal_samples_mod` disclosed; without it (or without the mod) every row is unscored.
    `dataset`, `model`, `defense`: the row labels; `client_mods`: the client-side mods the app
    uses and the server cannot see (`LocalDpMod(...)` objects or labels), named in the defense
    column. Flower's `fixedclipping_mod` is found by the clipping norm the server sends.
    `base_net`: the model without `defense`, for the params (+%) column (without it, +% is
    measured against `net` itself, which is right only for defenses that add no parameters)."""

    def __init__(self, strategy: Strategy, *, net: nn.Module, input_shape: Sequence[int], out: str | Path,
                 attacks: str = "ig(labels=recover)", rounds: Iterable[int] = (1,), max_clients: int = 4,
                 iterations: int = 300, dataset: str = "flower", model: str = "model", defense: str = "none",
                 client_mods: Sequence[Any] = (), samples: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
                 | None = None, base_net: nn.Module | None = None, device: str = "cpu", seed: int = 0,
                 write_report: bool = True) -> None:
        from gileak import runner
        from gileak.spec import parse_components
        from gileak.store import ResultStore, RunLock, check_run_dir
        from gileak.uploads import _working_copy

        if not isinstance(strategy, Strategy):
            raise UserInputError(f"AuditStrategy wraps a Flower strategy (flwr.serverapp.strategy.Strategy), not "
                                 f"{type(strategy).__name__}")
        if not isinstance(net, nn.Module):
            raise UserInputError(f"net must be a torch.nn.Module, not {type(net).__name__}")
        self.strategy = strategy
        self.rounds = sorted({_positive_int_arg(r, "rounds") for r in rounds})
        self.max_clients = _positive_int_arg(max_clients, "max_clients")
        self.iterations = _positive_int_arg(iterations, "iterations")
        self.input_shape = tuple(_positive_int_arg(s, "input_shape") for s in input_shape)
        if len(self.input_shape) != 3:
            raise UserInputError(f"input_shape is (channels, height, width), not {tuple(input_shape)}")
        self.labels = {"dataset": str(dataset), "model": str(model), "defense": str(defense)}
        self.client_mods = [describe_mod(m) for m in client_mods]
        self.samples = samples
        self.device = runner.pick_device(device)
        self.seed = int(seed)
        self.write_report = write_report
        self.attacks = [runner.resolve("attack", ref) for ref in parse_components(attacks)]
        if not self.attacks:
            raise UserInputError("give the audit at least one attack")
        self.net = _working_copy(net).to(self.device)
        with torch.no_grad():
            was_training = self.net.training
            self.net.eval()
            try:
                out_shape = self.net(torch.zeros(1, *self.input_shape, device=self.device)).shape
            except Exception as e:
                raise UserInputError(f"the audited model does not take inputs of shape {self.input_shape}: {e}") from e
            self.net.train(was_training)
        self.num_classes = int(out_shape[-1])
        from gileak.nets import count_trainable

        self.params = count_trainable(self.net)
        base = self.params if base_net is None else count_trainable(base_net)
        self.params_added_pct = 100.0 * (self.params - base) / base if base else 0.0
        self.base_note = [] if base_net is not None or self.labels["defense"] == "none" else [
            f"params (+%) is against the audited model itself: give the audit base_net= (the model without "
            f"{self.labels['defense']}) to count what the defense adds"]
        self.out = Path(out)
        check_run_dir(self.out)
        self.lock = RunLock(self.out)
        self.store = None
        try:
            self.store = ResultStore(self.out)
            self.store.check_budget(self.budget())
        except BaseException:
            self.close()
            raise
        self.lock.claim()
        self._sent: dict[int, _Sent] = {}
        self._position = self.store.count()
        self.audited_rounds: list[int] = []

    def budget(self) -> dict[str, Any]:
        """What every result of the directory shares (the store refuses a second audit with another)."""
        return {"victims": self.max_clients, "iterations": self.iterations, "rounds": 0, "attack_at": "flower",
                "patience": 0}

    # -- delegation: the wrapped strategy does all the work ----------------------------------
    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet (a failing __init__): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        if server_round not in self.rounds:
            return messages
        messages = list(messages)
        try:
            self._sent[server_round] = _record_sent(messages)
        except Exception as e:  # the audit never stops the training
            log.warning("gileak audit: cannot read round %s's train messages: %s", server_round, e)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        taken = []
        for reply in replies:  # our record is the audit's; the wrapped strategy sees the app's reply as without it
            if not reply.has_error() and SAMPLES_KEY in reply.content:
                taken.append(reply.content[SAMPLES_KEY])
                del reply.content[SAMPLES_KEY]
            else:
                taken.append(None)
        sent = self._sent.pop(server_round, None)
        collected = None
        if server_round in self.rounds:
            try:
                collected = self._collect(server_round, replies, taken, sent)
            except Exception as e:
                log.warning("gileak audit: round %s could not be read: %s", server_round, e)
                collected = ("round", f"the audit could not read round {server_round}'s replies: {e}", {})
        try:
            return self.strategy.aggregate_train(server_round, replies)
        finally:  # even when the wrapped strategy refuses the replies: what was received is audited
            if collected is not None:
                try:
                    self._audit(server_round, collected)
                except Exception as e:
                    log.exception("gileak audit: round %s failed: %s", server_round, e)

    # -- the audit --------------------------------------------------------------------------
    def _collect(self, server_round: int, replies: list[Message], taken: list, sent: _Sent | None):
        """Everything the attack needs, copied before the wrapped strategy aggregates: per node
        an `_Upload`, or the reason it cannot be attacked."""
        from gileak import runner
        from gileak.threat import nothing_to_attack

        if sent is None:
            return ("round", f"round {server_round}'s train messages were not seen by the audit (is the "
                    "AuditStrategy the strategy the ServerApp starts?)", {})
        uploads: list[_Upload | tuple[int, str, Any]] = []
        # by node id: which clients are attacked does not depend on the order the replies came
        # in (Flower's sampling shuffles it), so a rerun of a seeded app audits the same ones
        for reply, samples in sorted(zip(replies, taken), key=lambda pair: int(pair[0].metadata.src_node_id)):
            if reply.has_error():
                continue  # the client uploaded nothing
            if len(uploads) >= self.max_clients:
                break
            node = int(reply.metadata.src_node_id)
            client = None
            try:
                if node not in sent.global_states:
                    raise UnmappableUpdate(f"node {node} replied but was not sent weights in this round")
                content = reply.content
                if len(content.array_records) != 1:
                    raise UnmappableUpdate(f"the reply carries {len(content.array_records)} ArrayRecords, not one")
                metrics: dict[str, Any] = {}
                for record in content.metric_records.values():
                    metrics.update(record)
                ref = declared_client(metrics, sent.configs.get(node, {}))
                try:
                    client = runner.resolve("client", ref)
                except GileakError as e:
                    raise UnmappableUpdate(f"{ref.label}: {e}") from e
                lr = float(_declared(metrics, sent.configs.get(node, {}), "lr"))
                state = _to_torch(next(iter(content.array_records.values())))
                upload = upload_of(state, sent.global_states[node], self.net, client.component, lr)
                problem = nothing_to_attack({k: v.unsqueeze(0) for k, v in upload.items()}, [f"node {node}"])
                if problem is not None:
                    raise NothingToAttackError(problem)
                item = _Upload(node, client, upload)
                item.unscored = self._find_samples(item, samples)
                uploads.append(item)
            except Exception as e:
                uploads.append((node, _reason(e), client))
        return ("uploads", uploads, sent.configs)

    def _find_samples(self, item: _Upload, samples) -> str:
        """Attach the client's real images where the audit may see them; else why not (unscored)."""
        if self.samples is None:
            return ("the server never sees a client's images, so reconstructions cannot be compared with them "
                    "(give the audit samples= in a simulation, with the clients' reveal_samples_mod)")
        if samples is None or "indices" not in samples:
            return (f"node {item.node} did not disclose its samples (its ClientApp has no reveal_samples_mod, "
                    "or did not call record_samples)")
        indices = [int(i) for i in samples["indices"]]
        wanted = item.client.component.images_per_victim()
        if len(indices) != wanted:
            return (f"node {item.node} disclosed {len(indices)} samples, but {item.client.label} trains on "
                    f"{wanted}: they cannot be the images behind this update")
        images, labels = self.samples(indices)
        images, labels = torch.as_tensor(images).float(), torch.as_tensor(labels).long()
        if tuple(images.shape) != (wanted, *self.input_shape) or tuple(labels.shape) != (wanted,):
            return (f"samples() returned images {tuple(images.shape)} and labels {tuple(labels.shape)} for "
                    f"{wanted} samples of {self.input_shape}")
        item.images, item.labels, item.samples = images, labels, indices
        return ""

    def _defense_label(self, configs: Mapping[int, Mapping[str, Any]]) -> tuple[str, list[str]]:
        parts, notes = [self.labels["defense"]], []
        norms = sorted({float(c[CLIPPING_NORM_KEY]) for c in configs.values() if CLIPPING_NORM_KEY in c})
        if norms:
            parts.append("flower:fixedclipping(clip=" + "|".join(f"{n:g}" for n in norms) + ")")
            notes.append("Flower's central DP with client-side clipping: the server sees each client's clipped "
                         "update; its Gaussian noise is added after aggregation, so it is not in what is attacked here")
        parts += self.client_mods
        return " + ".join(parts), notes

    def _audit(self, server_round: int, collected) -> None:
        from gileak.runner import Resolved
        from gileak.spec import ComponentRef

        kind, payload, configs = collected
        self.audited_rounds.append(server_round)
        if kind == "round":
            unmapped = Resolved(ComponentRef(name="unmapped", label="unmapped"), None)
            for attack in self.attacks:
                self._put(server_round, self.labels["defense"], [], attack, unmapped, "failed", payload,
                          key_suffix="round")
            self._finish()
            return
        defense, notes = self._defense_label(configs)
        groups: dict[tuple[str, bool], list[_Upload]] = {}
        for item in payload:
            if isinstance(item, tuple):
                node, reason, client = item
                client = client or Resolved(ComponentRef(name="unmapped", label="unmapped"), None)
                for attack in self.attacks:
                    self._put(server_round, defense, notes, attack, client, "failed", f"node {node}: {reason}",
                              key_suffix=f"node{node}")
                continue
            groups.setdefault((item.client.label, not item.unscored), []).append(item)
        for (_label, scored), items in groups.items():
            for attack in self.attacks:
                self._attack(server_round, defense, notes, attack, items, scored)
        self._finish()

    def _attack(self, server_round: int, defense: str, notes: list[str], attack, items: list[_Upload],
                scored: bool) -> None:
        """One gileak attack on the uploads of one client kind, run as the bench runs it (engine
        choice, per-victim seeds, the attack's own stopping), scored where the images are known."""
        from gileak import metrics
        from gileak.runner import _attack_seed, _reason as reason_of, attack_uploads, score_batches, score_labels
        from gileak.runner import victim_records
        from gileak.threat import Target

        client = items[0].client
        per_victim = client.component.images_per_victim()
        names = [f"node {item.node}" for item in items]
        seeds = [self.seed * 1_000_003 + server_round * 10_007 + item.node % 10_007 for item in items]
        try:
            stacked = {name: torch.stack([item.upload[name] for item in items]).to(self.device)
                       for name in items[0].upload}
            labels = torch.cat([item.labels for item in items]).to(self.device) if scored else None
            self.net.train()  # the client's steps are training steps
            target = Target(net=self.net, shared_gradient=stacked, input_shape=self.input_shape,
                            num_classes=self.num_classes, labels=labels, client=client.component)
            attacked = attack_uploads(attack, client, target, seeds, names, self.iterations,
                                      _attack_seed(self.seed + server_round, attack.label),
                                      (len(items) * per_victim, *self.input_shape))
            reconstruction, images = attacked.reconstruction, attacked.images
            if not scored:
                path = self._save_unscored(server_round, defense, attack, client, images)
                why = items[0].unscored
                self._put(server_round, defense, notes, attack, client, "not applicable",
                          f"unscored: {why}. The {len(items)} upload(s) were attacked ({reconstruction.iterations[0]} "
                          f"iterations); the reconstructions are in {path.relative_to(self.out)}",
                          seconds=attacked.seconds, key_suffix="unscored", engine=attacked.chosen.as_dict())
                return
            originals = torch.cat([item.images for item in items])
            lpips_available, _ = metrics.lpips_status()
            scores = score_batches(images.clamp(0, 1), originals, per_victim, self.device, lpips_available)
            label_scores = score_labels(reconstruction, labels.cpu(), per_victim, self.num_classes)
        except Exception as e:
            status = "not applicable" if isinstance(e, NotApplicableError) else "failed"
            self._put(server_round, defense, notes, attack, client, status, reason_of(e),
                      key_suffix="" if scored else "unscored")
            return
        records = victim_records([s for item in items for s in item.samples], labels.cpu(), scores, label_scores,
                                 reconstruction, per_victim)
        self._put(server_round, defense, notes, attack, client, "ok", None, seconds=attacked.seconds,
                  victims=records, note=reconstruction.note or None, originals=originals,
                  reconstructions=scores.matched, engine=attacked.chosen.as_dict())

    # -- the run directory -----------------------------------------------------------------
    def _ids(self, server_round: int, defense: str, attack, client, key_suffix: str) -> tuple[str, str]:
        from gileak.runner import component_id
        from gileak.store import canonical

        parts = [canonical("flower-" + kind, {"label": label}) for kind, label in
                 (("dataset", self.labels["dataset"]), ("model", self.labels["model"]), ("defense", defense))]
        cell = " | ".join(parts) + f" | seed={server_round}"
        client_key = component_id(client) if client.component is not None else "unmapped"
        key = f"{component_id(attack)} @ {client_key}" + (f" @ {key_suffix}" if key_suffix else "")
        return cell, key

    def _slug(self, server_round, defense, client_label, attack_label, cell, key) -> str:
        from gileak.runner import _slug

        return _slug(self.labels["dataset"], self.labels["model"], defense, client_label, attack_label,
                     f"seed{server_round}", identity=f"{cell} || {key}")

    def _save_unscored(self, server_round, defense, attack, client, images) -> Path:
        from torchvision.utils import save_image

        cell, key = self._ids(server_round, defense, attack, client, "unscored")
        path = self.out / "reconstructions" / (self._slug(server_round, defense, client.label, attack.label, cell,
                                                          key) + "-unscored.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.clamp(0, 1), path, nrow=min(16, len(images)))
        return path

    def _put(self, server_round: int, defense: str, notes: list[str], attack, client, status: str,
             error: str | None, *, seconds: float = 0.0, victims=None, note: str | None = None, originals=None,
             reconstructions=None, key_suffix: str = "", engine: dict | None = None) -> None:
        from gileak.report.figures import save_reconstruction_grid
        from gileak.report.images import save_victim_images
        from gileak.store import StoredResult, environment

        cell, key = self._ids(server_round, defense, attack, client, key_suffix)
        env = environment(self.device)
        if engine:
            env["engine"] = engine
        self.store.put(StoredResult(
            cell=cell, attack=key, dataset=self.labels["dataset"], model=self.labels["model"], defense=defense,
            seed=server_round, attack_label=attack.label, position=self._position, status=status, error=error,
            note=note, seconds=seconds, victims=victims or [], client=client.label,
            params=self.params, params_added_pct=self.params_added_pct, attacked_round=server_round,
            cell_notes=["the seed column is the Flower server round that was audited", *notes, *self.base_note],
            env=env))
        self._position += 1
        if status == "ok":
            slug = self._slug(server_round, defense, client.label, attack.label, cell, key)
            per_victim = client.component.images_per_victim()
            save_reconstruction_grid(originals, reconstructions, self.out / "reconstructions" / f"{slug}.png",
                                     columns=max(per_victim, 16 // per_victim * per_victim))
            save_victim_images(originals, reconstructions, self.out / "reconstructions" / f"{slug}.npz", cell=cell,
                               attack=key, victims=[v.victim for v in victims])

    def _finish(self) -> None:
        """Rewrite the directory's leaderboard files (and report) from the store: the directory is
        complete after every audited round, whenever the app stops."""
        from gileak.report import export as export_rows
        from gileak.runner import build_result, write_victims_log
        from gileak.store import atomic_write_text

        write_victims_log(self.store, self.out / "victims.jsonl")
        result = build_result(self.store, None, self.out)
        export_rows(result.rows, self.out / "leaderboard.json")
        atomic_write_text(self.out / "audit.json", json.dumps({
            "strategy": type(self.strategy).__name__, "attacks": [a.label for a in self.attacks],
            "rounds": self.rounds, "audited_rounds": self.audited_rounds, "max_clients": self.max_clients,
            "iterations": self.iterations, **self.labels, "client_mods": self.client_mods,
            "scored": self.samples is not None, "input_shape": list(self.input_shape)}, indent=2))
        if self.write_report:
            from gileak.report.html import write_report

            write_report(self.out)

    def close(self) -> None:
        """Close the store and release the run directory (an audit object is done then)."""
        if getattr(self, "store", None) is not None:
            self.store.close()
            self.store = None
        self.lock.release()

    def __enter__(self) -> AuditStrategy:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _positive_int_arg(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserInputError(f"{name} must be positive whole numbers, got {value!r}")
    return value


def _reason(error: BaseException) -> str:
    if isinstance(error, GileakError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _to_torch(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(array.numpy()).detach().clone() for name, array in record.items()}


def _record_sent(messages: list[Message]) -> _Sent:
    """Per destination node: the global weights and the config it was sent (copied)."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    configs: dict[int, dict[str, Any]] = {}
    converted: dict[int, dict[str, torch.Tensor]] = {}
    for message in messages:
        node = int(message.metadata.dst_node_id)
        content = message.content
        if len(content.array_records) == 1:
            record = next(iter(content.array_records.values()))
            if id(record) not in converted:  # every node gets the same record: convert it once
                converted[id(record)] = _to_torch(record)
            states[node] = converted[id(record)]
        config: dict[str, Any] = {}
        for record in content.config_records.values():
            config.update(record)
        configs[node] = config
    return _Sent(states, configs)


# -- running a ServerApp and ClientApp in this process ------------------------------------------


class InProcessGrid(Grid):
    """A Flower Grid that hands every message straight to a ClientApp in this process, one
    node after another: Flower's simulation without its engine (no Ray, no SuperLink), for tests
    and small laptop runs. Node i's context has node_config {"partition-id": i,
    "num-partitions": n}, as Flower's simulation gives it."""

    def __init__(self, client_app, num_nodes: int, run_config: Mapping[str, Any] | None = None) -> None:
        from flwr.supercore.run import Run

        self.client_app = client_app
        self.contexts = {node + 1: Context(run_id=1, node_id=node + 1, node_config={"partition-id": node,
                                                                                  "num-partitions": num_nodes},
                                           state=RecordDict(), run_config=dict(run_config or {}))
                         for node in range(num_nodes)}
        self._run = Run.create_empty(1)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("InProcessGrid answers in send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("InProcessGrid answers in send_and_receive")

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        from flwr.app import Error

        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            try:
                replies.append(self.client_app(message, context))
            except Exception as e:  # as a SuperNode reports a ClientApp that raised
                replies.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=message))
        return replies


def run_in_process(server_app, client_app, num_nodes: int, run_config: Mapping[str, Any] | None = None) -> None:
    """Run a Flower ServerApp against `num_nodes` nodes of a ClientApp in this process
    (`InProcessGrid`)."""
    from flwr.supercore.task_identity import TaskIdentity

    grid = InProcessGrid(client_app, num_nodes, run_config)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=dict(run_config or {})))
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
