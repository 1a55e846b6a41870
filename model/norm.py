"""RMSNorm, computed in float32 whatever the activation dtype, with the residual add that precedes it.

Each block adds its attention and MoE outputs into a residual stream and normalizes the sum. The add and the norm
are one step here, `norm(x, residual) -> (normed, summed)`, so a GPU runs them as one kernel (kernels/rms_norm.py);
elsewhere the same math runs in PyTorch (kernels/rms_norm_reference.py).
"""

from __future__ import annotations

import torch
from torch import nn

from gptoss_serve.kernels.dispatch import TritonOp
from gptoss_serve.kernels.rms_norm_reference import add_rms_norm_reference

_add_rms_norm = TritonOp("rms_norm.add_rms_norm", reference=add_rms_norm_reference)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., H] plus the residual stream so far (None: x starts it) -> (the normed sum, the sum)."""
        return _add_rms_norm(x, residual, self.weight, self.eps)
