"""RMSNorm, computed in float32 whatever the activation dtype, with the residual add that precedes it.

Each block adds its attention and MoE outputs into a residual stream and normalizes the sum. The add and the norm
are one step here, `norm(x, residual) -> (normed, summed)`, so a GPU runs them as one kernel (kernels/rms_norm.py);
`rms_norm_reference` is the same math in PyTorch, for the CPU and for the kernel's tests.
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (RMSNorm(x + residual), x + residual); the sum in x's dtype, as transformers adds (without a residual,
    x itself)."""
    summed = x if residual is None else x + residual
    x32 = summed.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32).to(summed.dtype), summed


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., H] plus the residual stream so far (None: x starts it) -> (the normed sum, the sum)."""
        if x.is_cuda:
            from gptoss_serve.kernels.rms_norm import add_rms_norm  # Triton: only where a GPU is

            return add_rms_norm(x, residual, self.weight, self.eps)
        return rms_norm_reference(x, residual, self.weight, self.eps)
