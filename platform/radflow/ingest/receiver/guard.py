"""Whether the receiver may use its C-STORE fast path: the one place that decides.

The fast path (:mod:`radflow.ingest.receiver.transport` and :mod:`radflow.ingest.receiver.dimse`)
subclasses pynetdicom's socket, DUL and DIMSE providers, overrides private methods, swaps the
class of objects pynetdicom made and imports private names (``pynetdicom._handlers``,
``pynetdicom.dimse._QueueItem``), and it writes file meta information and command sets the way
pynetdicom and pydicom encode them. So it runs only with the releases it was written and tested
against (:data:`WRITTEN_FOR`, pinned in pyproject.toml and constraints.txt). Nothing here imports
anything private: the fast-path modules are imported only once :func:`fast_path` has said yes,
so the receiver package (and ``radflow status``, which reads its counters) imports with any
pynetdicom. Otherwise the receiver runs on pynetdicom's public API
(:mod:`radflow.ingest.receiver.server`): correct, slower.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any, Final, Protocol

from radflow.settings import Settings

if TYPE_CHECKING:
    from pynetdicom import AE

    from radflow.ingest.receiver.server import AssociationListener, Refused
    from radflow.ingest.receiver.spool import IncomingFiles

logger = logging.getLogger(__name__)

# The releases the fast path was written and tested for (tests/ingest/receiver/test_guard.py
# checks that pyproject.toml and constraints.txt pin exactly these).
WRITTEN_FOR: Final = {"pynetdicom": "3.0.4", "pydicom": "3.0.2"}


class FastPath(Protocol):
    """What the receiver uses of the fast path (radflow/ingest/receiver/transport.py)."""

    def start_server(
        self,
        ae: AE,
        address: tuple[str, int],
        evt_handlers: list[Any],
        *,
        incoming: IncomingFiles,
        listen_fd: int | None = None,
        on_refused: Refused | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> AssociationListener: ...


def installed() -> dict[str, str]:
    """The versions of the packages in :data:`WRITTEN_FOR` that are imported here."""
    import pydicom
    import pynetdicom

    return {"pynetdicom": pynetdicom.__version__, "pydicom": pydicom.__version__}


def fast_path(settings: Settings) -> FastPath | None:
    """The fast path, if the operator allows it and it fits what is installed; else None.

    Says why in one log record when it is not used: INFO when the operator turned it off, a
    WARNING when pynetdicom or pydicom differ from :data:`WRITTEN_FOR` or lack what it uses.
    """
    if not settings.receiver_fast_path:
        logger.info("RADFLOW_RECEIVER_FAST_PATH is off: the receiver uses pynetdicom's public API")
        return None
    versions = installed()
    different = {name: v for name, v in versions.items() if v != WRITTEN_FOR[name]}
    if different:
        logger.warning(
            "the receiver's C-STORE fast path was written for %s but %s is installed; using "
            "pynetdicom's public API (correct, slower). Install those versions (constraints.txt), "
            "or check radflow/ingest/receiver/transport.py and dimse.py against the new ones and "
            "update radflow.ingest.receiver.guard.WRITTEN_FOR",
            _named(WRITTEN_FOR),
            _named(different),
        )
        return None
    try:
        from radflow.ingest.receiver import transport
    except ImportError as exc:
        logger.warning(
            "the receiver's C-STORE fast path cannot load with this pynetdicom (%s); using "
            "pynetdicom's public API (correct, slower). Reinstall pynetdicom==%s.",
            exc,
            WRITTEN_FOR["pynetdicom"],
        )
        return None
    return transport


def _named(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in versions.items())
