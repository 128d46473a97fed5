"""Fault injection, part 3: damaged data. Shards changed or truncated after they were indexed
(on file:// and on a real S3 server), and checkpoints with a file deleted, truncated or altered
while LATEST still names them. Bad samples are skipped and counted; a damaged checkpoint is
never loaded: resume falls back to the newest whole one and says so, or refuses, naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app import storage
from app.data import Dataset
from app.train.checkpoint import (CheckpointCorrupt, MANIFEST_FILE, checkpoints_uri,
                                  resolve_resume)
from tests.faults.training import TrainJob, synth_pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _damage_pool(pool_dir: Path) -> dict[str, str]:
    """Flip bytes inside one sample's JPEG (same size: only its sha256 tells) and truncate
    another shard in the middle. Returns what was damaged."""
    ds = Dataset(pool_dir.as_uri())
    rows = ds.rows
    victim = rows[3]
    shard = pool_dir / victim["shard"]
    data = bytearray(shard.read_bytes())
    for i in range(victim["offset"] + 200, victim["offset"] + 260):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    other = next(r for r in rows if r["shard"] != victim["shard"])
    cut = pool_dir / other["shard"]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return {"altered": victim["key"], "truncated": other["shard"]}


def test_altered_and_truncated_shards_are_skipped_and_counted_the_job_goes_on(tmp_path):
    store = (tmp_path / "store").as_uri()
    pool = synth_pool(store)
    damaged = _damage_pool(Path(storage.parse_uri(pool)[2]))
    job = TrainJob(tmp_path, "bad-shards", pool, store, workers=2, steps=12, checkpoint_every=100)
    assert job.run_to_end() == 0, job.tail()  # 12 x 4 = the whole 48-sample epoch
    summary = json.loads((tmp_path / "store/runs/bad-shards/export/summary.json").read_text())
    assert summary["skipped_samples"] >= 2
    log = job.tail(500_000)
    assert f"sample {damaged['altered']}" in log and "sha256" in log
    assert "shorter than the index" in log or "short read" in log


def test_a_truncated_shard_on_s3_is_skipped_and_counted(tmp_path, s3_env, s3_server):
    local = (tmp_path / "store").as_uri()
    pool = synth_pool(local)
    s3_pool = s3_server.uri("pool")
    for obj in storage.list_objects(pool):
        storage.copy(obj.uri, storage.join(s3_pool, obj.uri[len(pool):].lstrip("/")))
    shard = storage.join(s3_pool, "shards/shard-000001.tar")
    data = storage.get_bytes(shard)
    storage.put_bytes(shard, data[: len(data) // 3])  # replaced on the server, index unchanged
    job = TrainJob(tmp_path, "s3-cut", s3_pool, local, workers=2, steps=12, checkpoint_every=100,
                   env=s3_server.env)
    assert job.run_to_end() == 0, job.tail()
    summary = json.loads((tmp_path / "store/runs/s3-cut/export/summary.json").read_text())
    assert summary["skipped_samples"] >= 1
    assert "shard-000001.tar" in job.tail(500_000)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 6-step run that kept its checkpoints at steps 2, 4 and 6 (left as it is: tests damage
    copies of it, from `damaged_copy`)."""
    tmp = tmp_path_factory.mktemp("ckpt-damage")
    store = (tmp / "store").as_uri()
    pool = synth_pool(store)
    job = TrainJob(tmp, "damaged", pool, store, steps=6, checkpoint_every=2,
                   sets={"train.keep_checkpoints": 3})
    assert job.run_to_end() == 0, job.tail()
    return tmp, job.losses(0)


@pytest.fixture
def damaged_copy(finished, tmp_path):
    """This test's own copy of the finished run's store: `(tmp, store URI, pool URI, losses)`."""
    src, losses = finished
    shutil.copytree(src / "store", tmp_path / "store")
    store = (tmp_path / "store").as_uri()
    return tmp_path, store, f"{store}/datasets/synth/pool", losses


def _ckpt(tmp: Path, tag: str) -> Path:
    return tmp / "store/runs/damaged/checkpoints" / tag


def _biggest(d: Path) -> Path:
    return max((p for p in d.iterdir() if p.name != MANIFEST_FILE), key=lambda p: p.stat().st_size)


def test_resume_falls_back_from_a_checkpoint_with_a_deleted_file_and_says_so(damaged_copy, caplog):
    tmp, store, pool, losses = damaged_copy
    victim = _biggest(_ckpt(tmp, "step-00000006"))
    victim.unlink()
    with caplog.at_level("WARNING"):
        chosen = resolve_resume("auto", store, "damaged")
    assert chosen.endswith("/step-00000004")
    assert victim.name in caplog.text and "resuming from step-00000004" in caplog.text
    truncated = _biggest(_ckpt(tmp, "step-00000004"))
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert resolve_resume("auto", store, "damaged").endswith("/step-00000002")
    (_ckpt(tmp, "step-00000002") / MANIFEST_FILE).unlink()
    (_ckpt(tmp, "step-00000002") / "train_state.json").unlink()
    with pytest.raises(CheckpointCorrupt, match=victim.name):
        resolve_resume("auto", store, "damaged")


def test_a_resumed_job_skips_the_damaged_checkpoint_and_lands_on_the_same_trajectory(damaged_copy):
    tmp, store, pool, want = damaged_copy
    job = TrainJob(tmp, "damaged", pool, store, steps=6, checkpoint_every=2,
                   sets={"train.keep_checkpoints": 3})
    last = _ckpt(tmp, "step-00000006")
    victim = _biggest(last)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    shutil.rmtree(tmp / "store/runs/damaged/export")
    assert job.run_to_end("--resume", "auto") == 0, job.tail()
    log = job.tail(500_000)
    assert "LATEST names step-00000006, which is not whole" in log and victim.name in log
    got = job.losses(0)
    assert sorted(got) == [4, 5]  # resumed from step 4, the newest whole checkpoint
    assert [got[s] for s in (4, 5)] == pytest.approx([want[4], want[5]], abs=1e-6)


def test_a_checkpoint_file_changed_in_place_is_refused_with_one_line(damaged_copy):
    tmp, store, pool, _ = damaged_copy
    state = _ckpt(tmp, "step-00000006") / "train_state.json"
    text = state.read_text()
    assert '"step": 6' in text
    state.write_text(text.replace('"step": 6', '"step": 9'))  # same size, other content
    job = TrainJob(tmp, "damaged", pool, store, steps=8, checkpoint_every=2)
    assert job.run_to_end("--resume", "auto") == 1, job.tail()
    errors = [line for line in job.tail().splitlines() if "pretrain: error:" in line]
    assert errors and "train_state.json" in errors[-1] and "sha256" in errors[-1], job.tail()
