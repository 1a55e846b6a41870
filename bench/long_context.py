"""Long contexts on one engine: time to first token of long prompts, and what a long prompt's prefill does to the
requests decoding beside it.

    python -m gptoss_serve.bench.long_context --model DIR --load-format dummy [--ttft-lens 8192 32768 131071]
        [--decode-batch 32] [--decode-prompt-len 1024] [--long-prompt-len 131071]
        [--long-prefill-token-threshold N] [--mixed-step-graph-tokens N] [--json FILE]
    python -m gptoss_serve.bench.long_context --preset tiny --ttft-lens 64 256 --decode-batch 4 \\
        --decode-prompt-len 16 --long-prompt-len 512 --max-num-batched-tokens 64    # the same on the CPU, at toy sizes

Time to first token: each prompt alone on an idle engine, one token asked for; the request's own times (arrival
-> first token on the host, RequestTimes). 131,071 is the longest prompt gpt-oss's 131,072-token context answers.

Decodes beside a prefill: --decode-batch requests decode together. Their time per output token (TPOT) is measured
over --baseline-steps steps alone, then from the step a --long-prompt-len prompt arrives until its first token: the
scheduler serves the decodes first and fills the rest of each step's engine.max_num_batched_tokens with a chunk of
the long prompt (at most --long-prefill-token-threshold tokens, engine.long_prefill_token_threshold, when set), so
the decodes go on, each step longer by its chunk. A window's TPOT is, for each decoding request,
the time from its first to its last token in the window over the tokens between (taken as engine.step returns
them); the table gives the median over the requests and the longest gap any of them saw.

Prompts are random token ids, each from its own seed: no two share a prefix the prefix cache could serve. A case
the engine cannot hold (a prompt longer than max_model_len, a batch beyond the KV cache) is skipped with a line
saying so. Each case also counts the kernel variants the engine first needed while it ran (LLMEngine.kernel_compiles:
a compile stalls its step, so a long gap with a compile beside it is the compile). Prints a table; --json FILE writes
the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from gptoss_serve.bench.engine_throughput import (add_model_arguments, checkpoint_path, random_prompts, run_engine,
                                                 sequence_blocks)
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.engine_protocol import RequestOutput, RequestTimes
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

FIRST_TOKEN_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
UNTIL_ABORTED = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)  # None: until the context is full


def time_to_first_token(engine: LLMEngine, prompt: list[int]) -> dict:
    """Runs one prompt alone to its first token. -> its TTFT and the prefill rate it implies."""
    request_id = f"ttft-{len(prompt)}"
    compiles = engine.kernel_compiles
    engine.add_request(request_id, prompt, FIRST_TOKEN_ONLY)
    times, steps = None, 0
    while engine.has_unfinished_requests:
        for out in engine.step():
            times = first_token_times(out, request_id) or times
        steps += 1
    ttft = times.first_token - times.arrival
    return {"prompt_len": len(prompt), "ttft_s": ttft, "prefill_tokens_per_s": len(prompt) / ttft, "steps": steps,
            "kernel_compiles": engine.kernel_compiles - compiles}


def first_token_times(out: RequestOutput, request_id: str) -> RequestTimes | None:
    """The request's times once its first token is out; a failed request stops the benchmark."""
    if out.request_id != request_id:
        return None
    if out.error is not None:
        raise RuntimeError(f"request {request_id} failed: {out.error}")
    return out.times if out.times is not None and out.times.first_token else None


class TokenClock:
    """Steps the engine and notes when each watched request's tokens reach the host."""

    def __init__(self, engine: LLMEngine, request_ids: list[str]) -> None:
        self.engine = engine
        self.arrivals: dict[str, list[float]] = {request_id: [] for request_id in request_ids}

    def step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_ids and out.request_id in self.arrivals:
                self.arrivals[out.request_id].append(now)
        return outputs

    def window(self, start: float, end: float) -> dict:
        """TPOT over (start, end]: per request (last - first) / (tokens - 1), the median over requests; the longest
        gap between two tokens of one request; the median tokens a request got."""
        per_request, longest_gap, counts = [], 0.0, []
        for arrivals in self.arrivals.values():
            inside = [t for t in arrivals if start < t <= end]
            counts.append(len(inside))
            if len(inside) >= 2:
                per_request.append((inside[-1] - inside[0]) / (len(inside) - 1))
                longest_gap = max(longest_gap, *(b - a for a, b in zip(inside, inside[1:])))
        return {"tpot_ms": 1000 * statistics.median(per_request) if per_request else float("nan"),
                "longest_gap_ms": 1000 * longest_gap, "tokens_per_request": statistics.median(counts),
                "window_s": end - start}


