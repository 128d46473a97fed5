"""Training checkpoints in object storage, written so that a crash at any moment leaves the last
complete checkpoint usable.

Layout (DESIGN.md §3):

    runs/<run>/checkpoints/step-00000050/   DeepSpeed files (model states, per-rank ZeRO shards)
                                            + teacher.pt (EMA teacher + loss centers, rank 0)
                                            + rng-rank00000.pt ... (python/numpy/torch RNG per rank)
                                            + train_state.json (step, data cursor, run facts)
                                            + manifest.json (every file: size, sha256; last)
    runs/<run>/checkpoints/LATEST           "step-00000050", written last and atomically

Save: every rank runs `engine.save_checkpoint` into a local staging directory (node-local disk is
fine), uploads the files it owns (its ZeRO shards and RNG file; rank 0 also the shared files) and
hashes them; rank 0 gathers the hashes into manifest.json, then writes LATEST and deletes
checkpoints beyond the newest K.
Resume: the checkpoint is checked against its manifest first: a file missing or of the wrong
size (deleted, truncated) makes resume fall back to the newest older checkpoint that is whole,
and say so; none whole is one line naming the file. Every rank then downloads only the files it
needs (the shared ones and its own), checks their sha256 (a mismatch refuses, naming the file),
and calls `engine.load_checkpoint`. Files that need pickle (RNG state, DeepSpeed's) are loaded
only after that check; teacher.pt with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
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
MANIFEST_FILE = "manifest.json"


class CheckpointCorrupt(storage.StorageError):
    """A checkpoint file is missing, truncated or not what was written; names the file."""
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


def _gather(obj: Any) -> list[Any]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _all_ok(ok: bool) -> bool:
    """True when `ok` holds on every rank (so all ranks take the same branch)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return ok


