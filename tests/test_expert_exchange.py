"""The per-layer exchange over gloo, in one process (worker ranks on threads): results equal local experts,
and a worker that stops answering fails the layer within the timeout instead of hanging."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gptoss_serve.cluster.expert_exchange import HEADER_SIZE, ExpertClient, Shard, make_group, serve_replica
from gptoss_serve.model.checkpoint import CheckpointReader
from gptoss_serve.model.experts import ExpertsUnavailableError, LocalExperts
from tests.net import free_port


def shard(path, layer_count, first, count):
    with CheckpointReader(path) as reader:
        return [LocalExperts.from_checkpoint(reader, layer, first=first, count=count, dtype=torch.float32)
                for layer in range(layer_count)]


def connect(num_workers: int, serve, timeout_s: float = 5.0):
    p, prefix = free_port(), f"t{time.monotonic_ns()}"
    threads = []
    for rank in range(1, num_workers + 1):
        def run(rank=rank):
            group, _ = make_group(backend="gloo", host="127.0.0.1", port=p, rank=rank, world_size=num_workers + 1,
                                  is_master=False, prefix=prefix)
            serve(group, rank)
        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
    group, store = make_group(backend="gloo", host="127.0.0.1", port=p, rank=0, world_size=num_workers + 1,
                              is_master=True, prefix=prefix)
    return group, store, threads


def test_two_workers_give_the_local_result(tiny_bf16):
    full = shard(tiny_bf16, 4, 0, 8)
    shards = [shard(tiny_bf16, 4, 0, 4), shard(tiny_bf16, 4, 4, 4)]
    group, store, threads = connect(2, lambda g, rank: serve_replica(
        g, shards[rank - 1], hidden_size=64, top_k=4, device=torch.device("cpu")))
    client = ExpertClient(group, [Shard(0, 4), Shard(4, 4)], device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for layer in range(4):
        hidden = torch.randn(33, 64, generator=gen)
        ids = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(33)])
        weights = torch.softmax(torch.randn(33, 4, generator=gen), dim=-1)
        got = client.combine(client.dispatch(layer, hidden, ids, weights))
        torch.testing.assert_close(got, full[layer](hidden, ids, weights), rtol=1e-5, atol=1e-6)
    stats = client.drain()
    assert sum(stats.tokens_per_worker) >= 33 * 4 and sum(stats.tokens_per_expert) == 33 * 4 * 4
    assert len(stats.dispatch_seconds) == len(stats.combine_seconds) == 4
    client.close()


def test_a_silent_worker_fails_the_layer_within_the_timeout():
    def silent(group, rank):
        header = torch.empty(HEADER_SIZE, dtype=torch.int64)
        group.recv([header], 0, 0).wait()
        time.sleep(30)  # received the layer, never answers

    group, store, _ = connect(1, silent)
    client = ExpertClient(group, [Shard(0, 8)], device=torch.device("cpu"), timeout_s=1.0)
    pending = client.dispatch(0, torch.randn(3, 64), torch.tensor([[0, 1, 2, 3]] * 3), torch.full((3, 4), 0.25))
    start = time.monotonic()
    with pytest.raises(ExpertsUnavailableError, match="did not answer"):
        client.combine(pending)
    assert time.monotonic() - start < 5
