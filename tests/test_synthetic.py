"""Random checkpoints are in transformers' exact layout, reproducible, and written by the documented CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gptoss_serve.model.loader import load_model
from gptoss_serve.model.checkpoint import INDEX_FILE
from gptoss_serve.model.synthetic import main, preset_config, tensor_layout


def test_layout_is_transformers_state_dict():
    transformers = pytest.importorskip("transformers")
    config = preset_config("tiny")
    hf_config = transformers.GptOssConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    with torch.device("meta"):
        hf = transformers.GptOssForCausalLM(hf_config)
    expected = {name: tuple(t.shape) for name, t in hf.state_dict().items()}
    assert {name: shape for name, (shape, _) in tensor_layout(config).items()} == expected


@pytest.mark.parametrize("preset, layers, experts", [("20b", 24, 32), ("120b", 36, 128)])
def test_real_presets_have_the_real_shapes(preset, layers, experts):
    layout = tensor_layout(preset_config(preset, mxfp4_experts=True))
    assert layout["model.layers.0.mlp.experts.gate_up_proj_blocks"][0] == (experts, 5760, 90, 16)
    assert layout["model.layers.0.mlp.experts.down_proj_scales"][0] == (experts, 2880, 90)
    assert f"model.layers.{layers - 1}.self_attn.sinks" in layout
    total = sum(torch.Size(shape).numel() for shape, dtype in
                tensor_layout(preset_config(preset)).values())
    assert abs(total / 1e9 - {"20b": 20.9, "120b": 116.8}[preset]) < 0.1  # parameter counts OpenAI publishes


def test_cli_writes_a_sharded_checkpoint(tmp_path, capsys):
    main(["--preset", "tiny", "--out", str(tmp_path / "m"), "--mxfp4", "--seed", "3", "--max-shard-mb", "8"])
    assert "MXFP4" in capsys.readouterr().out
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    names = set()
    for shard in shards:
        with safe_open(tmp_path / "m" / shard, "pt") as f:
            names |= {n for n in f.keys() if index["weight_map"][n] == shard}
    assert names == set(tensor_layout(preset_config("tiny", mxfp4_experts=True)))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4" and config["vocab_size"] == 201088


def test_same_seed_same_model_and_sharding_changes_nothing(tmp_path):
    main(["--out", str(tmp_path / "a"), "--seed", "5"])
    main(["--out", str(tmp_path / "b"), "--seed", "5", "--max-shard-mb", "4"])
    main(["--out", str(tmp_path / "c"), "--seed", "6"])
    a, b, c = (load_model(tmp_path / x).state_dict() for x in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
