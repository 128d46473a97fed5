#!/usr/bin/env python
"""Does `configs/demo.yaml` learn? k-NN accuracy of the teacher's CLS features before and after.

    python scripts/bench/demo_knn.py [--store file:///tmp/demo-store] [--nproc 2] [--set k=v ...]

1. writes the synthetic data set under <store>/datasets/synth (unless it is there),
2. k-NN (cosine, k=20, T=0.07, weighted votes) of the randomly initialised network: `eval_val`
   queries against the `eval_train` bank, images resized to the global crop size,
3. pretrains with configs/demo.yaml (torchrun with --nproc processes, CPU),
4. the same k-NN on the exported teacher backbone; prints JSON with both numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, REPO)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="file:///tmp/dinoctl-demo-store")
    ap.add_argument("--run", default="demo-knn")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    import torch

    from app import storage
    from app.config import load_config
    from app.data.synth import synthesize
    from app.ssl.meta_arch import build_network
    from app.train.knn_probe import knn_probe

    synth = storage.join(args.store, "datasets", "synth")
    if not storage.exists(storage.join(synth, "pool", "_stats.json")):
        synthesize(synth, seed=0)
    sets = [f"run.store={args.store}", f"run.name={args.run}",
            f"train.dataset={storage.join(synth, 'pool')}", "train.resume=never", *args.set]
    cfg = load_config("demo", sets)
    size = cfg.crops.global_crops_size
    train_uri, val_uri = storage.join(synth, "eval_train"), storage.join(synth, "eval_val")

    torch.manual_seed(cfg.run.seed)  # the same initial weights the run starts from
    before = knn_probe(build_network(cfg).backbone, train_uri, val_uri, size)

    started = time.monotonic()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(args.nproc), "-m", "app.entry", "pretrain", "--config", "demo"]
    for s in sets:
        cmd += ["--set", s]
    rc = subprocess.call(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    if rc != 0:
        raise SystemExit(f"pretraining failed with exit code {rc}")
    train_s = time.monotonic() - started

    export = storage.join(args.store, "runs", args.run, "export")
    state = torch.load(io.BytesIO(storage.get_bytes(storage.join(export, "backbone.pth"))),
                       map_location="cpu")
    backbone = build_network(cfg).backbone
    backbone.load_state_dict(state, strict=True)
    after = knn_probe(backbone, train_uri, val_uri, size)
    summary = storage.get_json(storage.join(export, "summary.json"))
    print(json.dumps({"knn_top1_before": round(before, 2), "knn_top1_after": round(after, 2),
                      "gain_points": round(after - before, 2), "train_wall_s": round(train_s, 1),
                      "steps": summary["steps"], "images_per_s": round(summary["images_per_s"], 2),
                      "final_losses": summary["final_losses"], "nproc": args.nproc,
                      "k": 20, "temperature": 0.07}, indent=2))


if __name__ == "__main__":
    main()
