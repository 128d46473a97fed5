"""`dinoctl storage ls|cp|cat`: look at and move objects on file:// and s3:// stores."""

from __future__ import annotations

import sys

from app import storage


def register(sub) -> None:
    p = sub.add_parser("storage", help="list, copy and print objects (file:// or s3://)")
    ssub = p.add_subparsers(dest="storage_command", metavar="ACTION", required=True)

    ls = ssub.add_parser("ls", help="list objects under a prefix")
    ls.add_argument("uri", help="s3://bucket/prefix, file:///dir or a local path")
    ls.add_argument("-r", "--recursive", action="store_true", help="list the whole tree")
    ls.set_defaults(func=_ls)

    cp = ssub.add_parser("cp", help="copy an object (or a prefix with -r) between paths and URIs")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy every object under src")
    cp.set_defaults(func=_cp)

    cat = ssub.add_parser("cat", help="write an object to stdout")
    cat.add_argument("uri")
    cat.set_defaults(func=_cat)


def _ls(args) -> int:
    for obj in storage.list_objects(args.uri, recursive=args.recursive):
        if obj.uri.endswith("/"):
            print(f"{'DIR':>12}  {obj.uri}")
        else:
            print(f"{obj.size:>12}  {obj.uri}")
    return 0


def copy_tree(src: str, dst: str) -> int:
    """Copy every object under prefix `src` to the same relative key under `dst`; returns the count."""
    src_uri = storage.to_uri(src).rstrip("/")
    dst_uri = storage.to_uri(dst).rstrip("/")
    count = 0
    for obj in storage.list_objects(src_uri, recursive=True):
        rel = obj.uri[len(src_uri):]
        # Inside the "directory" src, or (a name-prefix match) beside it: keep the name then.
        rel = rel[1:] if rel.startswith("/") else src_uri.rsplit("/", 1)[-1] + rel
        storage.copy(obj.uri, storage.join(dst_uri, rel))
        count += 1
    return count


def _cp(args) -> int:
    if args.recursive:
        n = copy_tree(args.src, args.dst)
        if n == 0:
            raise storage.NotFound(f"{storage.to_uri(args.src)}: no objects under this prefix")
        print(f"copied {n} object{'s' if n != 1 else ''} to {storage.to_uri(args.dst)}", file=sys.stderr)
        return 0
    dst = args.dst
    if dst.endswith("/"):  # `cp x s3://b/dir/` means `s3://b/dir/x`, like cp and aws s3 cp
        dst = storage.join(dst, storage.to_uri(args.src).rstrip("/").rsplit("/", 1)[-1])
    storage.copy(args.src, dst)
    return 0


def _cat(args) -> int:
    out = sys.stdout.buffer
    with storage.open_read(args.uri) as f:
        while block := f.read(1 << 20):
            out.write(block)
    out.flush()
    return 0
