"""A MoE worker's steps replayed from CUDA graphs (`pytest -m gpu`, two GPUs): a step shape's first coming runs
eagerly, its second is captured, later ones replay, and every step's answers are the worker's experts' output for
that step's tokens (a graph that read stale buffers, or answered before its receive, would give another step's).
Steps over MAX_GRAPH_TOKENS stay eager. Over gloo the same loop runs eagerly (tests/test_expert_exchange.py)."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from gptoss_serve.cluster.expert_parallel.exchange import NCCL_ENV, ExpertClient, Shard, make_link
from gptoss_serve.cluster.expert_parallel.worker_steps import MAX_GRAPH_TOKENS, serve_replica
from gptoss_serve.model.checkpoint import CheckpointReader
from gptoss_serve.model.packed_experts import Mxfp4Experts
from tests.net import free_port
from tests.test_shared_worker import LINK_UP_S, in_time

pytestmark = pytest.mark.gpu

# (micro-batch token counts) in the order sent: one and two micro-batches, each shape three times or more
STEPS = [(5,), (5,), (3, 4), (5,), (3, 4), (3, 4), (5,), (MAX_GRAPH_TOKENS + 1,), (MAX_GRAPH_TOKENS + 1,)]


def load_experts(path: str, device: str) -> list[Mxfp4Experts]:
    with CheckpointReader(path, device=device) as reader:
        layers = reader.config.num_hidden_layers
        return [Mxfp4Experts.from_checkpoint(reader, layer, dtype=torch.bfloat16) for layer in range(layers)]


def serve_one_link(path: str, port: int, captured) -> None:
    """The worker's process on GPU 1: serves one link, then says which step shapes it captured."""
    os.environ.update(NCCL_ENV)
    torch.cuda.set_device(1)
    experts = load_experts(path, "cuda:1")
    link, _ = make_link(backend="nccl", host="127.0.0.1", port=port, rank=1, world_size=2, is_master=False,
                        prefix="g")
    captured.put(serve_replica(link, experts, hidden_size=64, top_k=4, device=torch.device("cuda:1")))


def test_repeated_step_shapes_replay_from_graphs_with_each_steps_answers(tiny_mxfp4):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    os.environ.update(NCCL_ENV)
    torch.cuda.set_device(0)
    local = load_experts(str(tiny_mxfp4), "cuda:0")
    ctx = multiprocessing.get_context("spawn")
    port, captured = free_port(), ctx.Queue()
    worker = ctx.Process(target=serve_one_link, args=(str(tiny_mxfp4), port, captured), daemon=True)
    worker.start()
    try:
        link, _store = make_link(backend="nccl", host="127.0.0.1", port=port, rank=0, world_size=2, is_master=True,
                                 prefix="g")
        client = ExpertClient(link, [Shard(0, 8)], device=torch.device("cuda:0"), timeout_s=LINK_UP_S)
        in_time(client.handshake, "the handshake")
        gen = torch.Generator("cuda:0").manual_seed(0)

        def step(sizes: tuple[int, ...]) -> None:
            client.begin_step(list(sizes))
            for layer, experts in enumerate(local):
                batches = [(torch.randn(n, 64, device="cuda:0", generator=gen).bfloat16(),
                            torch.rand(n, 8, device="cuda:0", generator=gen).topk(4, dim=-1).indices,
                            torch.softmax(torch.randn(n, 4, device="cuda:0", generator=gen), dim=-1)) for n in sizes]
                pending = [client.dispatch(layer, *batch) for batch in batches]  # ping-pong: both out first
                for p, batch in zip(pending, batches):
                    torch.testing.assert_close(client.combine(p), experts(*batch))

        for sizes in STEPS:
            in_time(lambda: step(sizes), f"a step of {sizes}")
        client.close()
        assert captured.get(timeout=LINK_UP_S) == [(3, 4), (5,)]
        worker.join(LINK_UP_S)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
