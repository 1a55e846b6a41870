"""bench/kernel_sass.py on the CPU: the MoE kernels compile for sm_90 and their reduction loop is found and counted."""

from __future__ import annotations

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
