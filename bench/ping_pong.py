"""Ping-pong micro-batches in a disaggregated engine: what splitting a step in two buys, and how much of the wait
for the experts the other micro-batch's work fills.

    python -m gptoss_serve.bench.ping_pong --model DIR [--load-format dummy] [--batches 16 64] [--prompt-len 128]
        [--output-len 64] [--repeats 3] [--eager] [--device cuda|cpu] [--json PATH]

The replica's engine runs in this process on cuda:1; one MoE worker holding every expert (the app's MoEWorker) is
a Ray actor on cuda:0, linked over NCCL as in the disaggregated app. For each batch, runs alternate between 1 and 2
micro-batches a step (the same engine, link and graphs; only the runner's split changes), --repeats times each:
- prefill tok/s: prompt tokens over the time until every request has its first token. Prefill steps run eagerly
  and are split.
- decode tok/s: tokens after that over the time they took. A decode step replays one CUDA graph of the whole
  batch, so the split leaves it alone. With --eager, an engine without graphs runs too, and its decode steps are
  split.
Then the prefill of the largest batch runs once each way under torch.profiler, and the replica GPU's kernels are
read off the trace: its time in NCCL kernels (a receive kernel runs from when it is launched until the worker's
answer is in, so this is mostly the wait for the experts) and in all other kernels (attention, router, norms), and
how much of the latter ran while an NCCL kernel was in progress. That is the overlap ping-pong exists for: near
nothing with one micro-batch (the step waits for its experts), nearly all the replica's work with two. `--device cpu` runs the same over gloo on the CPU, with no profile (a
smoke run of the script on a small checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss_serve.bench.engine_throughput import run_engine
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.expert_parallel.exchange import NCCL_ENV
from gptoss_serve.cluster.expert_parallel.moe_worker import MoEWorker
from gptoss_serve.cluster.expert_parallel.remote_experts import ExpertLink, RemoteExperts
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

SPLITS = (1, 2)


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, overlapping intervals joined: the union as disjoint intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def covered(spans: list[tuple[float, float]], by: list[tuple[float, float]]) -> float:
    """Length of the disjoint `spans` that the disjoint `by` cover (both sorted)."""
    total, j = 0.0, 0
    for start, end in spans:
        while j < len(by) and by[j][1] <= start:
            j += 1
        k = j
        while k < len(by) and by[k][0] < end:
            total += min(end, by[k][1]) - max(start, by[k][0])
            k += 1
    return total


def nccl_overlap(kernels: list[tuple[str, float, float]]) -> dict:
    """(name, start, end) of a GPU's kernels -> its time in NCCL kernels and in the others (µs), and how much of
    the others' time ran while an NCCL kernel was in progress."""
    nccl = merged([(s, e) for name, s, e in kernels if "nccl" in name.lower()])
    other = merged([(s, e) for name, s, e in kernels if "nccl" not in name.lower()])
    return {"nccl_us": sum(e - s for s, e in nccl), "other_us": sum(e - s for s, e in other),
            "overlap_us": covered(nccl, other)}


def kernels_of(prof) -> list[tuple[str, float, float]]:
    """The GPU kernels of a profile as (name, start µs, end µs), read from its Chrome trace (the profiler's own
    event list also holds annotations that span whole steps on the GPU's timeline)."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel"]


def profile_prefill(engine: LLMEngine, batch: int, prompt_len: int) -> dict:
    """One prefill of `batch` prompts (and a token each) under the profiler -> nccl_overlap of the replica GPU."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_engine(engine, batch, prompt_len, 1)
    return nccl_overlap(kernels_of(prof))


