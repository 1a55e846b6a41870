"""The step's attention kernels (kernels/varlen_attention.py, split_kv_attention.py) at gpt-oss's shape, against the
device's copy bandwidth.

    python -m gptoss_serve.bench.paged_attention [--json PATH] [--long-only]
    python -m gptoss_serve.bench.paged_attention --prefill [--sweep] [--baseline OLD/kernels/varlen_attention.py]

One layer's attention (64 query heads, 8 KV heads, head dim 64, blocks of 16, bf16), timed as the median of CUDA-graph
replays with events (bench/moe_kernel.py's helpers); bytes are the keys and values the kernel must read (the window's,
on sliding layers) plus q and the output; the fraction is of a 1 GiB device-to-device copy measured in the same run.

First table: `paged_attention` as the engine calls it, for decode batches of 1, 64 and 256 sequences at contexts 512
and 2,048 and one 2,048-token prefill chunk, on full and sliding-window (128) layers, with the PyTorch reference's
eager time beside it. Second table: long-context decode (contexts 1k, 8k, 32k, 128k; batches 1, 16, 64; full and
sliding-window layers), the one kernel against the split-KV one side by side: the split with its splits picked from
the tables' own width (an eager step's), and picked as a CUDA graph of max_model_len 128k picks them (the engine's
decode path); "diff" is ||split - one kernel|| / ||one kernel||. Cases whose caches do not fit the free memory are
skipped; cases smaller than the L2 cache run over several copies in rotation, so repeats do not read it from L2.

`--prefill` instead times prompt chunks on a full-attention layer, eagerly (prefill steps are not graphed): the
engine's 2,048-token chunk ending at contexts of 8k, 32k and 128k tokens, a whole 8k prompt in one step, and
256-token chunks at 32k and 128k (split across keys as paged_attention picks, and unsplit); FLOP/s count the
products a causal kernel must take (4 * heads * head dim for each visible query-key pair) against a bf16
torch.matmul measured in the same run. `--sweep` times the tilings of varlen_attention.PrefillTiles listed below
at 32k; `--baseline` loads another tree's varlen_attention.py from its path and times it beside this one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import torch

from gptoss_serve.bench.moe_kernel import copy_bandwidth, eager_mean, events_median, graphed, matmul_peak
from gptoss_serve.kernels.paged_attention import paged_attention_reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 64, 8, 64, 16
MAX_MODEL_LEN = 131072  # gpt-oss's: the width of the decode graphs' block tables
LONG_CONTEXTS, LONG_BATCHES = (1024, 8192, 32768, 131072), (1, 16, 64)
CHUNK = 2048  # the engine's max_num_batched_tokens: a long prompt's prefill chunk
# (context, new tokens): the engine's chunks, a whole 8k prompt, and a long prompt's chunks capped at 256 tokens
# beside decodes (long_prefill_token_threshold)
PREFILL_CASES = ((8192, CHUNK), (32768, CHUNK), (131072, CHUNK), (8192, 8192), (32768, 256), (131072, 256))
SWEEP_TILES = ((128, 64, 4, None), (128, 64, 4, 2), (128, 64, 4, 4), (128, 128, 4, 2), (128, 128, 4, 3),
               (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3), (256, 128, 8, 2), (256, 128, 8, 3))


def case(batch: int, context: int, new: int, window: int | None) -> dict:
    from gptoss_serve.kernels.varlen_attention import paged_attention

    blocks_per_seq = -(-context // BLOCK)
    cache_shape = (batch * blocks_per_seq + 1, BLOCK, KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    tables = (torch.randperm(batch * blocks_per_seq, device="cuda") + 1).view(batch, blocks_per_seq).int()
    q = torch.randn(batch * new, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    args = dict(block_tables=tables, query_start=torch.arange(batch + 1, device="cuda", dtype=torch.int32) * new,
                context_lens=torch.full((batch,), context, device="cuda", dtype=torch.int32),
                sinks=torch.randn(HEADS, device="cuda"), window=window, scale=HEAD_DIM**-0.5)
    replay, out = graphed(lambda: paged_attention(q, key_cache, value_cache, max_query_len=new, **args))
    seconds = events_median([replay], 50)
    reference = paged_attention_reference(q, key_cache, value_cache, **args)
    error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
    reference_s = eager_mean([lambda: paged_attention_reference(q, key_cache, value_cache, **args)], 5)
    return dict(batch=batch, context=context, new_tokens=new, window=window, seconds=seconds,
                bytes=kv_bytes(batch, context, new, window),
                reference_seconds=reference_s, relative_error=error)


def kv_bytes(batch: int, context: int, new: int, window: int | None) -> int:
    """Keys and values a step must read (bf16), plus q and the output."""
    keys_read = min(context, (window or context) + new - 1)
    return batch * keys_read * KV_HEADS * HEAD_DIM * 2 * 2 + 2 * batch * new * HEADS * HEAD_DIM * 2


def decode_inputs(batch: int, context: int) -> dict:
    """One decode step's arguments (window left out): every sequence `context` tokens long, its blocks shuffled."""
    blocks_per_seq = -(-context // BLOCK)
    key_cache = torch.randn(batch * blocks_per_seq + 1, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return dict(q=torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16), key_cache=key_cache,
                value_cache=torch.randn_like(key_cache),
                block_tables=(torch.randperm(batch * blocks_per_seq, device="cuda") + 1).view(batch, -1).int(),
                query_start=torch.arange(batch + 1, device="cuda", dtype=torch.int32),
                context_lens=torch.full((batch,), context, device="cuda", dtype=torch.int32),
                sinks=torch.randn(HEADS, device="cuda"), scale=HEAD_DIM**-0.5)


def long_decode(batch: int, context: int, windows: list[int | None]) -> list[dict] | None:
    """The one kernel and the split one at a decode step of `batch` sequences of `context` tokens, per window;
    None when the caches do not fit."""
    from gptoss_serve.kernels.split_kv_attention import decode_splits, split_kv_decode
    from gptoss_serve.kernels.varlen_attention import varlen_attention

    cache_bytes = 2 * batch * -(-context // BLOCK) * BLOCK * KV_HEADS * HEAD_DIM * 2
    properties = torch.cuda.get_device_properties(0)
    copies = max(1, min(64, math.ceil(3 * properties.L2_cache_size / cache_bytes)))
    if copies * cache_bytes > 0.8 * torch.cuda.mem_get_info()[0]:
        return None
    sets = [decode_inputs(batch, context) for _ in range(copies)]
    rows = []
    for window in windows:
        def splits_for(width: int) -> int:
            return decode_splits(num_seqs=batch, kv_heads=KV_HEADS, max_keys=min(width, window or width),
                                 multiprocessors=properties.multi_processor_count)

        def timed(attend) -> tuple[float, torch.Tensor]:
            replays, outs = zip(*(graphed(lambda args=args: attend(**args, window=window)) for args in sets))
            return events_median(list(replays), 50), outs[0]

        one_s, one_out = timed(lambda **args: varlen_attention(**args, max_query_len=1))
        row = dict(batch=batch, context=context, window=window, bytes=kv_bytes(batch, context, 1, window),
                   one_kernel_seconds=one_s)
        for name, splits in (("split", splits_for(sets[0]["block_tables"].shape[1] * BLOCK)),
                             ("graph_split", splits_for(MAX_MODEL_LEN))):
            seconds, out = timed(lambda **args: split_kv_decode(**args, num_splits=splits))
            diff = ((out.float() - one_out.float()).norm() / one_out.float().norm()).item()
            row |= {f"{name}s": splits, f"{name}_seconds": seconds, f"{name}_diff": diff}
        rows.append(row)
    return rows


def prefill_flops(context: int, new: int) -> int:
    """Products a causal kernel must take for `new` tokens ending at `context`: query p sees keys 0..p."""
    pairs = new * context - new * (new - 1) // 2
    return 4 * HEADS * HEAD_DIM * pairs


def prefill_table(peak: float, sweep: bool, baseline: str | None) -> list[dict]:
    from gptoss_serve.kernels.varlen_attention import (PREFILL_TILES, PrefillTiles, _multiprocessors, prefill_splits,
                                                       varlen_attention)

    old = None
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_varlen_attention", baseline)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    print(f"\nprefill chunks on a full-attention layer: TFLOP/s against the bf16 matmul's {peak / 1e12:.0f}")
    print(f"{'kernel':>26} {'context':>7} {'new':>5} {'us':>9} {'TFLOP/s':>7} {'%peak':>5} {'error':>8}")
    rows = []
    for context, new in PREFILL_CASES:
        args = decode_inputs(1, context)
        args["q"] = torch.randn(new, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        args["query_start"] = torch.tensor([0, new], device="cuda", dtype=torch.int32)
        splits = prefill_splits(num_tokens=new, tile_tokens=PREFILL_TILES.rows * KV_HEADS // HEADS,
                                kv_heads=KV_HEADS, max_keys=context, multiprocessors=_multiprocessors(args["q"].device))
        variants = [(f"this tree, {splits} splits", PREFILL_TILES, splits)]  # as paged_attention picks
        if splits > 1:
            variants.append(("this tree, unsplit", PREFILL_TILES, 1))
        if old is not None:
            variants.append(("baseline", None, 1))
        if sweep and (context, new) == (32768, CHUNK):
            variants += [(None, PrefillTiles(*t), 1) for t in SWEEP_TILES]
        reference = None
        for name, tiles, num_splits in variants:
            if tiles is None:
                run = lambda: old.varlen_attention(**args, window=None, max_query_len=new)
            else:
                run = lambda: varlen_attention(**args, window=None, max_query_len=new, tiles=tiles,
                                               num_splits=num_splits)
            run()  # compiled, and the split's workspace allocated, before timing
            torch.cuda.synchronize()
            seconds = events_median([run], 20)
            out = run().float()
            if reference is None:  # the first variant's output: the others are compared with it
                reference = out
            error = ((out - reference).norm() / reference.norm()).item()
            label = name or f"{tiles.rows}r {tiles.block_n}n {tiles.warps}w {tiles.stages}s"
            rate = prefill_flops(context, new) / seconds
            rows.append(dict(kernel=label, tiles=None if tiles is None else vars(tiles), splits=num_splits,
                             context=context, new_tokens=new, seconds=seconds, flops=prefill_flops(context, new),
                             difference=error))
            print(f"{label:>26} {context:7d} {new:5d} {seconds * 1e6:9.1f} {rate / 1e12:7.1f} {rate / peak:5.0%} "
                  f"{error:8.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--long-only", action="store_true", help="only the long-context decode table")
    parser.add_argument("--prefill", action="store_true", help="only the prefill-chunk table (TFLOP/s)")
    parser.add_argument("--sweep", action="store_true", help="with --prefill: the tilings at 32k too")
    parser.add_argument("--baseline", help="with --prefill: another tree's kernels/varlen_attention.py, timed beside")
    args = parser.parse_args(argv)
    if args.prefill:
        peak = matmul_peak()
        print(f"{torch.cuda.get_device_name()}: bf16 matmul {peak / 1e12:.0f} TFLOP/s")
        rows = prefill_table(peak, args.sweep, args.baseline)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), matmul_flops_per_s=peak, prefill=rows), f,
                          indent=1)
        return
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy / 1e12:.2f} TB/s")
    rows = [] if args.long_only else engine_table(copy)
    long_rows = long_table(copy)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bytes_per_s=copy, rows=rows,
                           long_decode=long_rows), f, indent=1)


