"""Reads a gpt-oss checkpoint directory: config.json, safetensors shards and their index, tensor by tensor.

Tensors are read one at a time straight to the target device (safetensors memory-maps the files), so the
model is never held twice. Expert weights come out dense in transformers' layout whatever the file holds:
`read_experts` is where MXFP4 blocks and scales are turned into values.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptoss_serve.model import mxfp4
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPERT_MATRICES = ("gate_up_proj", "down_proj")  # stored [E, in, out] in bf16; [E, out, in / 32, 16] in MXFP4
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias")


def expert_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts."


def expert_tensor_names(config: GptOssConfig, layer: int) -> list[str]:
    """The names one layer's experts occupy in a checkpoint of this config's format."""
    prefix = expert_prefix(layer)
    if config.quantization == "mxfp4":
        matrices = [f"{prefix}{m}{part}" for m in EXPERT_MATRICES for part in ("_blocks", "_scales")]
    else:
        matrices = [prefix + m for m in EXPERT_MATRICES]
    return matrices + [prefix + b for b in EXPERT_BIASES]


class CheckpointReader:
    """Open safetensors shards of one checkpoint directory; use as a context manager."""

    def __init__(self, directory: str | Path, *, device: torch.device | str = "cpu") -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint directory not found")
        self.config = GptOssConfig.from_file(self.directory / "config.json")
        self.device = torch.device(device)
        # opened before the weight map: a checkpoint without an index is listed by opening its one file
        self._files: dict[str, object] = {}
        self._stack = ExitStack()
        try:
            self.file_of = self._weight_map()  # tensor name -> shard file name
        except BaseException:
            self.close()
            raise

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).is_file():
                    raise CheckpointError(f"{index}: lists shard {shard!r}, which is missing from {self.directory}")
            return dict(weight_map)
        shards = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.directory}: no *.safetensors files and no {INDEX_FILE}")
        if len(shards) > 1:
            raise CheckpointError(f"{self.directory}: {len(shards)} safetensors files but no {INDEX_FILE}")
        return {name: shards[0] for name in self._open(shards[0]).keys()}

    def _open(self, shard: str):
        if shard not in self._files:
            path = self.directory / shard
            try:
                self._files[shard] = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        return self._files[shard]

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def names(self) -> set[str]:
        return set(self.file_of)

    def where(self, name: str) -> Path:
        return self.directory / self.file_of.get(name, INDEX_FILE)

    def _slice(self, name: str):
        if name not in self.file_of:
            raise CheckpointError(f"{self.directory}: missing tensor {name!r}")
        handle = self._open(self.file_of[name])
        try:
            return handle.get_slice(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.where(name)}: tensor {name!r}: {e}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, *, dtype: torch.dtype | None = None, rows: slice = slice(None),
             expect: tuple[int, ...] | None = None) -> torch.Tensor:
        """One tensor (or the rows [start, stop) of its first dimension) on the reader's device."""
        view = self._slice(name)
        shape = list(view.get_shape())
        if rows != slice(None):
            shape[0] = len(range(*rows.indices(shape[0])))
        if expect is not None and tuple(shape) != tuple(expect):
            raise CheckpointError(f"{self.where(name)}: tensor {name!r} has shape {tuple(shape)}, "
                                  f"expected {tuple(expect)}")
        try:
            tensor = view[rows] if rows != slice(None) else view[:]
        except SafetensorError as e:
            raise CheckpointError(f"{self.where(name)}: tensor {name!r}: {e}") from None
        return tensor.to(device=self.device, dtype=dtype or tensor.dtype)

    def read_experts(self, layer: int, *, first: int, count: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Experts [first, first + count) of one layer, dense, in transformers' layout:
        gate_up_proj [n, H, 2I], gate_up_proj_bias [n, 2I], down_proj [n, I, H], down_proj_bias [n, H]."""
        c = self.config
        prefix, rows = expert_prefix(layer), slice(first, first + count)
        shapes = {"gate_up_proj": (count, c.hidden_size, 2 * c.intermediate_size),
                  "down_proj": (count, c.intermediate_size, c.hidden_size),
                  "gate_up_proj_bias": (count, 2 * c.intermediate_size),
                  "down_proj_bias": (count, c.hidden_size)}
        out = {b: self.read(prefix + b, dtype=dtype, rows=rows, expect=shapes[b]) for b in EXPERT_BIASES}
        for m in EXPERT_MATRICES:
            n, fan_in, fan_out = shapes[m]
            if c.quantization == "mxfp4":
                groups = fan_in // mxfp4.BLOCK_SIZE
                blocks = self.read(prefix + m + "_blocks", rows=rows, expect=(n, fan_out, groups, mxfp4.BLOCK_SIZE // 2))
                scales = self.read(prefix + m + "_scales", rows=rows, expect=(n, fan_out, groups))
                if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
                    raise CheckpointError(f"{self.where(prefix + m + '_blocks')}: MXFP4 tensors of {prefix + m} "
                                          f"must be uint8, got {blocks.dtype} and {scales.dtype}")
                # MXFP4 is stored [out, in]; transformers' dense layout is [in, out]
                out[m] = mxfp4.dequantize(blocks, scales, dtype=dtype).transpose(-1, -2).contiguous()
            else:
                out[m] = self.read(prefix + m, dtype=dtype, rows=rows, expect=shapes[m])
        return out
