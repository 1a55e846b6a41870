"""Reading packed expert weights the way the MoE kernels do, and nothing else: a measuring instrument.

The MXFP4 MoE kernels stay at ~35-40% of copy bandwidth whatever their decode costs (kernels/NOTES-mxfp4-moe.md).
One suspect is the access pattern itself: in the checkpoint's layout ([E, rows, in / 32, 16] bytes) a reduction step
of a program takes 32-64 bytes of each of its 64-256 rows, rows 1,440 bytes apart. `_stream` reads an expert
tensor in exactly those pieces and only xors them together (one checksum a row tile, so no load is dropped), so
bench/weight_stream.py can time the pattern alone, against:
  - the same pattern with each row's next bytes asked of L2 a window ahead (l2_prefetch.py), and
  - the weights re-laid in tiles (`tile_rows`): 16 rows x 2 blocks (512 bytes) contiguous, so that each step's
    pieces are whole 512-byte runs.
Programs are persistent (a fixed number per SM, each taking row tiles in turn), so the concurrency of the real
kernels (~3 programs an SM) can be set.

This module imports Triton: import it only where a CUDA GPU is (the reference is weight_stream_reference.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.l2_prefetch import prefetch_first_windows, prefetch_next_window

TILE_ROWS, TILE_GROUPS = 16, 2  # the tiled layout's runs: 16 rows x 2 blocks of 16 bytes


def tile_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 words [E, R, G, 4] (blocks in the checkpoint's order) -> the same words re-laid as
    [E, R / 16, G / 2, 16, 2, 4] (contiguous): every 16 rows x 2 blocks one 512-byte run."""
    E, R, G, W = words.shape
    if R % TILE_ROWS or G % TILE_GROUPS or W != 4:
        raise ValueError(f"words {tuple(words.shape)}: rows must be a multiple of {TILE_ROWS} and blocks of "
                         f"{TILE_GROUPS}, 4 words a block")
    tiled = words.view(E, R // TILE_ROWS, TILE_ROWS, G // TILE_GROUPS, TILE_GROUPS, 4).permute(0, 1, 3, 2, 4, 5)
    return tiled.contiguous()


@triton.jit
def _stream(w_ptr, out_ptr, n_rows, n_groups, num_tiles,
            BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, TILED: tl.constexpr, PREFETCH: tl.constexpr,
            WINDOW: tl.constexpr, BULK: tl.constexpr):
    """out[t] = the xor of every word of row tile t (BLOCK_R rows of one expert, tiles in expert order), read
    GROUPS blocks a row a step. PREFETCH: each row's bytes asked of L2 WINDOW bytes at a time, two windows ahead
    (checkpoint layout only; BULK: see prefetch_l2)."""
    tiles_per_expert = tl.cdiv(n_rows, BLOCK_R)
    groups = tl.arange(0, GROUPS)
    words = tl.arange(0, 4)
    if TILED:
        tl.static_assert(GROUPS % 2 == 0)
        group_words = (groups // 2) * 128 + (groups % 2) * 4  # a tile of 16 rows x 2 blocks: 128 words
        step_words: tl.constexpr = 64  # per block: a step of GROUPS blocks moves GROUPS / 2 tiles on
    else:
        group_words = groups * 4
        step_words: tl.constexpr = 4
    for t in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        expert = t // tiles_per_expert
        rows = (t % tiles_per_expert) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        base = w_ptr + expert.to(tl.int64) * n_rows * n_groups * 4
        if TILED:
            row_words = (rows // 16).to(tl.int64) * n_groups * 64 + (rows % 16) * 8
        else:
            row_words = rows.to(tl.int64) * n_groups * 4
        ptrs = base + row_words[:, None, None] + group_words[None, :, None] + words[None, None, :]
        if PREFETCH:  # the MoE kernels' own windows (l2_prefetch.py), from block 0
            row_start = base + row_words
            prefetch_first_windows(row_start, 0, n_groups, row_ok, WINDOW, BULK)
        acc = tl.zeros([BLOCK_R, GROUPS, 4], dtype=tl.int32)
        w = tl.load(ptrs, mask=row_ok[:, None, None] & (groups < n_groups)[None, :, None], other=0)
        for g in range(0, n_groups, GROUPS):
            if PREFETCH:
                prefetch_next_window(row_start, g, 0, n_groups, row_ok, WINDOW, GROUPS, BULK)
            nxt = g + GROUPS
            mask = row_ok[:, None, None] & ((nxt + groups) < n_groups)[None, :, None]
            w_next = tl.load(ptrs + nxt * step_words, mask=mask, other=0)  # the next step's loads go out first
            acc = acc ^ w
            w = w_next
        tl.store(out_ptr + t, tl.xor_sum(tl.xor_sum(tl.xor_sum(acc, axis=2), axis=1), axis=0))


def stream_checksums(words: torch.Tensor, *, block_rows: int, groups: int, tiled: bool = False,
                     prefetch_bytes: int = 0, bulk: bool = True, programs: int | None = None, num_warps: int = 4,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [E * ceil(R / block_rows)]: the xor of each row tile's words, read `groups` blocks a row a step. words:
    [E, R, G, 4] int32 in the checkpoint's layout, or tile_rows() of such (tiled=True). prefetch_bytes: each row's
    bytes asked of L2 that many at a time (0: not), in a bulk
    instruction or line by line (bulk=False). programs: how many persistent programs (default one a tile)."""
    if tiled:
        E, r_tiles, g_tiles, _, _, _ = words.shape
        n_rows, n_groups = r_tiles * TILE_ROWS, g_tiles * TILE_GROUPS
    else:
        E, n_rows, n_groups, _ = words.shape
    if prefetch_bytes and (tiled or prefetch_bytes % 128 or prefetch_bytes % (16 * groups)
                           or prefetch_bytes > n_groups * 16):
        raise ValueError(f"prefetch_bytes {prefetch_bytes}: checkpoint layout only, a multiple of 128 and of a step "
                         f"({16 * groups} bytes a row), at most a row ({n_groups * 16} bytes)")
    num_tiles = E * triton.cdiv(n_rows, block_rows)
    out = torch.empty(num_tiles, dtype=torch.int32, device=words.device) if out is None else out
    _stream[(min(programs or num_tiles, num_tiles),)](
        words, out, n_rows, n_groups, num_tiles, BLOCK_R=block_rows, GROUPS=groups, TILED=tiled,
        PREFETCH=prefetch_bytes > 0, WINDOW=prefetch_bytes or 128, BULK=bulk, num_warps=num_warps)
    return out
