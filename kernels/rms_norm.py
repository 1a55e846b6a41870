"""RMSNorm with the residual add fused in: one kernel where PyTorch launches about nine.

    normed, summed = add_rms_norm(x, residual, weight, eps)   # summed = x + residual; normed = RMSNorm(summed)
    normed, _ = add_rms_norm(x, None, weight, eps)            # the first layer: no residual yet

The reference is `rms_norm_reference.add_rms_norm_reference`; the results match it bit for bit up to rsqrt's last
float32 bit: the sum is rounded to the activation dtype first, as PyTorch's add rounds it, and the norm is taken of
the rounded sum in float32. One program normalizes one row (gpt-oss's 2,880 values fit one block). Triton: imported
on GPUs only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s,
                  hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)  # rounded as torch's add rounds
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (weight * (x32 * rstd)).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., H] (rows may be strided, the last dim contiguous) -> (RMSNorm(x + residual), x + residual);
    without a residual the second is x itself."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else x2
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    if x2.shape[0]:
        _add_rms_norm[(x2.shape[0],)](x2, r2, weight, out, summed, x2.stride(0), r2.stride(0), out.stride(0),
                                      summed.stride(0), hidden, eps, HAS_RESIDUAL=residual is not None,
                                      BLOCK=triton.next_power_of_2(hidden), num_warps=8)
    return out.view(x.shape), summed.view(x.shape)
