"""The stages, in pipeline order: name -> (module, one-line description); TOOLS run beside the pipeline."""
import importlib
from types import ModuleType

STAGES = {
    "filter": ("pipeline.stages.filter", "extract, language-filter, quality-filter and redact crawled pages"),
    "dedup": ("pipeline.stages.dedup", "remove URL, exact and near-duplicate documents and boilerplate lines"),
    "tokenize": ("pipeline.stages.tokenize", "train a tokenizer and encode the corpus into train/val token shards"),
    "pretrain": ("pipeline.stages.pretrain", "train a GPT-style decoder on the token shards (resumable)"),
    "cpt": ("pipeline.stages.cpt", "continue pretraining on a domain corpus; report adaptation and forgetting"),
    "sft": ("pipeline.stages.sft", "fine-tune on instruction data with LoRA adapters; base vs tuned generations"),
    "dpo": ("pipeline.stages.dpo", "tune the sft model on human preference pairs with DPO and a LoRA adapter"),
    "merge": ("pipeline.stages.merge", "fold the LoRA adapter (sft's, or dpo's) into the model: model.pt and hf/"),
    "evaluate": ("pipeline.stages.evaluate", "perplexity and bits per byte of the trained models on held-out documents"),
    "scaling": ("pipeline.stages.scaling", "fit Kaplan and Chinchilla scaling laws to a sweep's runs (after a sweep)"),
}

TOOLS = {
    "dedup-eval": ("pipeline.stages.dedup_eval", "measure near-duplicate precision and recall on the dedup input"),
}


def load_stage(name: str) -> ModuleType:
    return importlib.import_module({**STAGES, **TOOLS}[name][0])
