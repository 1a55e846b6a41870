"""A dense projection of a handful of tokens (decode: 1 to 64 rows) at the pace of its weight bytes, bias fused.

At one token cuBLAS runs these GEMMs as split-K kernels plus a reduce launch, ~28 µs a layer for gpt-oss-20b's QKV and
o_proj against ~13 µs of bytes (BENCHMARKS.md, issue 14's profile). Here one program owns BLOCK_N output features and
the whole reduction: its weight tile [BLOCK_N, BLOCK_K] streams through Triton's multi-stage pipeline (NUM_STAGES
tiles in flight, enough bytes to cover the memory latency with a few programs an SM) and meets the tokens, padded to
the matrix unit's 16 rows, in tl.dot with float32 accumulation; the bias is added before the one store. No split, so
no second launch and a fixed summation order. With prefetch, each program first asks L2 for its whole weight tile (one
contiguous run of BLOCK_N rows: kernels/l2_prefetch.py), so that the weights stream from device memory as whole runs
however few programs an SM runs; for weights that fit L2 beside everything else (QKV's 29.5 MB, o_proj's 23.6 MB),
not the unembedding's 1.2 GB.

    y = small_linear(x, weight, bias)   # x [M, K] bf16, weight [N, K], bias [N] or None -> [M, N]

The reference is small_linear_reference.py (F.linear). Triton: imported on GPUs only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.l2_prefetch import prefetch_l2_span
from gptoss_serve.kernels.small_linear_reference import MAX_ROWS

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _small_linear(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                  PREFETCH: tl.constexpr = False):
    n0 = tl.program_id(0) * BLOCK_N
    if PREFETCH:  # the tile's rows, contiguous (the launcher checks stride_w == K): one run
        prefetch_l2_span(w_ptr + n0.to(tl.int64) * stride_w, tl.minimum(BLOCK_N, N - n0).to(tl.int64) * K * 2)
    n = n0 + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + n.to(tl.int64)[:, None] * stride_w + k[None, :]  # [BN, BK]
    x_ptrs = x_ptr + m.to(tl.int64)[None, :] * stride_x + k[:, None]  # [BK, BM]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y transposed: the features fill the matrix unit's M side
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        w = tl.load(w_ptrs + k0, mask=(n[:, None] < N) & (k0 + k[None, :] < K), other=0.0)
        x = tl.load(x_ptrs + k0, mask=(m[None, :] < M) & (k0 + k[:, None] < K), other=0.0)
        acc = tl.dot(w, x, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + m.to(tl.int64)[None, :] * stride_y + n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(n[:, None] < N) & (m[None, :] < M))


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, block_n: int = 32,
                 block_k: int = 256, num_stages: int = 4, num_warps: int = 4, prefetch: bool = False) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight [N, K]^T + bias [N] -> [M, N] in x's dtype. prefetch: each program asks L2
    for its weight tile first (for 16-bit weights with contiguous rows; the Triton interpreter runs no PTX)."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or weight.shape[1] != K or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"small_linear takes x [M <= {MAX_ROWS}, K], weight [N, K], bias [N]; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}")
    x, weight = x if x.stride(1) == 1 else x.contiguous(), weight if weight.stride(1) == 1 else weight.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    block_m = max(16, triton.next_power_of_2(M))
    _small_linear[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages,
        PREFETCH=prefetch and weight.stride(0) == K and weight.element_size() == 2 and not _INTERPRET,
        num_warps=num_warps)
    return y


# weights at most this large are asked of L2 whole (QKV 29.5 MB, o_proj 23.6 MB, the router's 0.2-0.7 MB); larger ones
# (the unembedding, 1.2 GB) would only push each other out of it
PREFETCH_MAX_BYTES = 32 << 20


def projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The model's projections of a handful of tokens (model/projection.py): small_linear with its default tiles,
    each program asking L2 for its weight tile first where the weight fits it."""
    return small_linear(x, weight, bias, prefetch=weight.numel() * weight.element_size() <= PREFETCH_MAX_BYTES)
