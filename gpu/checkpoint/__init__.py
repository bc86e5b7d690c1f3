"""Checkpoints: the model's shape, safetensors shards, block sources, staging, the assembled output, locks, disk space."""
