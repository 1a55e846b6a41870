"""gpt-oss in pure PyTorch: config, layers, checkpoint loading, tokenizer and harmony format. No Ray, no HTTP."""

from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.errors import CheckpointError
from gptoss_serve.model.experts import Experts, ExpertsFactory, LocalExperts
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.packed_experts import Mxfp4Experts
from gptoss_serve.model.transformer import GptOssForCausalLM

__all__ = ["CheckpointError", "Experts", "ExpertsFactory", "GptOssConfig", "GptOssForCausalLM", "LocalExperts",
           "Mxfp4Experts", "load_model"]
