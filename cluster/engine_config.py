"""Engine limits as the user sets them, and the KV-cache size they come to on the device at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss_serve.cluster.kv_cache import blocks_for_budget, bytes_per_block
from gptoss_serve.model.config import GptOssConfig

CPU_DEFAULT_KV_BYTES = 512 << 20  # on the CPU there is no free-memory probe: a fixed, modest cache
ACTIVATION_RESERVE_BYTES = 2 << 30  # kept free on a GPU for activations, logits and the allocator's slack


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings, or what the cache holds
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides the memory budget (tests use it to force preemption)
    kv_cache_bytes: int | None = None  # an explicit budget instead of gpu_memory_utilization
    enable_prefix_caching: bool = True
    seed: int = 0  # for requests without their own seed

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be at least 2, got {self.num_kv_blocks}")


def resolve_num_blocks(config: EngineConfig, model_config: GptOssConfig, *, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Blocks the cache gets: explicit, or what the budget buys once the model is loaded."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_bytes is not None:
        budget = config.kv_cache_bytes
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = int(total * config.gpu_memory_utilization) - used_by_others - torch.cuda.memory_reserved(device)
        budget -= ACTIVATION_RESERVE_BYTES
    else:
        budget = CPU_DEFAULT_KV_BYTES
    blocks = blocks_for_budget(model_config, block_size=config.block_size, dtype=dtype, budget_bytes=budget)
    if blocks < 2:
        need = 2 * bytes_per_block(model_config, config.block_size, dtype)
        raise ValueError(f"gpu_memory_utilization leaves {budget / 2**20:.0f} MiB for the KV cache, less than the "
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
