"""load_model: a checkpoint directory or hub id -> a ready GptOssForCausalLM, streamed onto the target device."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from gptoss_serve.model.checkpoint import CheckpointReader
from gptoss_serve.model.errors import CheckpointError
from gptoss_serve.model.experts import ExpertsFactory, ExpertShard
from gptoss_serve.model.hub import resolve_checkpoint
from gptoss_serve.model.packed_experts import expert_shard_class
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
               load_format: LoadFormat = "auto") -> GptOssForCausalLM:
    """Builds the model on the meta device, allocates it once on `device` and copies the tensors in one by one.

    dtype defaults to the checkpoint's (bf16 for gpt-oss). MXFP4 experts stay packed (Mxfp4Experts), unless
    `dequantize_experts` widens them to dtype at load. With an `experts_factory` whose experts are not an
    ExpertShard, no expert weights are read at all. load_format "dummy" fills the weights with random values.
    """
    directory = resolve_checkpoint(path_or_hub_id)
    with open_checkpoint(directory, device=device, load_format=load_format) as reader:
        config = reader.config
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
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # what reading left cached goes back, so the KV cache can be sized from it
    return model.eval().requires_grad_(False)


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
