"""MXFP4 experts kept packed: what the loader and the MoE worker hold, the PyTorch reference they compute with on
the CPU, random weights made at load (load_format dummy), and on a GPU the Triton kernels inside the model."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.cluster.expert_parallel.moe_worker import MoEWorker
from gptoss_serve.model.errors import CheckpointError
from gptoss_serve.model.experts import LocalExperts
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.packed_experts import Mxfp4Experts
from gptoss_serve.model.checkpoint import CheckpointReader
from gptoss_serve.model.synthetic import RandomCheckpoint, preset_config, write_config


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def routed_inputs(num_tokens: int, *, seed: int, hidden: int = 64, experts: int = 8, top_k: int = 4):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(num_tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    return (torch.randn(num_tokens, hidden, generator=gen), ids,
            torch.softmax(torch.randn(num_tokens, top_k, generator=gen), dim=-1))


def test_mxfp4_checkpoint_loads_packed_and_quarter_size(tiny_mxfp4):
    packed = load_model(tiny_mxfp4)
    dense = load_model(tiny_mxfp4, dequantize_experts=True)
    experts = packed.model.layers[0].mlp.experts
    assert isinstance(experts, Mxfp4Experts) and isinstance(dense.model.layers[0].mlp.experts, LocalExperts)
    assert not any(".experts." in name for name, _ in packed.named_parameters())
    assert experts.gate_up_blocks.dtype == torch.uint8 and experts.down_scales.dtype == torch.uint8
    assert experts.dtype == torch.bfloat16  # the biases follow the model's dtype

    def expert_bytes(model):
        tensors = [*model.named_parameters(), *model.named_buffers()]
        return sum(t.numel() * t.element_size() for name, t in tensors if ".experts." in name)

    # 4.25 bits a value against 16, plus biases
    assert 0.25 < expert_bytes(packed) / expert_bytes(dense) < 0.3


def test_bf16_checkpoint_keeps_dense_experts(tiny_bf16):
    assert isinstance(load_model(tiny_bf16).model.layers[0].mlp.experts, LocalExperts)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_packed_logits_match_dequantized(tiny_mxfp4, dtype, tolerance):
    """The same function as experts widened at load, over prompts longer than the sliding window (32)."""
    ids = torch.randint(0, 201088, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = load_model(tiny_mxfp4, dtype=dtype)(ids)
        dense = load_model(tiny_mxfp4, dtype=dtype, dequantize_experts=True)(ids)
    assert relative_error(packed, dense) < tolerance


def test_packed_shards_add_up_and_match_dense(tiny_mxfp4):
    hidden, ids, weights = routed_inputs(41, seed=3)
    with CheckpointReader(tiny_mxfp4) as reader:
        whole = Mxfp4Experts.from_checkpoint(reader, 1, dtype=torch.float32)
        shards = [Mxfp4Experts.from_checkpoint(reader, 1, first=f, count=c, dtype=torch.float32)
                  for f, c in ((0, 3), (3, 5))]
        dense = LocalExperts.from_checkpoint(reader, 1, dtype=torch.float32)
    full = whole(hidden, ids, weights)
    assert full.dtype == torch.float32
    torch.testing.assert_close(sum(s(hidden, ids, weights) for s in shards), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, dense(hidden, ids, weights), rtol=1e-5, atol=1e-6)
    # a token whose experts all lie outside a shard gets zeros from it
    assert torch.equal(shards[0](hidden[:1], torch.tensor([[4, 5, 6, 7]]), weights[:1]), torch.zeros(1, 64))


def test_moe_worker_holds_packed_shards(tiny_mxfp4):
    hidden, ids, weights = routed_inputs(9, seed=4)
    workers = [MoEWorker(str(tiny_mxfp4), index=i, num_workers=2) for i in range(2)]
    assert all(isinstance(e, Mxfp4Experts) for w in workers for e in w.experts)
    assert [w.shard() for w in workers] == [(0, 4), (4, 4)]
    model = load_model(tiny_mxfp4, dtype=torch.float32)
    expected = model.model.layers[2].mlp.experts(hidden, ids, weights)
    got = sum(w.experts[2](hidden, ids, weights) for w in workers)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    widened = MoEWorker(str(tiny_mxfp4), index=0, num_workers=1, dequantize_experts=True)
    assert isinstance(widened.experts[0], LocalExperts)


def test_a_bf16_copy_beside_the_packed_experts(tiny_mxfp4):
    """bf16_expert_copy: every layer's experts keep their packed buffers and also hold the checkpoint's values
    widened to bf16 (mxfp4.dequantize's, exactly), outside the state dict; the model computes the same logits (the
    copy is for the GPU's many-token steps), and the copy moves with the module."""
    from gptoss_serve.model import mxfp4

    plain, copied = load_model(tiny_mxfp4), load_model(tiny_mxfp4, bf16_expert_copy=True)
    assert set(copied.state_dict()) == set(plain.state_dict())
    for layer in copied.model.layers:
        experts = layer.mlp.experts
        assert experts.gate_up_widened.dtype == experts.down_widened.dtype == torch.bfloat16
        assert torch.equal(experts.gate_up_widened, mxfp4.dequantize(experts.gate_up_blocks, experts.gate_up_scales))
        assert torch.equal(experts.down_widened, mxfp4.dequantize(experts.down_blocks, experts.down_scales))
        assert set(experts.packed_tensors()) == set(Mxfp4Experts.PACKED)
    assert plain.model.layers[0].mlp.experts.gate_up_widened is None
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(copied(tokens), plain(tokens))
    assert copied.float().model.layers[1].mlp.experts.down_widened.dtype == torch.float32  # a buffer: it moves
    workers = MoEWorker(str(tiny_mxfp4), index=1, num_workers=2, bf16_expert_copy=True)
    assert all(e.gate_up_widened.shape == (4, 128, 64) for e in workers.experts)  # its shard's 4 experts


def test_a_bf16_copy_is_two_bytes_a_value_and_must_fit_the_gpu(tiny_mxfp4):
    """20b's copy is 38.2 GB; one that cannot fit the GPU's free memory is refused before any copy is made, naming
    the option and the sizes (the check the loader makes with the GPU's free bytes, given them here)."""
    from gptoss_serve.model import loader

    with torch.device("meta"):
        experts = Mxfp4Experts(preset_config("20b"))
    assert experts.bf16_copy_bytes * 24 == 24 * 32 * (5760 * 2880 + 2880 * 2880) * 2
    shards = [layer.mlp.experts for layer in load_model(tiny_mxfp4).model.layers]
    needed = sum(shard.bf16_copy_bytes for shard in shards)
    loader.check_room_for_bf16_copies(shards, free_bytes=needed, device=torch.device("cuda"))
    with pytest.raises(ValueError, match="bf16_expert_copy needs 0.0 GB on cuda for .* but 0.0 GB are free"):
        loader.check_room_for_bf16_copies(shards, free_bytes=needed - 1, device=torch.device("cuda"))


def test_a_bf16_copy_needs_packed_experts(tiny_bf16, tiny_mxfp4):
    from gptoss_serve.deployments.args import AppArgs

    with pytest.raises(ValueError, match="not MXFP4"):
        load_model(tiny_bf16, bf16_expert_copy=True)
    with pytest.raises(ValueError, match="choose one"):
        load_model(tiny_mxfp4, bf16_expert_copy=True, dequantize_experts=True)
    with pytest.raises(ValueError, match="choose one"):
        MoEWorker(str(tiny_mxfp4), index=0, num_workers=1, bf16_expert_copy=True, dequantize_experts=True)
    with pytest.raises(ValueError, match="choose one"):
        AppArgs(bf16_expert_copy=True, dequantize_experts=True)
    assert AppArgs(bf16_expert_copy=True).bf16_expert_copy


def test_read_packed_needs_an_mxfp4_weight(tiny_bf16, tiny_mxfp4):
    with CheckpointReader(tiny_bf16) as reader, pytest.raises(CheckpointError, match="not stored as MXFP4"):
        reader.read_packed("model.layers.0.mlp.experts.down_proj", expect=(8, 64, 64))
    with CheckpointReader(tiny_mxfp4) as reader, pytest.raises(CheckpointError, match="has shape"):
        reader.read_packed("model.layers.0.mlp.experts.down_proj", expect=(8, 64, 32))


# -------------------------------------------------------------------------------- random weights (load_format dummy)


def test_dummy_load_is_the_written_checkpoint_on_the_cpu(tmp_path, tiny_mxfp4):
    """Made on the CPU, the random weights are exactly what write_checkpoint writes for the seed (1 in conftest,
    0 here: so compare against a config-only copy read at seed 1)."""
    config_only = write_config(tmp_path / "cfg", preset_config("tiny", mxfp4_experts=True))
    assert sorted(p.name for p in config_only.iterdir()) == ["config.json", "generation_config.json"]
    with RandomCheckpoint(config_only, seed=1) as random, CheckpointReader(tiny_mxfp4) as written:
        assert random.names() == written.names()
        for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.sinks"):
            assert torch.equal(random.read(name), written.read(name)), name
        shape = (3, 64, 128)
        for got, expected in zip(random.read_packed("model.layers.1.mlp.experts.gate_up_proj", rows=slice(2, 5),
                                                    expect=shape),
                                 written.read_packed("model.layers.1.mlp.experts.gate_up_proj", rows=slice(2, 5),
                                                     expect=shape)):
            assert torch.equal(got, expected)
    model = load_model(config_only, load_format="dummy", dtype=torch.float32)
    ids = torch.randint(0, 201088, (1, 20))
    with torch.no_grad():
        logits = model(ids)
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_dummy_load_errors_name_the_problem(tmp_path):
    write_config(tmp_path / "cfg", preset_config("tiny"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path / "cfg")  # load_format auto needs the weights
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path, load_format="dummy")
    with pytest.raises(ValueError, match="load_format must be"):
        load_model(tmp_path / "cfg", load_format="safetensors")


def test_app_args_take_the_load_options():
    from gptoss_serve.deployments.args import AppArgs

    args = AppArgs(load_format="dummy", dequantize_experts=True)
    assert (args.load_format, args.dequantize_experts) == ("dummy", True)
    with pytest.raises(ValueError, match="load_format"):
        AppArgs(load_format="pt")


# -------------------------------------------------------------------------------------------------------- GPU tests


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 7, 130])
def test_kernel_in_the_layer_matches_its_reference(tiny_mxfp4, num_tokens):
    """On the GPU in bf16 the layer runs the Triton kernels; in float32 the PyTorch reference: they agree."""
    with CheckpointReader(tiny_mxfp4, device="cuda") as reader:
        experts = Mxfp4Experts.from_checkpoint(reader, 0, first=2, count=5, dtype=torch.bfloat16)
    hidden, ids, weights = (t.cuda() for t in routed_inputs(num_tokens, seed=num_tokens))
    got = experts(hidden.bfloat16(), ids, weights)
    reference = experts.float()(hidden, ids, weights)  # .float(): the biases widen; blocks and scales stay packed
    assert got.dtype == torch.bfloat16 and experts.gate_up_blocks.dtype == torch.uint8
    assert relative_error(got.float(), reference) < 1e-2


