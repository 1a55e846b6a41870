"""Split-KV decode attention (kernels/split_kv_attention.py): how many splits the host picks (CPU), both kernels
against the reference in Triton's interpreter (CPU, a subprocess), and on the GPU: gpt-oss's shapes and smaller
groups, bf16 and float32, poisoned outputs and partials, and a CUDA graph replayed with other context lengths."""

from __future__ import annotations

import textwrap

import pytest
import torch

from gptoss_serve.kernels.paged_attention import paged_attention_reference
from tests.attention_cases import captured_wide_decode, long_step, random_step
from tests.interpreter import assert_runs_in_interpreter


def test_splits_fill_the_gpu_only_where_keys_are_many_and_programs_few():
    splits = pytest.importorskip("gptoss_serve.kernels.split_kv_attention")
    pick = lambda seqs, keys: splits.decode_splits(num_seqs=seqs, kv_heads=8, max_keys=keys, multiprocessors=132)
    assert pick(1, 32768) == 66  # 8 programs become 4 a multiprocessor
    assert pick(1, 1024) == 4  # no chunk under MIN_CHUNK keys
    assert pick(1, 128) == 1 and pick(1, 256) == 1  # a sliding layer's window: one chunk, no split
    assert pick(16, 131072) == 4
    assert pick(64, 131072) == 1  # 512 programs fill 132 multiprocessors already
    assert splits.decode_splits(num_seqs=1, kv_heads=1, max_keys=1 << 20, multiprocessors=132) == splits.MAX_SPLITS


INTERPRETED = textwrap.dedent("""
    import torch
    from gptoss_serve.kernels.paged_attention import paged_attention_reference
    from gptoss_serve.kernels.split_kv_attention import split_kv_decode, workspace_numel
    from tests.attention_cases import random_step
    # (sequences, window, group, splits, min_chunk, dtype): contexts off the chunk and tile edges, a one-token
    # context, a sequence with no new token, more splits than keys need, windows cut in two, one split, bf16
    cases = [([(1, 1), (15, 1), (16, 1), (17, 1), (300, 1)], None, 4, 3, 64, torch.float32),
             ([(300, 1), (5, 0), (70, 1)], 16, 2, 4, 64, torch.float32),
             ([(200, 1), (1, 1)], 100, 8, 7, 64, torch.float32),
             ([(130, 1)], None, 1, 1, 64, torch.float32),
             ([(520, 1), (64, 1)], None, 2, 2, 256, torch.bfloat16)]
    for seqs, window, group, splits, min_chunk, dtype in cases:
        args, _ = random_step(seqs, window=window, padding_rows=2, heads=2 * group, kv_heads=2, dtype=dtype)
        want = paged_attention_reference(**{**args, "q": args["q"].float(), "key_cache": args["key_cache"].float(),
                                            "value_cache": args["value_cache"].float()})
        numel = workspace_numel(num_seqs=len(seqs), heads=2 * group, head_dim=16, num_splits=splits)
        got = split_kv_decode(**args, num_splits=splits, min_chunk=min_chunk, out=torch.full_like(args["q"], 7.0),
                              workspace=torch.full((numel,), float("nan")))
        n = sum(new for _, new in seqs)
        assert torch.equal(got[n:], torch.full_like(got[n:], 7.0)), seqs  # padding rows are nobody's
        err = ((got[:n].float() - want[:n]).norm() / want[:n].norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (seqs, window, err)
    print("ok", len(cases))
""")


def test_split_kernels_in_the_interpreter_match_the_reference():
    """Triton's CPU interpreter: the chunking, the masks, the window, the combine and its sinks, the padding."""
    assert_runs_in_interpreter(INTERPRETED)


# ------------------------------------------------------------------------------------------------------- GPU tests

GPT_OSS = dict(heads=64, kv_heads=8, head_dim=64, block_size=16)
SHAPES = {"gpt-oss bf16": dict(GPT_OSS, dtype=torch.bfloat16), "gpt-oss float32": dict(GPT_OSS, dtype=torch.float32),
          "group 2": dict(GPT_OSS, heads=16, dtype=torch.bfloat16),
          "group 1": dict(GPT_OSS, heads=8, dtype=torch.bfloat16)}
