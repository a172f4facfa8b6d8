"""Tokenizers (byte-level BPE, plain bytes, or a given tokenizer.json) and corpus encoding."""
