"""kernels/weight_stream.py (the access-pattern instrument behind bench/weight_stream.py) against its reference: in
Triton's CPU interpreter for the indexing and masks of both layouts, compiled for sm_90 for the L2 prefetches
(which the interpreter cannot run), and on the GPU with every variant the bench times."""

from __future__ import annotations

import textwrap

import pytest
import torch

from gptoss_serve.kernels.weight_stream_reference import stream_checksums_reference
from tests.interpreter import assert_runs_in_interpreter


def test_the_reference_xors_each_row_tile():
    words = torch.zeros(2, 5, 2, 4, dtype=torch.int32)
    words[0, 1, 1, 3] = 6
    words[0, 2, 0, 0] = 3
    words[1, 4, 1, 2] = -1
    # tiles of 2 rows: expert 0 rows 0-1, 2-3, 4; expert 1 the same
    assert stream_checksums_reference(words, 2).tolist() == [6, 3, 0, 0, 0, -1]


def test_both_layouts_read_every_word_once_in_the_interpreter():
    """Partial row tiles (48 rows in tiles of 32) and partial steps (10 blocks a row, 8 a step), fewer persistent
    programs than tiles; the tiled layout must give the checkpoint layout's checksums."""
    assert_runs_in_interpreter(textwrap.dedent("""
        import torch
        from gptoss_serve.kernels.weight_stream import stream_checksums, tile_rows
        from gptoss_serve.kernels.weight_stream_reference import stream_checksums_reference
        g = torch.Generator().manual_seed(0)
        words = torch.randint(-2**31, 2**31 - 1, (3, 48, 10, 4), generator=g, dtype=torch.int64).to(torch.int32)
        for rows, groups in ((16, 2), (32, 4), (16, 8)):
            want = stream_checksums_reference(words, rows)
            assert torch.equal(stream_checksums(words, block_rows=rows, groups=groups, programs=4), want)
            got = stream_checksums(tile_rows(words), block_rows=rows, groups=groups, tiled=True, programs=5)
            assert torch.equal(got, want), (rows, groups)
        tiled = tile_rows(words)
        assert tiled.shape == (3, 3, 5, 16, 2, 4) and torch.equal(tiled[1, 2, 3, 5, 1], words[1, 2 * 16 + 5, 3 * 2 + 1])
        for bad in ((1, 40, 10, 4), (1, 48, 9, 4)):
            try:
                tile_rows(torch.zeros(bad, dtype=torch.int32))
            except ValueError as e:
                assert "multiple of" in str(e)
            else:
                raise AssertionError(bad)
        try:
            stream_checksums(words, block_rows=16, groups=2, prefetch_bytes=200)
        except ValueError as e:
            assert "prefetch_bytes 200" in str(e)
        else:
            raise AssertionError("an unaligned prefetch window was taken")
        print("ok")
    """))


@pytest.mark.parametrize("bulk, instruction", [(True, "UBLKPF.L2"), (False, "CCTL.E.PF2")])
def test_the_prefetches_compile_for_sm90(bulk, instruction):
    """The prefetch is inline PTX the interpreter skips: compiled for an H100, it must survive (nothing uses its
    result) as the L2 prefetch instruction, before the loop and inside it."""
    pytest.importorskip("triton")
    from gptoss_serve.bench.kernel_sass import compile_for_sm90, disassemble, largest_loop
    from gptoss_serve.kernels.weight_stream import _stream

    kernel = compile_for_sm90(_stream, dict(BLOCK_R=128, GROUPS=2, TILED=False, PREFETCH=True, WINDOW=256, BULK=bulk),
                              4, pointers=dict(w_ptr="*i32", out_ptr="*i32"), multiples_of_16=("n_rows",))
    sass = disassemble(kernel.asm["cubin"])
    assert instruction in sass
    assert any(op.startswith(instruction.split(".")[0]) for op in largest_loop(sass)) or \
        sass.count(instruction) >= 3  # ptxas may put the loop's prefetch in a branch of its own


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("spec", [
    dict(block_rows=128, groups=2), dict(block_rows=64, groups=8), dict(block_rows=128, groups=2, tiled=True),
    dict(block_rows=64, groups=4, tiled=True), dict(block_rows=128, groups=2, prefetch_bytes=256),
    dict(block_rows=128, groups=2, prefetch_bytes=512, bulk=False)])
@pytest.mark.parametrize("programs", [None, 7])
def test_every_variant_reads_the_weights_on_the_gpu(spec, programs):
    from gptoss_serve.kernels.weight_stream import stream_checksums, tile_rows

    gen = torch.Generator(device="cuda").manual_seed(1)
    words = torch.randint(-2**31, 2**31 - 1, (3, 5760, 90, 4), generator=gen, device="cuda",
                          dtype=torch.int64).to(torch.int32)
    source = tile_rows(words) if spec.get("tiled") else words
    got = stream_checksums(source, programs=programs, **spec)
    assert torch.equal(got.cpu(), stream_checksums_reference(words, spec["block_rows"]))


def test_the_bench_checks_its_arguments_before_any_gpu_work():
    from gptoss_serve.bench.weight_stream import main

    with pytest.raises(SystemExit):
        main(["--experts", "0"])
