"""A MoE layer's (token, slot) pairs grouped by local expert with torch's sort: plain PyTorch, no host sync (so it
can be captured in a CUDA graph), on any device.

The dense experts' grouped products (model/experts.py) and the MXFP4 kernels' widened path sort this way; the fused
MXFP4 kernels do too above mxfp4_moe.SORT_ROUTE_PAIRS pairs, where their one-program counting sort (`_route`) gets
slow (232 us at 4,096 tokens of 20b on an H100: kernels/NOTES-mxfp4-moe.md). Both sorts are stable, so they give
the same order.
"""

from __future__ import annotations

import torch


def sort_by_expert(expert_ids: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global expert ids [P] (flat, pair index token * K + slot) of a shard of experts [first, first + count) ->
    (sorted keys, order) [P] each: a pair's key is its local expert, or `count` for pairs outside the shard, which
    so sort after the last expert; order is stable (by pair index within an expert)."""
    local = expert_ids - first
    keys = torch.where((local >= 0) & (local < count), local, count)
    return torch.sort(keys, stable=True)


def expert_ends(sorted_keys: torch.Tensor, count: int) -> torch.Tensor:
    """int32 [count]: where each local expert's sorted rows end (torch._grouped_mm's offs). A search of the sorted
    keys, not bincount, which waits for the host on CUDA to size its output."""
    experts = torch.arange(count, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, experts, right=True).to(torch.int32)