@pytest.mark.gpu
def test_expert_layers_never_wait_for_the_host(tiny_mxfp4, tiny_bf16):
    """Packed (Triton) and dense (grouped GEMM) expert layers run with CUDA's sync debug mode set to error."""
    hidden, ids, weights = (t.cuda() for t in routed_inputs(33, seed=5))
    for path in (tiny_mxfp4, tiny_bf16):
        experts = load_model(path, device="cuda").model.layers[1].mlp.experts
        experts(hidden.bfloat16(), ids, weights)  # compile first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = experts(hidden.bfloat16(), ids, weights)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("bf16_expert_copy", [False, True])
def test_gpu_logits_agree_with_the_float32_cpu_reference(tiny_mxfp4, bf16_expert_copy):
    """bf16 activations and the packed kernels on the GPU against the float32 PyTorch path on the CPU: no further
    from it than bf16 with dense experts on the CPU is (on this random 64-wide model bf16 alone costs about 4% of
    the logits and flips about 8% of top-1 choices, whose margins are small). With a bf16 copy of the experts the
    400 positions' 200 pairs an expert take the widened path."""
    from gptoss_serve.bench.logit_agreement import agreement

    ids = torch.randint(0, 201088, (4, 100), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = load_model(tiny_mxfp4, dtype=torch.float32)(ids)
        model = load_model(tiny_mxfp4, device="cuda", bf16_expert_copy=bf16_expert_copy)
        gpu = agreement(model(ids.cuda()).cpu(), reference)
        cpu_bf16 = agreement(load_model(tiny_mxfp4, dequantize_experts=True)(ids), reference)
    print(f"GPU packed bf16: {gpu}; CPU dense bf16: {cpu_bf16}")
    assert gpu["relative_error"] < 1.25 * cpu_bf16["relative_error"]
    assert gpu["top1_agreement"] >= cpu_bf16["top1_agreement"] - 0.03


def test_logit_agreement_can_hand_the_experts_a_few_positions_a_call(tiny_mxfp4, monkeypatch):
    """bench.logit_agreement --expert-tokens: the experts see N positions a call (the kernels a decode step picks),
    the logits stay those of one call for all, and the model is left as it was."""
    from gptoss_serve.bench.logit_agreement import experts_in_chunks

    model = load_model(tiny_mxfp4, dtype=torch.float32)
    ids = torch.randint(0, 201088, (2, 7), generator=torch.Generator().manual_seed(8))
    experts, sizes = model.model.layers[0].mlp.experts, []
    forward = type(experts).forward

    def counted(self, hidden, expert_ids, weights):
        if self is experts:
            sizes.append(hidden.shape[0])
        return forward(self, hidden, expert_ids, weights)

    monkeypatch.setattr(type(experts), "forward", counted)
    with torch.no_grad():
        whole = model(ids)
        with experts_in_chunks(model, 3):
            chunked = model(ids)
        again = model(ids)
    assert sizes == [14, 3, 3, 3, 3, 2, 14]  # all at once, then in threes (and a two) inside, all at once after
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, whole) and "forward" not in vars(experts)


def test_the_warm_up_calls_the_experts_as_the_model_does(tiny_mxfp4):
    """Same dtypes as the router's output for bf16 activations (a float32-weights call compiles a variant the model
    never uses and leaves the model's to its first prompt), every token count of the tile switches, and it runs."""
    model = load_model(tiny_mxfp4)
    layer = model.model.layers[0].mlp
    experts = layer.experts
    hidden = torch.randn(5, model.config.hidden_size, dtype=torch.bfloat16)
    ids, weights = layer.router(hidden)
    calls = experts.warm_up_calls(64, model.config.num_experts_per_tok)
    assert [c[0].shape[0] for c in calls] == sorted({c[0].shape[0] for c in calls}) and calls[-1][0].shape[0] == 64
    for h, i, w in calls:
        assert (h.dtype, i.dtype, w.dtype) == (hidden.dtype, ids.dtype, weights.dtype)
        assert i.shape == w.shape == (h.shape[0], model.config.num_experts_per_tok)
        assert experts(h, i, w).shape == h.shape
