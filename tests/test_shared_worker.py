"""Two attention replicas share one MoE worker, whose process serves each link on a thread (and a CUDA stream) of
its own, as MoEWorker does: the second replica links up while the first is idle, and both get their answers after.
Over NCCL on two GPUs (`pytest -m gpu` on a machine with two or more) this hung inside NCCL's set-up of the second
communicator while the step header travelled on NCCL; over gloo on the CPU it checks the same protocol."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading

import pytest
import torch

from gptoss_serve.cluster.expert_parallel.exchange import NCCL_ENV, ExpertClient, Shard, make_link
from gptoss_serve.cluster.expert_parallel.worker_steps import serve_replica
from tests.net import free_port

HIDDEN, TOP_K, LAYERS = 256, 4, 3
LINK_UP_S = 60


class Double(torch.nn.Module):
    """Stands in for the worker's experts: twice its input, so each answer is known exactly."""

    dtype = torch.bfloat16

    def forward(self, hidden, expert_ids, weights):
        return hidden * 2

    def never_waits_for_host(self, dtype):  # so the worker captures its repeated steps in CUDA graphs
        return True


def serve_two_links(ports: list[int], backend: str) -> None:
    """The worker's process: one link per replica, each served on a thread (and a stream on GPU 1) of its own, as
    MoEWorker serves them."""
    os.environ.update(NCCL_ENV)
    device = torch.device("cuda:1" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def serve(port: int) -> None:
        link, _ = make_link(backend=backend, host="127.0.0.1", port=port, rank=1, world_size=2, is_master=False,
                            prefix="t")
        serve_replica(link, [Double()] * LAYERS, hidden_size=HIDDEN, top_k=TOP_K, device=device)

    threads = [threading.Thread(target=serve, args=(port,)) for port in ports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def link_up(port: int, backend: str, device: torch.device) -> tuple[ExpertClient, object]:
    """-> the replica's client, handshake done, and the link's rendezvous store (alive as long as the link)."""
    link, store = make_link(backend=backend, host="127.0.0.1", port=port, rank=0, world_size=2, is_master=True,
                            prefix="t")
    staging = device if backend == "nccl" else torch.device("cpu")
    client = ExpertClient(link, [Shard(0, 8)], device=device, staging=staging, timeout_s=LINK_UP_S)
    client.handshake()
    return client, store


def one_step(client: ExpertClient, tokens: int) -> None:
    device = client.device
    hidden = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (tokens, TOP_K), device=device)
    weights = torch.full((tokens, TOP_K), 1 / TOP_K, device=device)
    client.begin_step([tokens])
    x = hidden
    for layer in range(LAYERS):
        x = client.combine(client.dispatch(layer, x, ids, weights))
    assert torch.equal(x.cpu(), (hidden * 2**LAYERS).cpu())


def in_time(fn, what: str) -> None:
    """fn on a thread, failing the test if it has not returned within LINK_UP_S (a hang inside NCCL never returns)."""
    side_by_side([fn], what)


def side_by_side(fns: list, what: str) -> None:
    """Each fn on a thread of its own, all at once, failing the test unless all return within LINK_UP_S."""
    errors: list[BaseException] = []

    def run(fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,), daemon=True) for fn in fns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LINK_UP_S)
        assert not thread.is_alive(), f"{what} did not finish within {LINK_UP_S} s"
    if errors:
        raise errors[0]


def steps_on_a_stream(client: ExpertClient, sizes) -> None:
    """One step of each token count in turn, on a CUDA stream of this thread's own (a replica's engine core)."""
    on_gpu = client.device.type == "cuda"
    with torch.cuda.stream(torch.cuda.Stream(client.device)) if on_gpu else contextlib.nullcontext():
        for tokens in sizes:
            one_step(client, tokens)


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_two_replicas_share_a_worker(backend):
    device = torch.device("cuda:0" if backend == "nccl" else "cpu")
    if backend == "nccl":
        if torch.cuda.device_count() < 2:
            pytest.skip("needs two GPUs")
        os.environ.update(NCCL_ENV)
        torch.cuda.set_device(device)
    ports = [free_port()]
    while len(ports) < 2:
        ports += [p for p in [free_port()] if p not in ports]
    worker = multiprocessing.get_context("spawn").Process(target=serve_two_links, args=(ports, backend), daemon=True)
    worker.start()
    linked: list[tuple[ExpertClient, object]] = []  # each replica's client and its link's store
    try:
        in_time(lambda: linked.append(link_up(ports[0], backend, device)), "the first replica's link")
        in_time(lambda: one_step(linked[0][0], 16), "the first replica's step")
        # the first replica is idle now; the second links up beside it
        in_time(lambda: linked.append(link_up(ports[1], backend, device)),
                "the second replica's link, beside an idle one")
        for tokens in (1, 128, 1, 128, 1, 128):  # over NCCL each shape's second step is captured, later ones replay
            in_time(lambda: [one_step(client, tokens) for client, _ in linked], "both replicas' steps")
        # both replicas at once, on new shapes: one link's captures come while the other launches and replays
        side_by_side([lambda c=client: steps_on_a_stream(c, (2, 3, 4, 5) * 4) for client, _ in linked],
                     "both replicas' steps at once")
        for client, _ in linked:
            client.close()
        worker.join(LINK_UP_S)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
