"""bench/kernel_sass.py on the CPU: the MoE kernels compile for sm_90 and their reduction loop is found and counted."""

from __future__ import annotations

import re

import pytest


def test_the_decode_loop_is_found_and_counted():
    pytest.importorskip("triton")
    from gptoss_serve.bench.kernel_sass import loop_figures

    figures = loop_figures("decode", "gate_up")
    mix = figures["mix"]
    # the loop holds the matrix products (wgmma or mma.sync) and the weight loads, and only a loop's worth of them
    assert mix["HGMMA"] + mix["HMMA"] > 0 and mix["LDG"] > 0
    assert figures["values_per_step"] == 2 * 64 * 2 * 32  # gate and up rows x two 32-value blocks
    assert 1 < figures["per_value"] < 20


def test_the_matrix_vector_loop_is_found_and_counted():
    pytest.importorskip("triton")
    from gptoss_serve.bench.kernel_sass import loop_figures
    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    tiles = PRESETS["gemv"]
    figures = loop_figures("gemv", "gate_up")
    mix = figures["mix"]
    # CUDA cores only: float multiply-adds on the decoded values, no matrix instruction
    assert mix["FFMA"] > 0 and mix["LDG"] > 0 and mix["HGMMA"] + mix["HMMA"] == 0
    assert figures["values_per_step"] == 2 * tiles.gate_up_n * tiles.gate_up_groups * 32
    assert 1 < figures["per_value"] < 20
    assert loop_figures("gemv", "down")["values_per_step"] == tiles.down_n * tiles.down_groups * 32


def test_fp16_pair_products_take_fewer_instructions_a_value():
    """gemv_h2's reason to exist: its loop costs clearly fewer instructions a value than gemv's (two products an
    instruction, one float32 conversion a block), for both kernels."""
    pytest.importorskip("triton")
    from gptoss_serve.bench.kernel_sass import loop_figures

    for which in ("gate_up", "down"):
        half2, plain = loop_figures("gemv_h2", which), loop_figures("gemv", which)
        assert half2["mix"]["HFMA2"] > 0 and half2["values_per_step"] == plain["values_per_step"]
        assert half2["per_value"] < 0.8 * plain["per_value"], (which, half2["per_value"], plain["per_value"])


def test_the_widened_experts_kernels_compile_and_store_16_bytes_at_a_time():
    """The widened path's three kernels (which the interpreter runs without compiling) compile for sm_90, and with
    rows a multiple of 16 long (gpt-oss's 2,880) each thread stores 16 bytes an instruction."""
    pytest.importorskip("triton")
    from gptoss_serve.bench.kernel_sass import compile_for_sm90, disassemble
    from gptoss_serve.kernels.mxfp4_moe_widened import _bias_swiglu, _scatter_rows, _widen

    cases = ((_widen, dict(BLOCKS=64), dict(out_ptr="*bf16"), ()),
             (_bias_swiglu, dict(ROWS=16, BLOCK=256), dict(gate_up_ptr="*bf16", bias_ptr="*fp32", key_ptr="*i64"),
              ("inter",)),
             (_scatter_rows, dict(ROWS=16, BLOCK=256), dict(out_ptr="*bf16", bias_ptr="*fp32", key_ptr="*i64",
                                                            order_ptr="*i64", route_ptr="*bf16", y_ptr="*bf16"),
              ("hidden",)))
    for kernel, constants, pointers, aligned in cases:
        sass = disassemble(compile_for_sm90(kernel, constants, 4, pointers, aligned).asm["cubin"])
        stores = set(re.findall(r"\bSTG[.\w]*", sass))
        assert stores == {"STG.E.128"}, (kernel.fn.__name__, stores)


def test_the_prefetching_presets_prefetch_inside_the_loop():
    """decode_wide_prefetch's kernels keep their line prefetches (inline PTX nothing reads) in the reduction loop,
    for each weight row it reads (gate and up rows in gate_up), and the loop is otherwise decode_wide's."""
    pytest.importorskip("triton")
    from gptoss_serve.bench.kernel_sass import loop_figures

    for which in ("gate_up", "down"):
        fetching, plain = loop_figures("decode_wide_prefetch", which), loop_figures("decode_wide", which)
        assert fetching["mix"]["CCTL"] > 0 and plain["mix"]["CCTL"] == 0
        assert fetching["mix"]["HGMMA"] + fetching["mix"]["HMMA"] == plain["mix"]["HGMMA"] + plain["mix"]["HMMA"]
        assert fetching["per_value"] < 1.15 * plain["per_value"], (which, fetching["per_value"], plain["per_value"])


def test_the_matrix_vector_kernels_ask_for_their_tile_once_before_the_loop():
    """gemv_h2_prefetch: one bulk prefetch of the row tile's blocks and one of its exponents, uniform (issued once a
    warp), none in the loop, whose length stays gemv_h2's (within ptxas's scheduling noise)."""
    pytest.importorskip("triton")
    from gptoss_serve.bench.kernel_sass import loop_figures

    for which in ("gate_up", "down"):
        fetching, plain = loop_figures("gemv_h2_prefetch", which), loop_figures("gemv_h2", which)
        assert fetching["sass"].count("UBLKPF.L2") == 2 and "UBLKPF" not in plain["sass"]
        assert fetching["mix"]["UBLKPF"] == 0
        assert abs(fetching["loop_instructions"] - plain["loop_instructions"]) < 0.1 * plain["loop_instructions"]


def test_gate_up_can_ask_for_the_down_rows_once_done():
    """prefetch_down: the matrix-vector gate_up issues two more bulk prefetches (down's blocks and exponents), after
    its loop."""
    pytest.importorskip("triton")
    from dataclasses import replace

    from gptoss_serve.bench.kernel_sass import loop_figures
    from gptoss_serve.kernels import mxfp4_moe

    mxfp4_moe.PRESETS["_test_down_prefetch"] = replace(mxfp4_moe.PRESETS["gemv_h2_prefetch"], prefetch_down=True)
    try:
        figures = loop_figures("_test_down_prefetch", "gate_up")
    finally:
        del mxfp4_moe.PRESETS["_test_down_prefetch"]
    assert figures["sass"].count("UBLKPF.L2") == 4 and figures["mix"]["UBLKPF"] == 0
