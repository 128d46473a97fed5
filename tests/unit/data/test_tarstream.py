import io
import tarfile

import pytest

from app.data.tarstream import TarFormatError, iter_members

MEMBERS = {
    "short.jpg": b"\xff\xd8abc",
    "dir/" + "n" * 120 + ".json": b'{"a": 1}',  # too long for a plain ustar name
    "a" * 90 + "/" + "b" * 90 + ".jpg": b"x" * 1000,  # fits ustar only with the prefix field
    "empty.cls": b"",
    "caf\u00e9.jpg": b"\x00" * 513,  # non-ASCII name: PAX path header
}


def _tar(fmt: int, members: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("some_dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reads_the_same_members_as_tarfile(fmt):
    data = _tar(fmt, MEMBERS)
    assert dict(iter_members(io.BytesIO(data))) == MEMBERS
    assert [n for n, _ in iter_members(io.BytesIO(data))] == list(MEMBERS)


def test_ustar_prefix_names_are_joined():
    members = {k: v for k, v in MEMBERS.items() if k.startswith("a")}
    data = _tar(tarfile.USTAR_FORMAT, members)
    assert dict(iter_members(io.BytesIO(data))) == members


def test_garbage_and_truncation_are_errors():
    with pytest.raises(TarFormatError, match="tar header"):
        list(iter_members(io.BytesIO(b"\x01" * 1024)))
    bad = bytearray(_tar(tarfile.PAX_FORMAT, {"a.jpg": b"z"}))
    bad[600] ^= 0xFF  # a byte inside the member's header (the directory header comes first)
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(bad))))
    data = _tar(tarfile.PAX_FORMAT, {"big.jpg": b"y" * 5000})
    with pytest.raises(TarFormatError, match="end of archive"):
        list(iter_members(io.BytesIO(data[:2048])))
