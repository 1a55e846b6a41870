"""What kernels/small_linear.py computes: x @ weight^T + bias, as torch.nn.functional.linear does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 64  # more tokens than this: a GEMM, cuBLAS's own business (small_linear refuses them)


def small_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K], bias [N] or None -> [M, N] in x's dtype."""
    return F.linear(x, weight, bias)
