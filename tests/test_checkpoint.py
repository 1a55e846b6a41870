"""Checkpoint layouts the reader accepts: sharded with an index, or the one file save_pretrained writes."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.model.loader import load_model
from gptoss_serve.model.checkpoint import INDEX_FILE, SINGLE_FILE
from gptoss_serve.model.synthetic import write_preset


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "mxfp4"])
def test_single_file_checkpoint_loads_like_the_sharded_one(tmp_path, tiny_bf16, tiny_mxfp4, quantized):
    single = write_preset(tmp_path / "single", "tiny", mxfp4_experts=quantized, seed=1, single_file=True)
    assert sorted(p.name for p in single.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (single / INDEX_FILE).exists()
    sharded = tiny_mxfp4 if quantized else tiny_bf16  # the same seed, in two shards and an index
    assert len(list(sharded.glob("*.safetensors"))) > 1

    ours, reference = load_model(single, dtype=torch.float32), load_model(sharded, dtype=torch.float32)
    assert ours.config == reference.config
    expected = reference.state_dict()
    assert all(torch.equal(t, expected[name]) for name, t in ours.state_dict().items())
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids), rtol=0, atol=0)
