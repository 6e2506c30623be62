"""The DICOM receiver: a C-ECHO and C-STORE SCP (pynetdicom) in front of the spool and indexer.

Each association runs in its own pynetdicom thread. A C-STORE dataset is streamed into a
temporary file in ``spool/incoming`` (memory does not grow with the instance or study size),
fsynced while a worker thread validates it with :func:`radflow.dicom.instance.read_header` and
the checks of :mod:`radflow.ingest.receiver.checks`, and moved into ``spool/ready``
(radflow/ingest/receiver/spool.py says how that is crash-safe with one fsync); only then does
the sender get the success status. Refused instances get the failure status of
:mod:`radflow.ingest.receiver.statuses` and a Rejection row, and their file is deleted before
the status goes out: whatever goes wrong in the handler (an exception included) is a refusal
with a reason, never pynetdicom's generic 0xC211. The indexer thread stores and indexes the
spool behind the senders' backs.

Associations are checked when requested (called AE title, calling AE title allow-list, an
acceptable presentation context, the indexer alive, room in the spool) and refused with an
A-ASSOCIATE-RJ and a Rejection row; PDUs longer than ``RADFLOW_RECEIVER_MAX_PDU_BYTES`` are
refused before they are read (:class:`radflow.ingest.receiver.server.PduGate`). With
``RADFLOW_RECEIVER_TLS_CERT_FILE`` and ``_KEY_FILE`` every connection is DICOM TLS
(:mod:`radflow.ingest.receiver.tls`); one whose handshake fails is refused with a Rejection row.

**Supervision.** Should the indexer thread die, the receiver stops acknowledging (0xA700 to
C-STORE, associations refused) and :meth:`Receiver.serve_forever` raises :class:`IndexerStopped`,
so ``radflow receive`` exits non-zero for its supervisor (systemd, Docker, or the worker
supervisor of receiver/workers.py) to restart it.

Two paths receive, chosen once per start by :func:`radflow.ingest.receiver.guard.fast_path`:

- the **fast path** (:mod:`radflow.ingest.receiver.transport` and
  :mod:`~radflow.ingest.receiver.dimse`), which reaches into pynetdicom's internals and so runs
  only with the pynetdicom and pydicom releases it was written for, unless
  ``RADFLOW_RECEIVER_FAST_PATH=false``;
- the **plain path** otherwise: pynetdicom's public API (:mod:`radflow.ingest.receiver.server`),
  pynetdicom streaming each dataset to a file itself (``STORE_RECV_CHUNKED_DATASET``). Should a
  pynetdicom lack that option, it holds datasets in memory (one warning says so) and
  :meth:`Receiver._on_c_store` writes each to the spool. On this path a disk that fills up in
  the middle of a dataset aborts that association (pynetdicom writes the file): the free-space
  threshold exists to refuse before that.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from io import FileIO
from pathlib import Path
from typing import cast

import pydicom.config
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import unit_of_work
from radflow.dicom.instance import SUPPORTED_TRANSFER_SYNTAXES, InstanceHeader, read_header
from radflow.errors import InvalidInstance, RadflowError
from radflow.ingest import rejection
from radflow.ingest.receiver import guard, server, tls
from radflow.ingest.receiver.checks import Identity, IndexedIdentity, command_mismatch
from radflow.ingest.receiver.counters import ReceiverCounters
from radflow.ingest.receiver.indexer import UNHASHED, Indexer
from radflow.ingest.receiver.spool import Spool, space_problem
from radflow.ingest.receiver.statuses import (
    ASSOCIATION_REJECT,
    CALLED_AET_NOT_OURS,
    CALLING_AET_NOT_ALLOWED,
    INDEXER_DOWN,
    MALFORMED_ASSOCIATION,
    NO_PRESENTATION_CONTEXT,
    OUT_OF_RESOURCES,
    SUCCESS,
    UNPROCESSABLE,
    failure_status,
)
from radflow.ingest.receiver.workers import until_signal
from radflow.outages import FailureLog, describe, is_outage
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

# Explicit VR Little Endian first: what an SCP prefers when a sender offers several.
TRANSFER_SYNTAXES = sorted(
    SUPPORTED_TRANSFER_SYNTAXES, key=lambda u: (u != "1.2.840.10008.1.2.1", u)
)
MAX_ASSOCIATIONS = 32
TLS_MODES = {
    tls.OFF: "plain TCP (no TLS)",
    tls.ON: "DICOM TLS only",
    tls.MUTUAL: "DICOM TLS only, senders' certificates required",
}


class IndexerStopped(RadflowError):
    def __init__(self, why: str) -> None:
        super().__init__(
            f"the receiver's indexer stopped ({why}); the receiver stopped with it. Its log "
            "holds the traceback; start it again (a supervisor does this by itself): nothing "
            "acknowledged is lost, the spool keeps it"
        )


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
        bind = session_factory.kw.get("bind")
        self.identity = (
            IndexedIdentity(bind, settings.pseudonym_key.get_secret_value())
            if isinstance(bind, Engine)
            else None
        )
        # Read once, here: a certificate or key that cannot be used stops the receiver before
        # anything starts (renewed files take effect at the next start).
        self._tls = tls.server_context(settings)
        self._failures = FailureLog(logger)
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
        # Announced and enforced (server.PduGate); larger PDUs mean fewer Python round
        # trips per instance (DCMTK sends up to 128 KiB), memory stays one PDU per association.
        ae.maximum_pdu_size = self.settings.receiver_max_pdu_bytes
        ae.maximum_associations = MAX_ASSOCIATIONS
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        address = (self.host, self.requested_port)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]
        fast = guard.fast_path(self.settings)
        if fast is None:
            self._server = server.start_server(
                ae,
                address,
                handlers,
                listen_fd=self.listen_fd,
                on_refused=self._on_refused_connection,
                ssl_context=self._tls,
            )
        else:
            self._server = fast.start_server(
                ae,
                address,
                handlers,
                incoming=self.spool.incoming_files,
                listen_fd=self.listen_fd,
                on_refused=self._on_refused_connection,
                ssl_context=self._tls,
            )
        # The socket's own address: a worker inherits a socket bound by its supervisor (to
        # --host), which its own settings' receiver_host need not match.
        bound_host = self._server.server_address[0]
        logger.info(
            "DICOM receiver %s listening on %s:%d, %s, spool %s (%s path)",
            self.ae_title,
            bound_host,
            self.port,
            TLS_MODES[tls.mode(self.settings)],
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
        Raises :class:`IndexerStopped` (after stopping) if the indexer thread dies.
        """
        with until_signal() as stopped:
            self.start()
            try:
                while not stopped.wait(tick_seconds):
                    if self.indexer.failure is not None:
                        raise IndexerStopped(describe(self.indexer.failure))
                    if tick is not None:
                        tick()
            finally:
                self.stop()

    def wait_indexed(self, timeout: float = 60.0) -> bool:
        """Block until every spooled instance is indexed; False on timeout."""
        return self.indexer.wait_idle(timeout)

    # -- event handlers (run in the association's threads) ------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        """Refuse an association that cannot be served (pynetdicom: a handler of EVT_REQUESTED
        may reject it; it then skips negotiation)."""
        request = event.assoc.requestor.primitive
        origin = str(getattr(request, "calling_ae_title", "")).strip() or "?"
        try:
            problem = self._association_problem(event)
        except Exception as exc:  # pynetdicom would go on to fail the same way: rejected here
            self._failures.failed(f"checking an association from {origin}", exc, then="rejected")
            problem = InvalidInstance(
                MALFORMED_ASSOCIATION,
                f"the A-ASSOCIATE request from {origin!r} could not be read ({describe(exc)})",
            )
        if problem is None:
            return
        self.counters.reject(problem.reason)
        logger.warning("rejected an association from %s: %s (%s)", origin, problem.reason, problem)
        self._record(problem, origin)
        event.assoc.acse.send_reject(*ASSOCIATION_REJECT[problem.reason])
        event.assoc.kill()  # as pynetdicom's own rejections: waits until the reject is sent

    def _association_problem(self, event: evt.Event) -> InvalidInstance | None:
        request = event.assoc.requestor.primitive
        assert request is not None, "EVT_REQUESTED comes with the A-ASSOCIATE request"
        called = str(request.called_ae_title).strip()
        calling = str(request.calling_ae_title).strip()
        allowed = self.settings.allowed_calling_aets
        if called != self.ae_title.strip():
            return InvalidInstance(
                CALLED_AET_NOT_OURS,
                f"association from {calling!r} asks for AE title {called!r}; this receiver is "
                f"{self.ae_title!r} (the sender's configuration must name it)",
            )
        if allowed and calling not in allowed:
            return InvalidInstance(
                CALLING_AET_NOT_ALLOWED,
                f"association from calling AE title {calling!r} rejected: not in "
                "RADFLOW_ALLOWED_CALLING_AETS",
            )
        proposed = request.presentation_context_definition_list
        unreadable = [
            context.context_id
            for context in proposed
            if not (context.abstract_syntax and context.transfer_syntax)
            or None in context.transfer_syntax
        ]
        if unreadable:
            return InvalidInstance(
                MALFORMED_ASSOCIATION,
                f"association from {calling!r} proposes presentation contexts {unreadable} "
                "without an abstract syntax or a transfer syntax (PS3.8 9.3.2.2)",
            )
        accepted, _ = negotiate_as_acceptor(proposed, event.assoc.acceptor.supported_contexts)
        if not any(context.result == 0x00 for context in accepted):
            return InvalidInstance(
                NO_PRESENTATION_CONTEXT,
                f"association from {calling!r} proposes {len(proposed)} presentation contexts, "
                "none this receiver accepts (storage SOP classes and verification, in the "
                "transfer syntaxes of radflow.dicom.instance.SUPPORTED_TRANSFER_SYNTAXES)",
            )
        return self._cannot_store()

    def _cannot_store(self) -> InvalidInstance | None:
        """Why no instance can be acknowledged now (the indexer dead, the spool full)."""
        if self.indexer.failure is not None:
            return InvalidInstance(
                INDEXER_DOWN,
                "the receiver's indexer has stopped; instances are refused until the receiver "
                "is restarted (send again later)",
            )
        full = space_problem(
            self.spool.root,
            self.settings.receiver_min_free_bytes,
            self.settings.receiver_max_used_percent,
        )
        if full is not None:
            return InvalidInstance(OUT_OF_RESOURCES, f"{full}; free disk space, send again later")
        return None

    def _on_c_store(self, event: evt.Event) -> int:
        self.counters.add("received")
        origin = str(event.assoc.requestor.ae_title)
        received = _streamed_file(event)
        held: FileIO | None = None  # the file this handler wrote (see _write_incoming)
        try:
            if received is None:  # held in memory: see server.configure_pynetdicom
                held = self._write_incoming(event)
                received = Path(str(held.name))
            header, marked = self._check(received, event)
            spooled = self.spool.accept(received, header.sop_instance_uid, marked)
        except Exception as exc:  # every failure is a refusal with a reason: _problem
            problem = self._problem(exc, origin)
        else:
            self.counters.add("spooled")
            self.indexer.submit(spooled, header)
            return SUCCESS
        finally:
            if held is not None:
                held.close()
        if received is not None:
            # Deleted before the status goes out: a refused file never reaches ready/, not
            # even after a crash (pynetdicom would leave it behind after an exception).
            received.unlink(missing_ok=True)
        return self._refuse(problem, origin)

    def _check(self, received: Path, event: evt.Event) -> tuple[InstanceHeader, bool]:
        """Everything that must hold before the success status; raises why not."""
        spoiled = self.spool.incoming_files.spoiled(received)
        if spoiled is not None:
            raise spoiled
        cannot = self._cannot_store()
        if cannot is not None:
            raise cannot
        request = cast(C_STORE, event.request)
        header, marked, pending = self._sync_and_check(
            received, str(request.AffectedSOPInstanceUID)
        )
        problem = command_mismatch(
            str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID), header
        )
        if problem is None and self.identity is not None:
            problem = self.identity.conflict(pending, header)
        if problem is not None:
            raise problem
        return header, marked

    def _problem(self, exc: Exception, origin: str) -> InvalidInstance:
        """Why an instance is refused: its InvalidInstance, the spool's disk, or unexpected."""
        if isinstance(exc, InvalidInstance):
            return exc
        if is_outage(exc):
            # Disk full or spool unwritable: refusing (the sender retries later) is the only
            # answer that does not risk acknowledging an instance that is not on disk.
            self._failures.failed(f"spooling an instance from {origin}", exc, then="refused")
            return InvalidInstance(
                OUT_OF_RESOURCES,
                f"the receiver could not write to its spool ({describe(exc)}); free disk "
                "space or check RADFLOW_SPOOL_DIR",
            )
        self._failures.failed(f"receiving an instance from {origin}", exc, then="refused")
        return InvalidInstance(
            UNPROCESSABLE,
            f"checking the instance failed unexpectedly ({describe(exc)}); the receiver's log "
            "holds the traceback",
        )

    def _write_incoming(self, event: evt.Event) -> FileIO:
        """Write a dataset pynetdicom held in memory to a file of ``spool/incoming``; the file
        stays open until the handler is done, as pynetdicom's own do (Spool.remove_partial)."""
        path = self.spool.incoming_files.take()
        held = FileIO(path, "r+b")
        try:
            held.write(event.encoded_dataset())
        except OSError:
            held.close()
            path.unlink(missing_ok=True)
            raise
        return held

    def _sync_and_check(
        self, received: Path, sop_instance_uid: str
    ) -> tuple[InstanceHeader, bool, Future[Identity | None] | None]:
        """fsync a received file here while worker threads read and check its header and look
        the command's SOP Instance UID up in the index; the header, whether the file bears the
        spool's completion mark (Spool.sync), and the pending lookup.

        This way round, because the fsync releases the GIL for as long as the disk takes and
        the header check needs it: with the fsync in the worker, the worker waited for the GIL
        until the check was done and the two ran one after the other (benchmarks/README.md).
        The SHA-256 is left to the indexer: the sender waits for neither.
        """
        assert self._checker is not None, "start() first"
        pending = (
            None if self.identity is None else self.identity.start(self._checker, sop_instance_uid)
        )
        checked = self._checker.submit(
            read_header, received, self.settings.max_pixels, digest=lambda: UNHASHED
        )
        try:
            marked = self.spool.sync(received)
        finally:
            # The file is deleted if refused: let the check end first.
            wait([checked])
        return checked.result(), marked, pending

    def _refuse(self, exc: InvalidInstance, origin: str) -> int:
        status = failure_status(exc.reason)
        self.counters.reject(exc.reason)
        logger.warning(
            "refused an instance from %s: %s (status 0x%04X)", origin, exc.reason, status
        )
        self._record(exc, origin)
        return status

    def _on_connection_closed(self, event: evt.Event) -> None:
        """An association ended: delete what it left half received.

        pynetdicom (the plain path) keeps an unfinished dataset's open file in the provider's
        current message until the association is garbage: dropped here, so it closes now.
        """
        event.assoc.dimse.message = None
        self.spool.remove_partial()

    def _on_refused_connection(self, reason: str, peer: str, what: str) -> None:
        """The association server refused a connection before any association (a PDU too
        large, a failed TLS handshake): one line, counted, recorded."""
        self.counters.reject(reason)
        logger.warning("refused a connection from %s: it %s", peer, what)
        self._record(InvalidInstance(reason, f"{peer} {what}"), peer)

    def _record(self, exc: InvalidInstance, origin: str) -> None:
        try:
            with unit_of_work(self.session_factory) as session:
                session.add(rejection("receiver", exc, origin=origin))
        except SQLAlchemyError as db_error:
            # The failure status still reaches the sender and the counters keep the count.
            self._failures.failed("recording a rejection", db_error, then="not recorded")


def _streamed_file(event: evt.Event) -> Path | None:
    """The file a C-STORE dataset was streamed into; None if pynetdicom held it in memory.

    pynetdicom documents an AttributeError for that case; 3.0.4 gives None.
    """
    try:
        path = event.dataset_path
    except AttributeError:
        return None
    return None if path is None else Path(path)
