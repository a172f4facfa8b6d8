"""The stages, in pipeline order: name -> (module, one-line description)."""
import importlib
from types import ModuleType

STAGES = {
    "filter": ("pipeline.stages.filter", "extract, language-filter, quality-filter and redact crawled pages"),
    "tokenize": ("pipeline.stages.tokenize", "train a tokenizer and encode the corpus into train/val token shards"),
}


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(STAGES[name][0])
