"""Random paged-attention steps for the tests: sequences' keys and values scattered over shuffled cache blocks,
with the blocks a sliding window left behind replaced by the null block 0, as the block manager does; and the same
step with its caches written into caches of another dtype (an fp8 cache and its scales) by a store function."""

from __future__ import annotations

import math

import torch

from gptoss_serve.kernels.fp8_kv_reference import E4M3, SCALE_DTYPE
from gptoss_serve.kernels.paged_attention import store_kv_reference
from gptoss_serve.kernels.sink_attention_reference import sink_attention


def random_step(seqs: list[tuple[int, int]], *, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                block_size: int = 8, window: int | None = None, dtype=torch.float32, device="cpu", seed: int = 0,
                padding_rows: int = 0):
    """seqs: (context length, new tokens) per sequence -> (kernel arguments, whole-sequence q/k/v for checks).

    q holds the new tokens end to end, then padding_rows more rows that no sequence owns."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(ctx / block_size) for ctx, _ in seqs]
    num_blocks = 1 + sum(blocks_per_seq) + 3
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # never block 0
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen) * 30  # garbage, loud
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen) * 30
    width = max(blocks_per_seq)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    whole, rows = [], []
    for b, ((ctx, new), n_blocks) in enumerate(zip(seqs, blocks_per_seq)):
        k = torch.randn(ctx, kv_heads, head_dim, generator=gen)
        v = torch.randn(ctx, kv_heads, head_dim, generator=gen)
        q = torch.randn(ctx, heads, head_dim, generator=gen)
        mine = [ids.pop() for _ in range(n_blocks)]
        for j, block in enumerate(mine):
            span = slice(j * block_size, min(ctx, (j + 1) * block_size))
            key_cache[block, :span.stop - span.start] = k[span]
            value_cache[block, :span.stop - span.start] = v[span]
        first_query = ctx - new
        for j, block in enumerate(mine):
            # a block no query of this step can see is gone from a sliding-window table
            gone = window is not None and (j + 1) * block_size <= first_query - window + 1
            tables[b, j] = 0 if gone else block
        whole.append((q, k, v))
        rows.append(q[ctx - new:])
    sinks = torch.randn(heads, generator=gen)
    q = torch.cat(rows + [torch.randn(padding_rows, heads, head_dim, generator=gen)])
    query_start = torch.tensor([0, *torch.tensor([n for _, n in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    args = dict(q=q, key_cache=key_cache, value_cache=value_cache, block_tables=tables, query_start=query_start,
                context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32), sinks=sinks, window=window,
                scale=head_dim**-0.5)
    args = {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return args, whole


def long_step(seqs: list[tuple[int, int]], *, heads: int = 64, kv_heads: int = 8, head_dim: int = 64,
              block_size: int = 16, dtype=torch.bfloat16, device="cuda", seed: int = 0, padding_rows: int = 0):
    """random_step's arguments for contexts too long to build whole sequences of (up to 128k), made on the device:
    random caches, each sequence's blocks shuffled; no window."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [math.ceil(ctx / block_size) for ctx, _ in seqs]
    num_blocks = 1 + sum(blocks_per_seq)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    value_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    ids = torch.randperm(num_blocks - 1, generator=gen, device=device).int() + 1
    tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32, device=device)
    taken = 0
    for b, n_blocks in enumerate(blocks_per_seq):
        tables[b, :n_blocks] = ids[taken:taken + n_blocks]
        taken += n_blocks
    new = sum(n for _, n in seqs)
    q = torch.randn(new + padding_rows, heads, head_dim, generator=gen, device=device).to(dtype)
    query_start = torch.tensor([0, *torch.tensor([n for _, n in seqs]).cumsum(0).tolist()], dtype=torch.int32,
                               device=device)
    return dict(q=q, key_cache=key_cache, value_cache=value_cache, block_tables=tables, query_start=query_start,
                context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device),
                sinks=torch.randn(heads, generator=gen, device=device), window=None, scale=head_dim**-0.5)


def expected(seqs, whole, args) -> torch.Tensor:
    """Each sequence's new rows from sink_attention over its whole sequence, float32, end to end."""
    out = []
    for (ctx, new), (q, k, v) in zip(seqs, whole):
        positions = torch.arange(ctx)
        full = sink_attention(q[None], k[None], v[None], args["sinks"].float().cpu(), q_positions=positions,
                              k_positions=positions, window=args["window"], scale=args["scale"])[0]
        out.append(full[ctx - new:])
    return torch.cat(out)


def stored_as(args: dict, dtype: torch.dtype, store=store_kv_reference) -> dict:
    """random_step's arguments with every slot of its caches (garbage included) written through `store` (the
    reference or kernels.kv_store.store_kv) into new caches of dtype, and an e4m3 cache's scales."""
    key_cache, value_cache = args["key_cache"], args["value_cache"]
    shape, device = key_cache.shape, key_cache.device
    caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
    scales = {name: torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device)
              for name in ("key_scales", "value_scales")} if dtype == E4M3 else {}
    slots = torch.arange(shape[0] * shape[1], device=device)
    store(key_cache.reshape(-1, *shape[2:]), value_cache.reshape(-1, *shape[2:]), *caches, slots, **scales)
    return {**args, "key_cache": caches[0], "value_cache": caches[1], **scales}


def captured_wide_decode(args: dict, *, max_model_len: int = 32768) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A decode step of `args` (on a GPU) captured in a CUDA graph with block tables max_model_len wide, as
    cluster/decode_graphs.py captures them: args' tables are replaced by the wide ones (their first columns the old
    ones). -> (the graph, the output it writes on each replay)."""
    from gptoss_serve.kernels.varlen_attention import paged_attention

    narrow = args["block_tables"]
    tables = torch.zeros(narrow.shape[0], max_model_len // args["key_cache"].shape[1], dtype=torch.int32,
                         device=narrow.device)
    tables[:, :narrow.shape[1]] = narrow
    args["block_tables"] = tables
    paged_attention(**args, max_query_len=1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = paged_attention(**args, max_query_len=1)
    return graph, captured
