"""Perplexity and zero-shot accuracy of a (pruned) model."""
