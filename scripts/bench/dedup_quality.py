#!/usr/bin/env python
"""Does dedup find the duplicates we injected? Self and relative dedup quality on the synthetic set.

    python scripts/bench/dedup_quality.py [--store file:///tmp/dinoctl-dedup-bench]
        [--weights <backbone.pth | run URI>] [--threshold 0.6] [--eval-threshold 0.45] [--k 64]
        [--features cls] [--image-size 0] [--nproc 1] [--set k=v ...]

1. writes the synthetic set under <store>/datasets/synth unless it is there (`--synth` reuses
   another one); its ground_truth.json names the injected near-duplicates and eval copies;
2. without --weights, pretrains with configs/demo.yaml on the pool (torchrun subprocess) and
   uses that run;
3. embeds pool, eval_train and eval_val the way the curation embed stage does, for each
   embedder: the trained backbone with the copy-detection head fitted on the pool (the default
   dedup descriptor, app/curation/copy_head.py), the trained backbone's own embedding, a
   randomly initialised backbone with a copy head, and the weight-free 16x16 thumbnail;
4. runs self_dedup (k-NN graph, cosine > threshold, union-find, keep one per component) and
   relative_dedup against eval_train + eval_val, at the defaults and over a threshold sweep.

Metrics (prints one JSON object):
  recall_pct          injected duplicate pairs (dup, original) whose members end in one component,
                      so all but one of them is removed (byte-identical copies included);
  false_removal_pct   images whose content is lost: ground-truth groups (an original with its
                      duplicates, or a unique image) with no member kept, as % of the valid pool;
  eval_copy_recall_pct  pool copies of eval images dropped by relative dedup;
  eval_false_drop_pct pool images that are not eval copies but dropped by relative dedup, % of pool
                      (eval_direct_false_matches: those matched by an eval image themselves,
                      the others were dropped with their self-dedup component);
  similarity          where a threshold would have to sit for the embedder: duplicate-pair cosines,
                      non-duplicate cosines, each image's nearest non-duplicate, and whether a
                      duplicate's nearest neighbour is its own original (threshold-free).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, REPO)

SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def ensure_synth(synth: str, seed: int, n_pool: int) -> None:
    from app import storage
    from app.data.synth import GROUND_TRUTH, synthesize

    if not storage.exists(storage.join(synth, GROUND_TRUTH)):
        synthesize(synth, seed=seed, n_pool=n_pool)


def pretrain_demo(store: str, synth: str, name: str, nproc: int, sets: list[str]) -> str:
    """Run configs/demo.yaml on the pool; returns the run URI (skips a run that has an export)."""
    from app import storage

    run = storage.join(store, "runs", name)
    if storage.exists(storage.join(run, "export", "backbone.pth")):
        return run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "app.entry", "pretrain", "--config", "configs/demo.yaml",
           "--set", f"run.store={store}", "--set", f"run.name={name}",
           "--set", f"train.dataset={storage.join(synth, 'pool')}"]
    for s in sets:
        cmd += ["--set", s]
    # Training logs go to stderr: stdout carries only the JSON report.
    rc = subprocess.call(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=sys.stderr)
    if rc != 0:
        raise SystemExit(f"pretraining failed with exit code {rc}")
    return run


def run_config(weights: str) -> dict:
    """The training config.yaml of a run (or beside an export/backbone.pth), {} if none."""
    import yaml

    from app import storage

    base = storage.to_uri(weights).rstrip("/")
    for cand in (storage.join(base, "export", "config.yaml"), base.rsplit("/", 1)[0] + "/config.yaml"):
        if storage.exists(cand):
            return yaml.safe_load(storage.get_bytes(cand).decode()) or {}
    return {}


def embed_sets(cfg, sets: dict[str, str]) -> tuple[dict, float, dict]:
    """{set name: (keys [N], dedup vectors [N, D])} as the curation embed stage makes them: the
    copy-head descriptors when the config uses a copy head (fitted here on the pool, as the
    stage does), else the embeddings. Also images/s and the copy head's training stats."""
    from app.curation.embed import build_embedder, embed_shard, fit_copy_head, uses_copy_head
    from app.data import Dataset

    t0 = time.monotonic()
    head, head_stats = None, {}
    if uses_copy_head(cfg):
        head = fit_copy_head(cfg, sets["pool"])
        head_stats = head.stats
    embedder = build_embedder(cfg, head)
    field = "copy" if head is not None else "embeddings"
    out, n = {}, 0
    for name, uri in sets.items():
        keys, embs = [], []
        for shard in Dataset(uri).shard_uris:
            arrays, _ = embed_shard(shard, embedder, cfg.curation.embed.batch_size)
            keys.append(arrays["keys"])
            embs.append(arrays[field].astype(np.float32))
        out[name] = (np.concatenate(keys), np.concatenate(embs))
        n += len(out[name][0])
    return out, n / max(time.monotonic() - t0, 1e-9), head_stats


