from __future__ import annotations

import gzip

import pytest


@pytest.fixture(scope="session")
def passages(data_dir) -> list[str]:
    """200 real passages of about 1,200 characters from a public-domain novel, cut at paragraph breaks."""
    text = gzip.open(data_dir / "pretrain/english_novels/Doyle_Hound_1902.txt.gz", "rt", encoding="utf-8").read()
    out, current = [], ""
    for para in text.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= 1200:
            out.append(current)
            current = ""
    assert len(out) >= 200
    return out[:200]
