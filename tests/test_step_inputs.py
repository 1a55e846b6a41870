"""A step's inputs as the device gets them: one buffer with ids, positions, rows, slots and block tables."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.cluster.block_manager import FULL, SLIDING
from gptoss_serve.cluster.decode_graphs import buckets_for
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.cluster.sequence import Sequence
from gptoss_serve.cluster.step_inputs import StepInputs, token_at

PARAMS = SamplingParams(temperature=0, max_tokens=8)


def sequence(prompt: list[int], *, outputs: list[int] = (), computed: int = 0, full: list[int], sliding: list[int]):
    seq = Sequence("r", list(prompt), PARAMS)
    seq.output_token_ids.extend(outputs)
    seq.num_computed_tokens = computed
    seq.block_tables = {FULL: full, SLIDING: sliding}
    return seq


def test_a_mixed_step_lays_rows_end_to_end():
    decoding = sequence([5, 6, 7], outputs=[8, 9], computed=4, full=[3, 13], sliding=[4, 14])
    # a mid-prompt chunk, positions 8..13; its first sliding blocks already went back (null block 0)
    chunk = sequence(list(range(100, 120)), computed=8, full=[7, 2, 6, 1], sliding=[0, 0, 9, 10])
    last = sequence(list(range(200, 205)), computed=0, full=[11, 15], sliding=[12, 16])
    inputs = StepInputs.build([(decoding, 1), (chunk, 6), (last, 5)], block_size=4, device=torch.device("cpu"))
    assert inputs.token_ids.tolist() == [9, *range(108, 114), *range(200, 205)]
    assert inputs.positions.tolist() == [4, *range(8, 14), *range(5)]
    assert inputs.query_start.tolist() == [0, 1, 7, 12]
    assert inputs.context_lens.tolist() == [5, 14, 5]
    assert (inputs.num_seqs, inputs.num_tokens, inputs.max_query_len) == (3, 12, 6)
    assert inputs.sample_rows.tolist() == [0, 11]  # the middle chunk ends inside its prompt
    assert inputs.block_tables[FULL].tolist() == [[3, 13, 0, 0], [7, 2, 6, 1], [11, 15, 0, 0]]
    assert inputs.block_tables[SLIDING].tolist() == [[4, 14, 0, 0], [0, 0, 9, 10], [12, 16, 0, 0]]
    # position p lives in block table[p // 4] at offset p % 4
    assert inputs.slot_mapping[FULL].tolist() == [52, 24, 25, 26, 27, 4, 5, 44, 45, 46, 47, 60]
    assert inputs.slot_mapping[SLIDING].tolist() == [56, 36, 37, 38, 39, 40, 41, 48, 49, 50, 51, 64]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_every_part_starts_on_a_16_byte_boundary_whatever_the_token_count(chunk):
    """Kernels are compiled for 16-byte-aligned pointers: a part off the boundary (a step of an odd token count)
    would compile a variant in the middle of serving."""
    decoding = sequence([5, 6, 7], outputs=[8], computed=3, full=[3], sliding=[4])
    prompt = sequence(list(range(100, 110)), computed=0, full=[7, 2, 6], sliding=[9, 10, 11])
    inputs = StepInputs.build([(decoding, 1), (prompt, chunk)], block_size=4, device=torch.device("cpu"))
    parts = [inputs.token_ids, inputs.positions, inputs.query_start, inputs.context_lens,
             *inputs.slot_mapping.values(), *inputs.block_tables.values()]
    assert [t.storage_offset() * t.element_size() % 16 for t in parts] == [0] * len(parts)
    assert inputs.token_ids.tolist() == [8, *range(100, 100 + chunk)]
    assert inputs.query_start.tolist() == [0, 1, 1 + chunk] and inputs.context_lens.tolist() == [4, chunk]


def test_decode_steps_pad_to_their_bucket():
    seqs = [sequence([1, 2, 3], outputs=[4], computed=3, full=[5 + i], sliding=[9 + i]) for i in range(3)]
    # position 3 of each: block 5 + i, offset 3
    inputs = StepInputs.build([(s, 1) for s in seqs], block_size=4, device=torch.device("cpu"), pad_to=4)
    assert inputs.token_ids.tolist() == [4, 4, 4, 0]
    assert inputs.positions.tolist() == [3, 3, 3, 0]
    assert inputs.query_start.tolist() == [0, 1, 2, 3, 4]
    assert inputs.context_lens.tolist() == [4, 4, 4, 1]
    assert inputs.slot_mapping[FULL].tolist() == [23, 27, 31, 0]  # the padding row writes into the null block
    assert inputs.block_tables[FULL].tolist() == [[5], [6], [7], [0]]
    assert (inputs.num_seqs, inputs.num_tokens) == (3, 3) and inputs.sample_rows.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="only decode steps"):
        StepInputs.build([(seqs[0], 1), (seqs[1], 1)], block_size=4, device=torch.device("cpu"), pad_to=1)


def test_token_at_reads_prompt_then_outputs():
    seq = sequence([1, 2], outputs=[3, 4], full=[], sliding=[])
    assert [token_at(seq, i) for i in range(4)] == seq.token_ids


def test_graph_buckets_end_at_max_num_seqs():
    assert buckets_for(1) == [1]
    assert buckets_for(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets_for(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
