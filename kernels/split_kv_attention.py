"""Decode attention over the paged KV cache with each sequence's keys split across programs (flash-decoding).

The one-kernel path (varlen_attention.py) gives a decoding sequence one program per KV head, walking its whole
context: batch 1 at a 32k context runs 8 programs on a GPU of 132 multiprocessors. Here each sequence's visible keys
(the last `window` positions on a sliding layer, all of them on a full one) are cut into num_splits contiguous
chunks, one program per (sequence, KV head, chunk). A program attends the G = Hq / Hkv query heads of its KV head
(rows padded to 16, the matrix unit's least) to its chunk and stores, in float32, each row's max logit, its sum of
exponentials and its un-normalized output (in base 2, its tiles folded by attention_tiles.attend_tile as the
one-kernel path folds its own). A second kernel, one program per (sequence, query head), combines the chunks in a
fixed order (the same sum every run), adds the head's sink to the denominator as the one-kernel path does, and
writes the output in q's dtype. An e4m3 cache is read as the one-kernel path reads it. The PyTorch reference is
`paged_attention_reference` (paged_attention.py).

The grid, (B, Hkv, num_splits), is chosen on the host from host numbers only (no device value is read, so a step
can be captured in a CUDA graph): a CUDA graph's step knows only its block tables' width, max_model_len. The chunk
length is computed on the device from each sequence's own context: ceil(keys / num_splits), rounded up to whole key
tiles and to at least MIN_CHUNK keys, so a short sequence uses few chunks and the programs of chunks past its keys
return at once (the combine reads only the chunks used). This module imports Triton: import it only where a GPU is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.attention_tiles import INTERPRET, LOG2E, NEG, attend_tile, query_group, scale_strides

BLOCK_N = 64  # keys per tile of the walk
# a chunk reads at least this many keys a KV head (64 KB at D 64 in bf16), against the 2 KB of partials its program
# writes and the combine reads back: the split's own traffic stays a few percent
MIN_CHUNK = 256
# programs of a decode step per multiprocessor: one wave that fills every one. Measured on an H100 (132 of them) at a
# 32k context: batch 64 unsplit (512 programs) reads at 99% of copy bandwidth and cut in 2 at 79%; batch 32 at 74%
# unsplit and 98% cut in 2; batch 16 at 42% unsplit, 97% cut in 4, 77% in 8
PROGRAMS_PER_SM = 4
MAX_SPLITS = 128  # bounds the partials and the combine's tile (its compiled variants: one per power of two)


@triton.jit
def _chunking(context, num_splits, min_chunk, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first visible key, keys per chunk) of a decoding sequence of `context` tokens, its new one the last."""
    first = 0
    if WINDOW > 0:
        first = tl.maximum(context - WINDOW, 0)
    chunk = tl.cdiv(tl.cdiv(context - first, num_splits), BLOCK_N) * BLOCK_N
    return first, tl.maximum(chunk, min_chunk)


