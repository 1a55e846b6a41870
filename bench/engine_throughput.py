"""Engine throughput: decode tokens/s at several batch sizes and prefill tokens/s, beside HF transformers.

    python -m gptoss_serve.bench.engine_throughput --model DIR [--batches 1 64 256] [--prompt-lens 128] [--output-len 128]
    python -m gptoss_serve.bench.engine_throughput --model DIR --load-format dummy --prompt-lens 8192 32768 130944 \\
        --batches 1 16                                                  # long prompts
    python -m gptoss_serve.bench.engine_throughput --preset 20b --mxfp4 --write-to /tmp/gptoss-20b   # random checkpoint
    python -m gptoss_serve.bench.engine_throughput --model DIR --load-format dummy --experts both   # before / after

Prints one table; --json FILE writes the figures. Decode tokens/s counts the tokens of --output-len steps in which
the whole batch decodes, from the step after every request of the batch has its first token (each request is given
enough tokens that the first ones are still running when the last prompt's prefill ends); prefill tokens/s is
prompt tokens over the time to those first tokens.
--eager both runs it without CUDA graphs (engine.enforce_eager), then with them; --scheduling both runs it with
synchronous steps, then with async scheduling (engine.async_scheduling). --experts both loads the model twice,
MXFP4 experts widened to bf16 at load and then kept packed, and prints the GPU memory the weights take after each
load (torch.cuda.memory_allocated); --experts packed copy does the same with packed experts, then packed ones with a
bf16 copy beside them (bf16_expert_copy: the many-token steps multiply the copy); every other variant is an engine
built afresh on the same loaded model.
--kv-cache-dtype fp8 stores the KV cache in e4m3 (engine.kv_cache_dtype). --temperature T draws each token from the
softmax at T (what chat clients ask for by default) instead of taking the argmax.
--prompt-lens runs every batch size at each prompt length (--prompt-len is the same option). The engine's
max_model_len is --max-model-len, else the longest prompt plus the output, or what the KV cache holds if that is
less; a (prompt length, batch) case longer than max_model_len, or whose batch the cache cannot hold at once, is
skipped with a line saying so (the JSON lists it under "skipped").
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.synthetic import write_preset
from gptoss_serve.model.tokenizer import load_tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checkpoint_path(parser: argparse.ArgumentParser, args: argparse.Namespace, *, mxfp4_experts: bool = False) -> Path:
    """--model DIR as given, or a random --preset checkpoint written to --write-to (once: kept for later runs)."""
    if args.model:
        return Path(args.model)
    if not args.preset:
        parser.error("give --model DIR or --preset")
    path = Path(args.write_to)
    if not (path / "config.json").exists():
        t = time.perf_counter()
        write_preset(path, args.preset, mxfp4_experts=mxfp4_experts)
        print(f"wrote random {args.preset} checkpoint in {time.perf_counter() - t:.0f} s")
    return path


def random_prompts(batch: int, length: int, seed: int | None = None) -> list[list[int]]:
    """Random token ids; the default seed differs for every (batch, length), so that the cases of a sweep share no
    prefix the prefix cache could serve."""
    gen = torch.Generator().manual_seed(length * 1_000 + batch if seed is None else seed)
    return torch.randint(0, 199_000, (batch, length), generator=gen).tolist()


def lead_tokens(engine: LLMEngine, batch: int, prompt_len: int) -> int:
    """Tokens the first requests of a batch generate while the last prompts still prefill (one a step, in chunks of
    max_num_batched_tokens): each request gets that many more, so the whole batch is decoding when it is timed."""
    return -(-batch * prompt_len // engine.config.max_num_batched_tokens) + 1


def run_engine(engine: LLMEngine, batch: int, prompt_len: int, output_len: int, temperature: float = 0.0) -> dict:
    """Prefill tokens/s: the batch's prompt tokens over the time until every request has its first token. Decode
    tokens/s: the tokens of the next output_len steps, in which all `batch` requests decode (then the rest is
    aborted); at long prompts the first requests would otherwise be done before the last ones start, and a decode
    'of batch 64' would time a handful of sequences. temperature 0 is greedy; above it each token is drawn."""
    params = SamplingParams(temperature=temperature, max_tokens=output_len + lead_tokens(engine, batch, prompt_len),
                            ignore_eos=True)
    device = engine.model.device
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for request_id, prompt in zip(ids, random_prompts(batch, prompt_len)):
        engine.add_request(request_id, prompt, params)
    sync(device)
    start = time.perf_counter()
    started: set[str] = set()
    first_token_at = end = None
    generated_after = decode_steps = steps = 0
    while engine.has_unfinished_requests:
        outputs = engine.step()
        steps += 1
        if first_token_at is None:
            started.update(o.request_id for o in outputs)
            if len(started) == batch:
                sync(device)
                first_token_at = time.perf_counter()
        elif end is None:
            generated_after += len(outputs)
            decode_steps += 1
            if decode_steps == output_len:
                sync(device)
                end = time.perf_counter()
                for request_id in ids:
                    engine.abort(request_id)
    sync(device)
    decode_time = (end or time.perf_counter()) - first_token_at
    return {"batch": batch, "prompt_len": prompt_len, "output_len": output_len, "steps": steps,
            "decode_steps": decode_steps, "decode_tokens": generated_after,
            "prefill_tokens_per_s": batch * prompt_len / (first_token_at - start),
            "decode_tokens_per_s": generated_after / decode_time if decode_time > 0 else float("nan"),
            "total_s": time.perf_counter() - start}


def run_hf(path: Path, device: torch.device, batch: int, prompt_len: int, output_len: int, hf_model=None) -> dict:
    """transformers' generate on the same prompts (its own dequantized bf16 load for MXFP4 checkpoints)."""
    ids = torch.tensor(random_prompts(batch, prompt_len), device=device)
    hf_model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    sync(device)
    elapsed = time.perf_counter() - start
    return {"batch": batch, "hf_tokens_per_s": batch * output_len / elapsed, "hf_total_s": elapsed}


