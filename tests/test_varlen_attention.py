"""The step's attention over the paged cache: the PyTorch reference against whole-sequence attention (CPU), the
Triton kernel against the reference in Triton's interpreter (CPU, a subprocess) and on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptoss_serve.kernels.paged_attention import paged_attention_reference
from tests.attention_cases import expected, long_step, random_step

# (context length, new tokens): decoding, a first chunk, a middle chunk crossing blocks, a one-token context
MIXED = [(37, 1), (21, 21), (70, 13), (1, 1), (64, 1)]


@pytest.mark.parametrize("window", [None, 16])
def test_reference_matches_whole_sequence_attention(window):
    args, whole = random_step(MIXED, window=window, padding_rows=3)
    out = torch.full_like(args["q"], 7.0)
    got = paged_attention_reference(**args, out=out)
    n = sum(new for _, new in MIXED)
    torch.testing.assert_close(got[:n], expected(MIXED, whole, args), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[n:], torch.full_like(got[n:], 7.0))  # padding rows are nobody's


def test_a_sequence_with_no_new_tokens_is_skipped():
    args, whole = random_step([(9, 2), (5, 0), (12, 1)])
    got = paged_attention_reference(**args)
    seqs = [(9, 2), (12, 1)]
    torch.testing.assert_close(got, expected(seqs, [whole[0], whole[2]], args), rtol=1e-5, atol=1e-5)


INTERPRETED = textwrap.dedent("""
    import torch
    from gptoss_serve.kernels.paged_attention import paged_attention_reference
    from gptoss_serve.kernels.varlen_attention import paged_attention
    from tests.attention_cases import random_step
    cases = [([(37, 1), (21, 21), (70, 13), (1, 1)], None, 2, 2), ([(37, 1), (70, 13), (5, 0)], 16, 0, 2),
             ([(40, 1), (9, 1)], 16, 0, 4), ([(30, 30)], None, 1, 1),
             ([(200, 20), (150, 1), (131, 3)], None, 1, 2)]  # whole tiles of keys without the mask, then the rest
    for seqs, window, padding, group in cases:
        args, _ = random_step(seqs, window=window, padding_rows=padding, heads=2 * group, kv_heads=2)
        want = paged_attention_reference(**args, out=torch.full_like(args["q"], 7.0))
        got = paged_attention(**args, max_query_len=max(n for _, n in seqs), out=torch.full_like(args["q"], 7.0))
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, (seqs, window, err)
    # keys cut across programs (chunks of 64 keys or more; the last chunks of short tiles empty), then combined
    from gptoss_serve.kernels.varlen_attention import varlen_attention
    split_cases = [([(200, 20), (150, 1), (131, 3), (5, 0)], 3, 2), ([(300, 40)], 2, 1)]
    for seqs, splits, group in split_cases:
        args, _ = random_step(seqs, window=None, padding_rows=2, heads=2 * group, kv_heads=2)
        want = paged_attention_reference(**args, out=torch.full_like(args["q"], 7.0))
        got = varlen_attention(**args, max_query_len=max(n for _, n in seqs), out=torch.full_like(args["q"], 7.0),
                               num_splits=splits, min_chunk=64)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, (seqs, splits, err)
    print("ok", len(cases) + len(split_cases))
""")


def test_kernel_in_the_interpreter_matches_the_reference():
    """Float32 in Triton's CPU interpreter: the kernel's indexing, masks, window, sinks and padding, exactly."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok 7" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------- GPU tests

