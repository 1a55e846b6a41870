"""The MXFP4 MoE kernel against its PyTorch reference (GPU), and the reference against LocalExperts (CPU).

GPU tests import the Triton module inside the test, so the CPU suite never imports Triton.
"""

from __future__ import annotations

import functools
import textwrap

import pytest
import torch

from gptoss_serve.kernels.moe_reference import PACKED_NAMES, moe_reference, relative_error
from gptoss_serve.model import mxfp4
from gptoss_serve.model.experts import LocalExperts, add_as_groups
from gptoss_serve.model.packed_experts import bf16_copy, random_packed_experts
from gptoss_serve.model.synthetic import preset_config
from tests.interpreter import assert_runs_in_interpreter

TOLERANCE = 1e-2  # bf16 operands and a bf16 activation in between; float32 accumulation
ALPHA, LIMIT = 1.702, 7.0  # gpt-oss's SwiGLU


def routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random experts per token (as top-k gives) and softmax weights."""
    ids = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices  # [N, K]
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), dim=-1)
    return ids, weights


def shard(packed: dict[str, torch.Tensor], first: int, count: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {name: t[first:first + count].to(device) for name, t in packed.items()}


# ------------------------------------------------------------------------------------------------------- CPU tests


def local_experts(packed: dict[str, torch.Tensor], *, first: int, count: int) -> LocalExperts:
    """LocalExperts of the tiny preset holding the dequantized float32 weights of experts [first, first + count)."""
    experts = LocalExperts(preset_config("tiny"), first=first, count=count)
    rows = slice(first, first + count)
    with torch.no_grad():
        experts.gate_up_proj.copy_(mxfp4.dequantize(packed["gate_up_blocks"][rows], packed["gate_up_scales"][rows],
                                                    dtype=torch.float32).transpose(-1, -2))
        experts.down_proj.copy_(mxfp4.dequantize(packed["down_blocks"][rows], packed["down_scales"][rows],
                                                 dtype=torch.float32).transpose(-1, -2))
        experts.gate_up_proj_bias.copy_(packed["gate_up_bias"][rows].float())
        experts.down_proj_bias.copy_(packed["down_bias"][rows].float())
    return experts


@pytest.mark.parametrize("first, count", [(0, 8), (4, 4), (2, 3)])
@pytest.mark.parametrize("num_tokens", [1, 7, 50])
def test_reference_matches_local_experts(first, count, num_tokens):
    config = preset_config("tiny")
    gen = torch.Generator().manual_seed(num_tokens * 10 + first)
    packed = random_packed_experts(config.num_local_experts, config.hidden_size, config.intermediate_size,
                                   generator=gen)
    hidden = torch.randn(num_tokens, config.hidden_size, generator=gen)
    ids, weights = routing(num_tokens, config.num_local_experts, config.num_experts_per_tok, gen)
    expected = local_experts(packed, first=first, count=count).forward_loop(hidden, ids, weights)
    got = moe_reference(hidden, ids, weights, **shard(packed, first, count), first=first)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_shards_add_up_and_empty_shard_gives_zeros():
    gen = torch.Generator().manual_seed(0)
    packed = random_packed_experts(8, 64, 64, generator=gen)
    hidden = torch.randn(20, 64, generator=gen)
    ids, weights = routing(20, 8, 4, gen)
    full = moe_reference(hidden, ids, weights, **packed)
    halves = sum(moe_reference(hidden, ids, weights, **shard(packed, first, 4), first=first) for first in (0, 4))
    torch.testing.assert_close(halves, full, rtol=1e-5, atol=1e-5)
    # tokens whose experts all lie outside the shard
    none = moe_reference(hidden, torch.full_like(ids, 7), weights, **shard(packed, 0, 4))
    assert torch.equal(none, torch.zeros_like(none))


def test_the_fp16_act_scale_follows_the_swiglu_clamp():
    pytest.importorskip("triton")
    from gptoss_serve.kernels.mxfp4_moe import FP16_MAX, act_shift

    assert act_shift(7.0) == 10  # gpt-oss: act reaches 8 * 7 = 56, and 56 * 2**10 = 57,344 fits fp16
    for limit in (0.5, 7.0, 30.0, 255.0):
        largest, shift = (limit + 1) * limit, act_shift(limit)
        assert largest * 2**shift <= FP16_MAX and (largest * 2 ** (shift + 1) > FP16_MAX or shift == 14)
    with pytest.raises(ValueError, match="use the gemv preset"):
        act_shift(300.0)  # 301 * 300 > 65,504: act itself would overflow fp16


def test_only_many_tokens_an_expert_widen_the_experts_and_only_where_they_fit(monkeypatch):
    pytest.importorskip("triton")
    from gptoss_serve.kernels import mxfp4_moe
    from gptoss_serve.kernels.mxfp4_moe_widened import widened_bytes

    twenty, one_twenty = widened_bytes(32, 2880, 2880), widened_bytes(128, 2880, 2880)
    step = 8192 * 4  # the pairs of an 8,192-token prefill step
    assert not mxfp4_moe.pick_tiles(step, 32, widened_bytes=twenty).widened  # off by default until timed on a GPU
    monkeypatch.setattr(mxfp4_moe, "WIDEN_PER_EXPERT", 128)  # as GPTOSS_MOE_WIDEN_PER_EXPERT=128 sets it
    assert twenty == 32 * 5760 * 2880 * 2 <= mxfp4_moe.WIDEN_MAX_BYTES < one_twenty
    assert mxfp4_moe.pick_tiles(step, 32, widened_bytes=twenty).widened
    assert not mxfp4_moe.pick_tiles(128 * 32, 32, widened_bytes=twenty).widened  # at the threshold: fused kernels
    assert not mxfp4_moe.pick_tiles(step, 32).widened  # no grouped products on this device
    assert not mxfp4_moe.pick_tiles(step, 128, widened_bytes=one_twenty).widened  # 120b's layer would take 4.2 GB
    # a bf16 copy held beside the packed experts: no widening a call, no memory to find, so from 64 pairs an expert,
    # 120b included; few tokens an expert keep the fused kernels
    assert mxfp4_moe.pick_tiles(65 * 128, 128, resident=True).widened
    assert not mxfp4_moe.pick_tiles(64 * 128, 128, resident=True).widened
    assert mxfp4_moe.pick_tiles(16 * 32, 32, resident=True) == mxfp4_moe.PRESETS["decode_wide"]


@pytest.mark.parametrize("first, count", [(0, 8), (2, 3)])
def test_torch_sort_groups_pairs_by_expert_stably(first, count):
    """moe_sort's order: every pair of the shard once, by local expert, by pair index within one; the others after."""
    from gptoss_serve.kernels.moe_sort import expert_ends, sort_by_expert

    ids = torch.randint(0, 8, (200,), generator=torch.Generator().manual_seed(count))
    keys, order = sort_by_expert(ids, first, count)
    local = ids - first
    mine = [p for e in range(count) for p in range(200) if local[p] == e]
    assert order[:len(mine)].tolist() == mine and keys[:len(mine)].tolist() == sorted(local[mine].tolist())
    assert (keys[len(mine):] == count).all()
    assert expert_ends(keys, count).tolist() == [sum(0 <= v <= e for v in local.tolist()) for e in range(count)]


