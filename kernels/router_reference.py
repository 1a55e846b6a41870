"""The MoE router's top-k and the softmax over the chosen k, in plain PyTorch: the CPU's path and what the Triton
kernel (`router.py`) is tested against. No Triton here."""

from __future__ import annotations

import torch


def top_k_softmax_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> the k likeliest expert ids [N, k] (int64) and the softmax of their logits [N, k]."""
    top_logits, expert_ids = torch.topk(logits, k, dim=-1)  # [N, k] each
    return expert_ids, torch.softmax(top_logits, dim=-1)
