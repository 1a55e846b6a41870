"""RMSNorm with the residual add before it, in plain PyTorch: the CPU's path and what the Triton kernel
(`rms_norm.py`) is tested against. No Triton here.

The norm is computed in float32 whatever the activation dtype; the sum is rounded to the activation dtype first, as
transformers adds the residual.
"""

from __future__ import annotations

import torch


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., H], weight [H] -> (RMSNorm(x + residual), x + residual); the sum in x's dtype, as
    transformers adds (without a residual, x itself)."""
    summed = x if residual is None else x + residual  # [..., H]
    x32 = summed.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., H]
    return (weight * x32).to(summed.dtype), summed
