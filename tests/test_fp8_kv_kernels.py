"""The fp8 KV cache's Triton kernels (kernels/kv_store.py, varlen_attention.py, split_kv_attention.py) against their
PyTorch references: the store bit for bit and both attention paths reading what it wrote, in Triton's interpreter and
compiled for an H100 (CPU); on the GPU at gpt-oss's shapes, with poisoned outputs and caches, and in CUDA graphs."""

from __future__ import annotations

import textwrap

import pytest
import torch

from gptoss_serve.kernels.fp8_kv_reference import E4M3
from gptoss_serve.kernels.paged_attention import paged_attention_reference, store_kv_reference
from tests.attention_cases import captured_wide_decode, long_step, random_step, stored_as
from tests.interpreter import assert_runs_in_interpreter

BF16 = torch.bfloat16


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


# -------------------------------------------------------------------------- Triton kernels, on the CPU

INTERPRETED = textwrap.dedent("""
    import torch
    from gptoss_serve.kernels.kv_store import store_kv
    from gptoss_serve.kernels.paged_attention import paged_attention_reference, store_kv_reference
    from gptoss_serve.kernels.split_kv_attention import split_kv_decode
    from gptoss_serve.kernels.varlen_attention import paged_attention
    from tests.attention_cases import random_step, stored_as

    def bits(t):
        return t.view(torch.uint8)

    # the store alone: heads and head_dim off powers of two, bf16 and float32 rows, a zero head, -0.0, magnitudes
    # from 2**-12 to 2**8, strided rows
    gen = torch.Generator().manual_seed(0)
    for heads, dim, dtype in ((3, 16, torch.float32), (2, 12, torch.bfloat16), (8, 64, torch.bfloat16)):
        kv = torch.randn(9, 3 * heads * dim, generator=gen) * torch.logspace(-12, 8, 9, base=2)[:, None]
        kv[0, :heads * dim] = 0.0
        kv[1, 5] = -0.0
        kv = kv.to(dtype)
        k, v = (kv[:, i * heads * dim:(i + 1) * heads * dim].unflatten(-1, (heads, dim)) for i in (0, 1))
        slots = torch.randperm(6 * 4, generator=gen)[:9]
        got, want = ([torch.full((6, 4, heads, dim), float("nan")).to(torch.float8_e4m3fn) for _ in range(2)]
                     + [torch.full((6, 4, heads), 7, dtype=torch.uint8) for _ in range(2)] for _ in range(2))
        store_kv(k, v, *got[:2], slots, key_scales=got[2], value_scales=got[3])
        store_kv_reference(k, v, *want[:2], slots, key_scales=want[2], value_scales=want[3])
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, want)), (heads, dim, dtype)

    # store, then attend: the one kernel (prefill chunks and decodes, windows, groups of 1 to 4) and the split
    cases = [([(37, 1), (21, 21), (70, 13), (1, 1), (200, 20)], None, 2, torch.float32, None),
             ([(37, 1), (70, 13), (5, 0)], 16, 1, torch.float32, None),
             ([(40, 1), (9, 1)], 16, 4, torch.bfloat16, None),
             ([(300, 1), (5, 0), (70, 1)], None, 2, torch.float32, 3),
             ([(200, 1), (1, 1)], 100, 4, torch.bfloat16, 4)]
    for seqs, window, group, dtype, splits in cases:
        args, _ = random_step(seqs, window=window, padding_rows=2, heads=2 * group, kv_heads=2, dtype=dtype)
        mine, theirs = stored_as(args, torch.float8_e4m3fn, store_kv), stored_as(args, torch.float8_e4m3fn)
        assert all(torch.equal(bits(mine[n]), bits(theirs[n]))
                   for n in ("key_cache", "value_cache", "key_scales", "value_scales"))
        want = paged_attention_reference(**theirs, out=torch.full_like(args["q"], 7.0))
        if splits is None:
            got = paged_attention(**mine, max_query_len=max(n for _, n in seqs), out=torch.full_like(args["q"], 7.0))
        else:
            got = split_kv_decode(**mine, num_splits=splits, min_chunk=64, out=torch.full_like(args["q"], 7.0))
        n = sum(new for _, new in seqs)
        assert torch.equal(got[n:], torch.full_like(got[n:], 7.0)), seqs  # padding rows are nobody's
        err = ((got[:n].float() - want[:n].float()).norm() / want[:n].float().norm()).item()
        # float32: the same dequantized numbers, the same math; bf16: the reference rounds its products to bf16
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (seqs, window, err)
    print("ok")
""")


def test_fp8_store_and_attention_kernels_in_the_interpreter_match_the_references():
    """Triton's CPU interpreter: the store bit for bit (scales, rounding, signs, masks), and both attention kernels
    reading what it wrote as the reference reads what its own store wrote."""
    assert_runs_in_interpreter(INTERPRETED)


