"""Dispatch + combine time of one MoE layer against the number of tokens, over the real exchange.

    python -m gptoss_serve.bench.expert_exchange [--workers 2] [--tokens 1 16 128 1024] [--device cpu|cuda]
        [--backend gloo|nccl] [--graph] [--worker-eager] [--layers 24] [--json PATH]

The replica is this process; each worker is a process of its own whose experts echo their input (so the figure
is the exchange alone: packing, sending, receiving, adding the answers). gpt-oss-20b shapes: hidden 2880, 32
experts, top-4, bf16. A step announces itself, then runs `--layers` layers back to back (each layer's dispatch
depends on the one before, as in the model); the figure is the step's wall time over its layers, with the device
synchronized before and after. With --graph the replica's 24 layers replay from a CUDA graph (as a
disaggregated decode step does). Over NCCL the worker replays each repeated step from a CUDA graph of its own, as
MoEWorker does (cluster/expert_parallel/worker_steps.py), unless --worker-eager. NCCL puts each rank on a GPU of its own: the
replica on cuda:0, worker i on cuda:i (so `--workers` at most the GPU count minus one); gloo stages GPU
activations through host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from gptoss_serve.cluster.expert_parallel.exchange import NCCL_ENV, ExpertClient, Shard, make_link
from gptoss_serve.cluster.expert_parallel.worker_steps import serve_replica


class Echo(torch.nn.Module):
    """Stands in for a shard's experts: returns its input, so only the exchange is timed."""

    dtype = torch.bfloat16

    def forward(self, hidden, expert_ids, weights):
        return hidden

    def partial(self, hidden, expert_ids, weights):  # one of several workers' answers: float32
        return hidden.float()

    def never_waits_for_host(self, dtype):  # capturable, like the real experts' kernels
        return True


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(NCCL_ENV)
    device = torch.device(f"cuda:{rank}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    link, _ = make_link(backend=args.backend, host="127.0.0.1", port=port, rank=rank, world_size=world,
                        is_master=False, prefix="bench")
    serve_replica(link, [Echo()] * args.layers, hidden_size=args.hidden, top_k=args.top_k, device=device,
                  graphs=not args.worker_eager)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024])
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--graph", action="store_true",
                        help="replay the replica's side from a CUDA graph, as a disaggregated decode step does (nccl)")
    parser.add_argument("--worker-eager", action="store_true",
                        help="the worker launches every step's kernels from Python (no CUDA graphs of its own)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    os.environ.update(NCCL_ENV)
    device = torch.device(args.device)
    if args.graph and args.backend != "nccl":
        parser.error("--graph needs --backend nccl")
    if args.backend == "nccl" and (device.type != "cuda" or torch.cuda.device_count() <= args.workers):
        parser.error(f"nccl needs the replica and each of {args.workers} workers on a GPU of its own")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = args.workers + 1
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, port, args), daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    link, _store = make_link(backend=args.backend, host="127.0.0.1", port=port, rank=0, world_size=world,
                             is_master=True, prefix="bench")
    per = args.experts // args.workers
    staging = device if args.backend == "nccl" else torch.device("cpu")
    client = ExpertClient(link, [Shard(i * per, per) for i in range(args.workers)], device=device, staging=staging,
                          timeout_s=60)
    client.handshake()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.workers} workers, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, bf16, "
          f"activations on {device} ({name}), {args.backend}, {args.layers} layers a step"
          + (", replica side from a CUDA graph" if args.graph else "")
          + (", worker side from CUDA graphs" if args.backend == "nccl" and not args.worker_eager else ""))
    print(f"{'tokens':>7} {'us a layer p50':>15} {'p90':>8} {'MB a layer':>11}")
    rows = []
    for n in args.tokens:
        hidden = torch.randn(n, args.hidden, device=device, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(args.experts, device=device)[:args.top_k] for _ in range(n)])
        weights = torch.full((n, args.top_k), 1 / args.top_k, device=device)
        def layers() -> torch.Tensor:
            x = hidden
            for layer in range(args.layers):
                x = client.combine(client.dispatch(layer, x, ids, weights)) / args.workers
            return x

        graph = None
        if args.graph:  # the replica's side captured as a decode step is (one warm-up pass first, for real)
            client.begin_step([n])
            layers()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                layers()
        times = []
        for i in range(args.repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            client.begin_step([n])
            if graph is not None:
                graph.replay()
            else:
                layers()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                times.append((time.perf_counter() - start) / args.layers)
        client.drain()
        megabytes = args.workers * n * (2 * args.hidden * 2 + args.top_k * 8) / 1e6
        times.sort()
        row = {"tokens": n, "p50_us": statistics.median(times) * 1e6, "p90_us": times[int(0.9 * len(times))] * 1e6,
               "megabytes": megabytes}
        rows.append(row)
        print(f"{n:>7} {row['p50_us']:>15.1f} {row['p90_us']:>8.1f} {megabytes:>11.2f}")
    client.close()
    for p in procs:
        p.join(timeout=10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "backend": args.backend, "graph": args.graph,
                       "worker_graphs": args.backend == "nccl" and not args.worker_eager, "workers": args.workers,
                       "layers": args.layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