def start_worker(args: argparse.Namespace, dtype: torch.dtype):
    """The MoE worker as the app runs it: a Ray actor holding every expert, on the GPU Ray gives it (cuda:0)."""
    import ray

    gpus = 1 if args.device == "cuda" else 0
    ray.init(num_cpus=4, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    actor = ray.remote(MoEWorker).options(num_gpus=gpus, max_concurrency=64, runtime_env={"env_vars": NCCL_ENV})
    worker = actor.remote(args.model, index=0, num_workers=1, device=args.device, dtype=dtype,
                          load_format=args.load_format, max_num_batched_tokens=args.max_num_batched_tokens)
    ray.get(worker.ping.remote(), timeout=600)
    return worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--eager", action="store_true", help="also an engine without CUDA graphs")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and torch.cuda.device_count() < 2:
        parser.error("needs 2 GPUs: the replica and the MoE worker each on one (NCCL links distinct GPUs)")

    os.environ.update(NCCL_ENV)
    device, dtype = (torch.device("cuda:1"), torch.bfloat16) if gpu else (torch.device("cpu"), torch.float32)
    if gpu:
        torch.cuda.set_device(device)
    worker = start_worker(args, dtype)
    link = ExpertLink([worker], backend="nccl" if gpu else "gloo", device=device, timeout_s=30.0)
    model = load_model(args.model, device=device, dtype=dtype, load_format=args.load_format,
                       experts_factory=lambda layer: RemoteExperts(layer, link))
    name = f"{torch.cuda.get_device_name(device)} x 2" if gpu else "CPU (gloo)"
    print(f"{name}, {platform.node()}; replica {device}, MoE worker {'cuda:0' if gpu else 'cpu'}", flush=True)

    rows, overlaps = [], {}
    for eager in [False, True] if args.eager else [False]:
        # prefix caching off: a repeat's prompts would otherwise be cached from the one before
        config = EngineConfig(max_num_seqs=max(args.batches), max_num_batched_tokens=args.max_num_batched_tokens,
                              max_model_len=args.prompt_len + args.output_len + 16, enforce_eager=eager,
                              enable_prefix_caching=False, gpu_memory_utilization=0.5)
        engine = LLMEngine(model, load_tokenizer(), config, micro_batches=2)
        mode = "eager" if eager else "graphs" if gpu else "cpu"
        run_engine(engine, 4, 16, 4)  # warm-up: the link, the graphs over it, the kernels
        for batch in args.batches:
            runs = {k: [] for k in SPLITS}
            for _ in range(args.repeats + 1):  # the first round warms the worker's step shapes up, and is dropped
                for k in SPLITS:
                    engine.runner.micro_batches = k
                    runs[k].append(run_engine(engine, batch, args.prompt_len, args.output_len))
            for k in SPLITS:
                kept = runs[k][1:]
                row = {"mode": mode, "batch": batch, "micro_batches": k,
                       "prefill_tok_s": statistics.median(r["prefill_tokens_per_s"] for r in kept),
                       "decode_tok_s": statistics.median(r["decode_tokens_per_s"] for r in kept),
                       "prefill_all": [r["prefill_tokens_per_s"] for r in kept],
                       "decode_all": [r["decode_tokens_per_s"] for r in kept]}
                rows.append(row)
                print(f"[{mode}] batch {batch:4d}, {k} micro-batch{'es' if k > 1 else ''}: prefill "
                      f"{row['prefill_tok_s']:9.0f} tok/s ({', '.join(f'{x:.0f}' for x in row['prefill_all'])})   "
                      f"decode {row['decode_tok_s']:8.0f} tok/s ({', '.join(f'{x:.0f}' for x in row['decode_all'])})",
                      flush=True)
        if gpu and not eager:
            batch = max(args.batches)
            for k in SPLITS:
                engine.runner.micro_batches = k
                o = overlaps[k] = profile_prefill(engine, batch, args.prompt_len)
                print(f"[profile] prefill of {batch} x {args.prompt_len}, {k} micro-batch{'es' if k > 1 else ''}: "
                      f"replica GPU: {o['other_us'] / 1e3:.1f} ms of kernels, {o['overlap_us'] / 1e3:.1f} ms "
                      f"({o['overlap_us'] / max(o['other_us'], 1e-9):.0%}) of it while the experts had tokens; "
                      f"{o['nccl_us'] / 1e3:.1f} ms in NCCL kernels", flush=True)
        del engine
        if gpu:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "overlap": overlaps, "args": vars(args), "device": name,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
