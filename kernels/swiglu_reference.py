"""gpt-oss's clamped SwiGLU, the experts' activation, in plain PyTorch: used by the dense experts and the MXFP4 MoE
reference (`moe_reference.py`); the Triton kernels compute it inline (`mxfp4_moe_kernels._swiglu`). No Triton here."""

from __future__ import annotations

import torch


def swiglu(gate_up: torch.Tensor, *, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved [..., 2I] gate/up columns -> [..., I]."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # [..., I] each
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))
