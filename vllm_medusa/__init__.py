"""Medusa speculative decoding for vLLM."""

__version__ = "0.1.0"

# The vLLM release this plugin's patches were written against (major.minor).
SUPPORTED_VLLM = "0.32"
