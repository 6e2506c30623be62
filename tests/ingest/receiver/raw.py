"""A DICOM peer at the byte level, for tests that send what no well-behaved SCU would.

Associations, C-ECHO and C-STORE built by hand (PS3.8 9.3, PS3.7 9.3 and Annex E), so a test
controls every byte: wrong called AE titles, no presentation contexts, PDU lengths that lie,
command sets that disagree with their data set, data sets cut anywhere.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
_PDU = struct.Struct(">BBL")
_ELEMENT = struct.Struct("<HHL")
# The presentation contexts a raw peer proposes unless told otherwise: (ID, abstract, syntaxes).
CONTEXTS: list[tuple[int, str, list[str]]] = [
    (1, CR_IMAGE_STORAGE, [ExplicitVRLittleEndian]),
    (3, VERIFICATION, [ImplicitVRLittleEndian]),
]


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(
    called: str = "RADFLOW",
    calling: str = "RAWSCU",
    contexts: Iterable[tuple[int, str, Sequence[str]]] = CONTEXTS,
    max_pdu: int = 1 << 16,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""
    items = _item(0x10, _uid(APPLICATION_CONTEXT))
    for context_id, abstract, syntaxes in contexts:
        body = bytes([context_id, 0, 0, 0]) + _item(0x30, _uid(abstract))
        body += b"".join(_item(0x40, _uid(ts)) for ts in syntaxes)
        items += _item(0x20, body)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _uid("1.2.826.0.1.3680043.9.1"))
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32) + items
    return pdu(ASSOCIATE_RQ, body)


def pdu(kind: int, body: bytes) -> bytes:
    return _PDU.pack(kind, 0, len(body)) + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item: control 0x01 command, 0x02 last fragment (PS3.8 E.2)."""
    return struct.pack(">LBB", 2 + len(data), context_id, control) + data


def element(tag_element: int, value: bytes) -> bytes:
    """A command element (group 0x0000), Implicit VR Little Endian; odd values NUL-padded."""
    value = value + b"\x00" if len(value) % 2 else value
    return _ELEMENT.pack(0x0000, tag_element, len(value)) + value


def command_set(elements: dict[int, bytes]) -> bytes:
    body = b"".join(element(tag, value) for tag, value in sorted(elements.items()))
    return element(0x0000, struct.pack("<L", len(body))) + body


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> dict[int, bytes]:
    """The elements of a C-STORE-RQ command set (PS3.7 9.3.1.1)."""
    return {
        0x0002: _uid(sop_class),
        0x0100: struct.pack("<H", 0x0001),
        0x0110: struct.pack("<H", message_id),
        0x0700: struct.pack("<H", 0),
        0x0800: struct.pack("<H", 0x0000),
        0x1000: _uid(sop_instance),
    }


def echo_command(message_id: int = 1) -> dict[int, bytes]:
    return {
        0x0002: _uid(VERIFICATION),
        0x0100: struct.pack("<H", 0x0030),
        0x0110: struct.pack("<H", message_id),
        0x0800: struct.pack("<H", 0x0101),
    }


def decode_command(data: bytes) -> dict[int, bytes]:
    elements, offset = {}, 0
    while offset + _ELEMENT.size <= len(data):
        _, tag, length = _ELEMENT.unpack_from(data, offset)
        offset += _ELEMENT.size
        elements[tag] = data[offset : offset + length]
        offset += length
    return elements


def split_part10(data: bytes) -> tuple[str, str, str, bytes]:
    """(SOP Class UID, SOP Instance UID, transfer syntax, data set bytes) of a Part 10 file."""
    meta_end = 144 + struct.unpack_from("<L", data, 140)[0]
    meta = decode_explicit_meta(data[132:meta_end])
    return meta[0x0002], meta[0x0003], meta[0x0010], data[meta_end:]


