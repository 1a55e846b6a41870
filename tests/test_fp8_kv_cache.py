"""The fp8 KV cache (`engine.kv_cache_dtype: fp8`): the setting, what a budget buys, the e4m3 format with its
per-token-head power-of-two scales (kernels/fp8_kv_reference.py), the PyTorch store and attention against attention
on the unquantized keys, the engine on the tiny model against a bf16 cache (CPU); on the GPU, the engine's CUDA
graphs and the quality and capacity on a random 20b at an 8k context. The Triton kernels: test_fp8_kv_kernels.py."""

from __future__ import annotations

import gc

import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.kv_cache import KVCache, blocks_for_budget, bytes_per_block, kv_cache_dtype
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.kernels.fp8_kv_reference import E4M3, dequantize_e4m3, quantize_e4m3
from gptoss_serve.kernels.paged_attention import paged_attention_reference
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.synthetic import preset_config
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.attention_cases import random_step, stored_as
from tests.kv_cache_quality import agreement, attention_outputs, greedy_agreement, paged_logits, routes

BF16 = torch.bfloat16


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


# ------------------------------------------------------------------------------------------------ the setting

def test_the_setting_takes_vllms_names_and_names_itself_when_wrong():
    from gptoss_serve.deployments.builder import parse_args

    assert EngineConfig().kv_cache_dtype == "auto"
    assert EngineConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"
    assert EngineConfig(kv_cache_dtype="bfloat16").kv_cache_dtype == "bf16"
    assert parse_args({"engine.kv_cache_dtype": "fp8"}).engine.kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="^kv_cache_dtype: Input should be 'auto', 'bf16' or 'fp8'"):
        EngineConfig(kv_cache_dtype="fp16")
    with pytest.raises(ValueError, match="engine.kv_cache_dtype: Input should be 'auto', 'bf16' or 'fp8'"):
        parse_args({"engine": {"kv_cache_dtype": "fp8_e5m2"}})
    assert kv_cache_dtype("auto", torch.float32) == torch.float32
    assert kv_cache_dtype("bf16", torch.float32) == BF16 and kv_cache_dtype("fp8", BF16) == E4M3


def test_a_budget_buys_about_twice_the_fp8_blocks_and_the_cache_costs_what_it_counts():
    config = preset_config("20b")
    bf16, fp8 = (bytes_per_block(config, 16, dtype) for dtype in (BF16, E4M3))
    assert bf16 / fp8 == 128 / 65  # head_dim 64: 64 e4m3 bytes and one scale byte a token-head, against 128
    budget = 40 << 30
    blocks = {d: blocks_for_budget(config, block_size=16, dtype=d, budget_bytes=budget) for d in (BF16, E4M3)}
    assert blocks[E4M3] >= 1.96 * blocks[BF16]

    tiny = preset_config("tiny")
    cache = KVCache(tiny, num_blocks=10, block_size=16, dtype=E4M3, device="cpu")
    tensors = (cache.keys, cache.values, cache.key_scales, cache.value_scales)
    assert sum(t.numel() * t.element_size() for t in tensors) == 10 * bytes_per_block(tiny, 16, E4M3)
    layer = cache.layer(1)
    assert layer.keys.dtype == E4M3 and layer.key_scales.shape == layer.keys.shape[:3]
    plain = KVCache(tiny, num_blocks=10, block_size=16, dtype=BF16, device="cpu")
    assert plain.key_scales is None and plain.layer(0).scales == {"key_scales": None, "value_scales": None}


def test_the_engine_sizes_and_reports_its_fp8_cache(tiny_bf16):
    from gptoss_serve.cluster.engine_core import engine_stats

    model = load_model(tiny_bf16, dtype=torch.float32)
    engines = {kv: LLMEngine(model, load_tokenizer(), EngineConfig(kv_cache_gib=0.01, max_model_len=256,
                                                                   kv_cache_dtype=kv)) for kv in ("bf16", "fp8")}
    assert engines["fp8"].num_blocks == int(0.01 * 2**30) // bytes_per_block(model.config, 16, E4M3)
    assert engines["fp8"].num_blocks >= 1.8 * engines["bf16"].num_blocks  # 1.88x at the tiny model's head_dim 16
    assert engine_stats(engines["fp8"]).kv_cache_dtype == "float8_e4m3fn"
    assert engine_stats(engines["bf16"]).kv_cache_dtype == "bfloat16"


