"""Stage `materialize`: the curated dataset, with provenance for every sample.

Selection = each seed set as is + the pool images retrieved for it + the cluster-balanced pool
sample. A pool image chosen by several stages appears once (all stages are recorded); with
`cluster.multiplier > 1` a repeated image is written again under `<key>-rep<j>`. Each sample's
JSON holds source_dataset, source_key, stages, dedup component and leaf cluster ids.
The selection table is `selection/selection.parquet`; the dataset is
`<run.store>/datasets/<curation.name>`.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app import storage
from app.curation.artifacts import CurationRun, set_name
from app.curation.embed import load_set
from app.curation.stages import leaf_cluster_of_pool

log = logging.getLogger(__name__)

SELECTION_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_dataset", pa.string()), ("source_key", pa.string()),
    ("stages", pa.string()), ("component", pa.int64()), ("cluster", pa.int64()),
])


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def build_selection(run: CurationRun, cfg: Any) -> list[dict[str, Any]]:
    """Rows of the selection table, in a deterministic order (seed sets, then pool rows)."""
    c = cfg.curation
    rows: list[dict[str, Any]] = []
    for i, uri in enumerate(c.seeds):
        name = set_name("seed", i, uri)
        for key in load_set(run, name, uri)["keys"].tolist():
            rows.append({"key": f"{_safe(name)}-{key}", "source_dataset": storage.to_uri(uri),
                         "source_key": key, "stages": f"seed:{name}", "component": -1, "cluster": -1})
    pool = load_set(run, "pool", c.pool)
    n_pool = len(pool["keys"])
    stages: dict[int, list[str]] = {}
    repeats: Counter = Counter()
    for i, uri in enumerate(c.seeds):
        name = set_name("seed", i, uri)
        if run.done("retrieval") and storage.exists(run.uri("retrieval", f"{name}.npz")):
            for r in run.get_arrays(f"retrieval/{name}.npz")["pool_rows"].tolist():
                stages.setdefault(r, []).append(f"retrieve:{name}")
    if run.done("clusters"):
        for r, count in Counter(run.get_arrays("clusters/selection.npz")["pool_rows"].tolist()).items():
            stages.setdefault(r, []).append("cluster")
            repeats[r] = count
    components = (run.get_arrays("dedup/dedup.npz")["components"] if run.done("dedup")
                  else np.arange(n_pool))
    clusters = leaf_cluster_of_pool(run, n_pool)
    pool_uri = storage.to_uri(c.pool)
    for r in sorted(stages):
        key = str(pool["keys"][r])
        for j in range(max(1, repeats[r])):
            rows.append({"key": f"pool-{key}" + (f"-rep{j}" if j else ""), "source_dataset": pool_uri,
                         "source_key": key, "stages": ",".join(stages[r]),
                         "component": int(components[r]), "cluster": int(clusters[r])})
    return rows


def run_materialize(run: CurationRun, cfg: Any) -> dict[str, Any]:
    from app.data import Dataset, ShardWriter

    t0 = time.time()
    rows = build_selection(run, cfg)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SELECTION_SCHEMA), buf)
    storage.put_bytes(run.uri("selection", "selection.parquet"), buf.getvalue())
    out_uri = storage.join(storage.to_uri(cfg.run.store), "datasets", cfg.curation.name)
    sources: dict[str, tuple[Any, dict[str, int]]] = {}
    counts = Counter(s.split(":")[0] for row in rows for s in row["stages"].split(","))
    with ShardWriter(out_uri, created_by=f"dinoctl curate materialize ({run.name})",
                     name=cfg.curation.name,
                     extra_stats={"curation_run": run.root, "selected_by_stage": dict(counts)}) as w:
        for row in rows:
            if row["source_dataset"] not in sources:
                ds = Dataset(row["source_dataset"])
                sources[row["source_dataset"]] = (ds, {k: i for i, k in enumerate(ds.keys)})
            ds, where = sources[row["source_dataset"]]
            sample = ds.get(where[row["source_key"]])
            meta = {k: v for k, v in sample.meta.items() if k in ("label", "label_name", "width", "height")}
            meta.update({"source": f"{row['source_dataset']}#{row['source_key']}", **row})
            meta.pop("key")
            w.write(row["key"], sample.image_bytes, meta)
    summary = {"stage": "materialize", "dataset": out_uri, "n_samples": len(rows),
               "selected_by_stage": dict(counts), "seconds": round(time.time() - t0, 2)}
    run.mark_done("selection", summary)
    log.info("materialize: %d samples -> %s", len(rows), out_uri)
    return summary
