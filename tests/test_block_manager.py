"""The block manager's bookkeeping as a sequence grows: sliding-window blocks released exactly when no query can see
them, and the prefix cache's chained hashes over prompt and output tokens alike."""

from __future__ import annotations

from gptoss_serve.cluster.block_manager import FULL, NULL_BLOCK, SLIDING, BlockManager, chain_hash
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.cluster.sequence import Sequence


def test_a_growing_sequence_releases_its_window_blocks_and_hashes_every_full_block():
    blocks = BlockManager(num_blocks=64, block_size=4, sliding_window=6)
    seq = Sequence("s", list(range(100, 111)), SamplingParams())  # 11 prompt tokens: two full blocks and a part
    blocks.allocate_prompt(seq)
    blocks.append(seq, 11)
    seq.num_computed_tokens = 11
    blocks.after_step(seq)
    for token in range(200, 230):  # decode: one token a step
        seq.output_token_ids.append(token)
        blocks.append(seq, 1)
        seq.num_computed_tokens += 1
        blocks.after_step(seq)
        computed = seq.num_computed_tokens
        # the next query (position `computed`) sees the 6 keys up to it: blocks wholly before them are done
        first_needed = max(0, computed - 6 + 1) // 4
        sliding = seq.block_tables[SLIDING]
        assert sliding[:first_needed] == [NULL_BLOCK] * first_needed
        assert NULL_BLOCK not in sliding[first_needed:]
        assert NULL_BLOCK not in seq.block_tables[FULL]
        held = len(seq.block_tables[FULL]) + len(sliding) - first_needed
        assert blocks.num_free_blocks == 63 - held  # released blocks went back to the pool
        tokens, parent, want = seq.token_ids, None, []
        for i in range(computed // 4):
            parent = chain_hash(parent, tokens[i * 4:(i + 1) * 4])
            want.append(parent)
        assert seq.block_hashes == want and seq.num_hashed_blocks == len(want)


def test_tokens_in_reads_across_the_prompt_and_the_output():
    seq = Sequence("s", list(range(10)), SamplingParams())
    seq.output_token_ids.extend([100, 101, 102, 103])
    for start in range(15):
        for end in range(start, 15):
            assert seq.tokens_in(start, end) == seq.token_ids[start:end]
