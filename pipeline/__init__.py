"""LLM experiment pipeline: Hydra-configured stages, chained by Make, logged to MLflow."""
from pathlib import Path

# The directory that holds conf/ and outputs/ (the package is installed editable from it).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
