from __future__ import annotations

import pytest
import torch

from gptoss_serve.model import mxfp4


def naive_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Value by value, straight from the format's definition."""
    rows, groups, _ = blocks.shape
    out = torch.empty(rows, groups * 32)
    for r in range(rows):
        for g in range(groups):
            for i in range(16):
                byte = int(blocks[r, g, i])
                for half, code in enumerate((byte & 0xF, byte >> 4)):
                    out[r, g * 32 + 2 * i + half] = mxfp4.FP4_VALUES[code] * 2.0 ** (int(scales[r, g]) - 127)
    return out


def test_dequantize_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 2), generator=gen, dtype=torch.uint8)
    expected = naive_dequantize(blocks, scales)
    assert torch.equal(mxfp4.dequantize(blocks, scales, dtype=torch.float32), expected)
    assert torch.equal(mxfp4.dequantize(blocks, scales, dtype=torch.bfloat16).float(), expected)  # exact in bf16


def test_low_nibble_comes_first():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 -> 1.0, high nibble 7 -> 6.0
    values = mxfp4.dequantize(blocks, torch.full((1, 1), 127, dtype=torch.uint8), dtype=torch.float32)
    assert values[0, :2].tolist() == [1.0, 6.0]


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 96)])
def test_quantize_round_trips_representable_values(shape):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, shape, generator=gen)
    values = torch.tensor(mxfp4.FP4_VALUES)[codes] * 2.0**-6
    values[..., ::32] = 6.0 * 2.0**-6  # pin each block's max so the chosen scale is exactly 2**-6
    blocks, scales = mxfp4.quantize(values)
    assert blocks.shape == (*shape[:-1], shape[-1] // 32, 16) and scales.shape == (*shape[:-1], shape[-1] // 32)
    assert torch.equal(mxfp4.dequantize(blocks, scales, dtype=torch.float32), values)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="uint8"):
        mxfp4.dequantize(torch.zeros(1, 1, 16), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(torch.zeros(1, 2, 16, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(4, 33))
