"""The KV-cache tensors, sized from a memory budget, the number of blocks that budget buys, and the longest sequence
they hold.

Layers are paired across groups: slot j holds the j-th full-attention layer and the j-th sliding-window layer,
and a block id means the same memory in both. Since a block belongs to one group at a time, the two layers of a
slot never collide, and the cache costs max(#full, #sliding) layers' worth of memory, not #layers.
"""

from __future__ import annotations

import torch

from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.model.config import GptOssConfig

CPU_DEFAULT_KV_BYTES = 512 << 20  # on the CPU there is no free-memory probe: a fixed, modest cache
ACTIVATION_RESERVE_BYTES = 2 << 30  # kept free on a GPU for activations, logits and the allocator's slack


def layer_slots(config: GptOssConfig) -> list[int]:
    """Layer index -> its KV slot (its rank within its own group)."""
    seen = {True: 0, False: 0}
    slots = []
    for layer in range(config.num_hidden_layers):
        sliding = config.is_sliding(layer)
        slots.append(seen[sliding])
        seen[sliding] += 1
    return slots


def num_slots(config: GptOssConfig) -> int:
    return max(layer_slots(config)) + 1


def bytes_per_block(config: GptOssConfig, block_size: int, dtype: torch.dtype) -> int:
    return num_slots(config) * 2 * block_size * config.num_key_value_heads * config.head_dim * dtype.itemsize


def blocks_for_budget(config: GptOssConfig, *, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return max(0, budget_bytes // bytes_per_block(config, block_size, dtype))


class KVCache:
    def __init__(self, config: GptOssConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.block_size = block_size
        self.slot_of_layer = layer_slots(config)
        shape = (num_slots(config), num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [slots, blocks, block_size, Hkv, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer: [blocks, block_size, Hkv, D] each."""
        slot = self.slot_of_layer[layer]
        return self.keys[slot], self.values[slot]


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
