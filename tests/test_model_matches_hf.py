"""Our logits against transformers' GptOssForCausalLM on the same random checkpoint (the reference)."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.model.loader import load_model


def hf_model(path, quantized: bool):
    transformers = pytest.importorskip("transformers")
    extra = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if quantized else {}
    return transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **extra).eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("batch, length", [(2, 80), (3, 101)])  # the tiny preset's window is 32
def test_float32_logits_match_transformers(tiny_checkpoint, batch, length):
    ours = load_model(tiny_checkpoint, dtype=torch.float32)
    reference = hf_model(tiny_checkpoint, quantized=ours.config.quantization == "mxfp4")
    assert length > 2 * ours.config.sliding_window
    ids = torch.randint(0, ours.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = reference(ids).logits.float()
        got = ours(ids)
    assert got.shape == (batch, length, ours.config.vocab_size) and got.dtype == torch.float32
    assert relative_error(got, expected) < 1e-5


def test_mxfp4_and_bf16_checkpoints_differ_only_in_experts(tiny_bf16, tiny_mxfp4):
    """Guards the MXFP4 comparison: it must exercise decoded blocks, not fall back to some shared weights."""
    dense = load_model(tiny_bf16, dtype=torch.float32)
    quantized = load_model(tiny_mxfp4, dtype=torch.float32, dequantize_experts=True)
    for (name, a), (_, b) in zip(dense.named_parameters(), quantized.named_parameters(), strict=True):
        assert torch.equal(a, b) != (".mlp.experts." in name and name.endswith("_proj")), name


def test_bf16_model_stays_close_to_float32(tiny_bf16):
    ids = torch.randint(0, 201088, (2, 40), generator=torch.Generator().manual_seed(0))
    full = load_model(tiny_bf16, dtype=torch.float32)
    half = load_model(tiny_bf16)  # the checkpoint's dtype
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        assert relative_error(half(ids), full(ids)) < 5e-2
