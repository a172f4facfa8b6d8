"""Evaluation: perplexity and bits per byte of held-out documents."""
