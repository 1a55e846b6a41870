"""The engine's greedy output equals no-cache forward passes and transformers' generate, token for token,
through continuous batching, chunked prefill, sliding windows, block boundaries, prefix hits and preemption; each
test that builds an engine (make_engine) runs with synchronous steps and with async scheduling (a step's tokens read
while the next one runs)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """Every test that builds an engine runs with synchronous steps and with async scheduling."""
    return request.param


@pytest.fixture(scope="module")
def model(tiny_bf16):
    return load_model(tiny_bf16, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def make_engine(model, tokenizer, async_scheduling):
    """-> an engine on the tiny model under the test's scheduling: make_engine(micro_batches=..., **EngineConfig
    fields)."""

    def make(*, micro_batches: int = 1, **config) -> LLMEngine:
        return LLMEngine(model, tokenizer, EngineConfig(**{"num_kv_blocks": 128, "max_model_len": 512,
                                                           "async_scheduling": async_scheduling, **config}),
                         micro_batches=micro_batches)

    return make


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200_000, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Repeated full forward passes without any cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def run_to_end(eng: LLMEngine, joins: dict[int, list[tuple[str, list[int], SamplingParams]]] | None = None):
    """Steps the engine, adding requests at the given steps; returns request id -> output tokens."""
    joins = dict(joins or {})
    tokens: dict[str, list[int]] = {}
    step = 0
    while eng.has_unfinished_requests or joins:
        for request_id, prompt, params in joins.pop(step, []):
            eng.add_request(request_id, prompt, params)
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    return tokens


def test_requests_joining_mid_way_match_the_reference(make_engine, model):
    eng = make_engine(max_num_batched_tokens=48)  # 48-token chunks: long prompts take several steps
    ps = prompts(5, 70, 33, 120, 16)
    joins = {0: [("a", ps[0], GREEDY), ("b", ps[1], GREEDY)], 3: [("c", ps[2], GREEDY)],
             9: [("d", ps[3], GREEDY), ("e", ps[4], GREEDY)]}
    out = run_to_end(eng, joins)
    for name, prompt in zip("abcde", ps):
        assert out[name] == reference_greedy(model, prompt, GREEDY.max_tokens), name
    assert eng.is_idle()


def test_matches_transformers_generate(make_engine, tiny_bf16):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssForCausalLM.from_pretrained(tiny_bf16, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    ps = prompts(30, 65, seed=1)
    results = make_engine().generate(ps, GREEDY)
    for prompt, result in zip(ps, results):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids == expected


def test_prefix_cache_reuses_a_shared_system_prompt(make_engine, model):
    eng = make_engine()
    system = prompts(50, seed=2)[0]
    first, second = system + prompts(7, seed=3)[0], system + prompts(12, seed=4)[0]
    assert eng.generate([first], GREEDY)[0].token_ids == reference_greedy(model, first, GREEDY.max_tokens)
    hits = eng.scheduler.prefix_hits
    out = eng.generate([second], GREEDY)[0]
    assert eng.scheduler.prefix_hits - hits == 48  # three full 16-token blocks of the shared 50
    assert out.token_ids == reference_greedy(model, second, GREEDY.max_tokens)
    # the same prompt again: every full block but the one holding the last token comes from the cache
    again = eng.generate([second], GREEDY)[0]
    assert again.token_ids == out.token_ids and eng.is_idle()


def test_preemption_when_the_cache_runs_out(make_engine, model):
    eng = make_engine(num_kv_blocks=24, max_model_len=200, max_num_batched_tokens=32)
    ps = prompts(60, 45, 70, 52, seed=5)
    results = eng.generate(ps, GREEDY)
    assert eng.scheduler.num_preemptions > 0
    for prompt, result in zip(ps, results):
        assert result.token_ids == reference_greedy(model, prompt, GREEDY.max_tokens)
    assert eng.is_idle()


def test_no_prefix_caching_gives_the_same_tokens(make_engine):
    ps = prompts(40, 40, seed=6)
    ps[1][:32] = ps[0][:32]
    cached = make_engine().generate(ps, GREEDY)
    plain = make_engine(enable_prefix_caching=False).generate(ps, GREEDY)
    assert [r.token_ids for r in cached] == [r.token_ids for r in plain]


def test_finish_reasons_and_stops(make_engine):
    eng = make_engine()
    prompt = prompts(10, seed=7)[0]
    free = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    # stop on the 5th generated token's id
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    stopped = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first + 1]
    assert eng.is_idle()


def test_seeded_sampling_is_reproducible_and_logprobs_come_back(make_engine):
    eng = make_engine()
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=10, ignore_eos=True, logprobs=3)
    ps = prompts(20, 25, seed=8)
    a = eng.generate([ps[0], ps[1]], p)
    b = eng.generate([ps[1], ps[0]], p)
    assert a[0].token_ids == b[1].token_ids and a[1].token_ids == b[0].token_ids
    assert len(a[0].logprobs) == 10 and all(len(lp.top) == 3 for lp in a[0].logprobs)
    assert [lp.token_id for lp in a[0].logprobs] == a[0].token_ids


def test_async_steps_return_the_tokens_of_the_step_before(make_engine, async_scheduling):
    """Under async scheduling a step hands back the previous step's tokens, so the host's work overlaps the
    device's; synchronous steps hand back their own."""
    eng = make_engine()
    eng.add_request("a", prompts(6, seed=12)[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    counts = [len(eng.step()) for _ in range(4)]
    assert counts == ([0, 1, 1, 1] if async_scheduling else [1, 1, 1, 0])
    assert eng.is_idle()


def test_penalized_requests_beside_plain_ones(make_engine):
    """Penalties read every output token on the host: while such a request runs, steps are synchronous; the
    tokens of every request are those each gets alone."""
    ps = prompts(12, 17, 9, seed=13)
    penalized = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.5, presence_penalty=0.2)
    alone = [make_engine().generate([p], params)[0].token_ids
             for p, params in zip(ps, [GREEDY, penalized, GREEDY])]
    eng = make_engine()
    together = run_to_end(eng, {0: [("a", ps[0], GREEDY)], 2: [("b", ps[1], penalized)], 5: [("c", ps[2], GREEDY)]})
    assert [together[k] for k in "abc"] == alone
    assert eng.is_idle()


@pytest.mark.parametrize("params, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop=5), "stop"),
])
def test_invalid_sampling_values_name_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**params)


