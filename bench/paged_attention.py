"""The step's attention kernel (kernels/varlen_attention.py) at gpt-oss's shape, against the device's copy bandwidth.

    python -m gptoss_serve.bench.paged_attention [--json PATH]

One layer's attention (64 query heads, 8 KV heads, head dim 64, blocks of 16, bf16) for decode batches of 1, 64 and
256 sequences at contexts 512 and 2,048, on full and sliding-window (128) layers, and one 2,048-token prefill chunk.
Each case's time is the median of CUDA-graph replays timed with events (bench/moe_kernel.py's helpers); bytes are
the keys and values the kernel must read (the window's, on sliding layers) plus q and the output; the fraction is
of a 1 GiB device-to-device copy measured in the same run. The PyTorch reference's eager time is printed beside it.
"""

from __future__ import annotations

import argparse
import json

import torch

from gptoss_serve.bench.moe_kernel import copy_bandwidth, eager_mean, events_median, graphed
from gptoss_serve.kernels.paged_attention import paged_attention_reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 64, 8, 64, 16


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
    keys_read = min(context, (window or context) + new - 1)
    nbytes = batch * keys_read * KV_HEADS * HEAD_DIM * 2 * 2 + 2 * q.numel() * 2
    return dict(batch=batch, context=context, new_tokens=new, window=window, seconds=seconds, bytes=nbytes,
                reference_seconds=reference_s, relative_error=error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy / 1e12:.2f} TB/s")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bytes_per_s=copy, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
