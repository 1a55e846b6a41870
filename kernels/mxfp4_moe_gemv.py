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

HALF2 (the "gemv_h2" preset) takes the products in packed fp16 pairs instead: a block's decoded pairs (codes q and
q + 4 of each word, each 2**-14 times its value) are multiplied by the matching activation pairs with fma.rn.f16x2,
so one instruction takes two products and the conversion to float32 comes once a 32-value block, not once a value.
The loop then costs 3.8-3.9 instructions a value against 5.4-5.9 (3.4-3.5 with 16 columns a program; counted from
the machine code with bench/kernel_sass.py), of which the decode is ~2. The costs: the activations go in fp16, each
block's products are summed 16 to a lane with fp16's 11-bit rounding (~6e-4 of a row's sum in an fp16 emulation at
gpt-oss's shape; bf16's own output rounding is ~1e-3). The x pairs are built in registers from the bf16 hidden
states, unscaled (a lane's 16 products, each 2**-14 v x, stay far inside fp16 for any x fp16 holds). The act buffer
between the two kernels holds fp16 scaled by 2**ACT_SHIFT, in pair order (value 8w + q + 4h at 8w + 2q + h, so that
one 32-bit load is a word's pair q); the launcher picks ACT_SHIFT from the SwiGLU's clamp, the largest that keeps
the largest act, (limit + 1) * limit, below fp16's 65,504 (10 at gpt-oss's limit of 7), so that the products stay
clear of fp16's subnormals; the block scale takes the shift back out.

This module imports Triton: import it only where a CUDA GPU is (the reference is `moe_reference.py`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gptoss_serve.kernels.l2_prefetch import prefetch_l2_span
from gptoss_serve.kernels.mxfp4_moe_kernels import _swiglu


def _pair_bits_asm(word: str, q: int) -> list[str]:
    """PTX that leaves in `pt` codes q and q + 4 of `word` as an fp16 pair (each 2**-14 times its value), the decode
    above; `pu` is scratch."""
    em, sign = 9 - 4 * q, 12 - 4 * q  # shifts bringing code q's e,m bits to 9..11 and its sign to 15 (q + 4: +16)
    return [f"shl.b32 pt, {word}, {em};" if em > 0 else f"shr.b32 pt, {word}, {-em};",
            f"shl.b32 pu, {word}, {sign};\nand.b32 pu, pu, 0x80008000;" if sign else f"and.b32 pu, {word}, 0x80008000;",
            "and.b32 pt, pt, 0x0E000E00;", "or.b32 pt, pt, pu;"]


def _decode_asm() -> str:
    """The decode above as PTX: $8 a word -> $0..$7, values 0..7 as float32, each 2**-14 times the code's value."""
    def pair(q: int) -> str:
        return "\n".join(_pair_bits_asm("$8", q)
                         + ["mov.b32 {lo, hi}, pt;", f"cvt.f32.f16 ${q}, lo;", f"cvt.f32.f16 ${q + 4}, hi;"])

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


def _block_dot_asm() -> str:
    """A 32-value block's products in fp16 pairs, as PTX: $1..$4 its four words, $5..$20 their activation pairs (word
    j's pair q at $5 + 4j + q: fp16 value 8j + q low, 8j + q + 4 high) -> $0, float32: the sum of code value * 2**-14
    * activation over the block. The products of each pair's two lanes are summed in fp16 (16 a lane), the lanes
    once in float32."""
    def pair(j: int, q: int) -> str:
        x = f"${5 + 4 * j + q}"
        product = f"mul.rn.f16x2 acc, pt, {x};" if j == q == 0 else f"fma.rn.f16x2 acc, pt, {x}, acc;"
        return "\n".join(_pair_bits_asm(f"${1 + j}", q) + [product])

    return "\n".join(["", "{", ".reg .b32 pt, pu, acc;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;"]
                     + [pair(j, q) for j in range(4) for q in range(4)]
                     + ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;",
                        "add.f32 $0, flo, fhi;", "}", ""])


_BLOCK_DOT_ASM = tl.constexpr(_block_dot_asm())


@triton.jit
def _split4(t):
    """t [..., 4] -> its four slices along the last axis, in order (register moves within a thread)."""
    a, b = tl.split(tl.reshape(t, t.shape[:-1] + [2, 2]))  # a: 0 and 2, b: 1 and 3
    a0, a2 = tl.split(a)
    b1, b3 = tl.split(b)
    return a0, b1, a2, b3


@triton.jit
def _fp16_pair(lo, hi):
    """Two fp16 tensors -> int32 words, lo in bits 0..15 and hi in 16..31 (the register layout of an f16x2)."""
    lo_bits = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16) | lo_bits


