"""Constrained decoding's token bitmask applied to logits in one kernel, on the rows that have a grammar.

    apply_token_bitmask(logits, bitmask, rows)   # logits [B, V] in place; bitmask int32 [R, W]; rows int64 [R]

The reference (CPU path, and what this is tested against) is `token_bitmask_reference.apply_token_bitmask_reference`.
A program covers BLOCK tokens of one constrained row: it reads BLOCK / 32 words of the mask and writes -inf only
where a token is forbidden, so unconstrained rows are never touched and allowed logits are never rewritten. Triton:
imported on GPUs only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _apply_token_bitmask(logits_ptr, bitmask_ptr, rows_ptr, stride_logits, stride_mask, vocab, words,
                         BLOCK: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    word = tokens // 32
    bits = tl.load(bitmask_ptr + r * stride_mask + word, mask=(tokens < vocab) & (word < words), other=0)
    forbidden = ((bits >> (tokens % 32)) & 1) == 0
    tl.store(logits_ptr + row * stride_logits + tokens, float("-inf"), mask=forbidden & (tokens < vocab))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] (rows may be strided, the last dim contiguous), bitmask int32 [R, W], rows int64 [R], all on one
    device: logits[rows[r], t] = -inf where bitmask[r] forbids t."""
    if rows.numel() == 0:
        return
    vocab = logits.shape[1]
    bitmask = bitmask.contiguous()
    grid = (rows.numel(), triton.cdiv(vocab, BLOCK))
    _apply_token_bitmask[grid](logits, bitmask, rows, logits.stride(0), bitmask.stride(0), vocab, bitmask.shape[1],
                               BLOCK=BLOCK, num_warps=4)
