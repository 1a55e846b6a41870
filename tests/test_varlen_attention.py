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
from tests.attention_cases import expected, random_step

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
             ([(40, 1), (9, 1)], 16, 0, 4), ([(30, 30)], None, 1, 1)]
    for seqs, window, padding, group in cases:
        args, _ = random_step(seqs, window=window, padding_rows=padding, heads=2 * group, kv_heads=2)
        want = paged_attention_reference(**args, out=torch.full_like(args["q"], 7.0))
        got = paged_attention(**args, max_query_len=max(n for _, n in seqs), out=torch.full_like(args["q"], 7.0))
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, (seqs, window, err)
    print("ok", len(cases))
""")


def test_kernel_in_the_interpreter_matches_the_reference():
    """Float32 in Triton's CPU interpreter: the kernel's indexing, masks, window, sinks and padding, exactly."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok 4" in result.stdout, result.stderr[-3000:]


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
