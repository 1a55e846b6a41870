"""gpt-oss in pure PyTorch: config, layers, checkpoint loading, tokenizer and harmony format. No Ray, no HTTP."""

from model.config import GptOssConfig
from model.errors import CheckpointError
from model.experts import Experts, ExpertsFactory, LocalExperts
from model.loader import load_model
from model.transformer import GptOssForCausalLM

__all__ = ["CheckpointError", "Experts", "ExpertsFactory", "GptOssConfig", "GptOssForCausalLM", "LocalExperts",
           "load_model"]
