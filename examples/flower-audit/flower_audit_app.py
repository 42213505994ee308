"""A small Flower app (ClientApp + ServerApp) on gileak's offline `digits` with the paper's CNN,
its server wrapped in gileak's audit: every audited round becomes rows of a gileak leaderboard."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from gileak import data, registry
from gileak.integrations.flower import AuditStrategy, record_samples, reveal_samples_mod
from gileak.nets import aux_loss
from gileak.runner import build_net

#: The run config (Flower's `run_config`; `run.py` and pyproject.toml set it).
DEFAULTS = {
    "defense": "none", "privacy": "none", "num-rounds": 3, "batch-size": 2, "local-steps": 2, "lr": 0.05,
    "audit-rounds": "2", "audit-clients": 2, "attacks": "ig", "iterations": 100, "out": "flower-audit-run",
    "clip": 1.0, "noise": 0.1, "epsilon": 50.0, "seed": 0,
}


def settings(context: Context) -> dict:
    return {**DEFAULTS, **dict(context.run_config)}


@lru_cache(maxsize=1)
def digits():
    """scikit-learn's 8x8 digits, shipped with it (offline), brought to the CNN's 32x32."""
    dataset = registry.get("dataset", "digits")()
    loaded = dataset.load(seed=0)
    shape = registry.get("model", "cnn")().input_shape(tuple(loaded.train_images.shape[1:]))
    return (data.fit_images(loaded.train_images, shape), loaded.train_labels,
            data.fit_images(loaded.test_images, shape), loaded.test_labels, shape)


def make_net(defense: str, seed: int = 0) -> torch.nn.Module:
    """The paper's CNN, with gileak's `cvb` (or none) inserted, as client and server build it."""
    from gileak.runner import resolve
    from gileak.spec import parse_component

    train_images, _, _, _, shape = digits()
    defended = resolve("defense", parse_component(defense)[0]).component
    return build_net(registry.get("model", "cnn")(), defended, shape, 10, seed, "cpu")


def samples(indices: list[int]):
    """The audit's view of the clients' images in this simulation: the same dataset, by index."""
    train_images, train_labels, *_ = digits()
    return train_images[indices], train_labels[indices]


# -- ClientApp ----------------------------------------------------------------------------------


def make_client_app(privacy: str = "none", clip: float = 1.0, epsilon: float = 50.0, reveal: bool = True) -> ClientApp:
    """The client: plain SGD for `local-steps` steps on batches of `batch-size` of its own images.
    `privacy`: none, fixedclipping (Flower's central DP, clipped on the client) or localdp
    (Flower's LocalDpMod). `reveal_samples_mod` (with `reveal`) lets the audit score against the
    real images; without it the audit's rows are unscored."""
    mods = [reveal_samples_mod] if reveal else []
    if privacy == "fixedclipping":
        mods.append(fixedclipping_mod)
    elif privacy == "localdp":
        mods.append(local_dp(clip, epsilon))
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = settings(context)
        sent = msg.content["config"]
        partition, partitions = context.node_config["partition-id"], context.node_config["num-partitions"]
        train_images, train_labels, *_ = digits()
        mine = data.iid_partition(len(train_images), partitions, seed=0)[partition]
        batch, steps, lr = int(config["batch-size"]), int(config["local-steps"]), float(sent["lr"])
        draw = torch.Generator().manual_seed(1_000 * int(sent["server-round"]) + partition)
        chosen = mine[torch.randperm(len(mine), generator=draw)[: batch * steps]]
        record_samples(context, chosen.tolist())
        net = make_net(str(config["defense"]))
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        for step in range(steps):
            rows = chosen[step * batch : (step + 1) * batch]
            loss = F.cross_entropy(net(train_images[rows]), train_labels[rows]) + aux_loss(net)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        metrics = MetricRecord({"num-examples": len(chosen), "batch-size": batch, "local-steps": steps, "lr": lr,
                                "train-loss": float(loss.detach())})
        return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)

    return app


def local_dp(clip: float, epsilon: float) -> LocalDpMod:
    return LocalDpMod(clipping_norm=clip, sensitivity=clip, epsilon=epsilon, delta=1e-5)


client_app = make_client_app()

# -- ServerApp ----------------------------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = settings(context)
    nodes = len(list(grid.get_node_ids()))
    net = make_net(str(config["defense"]), int(config["seed"]))
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    privacy = str(config["privacy"])
    if privacy == "fixedclipping":
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=float(config["noise"]), clipping_norm=float(config["clip"]),
            num_sampled_clients=nodes)
    client_mods = [local_dp(float(config["clip"]), float(config["epsilon"]))] if privacy == "localdp" else []
    *_, test_images, test_labels, shape = digits()
    accuracy = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_net(str(config["defense"]))
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            accuracy[server_round] = float((model(test_images).argmax(1) == test_labels).float().mean())
        return MetricRecord({"accuracy": accuracy[server_round]})

    rounds = [int(r) for r in str(config["audit-rounds"]).split(",") if r.strip()]
    with AuditStrategy(strategy, net=net, input_shape=shape, out=str(config["out"]), attacks=str(config["attacks"]),
                       rounds=rounds, max_clients=int(config["audit-clients"]), iterations=int(config["iterations"]),
                       dataset="digits", model="cnn", defense=str(config["defense"]), client_mods=client_mods,
                       samples=samples, base_net=make_net("none"), seed=int(config["seed"])) as audit:
        audit.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()), num_rounds=int(config["num-rounds"]),
                    train_config=ConfigRecord({"lr": float(config["lr"])}), evaluate_fn=evaluate)
    print(f"test accuracy after each round: {accuracy}")
