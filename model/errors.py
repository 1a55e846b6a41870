"""The one error type for a checkpoint that cannot be used: its message names the file and the key or tensor."""


class CheckpointError(ValueError):
    """A checkpoint directory, config.json or safetensors file is missing, malformed or inconsistent."""
