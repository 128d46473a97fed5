"""A forward-only tar member reader, several times faster than `tarfile` mode `r|`.

Shards hold thousands of small members; `tarfile` spends most of its time building `TarInfo`
objects. This reads what a shard reader needs, name and bytes, and understands ustar, GNU long
names (`L`) and PAX extended headers (`x` path/size), so tars written by other tools read too.

    for name, data in iter_members(fileobj): ...
"""

from __future__ import annotations

from typing import BinaryIO, Iterator

BLOCK = 512
_REGULAR = (b"0", b"\x00", b"7")


class TarFormatError(ValueError):
    """The stream is not a well-formed tar archive."""


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if data is None:
        data = b""
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            raise TarFormatError(f"unexpected end of archive ({got} of {n} bytes)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _skip(f: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise TarFormatError("unexpected end of archive while skipping data")
        n -= len(chunk)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] & 0x40 else value
    text = field.split(b"\x00", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r} in tar header") from None


def _string(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise TarFormatError("bad PAX record length")
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield `(name, data)` for every regular file in the tar stream `f`, in archive order."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = f.read(BLOCK)
        if not header:
            return  # end of stream without end-of-archive blocks: accepted, like tarfile
        if len(header) < BLOCK:
            header += _read_exact(f, BLOCK - len(header))
        if header.count(0) == BLOCK:
            return  # end-of-archive marker
        stored = _number(header[148:156])
        checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != checksum:
            raise TarFormatError("bad tar header checksum (not a tar archive, or corrupt)")
        kind = header[156:157]
        size = _number(header[124:136])
        if kind in (b"x", b"L", b"g", b"K"):
            data = _read_exact(f, size)
            _skip(f, _padded(size) - size)
            if kind == b"x":
                pax = _pax(data)
            elif kind == b"L":
                long_name = _string(data)
            continue
        name = _string(header[0:100])
        if header[257:263] == b"ustar\x00":  # POSIX ustar: a name may be split at a prefix
            prefix = _string(header[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        if long_name is not None:
            name = long_name
        name = pax.get("path", name)
        if "size" in pax:
            size = int(pax["size"])
        long_name, pax = None, {}
        if kind in _REGULAR:
            data = _read_exact(f, size)
            _skip(f, _padded(size) - size)
            yield name, data
        else:  # directories, links, devices: nothing to read for a shard
            _skip(f, _padded(size))
