"""kernels/small_linear.py against F.linear (its reference): on the GPU at gpt-oss-20b's projection shapes with fresh
random inputs, and in Triton's CPU interpreter for the indexing and masks."""

from __future__ import annotations

import textwrap

import pytest
import torch

from gptoss_serve.kernels.small_linear_reference import small_linear_reference
from tests.interpreter import assert_runs_in_interpreter

# (N, K): QKV, o_proj, the router, and an odd shape that leaves partial tiles on both axes
SHAPES = [(5120, 2880), (2880, 4096), (32, 2880), (1000, 200)]


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("rows", [1, 3, 16, 64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_matches_the_reference(rows, shape, with_bias):
    from gptoss_serve.kernels.small_linear import small_linear

    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(rows * 7 + n)
    x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16() if with_bias else None
    got = small_linear(x, weight, bias)
    want = small_linear_reference(x.float(), weight.float(), None if bias is None else bias.float())
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.gpu
def test_a_strided_row_view_and_too_many_rows():
    from gptoss_serve.kernels.small_linear import MAX_ROWS, small_linear

    base = torch.randn(4, 2 * 256, device="cuda").bfloat16()
    x = base[:, ::2]  # a column stride of 2: copied to a contiguous tensor first
    weight = torch.randn(48, 256, device="cuda").bfloat16()
    torch.testing.assert_close(small_linear(x, weight).float(), small_linear_reference(x.float(), weight.float()),
                               rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="M <= 64"):
        small_linear(torch.zeros(MAX_ROWS + 1, 256, device="cuda").bfloat16(), weight)


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_asking_l2_for_the_weights_first_changes_nothing_but_the_time(rows, shape):
    """prefetch is a hint: bit for bit the output without it, including the last, partial tile of features."""
    from gptoss_serve.kernels.small_linear import small_linear

    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(rows + n)
    x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16()
    for tiles in (dict(), dict(block_n=64, block_k=128)):
        fetched = small_linear(x, weight, bias, prefetch=True, **tiles)
        assert torch.equal(fetched, small_linear(x, weight, bias, **tiles))


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_allocations")
def test_the_model_projections_through_the_kernel(tiny_mxfp4, monkeypatch):
    """GPTOSS_KERNEL_OPS=small_linear: a decode step's QKV, o_proj and router run small_linear's projection (2-D bf16
    inputs of at most 64 rows), close to cuBLAS's; the engine decodes with it inside its CUDA graphs."""
    from gptoss_serve.cluster.engine import LLMEngine
    from gptoss_serve.cluster.sampling_params import SamplingParams
    from gptoss_serve.model.loader import load_model
    from gptoss_serve.model.projection import project
    from gptoss_serve.model.tokenizer import load_tokenizer

    model = load_model(tiny_mxfp4, device="cuda")
    attention, router = model.model.layers[0].self_attn, model.model.layers[0].mlp.router
    x = torch.randn(7, model.config.hidden_size, device="cuda").bfloat16()
    cublas = [t.float() for t in attention._project_qkv(x)] + [router(x)[1].float()]
    monkeypatch.setattr(project, "enabled", True)
    assert project.uses_kernel(x) and not project.uses_kernel(x.float()) and not project.uses_kernel(x[None])
    ours = [t.float() for t in attention._project_qkv(x)] + [router(x)[1].float()]
    for a, b in zip(ours, cublas):
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    engine = LLMEngine(model, load_tokenizer())
    [out] = engine.generate([list(range(1000, 1040))], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert len(out.token_ids) == 16


def test_the_prefetching_kernel_compiles_for_sm90_with_one_bulk_prefetch():
    pytest.importorskip("triton")
    from gptoss_serve.bench.kernel_sass import compile_for_sm90, disassemble
    from gptoss_serve.kernels.small_linear import _small_linear

    constants = dict(HAS_BIAS=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, NUM_STAGES=4)
    pointers = dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16")
    fetching = disassemble(compile_for_sm90(_small_linear, constants | dict(PREFETCH=True), 4, pointers).asm["cubin"])
    plain = disassemble(compile_for_sm90(_small_linear, constants | dict(PREFETCH=False), 4, pointers).asm["cubin"])
    assert fetching.count("UBLKPF.L2") == 1 and "UBLKPF" not in plain


INTERPRETED = textwrap.dedent("""
    import torch
    from gptoss_serve.kernels.small_linear import small_linear
    from gptoss_serve.kernels.small_linear_reference import small_linear_reference
    gen = torch.Generator().manual_seed(0)
    for rows, n, k, bias in ((1, 40, 300, True), (5, 64, 64, False), (17, 33, 260, True)):
        x = torch.randn(rows, k, generator=gen)  # float32: the interpreter's bf16 dot is not exact
        weight = torch.randn(n, k, generator=gen)
        b = torch.randn(n, generator=gen) if bias else None
        got = small_linear(x, weight, b, block_n=16, block_k=64, prefetch=True)  # (no PTX here: ignored)
        want = small_linear_reference(x, weight, b)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (rows, n, k, (got - want).abs().max())
    print("ok")
""")


def test_the_kernel_in_the_interpreter_matches_the_reference():
    assert_runs_in_interpreter(INTERPRETED)
