"""Keyed pseudonyms, and the keys each use derives from the one secret (``pseudonym_key``).

The secret itself keys nothing directly: every use gets its own key derived from it (HKDF,
RFC 5869), so values made for one use cannot be joined with those of another:

- ``dashboard_key``: the pseudonym the database stores and the dashboard shows;
- ``export_key(salt)``: Patient IDs and UIDs of one export; the salt is random per export, or
  fixed per recipient so exports to one recipient stay consistent with each other.

A key id (``key_id``) names a derived key in the audit trail without revealing it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_DASHBOARD = b"radflow/dashboard-pseudonym/v1"
_EXPORT = b"radflow/export/v1/"


def derive_key(secret: str, purpose: bytes) -> bytes:
    """A 256-bit key for ``purpose`` from ``secret`` (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
        secret.encode()
    )


@functools.lru_cache(maxsize=4)  # ingest asks once per new patient
def dashboard_key(secret: str) -> bytes:
    return derive_key(secret, _DASHBOARD)


def export_key(secret: str, salt: str) -> bytes:
    """The key of one export (or of every export to one recipient): ``salt`` selects it."""
    return derive_key(secret, _EXPORT + salt.encode())


def new_export_salt() -> str:
    return f"export-{secrets.token_hex(16)}"


def recipient_salt(recipient: str) -> str:
    return f"recipient-{recipient.strip()}"


def key_id(key: bytes) -> str:
    """A short public name of a derived key (a hash of it): enough to tell keys apart."""
    return hashlib.sha256(b"radflow/key-id/" + key).hexdigest()[:16]


def keyed_pseudonym(value: str, key: bytes, prefix: str = "P") -> str:
    """HMAC-SHA256 of ``value`` under a derived ``key``, shortened; stable while it is kept."""
    digest = hmac.new(key, value.strip().encode(), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:20]}"


def pseudonymise(value: str, secret: str, prefix: str = "P") -> str:
    """The dashboard pseudonym of a patient ID: keyed with ``dashboard_key(secret)``."""
    return keyed_pseudonym(value, dashboard_key(secret), prefix)