# one compiled kernel whatever the host picks, and whatever the tables' width (see varlen_attention._attention)
@triton.jit(do_not_specialize=["num_splits", "min_chunk", "stride_t"])
def _partial_attention(q_ptr, k_ptr, v_ptr, tables_ptr, query_start_ptr, context_lens_ptr, k_scales_ptr, v_scales_ptr,
                       max_ptr, sum_ptr, acc_ptr,
                       stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                       stride_sb, stride_ss, stride_t, num_splits, min_chunk, scale,
                       HEADS: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, WINDOW: tl.constexpr, FP8: tl.constexpr,
                       INTERPRET: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) == q_row:  # no new token this step
        return
    context = tl.load(context_lens_ptr + seq)
    first, chunk = _chunking(context, num_splits, min_chunk, WINDOW, BLOCK_N)
    begin = first + split * chunk
    if begin >= context:  # a chunk past this sequence's keys
        return
    end = tl.minimum(begin + chunk, context)  # every key in [begin, end) is visible to the new token

    r = tl.arange(0, ROWS)
    row_ok = r < G
    head = kv_head * G + r
    d = tl.arange(0, D)
    q = tl.load(q_ptr + q_row.to(tl.int64) * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [ROWS, D]
    m = tl.full([ROWS], NEG, dtype=tl.float32)
    l = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_t
    position = tl.full([ROWS], context - 1, dtype=tl.int32)  # the new token's: it sees every key of the chunk
    for start in range(begin, end, BLOCK_N):  # the window is in [begin, end) already
        m, l, acc = attend_tile(q, m, l, acc, start, position, end, table, k_ptr, v_ptr, k_scales_ptr, v_scales_ptr,
                                kv_head, d, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                stride_sb, stride_ss, scale * LOG2E, BLOCK_N=BLOCK_N, BLOCK_SIZE=BLOCK_SIZE,
                                WINDOW=0, MASKED=True, FP8=FP8, INTERPRET=INTERPRET)

    slot = (seq.to(tl.int64) * HEADS + head) * num_splits + split  # [ROWS]: this chunk's entry of each head
    tl.store(max_ptr + slot, m, mask=row_ok)
    tl.store(sum_ptr + slot, l, mask=row_ok)
    tl.store(acc_ptr + slot[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits", "min_chunk"])
def _combine_chunks(o_ptr, query_start_ptr, context_lens_ptr, sinks_ptr, max_ptr, sum_ptr, acc_ptr,
                    stride_on, stride_oh, num_splits, min_chunk,
                    HEADS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                    WINDOW: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) == q_row:
        return
    context = tl.load(context_lens_ptr + seq)
    first, chunk = _chunking(context, num_splits, min_chunk, WINDOW, BLOCK_N)
    used = tl.cdiv(context - first, chunk)  # the chunks whose programs wrote partials; the rest hold nothing
    c = tl.arange(0, SPLITS)
    c_ok = c < used
    slot = (seq.to(tl.int64) * HEADS + head) * num_splits + c  # [SPLITS]
    d = tl.arange(0, D)
    m = tl.load(max_ptr + slot, mask=c_ok, other=float("-inf"))
    l = tl.load(sum_ptr + slot, mask=c_ok, other=0.0)
    acc = tl.load(acc_ptr + slot[:, None] * D + d[None, :], mask=c_ok[:, None], other=0.0)  # [SPLITS, D]

    sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E  # one more logit per head, attending to nothing
    m_final = tl.maximum(tl.max(m, axis=0), sink)
    weight = tl.exp2(m - m_final)  # 0 for unused chunks
    total = tl.sum(l * weight, axis=0) + tl.exp2(sink - m_final)
    out = tl.sum(acc * weight[:, None], axis=0) / total  # [D]
    tl.store(o_ptr + q_row.to(tl.int64) * stride_on + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def decode_splits(*, num_seqs: int, kv_heads: int, max_keys: int, multiprocessors: int) -> int:
    """How many chunks to cut each decoding sequence's keys into: the most that keep the step's programs within
    PROGRAMS_PER_SM a multiprocessor, but no more than max_keys (a host bound on the keys any new token sees) fills at
    MIN_CHUNK keys a chunk, nor MAX_SPLITS. 1 means splitting would not help (programs enough, or keys too few)."""
    wanted = PROGRAMS_PER_SM * multiprocessors // (num_seqs * kv_heads)
    return max(1, min(wanted, triton.cdiv(max_keys, MIN_CHUNK), MAX_SPLITS))


def workspace_numel(*, num_seqs: int, heads: int, head_dim: int, num_splits: int) -> int:
    """float32 elements of the partials: a max, a sum and head_dim outputs per (sequence, head, chunk)."""
    return num_seqs * heads * num_splits * (head_dim + 2)


def split_kv_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, *,
                    block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                    sinks: torch.Tensor, window: int | None, scale: float, num_splits: int,
                    out: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                    min_chunk: int = MIN_CHUNK, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """paged_attention's arguments (varlen_attention.py) for a decode step: each sequence has one new token or none
    (query_start's steps are 0 or 1). num_splits: the most chunks a sequence's keys are cut into (decode_splits).
    workspace: float32 scratch of at least workspace_numel elements (allocated when None). min_chunk: the fewest keys
    a chunk holds, a multiple of BLOCK_N (small ones let the tests cut short sequences). key_scales, value_scales: an
    e4m3 cache's scale exponents (its chunks are dequantized as they are loaded, as in the one-kernel path)."""
    N, Hq, D = q.shape
    _, block_size, Hkv, _ = key_cache.shape
    B = block_tables.shape[0]
    out = torch.empty_like(q) if out is None else out
    if N == 0 or B == 0:
        return out
    G = query_group(q, key_cache, value_cache)
    if not 1 <= num_splits <= MAX_SPLITS or min_chunk < BLOCK_N or min_chunk % BLOCK_N:
        raise ValueError(f"num_splits {num_splits} must be in [1, {MAX_SPLITS}] and min_chunk {min_chunk} a multiple "
                         f"of {BLOCK_N}")
    numel = workspace_numel(num_seqs=B, heads=Hq, head_dim=D, num_splits=num_splits)
    if workspace is None:
        workspace = torch.empty(numel, dtype=torch.float32, device=q.device)
    elif workspace.dtype != torch.float32 or workspace.numel() < numel:
        raise ValueError(f"the workspace needs {numel} float32 elements, got {workspace.numel()} {workspace.dtype}")
    partials = B * Hq * num_splits
    maxes, sums, accs = workspace[:partials], workspace[partials:2 * partials], workspace[2 * partials:numel]
    window = window or 0
    stride_sb, stride_ss = scale_strides(key_cache, key_scales, value_scales)
    _partial_attention[(B, Hkv, num_splits)](
        q, key_cache, value_cache, block_tables, query_start, context_lens, key_scales, value_scales,
        maxes, sums, accs, q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), stride_sb, stride_ss,
        block_tables.stride(0), num_splits, min_chunk, scale,
        HEADS=Hq, G=G, ROWS=max(16, G), D=D, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size, WINDOW=window,
        FP8=key_scales is not None, INTERPRET=INTERPRET, num_warps=4)
    _combine_chunks[(B, Hq)](
        out, query_start, context_lens, sinks, maxes, sums, accs, out.stride(0), out.stride(1), num_splits, min_chunk,
        HEADS=Hq, D=D, SPLITS=max(2, triton.next_power_of_2(num_splits)), BLOCK_N=BLOCK_N, WINDOW=window,
        num_warps=1)
    return out
