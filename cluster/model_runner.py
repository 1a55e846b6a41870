"""The only part of the engine that touches tensors: turns a scheduled batch into one forward pass and its samples.

A step's tokens are laid end to end ([N], no padding): each sequence contributes its next chunk of prompt or its
one new token. Attention goes through the paged KV cache; logits are computed, and a token sampled, only for the
sequences whose chunk reaches the end of their tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from gptoss_serve.cluster.block_manager import FULL, SLIDING
from gptoss_serve.cluster.kv_cache import KVCache
from gptoss_serve.cluster.sampler import Sampler, SamplerOutput
from gptoss_serve.cluster.sequence import Sequence
from gptoss_serve.kernels.paged_attention import paged_decode_reference, paged_prefill_reference
from gptoss_serve.model.attention import Attention
from gptoss_serve.model.experts import ExpertShard
from gptoss_serve.model.transformer import GptOssForCausalLM


@dataclass
class StepBatch:
    """Per-step metadata shared by all layers, built once per step."""

    block_tables: dict[str, torch.Tensor]  # group -> [B, max blocks]
    slot_mapping: dict[str, torch.Tensor]  # group -> [N] flat cache slot of each new token
    decode_seqs: torch.Tensor  # [Bd] sequences with one new token
    decode_rows: torch.Tensor  # [Bd] their token's row in the step
    decode_context_lens: torch.Tensor  # [Bd]
    prefills: list[tuple[int, int, int, int]]  # (sequence, first row, rows, context length) of longer chunks


class PagedAttention:
    """AttentionBackend over the KV cache: stores the step's keys and values, then attends."""

    def __init__(self, cache: KVCache, batch: StepBatch) -> None:
        self.cache, self.batch = cache, batch

    def __call__(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = SLIDING if layer.window else FULL
        batch = self.batch
        key_cache, value_cache = self.cache.layer(layer.layer)
        slots = batch.slot_mapping[group]
        key_cache.view(-1, *k.shape[1:])[slots] = k.to(key_cache.dtype)
        value_cache.view(-1, *v.shape[1:])[slots] = v.to(value_cache.dtype)
        tables = batch.block_tables[group]
        out = torch.empty_like(q)  # [N, Hq, D]
        options = dict(sinks=layer.sinks, window=layer.window, scale=layer.scale)
        if batch.decode_rows.numel():
            out[batch.decode_rows] = paged_decode_reference(
                q[batch.decode_rows], key_cache, value_cache, block_tables=tables[batch.decode_seqs],
                context_lens=batch.decode_context_lens, **options)
        for seq, start, n, context_len in batch.prefills:
            out[start:start + n] = paged_prefill_reference(
                q[start:start + n], key_cache, value_cache, block_table=tables[seq], context_len=context_len, **options)
        return out


class ModelRunner:
    def __init__(self, model: GptOssForCausalLM, cache: KVCache, *, micro_batches: int = 1,
                 max_num_batched_tokens: int = 2048) -> None:
        """micro_batches > 1 splits a step into that many groups of sequences, run ping-pong (see
        Decoder.forward_interleaved): worth it when experts are remote, so their exchange hides behind attention.
        max_num_batched_tokens: the most tokens a step holds (kernels are compiled up to it at start-up)."""
        self.model, self.cache = model, cache
        self.device = model.device
        self.micro_batches = micro_batches
        self.sampler = Sampler()
        experts = model.model.layers[0].mlp.experts
        if isinstance(experts, ExpertShard):  # every layer's experts run the same kernels: compile them once
            experts.warm_up(max_num_batched_tokens, model.config.num_experts_per_tok)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> SamplerOutput:
        """(sequence, number of new tokens) pairs -> a token (and its logprobs, if asked) for each sequence whose
        chunk reaches its last token, in the order given."""
        sampling = [seq.sampling for seq, n in scheduled if seq.num_computed_tokens + n == len(seq)]
        logits = self._logits(scheduled)  # [S, vocab]
        if not sampling:  # every chunk ends inside a prompt
            return SamplerOutput(token_ids=[], logprobs=[])
        return self.sampler.sample(logits, sampling)

    def _logits(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """-> float32 logits [S, vocab] for the S sequences that sample, in the order given."""
        groups = self._split(scheduled)
        prepared = [self._prepare(group) for group in groups]
        if len(prepared) == 1:
            ids, positions, attend, rows = prepared[0]
            hidden = [self.model.model(ids, positions, attend)]  # [N, H]
        else:
            hidden = self.model.model.forward_interleaved([(ids, pos, attend) for ids, pos, attend, _ in prepared])
        return torch.cat([self.model.compute_logits(h[rows]) for h, (_, _, _, rows) in zip(hidden, prepared)])

    def _split(self, scheduled: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        """Contiguous groups with about the same number of tokens each (order kept: logits follow it)."""
        k = min(self.micro_batches, len(scheduled))
        if k <= 1:
            return [scheduled]
        total = sum(n for _, n in scheduled)
        groups, current, done = [], [], 0
        for seq, n in scheduled:
            current.append((seq, n))
            done += n
            if len(groups) < k - 1 and done >= total * (len(groups) + 1) / k:
                groups.append(current)
                current = []
        return groups + ([current] if current else [])

    def _prepare(self, scheduled: list[tuple[Sequence, int]]):
        """-> (token ids [N], positions [N], the attention backend, rows [S] of the sampling sequences)."""
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
        decode = [b for b, n in enumerate(query_lens) if n == 1]
        rows = [0, *itertools.accumulate(query_lens)]  # first row of each sequence
        batch = StepBatch(
            block_tables=tables,
            slot_mapping={g: torch.tensor(s, dtype=torch.long, device=self.device) for g, s in slots.items()},
            decode_seqs=torch.tensor(decode, dtype=torch.long, device=self.device),
            decode_rows=torch.tensor([rows[b] for b in decode], dtype=torch.long, device=self.device),
            decode_context_lens=torch.tensor([context_lens[b] for b in decode], dtype=torch.long, device=self.device),
            prefills=[(b, rows[b], n, context_lens[b]) for b, n in enumerate(query_lens) if n > 1])
        return (torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                PagedAttention(self.cache, batch), torch.tensor(last_rows, dtype=torch.long, device=self.device))
