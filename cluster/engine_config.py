"""Engine limits as the user sets them, and the KV-cache size they come to on the device at start-up.

`EngineConfig` is the one definition of the engine's fields and defaults: the app's `engine:` args are this
model (validated in the builder with the rest of AppArgs), and tests and benchmarks build it directly.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptoss_serve.cluster.kv_cache import blocks_for_budget, bytes_per_block
from gptoss_serve.model.config import GptOssConfig

CPU_DEFAULT_KV_BYTES = 512 << 20  # on the CPU there is no free-memory probe: a fixed, modest cache
ACTIVATION_RESERVE_BYTES = 2 << 30  # kept free on a GPU for activations, logits and the allocator's slack


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(256, ge=1, description="requests decoded together in one step")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens a step computes (prefill chunk size)")
    max_model_len: int | None = Field(None, ge=2, description="longest prompt + output; default: the model's "
                                                              "context, or what the cache holds")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of the GPU the engine may fill")
    num_kv_blocks: int | None = Field(None, ge=2, description="fixed KV-cache size instead of a memory budget "
                                                              "(tests use it to force preemption)")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV-cache budget instead of gpu_memory_utilization "
                                                              "(on the CPU the default is 0.5)")
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(False, description="no CUDA graphs: every step's kernels launched one by one, "
                                                   "MoE workers' too (debugging; graphs are captured only on GPUs)")
    async_scheduling: bool | None = Field(None, description="schedule step t+1 while step t runs on the device, "
                                                             "reading its tokens a step late; default: on GPUs")
    seed: int = Field(0, description="for requests without their own seed")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:  # "max_num_seqs: Input should be ...", not pydantic's multi-line report
            raise ValueError(describe_errors(e)) from None

    # Nested in AppArgs, pydantic validates the fields without calling this __init__ (as for a model without
    # one), so the builder's report keeps each error's location: engine.max_num_seqs.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def describe_errors(error: ValidationError, *, whole: str = "config") -> str:
    """`field: problem` for each error, `; `-separated; `whole` names an error about no field in particular."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or whole}: {e['msg']}" for e in error.errors())


def resolve_num_blocks(config: EngineConfig, model_config: GptOssConfig, *, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Blocks the cache gets: explicit, or what the budget buys once the model is loaded."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_gib is not None:
        budget, source = int(config.kv_cache_gib * 2**30), "kv_cache_gib"
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = int(total * config.gpu_memory_utilization) - used_by_others - torch.cuda.memory_reserved(device)
        budget, source = budget - ACTIVATION_RESERVE_BYTES, "gpu_memory_utilization"
    else:
        budget, source = CPU_DEFAULT_KV_BYTES, "the CPU default budget (set kv_cache_gib)"
    blocks = blocks_for_budget(model_config, block_size=config.block_size, dtype=dtype, budget_bytes=budget)
    if blocks < 2:
        need = 2 * bytes_per_block(model_config, config.block_size, dtype)
        raise ValueError(f"{source} leaves {budget / 2**20:.0f} MiB for the KV cache, less than the "
                         f"{need / 2**20:.1f} MiB of two blocks; raise it or free the device")
    return blocks


def resolve_max_model_len(config: EngineConfig, model_config: GptOssConfig, num_blocks: int) -> int:
    """The longest sequence the engine accepts; one such sequence must fit in the cache on its own."""

    def blocks_for(length: int) -> int:
        # full-attention blocks for every token, plus sliding-window blocks for the window and, at worst, one
        # prefill chunk on top of it
        full = -(-length // config.block_size)
        chunk = min(config.max_num_batched_tokens, length)
        return full + min(full, -(-(model_config.sliding_window + chunk) // config.block_size) + 1)

    usable = num_blocks - 1  # block 0 is the null block
    wanted = config.max_model_len or model_config.max_position_embeddings
    if blocks_for(wanted) <= usable:
        return wanted
    fits = max((n for n in range(0, usable * config.block_size + 1, config.block_size) if blocks_for(n) <= usable),
               default=0)
    if config.max_model_len is not None:
        raise ValueError(f"max_model_len {wanted} does not fit in the KV cache ({num_blocks} blocks of "
                         f"{config.block_size} tokens hold one sequence of at most {fits}); lower max_model_len or "
                         f"give the cache more memory")
    if fits < 2:
        raise ValueError(f"the KV cache ({num_blocks} blocks) is too small for any sequence; give it more memory")
    return fits
