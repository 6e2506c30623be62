"""The DICOM receiver: a C-ECHO and C-STORE SCP (pynetdicom) in front of the spool and indexer.

Each association runs in its own pynetdicom thread. A C-STORE dataset is streamed into a
temporary file in ``spool/incoming`` (memory does not grow with the instance or study size),
fsynced while a worker thread validates it with :func:`radflow.dicom.instance.read_header`, and
moved into ``spool/ready`` (radflow/ingest/receiver/spool.py says how that is crash-safe with one
fsync); only then does the sender get the success status. Refused instances get the failure
status of :mod:`radflow.ingest.receiver.statuses` and a Rejection row. The indexer thread stores
and indexes the spool behind the senders' backs.

Two paths receive, chosen once per start by :func:`radflow.ingest.receiver.guard.fast_path`:

- the **fast path** (:mod:`radflow.ingest.receiver.transport` and
  :mod:`~radflow.ingest.receiver.dimse`), which reaches into pynetdicom's internals and so runs
  only with the pynetdicom and pydicom releases it was written for, unless
  ``RADFLOW_RECEIVER_FAST_PATH=false``;
- the **plain path** otherwise: pynetdicom's public API (:mod:`radflow.ingest.receiver.server`),
  pynetdicom streaming each dataset to a file itself (``STORE_RECV_CHUNKED_DATASET``). Should a
  pynetdicom lack that option, it holds datasets in memory (one warning says so) and
  :meth:`Receiver._on_c_store` writes each to the spool.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pydicom.config
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import unit_of_work
from radflow.dicom.instance import SUPPORTED_TRANSFER_SYNTAXES, InstanceHeader, read_header
from radflow.errors import InvalidInstance
from radflow.ingest import rejection
from radflow.ingest.receiver import guard, server
from radflow.ingest.receiver.counters import ReceiverCounters
from radflow.ingest.receiver.indexer import UNHASHED, Indexer
from radflow.ingest.receiver.spool import Spool
from radflow.ingest.receiver.statuses import OUT_OF_RESOURCES, SUCCESS, failure_status
from radflow.ingest.receiver.workers import until_signal
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

# Explicit VR Little Endian first: what an SCP prefers when a sender offers several.
TRANSFER_SYNTAXES = sorted(
    SUPPORTED_TRANSFER_SYNTAXES, key=lambda u: (u != "1.2.840.10008.1.2.1", u)
)
# Larger PDUs mean fewer Python round trips per instance (DCMTK sends up to 128 KiB); memory
# stays bounded by one PDU per association.
MAX_PDU_BYTES = 1 << 20
MAX_ASSOCIATIONS = 32
CALLING_AET_NOT_ALLOWED = "calling-aet-not-allowed"


class Receiver:
    """The receiver service: ``start()``, ``stop()``, or ``serve_forever()`` until a signal."""

    def __init__(
        self,
        settings: Settings,
        *,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        host: str | None = None,
        port: int | None = None,
        ae_title: str | None = None,
        spool: Path | None = None,
        listen_fd: int | None = None,
    ) -> None:
        """``spool`` and ``listen_fd``: set for one of several workers (receiver/workers.py)."""
        self.settings = settings
        self.session_factory = session_factory
        self.host = settings.receiver_host if host is None else host
        self.requested_port = settings.receiver_port if port is None else port
        self.ae_title = ae_title or settings.receiver_ae_title
        self.spool = Spool(spool or settings.spool)
        self.listen_fd = listen_fd
        self.spool.root.mkdir(parents=True, exist_ok=True)
        self.counters = ReceiverCounters(self.spool.stats_path)
        self.indexer = Indexer(
            self.spool,
            settings=settings,
            session_factory=session_factory,
            store=store,
            counters=self.counters,
        )
        self._server: server.AssociationListener | None = None
        self._checker: ThreadPoolExecutor | None = None
        self._previous_tempdir: str | None = None
        self._previous_validation: tuple[int, int] | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (useful when started on port 0)."""
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    def start(self) -> None:
        self.spool.open()
        server.configure_pynetdicom()
        # pynetdicom's temporary files go to the process temp dir, pointed at spool/incoming so
        # accepting a dataset is a rename on the same filesystem.
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.spool.incoming)
        self._relax_value_validation()
        self.indexer.start()
        self._checker = ThreadPoolExecutor(thread_name_prefix="radflow-header-check")
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        address = (self.host, self.requested_port)
        handlers = [(evt.EVT_C_STORE, self._on_c_store), (evt.EVT_REJECTED, self._on_rejected)]
        fast = guard.fast_path(self.settings)
        if fast is None:
            self._server = server.start_server(ae, address, handlers, listen_fd=self.listen_fd)
        else:
            self._server = fast.start_server(
                ae,
                address,
                handlers,
                incoming=self.spool.incoming_files,
                listen_fd=self.listen_fd,
            )
        # The socket's own address: a worker inherits a socket bound by its supervisor (to
        # --host), which its own settings' receiver_host need not match.
        bound_host = self._server.server_address[0]
        logger.info(
            "DICOM receiver %s listening on %s:%d, spool %s (%s path)",
            self.ae_title,
            bound_host,
            self.port,
            self.spool.root,
            "plain" if fast is None else "fast",
        )

    def stop(self) -> None:
        """Stop accepting, finish the indexing batch in progress; the rest waits in the spool."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.indexer.stop()
        self.counters.save(force=True)
        if self._checker is not None:
            self._checker.shutdown()
            self._checker = None
        self.spool.close()
        tempfile.tempdir = self._previous_tempdir
        if self._previous_validation is not None:
            settings = pydicom.config.settings
            settings.reading_validation_mode, settings.writing_validation_mode = (
                self._previous_validation
            )
            self._previous_validation = None

    def _relax_value_validation(self) -> None:
        """Turn off pydicom's value checks (regular expressions on every UID, date, name...).

        A receiver keeps what modalities send, byte for byte; the values Radflow relies on are
        checked by :func:`radflow.dicom.instance.read_header` with specific reasons. pydicom's
        checks would only log warnings for harmless non-conformance, and they are about a fifth of
        pynetdicom's CPU per C-STORE (command sets are pydicom datasets). Process-wide, as
        pydicom's configuration is: the receiver runs in a process of its own.
        """
        settings = pydicom.config.settings
        self._previous_validation = (
            settings.reading_validation_mode,
            settings.writing_validation_mode,
        )
        settings.reading_validation_mode = pydicom.config.IGNORE
        settings.writing_validation_mode = pydicom.config.IGNORE

    def serve_forever(
        self, tick: Callable[[], object] | None = None, tick_seconds: float = 1.0
    ) -> None:
        """Run until SIGTERM or SIGINT (Ctrl-C), then stop cleanly.

        ``tick`` runs every ``tick_seconds`` in the main thread: the CLI uses it to promote quiet
        studies to stable and start their processing (radflow must not import the flows itself).
        """
        with until_signal() as stopped:
            self.start()
            try:
                while not stopped.wait(tick_seconds):
                    if tick is not None:
                        tick()
            finally:
                self.stop()

    def wait_indexed(self, timeout: float = 60.0) -> bool:
        """Block until every spooled instance is indexed; False on timeout."""
        return self.indexer.wait_idle(timeout)

    # -- event handlers (run in the association's thread) -------------------------------------

    def _on_c_store(self, event: evt.Event) -> int:
        self.counters.add("received")
        origin = str(event.assoc.requestor.ae_title)
        written: Path | None = None  # a file this handler wrote (pynetdicom deletes its own)
        try:
            received = _streamed_file(event)
            if received is None:  # held in memory: see server.configure_pynetdicom
                received = written = self._write_incoming(event)
            header, marked = self._sync_and_check(received)
            spooled = self.spool.accept(received, header.sop_instance_uid, marked)
        except InvalidInstance as exc:
            status = self._refuse(exc, origin)
        except OSError as exc:
            # Disk full or spool unwritable: refusing (the sender retries later) is the only
            # answer that does not risk acknowledging an instance that is not on disk.
            logger.error("cannot spool an instance from %s: %s", origin, exc)
            problem = InvalidInstance(
                OUT_OF_RESOURCES,
                f"the receiver could not write to its spool ({exc.strerror}); free disk space "
                "or check RADFLOW_SPOOL_DIR",
            )
            status = self._refuse(problem, origin)
        else:
            self.counters.add("spooled")
            self.indexer.submit(spooled, header)
            return SUCCESS
        if written is not None:
            written.unlink(missing_ok=True)
        return status

    def _write_incoming(self, event: evt.Event) -> Path:
        """Write a dataset pynetdicom held in memory to a file of ``spool/incoming``."""
        path = self.spool.incoming_files.take()
        try:
            path.write_bytes(event.encoded_dataset())
        except OSError:
            path.unlink(missing_ok=True)
            raise
        return path

    def _sync_and_check(self, received: Path) -> tuple[InstanceHeader, bool]:
        """fsync a received file here while a worker thread reads and checks its header; the
        header, and whether the file bears the spool's completion mark (Spool.sync).

        This way round, because the fsync releases the GIL for as long as the disk takes and
        the header check needs it: with the fsync in the worker, the worker waited for the GIL
        until the check was done and the two ran one after the other (benchmarks/README.md).
        The SHA-256 is left to the indexer: the sender waits for neither.
        """
        assert self._checker is not None, "start() first"
        checked = self._checker.submit(
            read_header, received, self.settings.max_pixels, digest=lambda: UNHASHED
        )
        try:
            marked = self.spool.sync(received)
        finally:
            # pynetdicom deletes a refused file once the handler returns: let the check end.
            wait([checked])
        return checked.result(), marked

    def _refuse(self, exc: InvalidInstance, origin: str) -> int:
        status = failure_status(exc.reason)
        self.counters.reject(exc.reason)
        logger.warning(
            "refused an instance from %s: %s (status 0x%04X)", origin, exc.reason, status
        )
        self._record(exc, origin)
        return status

    def _on_rejected(self, event: evt.Event) -> None:
        origin = str(event.assoc.requestor.ae_title)
        allowed = self.settings.allowed_calling_aets
        if not allowed or origin.strip() in allowed:
            return  # refused by pynetdicom for another reason (e.g. too many associations)
        problem = InvalidInstance(
            CALLING_AET_NOT_ALLOWED,
            f"association from calling AE title {origin!r} rejected: not in "
            "RADFLOW_ALLOWED_CALLING_AETS",
        )
        self.counters.reject(problem.reason)
        logger.warning("rejected an association from %s: calling AE title not allowed", origin)
        self._record(problem, origin)

    def _record(self, exc: InvalidInstance, origin: str) -> None:
        try:
            with unit_of_work(self.session_factory) as session:
                session.add(rejection("receiver", exc, origin=origin))
        except SQLAlchemyError as db_error:
            # The failure status still reaches the sender and the counters keep the count.
            logger.error("could not record a rejection in the database: %s", db_error)


def _streamed_file(event: evt.Event) -> Path | None:
    """The file a C-STORE dataset was streamed into; None if pynetdicom held it in memory.

    pynetdicom documents an AttributeError for that case; 3.0.4 gives None.
    """
    try:
        path = event.dataset_path
    except AttributeError:
        return None
    return None if path is None else Path(path)