def decode_explicit_meta(data: bytes) -> dict[int, str]:
    values, offset = {}, 0
    while offset < len(data):
        _, tag, vr = struct.unpack_from("<HH2s", data, offset)
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            (length,) = struct.unpack_from("<L", data, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            start = offset + 8
        values[tag] = data[start : start + length].decode("latin-1").rstrip("\0 ")
        offset = start + length
    return values


@dataclass
class Reply:
    """What the receiver answered: a PDU type and body, or None if it closed the connection."""

    kind: int | None
    body: bytes = b""
    statuses: list[int] = field(default_factory=list)

    @property
    def rejection(self) -> tuple[int, int, int] | None:
        """(result, source, diagnostic) of an A-ASSOCIATE-RJ."""
        if self.kind != ASSOCIATE_RJ:
            return None
        return self.body[1], self.body[2], self.body[3]


class RawPeer:
    """One connection to the receiver, spoken to byte by byte; a context manager. With
    ``tls`` (a client context), the bytes go through TLS."""

    def __init__(self, port: int, timeout: float = 15.0, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.max_pdu = 16384  # what the receiver accepts; updated from its A-ASSOCIATE-AC

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send bytes; False if the receiver has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def _recv_exactly(self, n: int) -> bytes | None:
        data = bytearray()
        while len(data) < n:
            try:
                piece = self.sock.recv(n - len(data))
            except OSError:
                return None
            if not piece:
                return None
            data += piece
        return bytes(data)

    def read(self) -> Reply:
        """The next PDU the receiver sends (kind None: connection closed or timed out)."""
        head = self._recv_exactly(_PDU.size)
        if head is None:
            return Reply(None)
        kind, _, length = _PDU.unpack(head)
        body = self._recv_exactly(length)
        return Reply(None) if body is None else Reply(kind, body)

    def associate(self, **options: object) -> Reply:
        """Send an A-ASSOCIATE-RQ (``associate_rq`` options) and read the answer."""
        if not self.send(associate_rq(**options)):  # type: ignore[arg-type]
            return Reply(None)
        reply = self.read()
        if reply.kind == ASSOCIATE_AC:
            self.max_pdu = _max_length(reply.body) or self.max_pdu
        return reply

    def message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> Reply:
        """Send a DIMSE message (data set fragmented to the agreed PDU size); read the reply."""
        if not self.send(pdu(P_DATA_TF, pdv(context_id, 0x03, command))):
            return Reply(None)
        if dataset is not None:
            room = self.max_pdu - 6
            pieces = [dataset[i : i + room] for i in range(0, len(dataset), room)] or [b""]
            for n, piece in enumerate(pieces):
                last = 0x02 if n == len(pieces) - 1 else 0x00
                if not self.send(pdu(P_DATA_TF, pdv(context_id, last, piece))):
                    return Reply(None)
        return self.response()

    def response(self) -> Reply:
        """The next reply; for P-DATA-TF, with the status of its command set."""
        reply = self.read()
        if reply.kind == P_DATA_TF:
            command = decode_command(reply.body[6:])
            if 0x0900 in command:
                reply.statuses.append(struct.unpack("<H", command[0x0900])[0])
        return reply

    def store(
        self,
        part10: bytes,
        *,
        context_id: int = 1,
        message_id: int = 1,
        command_uids: tuple[str, str] | None = None,
        dataset: bytes | None = None,
    ) -> int | None:
        """C-STORE a Part 10 file's data set; the status, or None if the receiver hung up.

        ``command_uids``: the command's (SOP Class, SOP Instance) UIDs if not the file's;
        ``dataset``: bytes to send instead of the file's data set.
        """
        sop_class, sop_instance, _, body = split_part10(part10)
        sop_class, sop_instance = command_uids or (sop_class, sop_instance)
        command = command_set(store_command(sop_class, sop_instance, message_id))
        reply = self.message(context_id, command, body if dataset is None else dataset)
        return reply.statuses[0] if reply.statuses else None

    def echo(self, context_id: int = 3) -> int | None:
        reply = self.message(context_id, command_set(echo_command()))
        return reply.statuses[0] if reply.statuses else None

    def release(self) -> bool:
        """A-RELEASE; True if the receiver answered it."""
        return self.send(pdu(RELEASE_RQ, bytes(4))) and self.read().kind == RELEASE_RP

    def abort(self) -> None:
        self.send(pdu(ABORT, bytes([0, 0, 0, 0])))


def _max_length(ac_body: bytes) -> int | None:
    """The Maximum Length sub-item of an A-ASSOCIATE-AC's user information item."""
    offset = 68  # protocol version, reserved, AE titles echoed, reserved
    while offset + 4 <= len(ac_body):
        kind, _, length = struct.unpack_from(">BBH", ac_body, offset)
        if kind == 0x50:
            sub = offset + 4
            while sub + 4 <= offset + 4 + length:
                sub_kind, _, sub_length = struct.unpack_from(">BBH", ac_body, sub)
                if sub_kind == 0x51:
                    return int(struct.unpack_from(">L", ac_body, sub + 4)[0])
                sub += 4 + sub_length
        offset += 4 + length
    return None


def accepted_contexts(ac_body: bytes) -> dict[int, int]:
    """Context ID -> result (0 accepted) of an A-ASSOCIATE-AC."""
    results, offset = {}, 68
    while offset + 4 <= len(ac_body):
        kind, _, length = struct.unpack_from(">BBH", ac_body, offset)
        if kind == 0x21:
            results[ac_body[offset + 4]] = ac_body[offset + 6]
        offset += 4 + length
    return results


def send_store(
    port: int, part10: bytes, *, calling: str = "RAWSCU", **options: object
) -> int | None:
    """One association storing one instance: the C-STORE status (None if it never came).

    ``options``: :meth:`RawPeer.store`'s.
    """
    sop_class, _, syntax, _ = split_part10(part10)
    with RawPeer(port) as peer:
        contexts = [(1, sop_class, [syntax]), (3, VERIFICATION, [ImplicitVRLittleEndian])]
        if peer.associate(calling=calling, contexts=contexts).kind != ASSOCIATE_AC:
            return None
        status = peer.store(part10, **options)  # type: ignore[arg-type]
        if status is not None:
            peer.release()
        return status
