"""Reads a gpt-oss checkpoint directory: config.json, safetensors shards and their index, tensor by tensor.

Tensors are read one at a time straight to the target device (safetensors memory-maps the files), so the
model is never held twice. Weights come out dense in transformers' layout whatever the file holds: `read` hands
the weights an MXFP4 checkpoint quantizes to model/mxfp4.py, which alone knows how they are stored.
"""

from __future__ import annotations

import functools
import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptoss_serve.model import mxfp4
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # what save_pretrained writes, with no index, when the model fits one file
# the weights an MXFP4 checkpoint quantizes (OpenAI's modules_to_not_convert keeps everything else bf16)
MXFP4_WEIGHTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def expert_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts."


def is_mxfp4(config: GptOssConfig, name: str) -> bool:
    """Whether the weight `name` (transformers' name) is stored as MXFP4 in a checkpoint of this config."""
    return config.quantization == "mxfp4" and name.endswith(MXFP4_WEIGHTS)


def stored_names(config: GptOssConfig, name: str) -> tuple[str, ...]:
    """The tensors the weight `name` occupies in a checkpoint of this config's format."""
    return mxfp4.tensor_names(name) if is_mxfp4(config, name) else (name,)


def stored_layout(config: GptOssConfig, name: str, shape: tuple[int, ...],
                  dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A weight of transformers' name, dense shape and dtype -> the tensors storing it: name -> (shape, dtype)."""
    return mxfp4.stored_layout(name, shape) if is_mxfp4(config, name) else {name: (tuple(shape), dtype)}


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

    def read(self, name: str, *, dtype: torch.dtype | None = None, rows: slice = slice(None),
             expect: tuple[int, ...] | None = None) -> torch.Tensor:
        """One weight (or the rows [start, stop) of its first dimension) on the reader's device, dense, in
        transformers' layout and shape (`expect`, needed for MXFP4 weights) whatever the file stores."""
        if is_mxfp4(self.config, name):
            if expect is None:
                raise ValueError(f"reading the MXFP4 weight {name!r} needs its dense shape (expect=)")
            return mxfp4.read_dense(functools.partial(self._read_stored, rows=rows), name, tuple(expect),
                                    dtype=dtype or getattr(torch, self.config.dtype))
        return self._read_stored(name, rows=rows, expect=expect, dtype=dtype)

    def read_packed(self, name: str, *, rows: slice = slice(None),
                    expect: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """An MXFP4 weight (rows of it) as the file stores it, (blocks, scales) on the reader's device; `expect` is
        its dense shape in transformers' layout. See model/mxfp4.py for the layout."""
        if not is_mxfp4(self.config, name):
            raise CheckpointError(f"{self.directory}: {name!r} is not stored as MXFP4 in this checkpoint")
        return mxfp4.read_packed(functools.partial(self._read_stored, rows=rows), name, tuple(expect))

    def _read_stored(self, name: str, *, rows: slice, expect: tuple[int, ...] | None = None,
                     expect_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as the file holds it (rows of it), checked against the expected shape and dtype."""
        shape = list(self._stored_shape(name))
        if rows != slice(None):
            shape[0] = len(range(*rows.indices(shape[0])))
        if expect is not None and tuple(shape) != tuple(expect):
            raise CheckpointError(f"{self.where(name)}: tensor {name!r} has shape {tuple(shape)}, "
                                  f"expected {tuple(expect)}")
        tensor = self._stored_tensor(name, rows)
        if expect_dtype is not None and tensor.dtype != expect_dtype:
            raise CheckpointError(f"{self.where(name)}: tensor {name!r} has dtype {tensor.dtype}, "
                                  f"expected {expect_dtype}")
        return tensor.to(device=self.device, dtype=dtype or tensor.dtype)

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _stored_tensor(self, name: str, rows: slice) -> torch.Tensor:
        view = self._slice(name)
        try:
            return view[rows] if rows != slice(None) else view[:]
        except SafetensorError as e:
            raise CheckpointError(f"{self.where(name)}: tensor {name!r}: {e}") from None
