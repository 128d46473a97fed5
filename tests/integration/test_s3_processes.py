"""S3 reads from several processes (forked DataLoader workers, os.fork) and damaged ranged replies.

A client made in one process must never be used in another: forked children that inherit the
parent's connection pool read each other's replies off shared sockets. And a ranged read returns
exactly the bytes asked for, or raises: never short, never long.
"""

import hashlib
import os

import pytest
import torch

from app import storage
from app.data import Dataset
from app.data.synth import synthesize
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_pool(s3_server):
    """A 160-image pool on S3 in many small shards (written once for this module)."""
    env = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)
    try:
        out = s3_server.uri("synth")
        synthesize(out, seed=5, n_pool=160, n_seeds=4, n_eval_train=8, n_eval_val=4, image_size=64,
                   max_samples_per_shard=16)
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return storage.join(out, "pool")


class _Digests(torch.utils.data.Dataset):
    """Item i -> (i, sha256 of the JPEG bytes read by ranged GET in this worker)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return i, hashlib.sha256(self.ds.get(i).image_bytes).hexdigest()


@pytest.mark.parametrize("workers", [2, 4])
def test_dataloader_workers_read_exact_bytes_from_s3(s3_env, s3_pool, workers):
    ds = Dataset(s3_pool)
    want = ds.index.column("sha256").to_pylist()
    ds.get(0)  # the parent now holds a live pooled connection, inherited by every fork
    loader = torch.utils.data.DataLoader(_Digests(ds), batch_size=None, num_workers=workers,
                                         multiprocessing_context="fork", timeout=120)
    got = {}
    for _ in range(3):
        for i, digest in loader:
            got[int(i)] = digest
            assert digest == want[int(i)], f"sample {int(i)}: wrong bytes"
    assert len(got) == len(ds)
    assert ds.get(1).image_bytes  # the parent's own client still works afterwards


def test_forked_children_and_parent_read_concurrently(s3_env, s3_pool):
    ds = Dataset(s3_pool)
    want = ds.index.column("sha256").to_pylist()
    ds.get(0)
    pids = []
    for child in range(3):
        pid = os.fork()
        if pid == 0:  # child: read every sample; exit code says whether all bytes were right
            code = 0
            try:
                for i in range(child, len(ds), 2):
                    if hashlib.sha256(ds.get(i).image_bytes).hexdigest() != want[i]:
                        code = 3
            except BaseException:  # noqa: BLE001 - reported through the exit code
                code = 4
            os._exit(code)
        pids.append(pid)
    for i in range(len(ds)):  # the parent reads at the same time
        assert hashlib.sha256(ds.get(i).image_bytes).hexdigest() == want[i]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0, 0]


def _via_proxy(monkeypatch, s3_server, proxy: FaultProxy) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("S3_RETRY_BASE_SECONDS", "0.01")


def test_truncated_ranged_replies_are_continued_to_the_exact_length(s3_env, s3_server, s3_pool,
                                                                    monkeypatch):
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        _via_proxy(monkeypatch, s3_server, proxy)
        ds = Dataset(s3_pool)
        row = max(ds.rows, key=lambda r: r["size"])
        shard = storage.join(ds.uri, row["shard"])
        proxy.truncate_ranged_bodies(after=300)  # every ranged reply drops after 300 body bytes
        data = storage.get_storage(shard).get_range(shard, row["offset"], row["size"])
        assert len(data) == row["size"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert proxy.damaged >= row["size"] // 300  # it really was read in pieces


def test_a_longer_ranged_reply_than_asked_is_retried_not_returned(s3_env, s3_server, s3_pool,
                                                                 monkeypatch):
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        _via_proxy(monkeypatch, s3_server, proxy)
        ds = Dataset(s3_pool)
        row = ds.rows[7]
        shard = storage.join(ds.uri, row["shard"])
        proxy.widen_ranges(extra=550, count=2)
        data = storage.get_storage(shard).get_range(shard, row["offset"], row["size"])
        assert proxy.damaged == 2
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
