"""MXFP4, the format OpenAI ships gpt-oss expert weights in: the only module that knows how a checkpoint names,
lays out and reads its blocks and scales.

A matrix of logical shape [..., rows, cols] is stored as
  blocks: uint8 [..., rows, cols / 32, 16]   two E2M1 (FP4) values a byte, low nibble first
  scales: uint8 [..., rows, cols / 32]       one E8M0 exponent (bias 127) per block of 32 values
and value = FP4_VALUES[nibble] * 2 ** (scale - 127). That decoding math (`dequantize` and its constants) lives beside
the kernels that decode the same bytes, in kernels/mxfp4_reference.py, and is re-exported here.

In a checkpoint, a weight `name` of transformers' dense shape [..., in, out] is stored transposed, [..., out, in]
(blocks run along the input dimension, the one a matrix product sums over), as `name_blocks` and `name_scales`.
`stored_layout`, `read_dense`, `read_packed` and `random_part` are how the checkpoint reader and writer handle it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# the decoding math, kept beside the kernels and re-exported: mxfp4.dequantize, mxfp4.BLOCK_SIZE, ...
from gptoss_serve.kernels.mxfp4_reference import BLOCK_SIZE, FP4_VALUES, SCALE_BIAS, dequantize

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
