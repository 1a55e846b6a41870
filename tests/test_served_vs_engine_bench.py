"""bench.served_vs_engine's offline half at a toy size on the CPU: the burst's figures, every request run to its
output length, and the kernel compiles it counts (none without Triton). The served half needs a Ray cluster of its
own and is run by hand (BENCHMARKS.md)."""

from __future__ import annotations

import torch

from gptoss_serve.bench import served_vs_engine
from gptoss_serve.cluster.engine_config import EngineConfig


def test_the_offline_burst_runs_every_request_to_its_length_and_counts_compiles(tiny_bf16):
    requests = served_vs_engine.workload(6, (8, 40), (2, 9), seed=3)
    assert len({len(p) for p, _ in requests}) > 1 and len({n for _, n in requests}) > 1  # lengths vary
    figures = served_vs_engine.engine_alone(str(tiny_bf16), "cpu", torch.float32,
                                            EngineConfig(max_num_seqs=4, max_model_len=256), requests)
    assert figures["tokens"] == sum(n for _, n in requests)  # ignore_eos: each to its own length
    assert figures["seconds"] > 0 and figures["tok_s"] == figures["tokens"] / figures["seconds"]
    assert figures["kernel_compiles"] == 0  # no Triton on the CPU
    assert figures["ttft_ms"] > 0 and figures["tpot_ms"] > 0
    steps = figures["steps"]  # every step of the burst timed, tokens counted (prefill and decode)
    assert steps["count"] >= max(n for _, n in requests) and steps["mean_tokens"] > 0
    assert 0 < steps["p50_ms"] <= steps["max_ms"] and steps["mean_ms"] * steps["count"] <= figures["seconds"] * 1e3
