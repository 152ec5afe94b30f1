"""Sampling: vLLM engines on Ray Data run a stage (one module per stage strategy) over prompts into shards."""
