"""Stage `eval`: `torchrun -m app.entry eval --config <yaml> [--set k=v] [--model <run or file>]`

Load the model (eval.model: a run URI or a backbone file; default `<store>/runs/<run.name>`),
extract (cached) features of eval.train and eval.val, run k-NN and the linear probe, write
`<store>/runs/<run.name>/eval/summary.json` + confusion PNGs + `_SUCCESS` (last), and log the
same to MLflow. Only global rank 0 works; other ranks exit at once. Exit codes: 0 done,
2 bad config or input.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from typing import Any

from app import storage

log = logging.getLogger("app.eval")

SUMMARY = "summary.json"
SUCCESS = "_SUCCESS"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.entry eval")
    p.add_argument("stage", nargs="?", default="eval")
    p.add_argument("--config", required=True, help="preset name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--model", default=None, help="run URI or backbone file (eval.model)")
    p.add_argument("--no-linear", action="store_true", help="k-NN only")
    return p.parse_args(argv)


def run_uri(cfg) -> str:
    return storage.join(storage.to_uri(cfg.run.store), "runs", cfg.run.name)


def eval_dir(cfg) -> str:
    return storage.join(run_uri(cfg), "eval")


def default_model_uri(cfg) -> str:
    return cfg.eval.model or run_uri(cfg)


def check_inputs(cfg) -> None:
    """Fail before any work (or MLflow run) when the datasets are not named."""
    for key in ("train", "val"):
        if not getattr(cfg.eval, key):
            raise ValueError(f"eval.{key} is empty: set it to a labelled dataset URI")


def evaluate_model(cfg, model_uri: str, linear: bool = True, tracker=None) -> dict[str, Any]:
    """Everything but the stage plumbing; returns the summary (also written and logged)."""
    import torch

    from app.eval.features import dataset_features, model_fingerprint
    from app.eval.model_ref import resolve_model
    from app.eval.protocols import EvalSettings, confusion_figure, evaluate, headline_metrics

    ecfg = cfg.eval
    check_inputs(cfg)
    started = time.monotonic()
    torch.manual_seed(cfg.run.seed)
    ref = resolve_model(model_uri)
    fingerprint = model_fingerprint(ref.model)
    feats = {}
    for split in ("train", "val"):
        feats[split] = dataset_features(
            ref.model, getattr(ecfg, split), cfg.run.store if ecfg.cache else None,
            image_size=ecfg.image_size, batch_size=ecfg.batch_size,
            n_last_blocks=max(1, ecfg.linear_n_last_blocks), num_workers=ecfg.num_workers,
            use_cache=ecfg.cache, fingerprint=fingerprint)
    extracted = time.monotonic()
    result = evaluate(feats["train"], feats["val"], EvalSettings.from_config(ecfg, cfg.run.seed, linear))
    summary = {
        "stage": "eval",
        "model": {"uri": storage.to_uri(model_uri), "source": ref.source, "run": ref.run_uri,
                  "arch": ref.arch, "embed_dim": ref.model.embed_dim, "fingerprint": fingerprint},
        **result.summary,
        "features_from_cache": {s: f.from_cache for s, f in feats.items()},
        "seconds": {"features": round(extracted - started, 2),
                    "protocols": round(time.monotonic() - extracted, 2)},
    }
    out = eval_dir(cfg)
    figures = {name: confusion_figure(cm, result.class_names, f"{ref.arch} {name}")
               for name, cm in result.confusion.items()}
    for name, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        storage.put_bytes(storage.join(out, f"confusion_{name}.png"), buf.getvalue())
    storage.put_json(storage.join(out, SUMMARY), summary)
    if tracker is not None:
        tracker.set_tags({"model_uri": summary["model"]["uri"], "eval_set": summary["eval_set"]["id"],
                          "model_fingerprint": fingerprint[:16]})
        tracker.log_metrics(headline_metrics(summary))
        tracker.log_dict(summary, f"eval/{SUMMARY}")
        for name, fig in figures.items():
            tracker.log_figure(fig, f"eval/confusion_{name}.png")
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)
    storage.put_bytes(storage.join(out, SUCCESS), b"")
    log.info("eval %s: k-NN top-1 %s, linear top-1 %s -> %s", ref.arch, summary["knn"]["top1"],
             summary.get("linear", {}).get("top1"), storage.join(out, SUMMARY))
    return summary


def main(argv: list[str] | None = None) -> int:
    from app.config import load_config
    from app.tracking import get_tracker, global_rank

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.set)  # a ConfigError becomes one line in app.entry
    if args.model:
        cfg.eval.model = args.model
    if global_rank() != 0:
        log.info("eval runs on global rank 0 only; rank %d exits", global_rank())
        return 0
    try:
        check_inputs(cfg)
        with get_tracker().start("eval", config=cfg) as tracker:
            evaluate_model(cfg, default_model_uri(cfg), linear=not args.no_linear, tracker=tracker)
    except (ValueError, storage.StorageError) as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
