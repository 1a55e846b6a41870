"""Random gpt-oss checkpoints in the exact layout of openai/gpt-oss-*, for tests and benchmarks.

    python -m gptoss_serve.model.synthetic --preset {tiny,20b,120b} --out DIR [--mxfp4] [--seed N] [--single-file]
        [--config-only]

`tiny` keeps the real 201,088-token vocabulary (the real tokenizer works with it) and is small enough for CPU
tests; `20b` and `120b` have the real shapes. Each tensor's values depend only on (seed, tensor name), so the
bf16 and MXFP4 checkpoints of one seed share every non-expert tensor, and sharding never changes a value.

`RandomCheckpoint` reads such weights without writing them (vLLM's `load_format="dummy"`): a directory needs only
config.json (`--config-only`), so gpt-oss-120b's shapes load on a machine without room for its 65 GB of files.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptoss_serve.model import mxfp4
from gptoss_serve.model.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader, stored_layout
from gptoss_serve.model.config import FULL, SLIDING, GptOssConfig
from gptoss_serve.model.errors import CheckpointError

_REAL = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
             num_key_value_heads=8, head_dim=64, num_experts_per_tok=4, sliding_window=128)
PRESETS: dict[str, dict] = {
    "tiny": dict(_REAL, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_local_experts=8, sliding_window=32),
    "20b": dict(_REAL, num_hidden_layers=24, num_local_experts=32),
    "120b": dict(_REAL, num_hidden_layers=36, num_local_experts=128),
}
DEFAULT_SHARD_BYTES = {"tiny": 32 << 20, "20b": 4 << 30, "120b": 4 << 30}


def preset_config(preset: str, *, mxfp4_experts: bool = False) -> GptOssConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = PRESETS[preset]
    layer_types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(fields["num_hidden_layers"]))
    return GptOssConfig(**fields, layer_types=layer_types, quantization="mxfp4" if mxfp4_experts else None)


def tensor_layout(config: GptOssConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a checkpoint of this config: name -> (shape, dtype), in the order they are written."""
    return {stored: spec for name, (shape, dtype) in dense_layout(config).items()
            for stored, spec in stored_layout(config, name, shape, dtype).items()}


