"""bench/moe_kernel.py's byte counts on the CPU (the timings need a GPU): the figures its GB/s are computed from."""

from __future__ import annotations

import pytest

from gptoss_serve.bench.moe_kernel import layer_bytes, layer_flops, main
from gptoss_serve.model.synthetic import preset_config


@pytest.mark.parametrize("preset", ["20b", "120b"])
def test_a_layer_at_one_token_moves_its_four_experts(preset):
    config = preset_config(preset)
    mxfp4, bf16 = layer_bytes(1, 4, config)
    # an expert: gate_up [5760, 2880] and down [2880, 2880] values at half a byte, one exponent byte a 32-value block,
    # float32 biases; 20b and 120b experts have the same shape, only their number differs
    expert = 3 * 2880 * 2880 // 2 + 3 * 2880 * 2880 // 32 + 3 * 2880 * 4
    activations = 2880 * 2 * 2 + 4 * (8 + 2)
    assert mxfp4 == 4 * expert + activations
    assert bf16 == 4 * (3 * 2880 * 2880 + 3 * 2880) * 2 + activations
    assert 52e6 < mxfp4 < 54e6 and 3.7 < bf16 / mxfp4 < 3.8


def test_the_preset_is_checked_before_any_gpu_work():
    with pytest.raises(SystemExit):
        main(["--preset", "70b"])


def test_a_token_costs_its_four_experts_matrix_products():
    # gate_up (2,880 x 5,760) and down (2,880 x 2,880), a multiply and an add each, for each of 4 experts
    assert layer_flops(1, preset_config("20b")) == 2 * 4 * (2880 * 5760 + 2880 * 2880) == 199_065_600
    assert layer_flops(8192, preset_config("120b")) == 8192 * layer_flops(1, preset_config("20b"))


def test_prefetch_variants_are_the_pick_with_each_window():
    pytest.importorskip("triton")
    from gptoss_serve.bench.moe_kernel import prefetch_variants
    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    variants = prefetch_variants(PRESETS["decode_wide"].__dict__)
    assert variants["as picked"] == (PRESETS["decode_wide"], True)
    assert variants["256 B lines"][0] == PRESETS["decode_wide_prefetch"]
    assert {(t.prefetch, t.prefetch_bulk) for t, _ in variants.values()} == \
        {(0, False)} | {(w, b) for w in (128, 256, 512) for b in (False, True)}
    # the matrix-vector kernels ask for each program's whole row tile; the scaled-dot and widened paths, nothing
    assert set(prefetch_variants(PRESETS["gemv_h2"].__dict__)) == {"as picked", "whole tile", "whole tile + down's",
                                                                   "down's only"}
    assert all(prefetch_variants(PRESETS[name].__dict__) == {} for name in ("scaled_decode", "widened"))
