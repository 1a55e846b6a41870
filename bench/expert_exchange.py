"""Dispatch + combine time of one MoE layer against the number of tokens, over the real exchange.

    python -m gptoss_serve.bench.expert_exchange [--workers 2] [--tokens 1 16 64 256 1024] [--device cpu|cuda] [--backend gloo]

The replica is this process; each worker is a process of its own whose experts echo their input (so the figure
is the exchange alone: routing, sending, receiving, combining). gpt-oss-20b shapes: hidden 2880, 32 experts,
top-4. On one GPU, gloo stages the GPU activations through host memory (NCCL needs one GPU per rank).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from gptoss_serve.cluster.expert_exchange import ExpertClient, Shard, make_group, serve_replica


class Echo(torch.nn.Module):
    """Stands in for a shard's experts: returns its input, so only the exchange is timed."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))

    def forward(self, hidden, expert_ids, weights):
        return hidden


def worker(rank: int, world: int, port: int, hidden: int, top_k: int) -> None:
    group, _ = make_group(backend="gloo", host="127.0.0.1", port=port, rank=rank, world_size=world,
                          is_master=False, prefix="bench")
    serve_replica(group, [Echo()], hidden_size=hidden, top_k=top_k, device=torch.device("cpu"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = args.workers + 1
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, port, args.hidden, args.top_k), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    group, _store = make_group(backend="gloo", host="127.0.0.1", port=port, rank=0, world_size=world,
                               is_master=True, prefix="bench")
    device = torch.device(args.device)
    per = args.experts // args.workers
    client = ExpertClient(group, [Shard(i * per, per) for i in range(args.workers)], device=device,
                          staging=torch.device("cpu"))
    print(f"{args.workers} workers, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, bf16, "
          f"activations on {device}, gloo")
    print(f"{'tokens':>7} {'p50 ms':>8} {'p90 ms':>8} {'MB a layer':>11}")
    for n in args.tokens:
        hidden = torch.randn(n, args.hidden, device=device, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(args.experts, device=device)[:args.top_k] for _ in range(n)])
        weights = torch.full((n, args.top_k), 1 / args.top_k, device=device)
        times = []
        for i in range(args.repeats + 5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            client.combine(client.dispatch(0, hidden, ids, weights))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - start)
        client.drain()
        rows = sum(int(((ids >= i * per) & (ids < (i + 1) * per)).any(1).sum()) for i in range(args.workers))
        megabytes = rows * (2 * args.hidden * 2 + args.top_k * 12) / 1e6
        times.sort()
        print(f"{n:>7} {statistics.median(times) * 1e3:>8.3f} {times[int(0.9 * len(times))] * 1e3:>8.3f} "
              f"{megabytes:>11.2f}")
    client.close()
    for p in procs:
        p.join(timeout=10)


if __name__ == "__main__":
    main()