# ---------------------------------------------------------------------------------------------------- the format

def test_each_token_head_gets_a_power_of_two_scale_that_fills_e4m3s_top_binade():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 64, generator=gen) * torch.logspace(-30, 30, 50, base=2)[:, None, None]
    values, exponents = quantize_e4m3(x)
    top = values.float().abs().amax(-1)
    assert ((top >= 224) & (top <= 448)).all()  # the largest number of each head in e4m3's top binade: no clipping
    got = dequantize_e4m3(values, exponents, torch.float32)
    # 3 mantissa bits: within 2**-4 of each number, relative, whatever the head's magnitude (2**-30 to 2**30)
    assert ((got - x).abs() <= x.abs() * 2**-4 + x.abs().amax(-1, keepdim=True) * 2**-17).all()
    assert torch.equal(dequantize_e4m3(values, exponents, BF16).float(), got)  # exact in bf16 too
    zeros, zero_exponents = quantize_e4m3(torch.zeros(2, 3, 8))
    assert torch.equal(dequantize_e4m3(zeros, zero_exponents, torch.float32), torch.zeros(2, 3, 8))


def test_one_outlier_costs_only_its_own_heads_precision():
    """A per-tensor scale must cover the largest number any head holds; here only that head pays for it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 64, generator=gen)
    x[3, 1, 7] = 5000.0
    got = dequantize_e4m3(*quantize_e4m3(x), torch.float32)
    others = torch.ones(8, 2, dtype=torch.bool)
    others[3, 1] = False
    assert _error(got[others], x[others]) < 0.04  # e4m3's own rounding (about 2.7% on normal numbers)
    assert abs(got[3, 1, 7].item() - 5000.0) <= 5000 * 2**-4


# ----------------------------------------------------------------------------------------- store, then attend

@pytest.mark.parametrize("window", [None, 16])
def test_reference_store_then_attend_is_close_to_bf16_attention(window):
    seqs = [(37, 1), (21, 21), (70, 13), (1, 1), (300, 1)]
    args, _ = random_step(seqs, window=window, heads=8, kv_heads=2, head_dim=64)
    n = sum(new for _, new in seqs)
    exact = paged_attention_reference(**args)[:n]
    bf16 = paged_attention_reference(**stored_as(args, BF16))[:n]
    fp8 = paged_attention_reference(**stored_as(args, E4M3))[:n]
    assert _error(bf16, exact) < 5e-3
    # e4m3 keeps 3 mantissa bits to bf16's 7: each number within 2**-4, about 2.7% rms, and where a few keys take
    # most of the attention their values' rounding reaches the output nearly whole (measured: 3.3%, 2.6%)
    assert _error(fp8, bf16) < 5e-2, _error(fp8, bf16)
    assert _error(fp8, exact) < 5e-2


# ---------------------------------------------------------------------------------------- the engine, tiny model

@pytest.fixture(scope="module")
def model(tiny_bf16):
    return load_model(tiny_bf16, dtype=torch.float32)


def _long_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 200_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _compare_caches(model, ids: list[int], *, chunk: int, last: int) -> dict[str, object]:
    """ids teacher-forced through a bf16 cache, then an e4m3 one with the bf16 run's experts, then an e4m3 one with
    its own -> the pinned run's logits (last `last` positions) and its first two layers' attention outputs (every
    position) against the bf16 run's, and the free run's logits against it."""
    run = dict(chunk=chunk, first_logit=len(ids) - last)
    recorded, outputs = [], {dtype: ([], []) for dtype in (BF16, E4M3)}
    logits = {}
    for dtype, route in ((BF16, dict(record=recorded)), (E4M3, dict(replay=recorded))):
        with routes(model, **route), attention_outputs(model, 0, outputs[dtype][0]), \
                attention_outputs(model, 1, outputs[dtype][1]):
            logits[dtype] = paged_logits(model, ids, kv_dtype=dtype, **run)
    return {"pinned": agreement(logits[E4M3], logits[BF16]),
            "free": agreement(paged_logits(model, ids, kv_dtype=E4M3, **run), logits[BF16]),
            "attention": [_error(torch.cat(outputs[E4M3][i]), torch.cat(outputs[BF16][i])) for i in (0, 1)]}


def test_fp8_logits_stay_close_to_bf16s_at_a_long_context(model):
    """Teacher-forced through the paged cache in 128-token chunks (every chunk reads the earlier ones from the
    cache), the last 256 positions of 1024 (32 times the sliding window), experts pinned to the bf16 run's.
    Measured: top-1 agreement 0.93, relative error 0.036 (free experts: 0.87, 0.073); layers 0 (sliding) and 1
    (full) attention outputs 4.4% and 6.1% off (e4m3 rounds each number by up to 2**-4, 2.7% rms)."""
    measured = _compare_caches(model, _long_ids(1024, seed=0), chunk=128, last=256)
    print(f"tiny model, 1k context, fp8 against bf16 KV: {measured}")  # shown with -s (BENCHMARKS.md)
    pinned, (layer0, layer1) = measured["pinned"], measured["attention"]
    assert pinned["top1_agreement"] >= 0.88 and pinned["relative_error"] < 0.05, measured
    assert layer0 < 0.06 and layer1 < 0.08, measured
    # bf16 against a float32 cache, for scale: 16 times less rounding, 0.998 and 0.0022 measured
    recorded = []
    with routes(model, record=recorded):
        exact = paged_logits(model, _long_ids(1024, seed=0), kv_dtype=torch.float32, chunk=128, first_logit=768)
    with routes(model, replay=recorded):
        bf16 = paged_logits(model, _long_ids(1024, seed=0), kv_dtype=BF16, chunk=128, first_logit=768)
    assert agreement(bf16, exact)["relative_error"] < 0.005


def test_the_engine_decodes_from_an_fp8_cache_as_its_prefill_reads_it(model):
    """The engine's greedy tokens on an fp8 cache (chunked prefill, then decode steps reading the cache) are the
    argmax of the teacher-forced fp8 logits along them. Along the bf16 engine's tokens, with experts pinned, fp8's
    top-1 choice is bf16's at most positions (measured over 8 prompts: 0.84 to 0.94, 0.92 on average; relative
    error 0.035 to 0.047). Free-running greedy paths part early on random weights, whose top-1 margins are tiny
    (measured: after 0 to 10 tokens for fp8 against bf16, and after 14 to 100 for bf16 against a float32 cache),
    so the per-position agreement is the measure."""
    prompts = [_long_ids(n, seed=n) for n in (20, 150, 400)]
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    tokens = {}
    for kv in ("bf16", "fp8"):
        engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=160, max_model_len=640,
                                                                 max_num_batched_tokens=96, kv_cache_dtype=kv))
        tokens[kv] = [out.token_ids for out in engine.generate(prompts, params)]
        assert engine.is_idle()
    top1 = []
    for prompt, fp8_out, bf16_out in zip(prompts, tokens["fp8"], tokens["bf16"]):
        run = dict(chunk=64, first_logit=len(prompt) - 1)
        fp8 = paged_logits(model, prompt + fp8_out, kv_dtype=E4M3, **run)[:-1]
        assert greedy_agreement(fp8_out, fp8.argmax(-1).tolist())["same_share"] >= 0.97
        recorded = []
        with routes(model, record=recorded):
            bf16 = paged_logits(model, prompt + bf16_out, kv_dtype=BF16, **run)[:-1]
        assert greedy_agreement(bf16_out, bf16.argmax(-1).tolist())["same_share"] >= 0.97
        with routes(model, replay=recorded):
            fp8 = paged_logits(model, prompt + bf16_out, kv_dtype=E4M3, **run)[:-1]
        measured = agreement(fp8, bf16)
        assert measured["relative_error"] < 0.06, measured
        top1.append(measured["top1_agreement"])
        print(f"tiny model, {len(prompt)}-token prompt, fp8 along bf16's greedy output: {measured}")
    assert sum(top1) / len(top1) >= 0.85, top1


# ------------------------------------------------------------------------------------------------------- GPU tests

@pytest.mark.gpu
def test_fp8_engine_graphs_give_the_eager_tokens(tiny_mxfp4):
    """bf16 model, fp8 cache: decode steps replayed from CUDA graphs against the same engine launching every kernel
    (prompts cross the window and block boundaries), and against the fp8 logits teacher-forced along them."""
    model = load_model(tiny_mxfp4, device="cuda")
    prompts = [_long_ids(n, seed=n) for n in (7, 50, 90, 33)]
    config = dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=4, kv_cache_dtype="fp8")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    graphs = LLMEngine(model, load_tokenizer(), EngineConfig(**config))
    assert graphs.runner.graphs is not None and graphs.runner.cache.dtype == E4M3
    eager = LLMEngine(model, load_tokenizer(), EngineConfig(**config, enforce_eager=True))
    got = [out.token_ids for out in graphs.generate(prompts, params)]
    assert got == [out.token_ids for out in eager.generate(prompts, params)]
    for prompt, tokens in zip(prompts, got):
        logits = paged_logits(model, prompt + tokens, kv_dtype=E4M3, chunk=64, first_logit=len(prompt) - 1)
        # bf16 prefill and decode kernels round apart and random weights' margins are tiny: a few flips, where a
        # decode step misreading the cache would agree on next to nothing
        assert greedy_agreement(tokens, logits[:-1].argmax(-1).tolist())["same_share"] >= 0.8


@pytest.fixture(scope="module")
def random_20b(tmp_path_factory):
    """gpt-oss-20b's shapes with random weights made on the GPU (MXFP4 experts, packed)."""
    from gptoss_serve.model.synthetic import write_config

    path = write_config(tmp_path_factory.mktemp("20b"), preset_config("20b", mxfp4_experts=True))
    return load_model(path, device="cuda", load_format="dummy")


