"""The embedded default model: the random `tiny` checkpoint, written on first start and cached."""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock

from gptoss_serve.model.synthetic import write_preset

CACHE_ENV = "GPTOSS_CACHE_DIR"


def default_model_dir() -> Path:
    """Writes the tiny random checkpoint once per machine (replicas starting together share one write)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gptoss-serve")
    target = root / "tiny-random"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "tiny-random.lock")):
        if not (target / "config.json").exists():
            partial = root / f"tiny-random.partial-{os.getpid()}"
            write_preset(partial, "tiny", seed=0)
            partial.rename(target)
    return target
