"""The model: a GPT-style decoder (gpt.py), decoding with a KV cache (generate.py), transformers export (export.py),
the one loader and publisher (io.py), checkpoint naming (checkpoints.py) and same-function checks (equivalence.py)."""
from pipeline.model.gpt import GPT, ModelConfig, embedding_params, flops_per_token, non_embedding_params

__all__ = ["GPT", "ModelConfig", "embedding_params", "flops_per_token", "non_embedding_params"]
