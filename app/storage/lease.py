"""A lease on a storage prefix: one writer at a time for a run's checkpoints and exports.

The lease is a small JSON object (`LEASE.json`) naming its holder and when it was last renewed;
the holder renews it every ttl/4 from a daemon thread and deletes it when done. A second writer
(a `kubectl create -f` or `dinoctl rerun` of a job that is still running) waits while the lease
is fresh and fails with one line naming the holder; a lease not renewed for `ttl_s` (its holder
was killed) is taken over. Holders are identified by job (`DINOCTL_JOB_NAME`): a restarted pod
of the same job is the same holder. Without a job name (a plain local run) the holder is this
host, so repeated local runs never wait on themselves.

Object stores have no compare-and-swap here, so taking a lease is write-then-read-back: two
writers starting within the same second can both see their own write only if the store reorders
them, which S3's read-after-write consistency rules out for a single key.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from app.storage.api import delete, exists, get_bytes, put_bytes
from app.storage.base import StorageError, join

log = logging.getLogger(__name__)
LEASE_NAME = "LEASE.json"


class LeaseHeld(StorageError):
    """Another job holds the lease; the message names it."""


def default_holder() -> str:
    job = os.environ.get("DINOCTL_JOB_NAME", "").strip()
    return f"job:{job}" if job else f"host:{socket.gethostname()}"


@dataclass
class Lease:
    prefix: str  # e.g. <store>/runs/<name>
    ttl_s: float = 120.0
    holder: str = field(default_factory=default_holder)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return join(self.prefix, LEASE_NAME)

    def _read(self) -> dict | None:
        if not exists(self.uri):
            return None
        try:
            return json.loads(get_bytes(self.uri))
        except (StorageError, ValueError):
            return None  # deleted between the two calls, or half-written by a dead holder

    def _write(self) -> None:
        put_bytes(self.uri, json.dumps({"holder": self.holder, "token": self.token,
                                        "renewed_at": time.time(), "ttl_s": self.ttl_s,
                                        "pod": socket.gethostname(), "pid": os.getpid()}).encode())

    def acquire(self, wait_s: float | None = None, poll_s: float = 2.0) -> "Lease":
        """Take the lease, waiting up to `wait_s` (default ttl + 60 s) for a fresh one to expire."""
        wait_s = self.ttl_s + 60 if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            cur = self._read()
            age = time.time() - float(cur.get("renewed_at", 0)) if cur else None
            if cur is None or cur.get("holder") == self.holder or age > float(cur.get("ttl_s", self.ttl_s)):
                if cur is not None and cur.get("holder") != self.holder:
                    log.warning("taking over the lease on %s from %s (not renewed for %.0f s)",
                                self.prefix, cur.get("holder"), age)
                self._write()
                time.sleep(min(poll_s, 1.0))
                mine = self._read()
                if mine and mine.get("token") == self.token:
                    self._start_renewing()
                    return self
                continue  # another writer won the race: look again
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.prefix} is being written by {cur.get('holder')} (pod "
                                f"{cur.get('pod')}, lease renewed {age:.0f} s ago): stop that job "
                                f"or wait for it; a dead holder's lease expires after {self.ttl_s:.0f} s")
            if not told:
                log.warning("%s is held by %s (renewed %.0f s ago): waiting up to %.0f s",
                            self.prefix, cur.get("holder"), age, wait_s)
                told = True
            time.sleep(poll_s)

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self._write()
                except StorageError as exc:  # the store is down: retried at the next period
                    log.warning("lease on %s not renewed: %s", self.prefix, exc)

        self._thread = threading.Thread(target=renew, name="lease-renew", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        try:
            cur = self._read()
            if cur and cur.get("token") == self.token:
                delete(self.uri)
        except StorageError as exc:
            log.warning("lease on %s not released (it expires by itself): %s", self.prefix, exc)
