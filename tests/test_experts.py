"""Expert shards add up to the whole layer, which is what expert parallelism relies on."""

from __future__ import annotations

import torch

from gptoss_serve.model.experts import LocalExperts
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.checkpoint import CheckpointReader
from gptoss_serve.model.transformer import GptOssForCausalLM


def loaded_experts(path, layer, first, count):
    with CheckpointReader(path) as reader:
        return LocalExperts.from_checkpoint(reader, layer, first=first, count=count, dtype=torch.float32)


def test_shards_sum_to_the_full_layer(tiny_checkpoint):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 64, generator=gen)
    expert_ids = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(50)])
    weights = torch.softmax(torch.randn(50, 4, generator=gen), dim=-1)
    full = loaded_experts(tiny_checkpoint, 2, 0, 8)(hidden, expert_ids, weights)
    shards = sum(loaded_experts(tiny_checkpoint, 2, first, 2)(hidden, expert_ids, weights) for first in (0, 2, 4, 6))
    torch.testing.assert_close(shards, full, rtol=1e-5, atol=1e-6)


def test_injected_experts_see_every_routed_token(tiny_bf16):
    """A factory replaces the experts; the model never reads expert weights it does not hold."""
    calls = []
    local = load_model(tiny_bf16, dtype=torch.float32)

    class Recording:
        def __init__(self, layer):
            self.layer = layer

        def __call__(self, hidden, expert_ids, weights):
            calls.append((self.layer, hidden.shape[0], tuple(expert_ids.shape)))
            return local.model.layers[self.layer].mlp.experts(hidden, expert_ids, weights)

    remote = load_model(tiny_bf16, dtype=torch.float32, experts_factory=Recording)
    assert not any(".experts." in name for name, _ in remote.named_parameters())
    ids = torch.randint(0, 201088, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(remote(ids), local(ids), rtol=0, atol=0)
    assert calls == [(layer, 14, (14, 4)) for layer in range(4)]
    assert isinstance(remote, GptOssForCausalLM)


def test_grouped_path_matches_the_loop(tiny_checkpoint):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 64, generator=gen)
    expert_ids = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(37)])
    weights = torch.softmax(torch.randn(37, 4, generator=gen), dim=-1)
    for first, count in ((0, 8), (2, 3), (6, 2)):
        experts = loaded_experts(tiny_checkpoint, 1, first, count)
        torch.testing.assert_close(experts.forward_grouped(hidden, expert_ids, weights),
                                   experts.forward_loop(hidden, expert_ids, weights), rtol=1e-5, atol=1e-6)
    # a token none of whose experts are in the shard gets zeros
    empty = loaded_experts(tiny_checkpoint, 1, 0, 1).forward_grouped(hidden[:1], torch.tensor([[1, 2, 3, 4]]),
                                                                      weights[:1])
    assert torch.equal(empty, torch.zeros_like(empty))


def test_weights_names_every_parameter(tiny_bf16):
    with CheckpointReader(tiny_bf16) as reader:
        experts = LocalExperts(reader.config)
    assert tuple(name for name, _ in experts.named_parameters()) == LocalExperts.WEIGHTS


def test_a_shard_from_the_checkpoint_is_the_loaded_models_rows(tiny_checkpoint):
    """The MoE worker's path (from_checkpoint) and the loader's (load_weights inside the model) agree."""
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    full = model.model.layers[3].mlp.experts  # packed for the MXFP4 checkpoint, dense for the bf16 one
    with CheckpointReader(tiny_checkpoint) as reader:
        shard = type(full).from_checkpoint(reader, 3, first=2, count=3, dtype=torch.float32)
    assert (shard.first, shard.count) == (2, 3) and not any(p.requires_grad for p in shard.parameters())
    assert shard.dtype == torch.float32
    whole = full.state_dict()
    for name, tensor in shard.state_dict().items():
        assert tensor.dtype == whole[name].dtype and torch.equal(tensor, whole[name][2:5]), name


def test_checkpoint_names_follow_the_format(tiny_bf16, tiny_mxfp4):
    with CheckpointReader(tiny_bf16) as dense, CheckpointReader(tiny_mxfp4) as quantized:
        assert LocalExperts.checkpoint_names(dense, 1) == [
            f"model.layers.1.mlp.experts.{w}" for w in LocalExperts.WEIGHTS]
        names = LocalExperts.checkpoint_names(quantized, 1)
        assert "model.layers.1.mlp.experts.down_proj_blocks" in names and len(names) == 6
        assert set(names) <= quantized.names()
