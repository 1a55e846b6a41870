"""Constrained decoding's cost per engine step: a batch decoding under a JSON schema against the same batch free.

    python -m gptoss_serve.bench.structured_output --model DIR --load-format dummy [--device cuda] [--batch 64]
    python -m gptoss_serve.bench.structured_output --preset tiny --device cpu --batch 8 --steps 16   # a quick look

Four engine runs on one loaded model, each --batch requests of a --prompt-len prompt decoding --steps tokens at
temperature 1: free with async scheduling (the GPU's default), free with synchronous steps, and constrained by
ORDER_SCHEMA (a constrained request makes steps synchronous, so the second run is the like-for-like one), then
constrained by the same schema without its strings' maxLength (llguidance's masks inside a length-bounded string
cost about 50 times more than elsewhere; a random model spends most of its tokens inside strings). Printed per
decode step: wall time in ms, and each constrained run's extra ms and ratio against each free run.

Then the three parts of that extra, each timed alone on --batch matchers in the states the constrained run went
through (replaying its outputs): the masks filled on the host (one call for the batch, llguidance's threads), the
bitmask applied to [batch, vocab] float32 logits on the device (Triton on GPUs, the PyTorch reference elsewhere),
and the matchers consuming their tokens. --json FILE writes every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from gptoss_serve.bench.engine_throughput import checkpoint_path, random_prompts, sync
from gptoss_serve.cluster.constraints import completion_constraint
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.grammar import GrammarMatcher, advance, token_bitmasks
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

# An order of items: strings, bounded integers, enums, nested arrays. minItems keeps a random model's document open
# for the whole run (it could otherwise close it after an item or two), so every step has --batch constrained rows,
# each somewhere in the document's structure.
ORDER_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["customer", "items"],
    "properties": {
        "customer": {"type": "string", "maxLength": 24},
        "items": {"type": "array", "minItems": 64, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "qty", "tags"],
            "properties": {"name": {"type": "string", "maxLength": 16},
                           "qty": {"type": "integer", "minimum": 0, "maximum": 999},
                           "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["new", "sale", "gift"]}}}}}}}
ORDER_FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True}}


def without_max_length(schema):
    """The schema with every string's maxLength dropped."""
    if isinstance(schema, dict):
        return {k: without_max_length(v) for k, v in schema.items() if k != "maxLength"}
    return [without_max_length(v) for v in schema] if isinstance(schema, list) else schema


UNBOUNDED_FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "schema": without_max_length(ORDER_SCHEMA),
                                                           "strict": True}}


def run(engine: LLMEngine, args: argparse.Namespace, *, response_format: dict | None) -> dict:
    """--batch requests to the end; -> ms per decode step (after every request has its first token), and the
    constrained requests' tokens."""
    spec = completion_constraint(response_format) if response_format else None
    prompts = random_prompts(args.batch, args.prompt_len, seed=args.batch)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=args.steps, temperature=1.0, seed=i,
                                                           ignore_eos=True, structured_output=spec))
    device = engine.model.device
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(args.batch)}
    step_times, rows = [], []
    while engine.has_unfinished_requests:
        decoding = all(tokens.values())  # every request past its prefill: the steps that count
        sync(device)
        start = time.perf_counter()
        outputs = engine.step()
        sync(device)
        if decoding:
            step_times.append(time.perf_counter() - start)
            rows.append(len(outputs))
        for out in outputs:
            tokens[out.request_id] += out.new_token_ids
    return {"ms_per_step": 1e3 * statistics.mean(step_times), "steps": len(step_times),
            "mean_rows": statistics.mean(rows) if rows else 0.0, "tokens": list(tokens.values())}


