"""Decides what runs each step: continuing sequences first, then new ones, under a token and sequence budget.

Prompts are prefilled in chunks of at most the step's remaining token budget, so a long prompt never stalls the
decoding sequences. When the cache has no room for a running sequence's next tokens, the most recently admitted
sequence is preempted: its blocks are freed and it waits to be recomputed (its prefix may still be cached).
After the step ran, `postprocess` records what it computed and appends the sampled tokens; whether a sequence is
done (stop token, stop string, length) the engine decides, and `finish` takes it out.
"""

from __future__ import annotations

from collections import deque

from gptoss_serve.cluster.block_manager import BlockManager
from gptoss_serve.cluster.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens of admitted sequences, looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found there

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> (sequence, number of new tokens to compute) for this step."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
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
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_append(seq, n):
                self.blocks.free_sequence(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            self.prefix_queries += len(seq)
            self.prefix_hits += seq.num_cached_tokens
            self.blocks.append(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def postprocess(self, scheduled: list[tuple[Sequence, int]], token_ids: list[int]) -> list[Sequence]:
        """Once the step ran: its tokens are in the cache (full blocks join the prefix cache, blocks that left the
        sliding window go back), and each sequence that computed its last token takes its sampled token.
        token_ids: one per such sequence, in the order scheduled. -> those sequences."""
        sampled = []
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            self.blocks.after_step(seq)
            if seq.num_computed_tokens == len(seq):
                sampled.append(seq)
        for seq, token in zip(sampled, token_ids, strict=True):
            seq.output_token_ids.append(token)
        return sampled

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
