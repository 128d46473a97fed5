"""`dinoctl data synth | import | info`."""

from __future__ import annotations

import json
import os

from app import storage


def register(sub) -> None:
    from app.data.decode import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE

    p = sub.add_parser("data", help="build and inspect datasets (tar shards + index)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    from app.data.synth import add_synth_args

    synth = dsub.add_parser("synth", help="generate the synthetic labelled image collection")
    add_synth_args(synth)
    synth.set_defaults(func=_synth)

    imp = dsub.add_parser("import", help="import an ImageFolder tree, loose images or tar shards")
    imp.add_argument("src", help="directory, glob (quote it) or file")
    imp.add_argument("--out", default="", help="dataset URI (default <store>/datasets/<name>)")
    imp.add_argument("--name", default="", help="dataset name (default: the input's basename)")
    imp.add_argument("--store", default="", help="store root URI used when --out is not given")
    imp.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                     help="decoding processes")
    imp.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    imp.add_argument("--shard-mb", type=int, default=256, help="maximum shard size in MB")
    imp.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                     help=f"downscale images whose longest side is above this (default "
                          f"{DEFAULT_MAX_SIDE}; 0 keeps every image at its size)")
    imp.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help=f"skip images with more pixels than this, as likely decompression "
                          f"bombs (default {DEFAULT_MAX_PIXELS:_}; 0: no limit)")
    imp.set_defaults(func=_import)

    info = dsub.add_parser("info", help="print a dataset's statistics")
    info.add_argument("uri", help="dataset URI")
    info.add_argument("--json", action="store_true", help="print _stats.json as is")
    info.set_defaults(func=_info)


def _synth(args) -> int:
    from app.data.synth import run_synth

    print(json.dumps(run_synth(args), indent=2, sort_keys=True))
    return 0


def _import(args) -> int:
    from app.errors import UserError
    from app.data.importer import import_images

    name = args.name or os.path.basename(os.path.normpath(args.src.split("*", 1)[0])) or "imported"
    out = args.out
    if not out:
        from app.config import default_store

        out = storage.join(args.store or default_store(), "datasets", name)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    for flag, value in (("--max-side", args.max_side), ("--max-pixels", args.max_pixels)):
        if value < 0:
            raise UserError(f"{flag} must be >= 0 (0: no limit), got {value}")
    stats = import_images(args.src, out, name=name, workers=args.workers,
                          max_samples_per_shard=args.shard_size,
                          max_bytes=args.shard_mb << 20, max_pixels=args.max_pixels,
                          max_side=args.max_side)
    print(f"imported {stats['num_samples']} images ({stats['num_classes']} classes, "
          f"{stats['num_skipped']} skipped) into {out}")
    return 0


def _info(args) -> int:
    from app.data.index import Dataset

    ds = Dataset(args.uri)
    s = ds.stats
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    print(f"dataset   {ds.uri}")
    print(f"created   {s.get('created_by', '?')}")
    print(f"samples   {s['num_samples']} ({s['num_labelled']} labelled) in {s['num_shards']} "
          f"shards, {s['bytes'] / 1e6:.1f} MB")
    if s.get("per_class"):
        print(f"classes   {s['num_classes']}")
        for label, cname in sorted(s["classes"].items(), key=lambda kv: int(kv[0])):
            print(f"  {int(label):>4}  {cname:<24} {s['per_class'].get(cname, 0)}")
    print(f"skipped   {s['num_skipped']}")
    for item in s.get("skipped", [])[:20]:
        print(f"  {item['source']}: {item['reason']}")
    if s["num_skipped"] > 20:
        print(f"  ... {s['num_skipped'] - 20} more (dinoctl data info --json)")
    return 0
