"""DICOM TLS for the receiver: the server side's TLS context, made from the settings.

With ``RADFLOW_RECEIVER_TLS_CERT_FILE`` and ``RADFLOW_RECEIVER_TLS_KEY_FILE`` the receiver's port
speaks TLS only (TLS 1.2 or later, as the BCP 195 profiles of DICOM PS3.15 Annex B require), and
with ``RADFLOW_RECEIVER_TLS_CA_FILE`` too, every sender must present a certificate one of those
authorities signed (mutual TLS). The files are read once, when the receiver starts: a renewed
certificate takes effect at the next start.

Only :mod:`ssl` here, no DICOM networking: ``radflow status`` reports :func:`mode` through this
module. How connections are wrapped, and a failed handshake refused without holding up other
senders, is the association server's part (radflow/ingest/receiver/server.py).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from radflow.errors import RadflowError
from radflow.settings import Settings

OFF, ON, MUTUAL = "off", "on", "mutual"


class TLSNotUsable(RadflowError):
    """A certificate, key or CA file the receiver cannot use; the message says which and why."""


def mode(settings: Settings) -> str:
    """How the receiver's port is configured: "off" (plain TCP), "on" (TLS), or "mutual" (TLS,
    and every sender presents a certificate signed by ``receiver_tls_ca_file``)."""
    if settings.receiver_tls_cert_file is None:
        return OFF
    return ON if settings.receiver_tls_ca_file is None else MUTUAL


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The receiver's TLS context; None when TLS is off. Raises :class:`TLSNotUsable`."""
    cert, key = settings.receiver_tls_cert_file, settings.receiver_tls_key_file
    if cert is None or key is None:  # the settings allow both or neither
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # An encrypted key would make OpenSSL ask for its password on the terminal: refused.
        context.load_cert_chain(cert, key, password=_no_password)
    except OSError as exc:  # ssl.SSLError included
        raise TLSNotUsable(
            f"the receiver cannot use its TLS certificate {cert} with key {key} ({exc}); set "
            "RADFLOW_RECEIVER_TLS_CERT_FILE to a readable PEM certificate (chain) and "
            "RADFLOW_RECEIVER_TLS_KEY_FILE to its private key, PEM and not encrypted (protect "
            "it by file permissions: 0600, owned by the receiver's user)"
        ) from exc
    ca = settings.receiver_tls_ca_file
    if ca is not None:
        _require_client_certificates(context, ca)
    return context


def _require_client_certificates(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except OSError as exc:
        raise TLSNotUsable(
            f"the receiver cannot read the certificate authorities in {ca} ({exc}); set "
            "RADFLOW_RECEIVER_TLS_CA_FILE to a readable PEM file of the CA certificates that "
            "sign your senders' certificates, or unset it to accept senders without one"
        ) from exc
    context.verify_mode = ssl.CERT_REQUIRED


def _no_password() -> bytes:
    return b""
