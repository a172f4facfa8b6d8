"""File helpers shared by the library's packages."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst`` (instant, no space); across filesystems or where links are not allowed, copy it
    aside and rename, so ``dst`` is whole or absent. A full disk, an existing ``dst`` or a missing folder is raised."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.ENOENT):
            raise
        tmp = Path(dst).with_name(Path(dst).name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def file_hash(path: Path) -> str:
    """The sha256 of a file's bytes, in hex (a manifest's identity)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
