"""Retries with exponential backoff and jitter for S3 calls, and one-line errors for the rest.

This layer is the only one that retries: the urllib3 pool under the minio client is built with
`Retry(total=0)` (see `s3.py`), so a transient failure reaches us at once and is counted here.

    policy = RetryPolicy.from_env()   # S3_MAX_RETRIES (20), S3_RETRY_BASE_SECONDS (0.5),
                                      # S3_RETRY_DEADLINE_SECONDS (120)
    policy.call(lambda: client.stat_object(b, k), uri="s3://b/k", endpoint=..., what="stat")

The budget is both a count and a time: a call gives up at the first of `max_retries` retries or
`deadline_seconds` after its first failure, so a restarting S3 server (a MinIO pod rescheduled in
10-30 s) is waited for, and a server that is gone for good fails the job within two minutes.

Transient (retried): connection refused/reset, timeouts, truncated responses, HTTP 5xx, SlowDown.
Not retried: auth errors (one line naming the endpoint and the key variables), a missing object
(`NotFound`), a missing bucket, and errors raised by the caller's own data source.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from app.storage.base import NotFound, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

AUTH_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "AuthorizationHeaderMalformed", "AccountProblem", "InvalidSecurity",
})
TRANSIENT_CODES = frozenset({
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted",
    "RequestTimeTooSkewed", "XMinioServerNotInitialized", "XAmzContentSHA256Mismatch",
})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchVersion", "ResourceNotFound"})


class SourceError(Exception):
    """Reading the caller's data (a local file or stream) failed; never retried by us."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class TransientReply(ConnectionError):
    """A reply that does not answer the request (wrong range, more bytes than asked): the
    connection is dropped and the request sent again."""


class AuthError(StorageError):
    """The server refused the credentials."""


class BucketMissing(StorageError):
    """The bucket does not exist."""


def _env_number(name: str, default: float, cast: type) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise StorageError(f"{name}={raw!r}: expected {kind}") from None
    if value < 0:
        raise StorageError(f"{name}={raw!r}: must be >= 0")
    return value


def _status(exc: BaseException) -> int | None:
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, S3Error):
        return getattr(exc.response, "status", None)
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        return getattr(exc, "_code", None)
    return None


def classify(exc: BaseException) -> str:
    """One of `source`, `auth`, `not_found`, `no_bucket`, `transient`, `fatal`."""
    import urllib3.exceptions as u3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, SourceError):
        return "source"
    if isinstance(exc, S3Error):
        if exc.code in AUTH_CODES:
            return "auth"
        if exc.code in NOT_FOUND_CODES:
            return "not_found"
        if exc.code == "NoSuchBucket":
            return "no_bucket"
        status = _status(exc) or 0
        return "transient" if exc.code in TRANSIENT_CODES or status >= 500 else "fatal"
    if isinstance(exc, (ServerError, InvalidResponseError)):
        status = _status(exc) or 0
        if status in (401, 403):
            return "auth"
        return "transient" if status >= 500 or status == 429 else "fatal"
    if isinstance(exc, u3.MaxRetryError):
        return classify(exc.reason) if exc.reason is not None else "transient"
    if isinstance(exc, u3.SSLError):
        return "fatal"  # a certificate problem does not heal by waiting
    if isinstance(exc, (u3.HTTPError, http.client.HTTPException)):
        return "transient"  # new-connection, timeout, protocol (reset, truncated body) errors
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return "transient"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET,
                                                   errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH,
                                                   errno.ENETUNREACH, errno.ECONNABORTED):
        return "transient"
    return "fatal"


