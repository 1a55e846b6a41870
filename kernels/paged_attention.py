"""Attention of new tokens over a paged KV cache, with per-head sinks and an optional sliding window.

PyTorch references: decoding sequences (one new token each) all at once, prefill chunks one sequence at a time,
and `paged_attention_reference`, a whole step's tokens end to end with the arguments of the Triton kernel that
replaces it on GPUs (varlen_attention.py), which is tested against it; `store_kv_reference`, the cache write that
kv_store.py does in one kernel.

A cache may be float8 e4m3 (`EngineConfig.kv_cache_dtype: fp8`): then each function takes the caches' scale exponents
(key_scales, value_scales [blocks, block_size, Hkv], see fp8_kv_reference.py), the store quantizes and attention
dequantizes what it gathers to q's dtype, then computes as it does on a cache of that dtype.
"""

from __future__ import annotations

import torch

from gptoss_serve.kernels.fp8_kv_reference import E4M3, quantize_e4m3, read_cache
from gptoss_serve.kernels.sink_attention_reference import sink_attention


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       slots: torch.Tensor, *, key_scales: torch.Tensor | None = None,
                       value_scales: torch.Tensor | None = None) -> None:
    """k, v [N, Hkv, D] into caches [blocks, block_size, Hkv, D] at flat slots [N] (block * block_size + offset);
    into e4m3 caches with their scale exponents [blocks, block_size, Hkv]."""
    check_scales(key_cache, key_scales, value_scales)
    for x, cache, scales in ((k, key_cache, key_scales), (v, value_cache, value_scales)):
        if cache.dtype == E4M3:
            values, exponents = quantize_e4m3(x)
            cache.view(-1, *x.shape[1:])[slots] = values
            scales.view(-1, x.shape[1])[slots] = exponents
        else:
            cache.view(-1, *x.shape[1:])[slots] = x.to(cache.dtype)


def check_scales(key_cache: torch.Tensor, key_scales: torch.Tensor | None, value_scales: torch.Tensor | None) -> None:
    """Scales come with e4m3 caches and with nothing else."""
    fp8 = key_cache.dtype == E4M3
    if fp8 != (key_scales is not None) or fp8 != (value_scales is not None):
        raise ValueError(f"a {key_cache.dtype} KV cache needs {'both' if fp8 else 'no'} key and value scales")


def paged_decode_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    window: int | None,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence, at position context_lens - 1: q [B, Hq, D], caches [blocks, block_size, Hkv, D],
    block_tables [B, M], context_lens [B] -> [B, Hq, D].

    On sliding-window layers only the blocks the window reaches are gathered, so the cost does not grow with
    the context.
    """
    B, Hq, D = q.shape
    block_size, Hkv = key_cache.shape[1], key_cache.shape[2]
    query_pos = context_lens - 1  # [B]
    if window is not None:
        width = min(block_tables.shape[1], -(-window // block_size) + 1)
        first = ((query_pos - window + 1).clamp(min=0) // block_size).clamp(max=block_tables.shape[1] - width)
        columns = first[:, None] + torch.arange(width, device=q.device)  # [B, width]
        block_tables = block_tables.gather(1, columns)
    else:
        first = torch.zeros_like(query_pos)
    keys = read_cache(key_cache, key_scales, block_tables, q.dtype).flatten(1, 2)  # [B, S, Hkv, D]
    values = read_cache(value_cache, value_scales, block_tables, q.dtype).flatten(1, 2)
    key_pos = first[:, None] * block_size + torch.arange(keys.shape[1], device=q.device)  # [B, S]
    visible = key_pos <= query_pos[:, None]
    if window is not None:
        visible &= query_pos[:, None] - key_pos < window
    scores = torch.einsum("bhgd,bshd->bhgs", q.view(B, Hkv, Hq // Hkv, D), keys).float() * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    sink = sinks.float().view(1, Hkv, Hq // Hkv, 1).expand(B, -1, -1, 1)
    logits = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]  # drop the sink
    return torch.einsum("bhgs,bshd->bhgd", probs.to(values.dtype), values).reshape(B, Hq, D)


def paged_prefill_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    block_table: torch.Tensor,
    context_len: int,
    sinks: torch.Tensor,
    window: int | None,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The last T tokens of one sequence of context_len tokens: q [T, Hq, D], block_table [M] -> [T, Hq, D]."""
    T = q.shape[0]
    block_size = key_cache.shape[1]
    blocks = block_table[: -(-context_len // block_size)]
    keys = read_cache(key_cache, key_scales, blocks, q.dtype).flatten(0, 1)[:context_len]  # [ctx, Hkv, D]
    values = read_cache(value_cache, value_scales, blocks, q.dtype).flatten(0, 1)[:context_len]
    positions = torch.arange(context_len, device=q.device)
    return sink_attention(q[None], keys[None], values[None], sinks, q_positions=positions[context_len - T:],
                          k_positions=positions, window=window, scale=scale)[0]


def paged_attention_reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, *,
                              block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                              sinks: torch.Tensor, window: int | None, scale: float,
                              out: torch.Tensor | None = None, key_scales: torch.Tensor | None = None,
                              value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """A step's new tokens laid end to end: q [N, Hq, D]; sequence b owns rows query_start[b] : query_start[b + 1]
    (int [B + 1]), its last positions up to context_lens[b] - 1 (int [B]), read through block_tables[b] (int
    [B, M]). -> [N, Hq, D]; rows past query_start[B] are left as they are in `out` (zeros if out is None).

    Decoding sequences go through paged_decode_reference together, longer chunks one at a time (a host loop).
    key_scales, value_scales: an e4m3 cache's scale exponents.
    """
    check_scales(key_cache, key_scales, value_scales)
    out = torch.zeros_like(q) if out is None else out
    starts, lens = query_start.tolist(), context_lens.tolist()
    tables = block_tables.long()
    options = dict(sinks=sinks, window=window, scale=scale, key_scales=key_scales, value_scales=value_scales)
    decoding = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    if decoding:
        rows = torch.tensor([starts[b] for b in decoding], device=q.device)
        index = torch.tensor(decoding, device=q.device)
        out[rows] = paged_decode_reference(q[rows], key_cache, value_cache, block_tables=tables[index],
                                           context_lens=context_lens.long()[index], **options)
    for b, context_len in enumerate(lens):
        begin, end = starts[b], starts[b + 1]
        if end - begin > 1:
            out[begin:end] = paged_prefill_reference(q[begin:end], key_cache, value_cache, block_table=tables[b],
                                                     context_len=context_len, **options)
    return out