CONTEXTS = [1, 15, 16, 17, 1000, 5000]  # none a multiple of a chunk


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("seqs", [
    [(5000, 1)], [(17, 1)], [(1, 1)],  # batch 1
    [(1000, 1), (15, 1), (5000, 1)],  # batch 3
    [(CONTEXTS[i % 6], 1) for i in range(15)] + [(5, 0)],  # batch 16, one sequence with no new token
])
@pytest.mark.parametrize("num_splits, min_chunk", [(3, 256), (40, 64)])
def test_split_matches_the_reference_on_gpu(seqs, window, shape, num_splits, min_chunk):
    from gptoss_serve.kernels.split_kv_attention import split_kv_decode, workspace_numel

    options = SHAPES[shape]
    args, _ = random_step(seqs, window=window, padding_rows=5, device="cuda", **options)
    want = paged_attention_reference(**args)
    numel = workspace_numel(num_seqs=len(seqs), heads=options["heads"], head_dim=64, num_splits=num_splits)
    workspace = torch.full((numel,), float("nan"), device="cuda")  # a partial read before it is written shows
    got = split_kv_decode(**args, num_splits=num_splits, min_chunk=min_chunk, out=torch.full_like(args["q"], 7.0),
                          workspace=workspace)
    n = sum(new for _, new in seqs)
    assert torch.equal(got[n:], torch.full_like(got[n:], 7.0))
    assert _error(got[:n], want[:n]) < (1e-5 if options["dtype"] == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_paged_attention_splits_long_decodes(window):
    from gptoss_serve.kernels.split_kv_attention import decode_splits
    from gptoss_serve.kernels.varlen_attention import paged_attention

    seqs = [(5000, 1), (1000, 1)]
    args, _ = random_step(seqs, window=window, device="cuda", dtype=torch.bfloat16, **GPT_OSS)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    width = args["block_tables"].shape[1] * 16
    splits = decode_splits(num_seqs=2, kv_heads=8, max_keys=min(width, window or width), multiprocessors=sms)
    assert (splits > 1) == (window is None)  # the split path where it pays, the one kernel on a sliding layer
    got = paged_attention(**args, max_query_len=1)
    assert _error(got, paged_attention_reference(**args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_split_decode_replays_in_a_cuda_graph_with_other_contexts(window):
    """Captured once with tables as wide as a long max_model_len, as cluster/decode_graphs.py does, then replayed
    with shorter and longer contexts: the same answers as the reference, and bit for bit as an eager call."""
    from gptoss_serve.kernels.varlen_attention import paged_attention

    # every block real (no window when built): a replayed context's window may reach back past the built one's
    args, _ = random_step([(6000, 1)] * 3, device="cuda", dtype=torch.bfloat16, **GPT_OSS)
    args["window"] = window
    graph, captured = captured_wide_decode(args)  # max_model_len 32k
    for contexts in ([6000, 300, 17], [1, 4097, 5000], [2500, 1, 6000]):
        args["context_lens"].copy_(torch.tensor(contexts, dtype=torch.int32))  # in place: what the graph reads
        args["q"].normal_()
        graph.replay()
        assert _error(captured, paged_attention_reference(**args)) < 1e-2, contexts
        torch.testing.assert_close(captured, paged_attention(**args, max_query_len=1), rtol=0, atol=0)


@pytest.mark.gpu
def test_split_decode_at_128k_matches_the_reference():
    """gpt-oss's longest context, batch 3 (one short): the split the dispatcher picks, against the reference."""
    from gptoss_serve.kernels.varlen_attention import paged_attention

    args = long_step([(131072, 1), (70_000, 1), (17, 1)], padding_rows=2)
    want = paged_attention_reference(**args, out=torch.full_like(args["q"], 7.0))
    got = paged_attention(**args, max_query_len=1, out=torch.full_like(args["q"], 7.0))
    assert torch.equal(got[3:], want[3:])
    assert _error(got[:3], want[:3]) < 1e-2
