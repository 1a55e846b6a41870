"""Capacity planner: predicted throughput and latency of every layout on a GPU budget, and the one to deploy.

    python -m gptoss_serve.bench.plan --profile bench/results/2026-12-07-plan-profile-20b-h100-example.json \\
        --gpus 2 --prompt-len 128 --output-len 128 --concurrency 64 [--tpot-ms 15] [--ttft-ms 2000] [--burst]
    python -m gptoss_serve.bench.plan --measure --model DIR [--load-format dummy] --save-profile FILE --gpus 4 ...

--profile reads a saved profile (JSON, cluster/capacity_profile.py's Profile); --measure measures one on this
machine's GPU with the benchmark helpers (bench.engine_throughput's engine runs, MoE layers timed in CUDA graphs as
bench.moe_kernel does, and bench.expert_exchange over NCCL when there are 2+ GPUs); --save-profile writes it, so a
later run plans for other GPU counts without a GPU. The workload: --prompt-len / --output-len (one length, or LOW
HIGH for a uniform range), --concurrency (requests in flight) or --request-rate (requests a second), latency limits
--tpot-ms / --ttft-ms; --burst predicts bursts of --concurrency requests (bench.disaggregated's). Prints one row a
layout (data parallel, and every M attention GPUs : N expert GPUs split with and without ping-pong), the
recommended one with its breakdown, its app args (deployments/args.py) and its RayService worker groups.
The model and its assumptions: docs/capacity-planning.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from gptoss_serve.cluster.capacity_planner import Layout, Planner, Prediction
from gptoss_serve.cluster.capacity_profile import Curve, Profile, ProfileError
from gptoss_serve.cluster.capacity_workload import EngineLimits, Lengths, Workload


class PlanError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Profiles


def read_profile(path: str) -> Profile:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise PlanError(f"profile {path}: no such file") from None
    except OSError as e:
        raise PlanError(f"profile {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"profile {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    try:
        return Profile.from_dict(data)
    except ProfileError as e:
        raise PlanError(f"profile {path}: {e}") from None


PREFILL_CHUNKS = 8


def measure_profile(args: argparse.Namespace) -> Profile:
    """Measures a profile on this machine's GPU. The attention side of a step is not timed alone: it is the
    colocated engine's decode step less the model's MoE layers timed at the same tokens (both on this GPU)."""
    try:
        import torch
    except ImportError:
        raise PlanError("--measure needs torch, which is not installed") from None
    if not torch.cuda.is_available():
        raise PlanError("--measure needs a CUDA GPU, and torch finds none on this machine "
                        "(torch.cuda.is_available() is False); plan from a saved profile with --profile FILE")
    if not args.model:
        raise PlanError("--measure needs --model DIR (a checkpoint, or a config.json with --load-format dummy)")
    from gptoss_serve.bench import engine_throughput as et
    from gptoss_serve.bench.moe_kernel import events_median, graphed
    from gptoss_serve.model.loader import load_model

    device = torch.device("cuda")
    model = load_model(args.model, device=device, load_format=args.load_format)
    config = model.config
    weights = torch.cuda.memory_allocated(device)
    experts_bytes = sum(t.numel() * t.element_size() for layer in model.model.layers
                        for t in [*layer.mlp.experts.parameters(), *layer.mlp.experts.buffers()])
    layers, num_experts = config.num_hidden_layers, config.num_local_experts

    # one MoE layer (layer 0's experts) by tokens, from CUDA-graph replays, random top-k routing
    experts = model.model.layers[0].mlp.experts
    gen = torch.Generator(device="cuda").manual_seed(0)
    moe: list[list[float]] = []
    for tokens in sorted(set(args.measure_batches) | {args.max_num_batched_tokens}):
        hidden = torch.randn(tokens, config.hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
        ids = torch.rand(tokens, num_experts, device=device, generator=gen).topk(config.num_experts_per_tok).indices
        w = torch.softmax(torch.randn(tokens, config.num_experts_per_tok, device=device, generator=gen), -1)
        replay, _ = graphed(lambda: experts(hidden, ids, w.to(hidden.dtype)))
        moe.append([tokens, events_median([replay], 50)])
        print(f"MoE layer, {tokens} tokens: {moe[-1][1] * 1e6:.1f} us", flush=True)
    curve = Curve.from_pairs(moe, "measured MoE layer")

    # the colocated engine's decode steps by batch and context, and a prefill chunk's step
    ns = argparse.Namespace(max_model_len=None, prompt_lens=args.measure_contexts, batches=args.measure_batches,
                            output_len=32)
    chunk = args.max_num_batched_tokens
    # a prompt chunk's step: timed over PREFILL_CHUNKS full chunks of prompts at the context (one batch of short
    # prompts would time mostly the step's fixed costs and the first token's wait)
    prefill_batches = {prompt: -(-PREFILL_CHUNKS * chunk // prompt) for prompt in args.measure_contexts}
    engine = et.build_engine(model, ns, "plan", max_num_seqs=max(*args.measure_batches, *prefill_batches.values()),
                             max_num_batched_tokens=args.max_num_batched_tokens,
                             gpu_memory_utilization=args.gpu_memory_utilization)
    kv_tokens = engine.num_blocks * engine.config.block_size
    kv_per_token = engine.kv_cache_bytes / kv_tokens
    total = torch.cuda.get_device_properties(device).total_memory
    reserved = max(0.0, total * args.gpu_memory_utilization - weights - engine.kv_cache_bytes)
    et.run_engine(engine, 2, 16, 4)  # warm-up
    contexts = [p + 16 for p in args.measure_contexts]  # a 32-token output's mean context
    seconds: list[list[float]] = []
    batches = list(args.measure_batches) + [chunk]
    for prompt in args.measure_contexts:
        row = []
        for batch in [*args.measure_batches, prefill_batches[prompt]]:
            if reason := et.why_skipped(engine, batch, prompt, 32):
                raise PlanError(f"cannot measure batch {batch} at a {prompt}-token prompt: {reason}; "
                                "pass fewer --measure-batches / --measure-contexts")
        for batch in args.measure_batches:
            r = et.run_engine(engine, batch, prompt, 32)
            step = batch / r["decode_tokens_per_s"]
            row.append(max(step - layers * curve.at(batch), 0.1 * step))
            print(f"context {prompt}, batch {batch}: decode step {step * 1e3:.2f} ms", flush=True)
        r = et.run_engine(engine, prefill_batches[prompt], prompt, 2)
        prefill_s = chunk / r["prefill_tokens_per_s"]
        row.append(max(prefill_s - layers * curve.at(chunk), 0.1 * prefill_s))
        print(f"context {prompt}: a {chunk}-token prompt chunk {prefill_s * 1e3:.2f} ms "
              f"({prefill_batches[prompt]} prompts)", flush=True)
        seconds.append(row)
    exchange = measure_exchange(config, layers, num_experts, torch.cuda.device_count())
    window = getattr(config, "sliding_window", 0) or 0
    data = {
        "name": f"{Path(args.model).name} on {torch.cuda.get_device_name(device)}",
        "card": torch.cuda.get_device_name(device),
        "source": "python -m gptoss_serve.bench.plan " + " ".join(sys.argv[1:]),
        "notes": {"attention_step": "colocated decode step minus the model's MoE layers at the same tokens; the "
                                    "last batch column is a prefill chunk (max_num_batched_tokens)",
                  "expert_layer": "measured for 1 worker (the whole layer); others use the planner's fallback"},
        "model": {"name": Path(args.model).name, "layers": layers, "experts": num_experts,
                  "top_k": config.num_experts_per_tok, "block_size": engine.config.block_size,
                  "sliding_window": window},
        "memory": {"card_bytes": total, "reserved_bytes": reserved, "attention_weights_bytes": weights - experts_bytes,
                   "expert_weights_bytes": experts_bytes, "kv_bytes_per_token": kv_per_token},
        "attention_step": {"batches": batches, "contexts": contexts, "seconds": seconds},
        "expert_layer": {"1": moe},
        "exchange_layer": exchange,
    }
    return Profile.from_dict(data)


def measure_exchange(config, layers: int, experts: int, gpus: int) -> dict:
    """bench.expert_exchange over NCCL for 1 .. gpus-1 workers (dividing the experts); nothing on one GPU."""
    if gpus < 2:
        print("one GPU: no exchange measured (splits need a profile measured on 2+ GPUs, or one merged in)",
              flush=True)
        return {}
    from gptoss_serve.bench import expert_exchange

    out = {}
    for workers in [n for n in range(1, gpus) if experts % n == 0]:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            expert_exchange.main(["--backend", "nccl", "--device", "cuda", "--graph", "--workers", str(workers),
                                  "--experts", str(experts), "--layers", str(layers),
                                  "--hidden", str(config.hidden_size), "--tokens", "1", "16", "128", "1024",
                                  "--json", f.name])
            rows = json.loads(Path(f.name).read_text())["rows"]
        out[str(workers)] = [[r["tokens"], r["p50_us"] * 1e-6] for r in rows]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Output


def app_args(layout: Layout, args: argparse.Namespace) -> dict:
    """The AppArgs (deployments/args.py) of a layout."""
    out: dict = {"model": args.model or "/models/<model>", "device": "cuda",
                 "num_attention_replicas": layout.replicas, "num_gpus_per_replica": 1}
    if layout.kind == "split":
        out |= {"num_moe_workers": layout.workers, "num_gpus_per_moe_worker": 1, "expert_transport": "nccl",
                "micro_batches": layout.micro_batches}
    out["engine"] = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "gpu_memory_utilization": args.gpu_memory_utilization}
    return out


def worker_groups(layout: Layout) -> list[dict]:
    """RayService workerGroupSpecs of a layout (one GPU a pod), named as in k8s/rayservice.*.yaml."""
    if layout.kind == "data_parallel":
        return [{"groupName": "gpu", "replicas": layout.replicas, "nvidia.com/gpu": 1}]
    return [{"groupName": "attention", "replicas": layout.replicas, "nvidia.com/gpu": 1,
             "labels": {"gptoss.io/role": "attention"}},
            {"groupName": "moe", "replicas": layout.workers, "nvidia.com/gpu": 1,
             "labels": {"gptoss.io/role": "moe"}}]


def flat_args(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flat_args(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={str(v).lower() if isinstance(v, bool) else v}")
    return out


def print_table(preds: list[Prediction], best: Prediction | None) -> None:
    print(f"{'layout':<26} {'GPUs':>4} {'batch/rep':>9} {'max conc':>8} {'KV tok/rep':>10} {'step ms':>8} "
          f"{'TPOT ms':>8} {'TTFT ms':>8} {'tok/s':>9} {'tok/s/GPU':>9}  limits")
    for p in preds:
        mark = "*" if p is best else " "
        if not p.fits:
            print(f"{mark}{p.layout.label:<25} {p.layout.gpus:>4}  does not fit: {p.reason}")
            continue
        status = "ok" if p.meets_limits else ("overloaded" if not p.sustains else "missed")
        if p.kv_limited:
            status += ", KV-bound"
        print(f"{mark}{p.layout.label:<25} {p.layout.gpus:>4} {p.batch:>9.1f} {p.max_concurrency:>8} "
              f"{p.kv_tokens_per_replica:>10.0f} {p.decode_step_s * 1e3:>8.2f} {p.tpot_s * 1e3:>8.2f} "
              f"{p.ttft_s * 1e3:>8.1f} {p.tokens_per_s:>9.1f} {p.tokens_per_s_per_gpu:>9.1f}  {status}")


def print_breakdown(p: Prediction) -> None:
    b = p.breakdown
    d = b["decode_step"]
    terms = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in d.items() if k != "total")
    print(f"  decode step (batch {p.batch:.1f}, context {b['decode_context']:.0f}): {d['total'] * 1e3:.2f} ms = {terms}")
    c = b["prefill_chunk"]
    terms = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in c.items() if k != "total")
    print(f"  prefill chunk ({b['chunk_tokens']:.0f} tokens): {c['total'] * 1e3:.2f} ms = {terms}")
    print(f"  a cycle of the batch: {b['cycle'] * 1e3:.1f} ms = prefill {b['cycle_prefill'] * 1e3:.1f} + decode "
          f"{b['cycle_decode'] * 1e3:.1f}; KV {b['kv_bytes_per_replica'] / 1e9:.2f} GB a replica, "
          f"{b['seq_kv_tokens']:.0f} KV tokens a sequence")


# ---------------------------------------------------------------------------------------------------------------


def lengths(values: list[int], name: str) -> Lengths:
    if len(values) == 1:
        return Lengths.fixed(values[0])
    if len(values) == 2:
        return Lengths.uniform(values[0], values[1])
    raise PlanError(f"{name}: one length, or LOW HIGH")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gptoss_serve.bench.plan", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="a saved profile (JSON)")
    src.add_argument("--measure", action="store_true", help="measure a profile on this machine's GPU")
    parser.add_argument("--model", help="checkpoint directory (--measure; also shown in the app args)")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    parser.add_argument("--measure-batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--measure-contexts", type=int, nargs="+", default=[128, 8192])
    parser.add_argument("--save-profile", help="write the profile here")
    parser.add_argument("--gpus", type=int, default=2, help="the GPU budget")
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[128], help="N, or LOW HIGH (uniform)")
    parser.add_argument("--output-len", type=int, nargs="+", default=[128], help="N, or LOW HIGH (uniform)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=float, help="requests in flight (default 64)")
    load.add_argument("--request-rate", type=float, help="requests a second")
    parser.add_argument("--burst", action="store_true", help="all --concurrency requests at once")
    parser.add_argument("--tpot-ms", type=float, help="TPOT limit")
    parser.add_argument("--ttft-ms", type=float, help="TTFT limit")
    parser.add_argument("--gpu-memory-utilization", type=float, default=EngineLimits().gpu_memory_utilization)
    parser.add_argument("--max-num-seqs", type=int, default=EngineLimits().max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineLimits().max_num_batched_tokens)
    parser.add_argument("--json", help="write the predictions here")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.gpus < 1:
        raise PlanError(f"--gpus must be at least 1, got {args.gpus}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise PlanError("--gpu-memory-utilization must be in (0, 1]")
    if args.max_num_seqs < 1 or args.max_num_batched_tokens < 1:
        raise PlanError("--max-num-seqs and --max-num-batched-tokens must be positive")
    try:
        workload = Workload(lengths(args.prompt_len, "--prompt-len"), lengths(args.output_len, "--output-len"),
                            concurrency=args.concurrency if args.request_rate is None and args.concurrency is not None
                            else (None if args.request_rate is not None else 64.0),
                            request_rate=args.request_rate,
                            tpot_limit_s=args.tpot_ms / 1e3 if args.tpot_ms is not None else None,
                            ttft_limit_s=args.ttft_ms / 1e3 if args.ttft_ms is not None else None, burst=args.burst)
    except ProfileError as e:
        raise PlanError(f"workload: {e}") from None
    profile = read_profile(args.profile) if args.profile else measure_profile(args)
    if args.save_profile:
        Path(args.save_profile).write_text(json.dumps(profile.to_dict(), indent=1))
        print(f"profile written to {args.save_profile}")
    limits = EngineLimits(args.gpu_memory_utilization, args.max_num_seqs, args.max_num_batched_tokens)
    preds, best, why = Planner(profile, workload, limits).plan(args.gpus)

    load = (f"concurrency {workload.concurrency:g}" + (" (burst)" if workload.burst else "")
            if workload.concurrency is not None else f"{workload.request_rate:g} requests/s")
    limits_text = ", ".join(x for x in (f"TPOT <= {args.tpot_ms:g} ms" if args.tpot_ms else "",
                                        f"TTFT <= {args.ttft_ms:g} ms" if args.ttft_ms else "") if x) or "no limits"
    print(f"profile: {profile.name} ({profile.card})")
    print(f"workload: prompts {workload.prompt.mean:.0f}, outputs {workload.output.mean:.0f} tokens on average, "
          f"{load}, {limits_text}; {args.gpus} GPUs")
    print_table(preds, best)
    if best is None:
        print(f"\nno recommendation: {why}")
    else:
        print(f"\nrecommended: {best.layout.label} ({why}): {best.tokens_per_s_per_gpu:.1f} tok/s a GPU, "
              f"TPOT {best.tpot_s * 1e3:.2f} ms, TTFT {best.ttft_s * 1e3:.1f} ms")
        print_breakdown(best)
        a = app_args(best.layout, args)
        print("\napp args (config.yaml `args:`, or serve run):")
        print("  serve run gptoss_serve.deployments.builder:build_app " + " ".join(flat_args(a)))
        print("RayService worker groups (k8s/rayservice.*.yaml workerGroupSpecs, one GPU a pod):")
        for g in worker_groups(best.layout):
            print(f"  - groupName: {g['groupName']}, replicas: {g['replicas']}, nvidia.com/gpu: {g['nvidia.com/gpu']}"
                  + (f", labels: {g['labels']}" if "labels" in g else ""))
    if args.json:
        def row(p: Prediction) -> dict:
            return {"layout": p.layout.label, "gpus": p.layout.gpus, "fits": p.fits, "reason": p.reason,
                    "batch": p.batch, "max_concurrency": p.max_concurrency, "tpot_s": p.tpot_s, "ttft_s": p.ttft_s,
                    "decode_step_s": p.decode_step_s, "tokens_per_s": p.tokens_per_s,
                    "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu, "meets_limits": p.meets_limits,
                    "kv_limited": p.kv_limited, "breakdown": p.breakdown}
        out = {"rows": [row(p) for p in preds], "recommended": best.layout.label if best else None, "why": why}
        if best is not None:
            out |= {"app_args": app_args(best.layout, args), "worker_groups": worker_groups(best.layout)}
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (PlanError, ProfileError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --save-profile / --json to a path that cannot be written
        print(f"plan: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
