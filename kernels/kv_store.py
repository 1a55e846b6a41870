"""A step's new keys and values written into the paged KV cache in one kernel (PyTorch indexes them in two).

    store_kv(k, v, key_cache, value_cache, slots)   # k, v [N, Hkv, D]; caches [blocks, block_size, Hkv, D]
    store_kv(k, v, key_cache, value_cache, slots, key_scales=..., value_scales=...)   # e4m3 caches

slots [N] are flat cache slots (block * block_size + offset); padding rows point into the null block. One program
copies one token's keys and values; into e4m3 caches it quantizes each KV head's D numbers with a power-of-two scale
of their own and stores the scale's exponent in key_scales / value_scales [blocks, block_size, Hkv] (the format:
fp8_kv_reference.py). The reference is `kernels.paged_attention.store_kv_reference`, bit for bit. Triton: imported
on GPUs only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.fp8_kv_reference import E4M3, E4M3_MAX_MANTISSA_BITS, EXPONENT_BELOW_E4M3_MAX, SCALE_DTYPE
from gptoss_serve.kernels.paged_attention import check_scales

# e4m3's smallest normal exponent: below it the grid's step stays 2**-9 (subnormals)
E4M3_MIN_EXPONENT = -6
E4M3_MANTISSA_BITS = 3


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


@triton.jit
def _quantize_e4m3(x, MAX_MANTISSA: tl.constexpr, BELOW_MAX: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                   MANTISSA_BITS: tl.constexpr):
    """x [H, D] float32 -> (e4m3 [H, D], scale exponents int32 [H]): fp8_kv_reference.quantize_e4m3, bit for bit."""
    amax = tl.max(tl.abs(x), axis=1)  # [H]
    bits = amax.to(tl.int32, bitcast=True)
    biased = ((bits >> 23) & 0xFF) - BELOW_MAX + ((bits & 0x7FFFFF) > MAX_MANTISSA).to(tl.int32)
    biased = tl.minimum(tl.maximum(biased, 1), 254)
    inverse = ((254 - biased) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exactly
    y = tl.abs(x) * inverse[:, None]  # exact, at most 448
    # Round to e4m3's grid ourselves, to nearest even, as torch does: adding 2**(e + 23 - MANTISSA_BITS) for y's
    # exponent e leaves float32 only e4m3's bits, and float32 adds round to nearest even; the cast below is then
    # exact. (Triton's interpreter casts float32 to fp8 by truncating, with a carry bug; GPUs round to nearest even.)
    exponent = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, MIN_EXPONENT)
    magic = ((exponent + 127 + 23 - MANTISSA_BITS) << 23).to(tl.float32, bitcast=True)
    rounded = (y + magic) - magic
    # x's sign bit put back by bits: a negation compiles to 0 - rounded on the GPU, which makes -0.0 of a tiny
    # negative value +0.0 (torch keeps -0.0)
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31  # arithmetic shift: 0x80000000 or 0
    signed = (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return signed.to(tl.float8e4nv), biased


@triton.jit
def _store_kv_e4m3(k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, key_scales_ptr, value_scales_ptr, slots_ptr,
                   stride_kn, stride_vn, heads, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   MAX_MANTISSA: tl.constexpr, BELOW_MAX: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                   MANTISSA_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < heads) & (d[None, :] < D)
    cols = h[:, None] * D + d[None, :]  # [BLOCK_H, BLOCK_D]: a token's heads are contiguous
    k = tl.load(k_ptr + row * stride_kn + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * stride_vn + cols, mask=mask, other=0.0).to(tl.float32)
    k8, k_exponents = _quantize_e4m3(k, MAX_MANTISSA, BELOW_MAX, MIN_EXPONENT, MANTISSA_BITS)
    v8, v_exponents = _quantize_e4m3(v, MAX_MANTISSA, BELOW_MAX, MIN_EXPONENT, MANTISSA_BITS)
    tl.store(key_cache_ptr + slot * heads * D + cols, k8, mask=mask)
    tl.store(value_cache_ptr + slot * heads * D + cols, v8, mask=mask)
    tl.store(key_scales_ptr + slot * heads + h, k_exponents.to(tl.uint8), mask=h < heads)
    tl.store(value_scales_ptr + slot * heads + h, v_exponents.to(tl.uint8), mask=h < heads)


def store_kv(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slots: torch.Tensor, *, key_scales: torch.Tensor | None = None,
             value_scales: torch.Tensor | None = None) -> None:
    """k, v [N, Hkv, D] (each token's heads contiguous; rows may be strided) into the caches at slots [N]; with
    e4m3 caches, their scale exponents key_scales, value_scales (uint8 [blocks, block_size, Hkv], contiguous)."""
    n, heads, dim = k.shape
    if k.stride(2) != 1 or k.stride(1) != dim or v.stride(2) != 1 or v.stride(1) != dim:
        raise ValueError("store_kv needs each token's heads contiguous")
    check_scales(key_cache, key_scales, value_scales)
    if not n:
        return
    if key_cache.dtype != E4M3:
        width = heads * dim
        _store_kv[(n,)](k, v, key_cache, value_cache, slots, k.stride(0), v.stride(0), width,
                        BLOCK=triton.next_power_of_2(width), num_warps=4)
        return
    if not (key_scales.is_contiguous() and value_scales.is_contiguous()) or \
            key_scales.dtype != SCALE_DTYPE or value_scales.dtype != SCALE_DTYPE:
        raise ValueError(f"the scales must be contiguous {SCALE_DTYPE}")
    _store_kv_e4m3[(n,)](k, v, key_cache, value_cache, key_scales, value_scales, slots, k.stride(0), v.stride(0),
                         heads, D=dim, BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
                         MAX_MANTISSA=E4M3_MAX_MANTISSA_BITS, BELOW_MAX=EXPONENT_BELOW_E4M3_MAX,
                         MIN_EXPONENT=E4M3_MIN_EXPONENT, MANTISSA_BITS=E4M3_MANTISSA_BITS, num_warps=4)
