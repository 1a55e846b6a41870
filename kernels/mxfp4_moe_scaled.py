"""The MXFP4 MoE layer's tensor-core kernels written with Triton's scaled dot (`tl.dot_scaled`).

Hopper has no FP4 matrix units: Triton lowers a scaled dot there into an FP4 -> bf16 conversion of the packed
operand, a multiply by its block scales and an ordinary dot. Written this way, the compiler knows the FP4 operand
for what it is: it pipelines the packed bytes' loads (`num_stages` copies in flight through shared memory, where the
hand-written kernels of mxfp4_moe_kernels.py hold one or three steps in registers) and converts them in the layout
the matrix unit reads them in, with no decoded tile going through shared memory.

The products are computed transposed as in mxfp4_moe_kernels.py (weights x tokens^T): the weights' rows are the
M side, the packed bytes read straight from the checkpoint's blocks [E, out, in / 32, 16] as [rows, in / 2]
(value 2j in byte j's low nibble, as the scaled dot reads E2M1), scales [E, out, in / 32] as [rows, in / 32].
Triton 3.6 pipelines only the packed bytes (cp.async through shared memory); the scales and the activations stay
plain loads, so the kernels load them a step ahead by hand. The loads carry no masks (a masked or unaligned load
cannot be a wide copy): the reduction length is a whole number of steps and row indices are clamped in range.

Measured on an H100 (kernels/NOTES-mxfp4-moe.md): 8% slower than the hand-written kernels at 64 tokens (397 against
368 us a 20b layer), and slower still at 16 and 256, so no batch size picks them (presets "scaled_*", for benchmarks
and for GPUs with FP4 matrix units, where the same scaled dot runs natively).

    _gate_up_scaled  per (expert row tile, column tile): act = swiglu(x @ gate_up + bias), sorted rows
    _down_scaled     per (expert row tile, column tile): y[pair] = (act @ down + bias) * routing weight
The launcher (mxfp4_moe.py) runs the same routing sort and _combine around them as for the other kernels.

This module imports Triton: import it only where a CUDA GPU is (the reference is `moe_reference.py`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gptoss_serve.kernels.mxfp4_moe_kernels import _swiglu, _tile


@triton.jit
def _reduce(w_ptrs, s_ptrs, x_ptrs, length, acc, STEP: tl.constexpr, STAGES: tl.constexpr):
    """acc + the decoded weights [R, length] times the activations [length, BM]; the pointers are those of the first
    step (w [R, STEP / 2] packed bytes, s [R, STEP / 32] scales, x [STEP, BM]). The compiler pipelines the packed
    bytes' loads through shared memory; the scales and activations, which it leaves as plain loads, are loaded a
    step ahead by hand (the last step's "next" re-reads the last step, in range)."""
    s = tl.load(s_ptrs)
    x = tl.load(x_ptrs)
    for k in tl.range(0, length, STEP, num_stages=STAGES):
        w = tl.load(w_ptrs + k // 2)
        k_next = tl.minimum(k + STEP, length - STEP)
        s_next = tl.load(s_ptrs + k_next // 32)
        x_next = tl.load(x_ptrs + k_next)
        acc = _scaled_dot(w, s, x, acc)
        s, x = s_next, x_next
    return acc


@triton.jit
def _scaled_dot(w, s, x, acc):
    """acc + decoded(w, s) @ x in float32 (fast_math: no scale is 0xFF, NaN, in a checkpoint's experts)."""
    return tl.dot_scaled(w, s, "e2m1", x, None, "bf16", acc, fast_math=True)


@triton.jit(do_not_specialize=["num_rows"])
def _gate_up_scaled(x_ptr, stride_x, w_ptr, s_ptr, b_ptr, pair_ptr, start_ptr, act_ptr,
                    count, hidden, inter, alpha, limit, num_rows,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr,
                    STAGES: tl.constexpr, EXPERTS_PAD: tl.constexpr):
    """act[rows, cols] = swiglu(x[token(rows)] @ gate_up[expert] + bias). A program reads 2 * BLOCK_N consecutive
    weight rows (gate row 2j and up row 2j + 1 of each of its BLOCK_N act columns) as one tile: one dot, split
    into gate and up after the loop."""
    expert, row0, row_end = _tile(start_ptr, count, tl.program_id(0), BLOCK_M, EXPERTS_PAD)
    if expert >= count:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    token = tl.load(pair_ptr + rows, mask=row_ok, other=0) // TOP_K  # rows past the tile read token 0's x
    wrows = tl.program_id(1) * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # gate/up rows of this expert
    wrows = tl.minimum(wrows, 2 * inter - 1)  # rows past the end read the last one (their sums are not stored)
    global_row = expert.to(tl.int64) * 2 * inter + wrows
    w_ptrs = w_ptr + global_row[:, None] * (hidden // 2) + tl.arange(0, STEP // 2)[None, :]
    s_ptrs = s_ptr + global_row[:, None] * (hidden // 32) + tl.arange(0, STEP // 32)[None, :]
    x_ptrs = x_ptr + token.to(tl.int64)[None, :] * stride_x + tl.arange(0, STEP)[:, None]  # [STEP, BM]

    acc = _reduce(w_ptrs, s_ptrs, x_ptrs, hidden, tl.zeros([2 * BLOCK_N, BLOCK_M], dtype=tl.float32), STEP, STAGES)

    acc = acc + tl.load(b_ptr + global_row).to(tl.float32)[:, None]
    gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_N, 2, BLOCK_M]), [0, 2, 1]))  # [BN, BM] each
    act = _swiglu(gate, up, alpha, limit)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    act_ptrs = act_ptr + rows.to(tl.int64)[None, :] * inter + cols[:, None]
    tl.store(act_ptrs, act.to(tl.bfloat16), mask=(cols < inter)[:, None] & row_ok[None, :])


@triton.jit(do_not_specialize=["num_rows"])
def _down_scaled(act_ptr, w_ptr, s_ptr, b_ptr, pair_ptr, start_ptr, route_ptr, y_ptr,
                 count, inter, hidden, num_rows,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr, STAGES: tl.constexpr,
                 EXPERTS_PAD: tl.constexpr):
    """y[pair(rows), cols] = (act[rows] @ down[expert] + bias) * routing weight, as [BLOCK_N, BLOCK_M] tiles."""
    expert, row0, row_end = _tile(start_ptr, count, tl.program_id(0), BLOCK_M, EXPERTS_PAD)
    if expert >= count:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pair = tl.load(pair_ptr + rows, mask=row_ok, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    wrows = tl.minimum(cols, hidden - 1)  # as in _gate_up_scaled: clamped, not masked
    global_row = expert.to(tl.int64) * hidden + wrows
    w_ptrs = w_ptr + global_row[:, None] * (inter // 2) + tl.arange(0, STEP // 2)[None, :]
    s_ptrs = s_ptr + global_row[:, None] * (inter // 32) + tl.arange(0, STEP // 32)[None, :]
    act_rows = tl.minimum(rows, num_rows - 1).to(tl.int64)  # rows past the tile read a row in range, unused
    a_ptrs = act_ptr + act_rows[None, :] * inter + tl.arange(0, STEP)[:, None]  # [STEP, BM]

    acc = _reduce(w_ptrs, s_ptrs, a_ptrs, inter, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), STEP, STAGES)

    bias = tl.load(b_ptr + global_row).to(tl.float32)
    route = tl.load(route_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    y = (acc + bias[:, None]) * route[None, :]
    y_ptrs = y_ptr + pair.to(tl.int64)[None, :] * hidden + cols[:, None]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])