def decodes_beside_prefill(engine: LLMEngine, args: argparse.Namespace, seeds: itertools.count) -> dict:
    """--decode-batch requests decoding: their TPOT alone, then while a --long-prompt-len prompt prefills."""
    ids = [f"decode-{i}" for i in range(args.decode_batch)]
    for request_id in ids:
        engine.add_request(request_id, random_prompts(1, args.decode_prompt_len, seed=next(seeds))[0], UNTIL_ABORTED)
    clock = TokenClock(engine, ids)
    while not all(clock.arrivals.values()):  # their own prefill
        clock.step()
    for _ in range(args.settle_steps):  # the async pipeline full, every request decoding
        clock.step()
    start, compiles = time.perf_counter(), engine.kernel_compiles
    for _ in range(args.baseline_steps):
        clock.step()
    alone = clock.window(start, time.perf_counter()) | {"kernel_compiles": engine.kernel_compiles - compiles}

    engine.add_request("long", random_prompts(1, args.long_prompt_len, seed=next(seeds))[0], FIRST_TOKEN_ONLY)
    arrived, long_times, steps, compiles = time.perf_counter(), None, 0, engine.kernel_compiles
    while long_times is None:
        steps += 1
        for out in clock.step():
            long_times = first_token_times(out, "long") or long_times
    beside = clock.window(arrived, time.perf_counter()) | {"kernel_compiles": engine.kernel_compiles - compiles}
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished_requests:
        engine.step()
    return {"decode_batch": args.decode_batch, "decode_prompt_len": args.decode_prompt_len,
            "long_prompt_len": args.long_prompt_len, "alone": alone, "beside_prefill": beside,
            "prefill_steps": steps, "long_prompt_ttft_s": long_times.first_token - long_times.arrival}


