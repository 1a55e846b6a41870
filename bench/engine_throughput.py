"""Engine throughput: decode tokens/s at several batch sizes and prefill tokens/s, beside HF transformers.

    python -m gptoss_serve.bench.engine_throughput --model DIR [--batches 1 64 256] [--prompt-len 128] [--output-len 128]
    python -m gptoss_serve.bench.engine_throughput --preset 20b --mxfp4 --write-to /tmp/gptoss-20b   # random checkpoint
    python -m gptoss_serve.bench.engine_throughput --model DIR --load-format dummy --experts both   # before / after

Prints one table; --json FILE writes the figures. Decode tokens/s counts the tokens generated after every
request of the batch has its first token; prefill tokens/s is prompt tokens over the time to those first tokens.
--eager both runs it without CUDA graphs (engine.enforce_eager), then with them; --scheduling both runs it with
synchronous steps, then with async scheduling (engine.async_scheduling). --experts both loads the model twice,
MXFP4 experts widened to bf16 at load and then kept packed, and prints the GPU memory the weights take after each
load (torch.cuda.memory_allocated); every other variant is an engine built afresh on the same loaded model.
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


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 199_000, (batch, length), generator=gen).tolist()


def run_engine(engine: LLMEngine, batch: int, prompt_len: int, output_len: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    device = engine.model.device
    for i, prompt in enumerate(random_prompts(batch, prompt_len, seed=batch)):
        engine.add_request(f"b{batch}-{i}", prompt, params)
    sync(device)
    start = time.perf_counter()
    started: set[str] = set()
    first_token_at = None
    generated_after = 0
    steps = 0
    while engine.has_unfinished_requests:
        outputs = engine.step()
        steps += 1
        if first_token_at is None:
            started.update(o.request_id for o in outputs)
            if len(started) == batch:
                sync(device)
                first_token_at = time.perf_counter()
        else:
            generated_after += len(outputs)
    sync(device)
    end = time.perf_counter()
    decode_time = end - first_token_at
    return {"batch": batch, "prompt_len": prompt_len, "output_len": output_len, "steps": steps,
            "prefill_tokens_per_s": batch * prompt_len / (first_token_at - start),
            "decode_tokens_per_s": generated_after / decode_time if decode_time > 0 else float("nan"),
            "total_s": end - start}


def run_hf(path: Path, device: torch.device, batch: int, prompt_len: int, output_len: int, hf_model=None) -> dict:
    """transformers' generate on the same prompts (its own dequantized bf16 load for MXFP4 checkpoints)."""
    ids = torch.tensor(random_prompts(batch, prompt_len, seed=batch), device=device)
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


def run_engine_variants(path: Path, device: torch.device, args: argparse.Namespace, experts: str,
                        modes: list[tuple[bool, bool]]) -> list[dict]:
    """Loads the model with its experts packed or dequantized; for each (eager, async scheduling) mode builds an
    engine on it and runs every batch size; frees the model."""
    t = time.perf_counter()
    model = load_model(path, device=device, load_format=args.load_format, dequantize_experts=experts == "dequantized")
    weights_gb = torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    print(f"[{experts}] loaded in {time.perf_counter() - t:.1f} s on {device}; weights on the GPU: "
          f"{weights_gb:.2f} GB (torch.cuda.memory_allocated)", flush=True)
    rows = []
    for eager, async_scheduling in modes:
        name = f"{experts}{', eager' if eager else ''}{', async' if async_scheduling else ', sync'}"
        config = EngineConfig(max_num_seqs=max(args.batches), max_model_len=args.prompt_len + args.output_len + 16,
                              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=eager,
                              async_scheduling=async_scheduling)
        engine = LLMEngine(model, load_tokenizer(), config)
        free = torch.cuda.mem_get_info(device)[0] / 1e9 if device.type == "cuda" else float("nan")
        print(f"[{name}] KV cache: {engine.kv_cache_bytes / 1e9:.2f} GB, {engine.num_blocks} blocks of "
              f"{engine.config.block_size} tokens; {free:.2f} GB of the device still free", flush=True)
        run_engine(engine, 2, 16, 4)  # warm-up
        for batch in args.batches:
            r = run_engine(engine, batch, args.prompt_len, args.output_len) | {
                "experts": experts, "eager": eager, "async_scheduling": async_scheduling, "weights_gb": weights_gb,
                "kv_cache_gb": engine.kv_cache_bytes / 1e9}
            rows.append(r)
            print(f"engine [{name}] batch {batch:4d}: decode {r['decode_tokens_per_s']:9.1f} tok/s   "
                  f"prefill {r['prefill_tokens_per_s']:9.1f} tok/s   ({r['steps']} steps, {r['total_s']:.1f} s)",
                  flush=True)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or hub id")
    parser.add_argument("--preset", choices=["tiny", "20b", "120b"], help="write a random checkpoint instead")
    parser.add_argument("--mxfp4", action="store_true", help="with --preset: MXFP4 experts")
    parser.add_argument("--write-to", default="/tmp/gptoss-bench", help="with --preset: where to write it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights made on the device (the directory needs only config.json)")
    parser.add_argument("--experts", choices=["packed", "dequantized", "both"], default="packed",
                        help="MXFP4 experts kept packed, widened to bf16 at load, or both in turn")
    parser.add_argument("--eager", choices=["no", "yes", "both"], default="no",
                        help="yes: engine.enforce_eager (no CUDA graphs); both: eager first, then graphs")
    parser.add_argument("--scheduling", choices=["async", "sync", "both"], default="async",
                        help="engine.async_scheduling on, off, or off then on")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf", action="store_true", help="also time transformers' generate")
    parser.add_argument("--hf-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    path = checkpoint_path(parser, args, mxfp4_experts=args.mxfp4)
    device = torch.device(args.device)
    results = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "checkpoint": str(path), "load_format": args.load_format, "engine": [], "hf": []}
    modes = [(eager, async_scheduling)
             for eager in ([True, False] if args.eager == "both" else [args.eager == "yes"])
             for async_scheduling in ([False, True] if args.scheduling == "both" else [args.scheduling == "async"])]
    for experts in (["dequantized", "packed"] if args.experts == "both" else [args.experts]):
        results["engine"] += run_engine_variants(path, device, args, experts, modes)
    if args.hf:
        hf_model = load_hf(path, device)
        for batch in args.hf_batches:
            r = run_hf(path, device, batch, args.prompt_len, args.output_len, hf_model)
            results["hf"].append(r)
            print(f"HF      batch {batch:4d}: {r['hf_tokens_per_s']:9.1f} output tok/s (generate, prefill included, "
                  f"{r['hf_total_s']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
