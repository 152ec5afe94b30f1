"""mpo-data: multimodal preference data for Mixed Preference Optimization, built with vLLM on Ray."""

__version__ = "0.1.0"
