"""Commands beside the stages that compose the run's config but write nothing (``python -m pipeline.tools.<name>``)."""
