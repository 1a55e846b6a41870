"""gpt-oss hyper-parameters, read from a checkpoint's config.json and checked when built."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptoss_serve.model.errors import CheckpointError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling, as `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) spell it."""

    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    # gpt-oss ships truncate=false: the correction range keeps its fractional ends (OpenAI's reference does too);
    # a config.json without the key means true, as in transformers
    truncate: bool = False


@dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: YarnScaling = field(default_factory=YarnScaling)
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    eos_token_id: int | None = 200002
    pad_token_id: int | None = 199999
    quantization: str | None = None  # "mxfp4" when expert weights are stored as blocks + scales
    dtype: str = "bfloat16"  # the dtype of the non-quantized tensors in the checkpoint

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise CheckpointError(f"{key} {why}")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window"):
            value = getattr(self, key)
            check(isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}")
        check(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
              f"({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        check(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        check(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
              f"({self.num_experts_per_tok}) must not exceed num_local_experts ({self.num_local_experts})")
        check(len(self.layer_types) == self.num_hidden_layers, "layer_types",
              f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        check(not bad, "layer_types", f"has unknown entries {bad}; expected {SLIDING!r} or {FULL!r}")
        check(self.quantization in (None, "mxfp4"), "quantization_config.quant_method",
              f"must be 'mxfp4' or absent, got {self.quantization!r}")
        check(self.dtype in ("bfloat16", "float16", "float32"), "torch_dtype", f"unsupported: {self.dtype!r}")
        check(self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps), "rms_norm_eps", "must be positive")

    @property
    def num_query_groups(self) -> int:
        """Query heads that share one KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> GptOssConfig:
        """Builds the config from config.json's keys; a missing or malformed key raises naming `source` and it."""
        try:
            return cls._from_dict(raw, source)
        except (TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{source}: malformed value ({e})") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], source: str) -> GptOssConfig:

        def need(key: str, *aliases: str) -> Any:
            for name in (key, *aliases):
                if name in raw:
                    return raw[name]
            raise CheckpointError(f"{source}: required key {key!r} is missing")

        rope = raw.get("rope_parameters") or raw.get("rope_scaling")
        if not isinstance(rope, dict):
            raise CheckpointError(f"{source}: required key 'rope_scaling' (or 'rope_parameters') is missing")
        if rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise CheckpointError(f"{source}: rope_scaling.rope_type must be 'yarn', got {rope.get('rope_type')!r}")
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        if theta is None:
            raise CheckpointError(f"{source}: required key 'rope_theta' is missing")
        max_positions = int(raw.get("max_position_embeddings", 131072))
        original = int(rope.get("original_max_position_embeddings", raw.get("initial_context_length", 4096)))
        scaling = YarnScaling(
            factor=float(rope.get("factor") or max_positions / original),
            beta_fast=float(rope.get("beta_fast") or 32.0),
            beta_slow=float(rope.get("beta_slow") or 1.0),
            original_max_position_embeddings=original,
            truncate=bool(rope.get("truncate", True)),
        )
        num_layers = need("num_hidden_layers")
        layer_types = raw.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
        quant = raw.get("quantization_config") or {}
        fields = dict(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=need("num_key_value_heads"),
            head_dim=need("head_dim"),
            num_local_experts=need("num_local_experts"),
            num_experts_per_tok=need("num_experts_per_tok", "experts_per_token"),
            sliding_window=need("sliding_window"),
            layer_types=tuple(layer_types),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
            eos_token_id=raw.get("eos_token_id", 200002),
            pad_token_id=raw.get("pad_token_id", 199999),
            quantization=quant.get("quant_method"),
            dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        )
        try:
            return cls(**fields)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> GptOssConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """config.json in the layout of openai/gpt-oss-*, readable by transformers' GptOssConfig."""
        out: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "use_cache": True,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
            "initial_context_length": self.rope_scaling.original_max_position_embeddings,
            "experts_per_token": self.num_experts_per_tok,
            "rope_scaling": {"rope_type": "yarn", **asdict(self.rope_scaling)},
            "torch_dtype": self.dtype,
        }
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window",
                    "rms_norm_eps", "rope_theta", "max_position_embeddings", "swiglu_limit", "eos_token_id",
                    "pad_token_id"):
            out[key] = getattr(self, key)
        out["layer_types"] = list(self.layer_types)
        if self.quantization == "mxfp4":
            out["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        return dict(sorted(out.items()))
