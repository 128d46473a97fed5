"""The run lease: one job writes a run at a time; a dead holder's lease is taken over."""

import time

import pytest

from app import storage
from app.storage.lease import Lease, LeaseHeld


def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    prefix = (tmp_path / "runs" / "r").as_uri()
    first = Lease(prefix, ttl_s=30, holder="job:pretrain-abc").acquire()
    try:
        with pytest.raises(LeaseHeld) as err:
            Lease(prefix, ttl_s=30, holder="job:pretrain-xyz").acquire(wait_s=0.5, poll_s=0.1)
        msg = str(err.value)
        assert "job:pretrain-abc" in msg and prefix in msg and "\n" not in msg
        # the same job (a restarted pod) takes its own lease at once
        again = Lease(prefix, ttl_s=30, holder="job:pretrain-abc").acquire(wait_s=0)
    finally:
        first.release()  # no longer its token: leaves the restarted pod's lease alone
    assert storage.exists(storage.join(prefix, "LEASE.json"))
    again.release()
    assert not storage.exists(storage.join(prefix, "LEASE.json"))


def test_a_killed_holders_lease_expires_and_is_taken_over(tmp_path):
    prefix = (tmp_path / "runs" / "r").as_uri()
    dead = Lease(prefix, ttl_s=1.0, holder="job:old").acquire()
    dead._stop.set()  # killed: no more renewals, nothing deleted
    new = Lease(prefix, ttl_s=1.0, holder="job:new").acquire(wait_s=10, poll_s=0.2)
    held = storage.get_json(storage.join(prefix, "LEASE.json"))
    assert held["holder"] == "job:new"
    new.release()


def test_the_holder_renews_while_it_runs(tmp_path):
    prefix = (tmp_path / "runs" / "r").as_uri()
    lease = Lease(prefix, ttl_s=0.8, holder="job:a").acquire()
    try:
        first = storage.get_json(storage.join(prefix, "LEASE.json"))["renewed_at"]
        deadline = time.monotonic() + 5
        while storage.get_json(storage.join(prefix, "LEASE.json"))["renewed_at"] == first:
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.05)
        with pytest.raises(LeaseHeld):  # renewed, so never stale for another job
            Lease(prefix, ttl_s=0.8, holder="job:b").acquire(wait_s=1.5, poll_s=0.1)
    finally:
        lease.release()
