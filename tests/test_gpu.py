"""The same checks on a CUDA device (skipped without one): logits against transformers, the engine's greedy
output against no-cache forward passes."""

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

pytestmark = pytest.mark.gpu


def test_logits_match_the_reference_on_gpu(tiny_checkpoint):
    """bf16 checkpoints against transformers; MXFP4 ones against our own CPU logits, which the CPU suite holds
    to transformers' dequantized load (with CUDA present, transformers keeps MXFP4 experts quantized and runs
    other kernels, so it is no dequantized reference there)."""
    transformers = pytest.importorskip("transformers")
    ours = load_model(tiny_checkpoint, device="cuda", dtype=torch.float32)
    if ours.config.quantization:
        reference = load_model(tiny_checkpoint, dtype=torch.float32)
    else:
        reference = transformers.GptOssForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    ids = torch.randint(0, 201088, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids)
        expected = (expected.logits if hasattr(expected, "logits") else expected).float()
        error = ((ours(ids.cuda()).cpu() - expected).norm() / expected.norm()).item()
    assert error < 1e-5, error


def test_engine_greedy_on_gpu(tiny_mxfp4):
    model = load_model(tiny_mxfp4, device="cuda", dtype=torch.float32)
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=64, max_model_len=256,
                                                             max_num_batched_tokens=40))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200_000, (n,), generator=gen).tolist() for n in (7, 50, 90)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(40):
                ids.append(int(model(torch.tensor([ids], device="cuda"))[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt):]
    assert engine.is_idle()


def test_grouped_experts_match_the_loop_in_bf16(tiny_bf16):
    model = load_model(tiny_bf16, device="cuda")  # bf16: the grouped path on Hopper
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    expert_ids = torch.stack([torch.randperm(8, device="cuda")[:4] for _ in range(300)])
    weights = torch.softmax(torch.randn(300, 4, device="cuda"), dim=-1)
    torch.testing.assert_close(experts.forward_grouped(hidden, expert_ids, weights),
                               experts.forward_loop(hidden, expert_ids, weights), rtol=2e-2, atol=2e-2)


def _greedy_tokens(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [out.token_ids for out in engine.generate(prompts, params)]


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_decode_graphs_give_the_eager_tokens(tiny_mxfp4, batch):
    """bf16, packed experts: decode steps replayed from CUDA graphs (5 is padded to the bucket of 8) against the
    same engine launching every kernel; prompts cross the window (32) and block boundaries."""
    model = load_model(tiny_mxfp4, device="cuda")
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 200_000, (n,), generator=gen).tolist() for n in (7, 50, 90, 33, 16)[:batch]]
    config = dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=8)
    graphs = LLMEngine(model, load_tokenizer(), EngineConfig(**config))
    assert graphs.runner.graphs is not None and graphs.runner.graphs.buckets == [1, 2, 4, 8]
    eager = LLMEngine(model, load_tokenizer(), EngineConfig(**config, enforce_eager=True))
    assert eager.runner.graphs is None
    got, expected = _greedy_tokens(graphs, prompts, 40), _greedy_tokens(eager, prompts, 40)
    if batch in (1, 4):  # the same shapes, the same kernels: the same bits
        assert got == expected
    else:  # padded: the MoE kernel may tile 8 rows differently from 5, so allow a late divergence
        agree = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e))
        assert agree >= 0.9 * sum(map(len, expected)), (got, expected)


def test_async_scheduling_gives_the_synchronous_tokens(tiny_mxfp4):
    """On the GPU, with graphs: steps launched ahead of their predecessors' tokens reaching the host, stop tokens
    found a step late, requests of several lengths and a seeded sampled one: the same tokens as synchronous steps."""
    model = load_model(tiny_mxfp4, device="cuda")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 200_000, (n,), generator=gen).tolist() for n in (7, 50, 90, 33, 16)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (40, 9, 25, 1, 33)]
    params[4] = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True, logprobs=2)
    config = dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=8)
    free = LLMEngine(model, load_tokenizer(), EngineConfig(**config)).generate(prompts[:1], params[:1])[0].token_ids
    prompts.append(prompts[0])  # again, stopped by the id of its 6th token
    params.append(SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[free[5]]))
    runs = {}
    for async_scheduling in (False, True):
        engine = LLMEngine(model, load_tokenizer(), EngineConfig(**config, async_scheduling=async_scheduling))
        runs[async_scheduling] = [(out.token_ids, [lp.token_id for lp in out.logprobs or []])
                                  for out in engine.generate(prompts, params)]
        assert engine.is_idle()
    assert runs[True] == runs[False]
    assert runs[True][-1][0] == free[:free.index(free[5]) + 1]


