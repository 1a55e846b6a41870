"""What the paged-attention kernels (varlen_attention.py, split_kv_attention.py) share: how they read a tile of
the cache, the tile product they take for q.k and p.v, and where a running max starts.

Two kernels compute the same attention and are tested against one reference, so they must multiply alike: float32
operands get IEEE float32 products (a float32 model, not TF32's 10-bit mantissas), bf16 ones the matrix unit's
native product with float32 accumulation. They read the cache alike too: a tile is converted to q's dtype (a no-op
for a cache of that dtype; exact for e4m3), and an e4m3 cache's power-of-two scales (fp8_kv_reference.py) are applied
to the scores and probabilities its tiles meet (kv_scales), so on what it reads the attention is the one of the
dequantized cache in q's dtype.
This module imports Triton: import it only where a GPU is (or under Triton's interpreter).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.fp8_kv_reference import SCALE_DTYPE
from gptoss_serve.kernels.paged_attention import check_scales

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: for checking logic only
# a running max that starts finite: a row that saw no key yet keeps exp(0) = 1 as its rescale
NEG = tl.constexpr(-1.0e30)
LOG2E = tl.constexpr(1.4426950408889634)  # kernels take softmax in base 2: exp2 is one GPU instruction


@triton.jit
def tile_dot(a, b, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter's low-precision dot is not exact; its float32 one is
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:  # a float32 model gets float32 products, not TF32's 10-bit mantissas
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def load_kv_tile(cache_ptr, block, offset, kv_head, d, key_ok, stride_b, stride_s, stride_h, dtype: tl.constexpr):
    """The keys (or values) of positions at (block, offset) [BLOCK_N] of one KV head -> [BLOCK_N, D] in dtype; zeros
    where not key_ok. An e4m3 cache's values come unscaled (exact in bf16 and float32): see kv_scales."""
    x = tl.load(cache_ptr + block[:, None] * stride_b + offset[:, None] * stride_s + kv_head * stride_h + d[None, :],
                mask=key_ok[:, None], other=0.0)
    return x.to(dtype)


@triton.jit
def kv_scales(scales_ptr, block, offset, kv_head, key_ok, stride_b, stride_s):
    """An e4m3 cache's scales of the positions at (block, offset) [BLOCK_N] of one KV head -> float32 [BLOCK_N],
    2 ** (exponent - 127); 0 where not key_ok.

    A kernel applies them to the products, not to the tile: a key's scale multiplies its column of q.k, a value's
    scale the column of p that meets it in p.v. Scaling by a power of two is exact in float32 and bf16, so this is
    the attention of the dequantized cache, for one multiply per score instead of one per cached number."""
    biased = tl.load(scales_ptr + block * stride_b + offset * stride_s + kv_head, mask=key_ok, other=0)
    return (biased.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def attend_tile(q, m, l, acc, start, position, key_end, table, k_ptr, v_ptr, k_scales_ptr, v_scales_ptr, kv_head, d,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_sb, stride_ss, qk_scale,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, WINDOW: tl.constexpr, MASKED: tl.constexpr,
                 FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """The keys at start .. start + BLOCK_N - 1 (those before key_end) of one KV head folded into the online softmax
    (m, l, acc) of q's rows, in base 2 (qk_scale carries log2(e)). MASKED: each row sees the keys up to its
    position (and within WINDOW when > 0) and none from key_end on; off where every row sees every key of the tile,
    which saves the [ROWS, BLOCK_N] compares and selects that long prompts would otherwise pay on every tile.
    Both kernels fold their tiles in here, so that they multiply, mask and exponentiate alike."""
    key_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    key_ok = key_pos < key_end
    block = tl.load(table + key_pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    offset = key_pos % BLOCK_SIZE
    k = load_kv_tile(k_ptr, block, offset, kv_head, d, key_ok, stride_kb, stride_ks, stride_kh, q.dtype)
    v = load_kv_tile(v_ptr, block, offset, kv_head, d, key_ok, stride_vb, stride_vs, stride_vh, q.dtype)
    s = tile_dot(q, tl.trans(k), INTERPRET) * qk_scale  # [ROWS, BLOCK_N]
    if FP8:  # each key's scale on its column of scores (kv_scales)
        s *= kv_scales(k_scales_ptr, block, offset, kv_head, key_ok, stride_sb, stride_ss)[None, :]
    if MASKED:
        visible = (key_pos[None, :] <= position[:, None]) & key_ok[None, :]
        if WINDOW > 0:
            visible &= position[:, None] - key_pos[None, :] < WINDOW
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    rescale = tl.exp2(m - m_new)
    l = l * rescale + tl.sum(p, axis=1)
    if FP8:  # each value's scale on the column of p that meets it
        p *= kv_scales(v_scales_ptr, block, offset, kv_head, key_ok, stride_sb, stride_ss)[None, :]
    acc = acc * rescale[:, None] + tile_dot(p.to(v.dtype), v, INTERPRET)
    return m_new, l, acc


def query_group(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> int:
    """G, the query heads sharing each KV head, after the checks both kernels need: contiguous head dimensions and
    G a power of two (a kernel's rows are tiles of whole groups)."""
    if q.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head) dimension")
    Hq, Hkv = q.shape[1], key_cache.shape[2]
    G = Hq // Hkv
    if Hq % Hkv or G & (G - 1):
        raise ValueError(f"{Hq} query heads over {Hkv} KV heads: the group size must be a power of two")
    return G


def scale_strides(key_cache: torch.Tensor, key_scales: torch.Tensor | None,
                  value_scales: torch.Tensor | None) -> tuple[int, int]:
    """The (block, offset) strides load_kv_tile reads both scale tensors with; (0, 0) without scales (a cache of
    q's dtype or wider). Scales come with e4m3 caches only, shaped as the caches less D, each head's one after
    another."""
    check_scales(key_cache, key_scales, value_scales)
    if key_scales is None:
        return 0, 0
    for scales in (key_scales, value_scales):
        if scales.dtype != SCALE_DTYPE or scales.shape != key_cache.shape[:3] or scales.stride(2) != 1:
            raise ValueError(f"scales must be {SCALE_DTYPE} {tuple(key_cache.shape[:3])} with contiguous heads, got "
                             f"{scales.dtype} {tuple(scales.shape)}")
    if key_scales.stride() != value_scales.stride():
        raise ValueError("key and value scales must share their strides")
    return key_scales.stride(0), key_scales.stride(1)
