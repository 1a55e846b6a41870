"""The MXFP4 MoE layer on the GPU: the launcher of the Triton kernels (mxfp4_moe_kernels.py) that read expert
weights packed.

Hopper has no FP4 matrix units; the gain is bytes. Each kernel streams FP4 codes (half a byte a value) and E8M0
scales, decodes them to bf16 in registers and multiplies with tl.dot in bf16 with float32 accumulation.

One call is four launches (five with split-K), none waiting on the host (so it can be captured in a CUDA graph):
  _route     one program: counting sort of the (token, slot) pairs by local expert, stable, on the device (above
             SORT_ROUTE_PAIRS pairs torch's stable sort instead: moe_sort.py, the same order)
  _gate_up   per (expert row tile, column tile): x @ gate_up + bias, clamped SwiGLU -> act [pairs, I], sorted order
  _down      per (expert row tile, column tile): act @ down + bias, times the routing weight -> y [pairs, H]
  _combine   per token: the sum of its K rows of y (deterministic, no atomics): in slot order within each of 8
             groups of experts, then the groups up a fixed tree, so that expert-parallel shards' float32 answers
             add up to the whole layer's output bit for bit (see layer_experts)
With a handful of tokens (decode) there are too few tiles to fill the GPU, so the "decode" tiles split each
reduction over 2 programs (a third grid axis): _gate_up then stores float32 partial sums that _swiglu_splits adds
up (in split order) before the SwiGLU, and _down's partials are added by _combine.
The matrix products are computed transposed (weights x tokens^T): the weights' output rows fill the matrix unit's
M side, so a handful of tokens (decode) needs only the smallest token tile (16).
Other presets replace _route, _gate_up and _down (_combine always ends the call): "gemv" (a handful of tokens: one
pair a program on the CUDA cores, mxfp4_moe_gemv.py), "scaled" (Triton's scaled dot, mxfp4_moe_scaled.py) and
"widened" (hundreds of tokens an expert: the experts widened to bf16, then torch's grouped products,
mxfp4_moe_widened.py).

Weights are read in the checkpoint's own layout, blocks [E, out, in / 32, 16] bytes viewed as 32-bit words
[E, out, in / 32, 4]: a word holds eight consecutive values (value q in bits 4q..4q+3, low nibble first), four words
a block, one scale [E, out, in / 32] a block. Nothing is re-laid at load.

This module imports Triton: import it only where a CUDA GPU is (the reference is `moe_reference.py`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton

from gptoss_serve.kernels.dispatch import grouped_mm_supported
from gptoss_serve.kernels.moe_sort import expert_ends, sort_by_expert
from gptoss_serve.kernels.mxfp4_moe_gemv import _down_gemv, _gate_up_gemv
from gptoss_serve.kernels.mxfp4_moe_kernels import GROUP, SUM_GROUPS, _combine, _down, _gate_up, _route, _swiglu_splits
from gptoss_serve.kernels.mxfp4_moe_scaled import _down_scaled, _gate_up_scaled
from gptoss_serve.kernels.mxfp4_moe_widened import grouped_moe, widened_bytes

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: for checking logic only



@dataclass(frozen=True)
class Tiles:
    """Block sizes of one call. block_m: sorted (token, expert) rows a program takes; *_n: output columns a program
    computes (gate_up reads twice as many weight rows: gate and up); *_groups: 32-value blocks per reduction step;
    depth: reduction steps loaded ahead of the one being multiplied (1 or 3): the bytes a program keeps in flight;
    split_k: programs sharing one tile's reduction (more programs when few tokens leave too few tiles to fill the
    GPU), their float32 partial sums added by the next kernel in a fixed order. gemv: one (token, expert) pair a
    program on the CUDA cores (mxfp4_moe_gemv.py; block_m and depth unused there). scaled: the kernels written
    with Triton's scaled dot (mxfp4_moe_scaled.py), the reduction pipelined over `stages` steps by the compiler
    (depth and split_k unused there). widened: every expert widened to bf16, then torch's grouped matrix products
    (mxfp4_moe_widened.py; the block sizes unused there). prefetch: the tensor-core kernels ask L2 for each weight
    row's bytes this many at a time (a multiple of 128, and of a step's bytes), two windows ahead of their loads,
    in one bulk instruction a row (prefetch_bulk) or a line prefetch a 128 bytes (kernels/l2_prefetch.py); 0: not.
    The matrix-vector kernels, whose row tiles are contiguous, ask for the whole tile before the loop when it is
    nonzero."""

    block_m: int
    gate_up_n: int
    gate_up_groups: int
    down_n: int
    down_groups: int
    num_warps: int
    depth: int = 3
    split_k: int = 1
    gemv: bool = False
    half2: bool = False  # gemv only: the products in fp16 pairs (mxfp4_moe_gemv.py's HALF2)
    scaled: bool = False
    stages: int = 3
    widened: bool = False
    prefetch: int = 0
    prefetch_bulk: bool = False
    down_warps: int = 0  # the down kernel's warps, where they differ from num_warps (0: the same)
    prefetch_down: bool = False  # matrix-vector kernels: each gate_up program, done, asks L2 for down rows it maps to

    def __post_init__(self) -> None:
        if self.prefetch and (self.prefetch % 128 or self.prefetch % (16 * self.gate_up_groups)
                              or self.prefetch % (16 * self.down_groups)):
            raise ValueError(f"prefetch {self.prefetch}: a multiple of 128 bytes and of a step's bytes "
                             f"({16 * self.gate_up_groups} and {16 * self.down_groups} a row)")


# by rows per expert: decode (a few tokens an expert: the smallest token tile; narrow column tiles when few experts
# are touched, so that enough programs share their weights) to prefill (wide token tiles, so each decoded weight tile
# serves more tokens). Loading three steps ahead measured no faster than one (kernels/NOTES-mxfp4-moe.md), and
# costs registers where the accumulators are large.
PRESETS = {
    "gemv": Tiles(block_m=1, gate_up_n=8, gate_up_groups=8, down_n=8, down_groups=8, num_warps=1, depth=1,
                  gemv=True),
    # the same in fp16 pairs: ~0.7x the instructions a value (bench/kernel_sass.py), 1.11x the engine's batch-1
    # decode and 1.25x at batch 4 on an H100 (BENCHMARKS.md): what calls pick; GPTOSS_MOE_PRESETS=gemv_h2=gemv
    # swaps the float32 one back in
    "gemv_h2": Tiles(block_m=1, gate_up_n=8, gate_up_groups=8, down_n=8, down_groups=8, num_warps=1, depth=1,
                     gemv=True, half2=True),
    "decode": Tiles(block_m=16, gate_up_n=64, gate_up_groups=2, down_n=64, down_groups=4, num_warps=4, depth=1,
                    split_k=2),
    "decode_wide": Tiles(block_m=16, gate_up_n=64, gate_up_groups=2, down_n=64, down_groups=4, num_warps=4),
    "medium": Tiles(block_m=64, gate_up_n=64, gate_up_groups=2, down_n=64, down_groups=2, num_warps=4, depth=1),
    "prefill": Tiles(block_m=128, gate_up_n=128, gate_up_groups=2, down_n=128, down_groups=2, num_warps=8, depth=1),
    # the scaled-dot kernels (gate_up_n act columns read 2 * gate_up_n weight rows; groups * 32 values a step)
    "scaled_decode": Tiles(block_m=16, gate_up_n=64, gate_up_groups=4, down_n=128, down_groups=4, num_warps=4,
                           scaled=True, stages=4),
    "scaled_medium": Tiles(block_m=32, gate_up_n=64, gate_up_groups=4, down_n=128, down_groups=4, num_warps=4,
                           scaled=True, stages=4),
    "scaled_prefill": Tiles(block_m=128, gate_up_n=128, gate_up_groups=2, down_n=256, down_groups=2, num_warps=8,
                            scaled=True, stages=3),
    "widened": Tiles(block_m=128, gate_up_n=128, gate_up_groups=2, down_n=128, down_groups=2, num_warps=8, depth=1,
                     widened=True),
}
# the presets with their weights asked of L2 ahead of the loads (the tensor-core ones each row's next 256 bytes,
# gemv_h2 its whole row tile): not picked by any call until timed (kernels/NOTES-mxfp4-moe.md, "Weight reads"); GPTOSS_MOE_PRESETS=decode_wide=decode_wide_prefetch,...
# runs them in the engine
PRESETS |= {f"{name}_prefetch": replace(PRESETS[name], prefetch=256)
            for name in ("gemv_h2", "decode", "decode_wide", "medium", "prefill")}


# below this many pairs an expert, nearly every touched expert serves one token: the matrix-vector kernels
GEMV_PER_EXPERT = 0.5
# above this many pairs an expert the layer is bound by its products: widen the experts to bf16 and use grouped GEMMs,
# where the layer's widened weights fit WIDEN_MAX_BYTES (gpt-oss-20b's 32 experts: 1.06 GB; 120b's 128 would take 4.2).
# Not yet timed on a GPU, so off unless asked for (GPTOSS_MOE_WIDEN_PER_EXPERT=128); the figure that would make it
# the default is kernels/NOTES-mxfp4-moe.md's prediction for 20b: ~4 ms a layer against ~7 at 8,192 tokens
WIDEN_PER_EXPERT = float(os.environ.get("GPTOSS_MOE_WIDEN_PER_EXPERT", "inf"))
WIDEN_MAX_BYTES = 5 << 28  # 1.25 GiB
# experts that hold a bf16 copy beside the packed one (Mxfp4Experts.keep_bf16_copy) need no widening a call, so the
# grouped products win sooner: once the fused kernels are bound by their products more than the copy's bytes (3.75x
# the packed ones) cost. Predicted from the H100 tables in kernels/NOTES-mxfp4-moe.md ("A resident bf16 copy"), to
# be checked by `bench.moe_kernel --bf16-expert-copy`; GPTOSS_MOE_RESIDENT_WIDEN_PER_EXPERT moves it.
RESIDENT_WIDEN_PER_EXPERT = float(os.environ.get("GPTOSS_MOE_RESIDENT_WIDEN_PER_EXPERT", "64"))
# above this many pairs the fused kernels' pairs are sorted by torch (moe_sort.py) rather than by _route
SORT_ROUTE_PAIRS = 4096


def pick_tiles(num_pairs: int, num_experts: int, *, widened_bytes: int | None = None,
               resident: bool = False) -> Tiles:
    """Tiles for a call routing num_pairs (token, expert) pairs over num_experts experts (host numbers only; the
    whole layer's, so that every expert-parallel shard picks what the whole layer would). widened_bytes: what
    widening the layer's experts would hold (None: not an option). resident: the experts hold a bf16 copy and the
    device has the grouped products. The thresholds follow the H100 sweeps in kernels/NOTES-mxfp4-moe.md."""
    per_expert = num_pairs / num_experts
    if per_expert <= GEMV_PER_EXPERT:
        name = "gemv_h2"
    elif per_expert <= 1:
        name = "decode"
    elif per_expert <= 16:
        name = "decode_wide"
    elif resident and per_expert > RESIDENT_WIDEN_PER_EXPERT:
        name = "widened"
    elif per_expert <= 64:
        name = "medium"
    elif per_expert <= WIDEN_PER_EXPERT or widened_bytes is None or widened_bytes > WIDEN_MAX_BYTES:
        name = "prefill"
    else:
        name = "widened"
    return PRESETS[_PRESET_SWAPS.get(name, name)]


# a benchmark's A/B without editing this file: GPTOSS_MOE_PRESETS="decode_wide=scaled_decode,medium=scaled_medium"
# runs the second preset wherever the first would be picked
_PRESET_SWAPS = dict(pair.split("=", 1) for pair in os.environ.get("GPTOSS_MOE_PRESETS", "").split(",") if pair)


@dataclass
class Workspace:
    """The buffers of one call; pass one in (e.g. filled with poison in tests) or let the call allocate it."""

    sorted_pairs: torch.Tensor  # int32 [N * K]: pair index (token * K + slot), grouped by local expert
    expert_start: torch.Tensor  # int32 [count + 1]: where each expert's pairs start in sorted_pairs
    act: torch.Tensor  # bf16 [N * K, I], rows in sorted order
    y: torch.Tensor  # [split_k, N * K, H], rows by pair index: bf16, or float32 partial sums when split_k > 1
    gate_up_partials: torch.Tensor | None = None  # float32 [split_k, N * K, 2I] when split_k > 1

    @property
    def split_k(self) -> int:
        return self.y.shape[0]


# --------------------------------------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class PackedExperts:
    """One layer's experts [first, first + count) as the kernels read them (the checkpoint's tensors)."""

    gate_up_blocks: torch.Tensor  # int32 [E, 2I, H / 32, 4]: the uint8 [E, 2I, H / 32, 16] blocks, as words
    gate_up_scales: torch.Tensor  # uint8 [E, 2I, H / 32]
    gate_up_bias: torch.Tensor  # float32 or bf16 [E, 2I]
    down_blocks: torch.Tensor  # int32 [E, H, I / 32, 4]
    down_scales: torch.Tensor  # uint8 [E, H, I / 32]
    down_bias: torch.Tensor  # float32 or bf16 [E, H]
    # the same weights widened to bf16, held beside the packed ones (Mxfp4Experts.keep_bf16_copy), or None
    gate_up_widened: torch.Tensor | None = None  # bf16 [E, 2I, H]
    down_widened: torch.Tensor | None = None  # bf16 [E, H, I]

    @classmethod
    def of(cls, gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
           down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor, *,
           gate_up_widened: torch.Tensor | None = None, down_widened: torch.Tensor | None = None) -> PackedExperts:
        """A view of a shard's checkpoint tensors (shapes in moe_reference.py): nothing copied when they are
        contiguous; the uint8 blocks are read as 32-bit words. gate_up_widened / down_widened: a bf16 copy of the
        weights ([E, 2I, H] / [E, H, I], both or neither), which the widened path then multiplies as it is."""
        E, two_i, h_groups, _ = gate_up_blocks.shape
        _, hidden, i_groups, _ = down_blocks.shape
        inter = two_i // 2
        expect = {
            "gate_up_scales": (gate_up_scales, (E, two_i, h_groups)), "gate_up_bias": (gate_up_bias, (E, two_i)),
            "down_blocks": (down_blocks, (E, hidden, inter // GROUP, 16)),
            "down_scales": (down_scales, (E, hidden, i_groups)), "down_bias": (down_bias, (E, hidden)),
        }
        if (gate_up_widened is None) != (down_widened is None):
            raise ValueError("a bf16 copy of the experts needs both gate_up_widened and down_widened")
        if gate_up_widened is not None:
            expect |= {"gate_up_widened": (gate_up_widened, (E, two_i, hidden)),
                       "down_widened": (down_widened, (E, hidden, inter))}
            if gate_up_widened.dtype != torch.bfloat16 or down_widened.dtype != torch.bfloat16:
                raise ValueError(f"the experts' copy must be bf16, got {gate_up_widened.dtype} and "
                                 f"{down_widened.dtype}")
        for name, (tensor, shape) in expect.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        if hidden != h_groups * GROUP or inter != i_groups * GROUP or gate_up_blocks.dtype != torch.uint8:
            raise ValueError(f"gate_up_blocks {tuple(gate_up_blocks.shape)} do not match down_blocks "
                             f"{tuple(down_blocks.shape)} as uint8 [E, 2I, H / 32, 16] and [E, H, I / 32, 16]")
        return cls(gate_up_blocks=gate_up_blocks.contiguous().view(torch.int32),
                   gate_up_scales=gate_up_scales.contiguous(), gate_up_bias=gate_up_bias.contiguous(),
                   down_blocks=down_blocks.contiguous().view(torch.int32), down_scales=down_scales.contiguous(),
                   down_bias=down_bias.contiguous(),
                   gate_up_widened=None if gate_up_widened is None else gate_up_widened.contiguous(),
                   down_widened=None if down_widened is None else down_widened.contiguous())

    @property
    def count(self) -> int:
        return self.gate_up_blocks.shape[0]

    @property
    def resident(self) -> bool:
        """Whether a bf16 copy of the weights is held (the widened path then skips widening)."""
        return self.gate_up_widened is not None

    @property
    def hidden(self) -> int:
        return self.down_blocks.shape[1]

    @property
    def inter(self) -> int:
        return self.gate_up_blocks.shape[1] // 2


def mxfp4_moe(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: PackedExperts, *,
              first: int, alpha: float, limit: float, tiles: Tiles | None = None, use_asm: bool = True,
              workspace: Workspace | None = None, out: torch.Tensor | None = None,
              layer_experts: int | None = None) -> torch.Tensor:
    """hidden [N, H], expert_ids [N, K] (global ids), weights [N, K] -> [N, H] in hidden's dtype, or in out's (a
    float32 out keeps the sum unrounded). No host sync.

    layer_experts: how many experts the whole layer has (by default first + count). The tiles and the order
    of the sum follow it, not the shard: every pair's row of y is then what the whole layer's call computes, and
    shards of 1/2, 1/4 or 1/8 of the layer answering in float32 add up (model/experts.add_as_groups) to its
    output exactly."""
    N, H = hidden.shape
    K = expert_ids.shape[1]
    count, I = experts.count, experts.inter
    P = N * K
    out = torch.empty_like(hidden) if out is None else out
    if N == 0:
        return out
    layer_experts = layer_experts or first + count
    if layer_experts < first + count:
        raise ValueError(f"experts [{first}, {first + count}) do not fit in a layer of {layer_experts}")
    if tiles is None:
        grouped = grouped_mm_supported(hidden)
        tiles = pick_tiles(P, layer_experts, widened_bytes=widened_bytes(layer_experts, H, I) if grouped else None,
                           resident=grouped and experts.resident)
        if tiles.half2 and not act_fits_fp16(limit):  # a SwiGLU clamped far above gpt-oss's: float32 products
            tiles = PRESETS["gemv"]
    ws = workspace or new_workspace(N, K, experts, device=hidden.device, tiles=tiles)
    split = tiles.split_k
    if ws.split_k != split or ws.y.shape[1] != P:
        raise ValueError(f"the workspace holds {ws.y.shape[1]} pairs in {ws.split_k} splits; this call needs {P} in "
                         f"{split}: make it with new_workspace(..., tiles=tiles)")
    hidden = hidden.contiguous()
    ids = expert_ids.contiguous().view(-1)  # [P]
    route = weights.contiguous().view(-1)  # [P]
    asm = use_asm and not _INTERPRET
    groups = SUM_GROUPS.value
    group_experts = layer_experts // groups if layer_experts % groups == 0 else layer_experts  # else one group

    def combine(split_k: int) -> torch.Tensor:  # every path ends so: each token's K rows of y in a fixed order
        _combine[(N, triton.cdiv(H, 512))](ws.y, ids, out, first, count, group_experts, H, P, TOP_K=K,
                                           SPLIT_K=split_k, BLOCK=512, num_warps=4)
        return out

    if tiles.widened:
        grouped_moe(hidden, ids, route, experts, ws.act, ws.y[0], first=first, top_k=K, alpha=alpha, limit=limit)
        return combine(1)
    if tiles.gemv:
        shift = act_shift(limit) if tiles.half2 else 0
        gemv_prefetch = tiles.prefetch > 0 and not _INTERPRET  # (the interpreter runs no PTX)
        _gate_up_gemv[(P, triton.cdiv(I, tiles.gate_up_n))](
            hidden, hidden.stride(0), experts.gate_up_blocks, experts.gate_up_scales, experts.gate_up_bias, ids,
            ws.act, experts.down_blocks, experts.down_scales, first, count, H, I, alpha, limit, TOP_K=K,
            BLOCK_N=tiles.gate_up_n, GROUPS=tiles.gate_up_groups, USE_ASM=asm, HALF2=tiles.half2, ACT_SHIFT=shift,
            PREFETCH=gemv_prefetch, PREFETCH_DOWN=tiles.prefetch_down and not _INTERPRET, num_warps=tiles.num_warps)
        _down_gemv[(P, triton.cdiv(H, tiles.down_n))](
            ws.act.view(torch.int32) if tiles.half2 else ws.act, experts.down_blocks, experts.down_scales,
            experts.down_bias, ids, route, ws.y, first, count, I, H, BLOCK_N=tiles.down_n, GROUPS=tiles.down_groups,
            USE_ASM=asm, HALF2=tiles.half2, ACT_SHIFT=shift, PREFETCH=gemv_prefetch,
            num_warps=tiles.down_warps or tiles.num_warps)
        return combine(1)
    pad = max(16, triton.next_power_of_2(count))
    if P > SORT_ROUTE_PAIRS:  # the one-program counting sort's time grows with P: torch's sort, the same order
        sorted_keys, order = sort_by_expert(ids, first, count)
        ws.sorted_pairs.copy_(order)
        ws.expert_start[0].zero_()
        ws.expert_start[1:].copy_(expert_ends(sorted_keys, count))
    else:
        _route[(1,)](ids, P, first, count, ws.sorted_pairs, ws.expert_start,
                     EXPERTS_PAD=pad, BLOCK=max(16, 4096 // pad), num_warps=4)
    # each expert's rows split into tiles of block_m: at most ceil(P / block_m) + count tiles, and at most P
    grid_m = min(triton.cdiv(P, tiles.block_m) + count, P)
    if tiles.scaled:
        _gate_up_scaled[(grid_m, triton.cdiv(I, tiles.gate_up_n))](
            hidden, hidden.stride(0), experts.gate_up_blocks.view(torch.uint8), experts.gate_up_scales,
            experts.gate_up_bias, ws.sorted_pairs, ws.expert_start, ws.act, count, H, I, alpha, limit, P,
            TOP_K=K, BLOCK_M=tiles.block_m, BLOCK_N=tiles.gate_up_n, STEP=_whole_step(tiles.gate_up_groups, H),
            STAGES=tiles.stages, EXPERTS_PAD=pad, num_warps=tiles.num_warps)
        _down_scaled[(grid_m, triton.cdiv(H, tiles.down_n))](
            ws.act, experts.down_blocks.view(torch.uint8), experts.down_scales, experts.down_bias, ws.sorted_pairs,
            ws.expert_start, route, ws.y, count, I, H, P, BLOCK_M=tiles.block_m, BLOCK_N=tiles.down_n,
            STEP=_whole_step(tiles.down_groups, I), STAGES=tiles.stages, EXPERTS_PAD=pad,
            num_warps=tiles.down_warps or tiles.num_warps)
        return combine(1)
    gate_up_share = _groups_per_split(H // GROUP, split, tiles.gate_up_groups)
    # (Triton's interpreter runs no PTX; a row shorter than the window is not worth it)
    prefetch = 0 if _INTERPRET or tiles.prefetch > min(H, I) // 2 else tiles.prefetch
    _gate_up[(grid_m, triton.cdiv(I, tiles.gate_up_n), split)](
        hidden, hidden.stride(0), experts.gate_up_blocks, experts.gate_up_scales, experts.gate_up_bias,
        ws.sorted_pairs, ws.expert_start, ws.act, ws.gate_up_partials if split > 1 else ws.act,
        count, H, I, alpha, limit, P, gate_up_share,
        TOP_K=K, BLOCK_M=tiles.block_m, BLOCK_N=tiles.gate_up_n, GROUPS=tiles.gate_up_groups, DEPTH=tiles.depth,
        SPLIT_K=split, EXPERTS_PAD=pad, USE_ASM=asm, INTERPRET=_INTERPRET, PREFETCH=prefetch,
        BULK=tiles.prefetch_bulk, num_warps=tiles.num_warps)
    if split > 1:
        block = 1024
        _swiglu_splits[(triton.cdiv(P * I, block),)](ws.gate_up_partials, ws.act, P, I, alpha, limit,
                                                       SPLIT_K=split, BLOCK=block, num_warps=4)
    _down[(grid_m, triton.cdiv(H, tiles.down_n), split)](
        ws.act, experts.down_blocks, experts.down_scales, experts.down_bias, ws.sorted_pairs, ws.expert_start,
        route, ws.y, count, I, H, P, _groups_per_split(I // GROUP, split, tiles.down_groups),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.down_n, GROUPS=tiles.down_groups, DEPTH=tiles.depth, SPLIT_K=split,
        EXPERTS_PAD=pad, USE_ASM=asm, INTERPRET=_INTERPRET, PREFETCH=prefetch, BULK=tiles.prefetch_bulk,
        num_warps=tiles.down_warps or tiles.num_warps)
    return combine(split)


def _whole_step(groups: int, length: int) -> int:
    """Values a reduction step of the scaled-dot kernels takes: groups * 32, halved until the length is a whole
    number of steps (their loads carry no masks, so that the compiler pipelines them as wide copies)."""
    step = groups * GROUP
    while length % step:
        step //= 2
    return step


def _groups_per_split(n_groups: int, split: int, step: int) -> int:
    """Blocks of the reduction each of `split` programs sums: a whole number of steps of `step` blocks."""
    return triton.cdiv(triton.cdiv(n_groups, split), step) * step


FP16_MAX = 65504.0


def act_fits_fp16(limit: float) -> bool:
    """Whether the clamped SwiGLU's largest act, (limit + 1) * limit, fits fp16 (the half2 kernels hold act so)."""
    return 0 < (limit + 1) * limit <= FP16_MAX


