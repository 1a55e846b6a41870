"""The MXFP4 MoE layer in plain PyTorch, from the packed tensors: what the Triton kernel (`mxfp4_moe.py`) is
tested against. Runs on any device; no Triton here.

The packed tensors are a layer's checkpoint tensors for experts [first, first + count):
  gate_up_blocks uint8 [E, 2I, H / 32, 16], gate_up_scales uint8 [E, 2I, H / 32], gate_up_bias [E, 2I]
  down_blocks    uint8 [E, H, I / 32, 16],  down_scales    uint8 [E, H, I / 32],  down_bias    [E, H]
(rows of gate_up interleave gate and up: gate = row 2j, up = row 2j + 1; see mxfp4_reference.py for blocks and
scales). `model.packed_experts.random_packed_experts` makes random ones for tests and benchmarks.
"""

from __future__ import annotations

import torch

from gptoss_serve.kernels.mxfp4_reference import BLOCK_SIZE, dequantize
from gptoss_serve.kernels.swiglu_reference import swiglu

PACKED_NAMES = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales", "down_bias")


def moe_reference(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, *,
                  gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
                  down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor,
                  first: int = 0, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """hidden [N, H], expert_ids [N, K] (global ids), weights [N, K] -> sum_k weights * expert_k(hidden), float32.

    One expert at a time, each dequantized to float32 only while it is used; ids outside [first, first + count)
    contribute nothing. The same math as LocalExperts.forward_loop, with a host sync per expert (a reference).
    """
    count = gate_up_blocks.shape[0]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [N, H]
    x = hidden.float()
    local = expert_ids - first  # [N, K]
    for expert in range(count):
        token, slot = torch.nonzero(local == expert, as_tuple=True)  # the pairs routed to this expert
        if token.numel() == 0:
            continue
        gate_up_w = dequantize(gate_up_blocks[expert], gate_up_scales[expert], dtype=torch.float32)  # [2I, H]
        down_w = dequantize(down_blocks[expert], down_scales[expert], dtype=torch.float32)  # [H, I]
        gate_up = x[token] @ gate_up_w.T + gate_up_bias[expert].float()  # [n, 2I]
        act = swiglu(gate_up, alpha=alpha, limit=limit)  # [n, I]
        y = act @ down_w.T + down_bias[expert].float()  # [n, H]
        out.index_add_(0, token, y * weights[token, slot, None].float())
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN (never passes a < check)."""
    out, ref = out.double(), ref.double()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def packed_bytes_per_expert(hidden: int, inter: int, *, bias_bytes: int = 4) -> int:
    """Bytes one expert's packed weights occupy as the kernel reads them: blocks + scales + bias."""
    values = 2 * inter * hidden + hidden * inter
    return values // 2 + values // BLOCK_SIZE + (2 * inter + hidden) * bias_bytes

