from __future__ import annotations

import dataclasses

import pytest

from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.errors import CheckpointError
from gptoss_serve.model.synthetic import preset_config

# config.json of openai/gpt-oss-20b as published (transformers 4.55 layout)
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


def test_reads_the_published_20b_config():
    config = GptOssConfig.from_dict(GPT_OSS_20B)
    assert config.quantization == "mxfp4" and config.num_local_experts == 32 and config.num_query_groups == 8
    assert config.rope_scaling.truncate is False and config.rope_theta == 150000
    assert config.is_sliding(0) and not config.is_sliding(1)
    assert config == preset_config("20b", mxfp4_experts=True)


def test_reads_transformers_5_rope_parameters():
    raw = {k: v for k, v in GPT_OSS_20B.items() if k not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = {**GPT_OSS_20B["rope_scaling"], "rope_theta": 150000.0}
    assert GptOssConfig.from_dict(raw) == GptOssConfig.from_dict(GPT_OSS_20B)


def test_round_trips_through_its_dict():
    config = preset_config("tiny", mxfp4_experts=True)
    assert GptOssConfig.from_dict(config.to_dict()) == config


def test_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset_config("tiny").hidden_size = 3


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "big", "hidden_size must be a positive integer"),
    ("num_experts_per_tok", 64, "num_experts_per_tok .* must not exceed num_local_experts"),
    ("layer_types", ["sliding_attention"], "layer_types has 1 entries for 24 layers"),
    ("layer_types", ["local"] * 24, "layer_types has unknown entries"),
    ("quantization_config", {"quant_method": "gptq"}, "quantization_config.quant_method must be 'mxfp4'"),
    ("max_position_embeddings", "lots", "malformed value"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(CheckpointError, match=f"my.json: {message}"):
        GptOssConfig.from_dict({**GPT_OSS_20B, key: value}, source="my.json")