def describe(exc: BaseException) -> str:
    """A short, single-line cause: 'connection refused', 'HTTP 503 SlowDown', ..."""
    import urllib3.exceptions as u3
    from minio.error import S3Error

    if isinstance(exc, SourceError):
        return describe(exc.cause)
    if isinstance(exc, S3Error):
        status = _status(exc)
        return f"HTTP {status} {exc.code}" if status else str(exc.code)
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno:
            return os.strerror(cur.errno).lower()
        # NewConnectionError subclasses ConnectTimeoutError: look at its cause first.
        if isinstance(cur, u3.NewConnectionError) and (cur.__cause__ or cur.__context__):
            cur = cur.__cause__ or cur.__context__
            continue
        if isinstance(cur, (u3.ConnectTimeoutError, u3.ReadTimeoutError, TimeoutError, socket.timeout)):
            return "timed out"
        if isinstance(cur, u3.MaxRetryError):
            cur = cur.reason
            continue
        if isinstance(cur, u3.ProtocolError) and cur.args and isinstance(cur.args[-1], BaseException):
            cur = cur.args[-1]
            continue
        nxt = cur.__cause__ or cur.__context__
        if nxt is None:
            break
        cur = nxt
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 20
    base_seconds: float = 0.5
    max_seconds: float = 10.0
    deadline_seconds: float = 120.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(
            max_retries=int(_env_number("S3_MAX_RETRIES", 20, int)),
            base_seconds=float(_env_number("S3_RETRY_BASE_SECONDS", 0.5, float)),
            deadline_seconds=float(_env_number("S3_RETRY_DEADLINE_SECONDS", 120.0, float)),
        )

    def budget(self) -> RetryBudget:
        """The retries left to one operation (its count and its time)."""
        return RetryBudget(self)

    def delay(self, attempt: int) -> float:
        """Backoff before retry `attempt` (0-based): base * 2^attempt, capped, with jitter in [0.5, 1]x.

        Jitter spreads the retries of many ranks that lost the server at the same moment.
        """
        return min(self.max_seconds, self.base_seconds * (2 ** attempt)) * (0.5 + random.random() / 2)

    def call(self, fn: Callable[[], T], *, uri: str, endpoint: str, what: str = "request",
             source: str = "env") -> T:
        """Run `fn`, retrying transient errors; raise a one-line `StorageError` otherwise."""
        budget = self.budget()
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
                wait = budget.next_wait() if classify(exc) == "transient" else None
                if wait is None:
                    raise to_storage_error(exc, uri=uri, endpoint=endpoint, what=what,
                                           attempts=budget.attempts, source=source) from exc
                log.warning("%s: %s failed (%s); retry %d in %.2f s", uri, what, describe(exc),
                            budget.attempts - 1, wait)
                self.sleep(wait)


class RetryBudget:
    """Retries left to one operation: `next_wait()` after each transient failure gives the
    backoff to sleep, or None once `max_retries` retries were made or `deadline_seconds` have
    passed since the first failure. `progress()` (a call that got somewhere) starts afresh."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.retries = 0
        self.first_failure: float | None = None

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def next_wait(self) -> float | None:
        now = self.policy.clock()
        if self.first_failure is None:
            self.first_failure = now
        if self.retries >= self.policy.max_retries or \
                now - self.first_failure >= self.policy.deadline_seconds:
            return None
        wait = self.policy.delay(self.retries)
        self.retries += 1
        return wait

    def progress(self) -> None:
        self.retries, self.first_failure = 0, None


def to_storage_error(exc: BaseException, *, uri: str, endpoint: str, what: str = "request",
                     attempts: int = 1, source: str = "env") -> StorageError:
    """The one-line error a user sees for `exc`; secrets never appear (only where keys came from)."""
    if isinstance(exc, StorageError):
        return exc
    kind = classify(exc)
    cause = describe(exc)
    if kind == "auth":
        where = ("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" if source == "env"
                 else f"the keys in {source.split('=', 1)[-1]}")
        return AuthError(f"{uri}: access denied by {endpoint} ({cause}; check {where})")
    if kind == "not_found":
        return NotFound(f"{uri}: no such object")
    if kind == "no_bucket":
        bucket = uri.split("/")[2] if uri.startswith("s3://") else uri
        return BucketMissing(f"{uri}: bucket '{bucket}' does not exist at {endpoint} "
                             "(create it, or set S3_CREATE_BUCKET=1 to create it on write)")
    if getattr(exc, "code", None) == "PreconditionFailed":
        return StorageError(f"{uri}: the object was replaced while it was being read; read it again")
    if kind == "source":
        return StorageError(f"{uri}: reading the data to upload failed ({cause}); nothing was written")
    if kind == "transient":
        return StorageError(f"{uri}: {what} failed after {attempts} attempt"
                            f"{'s' if attempts != 1 else ''} against {endpoint} ({cause})")
    return StorageError(f"{uri}: {what} failed at {endpoint} ({cause})")
