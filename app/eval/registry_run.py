"""Stage `register`: `torchrun -m app.entry register --config <yaml> [--set k=v] [--model URI] [--eval URI]`

Reads the eval summary of this run (`<store>/runs/<run.name>/eval/summary.json`, or `--eval`),
registers the model it evaluated (or `--model` / eval.model) as a version of `dinov2-<arch>`
(alias `candidate`; `champion` only on a comparable improvement, see `mlflow_model.py`), and
writes `<store>/runs/<run.name>/register/summary.json` + `_SUCCESS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Any

from app import storage

log = logging.getLogger("app.eval.register")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.entry register")
    p.add_argument("stage", nargs="?", default="register")
    p.add_argument("--config", required=True, help="preset name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--model", default=None, help="run URI or backbone file (default: the model the "
                   "eval summary names, else eval.model, else runs/<run.name>)")
    p.add_argument("--eval", default=None, help="eval summary.json URI (default: this run's)")
    return p.parse_args(argv)


def load_eval_summary(uri: str | None) -> dict[str, Any] | None:
    if not uri:
        return None
    uri = storage.to_uri(uri)
    if not storage.exists(uri):
        raise storage.NotFound(f"{uri}: eval summary not found")
    summary = storage.get_json(uri)
    if not isinstance(summary, dict) or "eval_set" not in summary or "knn" not in summary:
        raise ValueError(f"{uri}: not an eval summary (no eval_set / knn)")
    return summary


@dataclass
class Prepared:
    target: str  # the model URI as given / as the eval summary names it
    ref: Any  # app.eval.model_ref.ModelRef
    summary: dict[str, Any] | None
    eval_uri: str | None


def prepare(model_uri: str | None, eval_uri: str | None) -> Prepared:
    """Resolve the model and its eval summary and check that they belong together (before any
    MLflow run is opened, so bad input fails fast)."""
    from app.eval.features import model_fingerprint
    from app.eval.model_ref import resolve_model

    summary = load_eval_summary(eval_uri)
    target = model_uri or (summary or {}).get("model", {}).get("uri")
    if not target:
        raise ValueError("no model to register: pass a run URI / backbone file or an eval summary")
    ref = resolve_model(target)
    evaluated = (summary or {}).get("model", {}).get("fingerprint")
    if evaluated and evaluated != model_fingerprint(ref.model):
        raise ValueError(f"{eval_uri} evaluated another model (fingerprint {evaluated[:12]}) "
                         f"than {target}; re-run eval or pass the matching --eval")
    return Prepared(target, ref, summary, eval_uri)


def register_prepared(p: Prepared, tracker, name: str | None = None,
                      extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Register a prepared model under `tracker`'s open run; return a JSON-able result."""
    from app.eval.mlflow_model import register_backbone

    tags = {**(extra_tags or {}), **({"eval_summary": storage.to_uri(p.eval_uri)} if p.eval_uri else {})}
    reg = register_backbone(tracker, p.ref, p.summary, name=name or None, extra_tags=tags)
    return {"stage": "register", "model": storage.to_uri(p.target), "eval_summary": p.eval_uri,
            **reg.to_dict()}


def register_model_uri(model_uri: str | None, eval_uri: str | None, tracker, name: str | None = None,
                       extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """`prepare` + `register_prepared`."""
    return register_prepared(prepare(model_uri, eval_uri), tracker, name, extra_tags)


def main(argv: list[str] | None = None) -> int:
    from app.config import load_config
    from app.eval.run import SUCCESS, default_model_uri, eval_dir, run_uri
    from app.tracking import Tracker, global_rank

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.set)  # a ConfigError becomes one line in app.entry
    if global_rank() != 0:
        return 0
    eval_uri = args.eval or storage.join(eval_dir(cfg), "summary.json")
    if not args.eval and not storage.exists(eval_uri):
        log.warning("no eval summary at %s: registering without evaluation (champion unchanged)", eval_uri)
        eval_uri = None
    model_uri = args.model or (None if eval_uri else default_model_uri(cfg))
    try:
        prepared = prepare(model_uri, eval_uri)
        with Tracker().start("register", config=cfg) as tracker:
            result = register_prepared(prepared, tracker, cfg.eval.registry_name)
            tracker.log_dict(result, "register/summary.json")
    except (ValueError, storage.StorageError) as exc:
        print(f"register: error: {exc}", file=sys.stderr)
        return 2
    out = storage.join(run_uri(cfg), "register")
    storage.put_json(storage.join(out, "summary.json"), result)
    storage.put_bytes(storage.join(out, SUCCESS), b"")
    print(f"registered {result['name']} v{result['version']} ({', '.join(result['aliases'])}): "
          f"{result['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
