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


def test_stored_layout_is_transposed_blocks_and_scales():
    layout = mxfp4.stored_layout("w", (4, 64, 96))  # [E, in, out]
    assert layout == {"w_blocks": ((4, 96, 2, 16), torch.uint8), "w_scales": ((4, 96, 2), torch.uint8)}
    assert tuple(layout) == mxfp4.tensor_names("w")
    assert all(mxfp4.is_part(n) for n in layout) and not mxfp4.is_part("w")
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.stored_layout("w", (4, 48, 96))


def test_read_dense_decodes_what_quantize_stored():
    """A weight quantized in the stored layout ([E, out, in]) reads back dense in transformers' ([E, in, out])."""
    dense = torch.randn(3, 64, 40, generator=torch.Generator().manual_seed(2))  # [E, in, out]
    blocks, scales = mxfp4.quantize(dense.transpose(-1, -2))  # [E, out, in / 32, 16], [E, out, in / 32]
    stored, asked = {"w_blocks": blocks, "w_scales": scales}, []

    def read(name, *, expect, expect_dtype):
        asked.append((name, expect, expect_dtype))
        return stored[name]

    got = mxfp4.read_dense(read, "w", (3, 64, 40), dtype=torch.float32)
    assert asked == [(n, shape, dtype) for n, (shape, dtype) in mxfp4.stored_layout("w", (3, 64, 40)).items()]
    expected = mxfp4.dequantize(blocks, scales, dtype=torch.float32).transpose(-1, -2)
    assert got.shape == (3, 64, 40) and got.is_contiguous() and torch.equal(got, expected)
    assert (got - dense).norm() / dense.norm() < 0.2  # FP4 keeps about one significant bit and a half


def test_random_parts_give_weights_of_the_dense_scale():
    gen = torch.Generator().manual_seed(3)
    (blocks_name, (blocks_shape, _)), (scales_name, (scales_shape, _)) = mxfp4.stored_layout(
        "w", (2, 2048, 64)).items()
    blocks = mxfp4.random_part(blocks_name, blocks_shape, gen)
    scales = mxfp4.random_part(scales_name, scales_shape, gen)
    assert blocks.dtype == scales.dtype == torch.uint8
    std = mxfp4.dequantize(blocks, scales, dtype=torch.float32).std().item()
    assert 0.5 < std * 2048**0.5 < 2
    with pytest.raises(ValueError, match="neither"):
        mxfp4.random_part("w", (2, 2), gen)
