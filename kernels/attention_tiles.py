"""What the paged-attention kernels (varlen_attention.py, split_kv_attention.py) share: the tile product they take
for q.k and p.v, and where a running max starts.

Two kernels compute the same attention and are tested against one reference, so they must multiply alike: float32
operands get IEEE float32 products (a float32 model, not TF32's 10-bit mantissas), bf16 ones the matrix unit's
native product with float32 accumulation. This module imports Triton: import it only where a GPU is (or under
Triton's interpreter).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: for checking logic only
# a running max that starts finite: a row that saw no key yet keeps exp(0) = 1 as its rescale
NEG = tl.constexpr(-1.0e30)


@triton.jit
def tile_dot(a, b, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter's low-precision dot is not exact; its float32 one is
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:  # a float32 model gets float32 products, not TF32's 10-bit mantissas
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)
