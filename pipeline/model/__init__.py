"""The model: a GPT-style decoder (gpt.py) and its settings (spec.py, importable without torch), decoding with a KV
cache (generate.py), transformers export (export.py), the one loader and publisher (io.py), checkpoint naming
(checkpoints.py) and same-function checks (equivalence.py)."""
