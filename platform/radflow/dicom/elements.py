"""The data elements of a received file, found by walking its encoding without trusting it.

A received file is untrusted input, and pydicom's reader is made for files that are not: it
recurses once per nested sequence (RecursionError a few hundred levels down), inflates a
deflated data set in one piece (a 1 MB file can ask for gigabytes), raises struct.error or
zlib.error on some cuts, and when a file ends inside an element of undefined length it drops
everything it read with only a warning. So :func:`read_meta` and :func:`walk` find the elements
themselves, following PS3.5 section 7 (data sets, sequences) and A.4 (encapsulated pixel data):

* iteratively, with at most :data:`MAX_DEPTH` nested sequences (``too-deeply-nested``) and
  :data:`MAX_ELEMENTS` element headers (``too-large``);
* knowing where every value, item and sequence ends: ``truncated`` when the file (or deflate
  stream) ends first, ``unreadable`` when an item, delimiter or fragment is not where the
  encoding puts one, ``not-dicom`` when the data set does not even begin like one;
* reading only the top-level values asked for (each at most :data:`VALUE_LIMIT` bytes) and
  skipping every other value unread, pixel data above all;
* inflating a deflated data set (PS3.5 A.5) as a stream, keeping none of it behind the walk, up
  to a budget (``too-large``): :data:`HEADER_LIMIT` plus what the caller allows for the pixel
  data once it has seen the header;
* tolerating what pydicom tolerates: an explicit VR data set that says implicit or the other way
  round, and explicit VR data sets that switch to implicit VR for some elements.

Values are converted by the caller (radflow.dicom.instance), with pydicom where that is needed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from struct import Struct
from typing import BinaryIO, Protocol

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from radflow.errors import TOO_DEEPLY_NESTED, InvalidInstance

MAX_DEPTH = 64
"""Deepest sequence nesting accepted. Real instances nest a few levels (an enhanced multi-frame's
functional groups: 3, a structured report's content tree: about 10); what reads the file after
ingest (pydicom, for pixels and de-identification) recurses per level and fails a few hundred
levels down, so a file nested deeper than this is refused here rather than stored."""
MAX_ELEMENTS = 1_000_000
"""Most element, item and fragment headers walked (about a second): a few thousand is usual, a
hundred thousand rare (large RT structure sets)."""
VALUE_LIMIT = 64 * 1024
"""Longest value read: the values asked for are UIDs, codes, short texts and numbers."""
HEADER_LIMIT = 64 * 1024 * 1024
"""What a deflated data set may inflate to besides its pixel data."""

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, Pixel Data

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_DELIMITER_GROUP = 0xFFFE
# VRs whose explicit encoding has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT")
) | {b"UV"}


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    """The data dictionary's VR for ``tag`` (None if it has none): in implicit VR, the only
    way to tell a sequence. Cached within bounds: tags come from untrusted files."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2
_OPEN = -1  # the end of a frame of undefined length: found at its delimiter


@dataclass
class PixelData:
    """The top-level pixel data element: where it is and how it is encoded, never its value."""

    tag: int
    vr: str | None
    length: int | None  # None: undefined, i.e. encapsulated in items
    fragments: int = 0  # items after the Basic Offset Table (encapsulated only)
    offset_table_length: int | None = None  # the first item's length (encapsulated only)


@dataclass(frozen=True)
class Meta:
    """What the File Meta Information says about the data set after it."""

    transfer_syntax: str | None  # None: no TransferSyntaxUID element
    body_start: int | None  # None: the file ends inside the meta information


@dataclass
class Walked:
    """The top-level elements asked for (values read) and the pixel data element."""

    elements: dict[BaseTag, RawDataElement]
    pixels: PixelData | None


PixelAllowance = Callable[[dict[BaseTag, RawDataElement], PixelData], int]
"""Called at the top-level pixel data element with the elements read so far; checks them against
it (raising InvalidInstance) and returns how many bytes the pixel data may take."""


def _refuse(name: str, reason: str, detail: str) -> InvalidInstance:
    return InvalidInstance(reason, f"{name}: {detail}")


def read_meta(f: BinaryIO, size: int, name: str) -> Meta:
    """The transfer syntax and where the data set starts (PS3.10 7.1): preamble, "DICM", then
    the group 0002 elements."""
    source = _FileSource(f, size)
    if size < 132 or source.read(128, 4) != b"DICM":
        raise _refuse(name, "not-dicom", "not a DICOM file (no DICM preamble or readable header)")
    position, transfer_syntax = 132, None
    while True:
        head = source.read(position, 12)
        if len(head) < 8 or _TAG_LE.unpack_from(head)[0] != 0x0002:
            return Meta(transfer_syntax, position)
        tag, _, length, header = _element_header(head, implicit=False, little=True)
        if header > len(head):
            return Meta(transfer_syntax, None)
        if length == _UNDEFINED:
            raise _refuse(name, "unreadable", "the file meta information is malformed")
        position += header
        if position + length > size:
            return Meta(transfer_syntax, None)
        if tag == 0x00020010:
            value = source.read(position, min(length, VALUE_LIMIT))
            transfer_syntax = value.rstrip(b"\0 ").decode("ascii", "replace").strip()
        position += length


def walk(
    f: BinaryIO,
    size: int,
    name: str,
    *,
    start: int,
    transfer_syntax: str,
    wanted: frozenset[int],
    pixel_allowance: PixelAllowance,
) -> Walked:
    """Walk the data set from ``start`` to the end of the file, reading the ``wanted`` top-level
    values; raise InvalidInstance if it is not a well-formed data set."""
    little = transfer_syntax != _EXPLICIT_BIG_ENDIAN
    source: _Source
    if transfer_syntax == _DEFLATED:
        f.seek(start)
        source, start = _InflatedSource(f, name), 0
    else:
        source = _FileSource(f, size)
    first = source.read(start, 6)
    # Which VR encoding the data set really uses, whatever the transfer syntax says (as pydicom
    # decides it): the two bytes after the first tag are a VR's two capitals or not.
    implicit = len(first) == 6 and not (0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B)
    if len(first) < 6:
        implicit = transfer_syntax == _IMPLICIT
    walker = _Walker(source, name, implicit, little, wanted, pixel_allowance)
    walker.run(start)
    return Walked(walker.elements, walker.pixels)


_IMPLICIT = "1.2.840.10008.1.2"
_EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"

_TAG_LE = Struct("<HH")
_TAG_LENGTH = {True: Struct("<HHL"), False: Struct(">HHL")}
_EXPLICIT_SHORT = {True: Struct("<HH2sH"), False: Struct(">HH2sH")}
_LENGTH = {True: Struct("<L"), False: Struct(">L")}


def _element_header(
    head: bytes, *, implicit: bool, little: bool
) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, value length, header length) of the element starting ``head``, which
    holds at least 8 bytes (12 for a long explicit VR: a header length beyond it says so)."""
    group, element, length = _TAG_LENGTH[little].unpack_from(head)
    if implicit or group == _DELIMITER_GROUP:  # items and delimiters never have a VR
        return group << 16 | element, None, length, 8
    _, _, vr, short = _EXPLICIT_SHORT[little].unpack_from(head)
    if vr in _LONG_VRS:
        if len(head) < 12:
            return group << 16 | element, vr.decode(), 0, 12
        return group << 16 | element, vr.decode(), _LENGTH[little].unpack_from(head, 8)[0], 12
    if 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B:
        return group << 16 | element, vr.decode(), short, 8
    # Not a VR: a writer switched to implicit VR for this element (pydicom reads it so too).
    return group << 16 | element, None, length, 8


class _Source(Protocol):
    def read(self, position: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``position`` (fewer at the end of the data)."""

    def reach(self, position: int) -> bool:
        """Whether the data extends to ``position``; the walk never goes back before it."""

    def allow(self, extra: int) -> None:
        """Let the data be ``extra`` bytes longer (the pixel data, once the header is known)."""

    def finish(self, position: int) -> None:
        """The walk ended cleanly at ``position``, the end of the data read."""