def test_random_packed_values_stay_order_one():
    packed = random_packed_experts(2, 2880, 2880, generator=torch.Generator().manual_seed(0))
    assert set(PACKED_NAMES) == set(packed)
    exponents = packed["gate_up_scales"].int() - mxfp4.SCALE_BIAS
    assert exponents.min() >= -8 and exponents.max() <= -6, (exponents.min(), exponents.max())
    assert packed["gate_up_blocks"].float().std() > 50  # random codes, never all zero


# ------------------------------------------------------------------------------------------------------- GPU tests


def run_case(num_tokens: int, *, num_experts: int = 16, hidden: int = 256, inter: int = 256, top_k: int = 4,
             first: int = 0, count: int | None = None, ids: torch.Tensor | None = None, tiles=None,
             use_asm: bool = True, seed: int = 0, out_dtype: torch.dtype = torch.bfloat16,
             layer_experts: int | None = None, resident: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel (poisoned buffers) and the float32 reference on the same fresh random inputs, on the GPU.
    resident: the experts hold a bf16 copy beside the packed weights (Mxfp4Experts.keep_bf16_copy)."""
    from gptoss_serve.kernels.mxfp4_moe import PackedExperts, mxfp4_moe, new_workspace, pick_tiles

    gen = torch.Generator().manual_seed(seed)
    count = num_experts - first if count is None else count
    packed = shard(random_packed_experts(num_experts, hidden, inter, generator=gen), first, count, "cuda")
    hidden_states = torch.randn(num_tokens, hidden, generator=gen).bfloat16().cuda()
    route_ids, weights = routing(num_tokens, num_experts, top_k, gen)
    ids = (route_ids if ids is None else ids).cuda()
    weights = weights.cuda()
    view = PackedExperts.of(**packed, **(bf16_copy(packed) if resident else {}))
    tiles = tiles or pick_tiles(num_tokens * top_k, layer_experts or count, resident=resident)  # the call's choice
    workspace = new_workspace(num_tokens, top_k, view, device=torch.device("cuda"), tiles=tiles)
    workspace.act.fill_(float("nan"))
    workspace.y.fill_(float("nan"))
    if workspace.gate_up_partials is not None:
        workspace.gate_up_partials.fill_(float("nan"))
    workspace.sorted_pairs.fill_(-1)
    workspace.expert_start.fill_(-1)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=out_dtype, device="cuda")
    got = mxfp4_moe(hidden_states, ids, weights, view, first=first, alpha=ALPHA, limit=LIMIT, tiles=tiles,
                    use_asm=use_asm, workspace=workspace, out=out, layer_experts=layer_experts)
    assert got.data_ptr() == out.data_ptr()
    torch.cuda.synchronize()
    return got, moe_reference(hidden_states, ids, weights, **packed, first=first)


def check(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).any(dim=1).sum().item()} rows unwritten or NaN"
    error = relative_error(got, ref)
    assert error < TOLERANCE, error


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 129, 1000])
def test_kernel_matches_reference(num_tokens):
    check(*run_case(num_tokens, seed=num_tokens))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["gemv", "gemv_h2", "decode", "decode_wide", "medium", "prefill", "scaled_decode",
                                    "scaled_medium", "scaled_prefill", "widened"])
@pytest.mark.parametrize("num_tokens", [3, 129])
def test_every_tile_preset(preset, num_tokens):
    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    check(*run_case(num_tokens, hidden=160, inter=352, tiles=PRESETS[preset], seed=num_tokens))  # 5, 11 blocks


@pytest.mark.gpu
@pytest.mark.parametrize("preset, changes", [("medium", dict(down_n=128, down_warps=8)),
                                             ("decode_wide", dict(down_n=128)), ("gemv_h2", dict(down_warps=2))])
def test_the_down_kernels_own_tiles_and_warps(preset, changes):
    """The sweep's down variants (bench.moe_kernel): wider down tiles, and the down kernel's own warp count."""
    from dataclasses import replace

    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    check(*run_case(200, num_experts=8, hidden=2880, inter=2880, tiles=replace(PRESETS[preset], **changes), seed=13))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_fp16_pair_products_cost_little_accuracy_at_the_real_shape(num_tokens, poisoned_allocations):
    """gemv_h2 sums each block's products in fp16 pairs and holds act in fp16 scaled by 2**10: at gpt-oss's own
    shape (2,880 values a row, random MXFP4 weights) it stays within 1e-3 of the float32 path's error (an fp16
    emulation on the CPU gave ~6e-4 for the products alone), and nothing overflows."""
    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    errors = {}
    for preset in ("gemv", "gemv_h2"):
        got, ref = run_case(num_tokens, num_experts=8, hidden=2880, inter=2880, tiles=PRESETS[preset], seed=11)
        check(got, ref)
        errors[preset] = relative_error(got, ref)
    assert errors["gemv_h2"] < errors["gemv"] + 1e-3, errors


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 129])
def test_plain_triton_decode_matches(num_tokens):
    """The decode without inline PTX (the interpreter's path) computes the same function."""
    check(*run_case(num_tokens, use_asm=False, seed=7))


@pytest.mark.gpu
def test_empty_experts():
    gen = torch.Generator().manual_seed(3)
    used = torch.tensor([1, 6, 7, 12, 13])  # 11 of 16 experts get nothing
    ids = used[torch.rand(77, 5, generator=gen).topk(4, dim=-1).indices]
    check(*run_case(77, ids=ids, seed=3))


@pytest.mark.gpu
@pytest.mark.parametrize("every_slot", [False, True])
def test_all_tokens_on_one_expert(every_slot):
    gen = torch.Generator().manual_seed(4)
    if every_slot:  # 1,200 pairs on one expert: many row tiles of it
        ids = torch.full((300, 4), 5)
    else:  # expert 5 in slot 0 of every token, three other distinct experts after it
        others = torch.tensor([e for e in range(16) if e != 5])
        ids = torch.cat([torch.full((300, 1), 5), others[torch.rand(300, 15, generator=gen).topk(3).indices]], dim=1)
    check(*run_case(300, ids=ids, seed=4))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [5, 200])
