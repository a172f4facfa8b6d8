"""PII redaction: e-mail addresses, IPv4/IPv6 addresses and phone numbers become placeholders.

Regular expressions find candidates; IP candidates are confirmed with ``ipaddress`` and phone
candidates by their digit count, so version numbers and dates stay as they are.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Dict

from pipeline.errors import check

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]*\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# "logo@2x.png" looks like an address but names an image
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".css", ".js")
DATE_START = re.compile(r"(?:19|20)\d{2}[-./ ](?:0?[1-9]|1[0-2])[-./ ](?:0?[1-9]|[12]\d|3[01])\b")
# +country code, optional (area), groups of digits joined by spaces, dots or dashes
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,4}(?![\w])")


@dataclass
class PiiSpec:
    enabled: bool = True
    email: str = "<EMAIL>"  # placeholder; an empty string leaves e-mail addresses as they are
    ip_address: str = "<IP_ADDRESS>"
    phone: str = "<PHONE>"
    min_phone_digits: int = 9  # shorter digit groups (dates, prices, years) are not phone numbers
    max_phone_digits: int = 15  # E.164's limit

    def __post_init__(self):
        check(self.min_phone_digits >= 1, "min_phone_digits", self.min_phone_digits, "at least 1")
        check(self.max_phone_digits >= self.min_phone_digits, "max_phone_digits", self.max_phone_digits,
              f"at least min_phone_digits ({self.min_phone_digits})")


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def redact(text: str, spec: PiiSpec) -> tuple[str, Dict[str, int]]:
    """Return the redacted text and how many of each kind were replaced."""
    counts = {"email": 0, "ip_address": 0, "phone": 0}

    def sub(pattern: re.Pattern, kind: str, placeholder: str, accept, value: str) -> str:
        def repl(m: re.Match) -> str:
            if not accept(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return placeholder
        return pattern.sub(repl, value)

    if spec.email and "@" in text:  # the check is 30x faster than the pattern's scan of a text without one
        text = sub(EMAIL, "email", spec.email, lambda s: not s.lower().endswith(FILE_SUFFIXES), text)
    if spec.ip_address:
        text = sub(IPV6, "ip_address", spec.ip_address, lambda s: ":" in s and _is_ip(s), text)
        text = sub(IPV4, "ip_address", spec.ip_address, _is_ip, text)
    if spec.phone:
        def phone_like(s: str) -> bool:
            digits = sum(c.isdigit() for c in s)
            return spec.min_phone_digits <= digits <= spec.max_phone_digits and not DATE_START.match(s)
        text = sub(PHONE, "phone", spec.phone, phone_like, text)
    return text, counts
