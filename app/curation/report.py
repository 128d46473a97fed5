"""Stage `report`: per-stage counts, histograms and image grids of a curation run.

Writes `report/summary.json`, titled PNGs (duplicate-component sizes, leaf cluster sizes before
and after balancing, duplicate groups with what was kept and removed and their cosines, sample
clusters with ids and sizes) and `report/report.html`, one page with the counts per stage and
every figure, and logs them to MLflow (the page is an artifact the UI shows).
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figures(run: CurationRun) -> dict[str, Any]:
    """name -> matplotlib figure, each with a title and labelled axes."""
    plt = _pyplot()
    figs = {}
    if run.done("dedup"):
        d = run.summary("dedup")
        hist = {int(k): v for k, v in d["self"].get("component_size_histogram", {}).items()}
        fig, ax = plt.subplots(figsize=(6, 3.2))
        sizes = sorted(hist)
        bars = ax.bar([str(s) for s in sizes], [hist[s] for s in sizes], color="#4c72b0")
        ax.bar_label(bars, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)  # a bar of 1 stays visible
        ax.set_xlabel("images in the component (1: no near-duplicate)")
        ax.set_ylabel("components (log scale)")
        ax.set_title(f"Near-duplicate components: {d['n_pool']} images, "
                     f"{d['self'].get('n_removed', 0)} removed as near-duplicates", fontsize=10)
        figs["dedup_component_sizes.png"] = fig
    if run.done("clusters"):
        c = run.summary("clusters")
        fig, ax = plt.subplots(figsize=(6, 3.2))
        before, after = c["leaf_sizes_before"], c["leaf_sizes_after"]
        ax.plot(range(1, len(before) + 1), sorted(before, reverse=True), marker=".",
                label=f"before balancing ({sum(before)} images)")
        ax.plot(range(1, len(after) + 1), sorted(after, reverse=True), marker=".",
                label=f"after ({sum(after)} selected)")
        ax.set_xlabel(f"leaf cluster, largest first ({len(before)} clusters)")
        ax.set_ylabel("images in the cluster")
        ax.set_title("Leaf cluster sizes before and after hierarchical balancing", fontsize=10)
        ax.legend(fontsize=8)
        figs["cluster_sizes.png"] = fig
    return figs


@dataclass
class Tile:
    image: bytes
    caption: str
    colour: str = ""  # frame colour: green kept, red removed, none neutral


def _thumb(data: bytes):
    from app.data import CorruptImage, decode_image

    try:
        return decode_image(data).resize((THUMB, THUMB))
    except CorruptImage:
        return None


def _grid(title: str, rows: list[tuple[str, list[Tile]]]) -> bytes:
    """A titled grid: one labelled row per group, one captioned, framed tile per image, only as
    wide as the widest row -> PNG bytes."""
    plt = _pyplot()
    ncols = max(len(tiles) for _, tiles in rows)
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False,
                             figsize=(1.3 * ncols + 1.6, 1.5 * len(rows) + 0.7))
    for r, (label, tiles) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(tiles):
                ax.axis("off")
                continue
            tile = tiles[c]
            img = _thumb(tile.image)
            if img is not None:
                ax.imshow(img)
            ax.set_xlabel(tile.caption, fontsize=7, color=tile.colour or "black")
            for spine in ax.spines.values():
                spine.set_edgecolor(tile.colour or "0.75")
                spine.set_linewidth(2.5 if tile.colour else 0.5)
        axes[r][0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


KEPT, REMOVED = "#2ca02c", "#d62728"


@dataclass
class PoolView:
    """The pool as the report sees it: keys, the dedup descriptor, and image bytes by row."""
    keys: np.ndarray
    descriptor: np.ndarray
    dataset: Any
    where: dict[str, int]

    def image(self, row: int) -> bytes:
        return self.dataset.get(self.where[str(self.keys[row])]).image_bytes

    def cosine(self, a: int, b: int) -> float:
        return float(self.descriptor[a] @ self.descriptor[b])


def pool_view(run: CurationRun, cfg: Any) -> PoolView:
    from app.curation.embed import load_set
    from app.data import Dataset

    pool = load_set(run, "pool", cfg.curation.pool)
    field = run.summary("dedup").get("descriptor", "embeddings") if run.done("dedup") else "embeddings"
    ds = Dataset(cfg.curation.pool)
    return PoolView(pool["keys"], pool.get(field, pool["embeddings"]), ds,
                    {k: i for i, k in enumerate(ds.keys)})


def duplicate_rows(run: CurationRun, pool: PoolView) -> list[tuple[str, list[Tile]]]:
    """The largest near-duplicate groups: the image kept first, then the removed ones with their
    cosine to it."""
    d = run.get_arrays("dedup/dedup.npz")
    comp, keep = d["components"], d["self_keep"]
    ids, counts = np.unique(comp, return_counts=True)
    rows = []
    for g, n in sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: (-t[1], t[0]))[:GRID_ROWS]:
        if n < 2:
            break
        members = np.flatnonzero(comp == g)
        kept = [int(m) for m in members if keep[m]] or [int(members[0])]
        ref = kept[0]
        tiles = [Tile(pool.image(ref), "kept", KEPT)]
        tiles += [Tile(pool.image(int(m)), f"removed, cos {pool.cosine(ref, int(m)):.3f}", REMOVED)
                  for m in members if int(m) != ref][: GRID_COLS - 1]
        rows.append((f"group {g}\n{n} images", tiles))
    return rows


def cluster_rows(run: CurationRun, pool: PoolView, seed: int) -> list[tuple[str, list[Tile]]]:
    """A few leaf clusters: id, size before and after balancing, and a sample of their images
    (framed green when balancing selected them)."""
    from app.curation.stages import leaf_cluster_of_pool

    leaf = leaf_cluster_of_pool(run, len(pool.keys))
    c = run.summary("clusters")
    selected = set()
    if storage.exists(run.uri("clusters", "selection.npz")):
        selected = set(run.get_arrays("clusters/selection.npz")["pool_rows"].tolist())
    valid = np.unique(leaf[leaf >= 0])
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(valid, min(GRID_ROWS, len(valid)), replace=False).tolist()) if len(valid) else []
    rows = []
    for cid in chosen:
        members = np.flatnonzero(leaf == cid)[:GRID_COLS]
        after = c["leaf_sizes_after"][cid] if cid < len(c["leaf_sizes_after"]) else 0
        tiles = [Tile(pool.image(int(m)), "selected" if int(m) in selected else "not selected",
                      KEPT if int(m) in selected else "") for m in members]
        rows.append((f"cluster {cid}\n{c['leaf_sizes_before'][cid]} images\n{after} selected", tiles))
    return rows


def image_grids(run: CurationRun, cfg: Any) -> dict[str, bytes]:
    """Largest duplicate groups and a few leaf clusters, as titled PNG grids."""
    out: dict[str, bytes] = {}
    if not (run.done("dedup") or run.done("clusters")):
        return out
    pool = pool_view(run, cfg)
    if run.done("dedup") and (rows := duplicate_rows(run, pool)):
        out["dedup_groups.png"] = _grid(
            "Largest near-duplicate groups: the image kept (green), the ones removed (red) and "
            "their cosine to it", rows)
    if run.done("clusters") and (rows := cluster_rows(run, pool, cfg.run.seed)):
        out["cluster_samples.png"] = _grid(
            "Sample leaf clusters: id, size before and after balancing; green: selected", rows)
    return out


def html_page(run_name: str, table: list[dict[str, Any]], pngs: dict[str, bytes]) -> str:
    """The whole report as one self-contained HTML page (images inline): MLflow shows it."""
    from html import escape

    captions = {
        "dedup_component_sizes.png": "How many images share a near-duplicate component.",
        "cluster_sizes.png": "Balancing flattens the long tail of cluster sizes.",
        "dedup_groups.png": "Examples of what dedup kept and removed.",
        "cluster_samples.png": "Examples of what balancing kept in a few clusters.",
    }
    rows = "".join(f"<tr><td>{escape(r['stage'])}</td><td class=n>{r['images']}</td>"
                   f"<td>{escape(str(r['note']))}</td></tr>" for r in table)
    figs = "".join(
        f"<figure><img alt='{escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(data).decode()}'><figcaption>{escape(captions.get(name, name))}"
        f"</figcaption></figure>" for name, data in sorted(pngs.items()))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>Curation report: "
            f"{escape(run_name)}</title><style>body{{font-family:sans-serif;margin:1.5em;"
            f"max-width:1100px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;"
            f"padding:3px 8px;text-align:left}}td.n{{text-align:right}}img{{max-width:100%}}"
            f"figure{{margin:1.5em 0}}</style></head><body><h1>Curation report: "
            f"{escape(run_name)}</h1><h2>Images after each stage</h2><table><tr><th>stage</th>"
            f"<th>images</th><th>note</th></tr>{rows}</table><h2>Figures</h2>{figs}</body></html>")


def run_report(run: CurationRun, cfg: Any, tracker: Any = None) -> dict[str, Any]:
    plt = _pyplot()
    table = counts_table(run)
    pngs = {name: _png(fig) for name, fig in figures(run).items()}
    for fig in plt.get_fignums():
        plt.close(fig)
    pngs.update(image_grids(run, cfg))
    for name, data in pngs.items():
        storage.put_bytes(run.uri("report", name), data)
    page = html_page(run.name, table, pngs)
    storage.put_bytes(run.uri("report", "report.html"), page.encode())
    summary = {"stage": "report", "run": run.root, "counts": table, "figures": sorted(pngs),
               "html": run.uri("report", "report.html")}
    storage.put_bytes(run.uri("report", "table.txt"), (format_table(table) + "\n").encode())
    if tracker is not None:
        tracker.log_summary({"counts": {r["stage"].replace(":", "/"): r["images"] for r in table}},
                            "curation/summary.json")
        tracker.log_text(format_table(table), "curation/table.txt")
        tracker.log_text(page, "curation/report.html")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in pngs.items():
                (Path(tmp) / name).write_bytes(data)
                tracker.log_image(str(Path(tmp) / name), f"curation/{name}")
    run.mark_done("report", summary)
    return summary
