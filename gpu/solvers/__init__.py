"""The torch twins of `admm_prune.reference`, file for file (plus `linalg` and `checks`): tensors in, tensors out."""