def dense_layout(config: GptOssConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """transformers' state dict of this config, name -> (shape, dtype), before any weight is quantized."""
    c, bf16 = config, torch.bfloat16
    H, I, E, D = c.hidden_size, c.intermediate_size, c.num_local_experts, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed_tokens.weight": ((c.vocab_size, H), bf16)}
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        out |= {p + "input_layernorm.weight": ((H,), bf16), p + "post_attention_layernorm.weight": ((H,), bf16)}
        for proj, (rows, cols) in {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q)}.items():
            out |= {f"{p}self_attn.{proj}.weight": ((rows, cols), bf16), f"{p}self_attn.{proj}.bias": ((rows,), bf16)}
        out[p + "self_attn.sinks"] = ((c.num_attention_heads,), bf16)
        out |= {p + "mlp.router.weight": ((E, H), bf16), p + "mlp.router.bias": ((E,), bf16)}
        e = p + "mlp.experts."  # expert matrices are [E, in, out]
        out |= {e + "gate_up_proj": ((E, H, 2 * I), bf16), e + "down_proj": ((E, I, H), bf16),
                e + "gate_up_proj_bias": ((E, 2 * I), bf16), e + "down_proj_bias": ((E, H), bf16)}
    out |= {"model.norm.weight": ((H,), bf16), "lm_head.weight": ((c.vocab_size, H), bf16)}
    return out


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, config: GptOssConfig, seed: int, *,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Values scaled so activations stay near unit size through the layers, like a trained model's. Made on
    `device` by its own generator: the same values for one (seed, name) on the CPU, other ones on a GPU."""
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if mxfp4.is_part(name):
        return mxfp4.random_part(name, shape, gen)

    def randn(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=gen.device).mul_(scale)

    if name.endswith("norm.weight"):
        values = randn(0.1).add_(1)
    elif name.endswith("sinks"):
        values = randn(0.5)
    elif name.endswith("bias"):
        values = randn(0.02)
    elif name == "model.embed_tokens.weight":
        values = randn()
    else:  # a matrix: dense experts are [E, in, out], everything else [out, in]
        fan_in = shape[-2] if name.endswith(("gate_up_proj", "down_proj")) else shape[-1]
        values = randn(fan_in**-0.5)
    return values.to(dtype)


class RandomCheckpoint(CheckpointReader):
    """A checkpoint reader whose tensors are made when read, by `random_tensor` on the reader's device, from a
    directory that holds only config.json. On the CPU it reads exactly what `write_checkpoint` writes for the seed."""

    def __init__(self, directory: str | Path, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint directory not found")
        self.config = GptOssConfig.from_file(self.directory / "config.json")
        self.device, self.seed = torch.device(device), seed
        self.layout = tensor_layout(self.config)

    def close(self) -> None:
        pass  # no files are opened

    def names(self) -> set[str]:
        return set(self.layout)

    def where(self, name: str) -> Path:
        return self.directory / "config.json"  # every random tensor's shape comes from there

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        if name not in self.layout:
            raise CheckpointError(f"{self.directory}: missing tensor {name!r}")
        return self.layout[name][0]

    def _stored_tensor(self, name: str, rows: slice) -> torch.Tensor:
        # the whole tensor, then the rows: any shard of it holds the same values
        whole = random_tensor(name, *self.layout[name], self.config, self.seed, device=self.device)
        return whole if rows == slice(None) else whole[rows].clone()


def write_checkpoint(out: str | Path, config: GptOssConfig, *, seed: int = 0,
                     max_shard_bytes: int = 4 << 30, single_file: bool = False) -> Path:
    """Writes config.json, model-0000i-of-0000n.safetensors and the index; one shard in memory at a time.

    single_file: one model.safetensors and no index instead, as transformers' save_pretrained writes small models.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = tensor_layout(config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes and not single_file:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = SINGLE_FILE if single_file else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, *layout[n], config, seed) for n in names}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(names, file)
    if not single_file:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    return write_config(out, config)


def write_config(out: str | Path, config: GptOssConfig) -> Path:
    """config.json and generation_config.json, as the openai repos hold them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}, indent=2))
    return out


def write_preset(out: str | Path, preset: str = "tiny", *, mxfp4_experts: bool = False, seed: int = 0,
                 max_shard_bytes: int | None = None, single_file: bool = False) -> Path:
    config = preset_config(preset, mxfp4_experts=mxfp4_experts)
    return write_checkpoint(out, config, seed=seed, max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES[preset],
                            single_file=single_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--mxfp4", action="store_true", help="store expert weights as MXFP4 blocks and scales")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-mb", type=int, default=None, help="largest shard size in MiB")
    parser.add_argument("--single-file", action="store_true", help="one model.safetensors, no index")
    parser.add_argument("--config-only", action="store_true",
                        help="write config.json alone, to load with random weights (load_format dummy)")
    args = parser.parse_args(argv)
    config = preset_config(args.preset, mxfp4_experts=args.mxfp4)
    if args.config_only:
        path = write_config(args.out, config)
        print(f"wrote the config of a {args.preset} gpt-oss model to {path} (load it with load_format dummy)")
        return
    shard = args.max_shard_mb << 20 if args.max_shard_mb else None
    path = write_preset(args.out, args.preset, mxfp4_experts=args.mxfp4, seed=args.seed, max_shard_bytes=shard,
                        single_file=args.single_file)
    print(f"wrote a random {args.preset} gpt-oss checkpoint ({'MXFP4' if args.mxfp4 else 'bf16'} experts, "
          f"{config.num_hidden_layers} layers, {config.num_local_experts} experts) to {path}")


if __name__ == "__main__":
    main()
