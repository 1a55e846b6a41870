"""A layer's small fused kernels (residual add + RMSNorm, rotary on q and k, the KV-cache write, the MoE router's
top-k + softmax) against their PyTorch references: in Triton's CPU interpreter (a subprocess, float32) and on the GPU
(bf16, gpt-oss shapes, strided views as the model passes them)."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

from gptoss_serve.kernels.paged_attention import store_kv_reference
from gptoss_serve.kernels.rms_norm_reference import add_rms_norm_reference
from gptoss_serve.kernels.rotary_reference import apply_rotary
from gptoss_serve.kernels.router_reference import top_k_softmax_reference
from gptoss_serve.model.moe import ExpertRouter
from gptoss_serve.model.synthetic import preset_config
from tests.interpreter import assert_runs_in_interpreter


def norm_case(rows: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden + 7, generator=gen)[:, :hidden].to(dtype=dtype, device=device)  # strided rows
    residual = (4 * torch.randn(rows, hidden, generator=gen)).to(dtype=dtype, device=device)
    weight = (1 + torch.randn(hidden, generator=gen) / 4).to(dtype=dtype, device=device)
    return x, residual, weight


def rotary_case(tokens: int, q_heads: int, k_heads: int, dim: int, dtype: torch.dtype, device: str, seed: int = 0):
    """q, k, v as views of one fused projection's output, cos/sin of random positions."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * dim, generator=gen).to(dtype=dtype, device=device)
    q, k, _ = qkv.split([q_heads * dim, k_heads * dim, k_heads * dim], dim=-1)
    q, k = q.unflatten(-1, (q_heads, dim)), k.unflatten(-1, (k_heads, dim))
    freqs = torch.randint(0, 4096, (tokens, 1), generator=gen).float() / (1000 ** torch.linspace(0, 1, dim // 2))
    return q, k, (1.3 * freqs.cos()).to(device), (1.3 * freqs.sin()).to(device)


def router_case(tokens: int, experts: int, hidden: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    config = dataclasses.replace(preset_config("tiny"), num_local_experts=experts, hidden_size=hidden,
                                 num_experts_per_tok=k)
    router = ExpertRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=gen) / hidden**0.5)
        router.bias.copy_(torch.randn(experts, generator=gen) / 4)
    x = torch.randn(tokens, hidden + 5, generator=gen)[:, :hidden]  # strided rows
    return router.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device)