@triton.jit
def _pair_half(pairs, high: tl.constexpr):
    """One half of int32 f16x2 words as fp16 (the interpreter's path)."""
    bits = (pairs >> 16) if high else pairs
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _half_products(w, pairs, q: tl.constexpr):
    """Codes q and q + 4 of each word times their activations, in fp16 (the interpreter's path) -> float32."""
    lo = _code_value(w, q).to(tl.float16) * _pair_half(pairs, False)
    hi = _code_value(w, q + 4).to(tl.float16) * _pair_half(pairs, True)
    return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _word_dot(w, p0, p1, p2, p3):
    """One word's eight products in fp16 (the interpreter's path) -> float32."""
    return _half_products(w, p0, 0) + _half_products(w, p1, 1) + _half_products(w, p2, 2) + _half_products(w, p3, 3)


@triton.jit
def _word_pairs(pairs):
    """Activation pairs int32 [G, 4 words, 4 pairs] -> 16 tensors [1, G], word-major, broadcastable against [R, G]."""
    q0, q1, q2, q3 = _split4(pairs)  # each [G, 4 words]
    a0, a1, a2, a3 = _split4(q0)
    b0, b1, b2, b3 = _split4(q1)
    c0, c1, c2, c3 = _split4(q2)
    d0, d1, d2, d3 = _split4(q3)
    return (a0[None, :], b0[None, :], c0[None, :], d0[None, :], a1[None, :], b1[None, :], c1[None, :], d1[None, :],
            a2[None, :], b2[None, :], c2[None, :], d2[None, :], a3[None, :], b3[None, :], c3[None, :], d3[None, :])


@triton.jit
def _block_dots(w, pairs, USE_ASM: tl.constexpr):
    """Words int32 [R, G, 4] and their activation pairs int32 [G, 4 words, 4 pairs] -> float32 [R, G]: each block's
    sum of value * 2**-14 * activation, its products rounded as fp16 pairs."""
    w0, w1, w2, w3 = _split4(w)  # [R, G] each
    x00, x01, x02, x03, x10, x11, x12, x13, x20, x21, x22, x23, x30, x31, x32, x33 = _word_pairs(pairs)
    if USE_ASM:
        shape: tl.constexpr = w0.shape
        return tl.inline_asm_elementwise(
            _BLOCK_DOT_ASM, "=f" + ",r" * 20,
            [w0, w1, w2, w3, tl.broadcast_to(x00, shape), tl.broadcast_to(x01, shape), tl.broadcast_to(x02, shape),
             tl.broadcast_to(x03, shape), tl.broadcast_to(x10, shape), tl.broadcast_to(x11, shape),
             tl.broadcast_to(x12, shape), tl.broadcast_to(x13, shape), tl.broadcast_to(x20, shape),
             tl.broadcast_to(x21, shape), tl.broadcast_to(x22, shape), tl.broadcast_to(x23, shape),
             tl.broadcast_to(x30, shape), tl.broadcast_to(x31, shape), tl.broadcast_to(x32, shape),
             tl.broadcast_to(x33, shape)],
            dtype=tl.float32, is_pure=True, pack=1)
    return (_word_dot(w0, x00, x01, x02, x03) + _word_dot(w1, x10, x11, x12, x13)
            + _word_dot(w2, x20, x21, x22, x23) + _word_dot(w3, x30, x31, x32, x33))


