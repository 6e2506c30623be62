"""What the receiver refuses before it acknowledges: associations it cannot serve (another
called AE title, no presentation context it accepts, a request it cannot read), and instances
whose C-STORE command does not name them or whose UID is indexed for another patient, study or
series. Each refusal is recorded with its reason, and the next sender is served."""

from __future__ import annotations

import pytest
from factories import SECONDARY_CAPTURE, dicom_bytes
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from raw import ASSOCIATE_AC, CR_IMAGE_STORAGE, VERIFICATION, RawPeer, send_store, split_part10
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance, Rejection
from radflow.ingest.receiver import Receiver
from radflow.ingest.receiver.statuses import ASSOCIATION_REJECT

ECHO = [(3, VERIFICATION, [ImplicitVRLittleEndian])]
# What is proposed (called AE title, presentation contexts) -> the reason it is refused for.
REFUSED_ASSOCIATIONS = {
    "another-called-ae": ({"called": "PACS"}, "called-aet-not-ours"),
    "no-contexts": ({"contexts": []}, "no-presentation-context"),
    "unknown-sop-class": (
        {"contexts": [(1, "1.2.3.4.5.6.7", [ExplicitVRLittleEndian])]},
        "no-presentation-context",
    ),
    "no-transfer-syntax": (
        {"contexts": [(1, CR_IMAGE_STORAGE, [""]), *ECHO]},
        "malformed-association",
    ),
}


def _reasons(session_factory: sessionmaker[Session]) -> list[tuple[str, str | None]]:
    with session_factory() as session:
        return [
            (reason, origin)
            for reason, origin in session.execute(select(Rejection.reason, Rejection.origin))
        ]


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)  # no database involved
@pytest.mark.parametrize("case", REFUSED_ASSOCIATIONS)
def test_an_association_that_cannot_be_served_is_rejected_with_its_reason(
    case: str, receiver: Receiver, session_factory: sessionmaker[Session]
) -> None:
    proposed, reason = REFUSED_ASSOCIATIONS[case]
    with RawPeer(receiver.port) as peer:
        reply = peer.associate(calling="SENDER", **proposed)
    assert reply.rejection == ASSOCIATION_REJECT[reason]
    assert _reasons(session_factory) == [(reason, "SENDER")]
    with RawPeer(receiver.port) as peer:
        assert peer.associate().kind == ASSOCIATE_AC
        assert peer.echo() == 0x0000


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize(
    ("command", "reason", "status"),
    [
        ("instance", "sop-instance-mismatch", 0xA905),
        ("class", "sop-class-mismatch", 0xA906),
    ],
)
def test_a_command_that_does_not_name_its_data_set_is_refused(
    command: str,
    reason: str,
    status: int,
    receiver: Receiver,
    session_factory: sessionmaker[Session],
) -> None:
    """The C-STORE's Affected SOP Instance and Class UIDs must be the data set's: otherwise
    the sender gets the status before any acknowledgement and nothing is spooled."""
    data = dicom_bytes()
    sop_class, sop_instance, syntax, _ = split_part10(data)
    uids = (sop_class, "1.2.3.4.5") if command == "instance" else (SECONDARY_CAPTURE, sop_instance)
    with RawPeer(receiver.port) as peer:
        contexts = [(1, uids[0], [syntax]), *ECHO]
        assert peer.associate(calling="SENDER", contexts=contexts).kind == ASSOCIATE_AC
        assert peer.store(data, command_uids=uids) == status
    assert _reasons(session_factory) == [(reason, "SENDER")]
    assert not list(receiver.spool.ready.iterdir())
    assert send_store(receiver.port, data) == 0x0000
    assert receiver.wait_indexed(30)


def test_a_uid_indexed_for_another_study_is_refused_before_the_acknowledgement(
    receiver: Receiver, session_factory: sessionmaker[Session]
) -> None:
    """The same SOP Instance UID in another study: 0xA907 to the sender (once the first copy is
    indexed, the receiver looks the UID up while it fsyncs), not a success followed by a
    conflict only the log tells."""
    first = dicom_bytes()
    uid = split_part10(first)[1]
    assert send_store(receiver.port, first) == 0x0000
    assert receiver.wait_indexed(30)
    assert send_store(receiver.port, dicom_bytes(sop_instance_uid=uid), calling="OTHER") == 0xA907
    assert _reasons(session_factory) == [("uid-conflict", "OTHER")]
    assert receiver.wait_indexed(30)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
