"""MoEWorker: holds experts [first, first + count) of every layer and serves attention replicas' layers.

A plain class; the ExpertPool deployment runs N of them as Ray actors in a placement group. Its shard is read
straight from the checkpoint (rows of the expert tensors), never the whole model. Each attention replica that
joins gets its own process group and its own serving thread.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading

import torch

from gptoss_serve.cluster.expert_parallel.exchange import Link, make_link
from gptoss_serve.cluster.expert_parallel.worker_steps import serve_replica
from gptoss_serve.model.hub import resolve_checkpoint
from gptoss_serve.model.loader import LoadFormat, check_bf16_expert_copy, keep_bf16_copies, open_checkpoint
from gptoss_serve.model.packed_experts import expert_shard_class


def shard_of(num_experts: int, num_workers: int, index: int) -> tuple[int, int]:
    """(first, count) of worker `index`; the split must be even (checked when the app is built)."""
    per = num_experts // num_workers
    return index * per, per


class MoEWorker:
    def __init__(self, checkpoint: str, *, index: int, num_workers: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, dequantize_experts: bool = False,
                 bf16_expert_copy: bool = False, load_format: LoadFormat = "auto",
                 max_num_batched_tokens: int = 2048, enforce_eager: bool = False) -> None:
        """checkpoint: a directory or a hub id, resolved on this worker's own node. MXFP4 experts stay packed
        (the same kernels as colocated experts) unless dequantize_experts; bf16_expert_copy: a bf16 copy beside
        them for many-token steps (model/loader.load_model's option). max_num_batched_tokens: the most tokens
        a replica's step sends (the kernels are compiled up to it before the worker says it is ready).
        enforce_eager: no CUDA graphs (every step's kernels launched one by one), as the engine's option."""
        self.index, self.device, self.enforce_eager = index, torch.device(device), enforce_eager
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack, to the log
        with open_checkpoint(resolve_checkpoint(checkpoint), device=self.device, load_format=load_format) as reader:
            self.config = reader.config
            check_bf16_expert_copy(bf16_expert_copy, self.config, dequantize_experts=dequantize_experts)
            self.first, self.count = shard_of(self.config.num_local_experts, num_workers, index)
            shard_class = expert_shard_class(self.config, dequantize=dequantize_experts)
            self.experts = [shard_class.from_checkpoint(reader, layer, first=self.first, count=self.count, dtype=dtype)
                            for layer in range(self.config.num_hidden_layers)]
        if bf16_expert_copy:
            keep_bf16_copies(self.experts)
        self.experts[0].warm_up(max_num_batched_tokens, self.config.num_experts_per_tok)
        self.links: dict[str, threading.Thread] = {}
        self.link_of_replica: dict[str, Link] = {}  # each replica's current link (a reconnect ends the old one)

    def shard(self) -> tuple[int, int]:
        return self.first, self.count

    def ping(self) -> dict:
        """Alive and answering; its process id too (fault tests stop and kill it)."""
        return {"index": self.index, "pid": os.getpid(), "links": sum(t.is_alive() for t in self.links.values())}

    def join(self, *, host: str, port: int, rank: int, world_size: int, prefix: str, backend: str,
             replica: str = "") -> bool:
        """Joins one replica's link (blocks until every member has joined), then serves it on a thread and, on a
        GPU, a CUDA stream of its own (see worker_steps.serve_replica): a link whose replica hung or died blocks only
        its own stream. A replica that reconnects ends its previous link here first (its communicators are aborted,
        not waited on)."""
        link, _store = make_link(backend=backend, host=host, port=port, rank=rank, world_size=world_size,
                                 is_master=False, prefix=prefix)
        previous = self.link_of_replica.pop(replica, None)
        if previous is not None:
            previous.abort()
        self.link_of_replica[replica] = link
        staging = self.device if backend == "nccl" else torch.device("cpu")

        def serve() -> None:
            try:
                serve_replica(link, self.experts, hidden_size=self.config.hidden_size,
                              top_k=self.config.num_experts_per_tok, device=self.device, staging=staging,
                              graphs=not self.enforce_eager)
            except Exception:  # noqa: BLE001 - the replica went away, reconnected or aborted the link: it is over
                pass
            finally:
                if self.link_of_replica.get(replica) is link:
                    del self.link_of_replica[replica]
                link.abort()

        thread = threading.Thread(target=serve, name=f"moe-link-{prefix}", daemon=True)
        thread.start()
        self.links = {p: t for p, t in self.links.items() if t.is_alive()}
        self.links[prefix] = thread
        return True
