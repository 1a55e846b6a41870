"""Rotary position embedding applied to a step's queries and keys in one kernel (PyTorch launches about sixteen).

    q_rot, k_rot = rotary_qk(q, k, cos, sin)   # q [N, Hq, D], k [N, Hkv, D]; cos, sin [N, D/2] float32

q and k may be strided views of one fused QKV projection. The reference is `rotary_reference.rotary_qk_reference`,
which, as transformers does, casts cos and sin to the activation dtype and rounds each product and each sum to it;
the kernel computes in float32 and rounds once, so in bf16 it sits within one rounding of the exact rotation (about
2.7x closer to it than the reference, whose results it matches to a bf16 step). One program rotates every head of
one token.
Triton: imported on GPUs only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _to(v, ty, NARROW: tl.constexpr):
    """float32 v in the activation dtype ty: rounded to nearest even, as PyTorch rounds (Triton's plain cast may
    truncate)."""
    if NARROW:
        return v.to(ty, fp_downcast_rounding="rtne")
    return v.to(ty)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, cos, sin, row, stride_sn, stride_sh, stride_dn, stride_dh, heads,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, NARROW: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    src = src_ptr + row * stride_sn + h * stride_sh + d
    first = tl.load(src, mask=mask, other=0.0)
    second = tl.load(src + HALF, mask=mask, other=0.0)
    ty = dst_ptr.dtype.element_ty
    f, s = first.to(tl.float32), second.to(tl.float32)
    new_first = _to(f * cos - s * sin, ty, NARROW)
    new_second = _to(s * cos + f * sin, ty, NARROW)
    dst = dst_ptr + row * stride_dn + h * stride_dh + d
    tl.store(dst, new_first, mask=mask)
    tl.store(dst + HALF, new_second, mask=mask)


@triton.jit
def _rotary_qk(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, stride_qn, stride_qh, stride_kn, stride_kh,
               stride_qon, stride_qoh, stride_kon, stride_koh, stride_c, q_heads, k_heads, HALF: tl.constexpr,
               BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, NARROW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + row * stride_c + d)
    sin = tl.load(sin_ptr + row * stride_c + d)
    _rotate_heads(q_ptr, q_out_ptr, cos, sin, row, stride_qn, stride_qh, stride_qon, stride_qoh, q_heads, HALF,
                  BLOCK_QH, NARROW)
    _rotate_heads(k_ptr, k_out_ptr, cos, sin, row, stride_kn, stride_kh, stride_kon, stride_koh, k_heads, HALF,
                  BLOCK_KH, NARROW)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D], k [N, Hkv, D] (head dims contiguous), cos/sin [N, D/2] -> rotated copies, contiguous."""
    n, q_heads, dim = q.shape
    k_heads = k.shape[1]
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                     device=k.device)
    cos, sin = cos.reshape(n, dim // 2).contiguous(), sin.reshape(n, dim // 2).contiguous()
    if n:
        _rotary_qk[(n,)](q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
                         q_heads, k_heads, HALF=dim // 2, BLOCK_QH=triton.next_power_of_2(q_heads),
                         BLOCK_KH=triton.next_power_of_2(k_heads), NARROW=q.dtype != torch.float32,
                         num_warps=4)
    return q_out, k_out
