"""The long-context benchmarks at toy sizes on the CPU: bench.long_context end to end, and bench.engine_throughput's
prompt-length sweep with the cases an engine cannot hold skipped. Figures are checked to exist and be positive, and
the skip rule against the scheduler: a batch it lets run decodes whole and is never preempted."""

from __future__ import annotations

import json

import torch

from gptoss_serve.bench import engine_throughput, long_context
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer


def test_long_context_bench_times_first_tokens_and_decodes_beside_a_prefill(tiny_bf16, tmp_path, capsys):
    out = tmp_path / "long.json"
    long_context.main(["--model", str(tiny_bf16), "--device", "cpu", "--max-model-len", "600",
                       "--ttft-lens", "64", "256", "1000", "--decode-batch", "4", "--decode-prompt-len", "16",
                       "--long-prompt-len", "512", "--max-num-batched-tokens", "64", "--settle-steps", "2",
                       "--baseline-steps", "6", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert [r["prompt_len"] for r in figures["ttft"]] == [64, 256]
    assert all(r["ttft_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in figures["ttft"])
    assert figures["ttft"][1]["steps"] >= 256 // 64  # chunked: a 64-token budget a step
    assert [r["kernel_compiles"] for r in figures["ttft"]] == [0, 0]
    [skipped] = figures["skipped"]
    assert "1000" in skipped["case"] and "max_model_len 600" in skipped["reason"]
    d = figures["decode_beside_prefill"]
    for window in (d["alone"], d["beside_prefill"]):
        assert window["tpot_ms"] > 0 and window["longest_gap_ms"] >= window["tpot_ms"] * 0.5
        assert window["kernel_compiles"] == 0  # no Triton on the CPU
        assert window["tokens_per_request"] >= 2  # the decodes went on in both windows
    # 512 prompt tokens, 60 a step beside the 4 decodes: the prefill took its chunks
    assert d["prefill_steps"] >= -(-512 // 60) and d["long_prompt_ttft_s"] > 0
    printed = capsys.readouterr().out
    assert "while a 512-token prompt prefills" in printed and "skipped: TTFT of 1000 tokens" in printed


def test_engine_throughput_sweeps_prompt_lengths_and_skips_what_does_not_fit(tiny_bf16, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    engine_throughput.main(["--model", str(tiny_bf16), "--device", "cpu", "--prompt-lens", "16", "48",
                            "--batches", "1", "2", "--output-len", "4", "--max-model-len", "40",
                            "--json", str(out)])
    figures = json.loads(out.read_text())
    assert [(r["prompt_len"], r["batch"]) for r in figures["engine"]] == [(16, 1), (16, 2)]
    assert all(r["decode_tokens_per_s"] > 0 and r["max_model_len"] == 40 for r in figures["engine"])
    assert [(s["prompt_len"], s["batch"]) for s in figures["skipped"]] == [(48, 1), (48, 2)]
    assert "max_model_len 40" in figures["skipped"][0]["reason"]
    assert "prompt     48 batch    1: skipped" in capsys.readouterr().out
    # --prompt-len is the one-value spelling of the same option; an fp8 cache holds more tokens in the same budget
    engine_throughput.main(["--model", str(tiny_bf16), "--device", "cpu", "--prompt-len", "24", "--batches", "1",
                            "--output-len", "2", "--kv-cache-dtype", "fp8", "--json", str(out)])
    [row] = json.loads(out.read_text())["engine"]
    assert row["prompt_len"] == 24 and row["kv_cache_dtype"] == "fp8"
    assert row["kv_cache_tokens"] > figures["engine"][0]["kv_cache_tokens"]


def whole_batch_run(engine: LLMEngine, batch: int, prompt_len: int, output_len: int) -> tuple[int, int]:
    """Runs a batch to the end. -> (the most sequences running at once, preemptions)."""
    max_tokens = output_len + engine_throughput.lead_tokens(engine, batch, prompt_len)  # as run_engine asks
    for i, prompt in enumerate(engine_throughput.random_prompts(batch, prompt_len)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests:
        engine.step()
        peak = max(peak, engine.num_running)
    return peak, engine.scheduler.num_preemptions


def test_the_skip_rule_passes_only_batches_that_run_whole(tiny_bf16):
    model = load_model(tiny_bf16, dtype=torch.float32)
    config = EngineConfig(num_kv_blocks=40, max_model_len=96, max_num_batched_tokens=64, max_num_seqs=6)
    accepted, preempted = [], []
    for batch in range(1, 7):
        engine = LLMEngine(model, load_tokenizer(), config)
        reason = engine_throughput.why_skipped(engine, batch, 48, 40)
        peak, preemptions = whole_batch_run(engine, batch, 48, 40)
        if reason is None:
            accepted.append(batch)
            assert (peak, preemptions) == (batch, 0)  # decoded together, never recomputed
        else:
            assert "KV blocks" in reason
        if preemptions:
            preempted.append(batch)
    assert len(accepted) >= 2 and preempted and not set(preempted) & set(accepted)
    assert "max_model_len 96" in engine_throughput.why_skipped(engine, 1, 90, 20)


def test_decode_is_timed_while_the_whole_batch_decodes(tiny_bf16):
    """Prompts that take several steps each to prefill (16 tokens a step): the first requests get enough tokens to
    be still decoding when the last prompt's prefill ends, so each timed step yields one token per request."""
    model = load_model(tiny_bf16, dtype=torch.float32)
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(max_model_len=96, max_num_batched_tokens=16,
                                                             max_num_seqs=4))
    r = engine_throughput.run_engine(engine, 3, 32, 5)
    assert (r["decode_steps"], r["decode_tokens"]) == (5, 3 * 5)
    assert not engine.has_unfinished_requests and engine.num_free_blocks == engine.num_blocks - 1  # aborted, freed
