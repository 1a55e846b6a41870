"""The replica's side of expert parallelism: per-layer Experts that live on MoE workers, and the link to them.

`ExpertLink` forms the replica's process group with the workers (through one Ray call per worker, at start and
after a failure, never per step) and rebuilds it when a worker was restarted. `RemoteExperts` is what each MoE
layer of the model is handed instead of local experts.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable

import ray
import torch

from gptoss_serve.cluster.expert_parallel.exchange import ExpertClient, PendingExchange, Shard, make_link
from gptoss_serve.cluster.expert_parallel.step_watch import bounded
from gptoss_serve.model.experts import ExpertsUnavailableError

CONNECT_TIMEOUT_S = 30.0


def _host_ip() -> str:
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests)
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ExpertLink:
    def __init__(self, workers: list, *, backend: str, device: torch.device, timeout_s: float = 10.0,
                 name: str | None = None, find_workers: Callable[[], list] | None = None) -> None:
        """workers: Ray actor handles of the MoE workers, in rank order. name: the replica's, as the workers know
        it (a reconnect under the same name ends the old link on their side); a fresh one if not given.
        find_workers: the workers' handles anew (by name), for when those held are dead for good: workers that Ray
        restarts keep their handles, but workers that died with their ExpertPool (a lost node held both) are
        replaced by the new pool's."""
        self.workers, self.backend, self.device, self.timeout_s = workers, backend, device, timeout_s
        self.find_workers = find_workers
        self.shards = [Shard(*shard) for shard in ray.get([w.shard.remote() for w in workers])]
        self.client: ExpertClient | None = None
        self.reconnects = 0
        self.failures = 0  # links reset after a failure, since the stats were last drained
        self.name = name or f"replica-{uuid.uuid4().hex[:12]}"  # the workers end its old link when it reconnects

    def get(self) -> ExpertClient:
        if self.client is None:
            self.connect()
        return self.client

    def connect(self) -> None:
        # the parent kills this process if the link is not up by then (a handshake can hang inside NCCL's set-up)
        with bounded(5 + CONNECT_TIMEOUT_S + 2 * self.timeout_s):
            self._connect()

    def _connect(self) -> None:
        try:
            ray.get([w.ping.remote() for w in self.workers], timeout=5)
        except Exception as e:  # noqa: BLE001 - dead, restarting or hung: fail fast, retry next step
            if isinstance(e, ray.exceptions.ActorDiedError) and self.find_workers is not None:
                try:
                    self.workers = self.find_workers()  # the next step pings the replacements
                except Exception:  # noqa: BLE001 - not there yet: the next step asks again
                    pass
            raise ExpertsUnavailableError(f"MoE workers are not ready ({type(e).__name__})") from None
        host, port, prefix = _host_ip(), _free_port(), f"link-{uuid.uuid4().hex[:12]}"
        world = len(self.workers) + 1
        joins = [w.join.remote(host=host, port=port, rank=i + 1, world_size=world, prefix=prefix,
                               backend=self.backend, replica=self.name) for i, w in enumerate(self.workers)]
        link, self._store = make_link(backend=self.backend, host=host, port=port, rank=0, world_size=world,
                                      is_master=True, prefix=prefix)
        try:
            ray.get(joins, timeout=CONNECT_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            link.abort()
            raise ExpertsUnavailableError(f"MoE workers did not join ({type(e).__name__}: {e})") from None
        staging = self.device if self.backend == "nccl" else torch.device("cpu")
        client = ExpertClient(link, self.shards, device=self.device, timeout_s=self.timeout_s, staging=staging)
        try:
            client.handshake()
        except ExpertsUnavailableError:
            link.abort()
            raise
        self.client = client
        self.reconnects += 1

    def drain_stats(self):
        """The exchange's stats since the last call (None while disconnected: failures wait for the next call)."""
        if self.client is None:
            return None
        stats = self.client.drain()
        stats.link_failures, self.failures = self.failures, 0
        return stats

    def begin_step(self, token_counts: list[int]) -> None:
        """The next step's micro-batch sizes, to every worker (connecting first if needed)."""
        try:
            self.get().begin_step(token_counts)
        except ExpertsUnavailableError:
            self.reset()
            raise

    def reset(self) -> None:
        """After a failure: the communicators are aborted, not waited on, and the next step reconnects (the
        workers may have been restarted meanwhile)."""
        if self.client is not None:
            self.client.abort()
            self.failures += 1
        self.client = None

    def watch_step(self) -> None:
        """Marks the end of the step just queued: a link that does not reach it within the timeout is aborted."""
        if self.client is not None:
            self.client.watch_step()


def _as_expert_failure(error: Exception) -> ExpertsUnavailableError:
    if isinstance(error, ExpertsUnavailableError):
        return error
    return ExpertsUnavailableError(f"the expert exchange failed ({type(error).__name__}: {error})")


class RemoteExperts:
    """One MoE layer's experts, on the workers."""

    def __init__(self, layer: int, link: ExpertLink) -> None:
        self.layer, self.link = layer, link

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> PendingExchange:
        try:
            return self.link.get().dispatch(self.layer, hidden, expert_ids, weights)
        except Exception as e:  # noqa: BLE001 - whatever broke in the exchange, it is the experts' failure
            self.link.reset()
            raise _as_expert_failure(e) from None

    def combine(self, pending: PendingExchange) -> torch.Tensor:
        try:
            return pending.client.combine(pending)
        except Exception as e:  # noqa: BLE001
            self.link.reset()
            raise _as_expert_failure(e) from None

    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.combine(self.dispatch(hidden, expert_ids, weights))
