"""DICOM TLS on the receiver (issue 16): DCMTK's storescu and echoscu over TLS, on both receiving
paths and through `radflow receive`; a sender without TLS (or without the certificate mutual TLS
asks for) refused while the others are served; PDUs bounded over TLS as without; settings and
files that cannot work stop the receiver with what to set.

A throwaway CA signs the receiver's certificate and a modality's; DCMTK trusts the CA (``+cf``).
"""

from __future__ import annotations

import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from certificates import Issued, issue
from factories import dicom_bytes
from peers import echoscu, free_port, radflow_env, storescu, wait_for_port
from pydicom.uid import generate_uid
from raw import ABORT, ASSOCIATE_AC, P_DATA_TF, RawPeer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from waiting import eventually

from radflow.db import Instance, Rejection
from radflow.ingest.receiver import Receiver
from radflow.ingest.receiver.tls import TLSNotUsable
from radflow.services.status import receiver_status
from radflow.settings import Settings
from radflow.store import ObjectStore

REFUSED = "tls-handshake-failed"


@dataclass(frozen=True)
class Pki:
    ca: Issued
    receiver: Issued
    modality: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = issue(folder, "radflow-test-ca", ca=True)
    return Pki(ca, issue(folder, "receiver", by=ca), issue(folder, "modality", by=ca))


def _tls(pki: Pki, *, mutual: bool = False) -> dict[str, object]:
    """The receiver's TLS settings; ``mutual``: senders must present a certificate."""
    files = {"receiver_tls_cert_file": pki.receiver.cert, "receiver_tls_key_file": pki.receiver.key}
    return {**files, "receiver_tls_ca_file": pki.ca.cert} if mutual else files


def _anonymous(pki: Pki) -> tuple[str, ...]:
    """DCMTK options: TLS without a certificate of its own, trusting the test CA."""
    return ("+tla", "+cf", str(pki.ca.cert))


def _as(pki: Pki, sender: Issued) -> tuple[str, ...]:
    """DCMTK options: TLS presenting ``sender``'s certificate, trusting the test CA."""
    return ("+tls", str(sender.key), str(sender.cert), "+cf", str(pki.ca.cert))


def _reasons(session_factory: sessionmaker[Session]) -> list[str]:
    with session_factory() as session:
        return list(session.scalars(select(Rejection.reason).order_by(Rejection.id)))