@triton.jit
def _rows_times_pairs(w_ptr, s_ptr, x_ptr, row, row_ok, n_groups, X_PAIRS: tl.constexpr, SHIFT: tl.constexpr,
                      GROUPS: tl.constexpr, USE_ASM: tl.constexpr):
    """_rows_times_vector in fp16 pairs. The vector at x_ptr: bf16 (n_groups * 32 values) when not X_PAIRS, turned
    into pairs here; else int32 f16x2 words in pair order, scaled by 2**SHIFT (which the block scale takes out)."""
    word = tl.arange(0, GROUPS)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    w_ptrs = w_ptr + row[:, None, None] * (n_groups * 4) + word  # [R, G, 4] int32
    s_ptrs = s_ptr + row[:, None] * n_groups + tl.arange(0, GROUPS)[None, :]  # [R, G] uint8
    if X_PAIRS:  # [G, 4 words, 4 pairs]: a block's 16 pairs are contiguous (pair q of word w at 4w + q)
        x_offs = tl.arange(0, GROUPS)[:, None, None] * 16 + tl.arange(0, 4)[None, :, None] * 4 \
            + tl.arange(0, 4)[None, None, :]
    else:  # [G, 4 words, 4 pairs, 2 halves]: value 8w + q + 4h of the block
        x_offs = tl.arange(0, GROUPS)[:, None, None, None] * 32 + tl.arange(0, 4)[None, :, None, None] * 8 \
            + tl.arange(0, 4)[None, None, :, None] + tl.arange(0, 2)[None, None, None, :] * 4
    # summed over the blocks of a step after the loop, not in it (in it, each step paid a cross-thread reduction)
    acc = tl.zeros([row.shape[0], GROUPS], dtype=tl.float32)
    w, s = _load_step(w_ptrs, s_ptrs, 0, n_groups, row_ok, GROUPS)
    for g in range(0, n_groups, GROUPS):
        w_next, s_next = _load_step(w_ptrs, s_ptrs, g + GROUPS, n_groups, row_ok, GROUPS)
        live = (g + tl.arange(0, GROUPS)) < n_groups  # [G]
        if X_PAIRS:
            pairs = tl.load(x_ptr + g * 16 + x_offs, mask=live[:, None, None], other=0)
        else:
            halves = tl.load(x_ptr + g * 32 + x_offs, mask=live[:, None, None, None], other=0.0).to(tl.float16)
            lo, hi = tl.split(halves)
            pairs = _fp16_pair(lo, hi)
        sums = _block_dots(w, pairs, USE_ASM)  # [R, G]
        scale = ((s.to(tl.int32) + (14 - SHIFT)) << 23).to(tl.float32, bitcast=True)  # 2**(exponent-127+14-SHIFT)
        acc += sums * scale
        w, s = w_next, s_next
    return tl.sum(acc, axis=1)


@triton.jit
def _prefetch_tile(w_ptr, s_ptr, first_row, num_rows, n_groups, PREFETCH: tl.constexpr):
    """With PREFETCH: asks L2 for a program's whole row tile before its loop, blocks and exponents (each one
    contiguous run: the tile's rows are consecutive), so that the loop's loads find them there (l2_prefetch.py)."""
    if PREFETCH:
        if num_rows > 0:
            prefetch_l2_span(w_ptr + first_row * (n_groups * 4), num_rows * n_groups * 16)
            prefetch_l2_span(s_ptr + first_row * n_groups, num_rows * n_groups)


