"""The MXFP4 MoE layer for many tokens an expert (prefill): each expert widened to bf16 once a call, then torch's
grouped matrix products on the tensor cores.

With hundreds of tokens an expert the layer is bound by its matrix products, not by the weights' bytes, and the
decode-in-the-loop kernels (mxfp4_moe_kernels.py) reach only about a third of the bf16 peak there: mma.sync on
operands decoded in registers (kernels/NOTES-mxfp4-moe.md). Widening every expert of the layer costs one pass over
its packed bytes and a write of the bf16 ones (~0.7 ms for gpt-oss-20b on an H100), after which torch._grouped_mm
(CUTLASS's Hopper grouped GEMM, wgmma) should do the products near the pace of a dense bf16 matmul. The crossover
with the fused kernels lives in mxfp4_moe.WIDEN_PER_EXPERT, off until `bench.moe_kernel` has timed both on a GPU
(kernels/NOTES-mxfp4-moe.md, "Widened experts for prefill").

One call, none of it waiting on the host (so it can be captured in a CUDA graph):
  sort       the (token, slot) pairs by local expert (moe_sort.py: torch's stable sort, each expert's end by a search)
  gather     the sorted pairs' token rows of hidden
  _widen     gate_up's blocks and scales -> bf16 [E, 2I, H], the checkpoint's row order (skipped where the experts
             hold a bf16 copy beside the packed weights: Mxfp4Experts.keep_bf16_copy, 3x their memory)
  gate_up    torch._grouped_mm(x, widened^T) -> [pairs, 2I] bf16
  _bias_swiglu   + bias of the row's expert, clamped SwiGLU -> act [pairs, I]
  _widen     down's -> bf16 [E, H, I] (in the memory gate_up's widened weights just left)
  down       torch._grouped_mm(act, widened^T) -> [pairs, H]
  _scatter_rows  + bias, times the routing weight -> y[pair] bf16, the rows the launcher's _combine adds up
Pairs routed outside the shard sort after its last expert; the products leave those rows alone and _scatter_rows
writes nothing for them (_combine never reads them).

This module imports Triton: import it only where a CUDA GPU is (or under Triton's CPU interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.moe_sort import expert_ends, sort_by_expert
from gptoss_serve.kernels.mxfp4_moe_kernels import GROUP, _fp4_values, _swiglu

WIDEN_BLOCKS = 64  # 32-value blocks a _widen program decodes: 2,048 values, 4 KiB written


def widen(words: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Block words int32 [E, R, G, 4] (uint8 [E, R, G, 16] viewed as words) and exponents uint8 [E, R, G] ->
    bf16 [E, R, G * 32] (into out, if given), exactly mxfp4_reference.dequantize's values."""
    E, R, G, _ = words.shape
    if out is None:
        out = torch.empty(E, R, G * GROUP, dtype=torch.bfloat16, device=words.device)
    blocks = E * R * G
    _widen[(triton.cdiv(blocks, WIDEN_BLOCKS),)](words, scales, out, blocks, BLOCKS=WIDEN_BLOCKS, num_warps=4)
    return out


def widened_bytes(num_experts: int, hidden: int, inter: int) -> int:
    """The largest widened weight a call holds at once: gate_up's bf16 [E, 2I, H]."""
    return num_experts * 2 * inter * hidden * 2


