"""The MXFP4 MoE layer's kernels for a handful of tokens: one (token, expert) pair a program, on the CUDA cores.

With fewer tokens than experts nearly every expert a step touches serves one token, and the tensor-core kernels
(mxfp4_moe_kernels.py) spend most of their time on what a matrix unit needs: a 16-row token tile of which one row is
used, the decoded weights' round trip through shared memory, two bf16 multiplies a value pair
(kernels/NOTES-mxfp4-moe.md). Here each program multiplies one token's activations by a tile of its expert's rows
(a matrix-vector product) in float32 on the CUDA cores, and no routing sort is needed: program p reads pair p.

The decode, per 32-bit word of checkpoint blocks (eight FP4 codes, value q in bits 4q..4q+3): codes q and q + 4 sit
16 bits apart, so two shifts, two masks and an or place both codes' bits where an fp16 pair wants them (e,m at bits
11..9, sign at 15), which read as 2**-14 times the code's value (e = 0 lands on an fp16 subnormal, converted
exactly); one conversion a value gives float32. The block's E8M0 exponent and the 2**14 are applied once per
32-value block, to its partial sum: per value that is about two integer operations, a conversion and a multiply-add.

    _gate_up_gemv  per (pair, tile of act columns): act[p] = swiglu(x[token(p)] @ gate_up[expert(p)] + bias)
    _down_gemv     per (pair, tile of output columns): y[p] = (act[p] @ down[expert(p)] + bias) * routing weight
then the launcher's _combine sums each token's rows, in the same fixed order as the other path.

This module imports Triton: import it only where a CUDA GPU is (the reference is `moe_reference.py`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gptoss_serve.kernels.mxfp4_moe_kernels import _swiglu


def _decode_asm() -> str:
    """The decode above as PTX: $8 a word -> $0..$7, values 0..7 as float32, each 2**-14 times the code's value."""
    def pair(q: int) -> str:
        em, sign = 9 - 4 * q, 12 - 4 * q  # shifts bringing code q's e,m bits to 9..11 and its sign to 15
        return "\n".join([f"shl.b32 pt, $8, {em};" if em > 0 else f"shr.b32 pt, $8, {-em};",
                          f"shl.b32 pu, $8, {sign};" if sign else "mov.b32 pu, $8;",
                          "and.b32 pt, pt, 0x0E000E00;", "and.b32 pu, pu, 0x80008000;", "or.b32 pt, pt, pu;",
                          "mov.b32 {lo, hi}, pt;", f"cvt.f32.f16 ${q}, lo;", f"cvt.f32.f16 ${q + 4}, hi;"])

    return "\n".join(["", "{", ".reg .b32 pt, pu;", ".reg .b16 lo, hi;"] + [pair(q) for q in range(4)]) + "\n}\n"


_DECODE_ASM = tl.constexpr(_decode_asm())


