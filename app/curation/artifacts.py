"""Where curation outputs live and how arrays travel through app.storage.

    <run.store>/curation/<run.name>/{embeddings,dedup,retrieval,clusters,selection,report}/

Every stage writes its arrays first and its `_SUCCESS` (a JSON summary) last, atomically, so a
stage whose `_SUCCESS` exists is complete and is skipped on a rerun.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from app import storage

STAGE_DIRS = ("embeddings", "dedup", "retrieval", "clusters", "selection", "report")
SUCCESS = "_SUCCESS"


class CurationRun:
    """The output tree of one curation run."""

    def __init__(self, store: str, name: str):
        self.root = storage.join(storage.to_uri(store), "curation", name)
        self.name = name

    def uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def done(self, stage_dir: str) -> bool:
        return storage.exists(self.uri(stage_dir, SUCCESS))

    def summary(self, stage_dir: str) -> dict[str, Any]:
        return storage.get_json(self.uri(stage_dir, SUCCESS))

    def mark_done(self, stage_dir: str, summary: dict[str, Any]) -> None:
        storage.put_json(self.uri(stage_dir, SUCCESS), summary)

    def put_arrays(self, relpath: str, **arrays: np.ndarray) -> None:
        put_npz(self.uri(relpath), **arrays)

    def get_arrays(self, relpath: str) -> dict[str, np.ndarray]:
        return get_npz(self.uri(relpath))


def put_npz(uri: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.put_bytes(uri, buf.getvalue())


def get_npz(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.get_bytes(uri)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def set_name(kind: str, i: int, dataset_uri: str) -> str:
    """Stable name of an embedded set: pool, seed0-<name>, eval1-<name>."""
    if kind == "pool":
        return "pool"
    base = storage.to_uri(dataset_uri).rstrip("/").rsplit("/", 1)[-1]
    return f"{kind}{i}-{base}"
