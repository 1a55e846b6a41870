"""The per-layer exchange over gloo, in one process (worker ranks on threads): results equal local experts across
steps and micro-batches, and a worker that stops answering fails the layer within the timeout instead of hanging."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

from gptoss_serve.cluster.expert_parallel.exchange import MAX_MICRO_BATCHES, ExpertClient, Shard, make_link
from gptoss_serve.cluster.expert_parallel.worker_steps import serve_replica
from gptoss_serve.cluster.expert_parallel.step_watch import StepWatch, bounded, publish_step_deadlines
from gptoss_serve.model.checkpoint import CheckpointReader
from gptoss_serve.model.experts import ExpertsUnavailableError, LocalExperts
from gptoss_serve.model.packed_experts import expert_shard_class
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
            link, _ = make_link(backend="gloo", host="127.0.0.1", port=p, rank=rank, world_size=num_workers + 1,
                                is_master=False, prefix=prefix)
            serve(link, rank)
        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
    link, store = make_link(backend="gloo", host="127.0.0.1", port=p, rank=0, world_size=num_workers + 1,
                            is_master=True, prefix=prefix)
    return link, store, threads


def routed(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.randn(tokens, 64, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(tokens)])
    return hidden, ids, torch.softmax(torch.randn(tokens, 4, generator=gen), dim=-1)


def test_two_workers_give_the_local_result(tiny_bf16):
    """Two steps: one batch, then two micro-batches dispatched ping-pong (both before either is combined)."""
    full = shard(tiny_bf16, 4, 0, 8)
    shards = [shard(tiny_bf16, 4, 0, 4), shard(tiny_bf16, 4, 4, 4)]
    link, store, threads = connect(2, lambda link, rank: serve_replica(
        link, shards[rank - 1], hidden_size=64, top_k=4, device=torch.device("cpu")))
    client = ExpertClient(link, [Shard(0, 4), Shard(4, 4)], device=torch.device("cpu"))
    client.handshake()
    gen = torch.Generator().manual_seed(0)
    client.begin_step([33])
    for layer in range(4):
        hidden, ids, weights = routed(33, gen)
        got = client.combine(client.dispatch(layer, hidden, ids, weights))
        torch.testing.assert_close(got, full[layer](hidden, ids, weights), rtol=1e-5, atol=1e-6)
    client.begin_step([5, 9])
    for layer in range(4):
        batches = [routed(5, gen), routed(9, gen)]
        pending = [client.dispatch(layer, *batch) for batch in batches]
        for p, batch in zip(pending, batches):
            torch.testing.assert_close(client.combine(p), full[layer](*batch), rtol=1e-5, atol=1e-6)
    stats = client.drain()
    assert stats.tokens_per_worker == [4 * (33 + 14)] * 2  # every worker sees every token
    assert sum(stats.tokens_per_expert) == 4 * (33 + 14) * 4
    assert len(stats.dispatch_seconds) == len(stats.combine_seconds) == 12
    client.close()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()  # the stop header ended the workers' loops


def test_two_workers_answer_what_one_shard_would_rounded_once(tiny_mxfp4):
    """bf16 activations, MXFP4 experts split over two workers: each answers its share unrounded, so the sum is the
    whole layer's output rounded once, as colocated experts give it. Shares rounded to bf16 first, as before, differ
    from it in a good part of the elements (which flips greedy tokens of a random model)."""
    with CheckpointReader(tiny_mxfp4) as reader:
        cls = expert_shard_class(reader.config, dequantize=False)
        full = cls.from_checkpoint(reader, 0, dtype=torch.bfloat16)
        shards = [cls.from_checkpoint(reader, 0, first=f, count=4, dtype=torch.bfloat16) for f in (0, 4)]
    link, store, threads = connect(2, lambda link, rank: serve_replica(
        link, [shards[rank - 1]], hidden_size=64, top_k=4, device=torch.device("cpu")))
    client = ExpertClient(link, [Shard(0, 4), Shard(4, 4)], device=torch.device("cpu"))
    client.handshake()
    hidden, ids, weights = routed(256, torch.Generator().manual_seed(3))
    hidden = hidden.bfloat16()
    client.begin_step([256])
    got = client.combine(client.dispatch(0, hidden, ids, weights))
    expected = full(hidden, ids, weights)
    assert got.dtype == torch.bfloat16
    assert (got != expected).float().mean() < 0.01  # float32 sums in another order: a rare last-bit difference
    rounded_twice = sum(s(hidden, ids, weights).float() for s in shards).bfloat16()
    assert (rounded_twice != expected).float().mean() > 0.05
    client.close()


def test_a_step_header_names_its_micro_batches():
    client = ExpertClient(None, [Shard(0, 8)], device=torch.device("cpu"))
    with pytest.raises(ValueError, match=f"1 to {MAX_MICRO_BATCHES} micro-batches"):
        client.begin_step([1] * (MAX_MICRO_BATCHES + 1))


def test_a_silent_worker_fails_the_layer_within_the_timeout():
    def silent(link, rank):
        hello = torch.zeros(1, dtype=torch.int64)
        link.dispatch.recv([hello], 0, 0).wait()
        link.combine.send([hello], 0, 0).wait()
        time.sleep(30)  # connected, never answers a layer

    link, store, _ = connect(1, silent)
    client = ExpertClient(link, [Shard(0, 8)], device=torch.device("cpu"), timeout_s=1.0)
    client.handshake()
    client.begin_step([3])
    pending = client.dispatch(0, torch.randn(3, 64), torch.tensor([[0, 1, 2, 3]] * 3), torch.full((3, 4), 0.25))
    start = time.monotonic()
    with pytest.raises(ExpertsUnavailableError, match="did not answer"):
        client.combine(pending)
    assert time.monotonic() - start < 5


class _Event:
    """Stands in for a CUDA event: fires when told to."""

    def __init__(self, fired: bool = False) -> None:
        self.fired = fired

    def query(self) -> bool:
        return self.fired


class _Link:
    def __init__(self) -> None:
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborted.set()


def test_the_step_watch_aborts_a_link_whose_step_does_not_complete():
    """Over NCCL the host may block behind a hung receive anywhere; the watch thread aborts the link on its own."""
    link = _Link()
    watch = StepWatch(link, timeout_s=0.3, period_s=0.01)
    watch.watch(_Event(fired=True))
    stuck = _Event()
    start = time.monotonic()
    watch.watch(stuck)
    assert link.aborted.wait(5), "the watch never aborted the link"
    assert 0.25 <= time.monotonic() - start < 2
    assert "did not answer" in watch.failure


def test_the_step_watch_leaves_a_link_whose_steps_complete():
    link = _Link()
    watch = StepWatch(link, timeout_s=0.2, period_s=0.01)
    for _ in range(20):
        event = _Event()
        watch.watch(event)
        time.sleep(0.02)
        event.fired = True
    time.sleep(0.4)
    assert not link.aborted.is_set() and watch.failure is None
    watch.close()


def test_setting_up_a_link_publishes_a_deadline_for_the_parent():
    """NCCL sets up a communicator inside the first send and waits for the peer with no timeout: the link's set-up
    publishes a deadline (the engine core's parent kills a core stuck past it) and clears it when done."""
    board = multiprocessing.Value("d", 0.0, lock=False)
    publish_step_deadlines(board)
    try:
        with bounded(30):
            assert time.monotonic() + 29 < board.value <= time.monotonic() + 30
        assert board.value == 0.0
        with pytest.raises(RuntimeError), bounded(30):
            raise RuntimeError("the set-up failed")
        assert board.value == 0.0
    finally:
        publish_step_deadlines(None)
