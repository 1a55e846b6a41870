"""Where an engine step's time goes: torch.profiler over a few decode steps at one batch size.

    python -m gptoss_serve.bench.profile_step --model DIR [--batch 1] [--steps 8] [--trace trace.json]

Prints the ops that take the most device (or CPU) time, and the steps' wall time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss_serve.bench.engine_throughput import random_prompts, sync
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", help="write a Chrome trace here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = load_model(args.model, device=device)
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(max_num_seqs=args.batch, max_model_len=4096))
    params = SamplingParams(temperature=0, max_tokens=args.steps * 4 + 8, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(args.batch, args.prompt_len, seed=0)):
        engine.add_request(str(i), prompt, params)
    while len({o.request_id for o in engine.step()}) < args.batch:  # prefill, then a few warm-up steps
        pass
    for _ in range(args.steps):
        engine.step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        sync(device)
        elapsed = time.perf_counter() - start
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(f"batch {args.batch}: {elapsed / args.steps * 1e3:.2f} ms a step, "
          f"{args.batch * args.steps / elapsed:.1f} tokens/s")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
