"""Where an engine step's time goes: launches, host syncs, GPU time against wall time, over decode steps.

    python -m gptoss_serve.bench.profile_step --model DIR [--load-format dummy] [--batch 1] [--steps 8]
        [--prompt-len 128] [--max-model-len N] [--kv-cache-dtype bf16|fp8]
        [--enforce-eager] [--sync-scheduling] [--trace trace.json] [--json PATH]

Per decode step it prints: kernel launches and CUDA-graph launches made by the host (cudaLaunchKernel and
cudaGraphLaunch calls), kernels the GPU ran, host syncs (counted by torch's CUDA sync debug mode, which warns on
each: with --sync-scheduling the sampler's read of the sampled ids is one; under async scheduling the host instead
waits on an event for the step before, while this one runs, which is no sync of the stream), the GPU's busy time
(sum of kernel times) and the wall time; then the ops that take the most device time.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss_serve.bench.engine_throughput import random_prompts, sync
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def count_syncs(step, steps: int) -> int:
    """Host syncs in `steps` calls of step(), as torch's sync debug mode reports them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, help="default: the prompt, the steps and 4,096, whichever fits")
    parser.add_argument("--kv-cache-dtype", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--sync-scheduling", action="store_true", help="no async scheduling")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--trace", help="write a Chrome trace here")
    parser.add_argument("--json", help="write the per-step figures here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = load_model(args.model, device=device, load_format=args.load_format)
    # enough tokens that the first prompts are still decoding when the last prompt's prefill ends
    prefill_steps = -(-args.batch * args.prompt_len // EngineConfig().max_num_batched_tokens)
    params = SamplingParams(temperature=0, max_tokens=prefill_steps + args.steps * 4 + 16, ignore_eos=True)
    max_model_len = args.max_model_len or max(4096, args.prompt_len + params.max_tokens)
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(
        max_num_seqs=max(args.batch, 1), max_model_len=max_model_len, kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager, async_scheduling=not args.sync_scheduling))
    for i, prompt in enumerate(random_prompts(args.batch, args.prompt_len, seed=0)):
        engine.add_request(str(i), prompt, params)
    started: set[str] = set()
    while len(started) < args.batch:  # prefill until every request has its first token
        started.update(o.request_id for o in engine.step())
    for _ in range(args.steps):
        engine.step()
    sync(device)
    syncs = count_syncs(engine.step, args.steps) if device.type == "cuda" else 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        sync(device)
        elapsed = time.perf_counter() - start
    events = prof.events()
    per_step = {
        "batch": args.batch, "prompt_len": args.prompt_len, "kv_cache_dtype": args.kv_cache_dtype,
        "enforce_eager": args.enforce_eager, "async_scheduling": not args.sync_scheduling,
        "kernel_launches": sum(e.name in LAUNCHES for e in events) / args.steps,
        "graph_launches": sum(e.name == "cudaGraphLaunch" for e in events) / args.steps,
        "gpu_kernels": sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events) / args.steps,
        "host_syncs": syncs / args.steps,
        "gpu_busy_ms": sum(e.device_time for e in events
                           if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / args.steps,
        "wall_ms": elapsed / args.steps * 1e3,
        "tokens_per_s": args.batch * args.steps / elapsed,
    }
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    mode = f"{'eager' if args.enforce_eager else 'CUDA graphs where they apply'}, " \
           f"{'sync' if args.sync_scheduling else 'async'} scheduling"
    print(f"batch {args.batch} ({mode}), per decode step: "
          f"{per_step['kernel_launches']:.0f} kernel launches, {per_step['graph_launches']:.0f} graph launches, "
          f"{per_step['gpu_kernels']:.0f} GPU kernels, {per_step['host_syncs']:.1f} host syncs, "
          f"GPU busy {per_step['gpu_busy_ms']:.2f} ms of {per_step['wall_ms']:.2f} ms wall "
          f"({per_step['tokens_per_s']:.1f} tokens/s)")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.json:
        Path(args.json).write_text(json.dumps(per_step, indent=2))


if __name__ == "__main__":
    main()