def _study(folder: Path, count: int) -> dict[Path, str]:
    """``count`` instances of one new study as files in ``folder``: their SOP Instance UIDs."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    uids = {folder / f"{i}.dcm": generate_uid() for i in range(count)}
    for path, uid in uids.items():
        path.write_bytes(dicom_bytes(study_uid=study, series_uid=series, sop_instance_uid=uid))
    return uids


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_storescu_and_echoscu_over_tls(
    start_receiver: Callable[..., Receiver],
    pki: Pki,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    receiver = start_receiver(**_tls(pki))
    echo = echoscu(receiver.port, *_anonymous(pki))
    assert echo.returncode == 0, echo.stderr
    sent = _study(tmp_path / "study", 3)
    store_run = storescu(receiver.port, list(sent), *_anonymous(pki))
    assert store_run.returncode == 0, store_run.stderr
    assert store_run.stderr.count("Received Store Response (Success)") == 3
    assert receiver.wait_indexed(30)
    with session_factory() as session:
        instances = session.scalars(select(Instance)).all()
        assert receiver_status(session, receiver.settings)["tls"] == "on"
    assert {i.sop_instance_uid for i in instances} == set(sent.values())
    assert all(store.exists(i.object_key) for i in instances)


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_sender_without_tls_is_refused_and_the_others_are_served(
    start_receiver: Callable[..., Receiver], pki: Pki, session_factory: sessionmaker[Session]
) -> None:
    """A plain DICOM peer fails at once; a connection that never starts its handshake holds up
    nobody (the handshake runs in the connection's own thread, not the accepting one)."""
    receiver = start_receiver(**_tls(pki))
    with socket.create_connection(("127.0.0.1", receiver.port)):  # connected, silent
        plain = echoscu(receiver.port)
        assert plain.returncode != 0
        started = time.monotonic()
        secure = echoscu(receiver.port, *_anonymous(pki))
        assert secure.returncode == 0, secure.stderr
        assert time.monotonic() - started < 10
    assert eventually(lambda: _reasons(session_factory) == [REFUSED])
    assert receiver.counters.snapshot()["rejected"] == {REFUSED: 1}
    with session_factory() as session:
        message = session.scalars(select(Rejection.message)).one()
    assert "accepts DICOM TLS only" in message


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_mutual_tls_refuses_a_sender_without_a_certificate_the_ca_signed(
    start_receiver: Callable[..., Receiver],
    pki: Pki,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
) -> None:
    receiver = start_receiver(**_tls(pki, mutual=True))
    assert echoscu(receiver.port, *_anonymous(pki)).returncode != 0
    stranger = issue(tmp_path, "stranger")  # self-signed: no authority of the receiver's
    assert echoscu(receiver.port, *_as(pki, stranger)).returncode != 0
    modality = echoscu(receiver.port, *_as(pki, pki.modality))
    assert modality.returncode == 0, modality.stderr
    assert eventually(lambda: _reasons(session_factory) == [REFUSED, REFUSED])


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_pdu_over_the_maximum_is_refused_over_tls_too(
    start_receiver: Callable[..., Receiver], pki: Pki, session_factory: sessionmaker[Session]
) -> None:
    """The A-ABORT comes at the PDU header, not after 1 GiB that never arrives."""
    receiver = start_receiver(**_tls(pki))
    client = ssl.create_default_context(cafile=pki.ca.cert)
    with RawPeer(receiver.port, tls=client) as peer:
        assert peer.associate().kind == ASSOCIATE_AC
        peer.send(struct.pack(">BBL", P_DATA_TF, 0, 1 << 30))
        assert peer.read().kind == ABORT
    with RawPeer(receiver.port, tls=client) as peer:
        assert peer.associate().kind == ASSOCIATE_AC
        assert peer.echo() == 0x0000
    assert eventually(lambda: _reasons(session_factory) == ["pdu-too-large"])


def test_tls_settings_come_in_pairs_and_say_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RADFLOW_RECEIVER_TLS_KEY_FILE"):
        Settings(data_dir=tmp_path, receiver_tls_cert_file=tmp_path / "receiver.pem")
    with pytest.raises(ValueError, match="RADFLOW_RECEIVER_TLS_CERT_FILE"):
        Settings(data_dir=tmp_path, receiver_tls_ca_file=tmp_path / "ca.pem")


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_files_that_cannot_be_used_stop_the_receiver_before_it_listens(
    start_receiver: Callable[..., Receiver], pki: Pki, tmp_path: Path
) -> None:
    other = issue(tmp_path, "other", by=pki.ca)
    with pytest.raises(TLSNotUsable, match="RADFLOW_RECEIVER_TLS_KEY_FILE"):
        start_receiver(receiver_tls_cert_file=pki.receiver.cert, receiver_tls_key_file=other.key)
    with pytest.raises(TLSNotUsable, match="RADFLOW_RECEIVER_TLS_CA_FILE"):
        start_receiver(**_tls(pki), receiver_tls_ca_file=tmp_path / "missing.pem")


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize("receiver_path", ["fast"])
def test_radflow_receive_with_tls_workers_indexes_what_storescu_sends(
    receiver_settings: Settings,
    pki: Pki,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
) -> None:
    """`radflow receive` as compose runs it (two worker processes), TLS from RADFLOW_* alone."""
    settings = receiver_settings.model_copy(update={**_tls(pki), "receiver_workers": 2})
    port = free_port()
    log = tmp_path / "receive.log"
    command = [sys.executable, "-m", "cli.main", "receive", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=radflow_env(settings), stderr=out)
    try:
        wait_for_port(port, process)
        sent = _study(tmp_path / "study", 4)
        run = storescu(port, list(sent), *_anonymous(pki))
        assert run.returncode == 0, run.stderr
        assert echoscu(port).returncode != 0  # without TLS
        assert eventually(lambda: _indexed(session_factory) == set(sent.values()), timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert process.returncode == 0, log.read_text()
    assert "DICOM TLS only" in log.read_text()


def _indexed(session_factory: sessionmaker[Session]) -> set[str]:
    with session_factory() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))
