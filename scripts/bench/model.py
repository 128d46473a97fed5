#!/usr/bin/env python
"""Forward+backward time of our ViT-S/14 and ViT-B/14 against timm's DINOv2 ViTs, on CPU.

Both models are built at img_size 224 with the same width, depth and LayerScale init; runs are
interleaved (ours, timm, ours, timm, ...) so drifting machine load hits both alike. Prints JSON;
`ratio` = ours / timm median seconds per step, `paired_ratio` = median over interleaved pairs of
ours / timm (goal: <= 1.05; `ok` uses it), `cpu_ratio` the same on process CPU time.

    python scripts/bench/model.py [--iters 10] [--warmup 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from app.models import build_backbone  # noqa: E402

CASES = [
    # name, our arch, timm name, batch
    ("vit_small_patch14_224", "vit_small", "vit_small_patch14_dinov2", 16),
    ("vit_base_patch14_224", "vit_base", "vit_base_patch14_dinov2", 8),
]


def step_time(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """One forward + backward of `sum(CLS features)`: (wall seconds, process CPU seconds).

    CPU time is reported too because a shared machine's load inflates wall time unevenly.
    """
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    out = model(x)
    out.float().sum().backward()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_case(arch: str, timm_name: str, batch: int, iters: int, warmup: int) -> dict:
    import timm

    torch.manual_seed(0)
    ours = build_backbone(arch, img_size=224, init_values=1.0).train()
    theirs = timm.create_model(timm_name, pretrained=False, img_size=224, init_values=1.0,
                               num_classes=0).train()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    x = torch.randn(batch, 3, 224, 224)
    for _ in range(warmup):
        step_time(ours, x)
        step_time(theirs, x)
    t_ours: list[tuple[float, float]] = []
    t_theirs: list[tuple[float, float]] = []
    for i in range(iters):
        # alternate who goes first so neither always runs on a warmer cache
        if i % 2 == 0:
            t_ours.append(step_time(ours, x))
            t_theirs.append(step_time(theirs, x))
        else:
            t_theirs.append(step_time(theirs, x))
            t_ours.append(step_time(ours, x))
    m_ours = statistics.median(t[0] for t in t_ours)
    m_theirs = statistics.median(t[0] for t in t_theirs)
    c_ours = statistics.median(t[1] for t in t_ours)
    c_theirs = statistics.median(t[1] for t in t_theirs)
    return {
        "batch": batch,
        "params_ours": n_ours,
        "params_timm": n_theirs,
        "ours_s": round(m_ours, 4),
        "timm_s": round(m_theirs, 4),
        "ratio": round(m_ours / m_theirs, 4),
        # median of per-pair ratios: each interleaved pair saw about the same machine load
        "paired_ratio": round(statistics.median(a[0] / b[0] for a, b in zip(t_ours, t_theirs)), 4),
        "ours_cpu_s": round(c_ours, 4),
        "timm_cpu_s": round(c_theirs, 4),
        "cpu_ratio": round(c_ours / c_theirs, 4),
        "ours_img_per_s": round(batch / m_ours, 2),
        "timm_img_per_s": round(batch / m_theirs, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--max-ratio", type=float, default=1.05)
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply the batch sizes (quick runs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
               "iters": args.iters, "warmup": args.warmup, "cases": {}}
    for name, arch, timm_name, batch in CASES:
        b = max(1, round(batch * args.batch_scale))
        results["cases"][name] = bench_case(arch, timm_name, b, args.iters, args.warmup)
    results["ok"] = all(c["paired_ratio"] <= args.max_ratio for c in results["cases"].values())
    print(json.dumps(results, indent=2))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
