"""MXFP4, the format OpenAI ships gpt-oss expert weights in: the only module that knows blocks and scales.

A weight of logical shape [..., rows, cols] is stored as
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


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] -> (blocks, scales), rounding each value to the nearest FP4 after a per-block scale.

    Used to write random MXFP4 checkpoints and in tests; not a calibrated quantizer.
    """
    if weight.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, got {weight.shape[-1]}")
    w = weight.float().unflatten(-1, (-1, BLOCK_SIZE))  # [..., G, 32]
    amax = w.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    # the largest FP4 magnitude is 6 = 1.5 * 2**2: pick the exponent that maps the block's max inside it
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 255 - SCALE_BIAS)
    scaled = w / torch.exp2(exponent)[..., None]
    magnitudes = torch.tensor(FP4_VALUES[:8], device=w.device)
    codes = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)  # nearest magnitude, [..., G, 32]
    codes = codes | ((scaled < 0).long() << 3)
    codes = codes.to(torch.uint8).unflatten(-1, (BLOCK_SIZE // 2, 2))
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