def kv_case(tokens: int, heads: int, dim: int, blocks: int, dtype: torch.dtype, device: str, seed: int = 0):
    """k, v as views of a fused projection's output, empty caches, distinct slots (the padding rows' in block 0)."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(tokens, 3 * heads * dim, generator=gen)[:, heads * dim:].to(dtype=dtype, device=device)
    k, v = (t.unflatten(-1, (heads, dim)) for t in kv.split(heads * dim, dim=-1))
    caches = [torch.zeros(blocks, 16, heads, dim, dtype=dtype, device=device) for _ in range(2)]
    slots = torch.randperm(blocks * 16 - 16, generator=gen)[:tokens].to(device) + 16
    slots[-1] = 3  # a padding row: the null block
    return k, v, caches, slots


INTERPRETED = textwrap.dedent("""
    import torch
    from gptoss_serve.kernels.rms_norm import add_rms_norm
    from gptoss_serve.kernels.rotary import rotary_qk
    from gptoss_serve.kernels.router import top_k_softmax
    from gptoss_serve.kernels.kv_store import store_kv
    from gptoss_serve.kernels.paged_attention import store_kv_reference
    from gptoss_serve.kernels.rms_norm_reference import add_rms_norm_reference
    from gptoss_serve.kernels.rotary_reference import apply_rotary
    from gptoss_serve.kernels.router_reference import top_k_softmax_reference
    from tests.test_layer_kernels import kv_case, norm_case, rotary_case, router_case
    x, residual, weight = norm_case(3, 40, torch.float32, "cpu")
    for r in (residual, None):
        got, want = add_rms_norm(x, r, weight, 1e-5), add_rms_norm_reference(x, r, weight, 1e-5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    q, k, cos, sin = rotary_case(5, 6, 2, 16, torch.float32, "cpu")
    got = rotary_qk(q, k, cos, sin)
    torch.testing.assert_close(got[0], apply_rotary(q, cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], apply_rotary(k, cos, sin), rtol=1e-6, atol=1e-6)
    router, x = router_case(6, 20, 300, 3, torch.float32, "cpu")
    logits = torch.nn.functional.linear(x, router.weight, router.bias)
    ids, weights = top_k_softmax(logits, 3)
    want_ids, want_weights = top_k_softmax_reference(logits, 3)
    assert torch.equal(ids, want_ids), (ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    k, v, caches, slots = kv_case(5, 3, 8, 4, torch.float32, "cpu")
    want = [c.clone() for c in caches]
    store_kv(k, v, *caches, slots)
    store_kv_reference(k, v, *want, slots)
    assert all(torch.equal(a, b) for a, b in zip(caches, want))
    print("ok")
""")


def test_kernels_in_the_interpreter_match_their_references():
    """Float32 in Triton's CPU interpreter: indexing, masks (hidden sizes, head and expert counts and k off powers
    of two), strided rows and views, with and without a residual."""
    assert_runs_in_interpreter(INTERPRETED)


def test_reference_norm_adds_then_normalizes():
    x, residual, weight = norm_case(4, 32, torch.float32, "cpu")
    normed, summed = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, x + residual)
    rms = summed.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(normed, weight * summed / rms, rtol=1e-4, atol=1e-5)
    assert add_rms_norm_reference(x, None, weight, 1e-5)[1] is x


# ------------------------------------------------------------------------------------------------------- GPU tests

@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("rows", [1, 7, 2048])
def test_norm_kernel_matches_the_reference_on_gpu(rows):
    from gptoss_serve.kernels.rms_norm import add_rms_norm

    x, residual, weight = norm_case(rows, 2880, torch.bfloat16, "cuda", seed=rows)
    for r in (residual, None):
        (normed, summed), (want_normed, want_summed) = add_rms_norm(x, r, weight, 1e-5), \
            add_rms_norm_reference(x, r, weight, 1e-5)
        assert torch.equal(summed, want_summed)  # the residual stream itself is exact
        # rsqrt may differ in its last float32 bit: at most one bf16 step apart, rarely
        assert (normed.float() - want_normed.float()).abs().max() <= want_normed.float().abs().max() / 128


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_rotary_kernel_matches_the_reference_on_gpu(tokens):
    from gptoss_serve.kernels.rotary import rotary_qk

    q, k, cos, sin = rotary_case(tokens, 64, 8, 64, torch.bfloat16, "cuda", seed=tokens)
    got_q, got_k = rotary_qk(q, k, cos, sin)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    for got, x in ((got_q, q), (got_k, k)):
        exact = apply_rotary(x.float(), cos, sin)  # float32 throughout: the kernel rounds only its result
        torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=2**-12)
        # the bf16 reference rounds each product and sum: it lies within a bf16 step of the kernel
        torch.testing.assert_close(got, apply_rotary(x, cos, sin), rtol=2**-6, atol=2**-5)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_kv_store_kernel_matches_the_reference_on_gpu(tokens):
    from gptoss_serve.kernels.kv_store import store_kv

    k, v, caches, slots = kv_case(tokens, 8, 64, 256, torch.bfloat16, "cuda", seed=tokens)
    want = [c.clone() for c in caches]
    store_kv(k, v, *caches, slots)
    store_kv_reference(k, v, *want, slots)
    assert all(torch.equal(a, b) for a, b in zip(caches, want))


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("tokens", [1, 64, 2048])
@pytest.mark.parametrize("experts", [32, 128])
def test_router_kernel_matches_the_reference_on_gpu(tokens, experts):
    from gptoss_serve.kernels.router import top_k_softmax

    router, x = router_case(tokens, experts, 2880, 4, torch.bfloat16, "cuda", seed=tokens)
    logits = torch.nn.functional.linear(x, router.weight, router.bias)
    ids, weights = top_k_softmax(logits, 4)
    want_ids, want_weights = top_k_softmax_reference(logits, 4)
    # bf16 logits can tie; the kernel takes the lower id, torch.topk either: compare the chosen logits, not ids
    torch.testing.assert_close(logits.gather(1, ids), logits.gather(1, want_ids), rtol=0, atol=0)
    torch.testing.assert_close(weights, want_weights, rtol=2**-7, atol=2**-8)
    assert torch.equal(router(x)[0], ids)  # the module takes the kernel on the GPU


def test_poisoned_allocations_start_as_nan_or_the_largest_integer(poisoned_allocations):
    """What the GPU tests above rely on: an element no kernel wrote is never a plausible value."""
    assert torch.isnan(torch.empty(64)).all() and torch.isnan(torch.empty(8, dtype=torch.bfloat16)).all()
    assert (torch.empty(16, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3, 5))).all()
