"""Asking the GPU's L2 cache to fetch a run of bytes ahead of the loads that will read it (Hopper and later).

The MXFP4 experts are read in the checkpoint's layout: a row of weights is a contiguous run of bytes (1,440 at
gpt-oss's shapes), but a kernel's reduction step takes only 32-64 bytes of each of its 64-256 rows, so each step's
loads are hundreds of short pieces spread over the layer's weights, and each load holds registers until its bytes
arrive. A prefetch hands a run of bytes to the memory system ahead of those loads: nothing waits for it, no register
holds it, and the loads then find their bytes in L2 (~2-3x nearer than device memory). Three forms:
  prefetch_l2(ptrs, NBYTES, ok, BULK=True)   one `cp.async.bulk.prefetch.L2` a pointer (a row's next window)
  prefetch_l2(ptrs, NBYTES, ok, BULK=False)  one `prefetch.global.L2` (a 128-byte line) every 128 bytes
  prefetch_l2_span(ptr, nbytes)              one bulk prefetch of one contiguous span, issued once a warp
and, for a reduction loop over rows, its windows: prefetch_first_windows before the loop, prefetch_next_window in it.
kernels/NOTES-mxfp4-moe.md ("Weight reads") says why and when; bench/weight_stream.py measures the access patterns
alone. A prefetch changes nothing a kernel computes: the GPU tests compare each prefetching kernel with its twin bit
for bit.

This module imports Triton: import it only where a CUDA GPU is.
"""

from __future__ import annotations

import triton
import triton.language as tl

# $1: the address (16-byte aligned), $2: bytes (a multiple of 16), $3: nonzero to fetch. A hint: the result is a
# dummy, and the op is marked impure so that the compiler keeps it.
_PREFETCH_ASM = tl.constexpr("{\n.reg .pred p;\nsetp.ne.b32 p, $3, 0;\n"
                             "@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.b32 $0, 0;\n}")


# one 128-byte line at $1 where $2 is nonzero (`prefetch`: a plain per-thread instruction, CCTL in the machine code)
_LINE_ASM = tl.constexpr("{\n.reg .pred p;\nsetp.ne.b32 p, $2, 0;\n@p prefetch.global.L2 [$1];\nmov.b32 $0, 0;\n}")
LINE = tl.constexpr(128)


@triton.jit
def prefetch_l2(ptrs, NBYTES: tl.constexpr, ok, BULK: tl.constexpr):
    """Asks L2 for NBYTES (a multiple of 128) from each of ptrs where ok: with BULK in one bulk instruction a pointer
    (the pointers 16-byte aligned; the address passes through the warp's uniform registers, so ptxas loops over a
    warp's distinct addresses), else one line prefetch every 128 bytes (the lines holding ptrs, ptrs + 128, ...)."""
    if BULK:
        tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l,r,r",
                                  [ptrs.to(tl.int64), tl.full(ptrs.shape, NBYTES, tl.int32), ok.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        for line in tl.static_range(NBYTES // LINE.value):
            tl.inline_asm_elementwise(_LINE_ASM, "=r,l,r", [ptrs.to(tl.int64) + line * LINE, ok.to(tl.int32)],
                                      dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l2_span(ptr, nbytes):
    """Fetches the nbytes (int) from ptr (any element type, any alignment) into L2 in one bulk instruction: the
    span widened to whole 16-byte units. For a program whose weights are one contiguous run (the matrix-vector
    kernels' row tiles), asked for once before its loop."""
    start = ptr.to(tl.int64)
    aligned = start & ~15
    size = ((start + nbytes - aligned + 15) & ~15).to(tl.int32)
    # as one-element tensors: the operands are then the same in every thread, and ptxas issues it once a warp
    tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l,r,r", [tl.full([1], 0, tl.int64) + aligned,
                                                          tl.full([1], 0, tl.int32) + size, tl.full([1], 1, tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_first_windows(row_ptrs, g0, n_groups, ok, WINDOW: tl.constexpr, BULK: tl.constexpr):
    """Before a reduction loop over 16-byte blocks [g0, n_groups) of rows: the first two WINDOW-byte windows of each
    row from block g0, kept inside the row (rows at least WINDOW bytes long). row_ptrs: int32 [BN] row starts."""
    last = n_groups * 16 - WINDOW  # the last window's start
    prefetch_l2(row_ptrs + tl.minimum(g0 * 16, last) // 4, WINDOW, ok, BULK)
    prefetch_l2(row_ptrs + tl.minimum(g0 * 16 + WINDOW, last) // 4, WINDOW, ok, BULK)


@triton.jit
def prefetch_next_window(row_ptrs, g, g0, n_groups, ok, WINDOW: tl.constexpr, GROUPS: tl.constexpr,
                         BULK: tl.constexpr):
    """At the top of the loop's step at block g (GROUPS blocks a step): on the first step of each window, the window
    two on, so that each row's bytes are asked for 1-2 windows before the loads that use them."""
    WINDOW_GROUPS: tl.constexpr = WINDOW // 16
    tl.static_assert(WINDOW_GROUPS % GROUPS == 0)
    if (g - g0) % WINDOW_GROUPS == 0:
        ahead = tl.minimum((g + 2 * WINDOW_GROUPS) * 16, n_groups * 16 - WINDOW)
        prefetch_l2(row_ptrs + ahead // 4, WINDOW, ok, BULK)
