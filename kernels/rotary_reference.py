"""Rotary position embedding (rotate-half layout) in plain PyTorch: the CPU's path and what the Triton kernel
(`rotary.py`) is tested against. No Triton here.

As transformers does, cos and sin are cast to the activation dtype and each product and sum is rounded to it.
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim] rotated by cos/sin [..., head_dim / 2] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # [..., 1, head_dim / 2]
    first, second = x.chunk(2, dim=-1)  # [..., heads, head_dim / 2] each
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def rotary_qk_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., Hq, D], k [..., Hkv, D], cos/sin [..., D/2] -> both rotated: the kernel's `rotary_qk` arguments."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
