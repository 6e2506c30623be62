"""Keyed pseudonyms: the same patient always maps to the same pseudonym, which reveals nothing."""

from __future__ import annotations

import hashlib
import hmac


def pseudonymise(value: str, key: str, prefix: str = "P") -> str:
    """HMAC-SHA256 of ``value`` under ``key``, shortened; stable while the key is kept."""
    digest = hmac.new(key.encode(), value.strip().encode(), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:20]}"
