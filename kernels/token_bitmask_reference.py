"""Constrained decoding's token bitmask applied to logits, in plain PyTorch: the CPU's path and what the Triton kernel
(`token_bitmask.py`) is tested against. No Triton here.

A bitmask row is int32 [W], W = ceil(V / 32): token t is allowed where bit t % 32 of word t // 32 is set (llguidance's
layout). Tokens past 32 * W are forbidden; bits past V are ignored.
"""

from __future__ import annotations

import math

import torch


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] (float, changed in place), bitmask int32 [R, W], rows int64 [R] (distinct): row rows[r] of logits
    keeps the tokens bitmask[r] allows and the rest become -inf."""
    vocab = logits.shape[1]
    # little-endian int32 words as bytes: token t is bit t % 8 of byte t // 8
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [R, 4W]
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    allowed = ((as_bytes.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()  # [R, 32W]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    allowed = allowed[:, :vocab]  # [R, V]
    logits[rows] = logits[rows].masked_fill(~allowed.to(logits.device), -math.inf)