def _staggered(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of the prompts, one arriving every third step while the others decode: mixed steps."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    step = 0
    while step < 3 * len(prompts) or engine.has_unfinished_requests:
        if step % 3 == 0 and step // 3 < len(prompts):
            engine.add_request(str(step // 3), prompts[step // 3], params)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return [tokens[str(i)] for i in range(len(prompts))]


def test_mixed_steps_from_piecewise_graphs_give_the_eager_tokens(tiny_mxfp4):
    """Prompt chunks beside decodes replayed from piecewise graphs (a set of pieces per step size, attention eager
    between them) against the same engine launching every kernel: requests arrive while others decode, chunks of at
    most 24 tokens cross the window (32) and block boundaries, and steps are padded to their bucket."""
    model = load_model(tiny_mxfp4, device="cuda")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 200_000, (n,), generator=gen).tolist() for n in (7, 50, 90, 33, 16, 61)]
    config = dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=40,
                  long_prefill_token_threshold=24)
    graphs = LLMEngine(model, load_tokenizer(), EngineConfig(**config, mixed_step_graph_tokens=40))
    assert graphs.runner.mixed_graphs.buckets == [8, 16, 24, 32, 40]
    eager = LLMEngine(model, load_tokenizer(), EngineConfig(**config, enforce_eager=True))
    assert eager.runner.mixed_graphs is None
    got, expected = _staggered(graphs, prompts, 30), _staggered(eager, prompts, 30)
    assert graphs.runner.mixed_graph_steps >= len(prompts)  # each prompt's chunks rode beside decodes
    # padded rows change how the MoE kernel tiles a step, so allow a late divergence, as for padded decode graphs
    agree = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e))
    assert agree >= 0.9 * sum(map(len, expected)), (got, expected)
    assert [len(g) for g in got] == [30] * len(prompts) and graphs.is_idle()


def test_a_dropped_engine_leaves_no_cycle_through_its_graphs(tiny_mxfp4):
    """An engine with decode and mixed-step graphs is gone when its last reference is: its runner must not be part
    of a reference cycle (its mixed graphs' attention backend once closed over it), which would keep the KV cache's
    GPU memory until a garbage collection (a served app started after an offline run ran out of memory so)."""
    model = load_model(tiny_mxfp4, device="cuda")
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=64, max_model_len=256, max_num_seqs=4))
    assert engine.runner.mixed_graphs is not None and engine.runner.graphs is not None
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3))
    runner, cache = weakref.ref(engine.runner), weakref.ref(engine.runner.cache)
    gc.disable()
    try:
        del engine
        assert runner() is None and cache() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, top_p=0.9, presence_penalty=0.5)])
def test_a_decode_step_never_syncs_with_the_host(tiny_mxfp4, async_scheduling, sampling):
    """The inputs go over in one non-blocking copy, the forward pass (a graph replay here) never waits for the host,
    the sampler's options go over from pinned memory, and the sampled ids come back through pinned memory: the host
    waits on that copy's event alone (at once when steps are synchronous, while the next step runs under async
    scheduling), never on the whole stream, greedy or not."""
    from gptoss_serve.bench.profile_step import count_syncs

    model = load_model(tiny_mxfp4, device="cuda")
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=64, max_model_len=256, max_num_seqs=4,
                                                             async_scheduling=async_scheduling))
    for i in range(3):
        engine.add_request(str(i), list(range(100 + i, 140 + i)), SamplingParams(**sampling, max_tokens=30,
                                                                                  ignore_eos=True))
    for _ in range(3):  # the prefill (one step: 120 tokens), then decode steps, the graphs' first replays
        engine.step()
    assert engine.num_waiting == 0 and engine.num_running == 3
    assert count_syncs(engine.step, 5) == 0



SERVE_AFTER_START_UP = """
import sys, torch
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.kernels.compile_watch import compile_watch
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

engine = LLMEngine(load_model(sys.argv[1], device="cuda"), load_tokenizer(),
                   EngineConfig(num_kv_blocks=256, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64))
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 200_000, (n,), generator=gen).tolist() for n in (7, 33, 130, 61, 250)]
engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
print(engine.kernel_compiles, compile_watch().last_kernel)
"""


def test_serving_after_start_up_compiles_no_kernel(tiny_mxfp4):
    """Start-up compiles every kernel variant a step needs: prompts of odd lengths (which put parts of a step's
    inputs off a 16-byte boundary before StepInputs aligned them), chunks beside decodes, prompt chunks through the
    MoE's many-token kernels (whose warm-up once passed float32 routing weights), decode graphs; then nothing
    compiles while serving: each compile stalls its step, and every request in it, for a second or more. In a
    process of its own, so that no kernel another test compiled hides one the engine's start-up misses."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", SERVE_AFTER_START_UP, str(tiny_mxfp4)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiles, last = run.stdout.split()[-2:]
    assert compiles == "0", f"{compiles} kernel variants compiled while serving, the last {last}"
