"""MXFP4 values decoded in plain PyTorch: what the MoE reference (`moe_reference.py`) and the checkpoint reader
(`model.mxfp4`, which re-exports these names and alone knows how a checkpoint stores and names them) decode with; the
Triton kernels decode the same bytes inline (`mxfp4_moe_kernels.py`). No Triton here.

A matrix of logical shape [..., rows, cols] is held as
  blocks: uint8 [..., rows, cols / 32, 16]   two E2M1 (FP4) values a byte, low nibble first
  scales: uint8 [..., rows, cols / 32]       one E8M0 exponent (bias 127) per block of 32 values
and value = FP4_VALUES[nibble] * 2 ** (scale - 127).
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 32  # values sharing one scale
SCALE_BIAS = 127  # E8M0 exponent bias
# E2M1 code -> value: sign bit, two exponent bits, one mantissa bit
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., rows, G, 16] blocks + [..., rows, G] scales -> [..., rows, G * 32] values, on blocks' device.

    Exact in bf16 and float32: every value is a small FP4 number times a power of two.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]), dim=-1)  # [..., G, 16, 2]
    values = values.flatten(-3)  # [..., G * 32], low nibble first
    exponents = scales.int() - SCALE_BIAS  # [..., G]
    return torch.ldexp(values, exponents.repeat_interleave(BLOCK_SIZE, dim=-1).to(dtype))
