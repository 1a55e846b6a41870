"""Engine limits as the user sets them.

`EngineConfig` is the one definition of the engine's fields and defaults: the app's `engine:` args are this
model (validated in the builder with the rest of AppArgs), and tests and benchmarks build it directly. What they
come to on the device at start-up (the KV cache's blocks, the longest sequence) is kv_cache.py's. No torch here:
the CPU-only ingress validates these args too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# vLLM's names for the same settings (`--kv-cache-dtype fp8_e4m3`, `bfloat16`), accepted and stored as ours
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8", "bfloat16": "bf16"}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(
        512, ge=1, description="requests decoded together in one step (at most; the KV cache may hold fewer). 512 "
                               "measured on an H100 (20b, 128 in / 128 out): 17,025 tok/s at 256, 21,794 at 512, "
                               "23,206 at 1,024, for twice the time a token (BENCHMARKS.md)")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens a step computes (prefill chunk size)")
    long_prefill_token_threshold: int = Field(
        0, ge=0, description="while other requests decode, a prompt's chunk is at most this many tokens (0: the "
                             "step's whole budget; vLLM's name). Smaller chunks keep their TPOT low beside a long "
                             "prefill, at the cost of that prompt's time to first token; alone, a prompt takes the "
                             "whole budget")
    max_model_len: int | None = Field(None, ge=2, description="longest prompt + output; default: the model's "
                                                              "context, or what the cache holds")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of the GPU the engine may fill")
    num_kv_blocks: int | None = Field(None, ge=2, description="fixed KV-cache size instead of a memory budget "
                                                              "(tests use it to force preemption)")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV-cache budget instead of gpu_memory_utilization "
                                                              "(on the CPU the default is 0.5)")
    kv_cache_dtype: Literal["auto", "bf16", "fp8"] = Field(
        "auto", description="what the KV cache stores: auto, the model's dtype; bf16; fp8, e4m3 with a power-of-two "
                            "scale per token and KV head (about twice the tokens in the same memory; "
                            "kernels/fp8_kv_reference.py). vLLM's fp8_e4m3 and bfloat16 are accepted")
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(False, description="no CUDA graphs: every step's kernels launched one by one, "
                                                   "MoE workers' too (debugging; graphs are captured only on GPUs)")
    mixed_step_graph_tokens: int = Field(
        256, ge=0, description="mixed steps (prompt chunks beside decodes) of up to this many tokens replay piecewise "
                               "CUDA graphs, attention eager between them (cluster/mixed_graphs.py); 0: such steps "
                               "launch every kernel from Python. GPUs with experts in the engine's process only. "
                               "256 measured on an H100: decodes beside a 128k prefill 1.10x faster (BENCHMARKS.md)")
    async_scheduling: bool | None = Field(None, description="schedule step t+1 while step t runs on the device, "
                                                             "reading its tokens a step late; default: on GPUs")
    seed: int = Field(0, description="for requests without their own seed")

    @field_validator("kv_cache_dtype", mode="before")
    @classmethod
    def _vllm_names(cls, value: object) -> object:
        return KV_CACHE_DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

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