def test_bad_requests_raise_and_aborts_are_harmless(make_engine):
    eng = make_engine(max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("long", list(range(64)), GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="prompt token ids"):
        eng.add_request("bad", [-1, 5], GREEDY)
    assert eng.abort("never-added") is False
    with pytest.raises(ValueError, match="max_tokens is 40, but the prompt has 40 tokens.*at most 24"):
        eng.add_request("too-long", list(range(40)), GREEDY)  # as vLLM: a 400, not a silent cut
    eng.add_request("x", list(range(20)), GREEDY)
    with pytest.raises(ValueError, match="already running"):
        eng.add_request("x", list(range(3)), GREEDY)
    eng.step()
    assert eng.num_free_blocks < eng.num_blocks - 1
    assert eng.abort("x") is True and eng.abort("x") is False
    assert eng.is_idle() and eng.step() == []


@pytest.mark.parametrize("field, value", [("max_num_seqs", 0), ("block_size", 257), ("gpu_memory_utilization", 0),
                                          ("max_model_len", 1), ("kv_cache_gib", -1.0), ("not_a_field", 1)])
def test_bad_engine_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        EngineConfig(**{field: value})


def test_app_args_build_the_engine_config():
    from gptoss_serve.deployments.args import AppArgs
    from gptoss_serve.deployments.builder import parse_args

    args = parse_args({"engine.max_num_seqs": "8", "engine.kv_cache_gib": "0.25"})
    assert args.engine == EngineConfig(max_num_seqs=8, kv_cache_gib=0.25)
    assert AppArgs().engine == EngineConfig()
    with pytest.raises(ValueError, match="engine.max_num_seqs: Input should be greater than or equal to 1"):
        parse_args({"engine": {"max_num_seqs": 0}})


def test_kv_cache_gib_sets_the_cache_budget(model, tokenizer):
    from gptoss_serve.cluster.kv_cache import bytes_per_block

    eng = LLMEngine(model, tokenizer, EngineConfig(kv_cache_gib=0.01, max_model_len=256))
    assert eng.num_blocks == int(0.01 * 2**30) // bytes_per_block(model.config, 16, model.dtype)


def test_max_model_len_must_fit_the_cache(make_engine):
    with pytest.raises(ValueError, match="max_model_len 4096 does not fit"):
        make_engine(num_kv_blocks=16, max_model_len=4096)


def test_micro_batched_steps_give_the_same_tokens(make_engine):
    ps = prompts(9, 41, 70, 23, seed=10)
    plain = make_engine().generate(ps, GREEDY)
    split = make_engine(micro_batches=2).generate(ps, GREEDY)
    assert [r.token_ids for r in split] == [r.token_ids for r in plain]


def test_an_expert_failure_ends_only_that_steps_requests(make_engine, model):
    from gptoss_serve.model.experts import ExpertsUnavailableError

    eng = make_engine(max_num_seqs=1)  # "b" waits while "a" runs
    a, b = prompts(8, 9, seed=11)
    eng.add_request("a", a, GREEDY)
    eng.add_request("b", b, GREEDY)
    launch = eng.runner.launch

    def lose_a_worker(scheduled, pending_tokens=None):
        eng.runner.launch = launch
        raise ExpertsUnavailableError("MoE worker 0 did not answer")

    eng.runner.launch = lose_a_worker
    [failed] = eng.step()
    assert (failed.request_id, failed.finish_reason) == ("a", "error")
    assert failed.error == "the MoE workers serving this request failed; retry"  # which worker: the log's, not the client's
    assert run_to_end(eng)["b"] == reference_greedy(model, b, GREEDY.max_tokens)
    assert eng.is_idle()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(make_engine, model):
    """Any exception in a step fails that step's requests with a message free of internals; three in a row mean
    the engine itself is broken, and the step raises (its process is then replaced)."""
    eng = make_engine()
    a, b = prompts(9, 12, seed=5)
    eng.add_request("a", a, GREEDY)
    launch = eng.runner.launch

    def broken(scheduled, pending_tokens=None):
        raise ValueError("secret detail: /some/path.py line 3")  # not the client's fault: no 400, no detail

    eng.runner.launch = broken
    [failed] = eng.step()
    assert (failed.request_id, failed.finish_reason) == ("a", "error") and "secret" not in failed.error
    assert eng.is_idle()
    eng.runner.launch = launch
    eng.add_request("b", b, GREEDY)
    assert run_to_end(eng)["b"] == reference_greedy(model, b, GREEDY.max_tokens)
    eng.runner.launch = broken
    for i in range(3):
        eng.add_request(f"c{i}", a, GREEDY)
        if i < 2:
            assert [o.finish_reason for o in eng.step()] == ["error"]
    with pytest.raises(ValueError, match="secret"):
        eng.step()


def test_a_dropped_engine_is_gone_without_a_garbage_collection(make_engine):
    """Nothing in the engine refers back to it or to its runner (a cycle would keep the KV cache's memory until a
    collection; on a GPU the mixed-step graphs once made one, see tests/test_gpu.py)."""
    engine = make_engine(micro_batches=2)
    engine.generate(prompts(5, 9), SamplingParams(max_tokens=4, stop=["x"]))
    refs = [weakref.ref(o) for o in (engine, engine.runner, engine.runner.cache, engine.scheduler, engine.blocks)]
    gc.disable()
    try:
        del engine
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()
