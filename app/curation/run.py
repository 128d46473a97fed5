"""The curation job: `torchrun -m app.entry curate <stage> --config <yaml> [--set k=v ...]`.

Stages: embed | dedup | retrieve | cluster | materialize | report | run (the configured stages,
then report). A stage whose `_SUCCESS` exists is skipped (`--force` recomputes it). Embedding is
split over ranks by shard, dedup by query rows and cluster by data rows (app.curation.stages);
retrieve, materialize and report run on rank 0 while the other ranks wait.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from app.curation.artifacts import CurationRun, set_name
from app.curation.comm import Comm

log = logging.getLogger(__name__)

STAGE_DIR = {"embed": "embeddings", "dedup": "dedup", "retrieve": "retrieval", "cluster": "clusters",
             "materialize": "selection", "report": "report"}
STAGES = tuple(STAGE_DIR)


def input_sets(cfg: Any) -> list[tuple[str, str]]:
    """(set name, dataset URI) of everything to embed: pool, seed sets, evaluation sets."""
    c = cfg.curation
    if not c.pool:
        from app.config import ConfigError

        raise ConfigError("'curation.pool' must name the pool dataset URI")
    sets = [("pool", c.pool)]
    sets += [(set_name("seed", i, u), u) for i, u in enumerate(c.seeds)]
    sets += [(set_name("eval", i, u), u) for i, u in enumerate(c.eval_sets)]
    return sets


def stage_embed(run: CurationRun, cfg: Any, comm: Comm) -> dict[str, Any]:
    from app.curation.embed import embed_dataset, ensure_copy_head, uses_copy_head

    rank, world = comm.rank, comm.world
    head = ensure_copy_head(run, cfg, comm) if uses_copy_head(cfg) else None
    results = {name: embed_dataset(run, name, uri, cfg, rank, world, copy_head=head)
               for name, uri in input_sets(cfg)}
    gathered = comm.gather(results)
    summary = {"stage": "embed", "world_size": world, "sets": {}}
    for name, uri in input_sets(cfg):
        parts = [g[name] for g in gathered]
        secs = max(p["seconds"] for p in parts)
        images = sum(p["images"] for p in parts)
        summary["sets"][name] = {"dataset": parts[0]["dataset"], "shards": sum(p["shards"] for p in parts),
                                 "images": images, "corrupt": sum(p["corrupt"] for p in parts),
                                 "shards_skipped": sum(p["shards_skipped"] for p in parts),
                                 "images_per_s": round(images / max(secs, 1e-9), 2)}
    if rank == 0:
        # counts of parts embedded earlier come from the parts themselves, so reruns add up
        from app.curation.embed import load_set

        for name, uri in input_sets(cfg):
            data = load_set(run, name, uri)
            summary["sets"][name]["images"] = int(len(data["keys"]))
            summary["sets"][name]["corrupt"] = int(len(data["corrupt"]))
            summary["sets"][name]["dim"] = int(data["embeddings"].shape[1]) if data["embeddings"].size else 0
            if "copy" in data:
                summary["sets"][name]["copy_dim"] = int(data["copy"].shape[1])
        if head is not None:
            from app import storage

            summary["copy_head"] = storage.get_json(run.uri("embeddings", "copy_head.json"))
        run.mark_done("embeddings", summary)
    return summary


def run_stage(stage: str, cfg: Any, tracker: Any, force: bool = False) -> dict[str, Any] | None:
    from app.curation.materialize import run_materialize
    from app.curation.report import run_report
    from app.curation.stages import run_cluster, run_dedup, run_retrieve

    comm = Comm.from_env()
    rank = comm.rank
    run = CurationRun(cfg.run.store, cfg.run.name)
    # Rank 0's view decides, so no rank skips a stage another rank is about to run (deadlock).
    done = comm.gather(run.done(STAGE_DIR[stage]) and not force)[0]
    if done:
        log.info("curate %s: already done (%s), skipping", stage, run.uri(STAGE_DIR[stage]))
        return run.summary(STAGE_DIR[stage])
    if force and rank == 0:  # nothing an earlier attempt left may be reused either: embedding
        from app import storage  # parts and the copy head, dedup's per-rank parts

        leftovers = run.uri(STAGE_DIR[stage]) if stage == "embed" else run.uri(STAGE_DIR[stage], "parts")
        storage.delete_prefix(leftovers)
    comm.barrier()
    if stage == "embed":
        summary = stage_embed(run, cfg, comm)
    elif stage in ("dedup", "cluster"):  # every rank takes a share
        summary = (run_dedup if stage == "dedup" else run_cluster)(run, cfg, comm)
    elif rank == 0:
        fn = {"retrieve": run_retrieve, "materialize": run_materialize}.get(stage)
        summary = fn(run, cfg) if fn else run_report(run, cfg, tracker)
    else:
        summary = None
    comm.barrier()
    if summary is not None and rank == 0 and stage != "report":
        tracker.log_summary({k: v for k, v in summary.items() if not k.startswith("leaf_sizes")},
                            f"curation/{stage}.json")
    return summary


def curate(stage: str, cfg: Any, force: bool = False) -> dict[str, Any]:
    """Run one stage, or all configured stages then the report (stage "run")."""
    from app.tracking import get_tracker

    stages = ([s for s in cfg.curation.stages if s in STAGES and s != "report"] + ["report"]
              if stage == "run" else [stage])
    unknown = [s for s in cfg.curation.stages if s not in STAGES]
    if unknown:
        from app.config import ConfigError

        raise ConfigError(f"'curation.stages' has unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    results = {}
    with get_tracker().start(f"curate-{stage}", config=cfg) as tracker:
        for s in stages:
            if s == "retrieve" and not cfg.curation.seeds:
                log.info("curate retrieve: no seed sets configured, skipping")
                continue
            results[s] = run_stage(s, cfg, tracker, force=force)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description="curation stages")
    p.add_argument("stage", nargs="?", default="run", choices=(*STAGES, "run"),
                   help="one stage, or run (the default): every configured stage")
    p.add_argument("--config", default="curate_lvd", help="preset name or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="recompute even if the stage is done")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`app.entry curate [<stage>|run] --config ...`; the entry's own stage name is dropped."""
    if argv and argv[0] == "curate":  # `python -m app.entry curate ...` passes the stage name
        argv = argv[1:]
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from app.config import load_config

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    curate(args.stage, cfg, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
