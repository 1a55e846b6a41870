"""Every way a checkpoint can be broken raises CheckpointError naming the file and the key or tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_serve.model.errors import CheckpointError
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.checkpoint import INDEX_FILE


@pytest.fixture
def broken(tmp_path, tiny_bf16):
    """A private copy of the tiny checkpoint to damage."""
    return shutil.copytree(tiny_bf16, tmp_path / "ckpt")


def shard_of(path, name):
    return path / json.loads((path / INDEX_FILE).read_text())["weight_map"][name]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found") as e:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


@pytest.mark.parametrize("key", ["hidden_size", "num_local_experts", "head_dim", "vocab_size", "sliding_window",
                                 "rope_theta", "rope_scaling"])
def test_config_without_a_required_key(broken, key):
    config = json.loads((broken / "config.json").read_text())
    del config[key]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json.*{key}"):
        load_model(broken)


def test_config_with_a_bad_value(broken):
    config = json.loads((broken / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*num_attention_heads.*num_key_value_heads"):
        load_model(broken)


def test_config_not_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(broken)


def rewrite_shard(path, name, change):
    shard = shard_of(path, name)
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)
    return shard


def test_missing_tensor(broken):
    name = "model.layers.1.self_attn.sinks"
    rewrite_shard(broken, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"{name}"):
        load_model(broken)


def test_missing_tensor_listed_nowhere(broken):
    name = "model.layers.2.mlp.experts.down_proj"
    rewrite_shard(broken, name, lambda t: t.pop(name))
    index = json.loads((broken / INDEX_FILE).read_text())
    del index["weight_map"][name]
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_model(broken)


def test_unexpected_tensor(broken):
    name = "model.layers.0.self_attn.sinks"
    shard = rewrite_shard(broken, name, lambda t: t.update({"model.layers.0.mlp.surprise": torch.zeros(3)}))
    index = json.loads((broken / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.0.mlp.surprise"] = shard.name
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard.name}: unexpected tensor 'model.layers.0.mlp.surprise'"):
        load_model(broken)


@pytest.mark.parametrize("name", ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"])
def test_wrong_shape(broken, name):
    shard = rewrite_shard(broken, name, lambda t: t.update({name: t[name][..., :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor '{name}' has shape"):
        load_model(broken)


def test_wrong_shape_mxfp4(tmp_path, tiny_mxfp4):
    path = shutil.copytree(tiny_mxfp4, tmp_path / "q")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    shard = rewrite_shard(path, name, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor '{name}' has shape"):
        load_model(path)


def test_truncated_safetensors(broken):
    shard = shard_of(broken, "lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read safetensors file"):
        load_model(broken)


def test_index_names_a_missing_shard(broken):
    shard = shard_of(broken, "lm_head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}: lists shard '{shard.name}', which is missing"):
        load_model(broken)


def test_hub_id_without_network_fails_clearly(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="openai/gpt-oss-20b: not a local directory, and downloading it"):
        load_model("openai/gpt-oss-20b")


def test_hub_id_is_downloaded_through_huggingface_hub(monkeypatch, tiny_bf16):
    import huggingface_hub

    asked = {}

    def snapshot(repo_id, **kwargs):
        asked.update(repo_id=repo_id, **kwargs)
        return str(tiny_bf16)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    model = load_model("openai/gpt-oss-20b", dtype=torch.float32)
    assert asked["repo_id"] == "openai/gpt-oss-20b" and "*.safetensors" in asked["allow_patterns"]
    assert "original/*" in asked["ignore_patterns"]
    assert model.config.num_hidden_layers == 4


def test_mxfp4_blocks_of_the_wrong_dtype(tmp_path, tiny_mxfp4):
    path = shutil.copytree(tiny_mxfp4, tmp_path / "q")
    name = "model.layers.2.mlp.experts.gate_up_proj_blocks"
    shard = rewrite_shard(path, name, lambda t: t.update({name: t[name].to(torch.int8)}))
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor '{name}' has dtype torch.int8, expected "
                                              "torch.uint8"):
        load_model(path)
