"""The only part of the engine that touches tensors: turns a scheduled batch into one forward pass.

A step's tokens are laid end to end ([N], no padding): each sequence contributes its next chunk of prompt or its
one new token. Attention goes through the paged KV cache; logits are computed only for the sequences that will
sample (their chunk reaches the end of their tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.block_manager import FULL, SLIDING
from cluster.kv_cache import KVCache
from cluster.sequence import Sequence
from kernels.paged_attention import paged_attention_reference
from model.attention import Attention
from model.transformer import GptOssForCausalLM


@dataclass
class StepBatch:
    """Per-step metadata shared by all layers."""

    query_lens: list[int]
    context_lens: list[int]
    block_tables: dict[str, torch.Tensor]  # group -> [B, max blocks]
    slot_mapping: dict[str, torch.Tensor]  # group -> [N] flat cache slot of each new token


class PagedAttention:
    """AttentionBackend over the KV cache: stores the step's keys and values, then attends."""

    def __init__(self, cache: KVCache, batch: StepBatch) -> None:
        self.cache, self.batch = cache, batch

    def __call__(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = SLIDING if layer.window else FULL
        key_cache, value_cache = self.cache.layer(layer.layer)
        slots = self.batch.slot_mapping[group]
        key_cache.view(-1, *k.shape[1:])[slots] = k.to(key_cache.dtype)
        value_cache.view(-1, *v.shape[1:])[slots] = v.to(value_cache.dtype)
        return paged_attention_reference(
            q, key_cache, value_cache, block_tables=self.batch.block_tables[group],
            query_lens=self.batch.query_lens, context_lens=self.batch.context_lens,
            sinks=layer.sinks, window=layer.window, scale=layer.scale)


class ModelRunner:
    def __init__(self, model: GptOssForCausalLM, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.device = model.device

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """(sequence, number of new tokens) pairs -> float32 logits [S, vocab] for the S sequences that sample,
        in the order given."""
        block_size = self.cache.block_size
        ids, positions, query_lens, context_lens, last_rows = [], [], [], [], []
        slots: dict[str, list[int]] = {g: [] for g in scheduled[0][0].block_tables}
        for seq, n in scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            query_lens.append(n)
            context_lens.append(end)
            if end == len(seq):
                last_rows.append(len(ids) - 1)
            for group, table in seq.block_tables.items():
                slots[group] += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        width = max(len(seq.block_tables[g]) for seq, _ in scheduled for g in seq.block_tables)
        tables = {g: torch.tensor([seq.block_tables[g] + [0] * (width - len(seq.block_tables[g]))
                                   for seq, _ in scheduled], device=self.device) for g in slots}
        batch = StepBatch(query_lens, context_lens, tables,
                          {g: torch.tensor(s, device=self.device) for g, s in slots.items()})
        hidden = self.model.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                                  PagedAttention(self.cache, batch))  # [N, H]
        return self.model.compute_logits(hidden[torch.tensor(last_rows, dtype=torch.long, device=self.device)])
