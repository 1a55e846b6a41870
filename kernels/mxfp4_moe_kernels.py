"""The Triton kernels of the MXFP4 MoE layer; `mxfp4_moe.py` (the launcher) says what each does and calls them.

This module imports Triton: import it only where a CUDA GPU is (the reference is `moe_reference.py`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gptoss_serve.kernels.l2_prefetch import prefetch_first_windows, prefetch_l2, prefetch_next_window

GROUP = 32  # values per MXFP4 block (one scale)
# _combine adds a token's slots in 8 groups of experts, then the groups up a fixed tree: the order an expert-parallel
# split into 1, 2, 4 or 8 workers can reproduce exactly
SUM_GROUPS: tl.constexpr = tl.constexpr(8)

# One 32-bit word of checkpoint blocks (eight FP4 codes, value q in bits 4q..4q+3) and its block's E8M0 exponent ->
# the eight values as bf16 bits, $0..$7 in order; $8 the word, $9 the exponent. Codes q and q + 4 sit 16 bits apart,
# so one shift and mask puts both where a bf16x2 pair wants them: e,m bits to bf16 bits 8..6 of each half, sign to
# bit 15. Those bits read as 2**-126 times the code's value (e = 0 lands on a subnormal: 0.5 -> 2**-127), so a
# multiply by 2**126 restores it (mul.bf16x2 keeps subnormal inputs), then one by 2 ** (exponent - 127).
# Per pair of values: 2 shifts, 2 ands and an or (ptxas merges these into LOP3s), 2 bf16x2 multiplies.

def _decode_asm() -> str:
    """That decode as PTX, built a pair of codes (q, q + 4) at a time: only the shifts differ between pairs."""
    def pair(q: int) -> str:
        lo, hi = 6 - 4 * q, 12 - 4 * q  # shifts that bring code q's e,m bits to bf16 bits 8..6, its sign to 15
        return "\n".join([f"shl.b32 pt, $8, {lo};" if lo > 0 else f"shr.b32 pt, $8, {-lo};",
                          f"shl.b32 pu, $8, {hi};" if hi else "mov.b32 pu, $8;",
                          "and.b32 pt, pt, 0x01C001C0;", "and.b32 pu, pu, 0x80008000;", "or.b32 pt, pt, pu;",
                          "mul.rn.bf16x2 pt, pt, pbias;", "mul.rn.bf16x2 pt, pt, pscale;",
                          f"mov.b32 {{${q}, ${q + 4}}}, pt;"])

    head = ["", "{", ".reg .b32 pt, pu, pbias, pscale;", "mov.b32 pbias, 0x7E807E80;", "shl.b32 pscale, $9, 7;",
            "prmt.b32 pscale, pscale, 0, 0x1010;"]
    return "\n".join(head + [pair(q) for q in range(4)]) + "\n}\n"


_DECODE_ASM = tl.constexpr(_decode_asm())


@triton.jit(do_not_specialize=["num_pairs", "first"])
def _route(ids_ptr, num_pairs, first, count, sorted_ptr, start_ptr,
           EXPERTS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Counting sort of pairs by local expert (stable: by pair index within an expert). One program."""
    experts = tl.arange(0, EXPERTS_PAD)
    counts = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    for begin in range(0, num_pairs, BLOCK):
        offs = begin + tl.arange(0, BLOCK)
        local = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32) - first
        valid = (offs < num_pairs) & (local >= 0) & (local < count)
        onehot = ((local[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)  # [BLOCK, EXPERTS_PAD]
        counts += tl.sum(onehot, axis=0)
    ends = tl.cumsum(counts, axis=0)
    starts = ends - counts
    tl.store(start_ptr + experts, starts, mask=experts < count)
    tl.store(start_ptr + count, tl.sum(counts, axis=0))
    running = starts
    for begin in range(0, num_pairs, BLOCK):
        offs = begin + tl.arange(0, BLOCK)
        local = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32) - first
        valid = (offs < num_pairs) & (local >= 0) & (local < count)
        onehot = ((local[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0)  # inclusive count of earlier pairs of the same expert in this block
        position = tl.sum(onehot * (running[None, :] + rank - 1), axis=1)  # [BLOCK]
        tl.store(sorted_ptr + position, offs, mask=valid)
        running += tl.sum(onehot, axis=0)


@triton.jit
def _tile(start_ptr, count, pid, BLOCK_M: tl.constexpr, EXPERTS_PAD: tl.constexpr):
    """Program pid's row tile: (local expert, first sorted row, end of that expert's rows); expert >= count when
    pid is past the last tile (the grid is an upper bound, known without reading the counts)."""
    e = tl.arange(0, EXPERTS_PAD)
    live = e < count
    lo = tl.load(start_ptr + e, mask=live, other=0)
    hi = tl.load(start_ptr + e + 1, mask=live, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)
    expert = tl.sum((ends <= pid).to(tl.int32), axis=0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, ends - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(mine, lo, 0), axis=0) + (pid - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), axis=0)
    return expert, row0, row_end


@triton.jit
def _fp4_values(code, scale):
    """FP4 codes (0..15, any int type) and their E8M0 exponents -> bf16 values, in plain Triton (the interpreter's
    path). The code's bits placed as fp16 read 2**-14 times its value (0.5 is an fp16 subnormal, converted exactly)."""
    bits = ((code & 7).to(tl.uint16) << 9) | ((code & 8).to(tl.uint16) << 12)
    value = bits.to(tl.float16, bitcast=True).to(tl.float32)
    multiplier = ((scale.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)  # 2 ** (scale - 127 + 14)
    return (value * multiplier).to(tl.bfloat16)


@triton.jit
def _dequant(w, s, USE_ASM: tl.constexpr):
    """Block words int32 [R, G, 4] and their blocks' exponents uint8 [R, G, 1] -> values bf16 [R, G * 32], in order."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1] * 32
    if USE_ASM:
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _DECODE_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, tl.broadcast_to(s.to(tl.int32), w.shape)],
            dtype=(tl.int16,) * 8, is_pure=True, pack=1)
        v0, v1, v2, v3 = (v0.to(tl.bfloat16, bitcast=True), v1.to(tl.bfloat16, bitcast=True),
                          v2.to(tl.bfloat16, bitcast=True), v3.to(tl.bfloat16, bitcast=True))
        v4, v5, v6, v7 = (v4.to(tl.bfloat16, bitcast=True), v5.to(tl.bfloat16, bitcast=True),
                          v6.to(tl.bfloat16, bitcast=True), v7.to(tl.bfloat16, bitcast=True))
    else:
        v0, v1, v2, v3 = (_fp4_values(w & 15, s), _fp4_values((w >> 4) & 15, s),
                          _fp4_values((w >> 8) & 15, s), _fp4_values((w >> 12) & 15, s))
        v4, v5, v6, v7 = (_fp4_values((w >> 16) & 15, s), _fp4_values((w >> 20) & 15, s),
                          _fp4_values((w >> 24) & 15, s), _fp4_values((w >> 28) & 15, s))
    # joins add a last axis of 2 inside each thread's registers: [R, G, 4, q2, q1, q0] holds value 4*q2 + 2*q1 + q0
    v = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(v, [R, C])


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter's bf16 dot is wrong; its float32 one is exact on bf16 values
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _load_weights(w_ptrs, s_ptrs, group, n_groups, col_ok, GROUPS: tl.constexpr):
    """The weights of the reduction step starting at block `group`: words int32 [BN, GROUPS, 4] and exponents
    uint8 [BN, GROUPS, 1]. Blocks past the end read as zeros."""
    mask = col_ok[:, None, None] & ((group + tl.arange(0, GROUPS)) < n_groups)[None, :, None]
    w = tl.load(w_ptrs + group * 4, mask=mask, other=0)
    s = tl.load(s_ptrs + group, mask=mask, other=127)
    return w, s


@triton.jit
def _load_acts(a_ptrs, k, length, row_ok, STEP: tl.constexpr):
    """Activations [STEP, BM] (bf16) of the reduction step starting at value k."""
    mask = ((k + tl.arange(0, STEP)) < length)[:, None] & row_ok[None, :]
    return tl.load(a_ptrs + k, mask=mask, other=0.0).to(tl.bfloat16)


@triton.jit
def _prefetch_first(row_ptrs, scale_ptrs, g0, n_groups, ok, PREFETCH: tl.constexpr, BULK: tl.constexpr):
    """With PREFETCH > 0 (bytes), before the reduction loop: asks L2 for the first two windows of PREFETCH bytes of
    each weight row from block g0 (l2_prefetch.py; the launcher keeps PREFETCH within a row), and for the row's
    exponents (one byte a block: the lines holding the first and the last, all of them up to 129 blocks a row;
    gpt-oss has 90), which a step would otherwise miss in L2 every 32 blocks. row_ptrs: int32 [BN] pointers to row
    starts; scale_ptrs: uint8 [BN] pointers to the rows' exponents; ok: rows that exist."""
    if PREFETCH > 0:
        prefetch_first_windows(row_ptrs, g0, n_groups, ok, PREFETCH, BULK)
        prefetch_l2(scale_ptrs, 128, ok, False)
        prefetch_l2(scale_ptrs + (n_groups - 1), 128, ok, False)


@triton.jit
def _prefetch_next(row_ptrs, g, g0, n_groups, ok, PREFETCH: tl.constexpr, GROUPS: tl.constexpr, BULK: tl.constexpr):
    """With PREFETCH > 0, at the top of the step at block g: the window two on (l2_prefetch.prefetch_next_window)."""
    if PREFETCH > 0:
        prefetch_next_window(row_ptrs, g, g0, n_groups, ok, PREFETCH, GROUPS, BULK)


@triton.jit
def _gate_up_step(acc_g, acc_u, wg, sg, wu, su, x, USE_ASM: tl.constexpr, INTERPRET: tl.constexpr):
    acc_g = _dot(_dequant(wg, sg, USE_ASM), x, acc_g, INTERPRET)
    acc_u = _dot(_dequant(wu, su, USE_ASM), x, acc_u, INTERPRET)
    return acc_g, acc_u


@triton.jit(do_not_specialize=["num_rows", "groups_per_split"])
def _gate_up(x_ptr, stride_x, w_ptr, s_ptr, b_ptr, pair_ptr, start_ptr, act_ptr, part_ptr,
             count, hidden, inter, alpha, limit, num_rows, groups_per_split,
             TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
             DEPTH: tl.constexpr, SPLIT_K: tl.constexpr, EXPERTS_PAD: tl.constexpr, USE_ASM: tl.constexpr,
             INTERPRET: tl.constexpr, PREFETCH: tl.constexpr = 0, BULK: tl.constexpr = False):
    """act[rows, cols] = swiglu(x[token(rows)] @ gate_up[expert] + bias), computed as [BLOCK_N, BLOCK_M] tiles.
    With SPLIT_K > 1, program z of axis 2 sums blocks [z * groups_per_split, ...) only and stores its float32 gate
    and up sums (bias in z = 0's) at partials[z, rows, 2 cols (+ 1)]; _swiglu_splits finishes them. PREFETCH > 0:
    the weight rows' bytes asked of L2 ahead of the loads (_prefetch_first)."""
    expert, row0, row_end = _tile(start_ptr, count, tl.program_id(0), BLOCK_M, EXPERTS_PAD)
    if expert >= count:
        return
    STEP: tl.constexpr = GROUPS * 32
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    token = tl.load(pair_ptr + rows, mask=row_ok, other=0) // TOP_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # act columns j: gate row 2j, up row 2j + 1
    col_ok = cols < inter
    n_groups = hidden // 32
    g0 = tl.program_id(2) * groups_per_split  # this program's blocks of the reduction: [g0, g1)
    g1 = tl.minimum(n_groups, g0 + groups_per_split)
    gate_row = expert.to(tl.int64) * 2 * inter + 2 * cols.to(tl.int64)  # [BN]
    word = tl.arange(0, GROUPS)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    wg_ptrs = w_ptr + gate_row[:, None, None] * (n_groups * 4) + word  # [BN, GROUPS, 4] int32
    wu_ptrs = wg_ptrs + n_groups * 4
    sg_ptrs = s_ptr + gate_row[:, None, None] * n_groups + tl.arange(0, GROUPS)[None, :, None]  # [BN, GROUPS, 1]
    su_ptrs = sg_ptrs + n_groups
    x_ptrs = x_ptr + token.to(tl.int64)[None, :] * stride_x + tl.arange(0, STEP)[:, None]  # [STEP, BM]
    pg_ptrs = w_ptr + gate_row * (n_groups * 4)  # [BN] row starts, for the L2 prefetches
    pu_ptrs = pg_ptrs + n_groups * 4
    _prefetch_first(pg_ptrs, s_ptr + gate_row * n_groups, g0, n_groups, col_ok, PREFETCH, BULK)
    _prefetch_first(pu_ptrs, s_ptr + (gate_row + 1) * n_groups, g0, n_groups, col_ok, PREFETCH, BULK)

    acc_g = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if DEPTH == 1:
        wg, sg = _load_weights(wg_ptrs, sg_ptrs, g0, g1, col_ok, GROUPS)
        wu, su = _load_weights(wu_ptrs, su_ptrs, g0, g1, col_ok, GROUPS)
        x = _load_acts(x_ptrs, g0 * 32, g1 * 32, row_ok, STEP)
        for g in range(g0, g1, GROUPS):
            _prefetch_next(pg_ptrs, g, g0, n_groups, col_ok, PREFETCH, GROUPS, BULK)
            _prefetch_next(pu_ptrs, g, g0, n_groups, col_ok, PREFETCH, GROUPS, BULK)
            # the next step's loads go out before this step's decode and products
            wg_n, sg_n = _load_weights(wg_ptrs, sg_ptrs, g + GROUPS, g1, col_ok, GROUPS)
            wu_n, su_n = _load_weights(wu_ptrs, su_ptrs, g + GROUPS, g1, col_ok, GROUPS)
            x_n = _load_acts(x_ptrs, (g + GROUPS) * 32, g1 * 32, row_ok, STEP)
            acc_g, acc_u = _gate_up_step(acc_g, acc_u, wg, sg, wu, su, x, USE_ASM, INTERPRET)
            wg, sg, wu, su, x = wg_n, sg_n, wu_n, su_n, x_n
    else:  # three steps in flight beyond the one being multiplied
        wg0, sg0 = _load_weights(wg_ptrs, sg_ptrs, g0, g1, col_ok, GROUPS)
        wu0, su0 = _load_weights(wu_ptrs, su_ptrs, g0, g1, col_ok, GROUPS)
        x0 = _load_acts(x_ptrs, g0 * 32, g1 * 32, row_ok, STEP)
        wg1, sg1 = _load_weights(wg_ptrs, sg_ptrs, g0 + GROUPS, g1, col_ok, GROUPS)
        wu1, su1 = _load_weights(wu_ptrs, su_ptrs, g0 + GROUPS, g1, col_ok, GROUPS)
        x1 = _load_acts(x_ptrs, (g0 + GROUPS) * 32, g1 * 32, row_ok, STEP)
        wg2, sg2 = _load_weights(wg_ptrs, sg_ptrs, g0 + 2 * GROUPS, g1, col_ok, GROUPS)
        wu2, su2 = _load_weights(wu_ptrs, su_ptrs, g0 + 2 * GROUPS, g1, col_ok, GROUPS)
        x2 = _load_acts(x_ptrs, (g0 + 2 * GROUPS) * 32, g1 * 32, row_ok, STEP)
        for g in range(g0, g1, GROUPS):
            _prefetch_next(pg_ptrs, g, g0, n_groups, col_ok, PREFETCH, GROUPS, BULK)
            _prefetch_next(pu_ptrs, g, g0, n_groups, col_ok, PREFETCH, GROUPS, BULK)
            wg3, sg3 = _load_weights(wg_ptrs, sg_ptrs, g + 3 * GROUPS, g1, col_ok, GROUPS)
            wu3, su3 = _load_weights(wu_ptrs, su_ptrs, g + 3 * GROUPS, g1, col_ok, GROUPS)
            x3 = _load_acts(x_ptrs, (g + 3 * GROUPS) * 32, g1 * 32, row_ok, STEP)
            acc_g, acc_u = _gate_up_step(acc_g, acc_u, wg0, sg0, wu0, su0, x0, USE_ASM, INTERPRET)
            wg0, sg0, wu0, su0, x0 = wg1, sg1, wu1, su1, x1
            wg1, sg1, wu1, su1, x1 = wg2, sg2, wu2, su2, x2
            wg2, sg2, wu2, su2, x2 = wg3, sg3, wu3, su3, x3

    first = (tl.program_id(2) == 0).to(tl.float32)  # the bias goes in once, with split 0's sum
    gate = acc_g + first * tl.load(b_ptr + gate_row, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    up = acc_u + first * tl.load(b_ptr + gate_row + 1, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    mask = col_ok[:, None] & row_ok[None, :]
    if SPLIT_K == 1:
        act = _swiglu(gate, up, alpha, limit)  # [BN, BM]
        act_ptrs = act_ptr + rows.to(tl.int64)[None, :] * inter + cols[:, None]
        tl.store(act_ptrs, act.to(tl.bfloat16), mask=mask)
    else:
        part_ptrs = (part_ptr + tl.program_id(2).to(tl.int64) * num_rows * 2 * inter
                     + rows.to(tl.int64)[None, :] * 2 * inter + 2 * cols[:, None])
        tl.store(part_ptrs, gate, mask=mask)
        tl.store(part_ptrs + 1, up, mask=mask)


@triton.jit
def _swiglu(gate, up, alpha, limit):
    """gpt-oss's clamped SwiGLU (swiglu_reference.swiglu), in float32."""
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return (up + 1.0) * (gate * tl.sigmoid(alpha * gate))


@triton.jit(do_not_specialize=["num_rows"])
def _swiglu_splits(part_ptr, act_ptr, num_rows, inter, alpha, limit, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """act[r, j] = swiglu(sum over splits of partials[z, r, 2j], of partials[z, r, 2j + 1]), splits in order. Rows
    no pair uses hold whatever the partials held: the down kernel never reads them."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < num_rows * inter
    row, col = offs // inter, offs % inter
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    up = tl.zeros([BLOCK], dtype=tl.float32)
    for z in tl.static_range(SPLIT_K):
        base = part_ptr + z * num_rows * 2 * inter + row * 2 * inter + 2 * col
        gate += tl.load(base, mask=ok, other=0.0)
        up += tl.load(base + 1, mask=ok, other=0.0)
    tl.store(act_ptr + offs, _swiglu(gate, up, alpha, limit).to(tl.bfloat16), mask=ok)


@triton.jit(do_not_specialize=["num_rows", "groups_per_split"])
def _down(act_ptr, w_ptr, s_ptr, b_ptr, pair_ptr, start_ptr, route_ptr, y_ptr,
          count, inter, hidden, num_rows, groups_per_split,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, DEPTH: tl.constexpr,
          SPLIT_K: tl.constexpr, EXPERTS_PAD: tl.constexpr, USE_ASM: tl.constexpr, INTERPRET: tl.constexpr,
          PREFETCH: tl.constexpr = 0, BULK: tl.constexpr = False):
    """y[pair(rows), cols] = (act[rows] @ down[expert] + bias) * routing weight, as [BLOCK_N, BLOCK_M] tiles.
    With SPLIT_K > 1, program z of axis 2 sums its share of the blocks into y[z] (float32; bias in z = 0's).
    PREFETCH as in _gate_up."""
    expert, row0, row_end = _tile(start_ptr, count, tl.program_id(0), BLOCK_M, EXPERTS_PAD)
    if expert >= count:
        return
    STEP: tl.constexpr = GROUPS * 32
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pair = tl.load(pair_ptr + rows, mask=row_ok, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    n_groups = inter // 32
    g0 = tl.program_id(2) * groups_per_split
    g1 = tl.minimum(n_groups, g0 + groups_per_split)
    w_row = expert.to(tl.int64) * hidden + cols.to(tl.int64)  # [BN]
    word = tl.arange(0, GROUPS)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    w_ptrs = w_ptr + w_row[:, None, None] * (n_groups * 4) + word  # [BN, GROUPS, 4] int32
    s_ptrs = s_ptr + w_row[:, None, None] * n_groups + tl.arange(0, GROUPS)[None, :, None]  # [BN, GROUPS, 1]
    a_ptrs = act_ptr + rows.to(tl.int64)[None, :] * inter + tl.arange(0, STEP)[:, None]  # [STEP, BM]
    p_ptrs = w_ptr + w_row * (n_groups * 4)  # [BN] row starts, for the L2 prefetches
    _prefetch_first(p_ptrs, s_ptr + w_row * n_groups, g0, n_groups, col_ok, PREFETCH, BULK)

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if DEPTH == 1:
        w, s = _load_weights(w_ptrs, s_ptrs, g0, g1, col_ok, GROUPS)
        a = _load_acts(a_ptrs, g0 * 32, g1 * 32, row_ok, STEP)
        for g in range(g0, g1, GROUPS):
            _prefetch_next(p_ptrs, g, g0, n_groups, col_ok, PREFETCH, GROUPS, BULK)
            w_n, s_n = _load_weights(w_ptrs, s_ptrs, g + GROUPS, g1, col_ok, GROUPS)
            a_n = _load_acts(a_ptrs, (g + GROUPS) * 32, g1 * 32, row_ok, STEP)
            acc = _dot(_dequant(w, s, USE_ASM), a, acc, INTERPRET)
            w, s, a = w_n, s_n, a_n
    else:
        w0, s0 = _load_weights(w_ptrs, s_ptrs, g0, g1, col_ok, GROUPS)
        a0 = _load_acts(a_ptrs, g0 * 32, g1 * 32, row_ok, STEP)
        w1, s1 = _load_weights(w_ptrs, s_ptrs, g0 + GROUPS, g1, col_ok, GROUPS)
        a1 = _load_acts(a_ptrs, (g0 + GROUPS) * 32, g1 * 32, row_ok, STEP)
        w2, s2 = _load_weights(w_ptrs, s_ptrs, g0 + 2 * GROUPS, g1, col_ok, GROUPS)
        a2 = _load_acts(a_ptrs, (g0 + 2 * GROUPS) * 32, g1 * 32, row_ok, STEP)
        for g in range(g0, g1, GROUPS):
            _prefetch_next(p_ptrs, g, g0, n_groups, col_ok, PREFETCH, GROUPS, BULK)
            w3, s3 = _load_weights(w_ptrs, s_ptrs, g + 3 * GROUPS, g1, col_ok, GROUPS)
            a3 = _load_acts(a_ptrs, (g + 3 * GROUPS) * 32, g1 * 32, row_ok, STEP)
            acc = _dot(_dequant(w0, s0, USE_ASM), a0, acc, INTERPRET)
            w0, s0, a0 = w1, s1, a1
            w1, s1, a1 = w2, s2, a2
            w2, s2, a2 = w3, s3, a3

    first = (tl.program_id(2) == 0).to(tl.float32)
    bias = first * tl.load(b_ptr + w_row, mask=col_ok, other=0.0).to(tl.float32)
    route = tl.load(route_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    y = (acc + bias[:, None]) * route[None, :]
    y_ptrs = y_ptr + tl.program_id(2).to(tl.int64) * num_rows * hidden + pair.to(tl.int64)[None, :] * hidden \
        + cols[:, None]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit(do_not_specialize=["first", "num_rows"])
def _combine(y_ptr, ids_ptr, out_ptr, first, count, group_experts, hidden, num_rows,
             TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[token] = the tree sum ((g0 + g1) + (g2 + g3)) + ((g4 + g5) + (g6 + g7)) of the token's 8 expert groups
    (global expert id // group_experts), each group the sum of its slots in slot order, of y[z, token * K + slot]
    over splits z in order; slots outside the shard add nothing. A shard that is an aligned run of 1, 2, 4 or 8
    groups gets exactly its subtree (the other groups are 0, and x + 0 == x), so expert-parallel workers' float32
    answers added up the same tree (model/experts.add_as_groups) are this sum bit for bit."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < hidden
    groups = tl.arange(0, SUM_GROUPS)[:, None]  # [8, 1]
    acc = tl.zeros([SUM_GROUPS, BLOCK], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + token * TOP_K + slot).to(tl.int32)
        local = expert - first + tl.zeros_like(cols)  # [BLOCK]
        mine = col_ok & (local >= 0) & (local < count)
        in_group = groups == expert // group_experts  # [8, 1]: the one row this slot adds to
        for z in tl.static_range(SPLIT_K):
            value = tl.load(y_ptr + (z * num_rows + token * TOP_K + slot) * hidden + cols, mask=mine,
                            other=0.0).to(tl.float32)
            acc += tl.where(in_group, value[None, :], 0.0)
    g0, g1 = _group_row(acc, groups, 0), _group_row(acc, groups, 1)
    g2, g3 = _group_row(acc, groups, 2), _group_row(acc, groups, 3)
    g4, g5 = _group_row(acc, groups, 4), _group_row(acc, groups, 5)
    g6, g7 = _group_row(acc, groups, 6), _group_row(acc, groups, 7)
    total = ((g0 + g1) + (g2 + g3)) + ((g4 + g5) + (g6 + g7))
    tl.store(out_ptr + token * hidden + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _group_row(acc, groups, row: tl.constexpr):
    """Row `row` of acc [8, BLOCK], exactly: a sum of it and seven zeros."""
    return tl.sum(tl.where(groups == row, acc, 0.0), axis=0)
