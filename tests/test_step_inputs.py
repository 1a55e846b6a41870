"""A step's inputs as the device gets them: one buffer with ids, positions, rows, slots and block tables."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from gptoss_serve.cluster.block_manager import FULL, SLIDING
from gptoss_serve.cluster.decode_graphs import buckets_for
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.cluster.sequence import PENDING, Sequence
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


def row_by_row(scheduled, block_size: int) -> dict:
    """What a step's inputs must hold, written out a row at a time: the reference for build's whole-array code."""
    expected = {"ids": [], "positions": [], "context_lens": [], "sample_rows": [], "fills": [],
                "slots": {g: [] for g in (FULL, SLIDING)}}
    for seq, n in scheduled:
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            token = seq.token_ids[position]
            if token == PENDING:  # only ever the newest: read on the device from the step in flight
                expected["fills"].append((len(expected["ids"]), seq.pending_row))
                token = 0
            expected["ids"].append(token)
            expected["positions"].append(position)
            for g in (FULL, SLIDING):
                table = seq.block_tables[g]
                expected["slots"][g].append(table[position // block_size] * block_size + position % block_size)
        expected["context_lens"].append(seq.num_computed_tokens + n)
        if seq.num_computed_tokens + n == len(seq):
            expected["sample_rows"].append(len(expected["ids"]) - 1)
    return expected


@pytest.mark.parametrize("seed", range(20))
def test_random_steps_match_a_row_by_row_reference(seed):
    """Decodes (some with their newest token PENDING), prompt chunks that end inside or at their prompt, and a
    recomputed sequence whose chunk runs into its outputs, in random mixes; decode-only steps also padded."""
    rng = random.Random(seed)
    block_size = rng.choice([4, 16])
    scheduled, pending = [], 0
    for _ in range(rng.randint(1, 40)):
        prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 70))]
        outputs = [rng.randrange(1, 1000) for _ in range(rng.randint(0, 5))]
        if outputs and rng.random() < 0.5:
            outputs[-1] = PENDING
        total = len(prompt) + len(outputs)
        kind = rng.choice(["decode", "chunk", "recompute"]) if len(prompt) > 1 else "decode"
        if kind == "decode":
            computed, n = total - 1, 1
        elif kind == "chunk":
            computed = rng.randrange(0, len(prompt))
            n = rng.randint(1, len(prompt) - computed)
        else:  # preempted and back: prompt and outputs computed again, from the start
            computed, n = 0, total
        blocks = -(-(computed + n) // block_size)
        seq = sequence(prompt, outputs=outputs, computed=computed,
                       full=[rng.randrange(1, 500) for _ in range(blocks)],
                       sliding=[rng.randrange(0, 500) for _ in range(blocks)])
        if outputs and outputs[-1] == PENDING:
            seq.pending_row, pending = pending, pending + 1
        scheduled.append((seq, n))
    samples = torch.arange(1000, 1000 + max(pending, 1))  # the step in flight's tokens, told apart by value
    expected = row_by_row(scheduled, block_size)
    decode = all(n == 1 for _, n in scheduled)
    pad_to = len(scheduled) + rng.randint(0, 5) if decode else None
    inputs = StepInputs.build(scheduled, block_size=block_size, device=torch.device("cpu"), pad_to=pad_to,
                              pending_tokens=samples)
    N, B = len(expected["ids"]), len(scheduled)
    ids = list(expected["ids"])
    for row, from_row in expected["fills"]:
        ids[row] = 1000 + from_row
    assert inputs.token_ids[:N].tolist() == ids
    assert inputs.positions[:N].tolist() == expected["positions"]
    assert inputs.context_lens[:B].tolist() == expected["context_lens"]
    assert inputs.query_start[:B + 1].tolist() == [0, *itertools.accumulate(n for _, n in scheduled)]
    assert inputs.sample_rows.tolist() == expected["sample_rows"]
    assert (inputs.num_seqs, inputs.num_tokens, inputs.max_query_len) == (B, N, max(n for _, n in scheduled))
    for g in (FULL, SLIDING):
        assert inputs.slot_mapping[g][:N].tolist() == expected["slots"][g]
        tables = inputs.block_tables[g]
        for b, (seq, _) in enumerate(scheduled):
            table = seq.block_tables[g]
            assert tables[b].tolist() == table + [0] * (tables.shape[1] - len(table))
    if pad_to is not None:  # padding rows: token 0 at position 0, one token of context, in the null block
        pad = pad_to - B
        assert inputs.token_ids[N:].tolist() == [0] * pad and inputs.positions[N:].tolist() == [0] * pad
        assert inputs.context_lens[B:].tolist() == [1] * pad
        assert inputs.query_start[B + 1:].tolist() == list(range(N + 1, N + pad + 1))
        assert all(inputs.slot_mapping[g][N:].tolist() == [0] * pad for g in (FULL, SLIDING))
        assert all(not inputs.block_tables[g][B:].any() for g in (FULL, SLIDING))


def test_the_build_benchmark_times_decode_and_mixed_steps(tmp_path):
    from gptoss_serve.bench import step_inputs as bench

    out = tmp_path / "build.json"
    bench.main(["--batches", "1", "3", "--context", "40", "--chunk", "8", "--repeat", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["decode_us"] > 0 and r["mixed_us"] > 0 for r in rows)
    # its sequences are what an engine step holds: each decode reads a PENDING token, the chunk is its prompt's last
    seq = bench.decoding(0, 40, random.Random(0))
    assert len(seq) == 40 and seq.newest_is_pending and len(seq.block_tables[FULL]) == 3
    inputs = StepInputs.build([(seq, 1), (bench.chunking(8, random.Random(0)), 8)], block_size=bench.BLOCK_SIZE,
                              device=torch.device("cpu"), pending_tokens=torch.tensor([7]))
    assert inputs.token_ids[0] == 7 and inputs.sample_rows.tolist() == [0, 8]
