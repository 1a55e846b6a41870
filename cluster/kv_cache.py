"""The KV-cache tensors, sized from a memory budget, the number of blocks that budget buys, and the longest sequence
they hold.

Layers are paired across groups: slot j holds the j-th full-attention layer and the j-th sliding-window layer,
and a block id means the same memory in both. Since a block belongs to one group at a time, the two layers of a
slot never collide, and the cache costs max(#full, #sliding) layers' worth of memory, not #layers.

An fp8 cache (`kv_cache_dtype: fp8`) holds e4m3 numbers plus, per token and KV head, one byte: its scale's exponent
(kernels/fp8_kv_reference.py), in tensors of their own beside the keys and values; a block then costs 65 bytes a
token-head at head_dim 64 against bf16's 128, so a budget buys 1.97x the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.kernels.fp8_kv_reference import E4M3, SCALE_DTYPE
from gptoss_serve.model.config import GptOssConfig

KV_CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": E4M3}  # and "auto": the model's

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


def kv_cache_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype:
    """EngineConfig.kv_cache_dtype -> the dtype the cache stores."""
    return model_dtype if setting == "auto" else KV_CACHE_DTYPES[setting]


def bytes_per_block(config: GptOssConfig, block_size: int, dtype: torch.dtype) -> int:
    """What one block costs in a cache of `dtype`: keys and values of every slot, and an e4m3 cache's scales."""
    scale_bytes = SCALE_DTYPE.itemsize if dtype == E4M3 else 0
    per_head = config.head_dim * dtype.itemsize + scale_bytes
    return num_slots(config) * 2 * block_size * config.num_key_value_heads * per_head


def blocks_for_budget(config: GptOssConfig, *, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return max(0, budget_bytes // bytes_per_block(config, block_size, dtype))


@dataclass(frozen=True)
class LayerCache:
    """One layer's share of the cache, as the store and attention kernels take it."""

    keys: torch.Tensor  # [blocks, block_size, Hkv, D]
    values: torch.Tensor
    key_scales: torch.Tensor | None  # e4m3 caches: uint8 scale exponents [blocks, block_size, Hkv]; else None
    value_scales: torch.Tensor | None

    @property
    def scales(self) -> dict[str, torch.Tensor | None]:
        """The kernels' keyword arguments for the scales."""
        return {"key_scales": self.key_scales, "value_scales": self.value_scales}


class KVCache:
    def __init__(self, config: GptOssConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        """dtype: what the cache stores (kv_cache_dtype); e4m3 comes with scale exponents (fp8_kv_reference.py)."""
        self.block_size, self.dtype = block_size, dtype
        self.slot_of_layer = layer_slots(config)
        shape = (num_slots(config), num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [slots, blocks, block_size, Hkv, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        scale_shape = shape[:-1]  # [slots, blocks, block_size, Hkv]: an exponent per token-head
        fp8 = dtype == E4M3
        self.key_scales = torch.zeros(scale_shape, dtype=SCALE_DTYPE, device=device) if fp8 else None
        self.value_scales = torch.zeros(scale_shape, dtype=SCALE_DTYPE, device=device) if fp8 else None

    def layer(self, layer: int) -> LayerCache:
        """One layer's keys and values, and their scales if any."""
        slot = self.slot_of_layer[layer]
        return LayerCache(self.keys[slot], self.values[slot],
                          None if self.key_scales is None else self.key_scales[slot],
                          None if self.value_scales is None else self.value_scales[slot])


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
