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
instead (flash-decoding: each sequence's keys cut across programs), and every other step to this kernel. A prefill
step with few query tiles over long contexts (a long prompt's short chunk beside decodes) is split here the same
way: a third grid axis cuts each tile's keys into chunks whose programs store float32 partials (running max, sum,
un-normalized output), and `_combine_splits` adds them in chunk order with the sink.

Keys every row of a tile sees (those up to its first token's position, on full-attention layers) are taken in
whole tiles without the causal mask; softmax runs in base 2 (exp2, log2(e) folded into the scale).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.attention_tiles import INTERPRET, LOG2E, NEG, attend_tile, query_group, scale_strides
from gptoss_serve.kernels.split_kv_attention import MAX_SPLITS, decode_splits, split_kv_decode


# Triton compiles a kernel again for each new class of an integer argument (1, a multiple of 16, other): the step's
# own numbers (its tiles per sequence, its tables' width) change from step to step, and each new class would stall a
# serving step for a compile, so they are not specialized on
@triton.jit(do_not_specialize=["num_splits", "min_chunk", "tiles_per_seq", "stride_t"])
def _attention(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, query_start_ptr, context_lens_ptr, sinks_ptr,
               k_scales_ptr, v_scales_ptr, max_ptr, sum_ptr, acc_ptr,
               stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
               stride_sb, stride_ss, stride_on, stride_oh, stride_t, tiles_per_seq, num_splits, min_chunk, scale,
               HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr,
               INTERPRET: tl.constexpr):
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
    qk_scale = scale * LOG2E  # scores in base 2: exp2 is the GPU's own instruction

    last = context - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_Q) - 1  # the tile's last position
    first = context - q_len + tile * BLOCK_Q
    m = tl.full([ROWS], NEG, dtype=tl.float32)
    l = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_t
    begin = 0
    end = last + 1
    if SPLIT:  # this program's chunk of the tile's keys: whole key tiles, the last chunks possibly empty
        chunk = tl.maximum(tl.cdiv(tl.cdiv(last + 1, num_splits), BLOCK_N) * BLOCK_N, min_chunk)
        begin = tl.program_id(2) * chunk
        end = tl.minimum(begin + chunk, last + 1)
    if WINDOW > 0:  # (never split)
        begin = tl.maximum(first - WINDOW + 1, 0)  # keys are looked up one by one: no need to start on a tile edge
    else:
        # every row sees keys 0 .. first: whole tiles of them go without a mask (a long prompt's chunk: nearly all)
        unmasked_end = tl.minimum((first + 1) // BLOCK_N * BLOCK_N, end)
        for start in range(begin, unmasked_end, BLOCK_N):
            m, l, acc = attend_tile(q, m, l, acc, start, position, end, table, k_ptr, v_ptr, k_scales_ptr,
                                     v_scales_ptr, kv_head, d, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                     stride_vh, stride_sb, stride_ss, qk_scale, BLOCK_N=BLOCK_N,
                                     BLOCK_SIZE=BLOCK_SIZE, WINDOW=WINDOW, MASKED=False, FP8=FP8,
                                     INTERPRET=INTERPRET)
        begin = tl.maximum(begin, unmasked_end)
    for start in range(begin, end, BLOCK_N):
        m, l, acc = attend_tile(q, m, l, acc, start, position, end, table, k_ptr, v_ptr, k_scales_ptr,
                                 v_scales_ptr, kv_head, d, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                 stride_vh, stride_sb, stride_ss, qk_scale, BLOCK_N=BLOCK_N, BLOCK_SIZE=BLOCK_SIZE,
                                 WINDOW=WINDOW, MASKED=True, FP8=FP8, INTERPRET=INTERPRET)

    if SPLIT:  # the chunk's running max, sum and un-normalized output (an empty chunk's: NEG, 0, 0)
        slot = ((q_begin + token).to(tl.int64) * HEADS + head) * num_splits + tl.program_id(2)  # [ROWS]
        tl.store(max_ptr + slot, m, mask=row_ok)
        tl.store(sum_ptr + slot, l, mask=row_ok)
        tl.store(acc_ptr + slot[:, None] * D + d[None, :], acc, mask=row_ok[:, None])
    else:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E  # one more logit per head, attending to nothing
        m_final = tl.maximum(m, sink)
        rescale = tl.exp2(m - m_final)
        l = l * rescale + tl.exp2(sink - m_final)
        out = acc * (rescale / l)[:, None]
        tl.store(o_ptr + (q_begin + token).to(tl.int64)[:, None] * stride_on + head[:, None] * stride_oh
                 + d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits", "num_seqs"])
def _combine_splits(o_ptr, query_start_ptr, sinks_ptr, max_ptr, sum_ptr, acc_ptr, stride_on, stride_oh, num_seqs,
                    num_splits, HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """One token's G heads of one KV head: its chunks' partials added in chunk order (the same sum every run), the
    sink joining the denominator, the output in o's dtype."""
    n = tl.program_id(0)
    if n >= tl.load(query_start_ptr + num_seqs):  # a padding row: nobody's
        return
    head = tl.program_id(1) * G + tl.arange(0, G)
    d = tl.arange(0, D)
    base = (n.to(tl.int64) * HEADS + head) * num_splits  # [G]
    m = tl.full([G], NEG, dtype=tl.float32)
    l = tl.zeros([G], dtype=tl.float32)
    acc = tl.zeros([G, D], dtype=tl.float32)
    for split in range(num_splits):
        m_split = tl.load(max_ptr + base + split)
        m_new = tl.maximum(m, m_split)
        old, new = tl.exp2(m - m_new), tl.exp2(m_split - m_new)
        l = l * old + tl.load(sum_ptr + base + split) * new
        acc = acc * old[:, None] + tl.load(acc_ptr + (base + split)[:, None] * D + d[None, :]) * new[:, None]
        m = m_new
    sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E
    m_final = tl.maximum(m, sink)
    rescale = tl.exp2(m - m_final)
    l = l * rescale + tl.exp2(sink - m_final)
    out = acc * (rescale / l)[:, None]
    tl.store(o_ptr + n.to(tl.int64) * stride_on + head[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty))


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
    max_model_len wide), so a captured step stays valid for every context it replays with. A prefill step on a
    full-attention layer with few query tiles over long contexts is split likewise (prefill_splits)."""
    max_keys = block_tables.shape[1] * key_cache.shape[1]
    if max_query_len == 1 and block_tables.shape[0]:
        splits = decode_splits(num_seqs=block_tables.shape[0], kv_heads=key_cache.shape[2],
                               max_keys=min(max_keys, window or max_keys), multiprocessors=_multiprocessors(q.device))
        if splits > 1:
            return split_kv_decode(q, key_cache, value_cache, block_tables=block_tables, query_start=query_start,
                                   context_lens=context_lens, sinks=sinks, window=window, scale=scale,
                                   num_splits=splits, out=out, key_scales=key_scales, value_scales=value_scales)
    splits = 1
    tile_tokens, prefill = _tile_tokens(max_query_len, q.shape[1] // key_cache.shape[2], PREFILL_TILES)
    if window is None and prefill:
        splits = prefill_splits(num_tokens=q.shape[0], tile_tokens=tile_tokens, kv_heads=key_cache.shape[2],
                                max_keys=max_keys, multiprocessors=_multiprocessors(q.device))
    return varlen_attention(q, key_cache, value_cache, block_tables=block_tables, query_start=query_start,
                            context_lens=context_lens, sinks=sinks, window=window, scale=scale,
                            max_query_len=max_query_len, out=out, key_scales=key_scales, value_scales=value_scales,
                            num_splits=splits)


def prefill_splits(*, num_tokens: int, tile_tokens: int, kv_heads: int, max_keys: int, multiprocessors: int) -> int:
    """How many chunks to cut the keys of a prefill step into (1: none). A short prompt chunk over a long context (a
    long prompt's chunk capped by long_prefill_token_threshold, beside decodes) has few query tiles, each walking
    every key: 256 tokens at 128k keys are 16 tiles x 8 KV heads, 128 programs on 132 multiprocessors, one a
    multiprocessor. Cut so that the step's query tiles (counted as if its tokens were one sequence's: decodes
    beside a long chunk add short walks only) fill PREFILL_PROGRAMS_PER_SM a multiprocessor, each chunk at least
    MIN_PREFILL_CHUNK keys (max_keys, the tables' width, bounds every context), at most MAX_SPLITS."""
    tiles = triton.cdiv(num_tokens, tile_tokens) * kv_heads
    wanted = PREFILL_PROGRAMS_PER_SM * multiprocessors // max(1, tiles)
    return max(1, min(wanted, max_keys // MIN_PREFILL_CHUNK, MAX_SPLITS))


def _tile_tokens(max_query_len: int, group: int, tiles: PrefillTiles) -> tuple[int, bool]:
    """(tokens of a program's query tile, whether the step takes prefill tiles). A tile holds whole groups of G
    query heads: 16 rows (the matrix unit's least) when every sequence has at most 16 / G new tokens, tiles.rows
    otherwise."""
    prefill = max_query_len > 16 // group
    return max(1, (tiles.rows if prefill else 16) // group), prefill


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    """How a prefill step (more than 16 rows a KV head) is tiled: `rows` query rows a program (tokens x the G heads
    of a KV head), `block_n` keys a step, the warps of a program and the software pipeline's depth (None: Triton's
    default). The default is the tiling the kernel had before it could be swept; `python -m
    gptoss_serve.bench.paged_attention --prefill --sweep` times others beside it (not yet run on a GPU)."""
    rows: int = 128
    block_n: int = 64
    warps: int = 4
    stages: int | None = None


PREFILL_TILES = PrefillTiles()
# a split prefill chunk reads at least this many keys a KV head (256 KB at D 64 in bf16) against the 33 KB of
# partials a 128-row program writes; programs a multiprocessor that a split step aims for (prefill_splits)
MIN_PREFILL_CHUNK = 1024
PREFILL_PROGRAMS_PER_SM = 4


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter, on the CPU: any number does
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def varlen_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, *,
                     block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                     sinks: torch.Tensor, window: int | None, scale: float, max_query_len: int,
                     out: torch.Tensor | None = None, key_scales: torch.Tensor | None = None,
                     value_scales: torch.Tensor | None = None, tiles: PrefillTiles = PREFILL_TILES,
                     num_splits: int = 1, min_chunk: int = MIN_PREFILL_CHUNK) -> torch.Tensor:
    """paged_attention's arguments in the kernel above; `tiles` for prefill steps (a benchmark's sweep). num_splits
    > 1 (full-attention layers only) cuts each tile's keys into that many chunks, one program each, whose partials
    a second kernel combines (prefill_splits); the partials' float32 workspace is allocated here, so a split step
    is not for capture in a CUDA graph (the engine's prefill steps run eagerly). min_chunk: the fewest keys a chunk
    holds, a multiple of the key tile (small ones let the tests cut short contexts)."""
    N, Hq, D = q.shape
    _, block_size, Hkv, _ = key_cache.shape
    B = block_tables.shape[0]
    out = torch.empty_like(q) if out is None else out
    if N == 0 or B == 0:
        return out
    G = query_group(q, key_cache, value_cache)
    block_q, prefill = _tile_tokens(max_query_len, G, tiles)
    tiles_per_seq = triton.cdiv(max(max_query_len, 1), block_q)
    block_n = tiles.block_n if prefill else 64
    if num_splits > 1 and window is not None:
        raise ValueError("only full-attention layers are split (a window holds too few keys to gain from it)")
    if not 1 <= num_splits <= MAX_SPLITS or min_chunk < block_n or min_chunk % block_n:
        raise ValueError(f"num_splits {num_splits} must be in [1, {MAX_SPLITS}] and min_chunk {min_chunk} a multiple "
                         f"of {block_n}")
    maxes = sums = accs = None
    if num_splits > 1:
        workspace = torch.empty(N * Hq * num_splits * (D + 2), dtype=torch.float32, device=q.device)
        partials = N * Hq * num_splits
        maxes, sums, accs = workspace[:partials], workspace[partials:2 * partials], workspace[2 * partials:]
    stride_sb, stride_ss = scale_strides(key_cache, key_scales, value_scales)
    _attention[(B * tiles_per_seq, Hkv, num_splits)](
        q, key_cache, value_cache, out, block_tables, query_start, context_lens, sinks, key_scales, value_scales,
        maxes, sums, accs, q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), stride_sb, stride_ss,
        out.stride(0), out.stride(1), block_tables.stride(0), tiles_per_seq, num_splits, min_chunk, scale,
        HEADS=Hq, G=G, D=D, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=block_size, WINDOW=window or 0,
        SPLIT=num_splits > 1, FP8=key_scales is not None, INTERPRET=INTERPRET,
        num_warps=tiles.warps if prefill else 4,
        **({"num_stages": tiles.stages} if prefill and tiles.stages is not None else {}))
    if num_splits > 1:
        _combine_splits[(N, Hkv)](out, query_start, sinks, maxes, sums, accs, out.stride(0), out.stride(1), B,
                                  num_splits, HEADS=Hq, G=G, D=D, num_warps=2)
    return out
