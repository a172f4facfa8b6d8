"""Where a training run keeps its checkpoints: ``<stage>.ckpt/step-NNNNNN.ckpt`` beside the stage's output.

The naming lives here, below both the training loop (which writes them) and decoding (which reads the
newest of a run in progress), so neither imports the other for it; the stage contract names the
directory with ``checkpoint_dir_for``.
"""
from __future__ import annotations

import os
import re
import sys
import zipfile
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


def intact(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint file: torch writes a zip archive, whose directory is its last
    bytes, so a file cut short (a full disk, an interrupted copy) has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(directory: Path, set_aside_broken: bool = False) -> Optional[Path]:
    """The newest intact checkpoint in ``directory``, or None.

    A newer one that is not intact is skipped with a line saying so; with ``set_aside_broken`` it is
    renamed to ``<name>.broken`` (kept for inspection, no longer a checkpoint), so a resumed run that
    writes that step again cannot be confused by it.
    """
    found = checkpoints(directory) if Path(directory).is_dir() else []
    newest, broken = None, []
    for path in reversed(found):
        if intact(path):
            newest = path
            break
        broken.append(path)
    for path in broken:
        note = ""
        if set_aside_broken:
            try:
                os.replace(path, path.with_name(path.name + ".broken"))
            except FileNotFoundError:  # another rank of a distributed job did it first
                pass
            note = f"; renamed to {path.name}.broken"
        print(f"{path} is not a whole checkpoint (truncated or unreadable){note}; "
              f"{f'using {newest.name} instead' if newest else 'no older checkpoint is intact'}",
              file=sys.stderr, flush=True)
    return newest
