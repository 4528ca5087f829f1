"""llama-tuner: find the fastest llama.cpp settings for a GGUF model on this machine."""

__version__ = "0.1.0"