@triton.jit
def _pair_order(cols):
    """Where act column c sits in pair order: value 8w + q + 4h at 8w + 2q + h."""
    return (cols // 8) * 8 + (cols % 4) * 2 + (cols % 8) // 4


@triton.jit(do_not_specialize=["first"])
def _gate_up_gemv(x_ptr, stride_x, w_ptr, s_ptr, b_ptr, ids_ptr, act_ptr, down_w_ptr, down_s_ptr, first, count,
                  hidden, inter, alpha, limit,
                  TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, USE_ASM: tl.constexpr,
                  HALF2: tl.constexpr = False, ACT_SHIFT: tl.constexpr = 0, PREFETCH: tl.constexpr = False,
                  PREFETCH_DOWN: tl.constexpr = False):
    """act[p, cols] = swiglu(x[p // TOP_K] @ gate_up[expert(p)] + bias) for one tile of BLOCK_N act columns: the
    2 * BLOCK_N consecutive weight rows of gate (even) and up (odd). Pairs of experts outside the shard are skipped.
    HALF2: the products in fp16 pairs, act stored as fp16 times 2**ACT_SHIFT, in pair order (the module's doc).
    PREFETCH: the tile's weights asked of L2 first (_prefetch_tile). PREFETCH_DOWN: once done, the program asks L2
    for its share of the same expert's down rows (down_w_ptr / down_s_ptr: [E, hidden, inter / 32] blocks and
    exponents), so that _down_gemv finds them there: program j of the n along axis 1 takes rows
    [j * ceil(hidden / n), ...)."""
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int32) - first
    if (expert < 0) | (expert >= count):
        return
    row0 = tl.program_id(1) * 2 * BLOCK_N
    rows = row0 + tl.arange(0, 2 * BLOCK_N)
    row_ok = rows < 2 * inter
    row = expert.to(tl.int64) * 2 * inter + rows
    _prefetch_tile(w_ptr, s_ptr, expert.to(tl.int64) * 2 * inter + row0, tl.minimum(2 * BLOCK_N, 2 * inter - row0),
                   hidden // 32, PREFETCH)
    token = (pair // TOP_K).to(tl.int64)
    if HALF2:
        acc = _rows_times_pairs(w_ptr, s_ptr, x_ptr + token * stride_x, row, row_ok, hidden // 32, False, 0, GROUPS,
                                USE_ASM)
    else:
        acc = _rows_times_vector(w_ptr, s_ptr, x_ptr + token * stride_x, row, row_ok, hidden // 32, GROUPS, USE_ASM)
    acc += tl.load(b_ptr + row, mask=row_ok, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(acc, [BLOCK_N, 2]))
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    act = _swiglu(gate, up, alpha, limit)
    if HALF2:  # fp16 bits in the bf16 buffer, for _down_gemv's pair loads
        half = (act * (1 << ACT_SHIFT)).to(tl.float16).to(tl.bfloat16, bitcast=True)
        tl.store(act_ptr + pair.to(tl.int64) * inter + _pair_order(cols), half, mask=cols < inter)
    else:
        tl.store(act_ptr + pair.to(tl.int64) * inter + cols, act.to(tl.bfloat16), mask=cols < inter)
    if PREFETCH_DOWN:
        share = tl.cdiv(hidden, tl.num_programs(1))
        down0 = tl.program_id(1) * share
        _prefetch_tile(down_w_ptr, down_s_ptr, expert.to(tl.int64) * hidden + down0,
                       tl.maximum(tl.minimum(share, hidden - down0), 0), inter // 32, True)


@triton.jit(do_not_specialize=["first"])
def _down_gemv(act_ptr, w_ptr, s_ptr, b_ptr, ids_ptr, route_ptr, y_ptr, first, count, inter, hidden,
               BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, USE_ASM: tl.constexpr, HALF2: tl.constexpr = False,
               ACT_SHIFT: tl.constexpr = 0, PREFETCH: tl.constexpr = False):
    """y[p, cols] = (act[p] @ down[expert(p)] + bias) * routing weight of p, for one tile of BLOCK_N columns.
    HALF2: act_ptr is int32, act as _gate_up_gemv's HALF2 stored it (f16x2 words, pair order, 2**ACT_SHIFT).
    PREFETCH as in _gate_up_gemv."""
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int32) - first
    if (expert < 0) | (expert >= count):
        return
    col0 = tl.program_id(1) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    row = expert.to(tl.int64) * hidden + cols
    _prefetch_tile(w_ptr, s_ptr, expert.to(tl.int64) * hidden + col0, tl.minimum(BLOCK_N, hidden - col0),
                   inter // 32, PREFETCH)
    if HALF2:
        acc = _rows_times_pairs(w_ptr, s_ptr, act_ptr + pair.to(tl.int64) * (inter // 2), row, col_ok, inter // 32,
                                True, ACT_SHIFT, GROUPS, USE_ASM)
    else:
        acc = _rows_times_vector(w_ptr, s_ptr, act_ptr + pair.to(tl.int64) * inter, row, col_ok, inter // 32,
                                 GROUPS, USE_ASM)
    y = (acc + tl.load(b_ptr + row, mask=col_ok, other=0.0).to(tl.float32)) * tl.load(route_ptr + pair).to(tl.float32)
    tl.store(y_ptr + pair.to(tl.int64) * hidden + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)
