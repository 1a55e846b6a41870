"""MXFP4, the format OpenAI ships gpt-oss expert weights in: the only module that knows blocks and scales.

A matrix of logical shape [..., rows, cols] is stored as
  blocks: uint8 [..., rows, cols / 32, 16]   two E2M1 (FP4) values a byte, low nibble first
  scales: uint8 [..., rows, cols / 32]       one E8M0 exponent (bias 127) per block of 32 values
and value = FP4_VALUES[nibble] * 2 ** (scale - 127).

In a checkpoint, a weight `name` of transformers' dense shape [..., in, out] is stored transposed, [..., out, in]
(blocks run along the input dimension, the one a matrix product sums over), as `name_blocks` and `name_scales`.
`stored_layout`, `read_dense`, `read_packed` and `random_part` are how the checkpoint reader and writer handle it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

BLOCK_SIZE = 32  # values sharing one scale
SCALE_BIAS = 127  # E8M0 exponent bias
# E2M1 code -> value: sign bit, two exponent bits, one mantissa bit
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_RMS = 2.93  # RMS of FP4_VALUES over uniformly random codes: what random blocks scale by
BLOCKS, SCALES = "_blocks", "_scales"  # suffixes of a stored weight's two tensors

# read(stored name, *, expect=shape, expect_dtype=dtype) -> that tensor; raises if it has another shape or dtype
ReadStored = Callable[..., torch.Tensor]


def tensor_names(name: str) -> tuple[str, str]:
    """The two tensors a weight called `name` is stored as: (blocks, scales)."""
    return name + BLOCKS, name + SCALES


def is_part(name: str) -> bool:
    """Whether a stored tensor is the blocks or the scales of some weight."""
    return name.endswith((BLOCKS, SCALES))


def stored_layout(name: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A weight of transformers' dense shape [..., in, out] -> its stored tensors: name -> (shape, dtype)."""
    *lead, fan_in, fan_out = shape
    if fan_in % BLOCK_SIZE:
        raise ValueError(f"MXFP4 weight {name!r} needs its input dimension to be a multiple of {BLOCK_SIZE}, "
                         f"got {tuple(shape)}")
    groups = fan_in // BLOCK_SIZE
    blocks, scales = tensor_names(name)
    return {blocks: ((*lead, fan_out, groups, BLOCK_SIZE // 2), torch.uint8),
            scales: ((*lead, fan_out, groups), torch.uint8)}


def read_dense(read: ReadStored, name: str, shape: tuple[int, ...], *,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight `name` of transformers' dense shape [..., in, out], decoded from its stored blocks and scales.

    `read` checks each stored tensor's shape and dtype, so its errors can name the file the tensor is in.
    """
    blocks, scales = read_packed(read, name, shape)
    return dequantize(blocks, scales, dtype=dtype).transpose(-1, -2).contiguous()  # [..., in, out]


def read_packed(read: ReadStored, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight `name` of transformers' dense shape [..., in, out] as stored: (blocks uint8 [..., out, in / 32,
    16], scales uint8 [..., out, in / 32]), each checked by `read` against its expected shape and dtype."""
    (blocks_name, blocks_spec), (scales_name, scales_spec) = stored_layout(name, shape).items()
    return (read(blocks_name, expect=blocks_spec[0], expect_dtype=blocks_spec[1]),
            read(scales_name, expect=scales_spec[0], expect_dtype=scales_spec[1]))


def random_part(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random stored blocks or scales (by the name's suffix) of the given stored shape, for test checkpoints.

    Uniform random codes, scaled so the weight's values have a standard deviation near 1 / sqrt(fan_in), like
    the random dense matrices beside them.
    """
    if name.endswith(BLOCKS):
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8, device=generator.device)
    if not name.endswith(SCALES):
        raise ValueError(f"{name!r} is neither MXFP4 blocks nor scales")
    fan_in = shape[-1] * BLOCK_SIZE  # scales are [..., out, in / 32]
    exponent = round(math.log2(fan_in**-0.5 / FP4_RMS))
    # exponents vary by one either way, as trained ones do
    jitter = torch.randint(-1, 2, shape, generator=generator, device=generator.device)
    return (SCALE_BIAS + exponent + jitter).to(torch.uint8)


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