@pytest.mark.gpu
def test_fp8_on_a_random_20b_at_an_8k_context(random_20b):
    """Issue 30's measure on gpt-oss-20b's shapes: 8192 tokens prefilled in 2048-token chunks through bf16 and fp8
    caches. Asserted: the first two layers' attention (sliding, then full over 8k keys; experts pinned), whose
    inputs differ by nothing or little, within e4m3's rounding. Printed (pytest -s) for the record: the logits of
    the last 256 positions, pinned and free. Random 20b weights route by such small margins that bf16 alone against
    float32 agrees on 6% of top-1 choices (77% pinned, BENCHMARKS.md), so only a broken read is asserted there."""
    measured = _compare_caches(random_20b, _long_ids(8192, seed=0), chunk=2048, last=256)
    print(f"random 20b, 8k context, fp8 against bf16 KV: {measured}")
    layer0, layer1 = measured["attention"]
    assert layer0 < 0.06 and layer1 < 0.08, measured
    assert measured["pinned"]["relative_error"] < 0.5, measured  # a wrong read gives ~1


@pytest.mark.gpu
def test_fp8_engine_on_a_random_20b_holds_twice_the_tokens(random_20b):
    """The same 4 GiB hold 1.97x the blocks in fp8. 300 greedy tokens after 1000-token prompts through the engine
    (CUDA graphs, split-KV decode) on each cache are printed for the record (pytest -s), beside bf16 graphs against
    bf16 eager: on random weights' small margins the bf16 path's own rounding parts greedy paths too, so the print
    is the measure, not an assertion."""
    prompts = [_long_ids(1000, seed=s) for s in range(4)]
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    tokens, blocks = {}, {}
    for name, kv, eager in (("bf16", "bf16", False), ("bf16 eager", "bf16", True), ("fp8", "fp8", False)):
        engine = LLMEngine(random_20b, load_tokenizer(), EngineConfig(kv_cache_gib=4, max_model_len=2048,
                                                                      max_num_seqs=4, kv_cache_dtype=kv,
                                                                      enforce_eager=eager))
        tokens[name] = [out.token_ids for out in engine.generate(prompts, params)]
        assert engine.is_idle() and all(len(t) == 300 for t in tokens[name])
        blocks[name] = engine.num_blocks
        del engine  # its cache and graphs, before the next one's
        gc.collect()
        torch.cuda.empty_cache()
    assert blocks["fp8"] >= 1.96 * blocks["bf16"], blocks
    for a, b in (("fp8", "bf16"), ("bf16", "bf16 eager")):
        print(f"random 20b greedy, {a} against {b}:", [greedy_agreement(x, y) for x, y in zip(tokens[a], tokens[b])])