def file_digest(path: str | Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


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
    mine: dict[str, Any] = {}
    for path in sorted(local_dir.iterdir()):
        owner = file_owner(path.name)
        if (owner if owner is not None else 0) == rank and path.is_file():
            mine[path.name] = file_digest(path)
            storage.put_file(storage.join(remote, path.name), str(path))
    files = {name: info for part in _gather(mine) for name, info in part.items()}  # all uploaded
    if rank == 0:
        storage.put_json(storage.join(remote, MANIFEST_FILE),
                         {"tag": tag, "step": step, "world_size": train_state.get("world_size"),
                          "files": files})
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
        storage.delete_prefix(prefix)
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


def check_complete(remote: str) -> None:
    """Raise `CheckpointCorrupt` naming the first file of the checkpoint directory `remote` that
    is missing or whose size differs from its manifest (a checkpoint without a manifest, from an
    older dinoctl, only needs its train_state.json)."""
    present = {obj.uri.rsplit("/", 1)[-1]: obj.size for obj in storage.list_objects(remote + "/")}
    if MANIFEST_FILE not in present:
        if STATE_FILE not in present:
            raise CheckpointCorrupt(f"{remote}: no {MANIFEST_FILE} and no {STATE_FILE}: the "
                                    "checkpoint was never completed")
        log.warning("%s has no %s (written by an older dinoctl): its files are not checked",
                    remote, MANIFEST_FILE)
        return
    manifest = storage.get_json(storage.join(remote, MANIFEST_FILE))
    for name, info in sorted(manifest.get("files", {}).items()):
        if name not in present:
            raise CheckpointCorrupt(f"{storage.join(remote, name)}: missing (the manifest lists it)")
        if present[name] != info["size"]:
            raise CheckpointCorrupt(f"{storage.join(remote, name)}: {present[name]} bytes, the "
                                    f"manifest says {info['size']} (truncated or replaced)")


def resolve_resume(resume: str, store: str, run_name: str) -> str | None:
    """The checkpoint directory URI to resume from: `auto` = LATEST of this run if it is whole,
    else the newest older whole checkpoint (said in a warning; None when the run has no
    checkpoint yet), `never` = None, otherwise a `.../step-XXXXXXXX` URI (checked, no fallback)."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = read_latest(store, run_name)
        if not tag:
            return None
        root = checkpoints_uri(store, run_name)
        try:
            check_complete(storage.join(root, tag))
            return storage.join(root, tag)
        except CheckpointCorrupt as exc:
            problem = exc
        for older in reversed([t for t in list_tags(store, run_name) if t < tag]):
            try:
                check_complete(storage.join(root, older))
            except CheckpointCorrupt:
                continue
            log.warning("LATEST names %s, which is not whole (%s): resuming from %s instead",
                        tag, problem, older)
            return storage.join(checkpoints_uri(store, run_name), older)
        raise CheckpointCorrupt(f"cannot resume: LATEST names {tag}, which is not whole "
                                f"({problem}), and no older checkpoint is whole")
    uri = storage.to_uri(resume).rstrip("/")
    if not _TAG_RE.match(uri.rsplit("/", 1)[-1]):
        raise ValueError(f"train.resume: expected auto, never or a .../step-XXXXXXXX URI, got {resume!r}")
    if not storage.exists(storage.join(uri, STATE_FILE)):
        raise storage.NotFound(f"train.resume: {uri} is not a complete checkpoint (no {STATE_FILE})")
    check_complete(uri)
    return uri


def load_checkpoint(engine, meta: torch.nn.Module, remote: str, run_name: str, rank: int,
                    world_size: int, zero_stage: int, param_groups: list | None = None) -> dict[str, Any]:
    """Restore the student, optimizer, teacher, centers and RNG from the checkpoint directory
    `remote` (a `.../step-XXXXXXXX` URI); return the train state. `param_groups`: this run's
    `group_layout`, refused when the checkpoint's differs (its optimizer state would not fit)."""
    tag = remote.rstrip("/").rsplit("/", 1)[-1]
    state = storage.get_json(storage.join(remote, STATE_FILE))
    if state.get("world_size") != world_size or state.get("zero_stage") != zero_stage:
        raise ValueError(
            f"checkpoint {remote} was written with world_size={state.get('world_size')}, "
            f"zero_stage={state.get('zero_stage')}; this run has world_size={world_size}, "
            f"zero_stage={zero_stage} (resuming on another layout is not supported)")
    saved = state.get("param_groups")
    if param_groups is not None and saved is not None and saved != param_groups:
        raise ValueError(
            f"checkpoint {remote} was written with another optimizer parameter-group layout "
            f"({len(saved)} groups, this run has {len(param_groups)}): a setting that moves "
            "parameters between groups changed (optim.decay_learned_tokens, layerwise_decay, "
            "patch_embed_lr_mult, the model); resume with the settings it was written with or "
            "start a new run")
    local_root = staging_root(run_name) / f"resume-rank{rank:05d}"
    local_dir = local_root / tag
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True)
    manifest_uri = storage.join(remote, MANIFEST_FILE)
    files = storage.get_json(manifest_uri)["files"] if storage.exists(manifest_uri) else None
    problem = ""
    for obj in storage.list_objects(remote + "/"):
        name = obj.uri.rsplit("/", 1)[-1]
        if name == MANIFEST_FILE or file_owner(name) not in (None, rank):
            continue
        storage.get_file(obj.uri, str(local_dir / name))
        if files is not None and not problem:
            want = files.get(name)
            if want is None:
                problem = f"{obj.uri}: not in the checkpoint's manifest"
            elif file_digest(local_dir / name) != want:
                problem = f"{obj.uri}: sha256 differs from the manifest (the file was changed)"
    if not _all_ok(not problem):  # every rank refuses together, none loads a partial state
        shutil.rmtree(local_dir, ignore_errors=True)
        raise CheckpointCorrupt(f"refusing to resume: {problem}" if problem else
                                f"refusing to resume from {remote}: another rank found a damaged file")
    load_path, _ = engine.load_checkpoint(str(local_root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise storage.StorageError(f"{remote}: DeepSpeed could not load the checkpoint")
    meta.load_state_dict(torch.load(local_dir / TEACHER_FILE, map_location="cpu", weights_only=True))
    rng_file = local_dir / f"rng-rank{rank:05d}.pt"
    # Pickle (numpy/python RNG state), but only from our own layout, after the manifest check.
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    shutil.rmtree(local_dir, ignore_errors=True)
    log.info("resumed from %s (step %d)", remote, state["step"])
    return state