def grouped_moe(hidden: torch.Tensor, ids: torch.Tensor, route: torch.Tensor, experts, act: torch.Tensor,
                y: torch.Tensor, *, first: int, top_k: int, alpha: float, limit: float) -> None:
    """Fills y [P, H] (bf16, rows by pair index token * K + slot) with (expert(hidden) + bias) * routing weight of
    each pair routed to a local expert; act [P, I] bf16 is scratch. hidden [N, H] bf16, ids / route [P] flat,
    experts a mxfp4_moe.PackedExperts."""
    count, H, I = experts.count, experts.hidden, experts.inter
    P = ids.shape[0]
    sorted_keys, order = sort_by_expert(ids, first, count)
    ends = expert_ends(sorted_keys, count)  # [E]
    x = hidden.index_select(0, order // top_k)  # [P, H], sorted order
    resident = experts.gate_up_widened is not None  # a bf16 copy held beside the packed weights: no widening
    weights = experts.gate_up_widened if resident else widen(experts.gate_up_blocks, experts.gate_up_scales)
    gate_up = torch._grouped_mm(x, weights.transpose(1, 2), offs=ends)  # [P, 2I]: both operands K-major
    del x, weights  # the allocator hands this memory to down's widened weights
    rows = 16
    _bias_swiglu[(triton.cdiv(P, rows), triton.cdiv(I, 256))](
        gate_up, experts.gate_up_bias, sorted_keys, act, P, I, count, alpha, limit, ROWS=rows, BLOCK=256,
        num_warps=4)
    del gate_up
    weights = experts.down_widened if resident else widen(experts.down_blocks, experts.down_scales)  # [E, H, I]
    out = torch._grouped_mm(act, weights.transpose(1, 2), offs=ends)  # [P, H]
    del weights
    _scatter_rows[(triton.cdiv(P, rows), triton.cdiv(H, 256))](
        out, experts.down_bias, sorted_keys, order, route, y, P, H, count, ROWS=rows, BLOCK=256, num_warps=4)


@triton.jit(do_not_specialize=["blocks"])
def _widen(w_ptr, s_ptr, out_ptr, blocks, BLOCKS: tl.constexpr):
    """out[b * 32 + 8 * word + q] = code q of word `word` of block b, times 2 ** (scale[b] - 127), for BLOCKS
    blocks of the flattened [E, R, G] (a word holds eight codes, code q in bits 4q..4q+3)."""
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [B]
    ok = block < blocks
    word = tl.arange(0, 4)
    words = tl.load(w_ptr + block[:, None] * 4 + word[None, :], mask=ok[:, None], other=0)  # [B, 4]
    scale = tl.load(s_ptr + block, mask=ok, other=0)  # [B]
    q = tl.arange(0, 8)
    codes = (words[:, :, None] >> (4 * q[None, None, :])) & 15  # [B, 4, 8]
    values = _fp4_values(codes, scale[:, None, None])
    offsets = block[:, None, None] * 32 + word[None, :, None] * 8 + q[None, None, :]
    tl.store(out_ptr + offsets, values, mask=ok[:, None, None])


@triton.jit(do_not_specialize=["num_rows", "count"])
def _bias_swiglu(gate_up_ptr, bias_ptr, key_ptr, act_ptr, num_rows, inter, count, alpha, limit,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """act[r, j] = swiglu(gate_up[r, 2j] + bias[e, 2j], gate_up[r, 2j + 1] + bias[e, 2j + 1]) in float32, e the
    row's expert (its sort key); rows outside the shard (key == count) are left alone."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    expert = tl.load(key_ptr + rows, mask=rows < num_rows, other=count)
    ok = (expert < count)[:, None] & (cols < inter)[None, :]
    both = 2 * cols[None, :, None] + tl.arange(0, 2)[None, None, :]  # [1, BLOCK, 2]: gate and up side by side
    gate_up = tl.load(gate_up_ptr + rows[:, None, None] * (2 * inter) + both, mask=ok[:, :, None], other=0.0)
    bias = tl.load(bias_ptr + expert[:, None, None] * (2 * inter) + both, mask=ok[:, :, None], other=0.0)
    gate, up = tl.split(gate_up.to(tl.float32) + bias.to(tl.float32))
    act = _swiglu(gate, up, alpha, limit)
    tl.store(act_ptr + rows[:, None] * inter + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["num_rows", "count"])
def _scatter_rows(out_ptr, bias_ptr, key_ptr, order_ptr, route_ptr, y_ptr, num_rows, hidden, count,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """y[pair] = (out[r] + bias[e]) * route[pair] for sorted row r, pair = order[r], e its expert (the sort key), in
    float32 rounded once, as _down's epilogue does; rows outside the shard write nothing."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < num_rows
    expert = tl.load(key_ptr + rows, mask=in_range, other=count)
    pair = tl.load(order_ptr + rows, mask=in_range, other=0)
    mine = expert < count
    ok = mine[:, None] & (cols < hidden)[None, :]
    value = tl.load(out_ptr + rows[:, None] * hidden + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + expert[:, None] * hidden + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    route = tl.load(route_ptr + pair, mask=mine, other=0.0).to(tl.float32)
    y = (value + bias) * route[:, None]
    tl.store(y_ptr + pair[:, None] * hidden + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