def test_shard_drops_other_experts_and_shards_add_up(num_tokens):
    """Experts [8, 16) of 16: ids below 8 contribute nothing here; the two halves sum to the whole layer."""
    lower, _ = run_case(num_tokens, first=0, count=8, seed=5)
    upper, ref_upper = run_case(num_tokens, first=8, count=8, seed=5)
    check(upper, ref_upper)
    whole, ref_whole = run_case(num_tokens, seed=5)
    check(lower.float() + upper.float(), ref_whole)


@pytest.mark.gpu
# gemv, decode, medium, prefill (pairs sorted by _route, then by torch), widened experts
@pytest.mark.parametrize("num_tokens, preset", [(1, None), (3, None), (40, None), (200, None), (1100, None),
                                               (700, "widened")])
@pytest.mark.parametrize("workers", [2, 4, 8])
def test_float32_shares_add_up_to_the_whole_bit_for_bit(workers, num_tokens, preset):
    """Expert-parallel workers answer in float32 (expert_exchange.answer_dtype) and the replica adds their answers up
    the kernel's tree (add_as_groups) and rounds once: exactly the kernel's own bf16 output for the whole layer, so
    greedy outputs stay colocated mode's. (A shard picking tiles for its own expert count, or a plain running sum,
    differs in a few elements in the last bit, enough to part a random model's greedy tokens.)"""
    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    per, tiles = 16 // workers, PRESETS.get(preset)
    shares = [run_case(num_tokens, first=i * per, count=per, seed=6, out_dtype=torch.float32, layer_experts=16,
                       tiles=tiles)[0] for i in range(workers)]
    whole, ref = run_case(num_tokens, seed=6, tiles=tiles)
    assert all(share.dtype == torch.float32 for share in shares)
    summed = add_as_groups(shares).bfloat16()
    check(summed, ref)
    assert torch.equal(summed, whole), f"{(summed != whole).sum().item()} of {whole.numel()} elements differ"


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, preset", [(2, None), (64, None), (1500, None), (1500, "widened")])
def test_gpt_oss_20b_shape(num_tokens, preset):
    """The matrix-vector kernels, the tensor-core ones (1,500 tokens: pairs sorted by torch), widened experts."""
    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    check(*run_case(num_tokens, num_experts=32, hidden=2880, inter=2880, seed=20, tiles=PRESETS.get(preset)))


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("num_tokens, preset", [(1, "gemv_h2"), (4, "gemv"), (12, "decode"), (40, "decode_wide"),
                                                (300, "medium"), (700, "prefill")])