def _compile_for_h100(kernel, **arguments):
    """Compiles a kernel to an sm_90 cubin on this machine (no GPU needed): what lowering would reject on the GPU
    fails here. arguments: a Triton type string ("*fp8e4nv", "i32") per runtime argument, a value per constexpr;
    pointers are taken 16-byte aligned, as Triton specializes them on the GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = arguments[name]
        if isinstance(value, str):
            signature[name] = value
            if value.startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name], constexprs[name] = "constexpr", value
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))


def _attention_signature(kernel, *, fp8: bool, strides: list[str]) -> dict:
    cache = "*fp8e4nv" if fp8 else "*bf16"
    scales = "*u8" if fp8 else None
    pointers = dict(q_ptr="*bf16", k_ptr=cache, v_ptr=cache, o_ptr="*bf16", tables_ptr="*i32",
                    query_start_ptr="*i32", context_lens_ptr="*i32", sinks_ptr="*bf16", k_scales_ptr=scales,
                    v_scales_ptr=scales, max_ptr="*fp32", sum_ptr="*fp32", acc_ptr="*fp32")
    names = set(kernel.arg_names)
    return {**{k: v for k, v in pointers.items() if k in names}, **{s: "i32" for s in strides}, "scale": "fp32"}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_the_kernels_compile_for_an_h100(fp8):
    """The interpreter runs the kernels' logic, not their lowering (fp8 conversions, dots of converted tiles): the
    store and both attention kernels, as gpt-oss calls them (decode and prefill tiles, with and without a window),
    compiled for sm_90."""
    pytest.importorskip("triton")
    from gptoss_serve.kernels import kv_store, split_kv_attention, varlen_attention

    attention = varlen_attention._attention
    strides = [n for n in attention.arg_names if n.startswith("stride_")] + ["tiles_per_seq", "num_splits",
                                                                              "min_chunk"]
    for block_q, window, split in ((2, 0, False), (2, 128, False), (16, 0, False), (16, 128, False), (16, 0, True)):
        # G = 8: decode tiles of 16 rows, prefill 128; full-attention prefill split across keys too
        _compile_for_h100(attention, **_attention_signature(attention, fp8=fp8, strides=strides), HEADS=64, G=8,
                          D=64, BLOCK_Q=block_q, BLOCK_N=64, BLOCK_SIZE=16, WINDOW=window, SPLIT=split, FP8=fp8,
                          INTERPRET=False)
    combine = varlen_attention._combine_splits
    _compile_for_h100(combine, o_ptr="*bf16", query_start_ptr="*i32", sinks_ptr="*bf16", max_ptr="*fp32",
                      sum_ptr="*fp32", acc_ptr="*fp32", stride_on="i32", stride_oh="i32", num_seqs="i32",
                      num_splits="i32", HEADS=64, G=8, D=64)
    partial = split_kv_attention._partial_attention
    strides = [n for n in partial.arg_names if n.startswith("stride_")] + ["num_splits", "min_chunk"]
    for window in (0, 128):
        _compile_for_h100(partial, **_attention_signature(partial, fp8=fp8, strides=strides), HEADS=64, G=8,
                          ROWS=16, D=64, BLOCK_N=64, BLOCK_SIZE=16, WINDOW=window, FP8=fp8, INTERPRET=False)
    if fp8:
        store = dict(k_ptr="*bf16", v_ptr="*bf16", key_cache_ptr="*fp8e4nv", value_cache_ptr="*fp8e4nv",
                     key_scales_ptr="*u8", value_scales_ptr="*u8", slots_ptr="*i32", stride_kn="i32",
                     stride_vn="i32", heads="i32")
        compiled = _compile_for_h100(kv_store._store_kv_e4m3, **store, D=64, BLOCK_H=8, BLOCK_D=64,
                                     MAX_MANTISSA=kv_store.E4M3_MAX_MANTISSA_BITS,
                                     BELOW_MAX=kv_store.EXPONENT_BELOW_E4M3_MAX,
                                     MIN_EXPONENT=kv_store.E4M3_MIN_EXPONENT,
                                     MANTISSA_BITS=kv_store.E4M3_MANTISSA_BITS)
        assert "e4m3" in compiled.asm["ptx"]  # the GPU's own conversion to fp8


# ------------------------------------------------------------------------------------------------------- GPU tests

GPT_OSS = dict(heads=64, kv_heads=8, head_dim=64, block_size=16, dtype=BF16, device="cuda")


def _kv_case(tokens: int, seed: int):
    """gpt-oss's k and v rows of `tokens` tokens (strided, as the qkv projection leaves them), e4m3 caches poisoned
    with NaN bytes and scales with 0xFF, and slots spread over the blocks, the last one a padding row's."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (64 + 16) * 64, generator=gen) * 3).to(device="cuda", dtype=BF16)
    k, v = (qkv[:, (64 + 8 * i) * 64:(64 + 8 * (i + 1)) * 64].unflatten(-1, (8, 64)) for i in (0, 1))
    blocks = tokens // 16 + 8
    caches = [torch.full((blocks, 16, 8, 64), 0x7F, dtype=torch.uint8, device="cuda").view(E4M3) for _ in range(2)]
    scales = [torch.full((blocks, 16, 8), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(2)]
    slots = (torch.randperm(blocks * 16 - 16, generator=gen)[:tokens] + 16).to("cuda")
    slots[-1] = 3  # the null block
    return k, v, caches, scales, slots


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_fp8_store_kernel_matches_the_reference_bit_for_bit_on_gpu(tokens):
    from gptoss_serve.kernels.kv_store import store_kv

    k, v, caches, scales, slots = _kv_case(tokens, seed=tokens)
    want_caches, want_scales = [c.clone() for c in caches], [s.clone() for s in scales]
    store_kv(k, v, *caches, slots, key_scales=scales[0], value_scales=scales[1])
    store_kv_reference(k, v, *want_caches, slots, key_scales=want_scales[0], value_scales=want_scales[1])
    for got, want in zip(caches + scales, want_caches + want_scales):  # untouched slots keep their poison
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["paged_attention", "varlen_attention", "split_kv_decode"])
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("seqs", [
    [(300, 1)],  # batch-1 decode
    [(100 + 37 * i, 1) for i in range(64)],  # a decode batch
    [(5000, 1), (17, 1), (1, 1), (1000, 1), (5, 0)],  # long, short and empty decodes
    [(1500, 1), (700, 300), (2048, 2048), (129, 129), (17, 1), (5, 0)],  # mixed, long, empty
])
def test_fp8_attention_matches_the_reference_on_gpu(seqs, window, entry):
    """Stored by the kernel, read by each path (the dispatcher, the one kernel, the split with 4 chunks) against
    the reference reading the reference's store; outputs poisoned past the step's rows."""
    from gptoss_serve.kernels import split_kv_attention, varlen_attention
    from gptoss_serve.kernels.kv_store import store_kv

    decode = all(new <= 1 for _, new in seqs)
    if entry == "split_kv_decode" and not decode:
        pytest.skip("the split takes decode steps only")
    args, _ = random_step(seqs, window=window, padding_rows=5, **GPT_OSS)
    mine, theirs = stored_as(args, E4M3, store_kv), stored_as(args, E4M3)
    want = paged_attention_reference(**theirs, out=torch.full_like(args["q"], 7.0))
    out = torch.full_like(args["q"], 7.0)
    if entry == "split_kv_decode":
        got = split_kv_attention.split_kv_decode(**mine, num_splits=4, min_chunk=64, out=out)
    else:
        got = getattr(varlen_attention, entry)(**mine, max_query_len=max(n for _, n in seqs), out=out)
    n = sum(new for _, new in seqs)
    assert torch.equal(got[n:], torch.full_like(got[n:], 7.0))
    assert _error(got[:n], want[:n]) < 1e-2
    # and fp8 against bf16 attention on the same keys: e4m3's rounding (3.3% on the CPU's case), not a wrong read
    assert _error(got[:n], paged_attention_reference(**args)[:n]) < 5e-2