def time_parts(engine: LLMEngine, outputs: list[list[int]], args: argparse.Namespace) -> dict:
    """The constrained step's three extras, alone, on fresh matchers replaying the constrained run's tokens."""
    spec = completion_constraint(ORDER_FORMAT)
    matchers: list[GrammarMatcher] = [engine.grammars.matcher(spec) for _ in outputs]
    vocab, device = engine.model.config.vocab_size, engine.model.device
    on_gpu = device.type == "cuda"
    if on_gpu:
        from gptoss_serve.kernels.token_bitmask import apply_token_bitmask
    else:
        from gptoss_serve.kernels.token_bitmask_reference import apply_token_bitmask_reference as apply_token_bitmask
    logits = torch.randn(len(outputs), vocab, device=device)  # [B, V] float32, as the sampler masks them
    rows = torch.arange(len(outputs), device=device)
    fill, apply, consume = [], [], []
    for step in range(min(map(len, outputs))):
        start = time.perf_counter()
        masks = token_bitmasks(matchers, pin=on_gpu)  # [B, W]
        fill.append(time.perf_counter() - start)
        sync(device)
        start = time.perf_counter()
        apply_token_bitmask(logits, masks.to(device, non_blocking=True), rows)
        sync(device)
        apply.append(time.perf_counter() - start)
        start = time.perf_counter()
        advance([(m, tokens[step]) for m, tokens in zip(matchers, outputs)])
        consume.append(time.perf_counter() - start)
    errors = sum(m.error is not None for m in matchers)
    return {"fill_ms": 1e3 * statistics.mean(fill), "apply_ms": 1e3 * statistics.mean(apply),
            "advance_ms": 1e3 * statistics.mean(consume), "replayed_steps": len(fill), "matcher_errors": errors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory")
    parser.add_argument("--preset", choices=["tiny", "20b", "120b"], help="write a random checkpoint instead")
    parser.add_argument("--write-to", default="/tmp/gptoss-bench", help="with --preset: where to write it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights made on the device (the directory needs only config.json)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64, help="tokens each request decodes")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0,
                        help="each engine's KV cache on a GPU (the three engines are built one after another)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    path = checkpoint_path(parser, args)
    device = torch.device(args.device)
    model = load_model(path, device=device, load_format=args.load_format)
    results = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "checkpoint": str(path), "load_format": args.load_format, "batch": args.batch,
               "prompt_len": args.prompt_len, "steps": args.steps, "runs": {}}
    constrained_tokens = None
    for name, async_scheduling, response_format in [
            ("free, async", True, None), ("free, sync", False, None), ("constrained", True, ORDER_FORMAT),
            ("constrained, no maxLength", True, UNBOUNDED_FORMAT)]:
        config = EngineConfig(max_num_seqs=args.batch, max_model_len=args.prompt_len + args.steps + 16,
                              kv_cache_gib=args.kv_cache_gib if device.type == "cuda" else None,
                              async_scheduling=async_scheduling)
        engine = LLMEngine(model, load_tokenizer(), config)
        warm = argparse.Namespace(**{**vars(args), "batch": 2, "prompt_len": 16, "steps": 4})
        run(engine, warm, response_format=response_format)  # compiles the grammar, warms kernels and CUDA graphs
        r = run(engine, args, response_format=response_format)
        if response_format is ORDER_FORMAT:
            constrained_tokens = r["tokens"]
            results["parts"] = time_parts(engine, constrained_tokens, args)
        results["runs"][name] = {k: v for k, v in r.items() if k != "tokens"}
        print(f"[{name:25s}] {r['ms_per_step']:8.2f} ms per decode step ({r['steps']} steps, "
              f"{r['mean_rows']:.1f} rows on average)", flush=True)
        del engine  # its cache and graphs go back before the next engine sizes its own
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    runs = results["runs"]
    for constrained in ("constrained", "constrained, no maxLength"):
        constrained_ms = runs[constrained]["ms_per_step"]
        for name in ("free, sync", "free, async"):
            free_ms = runs[name]["ms_per_step"]
            print(f"{constrained:25s} vs {name:11s}: {constrained_ms - free_ms:+8.2f} ms per step, "
                  f"x{constrained_ms / free_ms:.3f}")
    parts = results["parts"]
    print(f"parts, batch {args.batch} (each alone, {parts['replayed_steps']} steps replayed): "
          f"mask fill on the host {parts['fill_ms']:.3f} ms, bitmask applied on {device.type} "
          f"{parts['apply_ms']:.3f} ms, matcher advance {parts['advance_ms']:.3f} ms "
          f"(sum {parts['fill_ms'] + parts['apply_ms'] + parts['advance_ms']:.3f} ms)")
    if parts["matcher_errors"]:
        print(f"warning: {parts['matcher_errors']} replayed matchers refused a token")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