GPT_OSS = dict(heads=64, kv_heads=8, head_dim=64, block_size=16, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["paged_attention", "varlen_attention"])  # dispatched (long decodes split), unsplit
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("seqs", [
    [(300, 1)],  # batch-1 decode
    [(100 + 37 * i, 1) for i in range(64)],  # a decode batch
    [(1500, 1), (700, 300), (2048, 2048), (129, 129), (17, 1), (5, 0)],  # mixed, long, empty
])
def test_kernel_matches_the_reference_on_gpu(seqs, window, entry):
    from gptoss_serve.kernels import varlen_attention

    attend = getattr(varlen_attention, entry)
    args, _ = random_step(seqs, window=window, padding_rows=5, **GPT_OSS)
    want = paged_attention_reference(**args, out=torch.full_like(args["q"], 7.0))
    got = attend(**args, max_query_len=max(n for _, n in seqs), out=torch.full_like(args["q"], 7.0))
    n = sum(new for _, new in seqs)
    assert torch.equal(got[n:], torch.full_like(got[n:], 7.0))
    error = ((got[:n].float() - want[:n].float()).norm() / want[:n].float().norm()).item()
    assert error < 1e-2, error


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph():
    from gptoss_serve.kernels.varlen_attention import paged_attention

    seqs = [(200 + 50 * i, 1) for i in range(8)]
    args, _ = random_step(seqs, window=128, **GPT_OSS)
    graph = torch.cuda.CUDAGraph()
    paged_attention(**args, max_query_len=1)  # compile outside the capture
    with torch.cuda.graph(graph):
        captured = paged_attention(**args, max_query_len=1)
    args["context_lens"].sub_(torch.arange(8, device="cuda", dtype=torch.int32) * 3)  # other lengths, in place
    args["q"].normal_()
    graph.replay()
    torch.testing.assert_close(captured, paged_attention(**args, max_query_len=1), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seqs", [
    [(5000, 256), (3000, 1), (1200, 1)],  # a chunk beside decodes
    [(2500, 700), (17, 17), (64, 1), (5, 0)],  # tiles whose last chunks are empty, a sequence with none
])
@pytest.mark.parametrize("num_splits, min_chunk", [(4, 1024), (9, 64)])
def test_split_prefill_matches_the_reference_on_gpu(seqs, dtype, num_splits, min_chunk):
    from gptoss_serve.kernels.varlen_attention import varlen_attention

    args, _ = random_step(seqs, padding_rows=5, **dict(GPT_OSS, dtype=dtype))
    want = paged_attention_reference(**args, out=torch.full_like(args["q"], 7.0))
    got = varlen_attention(**args, max_query_len=max(n for _, n in seqs), out=torch.full_like(args["q"], 7.0),
                           num_splits=num_splits, min_chunk=min_chunk)
    n = sum(new for _, new in seqs)
    assert torch.equal(got[n:], torch.full_like(got[n:], 7.0))  # padding rows are nobody's
    error = ((got[:n].float() - want[:n].float()).norm() / want[:n].float().norm()).item()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), error


@pytest.mark.gpu
@pytest.mark.parametrize("context", [32768, 131072])
def test_a_short_chunk_at_a_long_context_is_split_and_matches_the_reference(context):
    """A long prompt's last 64-token chunk beside 8 decodes, as the engine steps it with
    long_prefill_token_threshold: paged_attention splits its keys, and both paths match the reference."""
    from gptoss_serve.kernels.varlen_attention import (PREFILL_TILES, _multiprocessors, paged_attention,
                                                       prefill_splits, varlen_attention)

    seqs = [(context, 64)] + [(1000 + 300 * i, 1) for i in range(8)]
    args = long_step(seqs, padding_rows=3)
    sms = _multiprocessors(args["q"].device)
    splits = prefill_splits(num_tokens=72, tile_tokens=PREFILL_TILES.rows // 8, kv_heads=8,
                            max_keys=args["block_tables"].shape[1] * 16, multiprocessors=sms)
    assert splits > 1
    want = paged_attention_reference(**args, out=torch.full_like(args["q"], 7.0))
    for got in (paged_attention(**args, max_query_len=64, out=torch.full_like(args["q"], 7.0)),
                varlen_attention(**args, max_query_len=64, out=torch.full_like(args["q"], 7.0))):
        assert torch.equal(got[72:], want[72:])
        error = ((got[:72].float() - want[:72].float()).norm() / want[:72].float().norm()).item()
        assert error < 1e-2, error
