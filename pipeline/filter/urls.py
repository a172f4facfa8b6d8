"""URL and domain lists: a blocklist (unwanted sites) and an opt-out list (owners who refused consent)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional
from urllib.parse import urlsplit

from pipeline.filter.quality import load_word_list


@dataclass
class UrlSpec:
    enabled: bool = True
    blocklist: List[str] = field(default_factory=list)  # domains (a domain blocks its subdomains) or URL prefixes
    blocklist_files: List[str] = field(default_factory=list)  # files, one entry per line; '#' starts a comment
    optout: List[str] = field(default_factory=list)  # the same forms, for data-consent opt-outs
    optout_files: List[str] = field(default_factory=list)


def host_of(url: str) -> str:
    try:
        host = urlsplit(url if "://" in url else f"//{url}").hostname or ""
    except ValueError:
        return ""
    return host.lower().rstrip(".").removeprefix("www.")


class UrlList:
    """Matches a URL by its host (and every parent domain) or by a URL prefix."""

    def __init__(self, entries: Iterable[str]):
        self.domains, self.prefixes = set(), []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            if "/" in entry.split("://", 1)[-1]:
                self.prefixes.append(entry.lower())
            else:
                self.domains.add(host_of(entry))

    def __len__(self) -> int:
        return len(self.domains) + len(self.prefixes)

    def match(self, url: Optional[str]) -> Optional[str]:
        """The entry that matches ``url``, or None."""
        if not url:
            return None
        host = host_of(url)
        parts = host.split(".")
        for i in range(len(parts) - 1):
            candidate = ".".join(parts[i:])
            if candidate in self.domains:
                return candidate
        lowered = url.lower()
        return next((p for p in self.prefixes if lowered.startswith(p)), None)


def build_lists(spec: UrlSpec) -> tuple[UrlList, UrlList]:
    block = [*spec.blocklist, *(w for f in spec.blocklist_files for w in load_word_list(f))]
    optout = [*spec.optout, *(w for f in spec.optout_files for w in load_word_list(f))]
    return UrlList(block), UrlList(optout)