@pytest.mark.parametrize("window, bulk", [(256, False), (128, True), (512, True)])
def test_l2_prefetches_change_nothing_but_the_time(num_tokens, preset, window, bulk):
    """A prefetch is a hint: each tensor-core preset with its weight rows' bytes asked of L2 ahead (bulk or line by
    line, windows from a step's bytes to over a third of a row) gives its twin's output bit for bit, at gpt-oss's
    shape (1,440-byte rows: the last window is clamped inside the row); so do the matrix-vector kernels asking for
    their whole row tiles first (any window: a tile is one run) and gate_up's programs asking for down's rows."""
    from dataclasses import replace

    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    tiles = PRESETS[preset]
    plain, ref = run_case(num_tokens, num_experts=8, hidden=2880, inter=2880, seed=12, tiles=tiles)
    check(plain, ref)
    fetched, _ = run_case(num_tokens, num_experts=8, hidden=2880, inter=2880, seed=12,
                          tiles=replace(tiles, prefetch=window, prefetch_bulk=bulk, prefetch_down=tiles.gemv))
    assert torch.equal(fetched, plain)


def test_a_prefetch_window_must_be_whole_lines_and_steps():
    pytest.importorskip("triton")
    from dataclasses import replace

    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    assert PRESETS["decode_wide_prefetch"] == replace(PRESETS["decode_wide"], prefetch=256)
    with pytest.raises(ValueError, match="prefetch 192"):  # not whole 128-byte lines
        replace(PRESETS["decode_wide"], prefetch=192)
    with pytest.raises(ValueError, match="prefetch 128"):  # shorter than a step of 16 blocks (256 bytes a row)
        replace(PRESETS["decode_wide"], down_groups=16, prefetch=128)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [700, 1100])
