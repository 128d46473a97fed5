"""An HTTP/1.1 proxy between a client and a real S3 server that damages responses on purpose.

    with FaultProxy("127.0.0.1", s3_port) as proxy:   # clients use proxy.endpoint
        proxy.truncate_ranged_bodies(after=1000)        # every ranged GET body cut after 1000 B
        proxy.widen_ranges(extra=550, count=3)          # the next 3 ranged GETs get a longer
                                                        # body than asked (another reply's bytes)
        proxy.heal()                                    # back to a faithful proxy
        proxy.on_request(rb"^PUT .*/checkpoints/step-", action, hold_s=2)
                                                        # the first matching request calls
                                                        # action() and waits 2 s before it is sent

One upstream request per client request, forwarded byte for byte; a damaged response closes the
client connection (as a reset server would). Everything stays on loopback.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field


def _read_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    """Read up to the end of an HTTP head (`\\r\\n\\r\\n`); None at EOF before any byte."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head


def _read_body(sock: socket.socket, buf: bytearray, length: int) -> bytes:
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return body


def _header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode()
    return None


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    host: str = "127.0.0.1"
    truncate_after: int | None = None  # cut ranged GET bodies after this many bytes
    widen_by: int = 0  # append this many bytes (with matching headers) to a ranged GET reply
    widen_left: int = 0  # how many more ranged GETs to widen
    damaged: int = 0  # responses damaged so far
    requests: int = 0
    _threads: list = field(default_factory=list)
    _hooks: list = field(default_factory=list)  # [pattern, action, hold_s, fired]
    request_lines: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((self.host, 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def truncate_ranged_bodies(self, after: int) -> None:
        self.truncate_after = after

    def widen_ranges(self, extra: int, count: int) -> None:
        self.widen_by, self.widen_left = extra, count

    def on_request(self, pattern: bytes, action, hold_s: float = 0.0) -> None:
        """The first request whose request line matches `pattern` runs `action()` (in the
        proxy's thread) and is held `hold_s` seconds before it goes to the server."""
        self._hooks.append([re.compile(pattern), action, hold_s, False])

    def _fire_hooks(self, head: bytes) -> None:
        line = head.split(b"\r\n", 1)[0]
        with self._lock:
            self.request_lines.append(line)
            due = [h for h in self._hooks if not h[3] and h[0].search(line)]
            for h in due:
                h[3] = True
        for _, action, hold_s, _ in due:
            action()
            if hold_s:
                time.sleep(hold_s)

    def heal(self) -> None:
        self.truncate_after, self.widen_by, self.widen_left = None, 0, 0

    def _take_widen(self) -> int:
        with self._lock:
            if self.widen_left <= 0:
                return 0
            self.widen_left -= 1
            self.damaged += 1
            return self.widen_by

    @staticmethod
    def _widened(resp_head: bytes, resp_body: bytes, extra: int) -> bytes:
        """The reply a client would parse off a socket it shares with another process: a longer
        range than it asked for (headers consistent with the longer body)."""
        def content_range(m: re.Match) -> bytes:
            return b"%s%d-%d/%d" % (m.group(1), int(m.group(2)), int(m.group(3)) + extra,
                                    int(m.group(4)) + extra)
        head = re.sub(rb"(?im)^(content-range:\s*bytes )(\d+)-(\d+)/(\d+)", content_range, resp_head)
        head = re.sub(rb"(?im)^(content-length:\s*)(\d+)",
                      lambda m: b"%s%d" % (m.group(1), int(m.group(2)) + extra), head)
        return head + resp_body + bytes(range(256)) * (extra // 256) + bytes(extra % 256)

    def __enter__(self) -> "FaultProxy":
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        cbuf, ubuf = bytearray(), bytearray()
        try:
            upstream = socket.create_connection((self.upstream_host, self.upstream_port), timeout=30)
            while True:
                head = _read_head(client, cbuf)
                if head is None:
                    return
                body = _read_body(client, cbuf, int(_header(head, "content-length") or 0))
                method = head.split(b" ", 1)[0]
                ranged = method == b"GET" and _header(head, "range") is not None
                self._fire_hooks(head)
                upstream.sendall(head + body)
                with self._lock:
                    self.requests += 1
                resp_head = _read_head(upstream, ubuf)
                if resp_head is None:
                    return
                resp_body = b"" if method == b"HEAD" else _read_body(
                    upstream, ubuf, int(_header(resp_head, "content-length") or 0))
                status = resp_head.split(b" ", 2)[1]
                if ranged and status == b"206" and self.truncate_after is not None \
                        and len(resp_body) > self.truncate_after:
                    with self._lock:
                        self.damaged += 1
                    client.sendall(resp_head + resp_body[: self.truncate_after])
                    return  # the connection drops mid-body
                extra = self._take_widen() if ranged and status == b"206" else 0
                if extra:
                    client.sendall(self._widened(resp_head, resp_body, extra))
                    return
                client.sendall(resp_head + resp_body)
        except OSError:
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()
