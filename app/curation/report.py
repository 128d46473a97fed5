"""Stage `report`: per-stage counts, histograms and image grids of a curation run.

Writes `report/summary.json` plus PNGs (duplicate-component sizes, leaf cluster sizes before and
after balancing, grids of sample clusters and duplicate groups) and logs them to MLflow.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from app import storage
from app.curation.artifacts import CurationRun

log = logging.getLogger(__name__)

GRID_ROWS = 6
GRID_COLS = 8
THUMB = 64


def counts_table(run: CurationRun) -> list[dict[str, Any]]:
    """[{stage, images, note}] in pipeline order, from the stage summaries that exist."""
    rows = []
    if run.done("embeddings"):
        for name, s in run.summary("embeddings")["sets"].items():
            rows.append({"stage": f"embed:{name}", "images": s["images"], "note": f"{s['corrupt']} corrupt skipped"})
    if run.done("dedup"):
        d = run.summary("dedup")
        rows.append({"stage": "dedup:self", "images": d["self"].get("n_kept", 0),
                     "note": f"{d['self'].get('n_removed', 0)} near-duplicates removed"})
        rows.append({"stage": "dedup:relative", "images": d["n_kept"],
                     "note": f"{d['relative'].get('n_dropped', 0)} in eval-duplicate components"})
    if run.done("retrieval"):
        for name, s in run.summary("retrieval")["sets"].items():
            rows.append({"stage": f"retrieve:{name}", "images": s["n_retrieved"],
                         "note": f"{s['mode']}-based, nominal {s['n_nominal']}"})
    if run.done("clusters"):
        c = run.summary("clusters")
        rows.append({"stage": "cluster", "images": c["n_selected"], "note": f"levels {c['n_clusters']}"})
    if run.done("selection"):
        s = run.summary("selection")
        rows.append({"stage": "materialize", "images": s["n_samples"], "note": s["dataset"]})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    w = max([len(r["stage"]) for r in rows] + [5])
    lines = [f"{'stage':<{w}}  {'images':>9}  note"]
    lines += [f"{r['stage']:<{w}}  {r['images']:>9}  {r['note']}" for r in rows]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def figures(run: CurationRun) -> dict[str, Any]:
    """name -> matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    if run.done("dedup"):
        hist = run.summary("dedup")["self"].get("component_size_histogram", {})
        fig, ax = plt.subplots(figsize=(5, 3))
        sizes = sorted(int(k) for k in hist)
        ax.bar([str(s) for s in sizes], [hist[str(s)] if str(s) in hist else hist[s] for s in sizes])
        ax.set_yscale("log")
        ax.set_xlabel("duplicate component size")
        ax.set_ylabel("components")
        figs["dedup_component_sizes.png"] = fig
    if run.done("clusters"):
        c = run.summary("clusters")
        fig, ax = plt.subplots(figsize=(5, 3))
        for key, label in (("leaf_sizes_before", "before balancing"), ("leaf_sizes_after", "after")):
            ax.plot(sorted(c[key], reverse=True), label=label)
        ax.set_xlabel("leaf cluster (sorted by size)")
        ax.set_ylabel("images")
        ax.legend()
        figs["cluster_sizes.png"] = fig
    return figs


def _grid(groups: list[list[bytes]]) -> bytes:
    """One row per group of encoded images -> PNG bytes."""
    from PIL import Image

    from app.data import CorruptImage, decode_image

    canvas = Image.new("RGB", (GRID_COLS * THUMB, max(1, len(groups)) * THUMB), (255, 255, 255))
    for r, group in enumerate(groups):
        for c, data in enumerate(group[:GRID_COLS]):
            try:
                img = decode_image(data).resize((THUMB, THUMB))
            except CorruptImage:
                continue
            canvas.paste(img, (c * THUMB, r * THUMB))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def image_grids(run: CurationRun, cfg: Any) -> dict[str, bytes]:
    """Largest duplicate groups and a few leaf clusters, as PNG grids."""
    from app.curation.embed import load_set
    from app.data import Dataset

    out: dict[str, bytes] = {}
    if not (run.done("dedup") or run.done("clusters")):
        return out
    keys = load_set(run, "pool", cfg.curation.pool)["keys"]
    ds = Dataset(cfg.curation.pool)
    where = {k: i for i, k in enumerate(ds.keys)}

    def images(rows: np.ndarray) -> list[bytes]:
        return [ds.get(where[str(keys[r])]).image_bytes for r in rows[:GRID_COLS]]

    if run.done("dedup"):
        comp = run.get_arrays("dedup/dedup.npz")["components"]
        ids, counts = np.unique(comp, return_counts=True)
        big = ids[np.argsort(-counts, kind="stable")][:GRID_ROWS]
        groups = [images(np.flatnonzero(comp == g)) for g in big if (comp == g).sum() > 1]
        if groups:
            out["dedup_groups.png"] = _grid(groups)
    if run.done("clusters"):
        from app.curation.stages import leaf_cluster_of_pool

        leaf = leaf_cluster_of_pool(run, len(keys))
        rng = np.random.default_rng(cfg.run.seed)
        valid = np.unique(leaf[leaf >= 0])
        chosen = rng.choice(valid, min(GRID_ROWS, len(valid)), replace=False) if len(valid) else []
        groups = [images(np.flatnonzero(leaf == c)) for c in sorted(chosen)]
        if groups:
            out["cluster_samples.png"] = _grid(groups)
    return out


def run_report(run: CurationRun, cfg: Any, tracker: Any = None) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    table = counts_table(run)
    pngs = {name: _png(fig) for name, fig in figures(run).items()}
    for fig in plt.get_fignums():
        plt.close(fig)
    pngs.update(image_grids(run, cfg))
    for name, data in pngs.items():
        storage.put_bytes(run.uri("report", name), data)
    summary = {"stage": "report", "run": run.root, "counts": table, "figures": sorted(pngs)}
    storage.put_bytes(run.uri("report", "table.txt"), (format_table(table) + "\n").encode())
    if tracker is not None:
        tracker.log_summary({"counts": {r["stage"].replace(":", "/"): r["images"] for r in table}},
                            "curation/summary.json")
        tracker.log_text(format_table(table), "curation/table.txt")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in pngs.items():
                (Path(tmp) / name).write_bytes(data)
                tracker.log_image(str(Path(tmp) / name), f"curation/{name}")
    run.mark_done("report", summary)
    return summary
