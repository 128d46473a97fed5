"""`dinoctl data synth`: a labelled, procedurally generated image collection with known answers.

Writes four datasets and a ground-truth file under `out_uri`:

    pool/        uncurated: imbalanced classes + clutter, ~10% near-duplicates of other pool
                 images (a few byte-identical), near-copies of evaluation images, and a few
                 corrupt files that the writer must count and skip
    seeds/       small balanced labelled set (the curated "query" set for retrieval)
    eval_train/  labelled k-NN bank
    eval_val/    labelled k-NN queries
    ground_truth.json   which pool keys duplicate which, which copy which eval key, corrupt keys

Everything derives from `seed`: each image has its own generator seeded by (seed, split, index),
so the same seed gives byte-identical shards. No downloads.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import numpy as np

from app import storage
from app.data.importer import store_image
from app.data.shards import ShardWriter
from app.data.synth_shapes import CLASS_NAMES, NUM_CLASSES, jpeg_bytes, near_duplicate, render_image

log = logging.getLogger(__name__)

SPLITS = ("pool", "seeds", "eval_train", "eval_val")
GROUND_TRUTH = "ground_truth.json"
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}
_POOL_LAYOUT_CODE = 97
CLUTTER = "clutter"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODE[split], index])


def _size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """Varied, not always square, sizes around `image_size` (e.g. 77..110 px for 96)."""
    lo, hi = int(round(image_size * 0.8)), int(round(image_size * 1.15))
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _labelled_split(seed: int, split: str, n: int, image_size: int):
    """Balanced labelled images: yields (key, pixels, jpeg bytes, class index)."""
    for i in range(n):
        rng = _rng(seed, split, i)
        cls = i % NUM_CLASSES
        w, h = _size(rng, image_size)
        pixels = render_image(rng, cls, w, h)
        yield f"{split}-{i:06d}", pixels, jpeg_bytes(pixels, int(rng.integers(80, 96))), cls


def _pool_class_weights() -> np.ndarray:
    """Long-tailed class frequencies plus 10% clutter, as an uncurated web pool would be."""
    w = (np.arange(NUM_CLASSES) + 1.0) ** -0.8
    w = 0.9 * w / w.sum()
    return np.append(w, 0.1)


def _corrupt_bytes(rng: np.random.Generator, kind: str, image_size: int) -> bytes:
    if kind == "truncated_jpeg":
        data = jpeg_bytes(render_image(rng, None, image_size, image_size), 90)
        return data[: int(len(data) * rng.uniform(0.3, 0.6))]
    if kind == "random_bytes":
        return rng.bytes(int(rng.integers(300, 2000)))
    # A JPEG start-of-image marker followed by garbage: looks like a JPEG, is not one.
    return b"\xff\xd8\xff\xe0" + rng.bytes(int(rng.integers(300, 2000)))


_CORRUPT_KINDS = ("truncated_jpeg", "random_bytes", "bad_jpeg_body")


def synthesize(out_uri: str, seed: int = 0, n_pool: int = 600, n_seeds: int = 48,
               n_eval_train: int = 240, n_eval_val: int = 120, image_size: int = 96,
               dup_fraction: float = 0.1, n_eval_copies: int | None = None, n_corrupt: int = 3,
               max_samples_per_shard: int = 256) -> dict[str, Any]:
    """Generate the four splits and `ground_truth.json` under `out_uri`; return a summary."""
    for name, value in (("n_pool", n_pool), ("n_seeds", n_seeds), ("n_eval_train", n_eval_train),
                        ("n_eval_val", n_eval_val), ("n_corrupt", n_corrupt)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [16, 1024], got {image_size}")
    if not 0.0 <= dup_fraction < 0.5:
        raise ValueError(f"dup_fraction must be in [0, 0.5), got {dup_fraction}")
    started = time.monotonic()
    out = storage.to_uri(out_uri).rstrip("/")
    created_by = f"dinoctl data synth (seed {seed})"
    summary: dict[str, Any] = {"out": out, "seed": seed, "splits": {}}

    eval_pixels: dict[str, tuple[np.ndarray, int]] = {}
    for split, n in (("seeds", n_seeds), ("eval_train", n_eval_train), ("eval_val", n_eval_val)):
        uri = storage.join(out, split)
        with ShardWriter(uri, max_samples_per_shard, created_by=created_by, name=split) as w:
            for key, pixels, data, cls in _labelled_split(seed, split, n, image_size):
                if split != "seeds":
                    eval_pixels[key] = (pixels, cls)
                store_image(w, key, data, {"label": cls, "label_name": CLASS_NAMES[cls],
                                           "source": f"synth:{split}"})
        summary["splits"][split] = {"uri": uri, "num_samples": w.stats["num_samples"]}

    truth = _write_pool(out, seed, n_pool, image_size, dup_fraction, n_eval_copies, n_corrupt,
                        eval_pixels, max_samples_per_shard, created_by, summary)
    truth.update({"seed": seed, "classes": list(CLASS_NAMES),
                  "splits": list(SPLITS)})  # dataset URIs are <out>/<split>
    storage.put_json(storage.join(out, GROUND_TRUTH), truth)
    summary["ground_truth"] = storage.join(out, GROUND_TRUTH)
    summary["seconds"] = round(time.monotonic() - started, 3)
    total = sum(s["num_samples"] for s in summary["splits"].values())
    log.info("synth: %d images in %.2f s (%.0f images/s) under %s", total, summary["seconds"],
             total / max(summary["seconds"], 1e-9), out)
    return summary


def _write_pool(out, seed, n_pool, image_size, dup_fraction, n_eval_copies, n_corrupt,
                eval_pixels, max_samples_per_shard, created_by, summary) -> dict[str, Any]:
    layout = np.random.default_rng([seed, _POOL_LAYOUT_CODE])
    if n_eval_copies is None:
        n_eval_copies = max(2, int(round(0.03 * n_pool))) if n_pool >= 20 else 0
    n_eval_copies = min(n_eval_copies, len(eval_pixels))
    n_dups = int(round(dup_fraction * n_pool))
    n_orig = n_pool - n_dups - n_eval_copies
    if n_pool and n_orig < max(1, n_dups):
        raise ValueError(f"n_pool={n_pool} is too small for {n_dups} duplicates and "
                         f"{n_eval_copies} eval copies")
    kinds = np.array(["orig"] * n_orig + ["dup"] * n_dups + ["eval_copy"] * n_eval_copies
                     + ["corrupt"] * n_corrupt)
    kinds = kinds[layout.permutation(len(kinds))]
    keys = [f"pool-{i:06d}" for i in range(len(kinds))]
    orig_keys = [k for k, kind in zip(keys, kinds) if kind == "orig"]
    dup_keys = [k for k, kind in zip(keys, kinds) if kind == "dup"]
    copy_keys = [k for k, kind in zip(keys, kinds) if kind == "eval_copy"]
    dup_of = dict(zip(dup_keys, layout.choice(orig_keys, size=n_dups, replace=False).tolist()
                      if n_dups else []))
    # A tenth of the duplicates are byte-identical copies (what a sha256 check alone finds).
    exact = set(layout.choice(dup_keys, size=n_dups // 10, replace=False).tolist()
                if n_dups >= 10 else [])
    eval_keys = sorted(eval_pixels)
    copy_of = dict(zip(copy_keys, layout.choice(eval_keys, size=n_eval_copies, replace=False)
                       .tolist() if n_eval_copies else []))
    weights = _pool_class_weights()

    # Originals first: duplicates need their source pixels and bytes.
    originals: dict[str, tuple[np.ndarray, bytes, int | None]] = {}
    for i, (key, kind) in enumerate(zip(keys, kinds)):
        if kind != "orig":
            continue
        rng = _rng(seed, "pool", i)
        choice = int(rng.choice(NUM_CLASSES + 1, p=weights))
        cls = None if choice == NUM_CLASSES else choice
        w, h = _size(rng, image_size)
        pixels = render_image(rng, cls, w, h)
        originals[key] = (pixels, jpeg_bytes(pixels, int(rng.integers(70, 96))), cls)

    truth: dict[str, Any] = {"pool_classes": {}, "pool_duplicates": dup_of,
                             "exact_duplicates": sorted(exact), "eval_copies": copy_of,
                             "corrupt": {}}
    uri = storage.join(out, "pool")
    with ShardWriter(uri, max_samples_per_shard, created_by=created_by, name="pool") as w:
        for i, (key, kind) in enumerate(zip(keys, kinds)):
            rng = _rng(seed, "pool", i)
            if kind == "orig":
                _, data, cls = originals[key]
            elif kind == "dup":
                src_pixels, src_data, cls = originals[dup_of[key]]
                if key in exact:
                    data = src_data
                else:
                    pixels, quality = near_duplicate(rng, src_pixels)
                    data = jpeg_bytes(pixels, quality)
            elif kind == "eval_copy":
                src_pixels, cls = eval_pixels[copy_of[key]]
                pixels, quality = near_duplicate(rng, src_pixels)
                data = jpeg_bytes(pixels, quality)
            else:
                corrupt_kind = _CORRUPT_KINDS[len(truth["corrupt"]) % len(_CORRUPT_KINDS)]
                truth["corrupt"][key] = corrupt_kind
                store_image(w, key, _corrupt_bytes(rng, corrupt_kind, image_size),
                            {"source": f"synth:pool/{key}"})
                continue
            truth["pool_classes"][key] = CLUTTER if cls is None else CLASS_NAMES[cls]
            store_image(w, key, data, {"source": "synth:pool"})
    summary["splits"]["pool"] = {"uri": uri, "num_samples": w.stats["num_samples"],
                                 "num_skipped": w.stats["num_skipped"]}
    return truth


# ----------------------------------------------------------------------------------------------
# Command line (also the `python -m app.entry synth` stage)
# ----------------------------------------------------------------------------------------------


def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="", help="output URI (default <store>/datasets/synth)")
    p.add_argument("--store", default="", help="store root URI used when --out is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=600, help="uncurated pool images (valid ones)")
    p.add_argument("--seeds", type=int, default=48, help="labelled curated seed images")
    p.add_argument("--eval", type=int, default=None,
                   help="evaluation images in total, split 2:1 into eval_train/eval_val")
    p.add_argument("--eval-train", type=int, default=240, help="labelled k-NN bank images")
    p.add_argument("--eval-val", type=int, default=120, help="labelled k-NN query images")
    p.add_argument("--size", type=int, default=96, help="typical image side in pixels")
    p.add_argument("--dup-fraction", type=float, default=0.1,
                   help="fraction of the pool that are near-duplicates of other pool images")
    p.add_argument("--corrupt", type=int, default=3, help="corrupt files injected in the pool")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """As a job (`dinoctl submit synth --config X`): the config gives the store and the seed."""
    p.add_argument("--config", "-c", default=None, help="preset or YAML: run.store and run.seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run_synth(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out
    if not out:
        from app.config import default_store

        out = storage.join(args.store or default_store(), "datasets", "synth")
    n_train, n_val = args.eval_train, args.eval_val
    if args.eval is not None:
        n_train = (2 * args.eval) // 3
        n_val = args.eval - n_train
    return synthesize(out, seed=args.seed, n_pool=args.pool, n_seeds=args.seeds,
                      n_eval_train=n_train, n_eval_val=n_val, image_size=args.size,
                      dup_fraction=args.dup_fraction, n_corrupt=args.corrupt,
                      max_samples_per_shard=args.shard_size)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`app.entry synth [--out URI] [--config ...]`; the entry's own stage name is dropped."""
    if argv and argv[0] == "synth":  # `python -m app.entry synth ...` passes the stage name
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="synth", description=__doc__.split("\n")[0])
    add_synth_args(parser)
    add_config_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import json
    import sys

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.config or args.overrides:
        from app.config import load_config

        cfg = load_config(args.config, args.overrides)
        args.store = args.store or cfg.run.store
        args.seed = args.seed or cfg.run.seed
    if int(os.environ.get("RANK", "0")) != 0:  # a multi-replica job: one writer
        return 0
    summary = run_synth(args)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
