"""CLI: `dinoctl eval knn|linear|run`, `dinoctl export`, `dinoctl register`, `dinoctl models list`.

    dinoctl eval knn --model <run or file> --train <dataset> --val <dataset> [--config demo]
    dinoctl eval linear --model ... --train ... --val ... [--set eval.linear_features=cls+mean]
    dinoctl eval run --config demo [--model ...]          # the pipeline's eval stage, here
    dinoctl export <run-uri> [--out URI] [--from-checkpoint]
    dinoctl register <run-uri or backbone file> [--eval <summary.json>] [--name dinov2-x]
    dinoctl models list
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="k-NN / linear-probe evaluation of a backbone")
    esub = p.add_subparsers(dest="eval_command", metavar="{knn,linear,run}", required=True)
    for proto in ("knn", "linear"):
        e = esub.add_parser(proto, help=f"{'k-NN' if proto == 'knn' else 'linear probe'} "
                            "top-1 on a labelled train/val pair")
        e.add_argument("--model", required=True, help="run URI or backbone file")
        e.add_argument("--train", required=True, help="labelled dataset URI (bank / probe train)")
        e.add_argument("--val", required=True, help="labelled dataset URI (queries)")
        e.add_argument("--config", default=None, help="preset name or YAML path (eval.* settings)")
        e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        e.add_argument("--json", action="store_true", help="print the full result as JSON")
        e.set_defaults(func=_eval_protocol, protocol=proto)
    r = esub.add_parser("run", help="the eval stage: features, k-NN, linear, summary, MLflow")
    r.add_argument("--config", required=True)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--model", default=None)
    r.set_defaults(func=_eval_run)

    x = sub.add_parser("export", help="write a run's backbone (official keys), heads and config")
    x.add_argument("run", help="run URI (<store>/runs/<name>)")
    x.add_argument("--out", default=None, help="output URI (default <run>/export)")
    x.add_argument("--from-checkpoint", action="store_true",
                   help="re-export from checkpoints/LATEST even if export/ exists")
    x.add_argument("--config", default=None, help="config to store as config.yaml (checkpoint exports)")
    x.set_defaults(func=_export)

    g = sub.add_parser("register", help="register a run's model in MLflow (dinov2-<arch>)")
    g.add_argument("run", help="run URI or backbone file")
    g.add_argument("--eval", default=None, help="eval summary.json (default: <run>/eval/summary.json)")
    g.add_argument("--name", default=None, help="registered model name (default dinov2-<arch>)")
    g.set_defaults(func=_register)

    m = sub.add_parser("models", help="registered model versions, aliases and metrics")
    msub = m.add_subparsers(dest="models_command", metavar="{list}", required=True)
    ml = msub.add_parser("list", help="list dinov2-* versions")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=_models_list)


def _eval_protocol(args) -> int:
    from app import storage
    from app.config import load_config
    from app.eval.features import dataset_features, model_fingerprint
    from app.eval.model_ref import resolve_model
    from app.eval.protocols import EvalSettings, evaluate

    cfg = load_config(args.config, args.set)
    ecfg = cfg.eval
    ref = resolve_model(args.model)
    fp = model_fingerprint(ref.model)
    feats = [dataset_features(ref.model, storage.to_uri(uri), cfg.run.store if ecfg.cache else None,
                              ecfg.image_size, ecfg.batch_size, max(1, ecfg.linear_n_last_blocks),
                              ecfg.num_workers, ecfg.cache, fp)
             for uri in (args.train, args.val)]
    settings = EvalSettings.from_config(ecfg, cfg.run.seed, linear=args.protocol == "linear")
    summary = evaluate(feats[0], feats[1], settings).summary
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    counts = summary["counts"]
    print(f"model {ref.arch} ({ref.source}); train {counts['train']} images, val {counts['val']} "
          f"images ({counts['train_corrupt'] + counts['val_corrupt']} corrupt skipped); "
          f"eval set {summary['eval_set']['id']}")
    if args.protocol == "knn":
        knn = summary["knn"]
        for k, acc in knn["top1"].items():
            print(f"k-NN k={k:<4} (used {knn['k_used'][k]:<4}) top-1 {acc:6.2f}%")
    else:
        lin = summary["linear"]
        print(f"linear ({lin['features']}, last {lin['n_last_blocks']} block(s)) top-1 "
              f"{lin['top1']:6.2f}%  [lr {lin['lr']:g}, wd {lin['weight_decay']:g}, held-out "
              f"{lin['heldout_top1']:.2f}%]")
    return 0


def _eval_run(args) -> int:
    from app.eval.run import main

    argv = ["eval", "--config", args.config] + [a for s in args.set for a in ("--set", s)]
    return main(argv + (["--model", args.model] if args.model else []))


def _export(args) -> int:
    from app.config import dump_yaml, load_config
    from app.eval.export import export_run

    cfg_text = dump_yaml(load_config(args.config)) if args.config else None
    summary = export_run(args.run, args.out, args.from_checkpoint, cfg_text)
    print(f"exported {summary.get('source', args.run)} -> {summary.get('out')}")
    return 0


def _register(args) -> int:
    from app import storage
    from app.eval.model_ref import is_run_uri
    from app.eval.registry_run import prepare, register_prepared
    from app.tracking import Tracker

    eval_uri = args.eval
    if eval_uri is None and is_run_uri(args.run):
        default = storage.join(storage.to_uri(args.run).rstrip("/"), "eval", "summary.json")
        eval_uri = default if storage.exists(default) else None
    prepared = prepare(args.run, eval_uri)
    tracker = Tracker()
    with tracker.start("register", run_name="register", config={"model": args.run, "eval": eval_uri}):
        result = register_prepared(prepared, tracker, args.name)
        tracker.log_dict(result, "register/summary.json")
    print(f"registered {result['name']} v{result['version']} ({', '.join(result['aliases'])}): "
          f"{result['reason']}")
    return 0


def _models_list(args) -> int:
    from app.eval.mlflow_model import format_versions, list_versions, registry_client

    rows = list_versions(registry_client())
    print(json.dumps(rows, indent=2) if args.json else format_versions(rows))
    return 0
