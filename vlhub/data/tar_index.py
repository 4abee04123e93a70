"""Where each sample of a tar shard lies, from the tar headers alone, and reading one sample by seeking.

A tar is a sequence of 512-byte headers, each followed by its member's data padded to 512 bytes.
Walking the headers and seeking past the data finds every member without reading it: one small
read per member, whatever the image sizes. Members are grouped into samples by webdataset's rules
(``webdataset.tariterators``: regular files only, ``__meta__`` names skipped, key = the path up
to the first dot of the file name), so a sample is a byte range of consecutive members that
:func:`read_span` reads with one seek and one read. ``pax`` (``x``) and GNU long-name (``L``)
headers are honoured, as Python's ``tarfile`` writes them for long names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")
ReadAt = Callable[[int, int], bytes]


class TarHeaderError(ValueError):
    """A header that is not a tar header (bad checksum, bad size field) or a member cut short."""


@dataclass(frozen=True)
class Span:
    """One sample: its key, the byte range ``[start, end)`` of its members (headers included), and each
    member's (extension, data offset, size)."""

    key: str
    start: int
    end: int
    members: tuple[tuple[str, int, int], ...] = ()


def _number(field: bytes, what: str, offset: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256, for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarHeaderError(f"corrupt tar header at byte {offset}: {what} field {field!r}") from None


def _header(block: bytes, offset: int) -> tuple[str, int, bytes] | None:
    """(name, data size, type) of one header block; None for the zero block that ends the archive."""
    if len(block) < BLOCK:
        raise TarHeaderError(f"tar cut short at byte {offset}: {len(block)} of {BLOCK} header bytes")
    if block.count(0) == BLOCK:
        return None
    stored = _number(block[148:156], "checksum", offset)
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise TarHeaderError(f"corrupt tar header at byte {offset}: checksum mismatch")
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), _number(block[124:136], "size", offset), block[156:157]


def _pax(data: bytes) -> dict[str, str]:
    """``"<length> key=value\\n"`` records."""
    found, position = {}, 0
    while position < len(data):
        length = int(data[position:].split(b" ", 1)[0])
        record = data[position : position + length].split(b" ", 1)[1].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        found[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return found


def members(read_at: ReadAt, start: int = 0, end: int | None = None) -> Iterator[tuple[int, str, int, int]]:
    """(header offset, name, data offset, size) of each regular file from ``start`` (to ``end``).

    ``read_at(offset, n)`` returns up to ``n`` bytes; data is never read except for the small pax and
    long-name records. A corrupt or cut header raises :class:`TarHeaderError`."""
    offset, first, pending = start, start, False
    name_override: str | None = None
    size_override: int | None = None
    while end is None or offset < end:
        parsed = _header(read_at(offset, BLOCK), offset)
        if parsed is None:
            return
        name, size, kind = parsed
        data = offset + BLOCK
        following = data + -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"L"):  # they describe the next header: read their (small) data
            payload = read_at(data, size)
            if len(payload) < size:
                raise TarHeaderError(f"tar cut short in an extended header at byte {offset}")
            pending = True
            if kind == b"L":
                name_override = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pax = _pax(payload)
                name_override = pax.get("path", name_override)
                size_override = int(pax["size"]) if "size" in pax else None
        else:
            if size_override is not None:
                size, following = size_override, data + -(-size_override // BLOCK) * BLOCK
            if kind in (b"0", b"\0", b"7"):
                yield first, name_override or name, data, size
            name_override, size_override, pending = None, None, False
        offset = following
        if not pending:
            first = offset


def _sample_key(name: str) -> str | None:
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META.match(name):
        return None
    return base_plus_ext(name)[0]


def scan(file: BinaryIO) -> tuple[list[Span], TarHeaderError | None]:
    """The samples of a seekable tar, from its headers; and the error that ended the walk early, if any
    (the samples wholly before it stay readable; the one it cut is lost)."""

    def read_at(offset: int, size: int) -> bytes:
        file.seek(offset)
        return file.read(size)

    file.seek(0, 2)
    length = file.tell()
    spans: list[Span] = []
    key, start, end, found = None, 0, 0, []
    try:
        for header, name, data, size in members(read_at):
            if data + size > length:
                raise TarHeaderError(f"member {name} cut short: {size} bytes from byte {data}, file ends at {length}")
            member_key = _sample_key(name)
            if member_key is None:
                continue
            if member_key != key:
                if key is not None:
                    spans.append(Span(key, start, end, tuple(found)))
                key, start, found = member_key, header, []
            end = data + -(-size // BLOCK) * BLOCK
            found.append((base_plus_ext(name)[1].lower(), data, size))
    except TarHeaderError as error:  # the sample being walked may lack members: it is lost with the rest
        return spans, error
    if key is not None:
        spans.append(Span(key, start, end, tuple(found)))
    return spans, None


def read_span(file: BinaryIO, span: Span, url: str) -> dict:
    """One sample as webdataset groups it (``{"__key__", "__url__", <extension>: bytes, ...}``): one
    seek, one read of its byte range."""
    file.seek(span.start)
    buffer = file.read(span.end - span.start)
    if len(buffer) < span.end - span.start:
        raise TarHeaderError(f"sample {span.key} cut short: the file ends before byte {span.end}")
    sample: dict = {"__key__": span.key, "__url__": url}
    for extension, data, size in span.members:
        sample[extension] = buffer[data - span.start : data - span.start + size]
    return sample


def read_member(file: BinaryIO, span: Span, extension: str) -> bytes | None:
    """One member of a sample (a caption, to filter on), without reading the others."""
    for name, data, size in span.members:
        if name == extension:
            file.seek(data)
            return file.read(size)
    return None
