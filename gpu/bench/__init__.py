"""Benchmarks: several methods and settings in one run, their tables, peers side by side."""
