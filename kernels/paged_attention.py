"""Attention of new tokens over a paged KV cache, with per-head sinks and an optional sliding window.

The PyTorch reference: the Triton kernel that replaces it on GPUs is tested against it.
"""

from __future__ import annotations

import torch

from model.attention import sink_attention


def paged_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    sinks: torch.Tensor,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """q [N, Hq, D]: the new tokens of B sequences laid end to end (sequence b has query_lens[b] of them, the
    last ones of its context_lens[b] tokens); key/value_cache [blocks, block_size, Hkv, D]; block_tables [B, M]
    -> [N, Hq, D]. Decoding sequences (one new token) are done together, longer chunks one by one.
    """
    out = torch.empty_like(q)
    block_size = key_cache.shape[1]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decode = [b for b, n in enumerate(query_lens) if n == 1]
    if decode:
        seqs = torch.tensor(decode, device=q.device)
        tokens = torch.tensor([starts[b] for b in decode], device=q.device)
        lens = torch.tensor([context_lens[b] for b in decode], device=q.device)
        out[tokens] = _decode(q[tokens], key_cache, value_cache, block_tables[seqs], lens, sinks, window, scale)
    for b, n in enumerate(query_lens):
        if n == 1:
            continue
        ctx = context_lens[b]
        blocks = block_tables[b, : -(-ctx // block_size)]
        keys = key_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
        values = value_cache[blocks].flatten(0, 1)[:ctx]
        positions = torch.arange(ctx, device=q.device)
        out[starts[b]:starts[b + 1]] = sink_attention(
            q[None, starts[b]:starts[b + 1]], keys[None], values[None], sinks, q_positions=positions[ctx - n:],
            k_positions=positions, window=window, scale=scale)[0]
    return out


def _decode(q, key_cache, value_cache, block_tables, context_lens, sinks, window, scale):
    """One query per sequence: q [B, Hq, D], block_tables [B, M], context_lens [B] -> [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    keys = key_cache[block_tables].flatten(1, 2)  # [B, M * block_size, Hkv, D]
    values = value_cache[block_tables].flatten(1, 2)
    key_pos = torch.arange(keys.shape[1], device=q.device)  # [S]
    query_pos = (context_lens - 1)[:, None]  # [B, 1]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= query_pos - key_pos < window
    scores = torch.einsum("bhgd,bshd->bhgs", q.view(B, Hkv, Hq // Hkv, D), keys).float() * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    sink = sinks.float().view(1, Hkv, Hq // Hkv, 1).expand(B, -1, -1, 1)
    logits = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.einsum("bhgs,bshd->bhgd", probs.to(values.dtype), values).reshape(B, Hq, D)
