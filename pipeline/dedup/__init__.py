"""Deduplication at four levels: URL, exact text, MinHash near-duplicates and repeated lines."""
