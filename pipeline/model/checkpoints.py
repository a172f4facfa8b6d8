"""Where a training run keeps its checkpoints: ``<stage>.ckpt/step-NNNNNN.ckpt`` beside the stage's output.

The naming lives here, below both the training loop (which writes them) and decoding (which reads the
newest of a run in progress), so neither imports the other for it; the stage contract names the
directory with ``checkpoint_dir_for``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

CKPT_PATTERN = re.compile(r"step-(\d+)\.ckpt$")


def checkpoint_dir_for(final_dir: Path) -> Path:
    """The directory a resumable stage checkpoints into: a sibling of its output that outlives a failed run."""
    return Path(final_dir).with_name(f"{Path(final_dir).name}.ckpt")


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:06d}.ckpt"


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step-*.ckpt") if (m := CKPT_PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path) -> Optional[Path]:
    found = checkpoints(directory) if Path(directory).is_dir() else []
    return found[-1] if found else None
