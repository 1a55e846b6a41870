"""Turns what a user passes as a model (a local directory or a Hugging Face Hub id) into a local directory."""

from __future__ import annotations

import re
from pathlib import Path

from gptoss_serve.model.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json"]
# the openai repos also hold the weights again in OpenAI's own layouts: never fetch those
OTHER_LAYOUTS = ["original/*", "metal/*"]


def resolve_checkpoint(path_or_hub_id: str | Path, *, revision: str | None = None) -> Path:
    """A local directory as it is; an id such as `openai/gpt-oss-20b` through huggingface_hub (its cache first)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists():
        raise CheckpointError(f"{path}: not a directory; pass the checkpoint directory that holds config.json")
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=CHECKPOINT_FILES,
                                      ignore_patterns=OTHER_LAYOUTS))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CheckpointError(
            f"{text}: not a local directory, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). Pass a local checkpoint directory, or check the network, the id and "
            f"HF_TOKEN.") from None
