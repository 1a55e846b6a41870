"""load_model: a checkpoint directory or hub id -> a ready GptOssForCausalLM, streamed onto the target device."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from gptoss_serve.model.checkpoint import CheckpointReader
from gptoss_serve.model.errors import CheckpointError
from gptoss_serve.model.experts import ExpertsFactory, ExpertShard
from gptoss_serve.model.hub import resolve_checkpoint
from gptoss_serve.model.packed_experts import Mxfp4Experts, expert_shard_class
from gptoss_serve.model.transformer import GptOssForCausalLM

# auto: the checkpoint's safetensors files; dummy: random weights of the config's shapes, made on the device
LoadFormat = Literal["auto", "dummy"]


def open_checkpoint(directory: Path, *, device: torch.device | str, load_format: LoadFormat = "auto") -> CheckpointReader:
    if load_format == "dummy":
        from gptoss_serve.model.synthetic import RandomCheckpoint

        return RandomCheckpoint(directory, device=device)
    if load_format != "auto":
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    return CheckpointReader(directory, device=device)


def load_model(path_or_hub_id: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *,
               experts_factory: ExpertsFactory | None = None, dequantize_experts: bool = False,
               bf16_expert_copy: bool = False, load_format: LoadFormat = "auto") -> GptOssForCausalLM:
    """Builds the model on the meta device, allocates it once on `device` and copies the tensors in one by one.

    dtype defaults to the checkpoint's (bf16 for gpt-oss). MXFP4 experts stay packed (Mxfp4Experts), unless
    `dequantize_experts` widens them to dtype at load; `bf16_expert_copy` keeps them packed and also holds a bf16
    copy for the GPU's many-token steps (Mxfp4Experts.keep_bf16_copy). With an `experts_factory` whose experts are
    not an ExpertShard, no expert weights are read at all. load_format "dummy" fills the weights with random values.
    """
    directory = resolve_checkpoint(path_or_hub_id)
    with open_checkpoint(directory, device=device, load_format=load_format) as reader:
        config = reader.config
        check_bf16_expert_copy(bf16_expert_copy, config, dequantize_experts=dequantize_experts)
        if experts_factory is None:
            shard_class = expert_shard_class(config, dequantize=dequantize_experts)
            experts_factory = lambda layer: shard_class(config)  # noqa: E731
        with torch.device("meta"):
            model = GptOssForCausalLM(config, experts_factory=experts_factory)
        model = model.to(dtype or getattr(torch, config.dtype)).to_empty(device=device)
        for module in model.modules():
            if hasattr(module, "init_buffers"):
                module.init_buffers()
        load_weights(model, reader)
    if bf16_expert_copy:
        keep_bf16_copies(model.model.layers[layer].mlp.experts for layer in range(config.num_hidden_layers))
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # what reading left cached goes back, so the KV cache can be sized from it
    return model.eval().requires_grad_(False)


def check_bf16_expert_copy(wanted: bool, config, *, dequantize_experts: bool) -> None:
    """A bf16 copy beside packed experts needs packed (MXFP4) experts: a clear error otherwise, before any loading."""
    if wanted and config.quantization != "mxfp4":
        raise ValueError("bf16_expert_copy keeps a bf16 copy beside MXFP4 experts, but this checkpoint's experts are "
                         "not MXFP4 (they are dense already)")
    if wanted and dequantize_experts:
        raise ValueError("bf16_expert_copy and dequantize_experts both widen the experts: dequantize_experts keeps only "
                         "the bf16 weights, bf16_expert_copy keeps the packed ones too; choose one")


def keep_bf16_copies(experts) -> None:
    """Each shard of packed experts in this process also keeps its bf16 copy (experts held elsewhere: nothing). On a
    GPU without the room for all of them, a clear error before any is made (120b's copy alone is 229 GB)."""
    shards = [shard for shard in experts if isinstance(shard, Mxfp4Experts)]
    if not shards:
        return
    device = shards[0].gate_up_blocks.device
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what loading left cached counts as free
        check_room_for_bf16_copies(shards, free_bytes=torch.cuda.mem_get_info(device)[0], device=device)
    for shard in shards:
        shard.keep_bf16_copy()


def check_room_for_bf16_copies(shards: list[Mxfp4Experts], *, free_bytes: int, device: torch.device) -> None:
    """A clear error where the shards' bf16 copies would not fit the device's free bytes."""
    needed = sum(shard.bf16_copy_bytes for shard in shards)
    if needed > free_bytes:
        raise ValueError(f"bf16_expert_copy needs {needed / 1e9:.1f} GB on {device} for the experts' bf16 copy, but "
                         f"{free_bytes / 1e9:.1f} GB are free: leave it off, or spread the experts over MoE workers")


def load_weights(model: GptOssForCausalLM, reader: CheckpointReader) -> None:
    """Checks the checkpoint holds exactly this model's tensors, then copies them in; experts load themselves."""
    dense = {name: p for name, p in model.named_parameters() if ".mlp.experts." not in name}
    local = {layer: block.mlp.experts for layer, block in enumerate(model.model.layers)
             if isinstance(block.mlp.experts, ExpertShard)}  # experts held elsewhere read nothing here
    expert_names = {n for layer in range(reader.config.num_hidden_layers)
                    for n in ExpertShard.checkpoint_names(reader, layer)}
    unexpected = sorted(reader.names() - dense.keys() - expert_names)
    if unexpected:
        raise CheckpointError(f"{reader.where(unexpected[0])}: unexpected tensor {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    wanted = set(dense).union(*(ExpertShard.checkpoint_names(reader, layer) for layer in local))
    missing = sorted(wanted - reader.names())
    if missing:
        raise CheckpointError(f"{reader.directory}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    with torch.no_grad():
        for name, param in dense.items():
            param.copy_(reader.read(name, dtype=param.dtype, expect=tuple(param.shape)))
    for layer, experts in local.items():
        experts.load_weights(reader, layer)
