"""Federated training throughput: one FedAvg round as gileak runs it (a loop over clients,
each with its own Adam) against all clients vectorized with torch.func (client parameters
stacked, vmap over clients, Adam applied to the stacked tensors).

Both do the same work: every client takes the same number of equal-size mini-batches from its
own data. Prints training samples per second and seconds per round for each, and their ratio.

Usage: python benchmarks/fl_throughput.py [--clients 10] [--samples-per-client 128]
       [--batch-size 64] [--rounds 3] [--channels 3] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gileak.default_plugins.models import CNN


def loop_round(net, data, labels, batch_size, lr=1e-3):
    """gileak's way: each client loads the global state and trains with its own Adam."""
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    states = []
    for x, y in zip(data, labels):
        net.load_state_dict(global_state)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        for start in range(0, len(y), batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[start:start + batch_size]), y[start:start + batch_size]).backward()
            optimizer.step()
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    net.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in global_state})


def vectorized_round(net, data, labels, batch_size, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """All clients at once: stacked parameters, vmap(grad), Adam on the stacked tensors."""
    clients = len(data)
    params = {k: v.detach().unsqueeze(0).repeat(clients, *([1] * v.dim())) for k, v in net.named_parameters()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    per_client_grad = vmap(grad(loss))
    step = 0
    for start in range(0, labels.shape[1], batch_size):
        step += 1
        grads = per_client_grad(params, data[:, start:start + batch_size], labels[:, start:start + batch_size])
        for k in params:
            m[k].mul_(betas[0]).add_(grads[k], alpha=1 - betas[0])
            v2[k].mul_(betas[1]).addcmul_(grads[k], grads[k], value=1 - betas[1])
            m_hat = m[k] / (1 - betas[0] ** step)
            v_hat = v2[k] / (1 - betas[1] ** step)
            params[k] = params[k] - lr * m_hat / (v_hat.sqrt() + eps)
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(params[k].mean(0))


def measure(fn, net, data, labels, batch_size, rounds, device) -> float:
    fn(net, data, labels, batch_size)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(rounds):
        fn(net, data, labels, batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples-per-client", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(0)
    net = CNN().build((args.channels, 32, 32), 10).to(device)
    shape = (args.clients, args.samples_per_client, args.channels, 32, 32)
    data = torch.rand(shape, device=device)
    labels = torch.randint(0, 10, shape[:2], device=device)
    samples = args.clients * args.samples_per_client
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.clients} clients x "
          f"{args.samples_per_client} samples, batch {args.batch_size}, CNN on {args.channels}x32x32")
    loop = measure(loop_round, net, data, labels, args.batch_size, args.rounds, device)
    vec = measure(vectorized_round, net, data, labels, args.batch_size, args.rounds, device)
    print(f"{'mode':<12}{'s/round':>10}{'samples/s':>12}")
    print(f"{'loop':<12}{loop:>10.3f}{samples / loop:>12.0f}")
    print(f"{'vectorized':<12}{vec:>10.3f}{samples / vec:>12.0f}")
    print(f"vectorized / loop speed: {loop / vec:.2f}x")


if __name__ == "__main__":
    main()
