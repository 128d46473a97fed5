"""Training checkpoints in object storage, written so that a crash at any moment leaves the last
complete checkpoint usable.

Layout (DESIGN.md §3):

    runs/<run>/checkpoints/step-00000050/   DeepSpeed files (model states, per-rank ZeRO shards)
                                            + teacher.pt (EMA teacher + loss centers, rank 0)
                                            + rng-rank00000.pt ... (python/numpy/torch RNG per rank)
                                            + train_state.json (step, data cursor, run facts)
    runs/<run>/checkpoints/LATEST           "step-00000050", written last and atomically

Save: every rank runs `engine.save_checkpoint` into a local staging directory (node-local disk is
fine), uploads the files it owns (its ZeRO shards and RNG file; rank 0 also the shared files),
then after a barrier rank 0 writes LATEST and deletes checkpoints beyond the newest K.
Resume: every rank downloads only the files it needs (the shared ones and its own) into a
private staging directory and calls `engine.load_checkpoint` with the tag named in LATEST.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from app import storage

log = logging.getLogger(__name__)

LATEST = "LATEST"
TEACHER_FILE = "teacher.pt"
STATE_FILE = "train_state.json"
_TAG_RE = re.compile(r"^step-(\d{8})$")
_OWNER_RES = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"rng-rank(\d+)\.pt$"))


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_uri(store: str, run_name: str) -> str:
    return storage.join(storage.to_uri(store), "runs", run_name, "checkpoints")


def staging_root(run_name: str) -> Path:
    """Local scratch for DeepSpeed files before upload / after download (`DINOCTL_STAGING`)."""
    base = os.environ.get("DINOCTL_STAGING") or os.path.join(tempfile.gettempdir(), "dinoctl-staging")
    return Path(base) / run_name


def file_owner(name: str) -> int | None:
    """The rank that uploads/needs `name`: the rank in its name, or None for shared files."""
    for pattern in _OWNER_RES:
        match = pattern.search(name)
        if match:
            return int(match.group(1))
    return None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- RNG --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- save -------------------------------------------------------------------------------------


def save_checkpoint(engine, meta: torch.nn.Module, train_state: dict[str, Any], step: int,
                    store: str, run_name: str, keep: int, rank: int) -> str:
    """Write checkpoint `step` (all ranks must call). Returns its URI."""
    started = time.monotonic()
    tag = step_tag(step)
    local_root = staging_root(run_name) / "save"
    local_dir = local_root / tag
    engine.save_checkpoint(str(local_root), tag=tag, save_latest=False)
    torch.save(rng_state(), local_dir / f"rng-rank{rank:05d}.pt")
    if rank == 0:
        torch.save(meta.state_dict(), local_dir / TEACHER_FILE)
        (local_dir / STATE_FILE).write_text(json.dumps(train_state, indent=2, sort_keys=True))
    _barrier()  # on a shared local disk, every rank's files are now complete
    remote = storage.join(checkpoints_uri(store, run_name), tag)
    for path in sorted(local_dir.iterdir()):
        owner = file_owner(path.name)
        if (owner if owner is not None else 0) == rank and path.is_file():
            storage.put_file(storage.join(remote, path.name), str(path))
    _barrier()  # every rank's files are in storage
    if rank == 0:
        storage.put_bytes(storage.join(checkpoints_uri(store, run_name), LATEST), tag.encode())
        prune_checkpoints(store, run_name, keep)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(local_dir, ignore_errors=True)
    _barrier()
    log.info("checkpoint %s saved in %.1f s", remote, time.monotonic() - started)
    return remote


def list_tags(store: str, run_name: str) -> list[str]:
    root = checkpoints_uri(store, run_name)
    tags = set()
    for obj in storage.list_objects(root + "/"):
        rel = obj.uri[len(root):].lstrip("/")
        first = rel.split("/", 1)[0]
        if _TAG_RE.match(first) and "/" in rel:
            tags.add(first)
    return sorted(tags)


def prune_checkpoints(store: str, run_name: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the one LATEST names)."""
    if keep <= 0:
        return
    latest = read_latest(store, run_name)
    tags = [t for t in list_tags(store, run_name) if t != latest]
    for tag in tags[: max(len(tags) - (keep - 1), 0)]:
        prefix = storage.join(checkpoints_uri(store, run_name), tag)
        for obj in storage.list_objects(prefix + "/"):
            storage.delete(obj.uri)
        log.info("pruned checkpoint %s", prefix)


# -- resume -----------------------------------------------------------------------------------


def read_latest(store: str, run_name: str) -> str | None:
    uri = storage.join(checkpoints_uri(store, run_name), LATEST)
    if not storage.exists(uri):
        return None
    tag = storage.get_bytes(uri).decode().strip()
    if not _TAG_RE.match(tag):
        raise storage.StorageError(f"{uri}: unexpected content {tag!r}")
    return tag


def resolve_resume(resume: str, store: str, run_name: str) -> str | None:
    """The checkpoint directory URI to resume from: `auto` = LATEST of this run (None when the
    run has no checkpoint yet), `never` = None, otherwise a `.../step-XXXXXXXX` URI."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = read_latest(store, run_name)
        return storage.join(checkpoints_uri(store, run_name), tag) if tag else None
    uri = storage.to_uri(resume).rstrip("/")
    if not _TAG_RE.match(uri.rsplit("/", 1)[-1]):
        raise ValueError(f"train.resume: expected auto, never or a .../step-XXXXXXXX URI, got {resume!r}")
    if not storage.exists(storage.join(uri, STATE_FILE)):
        raise storage.NotFound(f"train.resume: {uri} is not a complete checkpoint (no {STATE_FILE})")
    return uri


def load_checkpoint(engine, meta: torch.nn.Module, remote: str, run_name: str, rank: int,
                    world_size: int, zero_stage: int) -> dict[str, Any]:
    """Restore the student, optimizer, teacher, centers and RNG from the checkpoint directory
    `remote` (a `.../step-XXXXXXXX` URI); return the train state."""
    tag = remote.rstrip("/").rsplit("/", 1)[-1]
    state = storage.get_json(storage.join(remote, STATE_FILE))
    if state.get("world_size") != world_size or state.get("zero_stage") != zero_stage:
        raise ValueError(
            f"checkpoint {remote} was written with world_size={state.get('world_size')}, "
            f"zero_stage={state.get('zero_stage')}; this run has world_size={world_size}, "
            f"zero_stage={zero_stage} (resuming on another layout is not supported)")
    local_root = staging_root(run_name) / f"resume-rank{rank:05d}"
    local_dir = local_root / tag
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True)
    for obj in storage.list_objects(remote + "/"):
        name = obj.uri.rsplit("/", 1)[-1]
        if file_owner(name) in (None, rank):
            storage.get_file(obj.uri, str(local_dir / name))
    load_path, _ = engine.load_checkpoint(str(local_root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise storage.StorageError(f"{remote}: DeepSpeed could not load the checkpoint")
    meta.load_state_dict(torch.load(local_dir / TEACHER_FILE, map_location="cpu"))
    rng_file = local_dir / f"rng-rank{rank:05d}.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    shutil.rmtree(local_dir, ignore_errors=True)
    log.info("resumed from %s (step %d)", remote, state["step"])
    return state