def truth_groups(keys: np.ndarray, truth: dict) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Ground-truth group id per pool row [N] and the injected (dup, original) row pairs."""
    from app.curation.union_find import connected_components

    row = {k: i for i, k in enumerate(keys.tolist())}
    pairs = [(row[d], row[o]) for d, o in truth["pool_duplicates"].items() if d in row and o in row]
    ei = np.array([p[0] for p in pairs], np.int64)
    ej = np.array([p[1] for p in pairs], np.int64)
    return connected_components(len(keys), ei, ej), pairs


def self_metrics(components, keep, groups, pairs) -> dict:
    comp = np.asarray(components)
    found = sum(comp[a] == comp[b] for a, b in pairs)
    kept_groups = np.unique(groups[keep])
    lost = np.setdiff1d(np.unique(groups), kept_groups).size  # content with no kept copy
    n = len(groups)
    return {"injected": len(pairs), "found": int(found),
            "recall_pct": round(100.0 * float(found) / max(len(pairs), 1), 2),
            "removed": int(n - keep.sum()), "ideal_removed": int(n - np.unique(groups).size),
            "false_removals": int(lost), "false_removal_pct": round(100.0 * lost / max(n, 1), 2),
            "largest_component": int(np.bincount(np.unique(comp, return_inverse=True)[1]).max())}


def relative_metrics(rel, keys, truth) -> dict:
    """rel: a RelativeDedupResult. Direct matches are pool images within the threshold of an
    eval image; the rest of the drops come from their self-dedup components."""
    copies = np.isin(keys, list(truth["eval_copies"]))
    hit = int((rel.drop & copies).sum())
    false = int((rel.drop & ~copies).sum())
    direct = np.zeros(len(keys), bool)
    direct[rel.matched_pool] = True
    return {"eval_copies": int(copies.sum()), "eval_copies_dropped": hit,
            "eval_copy_recall_pct": round(100.0 * hit / max(int(copies.sum()), 1), 2),
            "eval_false_drops": false, "eval_false_drop_pct": round(100.0 * false / len(keys), 2),
            "eval_direct_false_matches": int((direct & ~copies).sum())}


def evaluate(emb: dict, truth: dict, k: int, threshold: float, eval_threshold: float,
             sweep: tuple[float, ...]) -> dict:
    from app.curation.dedup import relative_dedup, self_dedup

    keys, pool = emb["pool"]
    evals = np.concatenate([emb[s][1] for s in emb if s != "pool"])
    groups, pairs = truth_groups(keys, truth)
    sim = pool @ pool.T
    np.fill_diagonal(sim, np.nan)
    dup_sims = np.array([sim[a, b] for a, b in pairs])
    nondup = groups[:, None] != groups[None, :]
    # Threshold-free: is a duplicate's nearest pool neighbour a member of its own group?
    nearest = np.argmax(np.where(np.isnan(sim), -np.inf, sim), axis=1)
    top1 = np.mean([groups[nearest[a]] == groups[a] for a, _ in pairs]) if pairs else 1.0
    # Semantic vs copy embedder: is an image's nearest *non-duplicate* of its own class?
    cls = np.array([truth["pool_classes"].get(k, "") for k in keys.tolist()])
    nearest_nd = np.argmax(np.where(nondup, np.nan_to_num(sim, nan=-np.inf), -np.inf), axis=1)
    out = {"similarity": {  # where the threshold has to sit for this embedder
        "dup_pair_cos_p5_p50": [round(float(np.percentile(dup_sims, q)), 3) for q in (5, 50)],
        "non_dup_cos_p50_p99_p999": [round(float(np.nanpercentile(sim[nondup], q)), 3)
                                     for q in (50, 99, 99.9)],
        "nearest_non_dup_cos_p50": round(float(np.nanmedian(
            np.nanmax(np.where(nondup, sim, np.nan), axis=1))), 3),
        "dup_nearest_is_own_group_pct": round(100.0 * float(top1), 2),
        "nearest_non_dup_same_class_pct": round(100.0 * float(np.mean(cls[nearest_nd] == cls)), 2)}}
    t0 = time.monotonic()
    res = self_dedup(pool, k=k, threshold=threshold)
    rel = relative_dedup(pool, res.components, evals, threshold=eval_threshold, k=k)
    out["default"] = {"threshold": threshold, "eval_threshold": eval_threshold,
                      **self_metrics(res.components, res.keep, groups, pairs),
                      **relative_metrics(rel, keys, truth),
                      "dedup_s": round(time.monotonic() - t0, 3)}
    out["curve"] = []
    for t in sweep:  # the same threshold for both steps, to show where each breaks
        r = self_dedup(pool, k=k, threshold=t)
        rr = relative_dedup(pool, r.components, evals, threshold=t, k=k)
        out["curve"].append({"threshold": t, **self_metrics(r.components, r.keep, groups, pairs),
                             **relative_metrics(rr, keys, truth)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="file:///tmp/dinoctl-dedup-bench")
    ap.add_argument("--synth", default="", help="synthetic set URI (default <store>/datasets/synth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=600, help="pool size when generating the set")
    ap.add_argument("--weights", default="", help="backbone file or run URI; empty: pretrain demo")
    ap.add_argument("--run-name", default="dedup-demo", help="run name when pretraining")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra pretraining overrides")
    ap.add_argument("--threshold", type=float, default=None, help="self-dedup cosine (config default)")
    ap.add_argument("--eval-threshold", type=float, default=None,
                    help="relative-dedup cosine (config default)")
    ap.add_argument("--k", type=int, default=None, help="neighbours (config default)")
    ap.add_argument("--features", default="cls", choices=("cls", "cls+mean"))
    ap.add_argument("--image-size", type=int, default=0,
                    help="embedding side; 0: the run's global crop size (else curation default)")
    ap.add_argument("--sweep", type=float, nargs="*", default=list(SWEEP))
    ap.add_argument("--no-baselines", action="store_true", help="skip random-init and thumbnail")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from app import storage
    from app.config import DedupConfig, EmbedConfig, load_config
    from app.data.synth import GROUND_TRUTH

    started = time.monotonic()
    synth = args.synth or storage.join(args.store, "datasets", "synth")
    ensure_synth(synth, args.seed, args.pool)
    truth = storage.get_json(storage.join(synth, GROUND_TRUTH))
    sets = {s: storage.join(synth, s) for s in ("pool", "eval_train", "eval_val")}

    train_s = 0.0
    weights = args.weights
    if not weights:
        t0 = time.monotonic()
        weights = pretrain_demo(args.store, synth, args.run_name, args.nproc, args.set)
        train_s = time.monotonic() - t0
    run_cfg = run_config(weights)
    crop = (run_cfg.get("crops") or {}).get("global_crops_size")
    if crop is None:  # a checkpoint-only run or a bare file: the size its pos_embed was made for
        from app.eval.model_ref import resolve_model

        ref = resolve_model(weights)
        crop, run_cfg = ref.model.img_size, {"model": {"arch": ref.arch}}
    # The paper's defaults (DedupConfig: k=64, 0.6 / 0.45), not the demo preset's curation
    # section, which tunes the weight-free descriptor; that one is reported as "demo_preset".
    defaults = load_config("demo", [])
    d = DedupConfig()
    k = args.k or d.k
    threshold = d.threshold if args.threshold is None else args.threshold
    eval_threshold = d.eval_threshold if args.eval_threshold is None else args.eval_threshold
    size = args.image_size or crop or EmbedConfig().image_size
    arch = (run_cfg.get("model") or {}).get("arch", defaults.model.arch)
    common = [f"curation.embed.image_size={size}", f"curation.embed.features={args.features}",
              f"curation.embed.arch={arch}", "curation.embed.batch_size=64", "curation.embed.model=vit"]
    trained = [f"curation.embed.weights={weights}"]
    embedders = {"trained_copy_head": trained + ["curation.dedup.descriptor=copy_head"],
                 "trained_embedding": trained + ["curation.dedup.descriptor=embedding"]}
    if not args.no_baselines:
        embedders["random_init_copy_head"] = ["curation.embed.weights=",
                                              "curation.dedup.descriptor=copy_head"]
        embedders["thumbnail"] = ["curation.embed.model=thumbnail"]

    report = {"synth": synth, "weights": weights, "arch": arch, "features": args.features,
              "image_size": size, "train_crop_size": crop, "k": k, "pool_valid":
              len(truth["pool_classes"]), "injected_duplicates": len(truth["pool_duplicates"]),
              "injected_exact_duplicates": len(truth["exact_duplicates"]),
              "injected_eval_copies": len(truth["eval_copies"]), "train_s": round(train_s, 1),
              "embedders": {}}
    for name, sets_ in embedders.items():
        cfg = load_config("demo", common + sets_)
        t0 = time.monotonic()
        emb, ips, head_stats = embed_sets(cfg, sets)
        embed_s = time.monotonic() - t0
        result = evaluate(emb, truth, k, threshold, eval_threshold, tuple(args.sweep))
        result.update({"embed_s": round(embed_s, 1), "embed_images_per_s": round(ips, 1)})
        if head_stats:
            result["copy_head"] = head_stats
        report["embedders"][name] = result
    demo = defaults.curation
    if not args.no_baselines and (demo.embed.model, demo.dedup.k, demo.dedup.threshold) != (
            "vit", d.k, d.threshold):
        emb, _, _ = embed_sets(defaults, sets)
        report["demo_preset"] = {"embed_model": demo.embed.model, **evaluate(
            emb, truth, demo.dedup.k, demo.dedup.threshold, demo.dedup.eval_threshold, ())}
    trained = report["embedders"]["trained_copy_head"]["default"]
    report["goal"] = {"recall_ge_95": bool(trained["recall_pct"] >= 95.0),
                      "false_removal_le_2": bool(trained["false_removal_pct"] <= 2.0),
                      "all_eval_copies_dropped": bool(trained["eval_copy_recall_pct"] >= 100.0)}
    report["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
