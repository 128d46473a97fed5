#!/usr/bin/env python
"""Shard read throughput from `file://` and from a real S3 server (SeaweedFS), as JSON.

    .venv/bin/python scripts/bench/data_read.py [--images 3000] [--size 96] [--no-s3]

Generates a synthetic dataset first (its generation rate is reported too), then streams every
shard with `iter_samples`, once without and once with JPEG decoding, and does a few hundred
random-access `Dataset.get` reads through index offsets. The file:// numbers read from the page
cache (the shards were just written), so they bound what the reader itself costs.

`loader` is what training sees: the DataLoader with 0, 2 and 4 worker processes, over the same
data on file:// and s3:// in one run: `reads` (ranged reads + sha256 check, no decode) and
`multicrop` (the demo preset's `MultiCropLoader`: decode + 2 global + 4 local crops + masks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app import storage  # noqa: E402
from app.data import Dataset, decode_image, iter_samples  # noqa: E402
from app.data.synth import synthesize  # noqa: E402


def _stream(uri: str, decode: bool, shard_bytes: int) -> dict:
    n = nbytes = 0
    t0 = time.perf_counter()
    for s in iter_samples(uri):
        n += 1
        nbytes += len(s.image_bytes)
        if decode:
            decode_image(s.image_bytes, s.key)
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1),
            "MB_per_s": round(shard_bytes / dt / 1e6, 2),  # tar bytes read
            "image_MB_per_s": round(nbytes / dt / 1e6, 2)}  # JPEG payload only


def _random_access(uri: str, count: int, seed: int = 0) -> dict:
    ds = Dataset(uri)
    idx = random.Random(seed).sample(range(len(ds)), min(count, len(ds)))
    nbytes = 0
    t0 = time.perf_counter()
    for i in idx:
        nbytes += len(ds.get(i).image_bytes)
    dt = time.perf_counter() - t0
    return {"reads": len(idx), "reads_per_s": round(len(idx) / dt, 1),
            "MB_per_s": round(nbytes / dt / 1e6, 2)}


def _measure(uri: str, random_reads: int) -> dict:
    ds = Dataset(uri)
    out = {"uri_scheme": storage.parse_uri(uri)[0], "shards": ds.stats["num_shards"],
           "shard_MB": round(ds.stats["bytes"] / 1e6, 2)}
    size = ds.stats["bytes"]
    _stream(uri, False, size)  # warm-up: first-touch costs (imports, connections)
    out["stream_decode_excluded"] = _stream(uri, False, size)
    out["stream_decode_included"] = _stream(uri, True, size)
    out["random_access"] = _random_access(uri, random_reads)
    return out


class _Reads:
    """Item i -> the verified bytes of sample i (what a training worker fetches)."""

    def __init__(self, uri: str):
        self.ds = Dataset(uri)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> int:
        return len(self.ds.get(i).image_bytes)


def _loader_reads(uri: str, workers: int, count: int) -> dict:
    import torch

    data = _Reads(uri)
    idx = random.Random(1).sample(range(len(data)), min(count, len(data)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, idx), batch_size=None,
                                         num_workers=workers, timeout=300 if workers else 0)
    t0 = time.perf_counter()
    nbytes = sum(int(n) for n in loader)
    dt = time.perf_counter() - t0  # includes starting the worker processes, as a run does
    return {"samples": len(idx), "samples_per_s": round(len(idx) / dt, 1),
            "MB_per_s": round(nbytes / dt / 1e6, 2)}


def _loader_multicrop(uri: str, workers: int, batches: int) -> dict:
    from app.config import load_config
    from app.data.loader import MultiCropLoader

    cfg = load_config("demo", [f"train.dataset={uri}", "train.batch_size_per_gpu=16"])
    loader = MultiCropLoader(cfg, rank=0, world_size=1, num_workers=workers)
    try:
        loader.next_batch(0)  # worker start-up and the first batch: not the steady state
        t0 = time.perf_counter()
        for step in range(1, batches + 1):
            loader.next_batch(step)
        dt = time.perf_counter() - t0
    finally:
        loader.close()
    n = batches * cfg.train.batch_size_per_gpu
    return {"images": n, "images_per_s": round(n / dt, 1)}


def _measure_loaders(uri: str, reads: int, batches: int) -> dict:
    return {f"workers_{w}": {"reads": _loader_reads(uri, w, reads),
                             "multicrop": _loader_multicrop(uri, w, batches)}
            for w in (0, 2, 4)}


def _upload(local_uri: str, remote_uri: str) -> float:
    t0 = time.perf_counter()
    for obj in storage.list_objects(local_uri + "/"):
        rel = obj.uri[len(local_uri) + 1:]
        storage.put_file(storage.join(remote_uri, rel), storage.parse_uri(obj.uri)[2])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--random-reads", type=int, default=300)
    p.add_argument("--no-s3", action="store_true", help="skip the S3 measurement")
    p.add_argument("--loader-reads", type=int, default=600, help="samples per loader-reads run")
    p.add_argument("--loader-batches", type=int, default=20, help="batches per multicrop run")
    p.add_argument("--s3-endpoint", default="", help="measure this S3 endpoint instead of a "
                   "local SeaweedFS (keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    p.add_argument("--s3-uri", default="", help="with --s3-endpoint: where to upload the data")
    args = p.parse_args(argv)

    result: dict = {"benchmark": "data_read", "host": platform.node(),
                    "cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        out = "file://" + os.path.join(tmp, "synth")
        t0, c0 = time.perf_counter(), time.process_time()
        synthesize(out, seed=0, n_pool=args.images, n_seeds=0, n_eval_train=0, n_eval_val=0,
                   image_size=args.size, n_corrupt=0, max_samples_per_shard=args.shard_size)
        gen, cpu = time.perf_counter() - t0, time.process_time() - c0
        result["synth"] = {"images": args.images, "image_size": args.size,
                           "seconds": round(gen, 2), "cpu_seconds": round(cpu, 2),
                           "images_per_s": round(args.images / gen, 1),
                           "images_per_cpu_s": round(args.images / cpu, 1)}
        local = storage.join(out, "pool")
        result["file"] = _measure(local, args.random_reads)
        result["file"]["loader"] = _measure_loaders(local, args.loader_reads, args.loader_batches)

        def measure_s3(remote: str, server: str) -> None:
            up = _upload(local, remote)
            result["s3"] = _measure(remote, args.random_reads)
            result["s3"]["upload_MB_per_s"] = round(result["file"]["shard_MB"] / up, 2)
            result["s3"]["server"] = server
            result["s3"]["loader"] = _measure_loaders(remote, args.loader_reads,
                                                      args.loader_batches)

        if args.s3_endpoint:
            os.environ["S3_ENDPOINT_URL"] = args.s3_endpoint
            measure_s3(args.s3_uri or "s3://dinoctl/bench/pool", args.s3_endpoint)
        elif not args.no_s3:
            from tests.services import seaweedfs

            with seaweedfs(os.path.join(tmp, "seaweedfs"), bucket="bench") as server:
                os.environ.update(server.env)
                measure_s3(server.uri("pool"), "seaweedfs (weed mini) on 127.0.0.1")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
