"""The step's attention kernels (kernels/varlen_attention.py, split_kv_attention.py) at gpt-oss's shape, against the
device's copy bandwidth.

    python -m gptoss_serve.bench.paged_attention [--json PATH] [--long-only]

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
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from gptoss_serve.bench.moe_kernel import copy_bandwidth, eager_mean, events_median, graphed
from gptoss_serve.kernels.paged_attention import paged_attention_reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 64, 8, 64, 16
MAX_MODEL_LEN = 131072  # gpt-oss's: the width of the decode graphs' block tables
LONG_CONTEXTS, LONG_BATCHES = (1024, 8192, 32768, 131072), (1, 16, 64)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--long-only", action="store_true", help="only the long-context decode table")
    args = parser.parse_args(argv)
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
