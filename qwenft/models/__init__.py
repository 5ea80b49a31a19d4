"""Qwen models: presets, resolving a model spec, the embedded tiny models, the model to load."""
