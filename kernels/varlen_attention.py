"""Attention of a step's new tokens over the paged KV cache, as one Triton kernel for decode and prefill alike.

The step's tokens are laid end to end: sequence b owns rows query_start[b] : query_start[b + 1] of q [N, Hq, D],
its last positions up to context_lens[b] - 1, and reads its keys and values through block_tables[b] (position p
at block block_tables[b, p // block_size], offset p % block_size). The PyTorch reference with the same arguments is
`paged_attention_reference` in paged_attention.py; this module imports Triton: import it only where a GPU is.

One program takes one KV head and a tile of BLOCK_Q consecutive tokens of one sequence, with the G = Hq / Hkv query
heads that share that KV head: rows = BLOCK_Q * G (token-major), so every key and value tile is loaded once for the
whole group. It walks the keys in tiles of BLOCK_N positions, from the first one its first token can see (the
sliding window) to its last token's position, with an online softmax in float32; each head's sink joins the
denominator at the end. The grid is (B * ceil(max_query_len / BLOCK_Q), Hkv): known on the host without reading
any device value, so a step never waits for the host and can be captured in a CUDA graph; tiles past a sequence's
own length return at once.

An e4m3 cache (with its per-token-head scales, fp8_kv_reference.py) is read through the same kernel compiled with
FP8 on: each tile is converted to q's dtype unscaled, and its power-of-two scales multiply the scores (keys) and
the probabilities (values) they meet (attention_tiles.kv_scales).

`paged_attention` sends a decode step whose few programs would each walk long contexts to split_kv_attention.py
instead (flash-decoding: each sequence's keys cut across programs), and every other step to this kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.attention_tiles import (INTERPRET, NEG, kv_scales, load_kv_tile, query_group,
                                                   scale_strides, tile_dot)
from gptoss_serve.kernels.split_kv_attention import decode_splits, split_kv_decode


@triton.jit
def _attention(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, query_start_ptr, context_lens_ptr, sinks_ptr,
               k_scales_ptr, v_scales_ptr,
               stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
               stride_sb, stride_ss, stride_on, stride_oh, stride_t, tiles_per_seq, scale,
               G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, WINDOW: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    seq = tl.program_id(0) // tiles_per_seq
    tile = tl.program_id(0) % tiles_per_seq
    kv_head = tl.program_id(1)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    if tile * BLOCK_Q >= q_len:
        return
    context = tl.load(context_lens_ptr + seq)

    ROWS: tl.constexpr = BLOCK_Q * G
    r = tl.arange(0, ROWS)
    token = tile * BLOCK_Q + r // G  # the token of each row, within the sequence's new ones
    head = kv_head * G + r % G
    row_ok = token < q_len
    position = context - q_len + token  # [ROWS]
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (q_begin + token).to(tl.int64)[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [ROWS, D]

    last = context - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_Q) - 1  # the tile's last position
    first = context - q_len + tile * BLOCK_Q
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(first - WINDOW + 1, 0)  # keys are looked up one by one: no need to start on a tile edge
    m = tl.full([ROWS], NEG, dtype=tl.float32)
    l = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_t
    for start in range(lo, last + 1, BLOCK_N):
        key_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_ok = key_pos <= last
        block = tl.load(table + key_pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        offset = key_pos % BLOCK_SIZE
        k = load_kv_tile(k_ptr, block, offset, kv_head, d, key_ok, stride_kb, stride_ks, stride_kh, q.dtype)
        v = load_kv_tile(v_ptr, block, offset, kv_head, d, key_ok, stride_vb, stride_vs, stride_vh, q.dtype)
        s = tile_dot(q, tl.trans(k), INTERPRET) * scale  # [ROWS, BLOCK_N]
        if FP8:  # each key's scale on its column of scores (kv_scales)
            s *= kv_scales(k_scales_ptr, block, offset, kv_head, key_ok, stride_sb, stride_ss)[None, :]
        visible = (key_pos[None, :] <= position[:, None]) & key_ok[None, :]
        if WINDOW > 0:
            visible &= position[:, None] - key_pos[None, :] < WINDOW
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        rescale = tl.exp(m - m_new)
        l = l * rescale + tl.sum(p, axis=1)
        if FP8:  # each value's scale on the column of p that meets it
            p *= kv_scales(v_scales_ptr, block, offset, kv_head, key_ok, stride_sb, stride_ss)[None, :]
        acc = acc * rescale[:, None] + tile_dot(p.to(v.dtype), v, INTERPRET)
        m = m_new

    sink = tl.load(sinks_ptr + head).to(tl.float32)  # one more logit per head, attending to nothing
    m_final = tl.maximum(m, sink)
    rescale = tl.exp(m - m_final)
    l = l * rescale + tl.exp(sink - m_final)
    out = acc * (rescale / l)[:, None]
    tl.store(o_ptr + (q_begin + token).to(tl.int64)[:, None] * stride_on + head[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, *,
                    block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                    sinks: torch.Tensor, window: int | None, scale: float, max_query_len: int,
                    out: torch.Tensor | None = None, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [N, Hq, D], caches [blocks, block_size, Hkv, D], block_tables int32 [B, M], query_start int32 [B + 1],
    context_lens int32 [B], sinks [Hq] -> [N, Hq, D]. max_query_len: the most new tokens any sequence has (the
    caller's own number; it sizes the grid). Rows past query_start[B] are left as they are in `out` (uninitialized
    when out is None, where the reference gives zeros). key_scales, value_scales: an e4m3 cache's scale exponents
    (uint8 [blocks, block_size, Hkv], see fp8_kv_reference.py).

    A decode step (max_query_len 1) is split across its keys when that gives the GPU more programs: how many
    splits is decided from host numbers alone, the tables' width bounding every context (a CUDA graph's tables are
    max_model_len wide), so a captured step stays valid for every context it replays with."""
    if max_query_len == 1 and block_tables.shape[0]:
        max_keys = block_tables.shape[1] * key_cache.shape[1]
        splits = decode_splits(num_seqs=block_tables.shape[0], kv_heads=key_cache.shape[2],
                               max_keys=min(max_keys, window or max_keys), multiprocessors=_multiprocessors(q.device))
        if splits > 1:
            return split_kv_decode(q, key_cache, value_cache, block_tables=block_tables, query_start=query_start,
                                   context_lens=context_lens, sinks=sinks, window=window, scale=scale,
                                   num_splits=splits, out=out, key_scales=key_scales, value_scales=value_scales)
    return varlen_attention(q, key_cache, value_cache, block_tables=block_tables, query_start=query_start,
                            context_lens=context_lens, sinks=sinks, window=window, scale=scale,
                            max_query_len=max_query_len, out=out, key_scales=key_scales, value_scales=value_scales)


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter, on the CPU: any number does
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def varlen_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, *,
                     block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                     sinks: torch.Tensor, window: int | None, scale: float, max_query_len: int,
                     out: torch.Tensor | None = None, key_scales: torch.Tensor | None = None,
                     value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """paged_attention's arguments, always in the one kernel above (no split)."""
    N, Hq, D = q.shape
    _, block_size, Hkv, _ = key_cache.shape
    B = block_tables.shape[0]
    out = torch.empty_like(q) if out is None else out
    if N == 0 or B == 0:
        return out
    G = query_group(q, key_cache, value_cache)
    # rows = block_q * G: 16 (the matrix unit's least) for decode, 128 for prefill tiles
    block_q = max(1, (16 if max_query_len <= 16 // G else 128) // G)
    tiles_per_seq = triton.cdiv(max(max_query_len, 1), block_q)
    stride_sb, stride_ss = scale_strides(key_cache, key_scales, value_scales)
    _attention[(B * tiles_per_seq, Hkv)](
        q, key_cache, value_cache, out, block_tables, query_start, context_lens, sinks, key_scales, value_scales,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), stride_sb, stride_ss,
        out.stride(0), out.stride(1), block_tables.stride(0), tiles_per_seq, scale,
        G=G, D=D, BLOCK_Q=block_q, BLOCK_N=64, BLOCK_SIZE=block_size, WINDOW=window or 0,
        FP8=key_scales is not None, INTERPRET=INTERPRET, num_warps=4)
    return out
