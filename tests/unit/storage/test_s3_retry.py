"""Classification of S3/network failures, backoff, and the one-line errors users see."""

import errno
import socket

import pytest
import urllib3
from minio.error import S3Error, ServerError

from app.storage import NotFound, StorageError
from app.storage.retry import RetryPolicy, SourceError, classify, describe, to_storage_error

ENDPOINT = "http://127.0.0.1:8333"
URI = "s3://b/k"


class _Resp:
    def __init__(self, status):
        self.status = status


def s3_error(code, status):
    return S3Error(_Resp(status), code, "msg", "/b/k", "req", "host", bucket_name="b", object_name="k")


def refused():
    """A real connection-refused error from urllib3 with retries disabled."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = urllib3.PoolManager(retries=urllib3.Retry(total=0))
    try:
        pool.request("GET", f"http://127.0.0.1:{port}/")
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("expected a connection error")


@pytest.mark.parametrize("exc, kind", [
    (s3_error("SignatureDoesNotMatch", 403), "auth"),
    (s3_error("InvalidAccessKeyId", 403), "auth"),
    (s3_error("AccessDenied", 403), "auth"),
    (s3_error("NoSuchKey", 404), "not_found"),
    (s3_error("NoSuchBucket", 404), "no_bucket"),
    (s3_error("SlowDown", 503), "transient"),
    (s3_error("InternalError", 500), "transient"),
    (s3_error("InvalidArgument", 400), "fatal"),
    (ServerError("boom", 502), "transient"),
    (ConnectionResetError(), "transient"),
    (TimeoutError(), "transient"),
    (SourceError(OSError("disk")), "source"),
    (ValueError("bug"), "fatal"),
])
def test_classify(exc, kind):
    assert classify(exc) == kind


def test_connection_refused_is_transient_and_described_plainly():
    exc = refused()
    assert classify(exc) == "transient"
    assert describe(exc) == "connection refused"


def test_retries_transient_errors_then_succeeds_with_growing_delays():
    waits = []
    policy = RetryPolicy(max_retries=5, base_seconds=0.5, sleep=waits.append)
    outcomes = [ConnectionResetError(), s3_error("SlowDown", 503), "ok"]

    def op():
        item = outcomes.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    assert policy.call(op, uri=URI, endpoint=ENDPOINT) == "ok"
    assert len(waits) == 2
    assert 0.25 <= waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0  # base*2^n with jitter in [0.5, 1]


def test_gives_up_after_max_retries_with_one_line_error():
    waits = []
    policy = RetryPolicy(max_retries=3, base_seconds=0.1, sleep=waits.append)
    calls = []

    def op():
        calls.append(1)
        raise refused()

    with pytest.raises(StorageError) as err:
        policy.call(op, uri=URI, endpoint=ENDPOINT, what="get")
    assert len(calls) == 4 and len(waits) == 3
    assert str(err.value) == f"{URI}: get failed after 4 attempts against {ENDPOINT} (connection refused)"


def test_auth_error_is_not_retried_and_names_endpoint_and_variables():
    calls = []

    def op():
        calls.append(1)
        raise s3_error("SignatureDoesNotMatch", 403)

    with pytest.raises(StorageError) as err:
        RetryPolicy(sleep=lambda s: None).call(op, uri=URI, endpoint=ENDPOINT)
    assert len(calls) == 1
    assert str(err.value) == (f"{URI}: access denied by {ENDPOINT} (HTTP 403 SignatureDoesNotMatch; "
                              "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")


def test_missing_object_is_not_found():
    err = to_storage_error(s3_error("NoSuchKey", 404), uri=URI, endpoint=ENDPOINT)
    assert isinstance(err, NotFound) and str(err) == f"{URI}: no such object"


def test_policy_reads_env(monkeypatch):
    monkeypatch.setenv("S3_MAX_RETRIES", "2")
    monkeypatch.setenv("S3_RETRY_BASE_SECONDS", "0.05")
    assert (RetryPolicy.from_env().max_retries, RetryPolicy.from_env().base_seconds) == (2, 0.05)
    monkeypatch.setenv("S3_MAX_RETRIES", "many")
    with pytest.raises(StorageError, match="S3_MAX_RETRIES='many': expected an integer"):
        RetryPolicy.from_env()
    monkeypatch.delenv("S3_MAX_RETRIES")
    monkeypatch.delenv("S3_RETRY_BASE_SECONDS")
    policy = RetryPolicy.from_env()
    assert (policy.max_retries, policy.base_seconds, policy.deadline_seconds) == (20, 0.5, 120.0)
    monkeypatch.setenv("S3_RETRY_DEADLINE_SECONDS", "7.5")
    assert RetryPolicy.from_env().deadline_seconds == 7.5


def test_gives_up_when_the_time_budget_is_spent_whatever_the_count():
    now = [0.0]

    def sleep(seconds):  # a fake clock: the budget is measured, not slept
        now[0] += seconds

    policy = RetryPolicy(max_retries=1000, base_seconds=1.0, max_seconds=4.0, deadline_seconds=30.0,
                         sleep=sleep, clock=lambda: now[0])
    calls = []

    def op():
        calls.append(now[0])
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    with pytest.raises(StorageError, match=r"failed after \d+ attempts against http://127.0.0.1:8333 "
                                           r"\(connection refused\)"):
        policy.call(op, uri=URI, endpoint=ENDPOINT)
    assert 30.0 <= now[0] < 30.0 + 4.0  # stopped at the deadline, not after 1000 retries
    assert 8 <= len(calls) <= 30