def engine_table(copy: float) -> list[dict]:
    print(f"{'batch':>5} {'context':>7} {'new':>5} {'window':>6} {'us':>8} {'MB':>7} {'GB/s':>6} {'%copy':>5} "
          f"{'ref us':>9} {'error':>8}")
    rows = []
    cases = [(b, c, 1, w) for b in (1, 64, 256) for c in (512, 2048) for w in (None, 128)] + [(1, 2048, 2048, None),
                                                                                             (1, 2048, 2048, 128)]
    for batch, context, new, window in cases:
        row = case(batch, context, new, window)
        rows.append(row)
        rate = row["bytes"] / row["seconds"]
        print(f"{batch:5d} {context:7d} {new:5d} {str(window):>6} {row['seconds'] * 1e6:8.1f} {row['bytes'] / 1e6:7.2f} "
              f"{rate / 1e9:6.0f} {rate / copy:5.0%} {row['reference_seconds'] * 1e6:9.1f} {row['relative_error']:8.1e}",
              flush=True)
    return rows


def long_table(copy: float) -> list[dict]:
    print("\nlong-context decode: the one kernel | split (splits from the tables) | split as a 128k-wide graph picks")
    print(f"{'window':>6} {'context':>7} {'batch':>5} {'MB':>8} | {'us':>7} {'GB/s':>5} {'%copy':>5} | {'n':>3} "
          f"{'us':>7} {'GB/s':>5} {'%copy':>5} | {'n':>3} {'us':>7} {'%copy':>5} | {'gain':>5} {'diff':>7}")
    rows = []
    for context in LONG_CONTEXTS:
        for batch in LONG_BATCHES:
            found = long_decode(batch, context, [None, 128])
            torch.cuda.empty_cache()  # the caches went with the call: room for the next, larger ones
            if found is None:
                print(f"{'':>6} {context:7d} {batch:5d}  skipped: the caches do not fit", flush=True)
                continue
            for row in found:
                rows.append(row)
                rate = {k: row["bytes"] / row[f"{k}_seconds"] for k in ("one_kernel", "split", "graph_split")}
                print(f"{str(row['window']):>6} {context:7d} {batch:5d} {row['bytes'] / 1e6:8.1f} | "
                      f"{row['one_kernel_seconds'] * 1e6:7.1f} {rate['one_kernel'] / 1e9:5.0f} "
                      f"{rate['one_kernel'] / copy:5.0%} | {row['splits']:3d} {row['split_seconds'] * 1e6:7.1f} "
                      f"{rate['split'] / 1e9:5.0f} {rate['split'] / copy:5.0%} | {row['graph_splits']:3d} "
                      f"{row['graph_split_seconds'] * 1e6:7.1f} {rate['graph_split'] / copy:5.0%} | "
                      f"{row['one_kernel_seconds'] / row['split_seconds']:5.2f} {row['split_diff']:7.1e}", flush=True)
    return rows


if __name__ == "__main__":
    main()
