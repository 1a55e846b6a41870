"""A step's inputs for the device: built on the host from the scheduled sequences, sent in one copy.

Everything a forward pass needs besides the weights and the cache is a handful of int32 arrays: token ids,
positions, where each sequence's rows start (query_start), its context length, the cache slot each new token's
keys and values go to, and each group's block tables. They are written into one pinned host buffer and go to the
device in one non-blocking copy; the tensors the model reads are views of the copy. No step reads anything back.

Under async scheduling a sequence's newest token may still be PENDING on the host (sampled by the step in flight):
its row is filled on the device from that step's samples, one gather after the copy, so nothing waits for it.

A decode step run by a CUDA graph is padded to its batch bucket: padding rows are token 0 at position 0, context
length 1, writing their keys and values into the null block (block 0, never read as real data).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from gptoss_serve.cluster.block_manager import NULL_BLOCK
from gptoss_serve.cluster.sequence import Sequence

ALIGN = 4  # int32 elements: 16 bytes


def token_at(seq: Sequence, index: int) -> int:
    """seq.token_ids[index] without building the whole list (decode steps ask for one token a sequence)."""
    prompt = seq.prompt_token_ids
    return prompt[index] if index < len(prompt) else seq.output_token_ids[index - len(prompt)]


@dataclass
class StepInputs:
    """One step's inputs as device tensors (views of one buffer), and what the host needs of them."""

    token_ids: torch.Tensor  # int32 [N]
    positions: torch.Tensor  # int32 [N]
    query_start: torch.Tensor  # int32 [B + 1]: sequence b owns rows query_start[b]:query_start[b + 1]
    context_lens: torch.Tensor  # int32 [B]: its tokens including this step's
    slot_mapping: dict[str, torch.Tensor]  # group -> int32 [N]: flat cache slot of each row's keys and values
    block_tables: dict[str, torch.Tensor]  # group -> int32 [B, width]
    sample_rows: torch.Tensor  # int64 [S]: rows whose logits are sampled (sequences whose chunk ends its tokens)
    num_seqs: int  # B without padding
    num_tokens: int  # N without padding
    max_query_len: int

    @classmethod
    def build(cls, scheduled: list[tuple[Sequence, int]], *, block_size: int, device: torch.device,
              pad_to: int | None = None, pending_tokens: torch.Tensor | None = None) -> StepInputs:
        """(sequence, new tokens) pairs -> the step's inputs on `device`. pad_to: decode steps only (one token a
        sequence), padded to that many sequences for a CUDA graph of that size. pending_tokens: the samples of the
        step in flight ([S] on `device`), where PENDING tokens are read (at each sequence's pending_row)."""
        groups = list(scheduled[0][0].block_tables)
        B = len(scheduled)
        lens = [n for _, n in scheduled]
        N = sum(lens)
        padded_b = B if pad_to is None else pad_to
        padded_n = N + (padded_b - B)
        if pad_to is not None and (N != B or pad_to < B):
            raise ValueError(f"only decode steps (one token a sequence) pad to a bucket: {N} tokens, {B} sequences, "
                             f"bucket {pad_to}")
        width = max(1, max(len(seq.block_tables[g]) for seq, _ in scheduled for g in groups))

        # a pass over the sequences gathers what is per sequence (tokens, where it stands); the rest is whole-array
        # arithmetic: at a few hundred sequences a step, numpy calls a row would cost more than the device's step
        token_list: list[int] = []
        computed, lengths = [], []
        fills: list[tuple[int, int]] = []  # (row, its place in pending_tokens) of each row whose token is PENDING
        for seq, n in scheduled:
            start, length = seq.num_computed_tokens, len(seq)
            computed.append(start)
            lengths.append(length)
            token_list += seq.tokens_in(start, start + n) if n > 1 else [token_at(seq, start)]
            if start + n == length and seq.newest_is_pending:  # (a chunk short of a PENDING token does not read it)
                fills.append((len(token_list) - 1, seq.pending_row))
                token_list[-1] = 0  # a real token id until the gather below overwrites it
        F = len(fills)

        # one int32 buffer: ids, positions, query_start, context_lens, slots per group, tables per group, rows; then
        # the PENDING rows and where in pending_tokens each is
        sizes = [padded_n, padded_n, padded_b + 1, padded_b] + [padded_n] * len(groups) \
            + [padded_b * width] * len(groups) + [B, F, F]
        # each part starts on a 16-byte boundary: kernels compiled for aligned pointers (Triton specializes on it)
        # serve every step, instead of a step whose token count moves a part off the boundary compiling a variant
        # mid-serving (seconds, with every decoding request waiting)
        starts = np.cumsum([0] + [-(-size // ALIGN) * ALIGN for size in sizes]).tolist()
        spans = list(zip(starts, sizes))
        host = np.zeros(starts[-1], dtype=np.int32)
        ids, positions, query_start, context_lens, *rest = [host[a:a + size] for a, size in spans]
        slots, tables = rest[:len(groups)], rest[len(groups):2 * len(groups)]
        sample_rows, fill_rows, fill_from = rest[-3:]
        tables = [t.reshape(padded_b, width) for t in tables]
        if fills:
            fill_rows[:], fill_from[:] = zip(*fills)
        ids[:N] = token_list
        query_start[:] = [*itertools.accumulate([0, *lens, *([1] * (padded_b - B))])]
        ends = [start + n for start, n in zip(computed, lens)]
        context_lens[:B] = ends
        seq_of_row = np.repeat(np.arange(B), lens)  # [N]
        positions[:N] = np.arange(N) + np.repeat(np.subtract(computed, query_start[:B]), lens)
        for g, group in enumerate(groups):
            # each row's table, left-aligned: one copy of all the tables' entries
            group_tables = [seq.block_tables[group] for seq, _ in scheduled]
            table_lens = np.fromiter(map(len, group_tables), dtype=np.int64, count=B)
            tables[g][:B][np.arange(width) < table_lens[:, None]] = np.fromiter(
                itertools.chain.from_iterable(group_tables), dtype=np.int32, count=int(table_lens.sum()))
            # position p lives in block table[p // block_size], at offset p % block_size
            slots[g][:N] = tables[g][seq_of_row, positions[:N] // block_size] * block_size + positions[:N] % block_size
        # sequences whose chunk reaches their last token sample, from their last row
        samples = [b for b, (end, length) in enumerate(zip(ends, lengths)) if end == length]
        sample_rows[:len(samples)] = query_start[1:][samples] - 1
        context_lens[B:] = 1  # padding: one token, its slot in the null block
        for g in range(len(groups)):
            slots[g][N:] = NULL_BLOCK * block_size
            tables[g][B:] = NULL_BLOCK

        pinned = torch.from_numpy(host)
        if device.type == "cuda":
            pinned = pinned.pin_memory()
        flat = pinned.to(device, non_blocking=True)
        parts = [flat[a:a + size] for a, size in spans]
        if F:
            if pending_tokens is None:
                raise ValueError(f"{F} sequences wait for tokens of a step in flight, but no pending_tokens came")
            parts[0][parts[-2].long()] = pending_tokens[parts[-1].long()].to(torch.int32)
        return cls(
            token_ids=parts[0], positions=parts[1], query_start=parts[2], context_lens=parts[3],
            slot_mapping={group: parts[4 + g] for g, group in enumerate(groups)},
            block_tables={group: parts[4 + len(groups) + g].view(padded_b, width) for g, group in enumerate(groups)},
            sample_rows=parts[-3][:len(samples)].long(), num_seqs=B, num_tokens=N, max_query_len=max(lens))