def act_shift(limit: float) -> int:
    """The power of two that scales act into fp16 for the half2 matrix-vector kernels: the largest that keeps the
    largest act the clamped SwiGLU can give, (limit + 1) * limit, below fp16's largest value (10 at gpt-oss's
    limit of 7), at most 14 (the decode's own 2**-14)."""
    largest = (limit + 1) * limit
    if not act_fits_fp16(limit):
        raise ValueError(f"the half2 MoE kernels hold act in fp16, but a SwiGLU clamped at {limit} lets it reach "
                         f"{largest:g} (at most {FP16_MAX:g}); use the gemv preset")
    return min(14, math.floor(math.log2(FP16_MAX / largest)))


def new_workspace(num_tokens: int, top_k: int, experts: PackedExperts, *, device: torch.device,
                  tiles: Tiles | None = None) -> Workspace:
    """The buffers of one call of num_tokens tokens with these tiles (by default the ones the call picks)."""
    P = num_tokens * top_k
    split = (tiles or pick_tiles(P, experts.count)).split_k
    return Workspace(
        sorted_pairs=torch.empty(P, dtype=torch.int32, device=device),
        expert_start=torch.empty(experts.count + 1, dtype=torch.int32, device=device),
        act=torch.empty(P, experts.inter, dtype=torch.bfloat16, device=device),
        y=torch.empty(split, P, experts.hidden, dtype=torch.float32 if split > 1 else torch.bfloat16, device=device),
        gate_up_partials=torch.empty(split, P, 2 * experts.inter, dtype=torch.float32, device=device)
        if split > 1 else None,
    )