@pytest.mark.gpu
def test_fp8_attention_at_128k_matches_the_reference_on_gpu():
    """gpt-oss's longest context in an e4m3 cache, stored by the kernel: a long prompt's last chunk beside decodes
    (the split prefill) and a decode step alone (split-KV), against the reference reading the reference's store."""
    from gptoss_serve.kernels.kv_store import store_kv
    from gptoss_serve.kernels.varlen_attention import paged_attention

    for seqs in ([(131072, 64), (100_000, 1), (17, 1)], [(131072, 1), (70_000, 1)]):
        args = long_step(seqs, padding_rows=3)
        mine, theirs = stored_as(args, E4M3, store_kv), stored_as(args, E4M3)
        n = sum(new for _, new in seqs)
        want = paged_attention_reference(**theirs, out=torch.full_like(args["q"], 7.0))
        got = paged_attention(**mine, max_query_len=max(new for _, new in seqs), out=torch.full_like(args["q"], 7.0))
        assert torch.equal(got[n:], want[n:])
        assert _error(got[:n], want[:n]) < 1e-2, seqs


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_fp8_decode_replays_in_a_cuda_graph_with_other_contexts(window):
    """Captured with max_model_len-wide tables (32k: the split path without a window), replayed with other context
    lengths: the reference's answers, and bit for bit an eager call's."""
    from gptoss_serve.kernels.kv_store import store_kv
    from gptoss_serve.kernels.varlen_attention import paged_attention

    args, _ = random_step([(6000, 1)] * 3, **GPT_OSS)
    args = stored_as(args, E4M3, store_kv)
    args["window"] = window
    graph, captured = captured_wide_decode(args)
    for contexts in ([6000, 300, 17], [1, 4097, 5000]):
        args["context_lens"].copy_(torch.tensor(contexts, dtype=torch.int32))
        args["q"].normal_()
        graph.replay()
        assert _error(captured, paged_attention_reference(**args)) < 1e-2, contexts
        torch.testing.assert_close(captured, paged_attention(**args, max_query_len=1), rtol=0, atol=0)
