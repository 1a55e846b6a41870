"""An idle attention replica keeps its load gauges set: its engine sends no steps, but Serve asks for its routing
stats every second, and each answer sets running, waiting and KV usage again (a gauge nobody sets drops out of the
metrics, and an alert on running == 0 would find no series). In-process, no Ray, over a real engine core."""

from __future__ import annotations

import functools
import time

import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.attention_replica import AttentionReplica
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer


def build(path: str):
    config = EngineConfig(max_num_seqs=2, num_kv_blocks=32, max_model_len=128)
    return LLMEngine(load_model(path, dtype=torch.float32), load_tokenizer(), config), None


class Recorded:
    """Stands in for a ray.util.metrics.Gauge: every set, in order."""

    def __init__(self) -> None:
        self.values: list[tuple[float, dict]] = []

    def set(self, value, tags=None) -> None:
        self.values.append((value, dict(tags or {})))


def test_gauges_keep_being_set_while_the_engine_is_idle(tiny_bf16):
    replica = AttentionReplica(AppArgs(), build=functools.partial(build, str(tiny_bf16)))
    try:
        for name in ("running", "waiting", "kv_usage"):
            setattr(replica.metrics, name, Recorded())
        steps_before = replica.stats.time
        for _ in range(3):  # what Serve's controller does, about once a second, with or without traffic
            stats = replica.record_routing_stats()
            assert stats  # the router's load report is unchanged
            time.sleep(0.05)
        assert replica.stats.time == steps_before  # no engine step came meanwhile
        for name in ("running", "waiting"):
            values = getattr(replica.metrics, name).values
            assert [v for v, _ in values] == [0, 0, 0], (name, values)
            assert all(tags == replica.metrics.tags for _, tags in values)
        assert len(replica.metrics.kv_usage.values) == 3
    finally:
        replica.core.shutdown()
