"""The same checks on a CUDA device (skipped without one): logits against transformers, the engine's greedy
output against no-cache forward passes."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.gpu


def test_logits_match_the_reference_on_gpu(tiny_checkpoint):
    """bf16 checkpoints against transformers; MXFP4 ones against our own CPU logits, which the CPU suite holds
    to transformers' dequantized load (with CUDA present, transformers keeps MXFP4 experts quantized and runs
    other kernels, so it is no dequantized reference there)."""
    transformers = pytest.importorskip("transformers")
    ours = load_model(tiny_checkpoint, device="cuda", dtype=torch.float32)
    if ours.config.quantization:
        reference = load_model(tiny_checkpoint, dtype=torch.float32)
    else:
        reference = transformers.GptOssForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    ids = torch.randint(0, 201088, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids)
        expected = (expected.logits if hasattr(expected, "logits") else expected).float()
        error = ((ours(ids.cuda()).cpu() - expected).norm() / expected.norm()).item()
    assert error < 1e-5, error


def test_engine_greedy_on_gpu(tiny_mxfp4):
    model = load_model(tiny_mxfp4, device="cuda", dtype=torch.float32)
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=64, max_model_len=256,
                                                             max_num_batched_tokens=40))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200_000, (n,), generator=gen).tolist() for n in (7, 50, 90)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(40):
                ids.append(int(model(torch.tensor([ids], device="cuda"))[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt):]
    assert engine.is_idle()


def test_grouped_experts_match_the_loop_in_bf16(tiny_bf16):
    model = load_model(tiny_bf16, device="cuda")  # bf16: the grouped path on Hopper
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    expert_ids = torch.stack([torch.randperm(8, device="cuda")[:4] for _ in range(300)])
    weights = torch.softmax(torch.randn(300, 4, device="cuda"), dim=-1)
    torch.testing.assert_close(experts.forward_grouped(hidden, expert_ids, weights),
                               experts.forward_loop(hidden, expert_ids, weights), rtol=2e-2, atol=2e-2)
