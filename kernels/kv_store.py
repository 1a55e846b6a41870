"""A step's new keys and values written into the paged KV cache in one kernel (PyTorch indexes them in two).

    store_kv(k, v, key_cache, value_cache, slots)   # k, v [N, Hkv, D]; caches [blocks, block_size, Hkv, D]

slots [N] are flat cache slots (block * block_size + offset); padding rows point into the null block. One program
copies one token's keys and values. The reference is `kernels.paged_attention.store_kv_reference`. Triton:
imported on GPUs only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv(k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, slots_ptr, stride_kn, stride_vn, width,
              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    k = tl.load(k_ptr + row * stride_kn + cols, mask=mask)
    v = tl.load(v_ptr + row * stride_vn + cols, mask=mask)
    tl.store(key_cache_ptr + slot * width + cols, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + slot * width + cols, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v [N, Hkv, D] (each token's heads contiguous; rows may be strided) into the caches at slots [N]."""
    n = k.shape[0]
    width = k.shape[1] * k.shape[2]
    if k.stride(2) != 1 or k.stride(1) != k.shape[2] or v.stride(2) != 1 or v.stride(1) != v.shape[2]:
        raise ValueError("store_kv needs each token's heads contiguous")
    if n:
        _store_kv[(n,)](k, v, key_cache, value_cache, slots, k.stride(0), v.stride(0), width,
                        BLOCK=triton.next_power_of_2(width), num_warps=4)
