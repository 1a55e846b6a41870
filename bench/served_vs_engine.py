"""The served path against the engine alone, on the same requests, in one run.

    python -m gptoss_serve.bench.served_vs_engine --preset tiny                       # CPU: 300 x (64 in, 32 out)
    python -m gptoss_serve.bench.served_vs_engine --model DIR --device cuda --burst 1000 \\
        --prompt-lens 32 400 --output-lens 32 368                                      # W2 on one GPU

First the engine alone (offline `generate`) runs the burst and one concurrency-1 request; then the Serve app
(ingress -> BatchingRouter -> AttentionReplica with its engine core) starts on the same device and the same
requests arrive at once over HTTP as streaming completions (token-id prompts, ignore_eos). Prints output
tokens/s of both and their ratio, TTFT and TPOT at concurrency 1, and the statuses of the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time

import torch

from gptoss_serve.bench.local_app import local_app
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.synthetic import write_preset
from gptoss_serve.model.tokenizer import load_tokenizer

SINGLE = (128, 64)  # the concurrency-1 request: prompt and output tokens


def workload(n: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int], seed: int = 0):
    """n (prompt token ids, output length) pairs, lengths uniform in the given ranges."""
    rng = random.Random(seed)
    return [([rng.randrange(1000, 199_000) for _ in range(rng.randint(*prompt_lens))], rng.randint(*output_lens))
            for _ in range(n)]


def params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)


def engine_alone(model_dir: str, device: str, dtype: torch.dtype, config: EngineConfig, requests, *,
                 load_format: str = "auto", bf16_expert_copy: bool = False) -> dict:
    model = load_model(model_dir, device=device, dtype=dtype, load_format=load_format,
                       bf16_expert_copy=bf16_expert_copy)
    engine = LLMEngine(model, load_tokenizer(), config)
    engine.generate([requests[0][0]], params(4))  # warm-up
    steps = StepClock(engine)  # each step's wall time and tokens, for where the offline burst's time went
    compiles, start = engine.kernel_compiles, time.perf_counter()
    done = engine.generate([p for p, _ in requests], [params(n) for _, n in requests])
    wall = time.perf_counter() - start
    steps.stop()
    # Triton variants first needed in the burst (compiled here; the served app, started after, loads them from
    # Triton's disk cache): each stalls the offline steps by seconds
    compiles = engine.kernel_compiles - compiles
    tokens = sum(len(r.token_ids) for r in done)
    # concurrency 1: time to the first token, then the mean gap between tokens
    prompt, n = requests[0][0][:SINGLE[0]], SINGLE[1]
    engine.add_request("single", prompt, params(n))
    times, start = [], time.perf_counter()
    while engine.has_unfinished_requests:
        if engine.step():
            times.append(time.perf_counter())
    result = {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall, "kernel_compiles": compiles,
              "steps": steps.figures(),
              "ttft_ms": (times[0] - start) * 1e3,
              "tpot_ms": statistics.mean(b - a for a, b in zip(times, times[1:])) * 1e3}
    del engine, model
    gc.collect()  # whatever cycle still holds part of the engine: its GPU memory is the served app's to take
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


class StepClock:
    """Times each `step` of an engine (generate calls it) until stopped: how many steps the burst took, how long they
    took, and the slow ones (a kernel compiled mid-burst stalls a step by seconds)."""

    SLOW_S = 0.5

    def __init__(self, engine: LLMEngine) -> None:
        self.engine, self.seconds, self.tokens = engine, [], []

        def step():
            start = time.perf_counter()
            outputs = LLMEngine.step(engine)
            self.seconds.append(time.perf_counter() - start)
            self.tokens.append(engine.step_tokens)
            return outputs

        engine.step = step

    def stop(self) -> None:
        del self.engine.step  # the class's own again

    def figures(self) -> dict:
        if not self.seconds:
            return {"count": 0}
        ordered = sorted(self.seconds)
        slow = [s for s in self.seconds if s > self.SLOW_S]
        return {"count": len(ordered), "mean_ms": statistics.mean(ordered) * 1e3,
                "p50_ms": ordered[len(ordered) // 2] * 1e3, "max_ms": ordered[-1] * 1e3,
                "slow": len(slow), "slow_s": sum(slow), "mean_tokens": statistics.mean(self.tokens)}


async def stream_completion(client, url: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": "gpt-oss", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, last, tokens = time.perf_counter(), None, None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "tokens": 0}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif first is None:
                first = now
            last = now
    return {"status": 200, "tokens": tokens, "ttft": (first or start) - start, "end": (last or start) - start}


async def burst(url: str, requests) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(client, url, p, n) for p, n in requests))
        wall = time.perf_counter() - start
    statuses: dict[int, int] = {}
    for r in results:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall, "statuses": statuses}


async def single(url: str, prompt: list[int], n: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        r = await stream_completion(client, url, prompt, n)
    return {"ttft_ms": r["ttft"] * 1e3, "tpot_ms": (r["end"] - r["ttft"]) / max(1, r["tokens"] - 1) * 1e3}


def served(model_dir: str, device: str, config: EngineConfig, requests, *, num_cpus: int,
           load_format: str = "auto", bf16_expert_copy: bool = False) -> dict:
    n = len(requests)
    app = {"model": model_dir, "load_format": load_format, "num_gpus_per_replica": 1 if device == "cuda" else 0,
           "bf16_expert_copy": bf16_expert_copy,
           "engine": config.model_dump(), "max_ongoing_requests": n + 8, "max_queued_requests": 0,
           "max_waiting_per_replica": n + 8}
    with local_app(app, num_cpus=num_cpus) as url:
        asyncio.run(single(url, requests[0][0], 4))  # warm-up
        result = asyncio.run(burst(url, requests))
        result |= asyncio.run(single(url, requests[0][0][:SINGLE[0]], SINGLE[1]))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: a random preset, written to --write-to)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "20b", "120b"])
    p.add_argument("--mxfp4", action="store_true")
    p.add_argument("--write-to", default="/tmp/gptoss-bench-model")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights made on the device (the directory needs only config.json)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--burst", type=int, default=300)
    p.add_argument("--prompt-lens", type=int, nargs=2, default=[64, 64])
    p.add_argument("--output-lens", type=int, nargs=2, default=[32, 32])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=EngineConfig.model_fields["max_num_batched_tokens"].default,
                   help="engine.max_num_batched_tokens: tokens a step computes (the prefill chunk)")
    p.add_argument("--mixed-step-graph-tokens", type=int,
                   default=EngineConfig.model_fields["mixed_step_graph_tokens"].default,
                   help="engine.mixed_step_graph_tokens: mixed steps up to this size replay piecewise graphs (0: "
                        "eagerly)")
    p.add_argument("--bf16-expert-copy", action="store_true",
                   help="MXFP4 experts also held as bf16 for many-token steps (the load option bf16_expert_copy)")
    p.add_argument("--num-cpus", type=int, default=4, help="Ray CPUs for the app")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    model_dir = args.model or str(write_preset(args.write_to, args.preset, mxfp4_experts=args.mxfp4))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          mixed_step_graph_tokens=args.mixed_step_graph_tokens)
    requests = workload(args.burst, tuple(args.prompt_lens), tuple(args.output_lens))
    alone = engine_alone(model_dir, args.device, dtype, config, requests, load_format=args.load_format,
                         bf16_expert_copy=args.bf16_expert_copy)
    serve_figures = served(model_dir, args.device, config, requests, num_cpus=args.num_cpus,
                           load_format=args.load_format, bf16_expert_copy=args.bf16_expert_copy)
    figures = {"engine": alone, "served": serve_figures, "ratio": serve_figures["tok_s"] / alone["tok_s"],
               "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "requests": args.burst, "prompt_lens": args.prompt_lens, "output_lens": args.output_lens}
    print(f"{'':24}{'engine alone':>14}{'served (HTTP)':>16}")
    print(f"{'output tok/s':24}{alone['tok_s']:>14.1f}{serve_figures['tok_s']:>16.1f}   "
          f"ratio {figures['ratio']:.3f}")
    print(f"{'burst seconds':24}{alone['seconds']:>14.2f}{serve_figures['seconds']:>16.2f}")
    print(f"{'conc. 1 TTFT ms':24}{alone['ttft_ms']:>14.1f}{serve_figures['ttft_ms']:>16.1f}")
    print(f"{'conc. 1 TPOT ms':24}{alone['tpot_ms']:>14.2f}{serve_figures['tpot_ms']:>16.2f}")
    print(f"statuses of the burst: {serve_figures['statuses']}   tokens: engine {alone['tokens']}, "
          f"served {serve_figures['tokens']}   kernel compiles in the offline burst: {alone['kernel_compiles']}")
    steps = alone["steps"]
    if steps["count"]:
        print(f"offline steps: {steps['count']}, {steps['mean_tokens']:.0f} tokens a step, {steps['mean_ms']:.2f} ms "
              f"mean, {steps['p50_ms']:.2f} ms median, {steps['max_ms']:.1f} ms longest, {steps['slow']} over "
              f"{StepClock.SLOW_S:g} s ({steps['slow_s']:.1f} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
