"""Kernel variants first needed after start-up: Triton's hook counted in the process (kernels/compile_watch.py), the
engine's count since its start-up, and the replica's `gptoss_kernel_compiles` counter fed from the engine's total."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gptoss_serve.cluster.engine_protocol import EngineStats
from gptoss_serve.deployments.attention_replica import AttentionReplica


def test_the_watch_counts_each_compile_and_chains_to_the_hook_before_it():
    pytest.importorskip("triton")
    from triton import knobs

    from gptoss_serve.kernels.compile_watch import CompileWatch, compile_watch

    seen = []
    watch = CompileWatch()
    watch._previous = lambda **kw: seen.append(kw["fn"].name)
    for name in ("_attention", "_down"):
        watch._on_compile(key=None, repr="", fn=SimpleNamespace(name=name), compile={}, is_manual_warmup=False,
                          already_compiled=False)
    assert (watch.count, watch.last_kernel, seen) == (2, "_down", ["_attention", "_down"])

    process_watch = compile_watch()
    assert compile_watch() is process_watch and knobs.runtime.jit_post_compile_hook == process_watch._on_compile
    before = process_watch.count
    knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(name="_rotary_qk"))  # as Triton calls it
    assert process_watch.count == before + 1 and process_watch.last_kernel == "_rotary_qk"


class Counted:
    def __init__(self) -> None:
        self.total = 0

    def inc(self, value, tags=None) -> None:
        assert value > 0  # Ray's counters refuse an increment of 0
        self.total += value


def test_the_replica_counts_what_the_engine_added_and_a_new_core_from_zero():
    metrics = SimpleNamespace(prefix_queries=Counted(), prefix_hits=Counted(), preemptions=Counted(),
                              kernel_compiles=Counted(), tags={})
    replica = SimpleNamespace(metrics=metrics, _totals_seen=(0, 0, 0, 0))
    for compiles in (0, 2, 2, 5):
        AttentionReplica._add_engine_totals(replica, EngineStats(kernel_compiles=compiles))
    assert metrics.kernel_compiles.total == 5
    AttentionReplica._add_engine_totals(replica, EngineStats(kernel_compiles=1))  # a new core counts from 0 again
    assert metrics.kernel_compiles.total == 6


def test_an_engine_off_gpus_reports_none(tiny_bf16):
    from gptoss_serve.cluster.engine import LLMEngine
    from gptoss_serve.cluster.engine_config import EngineConfig
    from gptoss_serve.model.loader import load_model
    from gptoss_serve.model.tokenizer import load_tokenizer

    engine = LLMEngine(load_model(tiny_bf16), load_tokenizer(), EngineConfig(num_kv_blocks=64, max_model_len=256))
    assert engine.kernel_compiles == 0
