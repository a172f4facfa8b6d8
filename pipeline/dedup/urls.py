"""URL canonicalisation: two spellings of one page give one key."""
from __future__ import annotations

from typing import Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": "80", "https": "443"}
TRACKING_PREFIXES = ("utm_",)
TRACKING_PARAMS = frozenset({"fbclid", "gclid", "mc_cid", "mc_eid", "ref", "ref_src", "_ga", "yclid"})


def canonical_url(url: Optional[str]) -> Optional[str]:
    """Lower-case scheme and host, no ``www.``, default port, fragment, tracking parameters or trailing
    slash; query parameters sorted; http and https merged. None for a missing or unparsable URL."""
    if not url or not url.strip():
        return None
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower().rstrip(".")
        port = parts.port
    except ValueError:
        return None
    if not host:
        return None
    scheme = parts.scheme.lower() or "http"
    if host.startswith("www."):
        host = host[4:]
    netloc = host if port is None or str(port) == DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if k.lower() not in TRACKING_PARAMS and not k.lower().startswith(TRACKING_PREFIXES))
    path = unquote(parts.path).rstrip("/") or "/"
    scheme = "http" if scheme in ("http", "https") else scheme
    return urlunsplit((scheme, netloc, path, urlencode(query), ""))