def test_a_resident_bf16_copy_multiplies_what_widening_would(num_tokens):
    """Experts holding a bf16 copy take the widened path from 64 pairs an expert (here 87 and 137) with no widening
    a call: bit for bit the output of widening the packed weights in the call, at gpt-oss-20b's shape."""
    from gptoss_serve.kernels.mxfp4_moe import PRESETS, pick_tiles

    assert pick_tiles(num_tokens * 4, 32, resident=True).widened
    resident, ref = run_case(num_tokens, num_experts=32, hidden=2880, inter=2880, seed=21, resident=True)
    check(resident, ref)
    widened, _ = run_case(num_tokens, num_experts=32, hidden=2880, inter=2880, seed=21, tiles=PRESETS["widened"])
    assert torch.equal(resident, widened)


@pytest.mark.gpu
def test_widened_experts_are_the_checkpoints_values_exactly():
    """widen gives mxfp4_reference.dequantize's bf16 values bit for bit, at a size whose blocks do not fill the last
    program (2,016 blocks, WIDEN_BLOCKS a program), and leaves nothing unwritten (the output starts as NaN)."""
    from gptoss_serve.kernels.mxfp4_moe_widened import widen

    gen = torch.Generator().manual_seed(9)
    packed = random_packed_experts(3, 96, 224, generator=gen)
    blocks, scales = packed["down_blocks"].cuda(), packed["down_scales"].cuda()  # 3 x 96 rows of 7 blocks: 2,016
    scales[0, 0, 0] = 127 + 20  # far from the random ones: still exact
    out = torch.full((3, 96, 224), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert widen(blocks.view(torch.int32), scales, out) is out
    assert torch.equal(out, mxfp4.dequantize(blocks, scales))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, preset", [(33, None), (1100, None), (700, "widened")])
def test_deterministic_and_graph_capturable(num_tokens, preset):
    """Bitwise the same twice, and inside a CUDA graph (no host sync) the same as eagerly."""
    from gptoss_serve.kernels.mxfp4_moe import PRESETS, PackedExperts, mxfp4_moe

    gen = torch.Generator().manual_seed(6)
    packed = shard(random_packed_experts(16, 256, 256, generator=gen), 0, 16, "cuda")
    experts = functools.partial(mxfp4_moe, experts=PackedExperts.of(**packed), first=0, alpha=ALPHA, limit=LIMIT,
                                tiles=PRESETS.get(preset))  # 1,100 tokens: pairs sorted by torch
    hidden = torch.randn(num_tokens, 256, generator=gen).bfloat16().cuda()
    ids, weights = (t.cuda() for t in routing(num_tokens, 16, 4, gen))
    first, second = experts(hidden, ids, weights), experts(hidden, ids, weights)
    assert torch.equal(first, second)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = experts(hidden, ids, weights)
    ids.copy_(ids.flip(0))  # new routing through the same buffers
    graph.replay()
    torch.testing.assert_close(captured, experts(hidden, ids, weights), rtol=0, atol=0)


INTERPRETED = textwrap.dedent("""
    import torch
    from gptoss_serve.kernels.moe_reference import moe_reference, relative_error
    from gptoss_serve.kernels import mxfp4_moe as launcher
    from gptoss_serve.kernels.mxfp4_moe import PRESETS, PackedExperts, mxfp4_moe
    from gptoss_serve.kernels.mxfp4_moe_kernels import _route
    from gptoss_serve.kernels.moe_sort import expert_ends, sort_by_expert
    from gptoss_serve.model.experts import add_as_groups
    from gptoss_serve.model.packed_experts import random_packed_experts
    from tests.test_mxfp4_moe_kernel import ALPHA, LIMIT, routing, shard
    gen = torch.Generator().manual_seed(0)
    experts = random_packed_experts(8, 64, 64, generator=gen)
    # torch's sort groups pairs as _route's counting sort does, shard or whole layer
    for first, count in ((0, 8), (2, 3)):
        ids = torch.randint(0, 8, (1201,), generator=gen)
        pairs, starts = torch.full((1201,), -1, dtype=torch.int32), torch.full((count + 1,), -1, dtype=torch.int32)
        _route[(1,)](ids, 1201, first, count, pairs, starts, EXPERTS_PAD=16, BLOCK=256)
        keys, order = sort_by_expert(ids, first, count)
        assert starts.tolist() == [0] + expert_ends(keys, count).tolist()
        assert torch.equal(pairs[:starts[-1]], order[:starts[-1]].int())
    # 300 tokens: 150 pairs an expert, so the call widens the experts (at 128 pairs an expert; the default waits for
    # a GPU's timing), and the fused prefill kernels' 1,200 pairs are sorted with torch's sort (above 1,000)
    launcher.WIDEN_PER_EXPERT, launcher.SORT_ROUTE_PAIRS = 128, 1000
    for tokens, first, count, tiles in ((3, 0, 8, None), (5, 4, 4, PRESETS["decode"]), (1, 0, 8, None),
                                        (3, 2, 5, PRESETS["gemv"]), (2, 1, 6, PRESETS["gemv_h2"]),
                                        (7, 0, 8, PRESETS["scaled_decode"]),
                                        (9, 2, 5, PRESETS["scaled_prefill"]), (11, 2, 5, PRESETS["widened"]),
                                        (300, 0, 8, None), (300, 1, 6, PRESETS["prefill"])):  # see above
        packed = shard(experts, first, count, "cpu")
        x = torch.randn(tokens, 64, generator=gen).bfloat16()
        ids, weights = routing(tokens, 8, 4, gen)
        got = mxfp4_moe(x, ids, weights, PackedExperts.of(**packed), first=first, alpha=ALPHA, limit=LIMIT,
                        tiles=tiles, use_asm=False)
        error = relative_error(got, moe_reference(x, ids, weights, **packed, first=first))
        assert error < 3e-2, (tokens, first, error)  # the interpreter's bf16 casts truncate: looser than on GPUs
    # four workers' float32 shares, added up the kernel's tree: the whole layer's unrounded sum bit for bit (compared
    # before rounding: the interpreter's bf16 cast truncates where torch's rounds)
    x = torch.randn(6, 64, generator=gen).bfloat16()
    ids, weights = routing(6, 8, 4, gen)
    def layer(first, count, **kwargs):
        return mxfp4_moe(x, ids, weights, PackedExperts.of(**shard(experts, first, count, "cpu")), first=first,
                         alpha=ALPHA, limit=LIMIT, use_asm=False, out=torch.empty(6, 64), **kwargs)
    for tiles in (None, PRESETS["gemv"], PRESETS["gemv_h2"], PRESETS["scaled_medium"], PRESETS["widened"]):
        whole = layer(0, 8, tiles=tiles)
        shares = [layer(first, 2, layer_experts=8, tiles=tiles) for first in (0, 2, 4, 6)]
        assert torch.equal(add_as_groups(shares), whole)
    # a bf16 copy held beside the packed weights: the widened path multiplies it, the very values a call widens; and
    # where the device has grouped products the call picks it above RESIDENT_WIDEN_PER_EXPERT (75 pairs an expert
    # here, under WIDEN_PER_EXPERT's 128: without the copy the fused prefill kernels would run)
    from gptoss_serve.model.packed_experts import bf16_copy
    packed = shard(experts, 1, 6, "cpu")
    copy = bf16_copy(packed)
    x = torch.randn(150, 64, generator=gen).bfloat16()
    ids, weights = routing(150, 8, 4, gen)
    def call(with_copy, **kwargs):
        view = PackedExperts.of(**packed, **(copy if with_copy else {}))
        return mxfp4_moe(x, ids, weights, view, first=1, alpha=ALPHA, limit=LIMIT, use_asm=False, layer_experts=8,
                         **kwargs)
    widened = call(False, tiles=PRESETS["widened"])
    assert torch.equal(call(True, tiles=PRESETS["widened"]), widened)
    launcher.grouped_mm_supported = lambda hidden: True
    assert launcher.pick_tiles(600, 8, resident=True).widened and not launcher.pick_tiles(600, 8).widened
    assert torch.equal(call(True), widened)
    # a SwiGLU clamped so high that act could overflow fp16: the call picks the float32 matrix-vector kernels
    x = torch.randn(1, 64, generator=gen).bfloat16()
    ids, weights = routing(1, 8, 4, gen)
    got = mxfp4_moe(x, ids, weights, PackedExperts.of(**experts), first=0, alpha=ALPHA, limit=300.0, use_asm=False)
    assert relative_error(got, moe_reference(x, ids, weights, **experts, limit=300.0)) < 3e-2
    print("ok")
""")


def test_kernels_in_the_interpreter_match_the_reference():
    """Triton's CPU interpreter runs the launcher and every kernel (routing, gate_up, split-K SwiGLU, down,
    combine, the matrix-vector gate_up and down of a handful of tokens, the scaled-dot gate_up and down, the widened
    experts' kernels around torch's grouped products) on a
    whole shard and on parts of one: the indexing and masks, without a GPU; and four quarter shards' float32 answers
    add up to the whole layer's bf16 output exactly."""
    assert_runs_in_interpreter(INTERPRETED)
