"""The library knows nothing of Hydra or the stage contract, and its packages depend on each other one way."""
from __future__ import annotations

import ast

import pytest

from pipeline import PROJECT_ROOT

LIBRARY = ["data", "dedup", "dpo", "evaluate", "filter", "model", "scaling", "sft", "tokenizer", "tracking", "train"]
FORBIDDEN = ("hydra", "omegaconf", "pipeline.config", "pipeline.contract", "pipeline.stages")


def imported(package: str) -> dict[str, set[str]]:
    """Every module each file of ``pipeline/<package>`` imports, at the top or inside a function."""
    out = {}
    for path in sorted((PROJECT_ROOT / "pipeline" / package).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[str(path.relative_to(PROJECT_ROOT))] = names
    return out


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_imports_neither_hydra_nor_the_contract(package):
    for path, names in imported(package).items():
        bad = sorted(n for n in names if n.startswith(FORBIDDEN))
        assert not bad, f"{path} imports {bad}"


def test_model_does_not_depend_on_training():
    """Training uses decoding (samples) and the checkpoint naming; neither reaches back into pipeline.train."""
    for path, names in imported("model").items():
        assert not [n for n in names if n.startswith("pipeline.train")], f"{path} imports the training package"

