"""Piecewise graphs of mixed steps (cluster/mixed_graphs.py) where a CPU can check them: the buckets, the points
where the model's forward hands over to attention (one a layer, in order: a piece between each two), and engines on
the CPU running every step eagerly whatever they are asked. Replays against eager steps: tests/test_gpu.py."""

from __future__ import annotations

import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.mixed_graphs import _PieceBreaks, token_buckets
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer


def test_buckets_grow_by_at_most_half_and_end_at_the_limit():
    assert token_buckets(40) == [8, 16, 24, 32, 40]
    assert token_buckets(256)[-4:] == [160, 192, 224, 256]
    buckets = token_buckets(1024)
    assert buckets[0] == 8 and buckets[-1] == 1024
    assert all(b / a <= 1.5 for a, b in zip(buckets[8:], buckets[9:]))  # from 64 tokens up: padding under 50%
    assert token_buckets(5) == [5]


def test_the_forward_hands_over_once_a_layer_with_the_layers_q_shape(tiny_bf16):
    """The capture ends a piece at each attention call: as many calls as layers, in layer order, each handed a view
    of the one output buffer shaped as its queries."""
    model = load_model(tiny_bf16)
    config = model.config
    tokens = 24
    out = torch.full((32, config.num_attention_heads * config.head_dim), 7.0, dtype=model.dtype)
    breaks = _PieceBreaks(out, None, capture=False)
    ids, positions = torch.arange(tokens, dtype=torch.int32) + 100, torch.arange(tokens, dtype=torch.int32)
    with torch.no_grad():
        hidden = model.model(ids, positions, breaks)
    assert hidden.shape == (tokens, config.hidden_size) and torch.isfinite(hidden).all()
    assert [layer.layer for layer, _, _, _ in breaks.attentions] == list(range(config.num_hidden_layers))
    for _, q, k, v in breaks.attentions:
        assert q.shape == (tokens, config.num_attention_heads, config.head_dim)
        assert k.shape == v.shape == (tokens, config.num_key_value_heads, config.head_dim)
    assert breaks.pieces == []  # nothing captured without a GPU


def test_on_the_cpu_every_step_runs_eagerly_whatever_is_asked(tiny_bf16):
    engine = LLMEngine(load_model(tiny_bf16), load_tokenizer(),
                       EngineConfig(num_kv_blocks=64, max_model_len=128, max_num_batched_tokens=32,
                                    mixed_step_graph_tokens=32))
    assert engine.runner.mixed_graphs is None
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    done = engine.generate([list(range(100, 140)), list(range(200, 205))], params)
    assert [len(d.token_ids) for d in done] == [6, 6] and engine.runner.mixed_graph_steps == 0