_WINDOW = 16 * 1024  # a typical header in one read; values up to VALUE_LIMIT in another


class _FileSource:
    """A data set on disk: read through a window, skipped by arithmetic."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self._size = f, size
        self._start, self._window = 0, b""

    def read(self, position: int, n: int) -> bytes:
        offset = position - self._start
        if offset < 0 or offset + n > len(self._window):
            self._f.seek(position)
            self._window, self._start, offset = self._f.read(max(n, _WINDOW)), position, 0
        return self._window[offset : offset + n]

    def reach(self, position: int) -> bool:
        return position <= self._size

    def allow(self, extra: int) -> None:
        """Nothing to budget: skipping costs nothing, and the file is the size it was sent."""

    def finish(self, position: int) -> None:
        pass


class _InflatedSource:
    """A deflated data set (PS3.5 A.5), inflated as the walk advances and forgotten behind it.

    Inflating more than the budget (:data:`HEADER_LIMIT` plus the pixel data allowed) refuses
    the file as ``too-large`` at that point: memory stays at a window, time at the budget.
    """

    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f, self._name = f, name
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._start = 0  # where _buffer starts in the inflated data
        self._budget = HEADER_LIMIT
        self._flushed = False

    def read(self, position: int, n: int) -> bytes:
        if not self.reach(position):
            return b""
        while self._start + len(self._buffer) < position + n and self._inflate():
            pass
        offset = position - self._start
        return bytes(self._buffer[offset : offset + n])

    def reach(self, position: int) -> bool:
        while self._start + len(self._buffer) < position:
            self._forget(self._start + len(self._buffer))
            if not self._inflate():
                return False
        self._forget(position)
        return True

    def allow(self, extra: int) -> None:
        self._budget += extra

    def finish(self, position: int) -> None:
        if not self._inflater.eof:
            raise _refuse(
                self._name,
                "truncated",
                "the deflated data set ends before its deflate stream does (cut short); resend it",
            )

    def _forget(self, position: int) -> None:
        del self._buffer[: position - self._start]
        self._start = position

    def _inflate(self) -> bool:
        """Inflate the next piece onto the buffer; False at the end of the stream or file."""
        inflater = self._inflater
        if inflater.eof:
            return False
        data = inflater.unconsumed_tail or self._f.read(_WINDOW)
        try:
            if data:
                piece = inflater.decompress(data, _WINDOW)
            elif self._flushed:
                return False
            else:  # the file is read: what zlib still holds (at most its window) comes out
                piece, self._flushed = inflater.flush(), True
        except zlib.error as exc:
            raise _refuse(
                self._name, "unreadable", f"the deflated data set is corrupt ({exc}); resend it"
            ) from None
        if self._start + len(self._buffer) + len(piece) > self._budget:
            raise _refuse(
                self._name,
                "too-large",
                f"the deflated data set inflates to more than {self._budget} bytes, more than "
                f"its pixel data plus {HEADER_LIMIT // 2**20} MiB (a decompression bomb?); send "
                "it uncompressed",
            )
        self._buffer += piece
        return True


class _Walker:
    """One walk over a data set: a loop over element headers with an explicit stack of the
    sequences, items and encapsulated values it is inside (no recursion)."""

    def __init__(
        self,
        source: _Source,
        name: str,
        implicit: bool,
        little: bool,
        wanted: frozenset[int],
        pixel_allowance: PixelAllowance,
    ) -> None:
        self.source, self.name = source, name
        self.implicit, self.little = implicit, little
        self.wanted, self.pixel_allowance = wanted, pixel_allowance
        self.elements: dict[BaseTag, RawDataElement] = {}
        self.pixels: PixelData | None = None
        # What the walk is in (a data set, a sequence, an encapsulated value) and where that
        # ends (_OPEN until its delimiter), and the same for each frame enclosing it.
        self.kind, self.end = _DATASET, _OPEN
        self.stack: list[tuple[int, int]] = []
        self.depth = 0  # sequences on the stack
        self.counting: PixelData | None = None  # whose fragments are being walked

    def fail(self, reason: str, detail: str) -> InvalidInstance:
        return _refuse(self.name, reason, detail)

    def cut(self) -> InvalidInstance:
        return self.fail("truncated", "the file ends inside a data element (cut short); resend it")

    def run(self, position: int) -> None:
        count = 0
        while True:
            if self.end != _OPEN and position >= self.end:
                if position > self.end:  # an element of undefined length inside ran past it
                    raise self._overrun(self.end)
                self._pop()  # a defined-length item or sequence is complete
                continue
            head = self.source.read(position, 12)
            if len(head) < 8:
                self._finish(head, count, position)
                return
            count += 1
            if count > MAX_ELEMENTS:
                raise self.fail(
                    "too-large", f"more than {MAX_ELEMENTS} data elements; a corrupt header?"
                )
            tag, vr, length, header = _element_header(
                head, implicit=self.implicit, little=self.little
            )
            if count == 1:
                self._check_start(tag)
            if header > len(head):
                raise self.cut()
            if self.kind == _DATASET:
                position = self._element(tag, vr, length, position, position + header)
            else:
                position = self._item(tag, length, position, position + header)

    def _element(self, tag: int, vr: str | None, length: int, position: int, value: int) -> int:
        """Take the data element at ``position`` in a data set; where the next one starts."""
        if tag >> 16 == _DELIMITER_GROUP:
            if tag == _ITEM_END and self.stack and self.end == _OPEN:
                self._pop()
                return value
            raise self.fail(
                "unreadable",
                f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of place at byte {position}; "
                "the file is corrupt",
            )
        top = not self.stack
        if top and tag in PIXEL_TAGS:
            pixels = self._pixels(tag, vr, length)
            if length == _UNDEFINED:
                self._push(_FRAGMENTS, _OPEN)
                self.counting = pixels
                return value
        if length == _UNDEFINED:
            # Elements of undefined length are sequences unless the dictionary says otherwise:
            # then they hold encapsulated data, items of opaque bytes.
            sequence = tag not in PIXEL_TAGS and (
                vr in ("SQ", "UN") or (vr is None and _dictionary_vr(tag) in ("SQ", None))
            )
            self._push(_SEQUENCE if sequence else _FRAGMENTS, _OPEN)
            return value
        if vr == "SQ" or (vr is None and _dictionary_vr(tag) == "SQ"):
            self._push(_SEQUENCE, self._end(value, length))
            return value
        if top and tag in self.wanted:
            self._keep(tag, vr, length, value)
        return self._skip(value, length)

    def _item(self, tag: int, length: int, position: int, value: int) -> int:
        """Take the item or delimiter at ``position`` in a sequence or an encapsulated value."""
        if tag == _SEQUENCE_END and self.end == _OPEN:
            self._pop()
            return value
        if tag != _ITEM or (self.kind == _FRAGMENTS and length == _UNDEFINED):
            raise self.fail(
                "unreadable",
                f"malformed {'sequence' if self.kind == _SEQUENCE else 'fragment'} item "
                f"({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {position}; the file is corrupt",
            )
        if self.kind == _SEQUENCE:
            self._push(_DATASET, _OPEN if length == _UNDEFINED else self._end(value, length))
            return value
        if self.counting is not None:
            if self.counting.offset_table_length is None:
                self.counting.offset_table_length = length
            else:
                self.counting.fragments += 1
        return self._skip(value, length)

    def _push(self, kind: int, end: int) -> None:
        self.stack.append((self.kind, self.end))
        self.kind, self.end = kind, end
        if kind == _SEQUENCE:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail(
                    TOO_DEEPLY_NESTED,
                    f"sequences nested more than {MAX_DEPTH} deep; no instance needs that many, "
                    "the file is corrupt or hostile",
                )

    def _pop(self) -> None:
        if self.kind == _SEQUENCE:
            self.depth -= 1
        self.counting = None  # only ever set for a frame of fragments, which holds no other
        self.kind, self.end = self.stack.pop()

    def _finish(self, head: bytes, count: int, position: int) -> None:
        """The data ends at ``position`` (``head``: what is left of it)."""
        if head or self.stack:
            raise self.cut()
        if not count:
            raise self.fail(
                "truncated",
                "the file holds nothing after its file meta information (cut short); resend it",
            )
        self.source.finish(position)

    def _overrun(self, end: int) -> InvalidInstance:
        return self.fail(
            "unreadable",
            f"a data element runs past the end of the item or sequence holding it (byte {end}); "
            "the file is corrupt",
        )

    def _check_start(self, tag: int) -> None:
        """Refuse bytes that are no data set at all: a composite instance's first element is in
        group 0008 (SOP Class UID is required), or in an even group before it."""
        if not 0x0004 <= tag >> 16 <= 0x0008 or tag >> 16 & 1:
            raise self.fail(
                "not-dicom",
                f"the data set does not begin with a DICOM data element (found tag "
                f"({tag >> 16:04X},{tag & 0xFFFF:04X})): not a DICOM instance",
            )

    def _end(self, value: int, length: int) -> int:
        """Where a value of defined ``length`` starting at ``value`` ends, checked against the
        end of the item or sequence holding it."""
        if self.end != _OPEN and value + length > self.end:
            raise self._overrun(self.end)
        return value + length

    def _skip(self, value: int, length: int) -> int:
        position = self._end(value, length)
        if not self.source.reach(position):
            raise self.cut()
        return position

    def _keep(self, tag: int, vr: str | None, length: int, value: int) -> None:
        if length > VALUE_LIMIT:
            raise self.fail(
                "unreadable",
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) claims {length} bytes; the file "
                "is corrupt",
            )
        data = self.source.read(value, length)
        if len(data) < length:
            raise self.cut()
        self.elements[BaseTag(tag)] = RawDataElement(
            BaseTag(tag), vr, length, data, value, self.implicit, self.little
        )

    def _pixels(self, tag: int, vr: str | None, length: int) -> PixelData:
        pixels = PixelData(tag, vr, None if length == _UNDEFINED else length)
        allowance = self.pixel_allowance(self.elements, pixels)
        if self.pixels is None:
            self.pixels = pixels
        self.source.allow(allowance)
        return pixels