@triton.jit
def _code_value(word, q: tl.constexpr):
    """Code q of each word as float32, 2**-14 times its value, in plain Triton (the interpreter's path)."""
    code = (word >> (4 * q)) & 15
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _block_sums(w, x_ptrs, x_mask, USE_ASM: tl.constexpr):
    """Words int32 [R, G, 4] (G blocks of 32 values a row) times the activations of those blocks -> float32 [R, G]:
    each block's sum of value * activation, 2**-14 times too small and before its scale. x_ptrs [G, 4] point at the
    first of each word's eight activations."""
    if USE_ASM:
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _DECODE_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        v0, v1, v2, v3 = _code_value(w, 0), _code_value(w, 1), _code_value(w, 2), _code_value(w, 3)
        v4, v5, v6, v7 = _code_value(w, 4), _code_value(w, 5), _code_value(w, 6), _code_value(w, 7)
    part = v0 * tl.load(x_ptrs + 0, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    part += v1 * tl.load(x_ptrs + 1, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    part += v2 * tl.load(x_ptrs + 2, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    part += v3 * tl.load(x_ptrs + 3, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    part += v4 * tl.load(x_ptrs + 4, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    part += v5 * tl.load(x_ptrs + 5, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    part += v6 * tl.load(x_ptrs + 6, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    part += v7 * tl.load(x_ptrs + 7, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    return tl.sum(part, axis=2)


@triton.jit
def _rows_times_vector(w_ptr, s_ptr, x_ptr, row, row_ok, n_groups, GROUPS: tl.constexpr, USE_ASM: tl.constexpr):
    """float32 [R]: weight rows `row` (int64 [R], rows of [*, n_groups * 32] in blocks) times the vector at x_ptr
    (n_groups * 32 values)."""
    word = tl.arange(0, GROUPS)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    w_ptrs = w_ptr + row[:, None, None] * (n_groups * 4) + word  # [R, G, 4] int32
    s_ptrs = s_ptr + row[:, None] * n_groups + tl.arange(0, GROUPS)[None, :]  # [R, G] uint8
    x_ptrs = x_ptr + tl.arange(0, GROUPS)[:, None] * 32 + tl.arange(0, 4)[None, :] * 8  # [G, 4]
    acc = tl.zeros([row.shape[0]], dtype=tl.float32)
    # each step's weights are loaded a step ahead: with one step in flight a program was latency-bound (~1 TB/s)
    w, s = _load_step(w_ptrs, s_ptrs, 0, n_groups, row_ok, GROUPS)
    for g in range(0, n_groups, GROUPS):
        w_next, s_next = _load_step(w_ptrs, s_ptrs, g + GROUPS, n_groups, row_ok, GROUPS)
        live = (g + tl.arange(0, GROUPS)) < n_groups  # [G]
        sums = _block_sums(w, x_ptrs + g * 32, live[:, None], USE_ASM)  # [R, G]
        scale = ((s.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)  # 2 ** (exponent - 127 + 14)
        acc += tl.sum(sums * scale, axis=1)
        w, s = w_next, s_next
    return acc


@triton.jit
def _load_step(w_ptrs, s_ptrs, g, n_groups, row_ok, GROUPS: tl.constexpr):
    """The words [R, G, 4] and exponents [R, G] of blocks [g, g + GROUPS); blocks past the end read as zeros."""
    live = (g + tl.arange(0, GROUPS)) < n_groups
    w = tl.load(w_ptrs + g * 4, mask=row_ok[:, None, None] & live[None, :, None], other=0)
    s = tl.load(s_ptrs + g, mask=row_ok[:, None] & live[None, :], other=0)
    return w, s


@triton.jit(do_not_specialize=["first"])
def _gate_up_gemv(x_ptr, stride_x, w_ptr, s_ptr, b_ptr, ids_ptr, act_ptr, first, count, hidden, inter, alpha, limit,
                  TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, USE_ASM: tl.constexpr):
    """act[p, cols] = swiglu(x[p // TOP_K] @ gate_up[expert(p)] + bias) for one tile of BLOCK_N act columns: the
    2 * BLOCK_N consecutive weight rows of gate (even) and up (odd). Pairs of experts outside the shard are skipped."""
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int32) - first
    if (expert < 0) | (expert >= count):
        return
    rows = tl.program_id(1) * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    row_ok = rows < 2 * inter
    row = expert.to(tl.int64) * 2 * inter + rows
    token = (pair // TOP_K).to(tl.int64)
    acc = _rows_times_vector(w_ptr, s_ptr, x_ptr + token * stride_x, row, row_ok, hidden // 32, GROUPS, USE_ASM)
    acc += tl.load(b_ptr + row, mask=row_ok, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(acc, [BLOCK_N, 2]))
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    act = _swiglu(gate, up, alpha, limit)
    tl.store(act_ptr + pair.to(tl.int64) * inter + cols, act.to(tl.bfloat16), mask=cols < inter)


@triton.jit(do_not_specialize=["first"])
def _down_gemv(act_ptr, w_ptr, s_ptr, b_ptr, ids_ptr, route_ptr, y_ptr, first, count, inter, hidden,
               BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, USE_ASM: tl.constexpr):
    """y[p, cols] = (act[p] @ down[expert(p)] + bias) * routing weight of p, for one tile of BLOCK_N columns."""
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int32) - first
    if (expert < 0) | (expert >= count):
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    row = expert.to(tl.int64) * hidden + cols
    acc = _rows_times_vector(w_ptr, s_ptr, act_ptr + pair.to(tl.int64) * inter, row, col_ok, inter // 32, GROUPS,
                             USE_ASM)
    y = (acc + tl.load(b_ptr + row, mask=col_ok, other=0.0).to(tl.float32)) * tl.load(route_ptr + pair).to(tl.float32)
    tl.store(y_ptr + pair.to(tl.int64) * hidden + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)
