"""The token bitmask of constrained decoding applied to logits: the Triton kernel (kernels/token_bitmask.py) against its
PyTorch reference, in Triton's CPU interpreter (a subprocess) and on the GPU (gpt-oss's vocabulary, up to 256 rows),
and the sampler's GPU path (pinned masks, the kernel) drawing only what a grammar allows."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from gptoss_serve.kernels.token_bitmask_reference import apply_token_bitmask_reference
from tests.interpreter import assert_runs_in_interpreter


def bitmask_case(batch: int, vocab: int, words: int, rows: list[int], seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab + 3, generator=gen)[:, :vocab]  # strided rows
    masks = torch.randint(-2**31, 2**31, (len(rows), words), generator=gen, dtype=torch.int64).to(torch.int32)
    return logits.to(device), masks.to(device), torch.tensor(rows, device=device)


def test_the_reference_masks_exactly_the_forbidden_tokens():
    # vocab 70 over 2 words: tokens 64-69 have no bit and are forbidden; vocab 33 over 2 words: bits past it unused
    for batch, vocab, words, rows in [(5, 100, 4, [0, 3]), (3, 70, 2, [2]), (4, 33, 2, [1, 0, 3])]:
        logits, masks, index = bitmask_case(batch, vocab, words, rows)
        got = logits.clone()
        apply_token_bitmask_reference(got, masks, index)
        for b in range(batch):
            for t in range(vocab):
                allowed = b not in rows or (t < 32 * words and int(masks[rows.index(b), t // 32]) >> (t % 32) & 1)
                assert got[b, t] == (logits[b, t] if allowed else -math.inf), (b, t)


INTERPRETED = textwrap.dedent("""
    import torch
    from gptoss_serve.kernels.token_bitmask import apply_token_bitmask
    from gptoss_serve.kernels.token_bitmask_reference import apply_token_bitmask_reference
    from tests.test_token_bitmask import bitmask_case
    for batch, vocab, words, rows in [(5, 100, 4, [0, 3]), (3, 70, 2, [2]), (4, 33, 2, [1, 0, 3]),
                                      (2, 9000, 282, [1])]:
        logits, masks, index = bitmask_case(batch, vocab, words, rows)
        got, want = logits.clone(), logits.clone()
        apply_token_bitmask(got, masks, index)
        apply_token_bitmask_reference(want, masks, index)
        assert torch.equal(got, want), (batch, vocab)
    print("ok")
""")


def test_the_kernel_in_the_interpreter_matches_the_reference():
    """Odd vocabularies (a mask shorter than the row, bits past the row), strided rows, rows out of order."""
    assert_runs_in_interpreter(INTERPRETED)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, rows", [(1, [0]), (64, list(range(0, 64, 3))), (256, list(range(255, -1, -1)))])
def test_the_kernel_matches_the_reference_on_gpu(batch, rows):
    from gptoss_serve.kernels.token_bitmask import apply_token_bitmask

    logits, masks, index = bitmask_case(batch, 201088, 6284, rows, seed=batch, device="cuda")
    got, want = logits.clone(), logits.clone()
    apply_token_bitmask(got, masks, index)
    apply_token_bitmask_reference(want, masks, index)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_the_sampler_draws_only_allowed_tokens_on_gpu():
    from gptoss_serve.cluster.constraints import completion_constraint
    from gptoss_serve.cluster.grammar import GrammarCompiler, token_bitmasks
    from gptoss_serve.cluster.sampler import Sampler, SamplingState
    from gptoss_serve.cluster.sampling_params import SamplingParams
    from gptoss_serve.kernels.token_bitmask_reference import unpack_token_bitmask
    from gptoss_serve.model.tokenizer import load_tokenizer

    spec = completion_constraint({"type": "json_object"})
    grammars = GrammarCompiler(load_tokenizer())
    states = []
    for i in range(8):  # constrained rows between free ones, greedy and drawn, some asking for logprobs
        params = SamplingParams(temperature=0.0 if i % 3 == 0 else 1.0, seed=i, logprobs=2 if i % 2 else None,
                                structured_output=spec if i % 4 != 1 else None)
        states.append(SamplingState(params, [1, 2, 3]))
        if params.structured_output is not None:
            states[-1].grammar = grammars.matcher(spec)
    logits = torch.randn(8, 201088, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        constrained = [s.grammar for s in states if s.grammar is not None]
        allowed = unpack_token_bitmask(token_bitmasks(constrained), 201088)  # [R, V]
        out = Sampler().sample(logits, states)
        rows = [i for i, s in enumerate(states) if s.grammar is not None]
        for r, i in enumerate(rows):
            assert allowed[r, out.token_ids[i]], (i, out.token_ids[i])
            if out.logprobs[i] is not None:  # the constrained distribution's: no forbidden alternative
                assert all(allowed[r, t] or v == -math.inf for t, v in out.logprobs[i].top)
            states[i].grammar.matcher.consume_token(out.token_ids[i])
