"""Benchmarks: each compares the pipeline against a baseline measured in the same run (a ratio)."""