def why_decodes_skipped(engine: LLMEngine, args: argparse.Namespace) -> str | None:
    """Why the decodes-beside-a-prefill case cannot run on this engine, or None."""
    if args.long_prompt_len + 1 > engine.max_model_len:
        return f"a {args.long_prompt_len}-token prompt and its token are more than max_model_len {engine.max_model_len}"
    # what the decodes reach by the end: their prompt, the steps before the window and in it, the prefill's steps
    per_step = engine.config.max_num_batched_tokens - args.decode_batch
    if engine.config.long_prefill_token_threshold:
        per_step = min(per_step, engine.config.long_prefill_token_threshold)
    prefill_steps = -(-args.long_prompt_len // max(1, per_step))
    decoded = args.settle_steps + args.baseline_steps + prefill_steps + 4
    chunk = -(-engine.config.max_num_batched_tokens // engine.config.block_size)
    need = (args.decode_batch * sequence_blocks(engine, args.decode_prompt_len + decoded)
            + sequence_blocks(engine, args.long_prompt_len + 1) + chunk)
    if need > engine.num_blocks - 1:
        return f"the decodes and the long prompt need {need} KV blocks, the cache has {engine.num_blocks - 1}"
    return None


def print_table(results: dict) -> None:
    print("\ntime to first token, each prompt alone (1 token out)")
    print(f"{'prompt tokens':>14}  {'TTFT s':>9}  {'prefill tok/s':>13}  {'steps':>6}  {'kernel compiles':>15}")
    for r in results["ttft"]:
        print(f"{r['prompt_len']:>14,}  {r['ttft_s']:>9.3f}  {r['prefill_tokens_per_s']:>13,.0f}  {r['steps']:>6}  "
              f"{r['kernel_compiles']:>15}")
    d = results["decode_beside_prefill"]
    if d is not None:
        print(f"\n{d['decode_batch']} requests decoding ({d['decode_prompt_len']:,}-token prompts)")
        print(f"{'':>40}  {'TPOT ms':>8}  {'longest gap ms':>14}  {'tokens each':>11}  {'kernel compiles':>15}")
        for label, w in (("alone", d["alone"]),
                         (f"while a {d['long_prompt_len']:,}-token prompt prefills", d["beside_prefill"])):
            print(f"{label:>40}  {w['tpot_ms']:>8.2f}  {w['longest_gap_ms']:>14.2f}  {w['tokens_per_request']:>11g}  "
                  f"{w['kernel_compiles']:>15}")
        print(f"the long prompt's TTFT beside them: {d['long_prompt_ttft_s']:.3f} s ({d['prefill_steps']} steps)")
    if results["engine"]["mixed_step_graph_tokens"]:
        print(f"steps replayed from piecewise graphs: {results['mixed_graph_steps']}")
    for s in results["skipped"]:
        print(f"skipped: {s['case']}: {s['reason']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "bf16", "fp8"], default="auto",
                        help="engine.kv_cache_dtype: fp8 holds about twice the tokens")
    parser.add_argument("--max-model-len", type=int, help="engine.max_model_len (default: the model's context, or "
                                                          "what the KV cache holds)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig().max_num_batched_tokens,
                        help="tokens a step computes: the prefill chunk the decodes share their steps with")
    parser.add_argument("--long-prefill-token-threshold", type=int, default=0,
                        help="engine.long_prefill_token_threshold: the long prompt's chunk beside the decodes")
    parser.add_argument("--mixed-step-graph-tokens", type=int,
                        default=EngineConfig.model_fields["mixed_step_graph_tokens"].default,
                        help="engine.mixed_step_graph_tokens: mixed steps up to this size replay piecewise graphs "
                             "(0: eagerly)")
    parser.add_argument("--ttft-lens", type=int, nargs="+", default=[8192, 32768, 131071],
                        help="prompt tokens, each timed alone to its first token")
    parser.add_argument("--decode-batch", type=int, default=32, help="requests decoding beside the long prefill")
    parser.add_argument("--decode-prompt-len", type=int, default=1024)
    parser.add_argument("--long-prompt-len", type=int, default=131071, help="the prompt that prefills beside them")
    parser.add_argument("--settle-steps", type=int, default=8, help="decode steps before the first window")
    parser.add_argument("--baseline-steps", type=int, default=64, help="decode steps timed without the prefill")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    path = checkpoint_path(parser, args, mxfp4_experts=args.mxfp4)
    device = torch.device(args.device)
    t = time.perf_counter()
    model = load_model(path, device=device, load_format=args.load_format)
    config = EngineConfig(max_num_seqs=args.decode_batch + 1, max_num_batched_tokens=args.max_num_batched_tokens,
                          long_prefill_token_threshold=args.long_prefill_token_threshold,
                          mixed_step_graph_tokens=args.mixed_step_graph_tokens, max_model_len=args.max_model_len,
                          gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=args.kv_cache_dtype)
    engine = LLMEngine(model, load_tokenizer(), config)
    print(f"loaded in {time.perf_counter() - t:.1f} s on {device}; KV cache {engine.kv_cache_bytes / 1e9:.2f} GB, "
          f"{engine.num_blocks} blocks of {engine.config.block_size} tokens, max_model_len {engine.max_model_len}",
          flush=True)
    results = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "checkpoint": str(path), "load_format": args.load_format,
               "engine": {"max_model_len": engine.max_model_len, "num_blocks": engine.num_blocks,
                          "block_size": engine.config.block_size, "kv_cache_gb": engine.kv_cache_bytes / 1e9,
                          "max_num_batched_tokens": engine.config.max_num_batched_tokens,
                          "long_prefill_token_threshold": engine.config.long_prefill_token_threshold,
                          "mixed_step_graph_tokens": engine.config.mixed_step_graph_tokens,
                          "kv_cache_dtype": engine.config.kv_cache_dtype},
               "ttft": [], "decode_beside_prefill": None, "skipped": []}
    seeds = itertools.count(1)

    run_engine(engine, 2, 16, 4)  # warm-up: decode graphs, the sampler
    fitting = [n for n in args.ttft_lens if n + 1 <= engine.max_model_len]
    if fitting:  # warm-up of the prefill kernels at a long context
        time_to_first_token(engine, random_prompts(1, min(fitting), seed=next(seeds))[0])
    for n in args.ttft_lens:
        if n not in fitting:
            results["skipped"].append({"case": f"TTFT of {n} tokens",
                                       "reason": f"the prompt and its token are more than max_model_len "
                                                 f"{engine.max_model_len}"})
            continue
        results["ttft"].append(r := time_to_first_token(engine, random_prompts(1, n, seed=next(seeds))[0]))
        print(f"TTFT {n:>7} tokens: {r['ttft_s']:.3f} s", flush=True)
    if reason := why_decodes_skipped(engine, args):
        results["skipped"].append({"case": f"{args.decode_batch} decodes beside a {args.long_prompt_len}-token "
                                           f"prefill", "reason": reason})
    else:
        results["decode_beside_prefill"] = decodes_beside_prefill(engine, args, seeds)
    results["mixed_graph_steps"] = engine.runner.mixed_graph_steps
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
