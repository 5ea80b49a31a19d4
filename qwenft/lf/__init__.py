"""LLaMA-Factory: rendering its YAML, launching its CLI (every subprocess), its tokenized-data cache."""
