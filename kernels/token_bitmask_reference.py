"""Constrained decoding's token bitmask applied to logits, in plain PyTorch (NumPy unpacks the bits): the CPU's path
and what the Triton kernel (`token_bitmask.py`) is tested against. No Triton here.

A bitmask row is int32 [W], W = ceil(V / 32): token t is allowed where bit t % 32 of word t // 32 is set (llguidance's
layout). Tokens past 32 * W are forbidden; bits past V are ignored.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def unpack_token_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [R, W] -> bool [R, vocab] on the bitmask's device: True where the token is allowed."""
    # little-endian int32 words read as bytes: token t is bit t % 8 of byte t // 8
    as_bytes = bitmask.detach().cpu().contiguous().numpy().view(np.uint8)  # [R, 4W]
    count = min(vocab, as_bytes.shape[1] * 8)
    bits = np.unpackbits(as_bytes, axis=1, count=count, bitorder="little")  # [R, count] of 0 / 1
    allowed = torch.from_numpy(bits).view(torch.bool)
    if count < vocab:  # tokens past the mask: forbidden
        allowed = torch.nn.functional.pad(allowed, (0, vocab - count), value=False)
    return allowed.to(bitmask.device)


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] (float, changed in place), bitmask int32 [R, W], rows int64 [R] (distinct): row rows[r] of logits
    keeps the tokens bitmask[r] allows and the rest become -inf."""
    allowed = unpack_token_bitmask(bitmask, logits.shape[1]).to(logits.device)  # [R, V]
    logits[rows] = torch.where(allowed, logits[rows], -math.inf)
