"""The MoE router's top-k and softmax over the chosen k in one kernel, after the router's GEMM.

    expert_ids, weights = top_k_softmax(logits, k)   # logits [N, E] -> int64 [N, k], [N, k] in logits' dtype

PyTorch runs these as a two-kernel top-k and a softmax (~10 us a layer at one token, a quarter of what the
attention half of a decode layer takes). One program takes one token's E logits (32 for 20b, 128 for 120b), picks
the k largest (ties to the lower expert id, likeliest first) and their softmax in float32. The logits GEMM stays
cuBLAS's: a kernel per token re-reading the router weights was slower. The reference is
`router_reference.top_k_softmax_reference`. Triton: imported on GPUs only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _top_k_softmax(logits_ptr, ids_ptr, weights_ptr, stride_l, experts, K: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + row * stride_l + e, mask=e < experts, other=float("-inf")).to(tl.float32)
    slot = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_E], dtype=tl.int1)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    probs = tl.zeros([BLOCK_K], dtype=tl.float32)
    top = tl.max(logits, axis=0)
    for i in tl.static_range(K):  # the k largest, one at a time; the first of equal values wins
        best = tl.max(tl.where(chosen, float("-inf"), logits), axis=0)
        index = tl.min(tl.where((logits == best) & ~chosen, e, BLOCK_E), axis=0)
        chosen = chosen | (e == index)
        ids = tl.where(slot == i, index.to(tl.int64), ids)
        probs = tl.where(slot == i, tl.exp(best - top), probs)
    probs = probs / tl.sum(probs, axis=0)
    tl.store(ids_ptr + row * K + slot, ids, mask=slot < K)
    tl.store(weights_ptr + row * K + slot, probs.to(weights_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=slot < K)


def top_k_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] (rows may be strided) -> the k likeliest expert ids [N, k] and the softmax of their logits."""
    n, experts = logits.shape
    ids = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(n, k, dtype=logits.dtype, device=logits.device)
    if n:
        _top_k_softmax[(n,)](logits, ids, weights, logits.stride(0), experts, K=k, BLOCK_K=triton.next_power_of_2(k),
                             BLOCK_E=triton.next_power_of_2(experts), num_warps=1)
    return ids, weights
