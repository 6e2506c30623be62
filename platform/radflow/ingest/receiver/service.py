"""``radflow receive``: one receiver process, or a supervisor of several (receiver/workers.py)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from radflow.ingest.receiver.scp import Receiver
from radflow.ingest.receiver.workers import Supervisor, drain_orphans, worker_spool
from radflow.settings import Settings
from radflow.store import ObjectStore


def serve(
    settings: Settings,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    host: str | None = None,
    port: int | None = None,
    ae_title: str | None = None,
    tick: Callable[[], object] | None = None,
) -> None:
    """Receive until SIGTERM or Ctrl-C, as ``RADFLOW_RECEIVER_WORKERS`` says.

    First indexes what waits in spool folders no receiver of this configuration owns.
    """
    service: Receiver | Supervisor
    if settings.receiver_workers > 1:
        service = Supervisor(
            settings,
            host=host or settings.receiver_host,
            port=settings.receiver_port if port is None else port,
            ae_title=ae_title or settings.receiver_ae_title,
        )
        owned = service.owned_spools()
    else:
        service = Receiver(
            settings,
            session_factory=session_factory,
            store=store,
            host=host,
            port=port,
            ae_title=ae_title,
        )
        owned = {settings.spool}
    drain_orphans(settings, owned, session_factory=session_factory, store=store)
    service.serve_forever(tick=tick)


def serve_worker(
    settings: Settings,
    index: int,
    listen_fd: int,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    ae_title: str | None = None,
) -> None:
    """One of a supervisor's workers: receive on the shared socket and index, nothing else."""
    Receiver(
        settings,
        session_factory=session_factory,
        store=store,
        ae_title=ae_title,
        spool=worker_spool(settings.spool, index),
        listen_fd=listen_fd,
    ).serve_forever()