def load_hf(path: Path, device: torch.device):
    import transformers

    config = json.loads((path / "config.json").read_text())
    extra = {}
    if config.get("quantization_config", {}).get("quant_method") == "mxfp4":
        extra["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    try:
        import accelerate  # noqa: F401  (lets transformers load straight onto the device)
        placement = {"device_map": str(device)}
    except ImportError:
        placement = {}
    model = transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **placement, **extra)
    return model.to(device).eval()


def sequence_blocks(engine: LLMEngine, length: int) -> int:
    """KV blocks one decoding sequence of `length` tokens holds: one full-attention block per block_size tokens, and
    the sliding window's blocks plus the one it is filling."""
    size, window = engine.config.block_size, engine.model.config.sliding_window
    full = -(-length // size)
    return full + (min(full, -(-window // size) + 1) if window else 0)


def why_skipped(engine: LLMEngine, batch: int, prompt_len: int, output_len: int) -> str | None:
    """Why a case cannot be measured as meant (the whole batch decoding at once), or None when it can: a batch the
    cache cannot hold would be preempted and recomputed, and time that instead."""
    length = prompt_len + output_len + lead_tokens(engine, batch, prompt_len)
    if length > engine.max_model_len:
        return f"{prompt_len} + {length - prompt_len} tokens are more than max_model_len {engine.max_model_len}"
    # a prefill chunk holds sliding-window blocks beyond the window until its step ends
    chunk = -(-engine.config.max_num_batched_tokens // engine.config.block_size)
    need, have = batch * sequence_blocks(engine, length) + chunk, engine.num_blocks - 1
    if need > have:
        return f"{batch} sequences of {length} tokens need {need} KV blocks, the cache has {have}"
    return None


def build_engine(model, args: argparse.Namespace, name: str, **fields) -> LLMEngine:
    """An engine whose max_model_len is --max-model-len, else the longest prompt plus the output (within the
    model's context), or what the cache holds when that is less."""
    if args.max_model_len is not None:
        return LLMEngine(model, load_tokenizer(), EngineConfig(max_model_len=args.max_model_len, **fields))
    chunk = fields.get("max_num_batched_tokens", EngineConfig().max_num_batched_tokens)
    lead = -(-max(args.batches) * max(args.prompt_lens) // chunk) + 1  # lead_tokens
    longest = min(max(args.prompt_lens) + args.output_len + lead + 16, model.config.max_position_embeddings)
    try:
        return LLMEngine(model, load_tokenizer(), EngineConfig(max_model_len=longest, **fields))
    except ValueError as e:  # the cache cannot hold it: longer prompts are skipped below, the others still run
        print(f"[{name}] {e}; running with the longest the cache holds", flush=True)
        return LLMEngine(model, load_tokenizer(), EngineConfig(**fields))


def run_engine_variants(path: Path, device: torch.device, args: argparse.Namespace, experts: str,
                        modes: list[tuple[bool, bool]]) -> tuple[list[dict], list[dict]]:
    """Loads the model with its experts packed or dequantized; for each (eager, async scheduling) mode builds an
    engine on it and runs every (prompt length, batch size); frees the model. -> (figures, skipped cases)."""
    t = time.perf_counter()
    model = load_model(path, device=device, load_format=args.load_format, dequantize_experts=experts == "dequantized",
                       bf16_expert_copy=experts == "copy")
    weights_gb = torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    print(f"[{experts}] loaded in {time.perf_counter() - t:.1f} s on {device}; weights on the GPU: "
          f"{weights_gb:.2f} GB (torch.cuda.memory_allocated)", flush=True)
    rows, skipped = [], []
    for eager, async_scheduling in modes:
        name = (f"{experts}{', eager' if eager else ''}{', async' if async_scheduling else ', sync'}"
                f"{f', temperature {args.temperature:g}' if args.temperature else ''}")
        variant = {"experts": experts, "eager": eager, "async_scheduling": async_scheduling,
                   "kv_cache_dtype": args.kv_cache_dtype, "temperature": args.temperature}
        engine = build_engine(model, args, name, max_num_seqs=max(args.batches),
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=eager,
                              async_scheduling=async_scheduling, kv_cache_dtype=args.kv_cache_dtype)
        free = torch.cuda.mem_get_info(device)[0] / 1e9 if device.type == "cuda" else float("nan")
        print(f"[{name}] KV cache: {engine.kv_cache_bytes / 1e9:.2f} GB, {engine.num_blocks} blocks of "
              f"{engine.config.block_size} tokens, max_model_len {engine.max_model_len}; {free:.2f} GB of the device "
              f"still free", flush=True)
        run_engine(engine, 2, 16, 4)  # warm-up
        for prompt_len in args.prompt_lens:
            for batch in args.batches:
                if reason := why_skipped(engine, batch, prompt_len, args.output_len):
                    print(f"engine [{name}] prompt {prompt_len:6d} batch {batch:4d}: skipped: {reason}", flush=True)
                    skipped.append({"batch": batch, "prompt_len": prompt_len, "output_len": args.output_len,
                                    "reason": reason} | variant)
                    continue
                r = run_engine(engine, batch, prompt_len, args.output_len, args.temperature) | variant | {
                    "weights_gb": weights_gb, "kv_cache_gb": engine.kv_cache_bytes / 1e9,
                    "kv_cache_tokens": engine.num_blocks * engine.config.block_size,
                    "max_model_len": engine.max_model_len}
                rows.append(r)
                print(f"engine [{name}] prompt {prompt_len:6d} batch {batch:4d}: decode "
                      f"{r['decode_tokens_per_s']:9.1f} tok/s   prefill {r['prefill_tokens_per_s']:9.1f} tok/s   "
                      f"({r['steps']} steps, {r['total_s']:.1f} s)", flush=True)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, skipped


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which model a benchmark loads, and where (bench.long_context takes the same)."""
    parser.add_argument("--model", help="checkpoint directory or hub id")
    parser.add_argument("--preset", choices=["tiny", "20b", "120b"], help="write a random checkpoint instead")
    parser.add_argument("--mxfp4", action="store_true", help="with --preset: MXFP4 experts")
    parser.add_argument("--write-to", default="/tmp/gptoss-bench", help="with --preset: where to write it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights made on the device (the directory needs only config.json)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--experts", choices=["packed", "dequantized", "copy", "both"], nargs="+", default=["packed"],
                        help="MXFP4 experts kept packed, widened to bf16 at load, kept packed with a bf16 copy "
                             "beside them (the load option bf16_expert_copy), or dequantized then packed (both); "
                             "several: each in turn")
    parser.add_argument("--eager", choices=["no", "yes", "both"], default="no",
                        help="yes: engine.enforce_eager (no CUDA graphs); both: eager first, then graphs")
    parser.add_argument("--scheduling", choices=["async", "sync", "both"], default="async",
                        help="engine.async_scheduling on, off, or off then on")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "bf16", "fp8"], default="auto",
                        help="engine.kv_cache_dtype: fp8 holds about twice the tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-lens", "--prompt-len", dest="prompt_lens", type=int, nargs="+", default=[128],
                        help="prompt tokens; several: every batch size at each")
    parser.add_argument("--max-model-len", type=int,
                        help="engine.max_model_len (default: the longest prompt plus the output, if the cache "
                             "holds it)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig().max_num_batched_tokens,
                        help="engine.max_num_batched_tokens: the prefill chunk (prefill tok/s at 8,192-token steps)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (the default); above 0 every token is drawn from the softmax")
    parser.add_argument("--hf", action="store_true", help="also time transformers' generate")
    parser.add_argument("--hf-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    path = checkpoint_path(parser, args, mxfp4_experts=args.mxfp4)
    device = torch.device(args.device)
    results = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "checkpoint": str(path), "load_format": args.load_format, "engine": [], "skipped": [], "hf": []}
    modes = [(eager, async_scheduling)
             for eager in ([True, False] if args.eager == "both" else [args.eager == "yes"])
             for async_scheduling in ([False, True] if args.scheduling == "both" else [args.scheduling == "async"])]
    loads = [e for choice in args.experts for e in (["dequantized", "packed"] if choice == "both" else [choice])]
    for experts in loads:
        rows, skipped = run_engine_variants(path, device, args, experts, modes)
        results["engine"] += rows
        results["skipped"] += skipped
    if args.hf:
        hf_model = load_hf(path, device)
        for prompt_len in args.prompt_lens:
            for batch in args.hf_batches:
                r = run_hf(path, device, batch, prompt_len, args.output_len, hf_model) | {"prompt_len": prompt_len}
                results["hf"].append(r)
                print(f"HF      prompt {prompt_len:6d} batch {batch:4d}: {r['hf_tokens_per_s']:9.1f} output tok/s "
                      f"(generate, prefill included, {r['hf_total_s']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
