"""load_model: a checkpoint directory or hub id -> a ready GptOssForCausalLM, streamed onto the target device."""

from __future__ import annotations

from pathlib import Path

import torch

from gptoss_serve.model.checkpoint import CheckpointReader
from gptoss_serve.model.errors import CheckpointError
from gptoss_serve.model.experts import ExpertsFactory, LocalExperts
from gptoss_serve.model.hub import resolve_checkpoint
from gptoss_serve.model.transformer import GptOssForCausalLM


def load_model(path_or_hub_id: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *,
               experts_factory: ExpertsFactory | None = None) -> GptOssForCausalLM:
    """Builds the model on the meta device, allocates it once on `device` and copies the tensors in one by one.

    dtype defaults to the checkpoint's (bf16 for gpt-oss); MXFP4 experts are dequantized to it. With an
    `experts_factory` whose experts are not LocalExperts, no expert weights are read at all.
    """
    directory = resolve_checkpoint(path_or_hub_id)
    with CheckpointReader(directory, device=device) as reader:
        config = reader.config
        with torch.device("meta"):
            model = GptOssForCausalLM(config, experts_factory=experts_factory)
        model = model.to(dtype or getattr(torch, config.dtype)).to_empty(device=device)
        for module in model.modules():
            if hasattr(module, "init_buffers"):
                module.init_buffers()
        load_weights(model, reader)
    return model.eval().requires_grad_(False)


def load_weights(model: GptOssForCausalLM, reader: CheckpointReader) -> None:
    """Checks the checkpoint holds exactly this model's tensors, then copies them in; experts load themselves."""
    dense = {name: p for name, p in model.named_parameters() if ".mlp.experts." not in name}
    local = {layer: block.mlp.experts for layer, block in enumerate(model.model.layers)
             if isinstance(block.mlp.experts, LocalExperts)}  # experts held elsewhere read nothing here
    expert_names = {n for layer in range(reader.config.num_hidden_layers)
                    for n in LocalExperts.checkpoint_names(reader, layer)}
    unexpected = sorted(reader.names() - dense.keys() - expert_names)
    if unexpected:
        raise CheckpointError(f"{reader.where(unexpected[0])}: unexpected tensor {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    wanted = set(dense).union(*(LocalExperts.checkpoint_names(reader, layer) for layer in local))
    missing = sorted(wanted - reader.names())
    if missing:
        raise CheckpointError(f"{reader.directory}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    with torch.no_grad():
        for name, param in dense.items():
            param.copy_(reader.read(name, dtype=param.dtype, expect=tuple(param.shape)))
    for layer, experts in local.items():
        experts.load_weights(reader, layer)
