"""Decode steps replayed from CUDA graphs, one captured per batch-size bucket at start-up.

A decode step launches a few hundred kernels; launched one by one from Python the host, not the GPU, sets the
pace. A CUDA graph launches them all at once. Each graph reads its inputs from persistent buffers (token ids,
positions, context lengths, cache slots, block tables) that a step fills by device copies before replaying, and
writes its logits to a buffer of its own. A batch runs in the smallest bucket that holds it, padded (see
step_inputs.py). Prefill and mixed steps run eagerly, or from piecewise graphs (mixed_graphs.py) when asked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptoss_serve.cluster.step_inputs import StepInputs

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# a step's inputs ([b] sequences) -> float32 logits [b, vocab]
Forward = Callable[[StepInputs], torch.Tensor]


def buckets_for(max_num_seqs: int) -> list[int]:
    return sorted({b for b in BUCKETS if b < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, forward: Forward, *, groups: list[str], max_num_seqs: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        self.buckets = buckets_for(max_num_seqs)
        largest = self.buckets[-1]

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int32, device=device)

        self.token_ids, self.positions, self.context_lens = zeros(largest), zeros(largest), zeros(largest) + 1
        self.query_start = torch.arange(largest + 1, dtype=torch.int32, device=device)  # one token a sequence
        # every row samples; kept here like every input: a graph reads its inputs' memory, whoever owns it
        self.sample_rows = torch.arange(largest, device=device)
        self.slot_mapping = {g: zeros(largest) for g in groups}
        self.block_tables = {g: zeros(largest, max_blocks_per_seq) for g in groups}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):  # the largest first: later ones fit in the memory it leaves
            inputs = self._inputs(bucket)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # compile and allocate outside the capture
                forward(inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread-local: other threads (the expert link's watch, NCCL's) go on querying events meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[bucket] = forward(inputs)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(device)

    def _inputs(self, bucket: int) -> StepInputs:
        """The persistent buffers' first `bucket` sequences, as the forward pass reads a step's inputs."""
        return StepInputs(
            token_ids=self.token_ids[:bucket], positions=self.positions[:bucket],
            query_start=self.query_start[:bucket + 1], context_lens=self.context_lens[:bucket],
            slot_mapping={g: s[:bucket] for g, s in self.slot_mapping.items()},
            block_tables={g: t[:bucket] for g, t in self.block_tables.items()},
            sample_rows=self.sample_rows[:bucket], num_seqs=bucket, num_tokens=bucket,
            max_query_len=1)

    def bucket(self, num_seqs: int) -> int | None:
        """The graph a decode step of num_seqs sequences replays, or None when it is larger than every bucket."""
        return next((b for b in self.buckets if b >= num_seqs), None)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Replays the graph of the bucket `inputs` were padded to -> float32 logits [num_seqs, vocab]."""
        bucket = inputs.token_ids.shape[0]
        width = next(iter(inputs.block_tables.values())).shape[1]
        self.token_ids[:bucket].copy_(inputs.token_ids)
        self.positions[:bucket].copy_(inputs.positions)
        self.context_lens[:bucket].copy_(inputs.context_lens)
        for group, slots in inputs.slot_mapping.items():
            self.slot_mapping[group][:bucket].copy_(slots)
            self.block_tables[group][:bucket, :width].copy_(inputs.block_tables[group])
        self.graphs[bucket].replay()
        return self.logits[bucket][:inputs.num_seqs]
