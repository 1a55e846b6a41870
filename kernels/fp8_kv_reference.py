"""The FP8 KV cache's number format, in plain PyTorch: what kv_store.py writes and the attention kernels read.

Each token's keys (and values) of one KV head, head_dim numbers, are stored as float8 e4m3 (4 exponent bits, 3
mantissa bits, largest 448) times a scale of their own: the power of two that brings their largest magnitude into
[224, 448]. The scale is kept as its 8-bit biased exponent (e8m0, as MXFP4's block scales), beside the cache:
[blocks, block_size, Hkv] uint8, so a token-head costs head_dim + 1 bytes against bf16's 2 * head_dim (1.97x the
tokens at head_dim 64).

Why this and not vLLM's default, one scale per tensor (1.0 for checkpoints without calibrated scales): a per-tensor
scale must cover the largest value any token will ever have, so ordinary tokens sit low in e4m3's range and lose
precision, and a value past 448 saturates; found per token and head when the keys are written, the scale needs no
calibration and no value clips. A power of two, rather than amax / 448 itself, costs at most one binade of headroom
but makes every multiply by the scale or its inverse exact: the store kernel and this reference agree bit for bit
(neither depends on how its division rounds), and a dequantized value (3 mantissa bits) is exact in bf16.

Reading is `dequantize_e4m3`: the e4m3 value widened to float32, times the scale, cast to the attention's dtype (q's),
exactly; every attention path then does the same math as on a cache of that dtype.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
SCALE_DTYPE = torch.uint8  # biased exponents (e8m0): scale = 2 ** (stored - 127)
# the scale's exponent is that of the largest magnitude, less 8, plus one when its mantissa is above 1.75
# (448 = 1.75 * 2**8): amax / scale then lies in [224, 448], the top binade of e4m3
E4M3_MAX_MANTISSA_BITS = 0x600000  # float32 mantissa bits of 1.75
EXPONENT_BELOW_E4M3_MAX = 8


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """float32 largest magnitudes [...] -> their scales' biased exponents (int32 [...], in [1, 254])."""
    bits = amax.float().contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    rounds_up = ((bits & 0x7FFFFF) > E4M3_MAX_MANTISSA_BITS).to(torch.int32)
    return (exponent - EXPONENT_BELOW_E4M3_MAX + rounds_up).clamp(1, 254)


def exponent_to_float(biased: torch.Tensor) -> torch.Tensor:
    """Biased exponents (any integer dtype, 1..254) -> the powers of two they stand for, float32."""
    return (biased.to(torch.int32) << 23).view(torch.float32)


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], scale exponents uint8 [...]): each row scaled by its own power of two."""
    x = x.float()
    biased = scale_exponents(x.abs().amax(dim=-1))
    inverse = exponent_to_float(254 - biased)  # 1 / scale, exactly
    return (x * inverse[..., None]).to(E4M3), biased.to(SCALE_DTYPE)  # torch rounds to nearest even


def dequantize_e4m3(values: torch.Tensor, exponents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 [..., D] and their scale exponents [...] -> [..., D] in dtype."""
    return (values.float() * exponent_to_float(exponents)[..., None]).to(dtype)


def read_cache(cache: torch.Tensor, exponents: torch.Tensor | None, index: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """cache[index] in the attention's dtype: dequantized when the cache is e4m3 (exponents [blocks, block_size,
    Hkv]), else converted (a no-op for a cache of that dtype). index: block ids, any shape."""
    if cache.dtype == E4M3:
        return dequantize_e4m3(cache[index], exponents[index], dtype)
    return cache[index].to(dtype)
