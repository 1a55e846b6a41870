"""Decides what runs each step: continuing sequences first, then new ones, under a token and sequence budget.

Prompts are prefilled in chunks of at most the step's remaining token budget, so a long prompt never stalls the
decoding sequences; with long_prefill_token_threshold, a chunk beside decoding sequences is at most that many
tokens, so it does not stretch their steps much either. When the cache has no room for a running sequence's next
tokens, the most recently admitted sequence is preempted: its blocks are freed and it waits to be recomputed (its prefix may still be cached).
Once a step is launched, `advance` records what it computes and returns the sequences that sample; once it ran,
`after_step` lets the cache keep or release their blocks. Whether a sequence is done (stop token, stop string,
length) the engine decides, and `finish` takes it out. Under async scheduling the engine schedules step t+1 while
step t runs: a sequence's last token may still be PENDING then (see sequence.py), and a sequence at its length cap
is skipped, as its last token is already on its way.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from gptoss_serve.cluster.block_manager import BlockManager
from gptoss_serve.cluster.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0) -> None:
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # running total (the replica's preemption counter reads it)
        self.scheduled_tokens = 0  # tokens the last `schedule` gave the step (prefill and decode)
        self.prefix_queries = 0  # prompt tokens of admitted sequences, looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found there

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> (sequence, number of new tokens to compute) for this step."""
        budget = self.max_num_batched_tokens
        chunk = self._prefill_chunk()
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.at_length_cap:  # preempted earlier in this loop, or done
                continue
            n = min(seq.num_uncomputed_tokens, budget, chunk)
            if n == 0:
                break
            while not self.blocks.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.append(seq, n)
            scheduled.append((seq, n))
            budget -= n
        # admit new sequences only when nothing had to make room this step (avoids thrashing)
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.allocate_prompt(seq)
            n = min(seq.num_uncomputed_tokens, budget, chunk)
            if not self.blocks.can_append(seq, n):
                self.blocks.free_sequence(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            self.prefix_queries += len(seq)
            self.prefix_hits += seq.num_cached_tokens
            self.blocks.append(seq, n)
            seq.status = Status.RUNNING
            if not seq.times.scheduled:  # its first admission ends its queue time; a preempted one's comeback not
                seq.times = replace(seq.times, scheduled=time.time())
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        self.scheduled_tokens = self.max_num_batched_tokens - budget  # from the budget: no pass over the batch
        return scheduled

    def _prefill_chunk(self) -> int:
        """The most tokens one sequence may compute this step: long_prefill_token_threshold while a running
        sequence decodes (its prompt all computed), so a long prompt's chunks do not stretch every decode step;
        else no limit beyond the budget. A decoding sequence computes one token, under any threshold."""
        limit = self.long_prefill_token_threshold
        if limit and any(seq.num_computed_tokens >= len(seq.prompt_token_ids) for seq in self.running):
            return limit
        return self.max_num_batched_tokens

    def advance(self, scheduled: list[tuple[Sequence, int]]) -> list[Sequence]:
        """A step was launched: its tokens count as computed. -> the sequences whose chunk reaches their last token
        (the ones that sample), in the order scheduled."""
        sampled = []
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq):
                sampled.append(seq)
        return sampled

    def after_step(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """A step ran and its sampled tokens are known: full blocks join the prefix cache (their tokens are all
        known by now), blocks that left the sliding window go back."""
        for seq, _ in scheduled:
            if seq.status is Status.RUNNING:  # not finished, aborted or preempted meanwhile
                self.blocks.after_step(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Takes a sequence out (finished, aborted or failed) wherever it is, and frees its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_tables:
            self.blocks.free_sequence(seq)
        seq.status = Status.FINISHED
