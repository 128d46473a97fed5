"""`dinoctl data import`: images on disk (or existing tar shards) into a dataset.

Inputs, detected from what the path holds:
- an ImageFolder tree `root/<class>/**/<image>`: class folders in sorted order are labels 0..C-1;
  images directly under `root` are kept unlabelled;
- loose images (a folder without class folders, a glob, one file): unlabelled;
- WebDataset tar shards (a folder or glob of `.tar`): samples keep the labels in their `.json`.

Every input is fully decoded once. Corrupt or unreadable images and non-image files are skipped
and listed with a reason in `_stats.json`; nothing else is dropped. JPEGs are stored unchanged,
other formats re-encoded as JPEG. Files are processed in sorted order, so the output does not
depend on the file system or the number of workers; at most a small window of decoded files is
in memory at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import glob
import hashlib
import logging
import os
import re
from collections import deque
from typing import Any, Iterator

from app import storage
from app.data.decode import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, IMAGE_EXTENSIONS, CorruptImage,
                             ImageInfo, to_stored_jpeg)
from app.data.shards import ShardWriter, is_valid_key, iter_tar_samples

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def store_image(writer: ShardWriter, key: str, data: bytes, meta: dict[str, Any],
                max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE) -> bool:
    """Validate `data` and write it (as JPEG, downscaled to `max_side`) under `key`, or record
    it as skipped."""
    source = meta.get("source") or key
    try:
        stored, info = to_stored_jpeg(data, name=source, max_pixels=max_pixels, max_side=max_side)
    except CorruptImage as exc:
        writer.skip(source, exc.reason)
        return False
    _write_prepared(writer, key, stored, info, meta)
    return True


def _write_prepared(writer: ShardWriter, key: str, stored: bytes, info: ImageInfo, meta: dict) -> None:
    meta = {**meta, "width": info.width, "height": info.height}
    if info.format != "JPEG":
        meta["orig_format"] = info.format.lower()
    if info.original_size:
        meta["orig_width"], meta["orig_height"] = info.original_size
    writer.write(key, stored, meta)


class KeyMaker:
    """Sample keys from relative paths: safe characters only, unique, stable for a given input."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, rel_path: str) -> str:
        stem = rel_path.rsplit(".", 1)[0] if "." in os.path.basename(rel_path) else rel_path
        key = _UNSAFE.sub("_", stem).strip("_") or "img"
        if len(key) > 150 or key in self.used or not is_valid_key(key):
            key = f"{key[:150]}_{hashlib.sha1(rel_path.encode()).hexdigest()[:10]}"
        self.used.add(key)
        return key


# ----------------------------------------------------------------------------------------------
# Discovering the input
# ----------------------------------------------------------------------------------------------


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _walk(root: str) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def discover(src: str) -> tuple[str, str, list[str]]:
    """(`mode`, root, relative file paths) with mode `imagefolder`, `images` or `shards`."""
    if os.path.isdir(src):
        root = os.path.abspath(src)
        files = _walk(root)
    elif os.path.isfile(src):
        root, files = os.path.dirname(os.path.abspath(src)), [os.path.basename(src)]
    else:
        matches = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"{src}: no such file, directory or matching files")
        paths = [os.path.abspath(p) for p in matches]
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        files = [os.path.relpath(p, root) for p in paths]
    if not files:
        raise FileNotFoundError(f"{src}: no files to import")
    tars = [f for f in files if f.lower().endswith(".tar")]
    if tars and not any(_is_image(f) for f in files):
        return "shards", root, files
    if os.path.isdir(src) and any(os.sep in f and _is_image(f) for f in files):
        return "imagefolder", root, files
    return "images", root, files


# ----------------------------------------------------------------------------------------------
# Importing
# ----------------------------------------------------------------------------------------------


def _prepare_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_side: int = DEFAULT_MAX_SIDE) -> tuple[bytes, ImageInfo] | str:
    """Worker: read and validate one file. Returns (jpeg, info) or the reason it is skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    try:
        stored, info = to_stored_jpeg(data, name=path, max_pixels=max_pixels, max_side=max_side)
    except CorruptImage as exc:
        return exc.reason
    return stored, info


def _prepared(paths: list[str], workers: int, **limits) -> Iterator[tuple[bytes, ImageInfo] | str]:
    """`_prepare_file` over `paths` in order, with a bounded window of work in flight."""
    prepare = functools.partial(_prepare_file, **limits)
    if workers <= 1:
        for p in paths:
            yield prepare(p)
        return
    window = workers * 8
    with cf.ProcessPoolExecutor(workers) as pool:
        pending: deque[cf.Future] = deque()
        it = iter(paths)
        for p in it:
            pending.append(pool.submit(prepare, p))
            if len(pending) >= window:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(prepare, nxt))


def import_images(src: str, out_uri: str, name: str | None = None, workers: int = 1,
                  max_samples_per_shard: int = 1000, max_bytes: int = 256 << 20,
                  max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE) -> dict[str, Any]:
    """Import `src` (folder, glob, file or tar shards) into a dataset at `out_uri`; return stats.

    Images above `max_pixels` are skipped (likely decompression bombs); those whose longest side
    is above `max_side` are downscaled to it (0: never), their input size kept as orig_width/height.
    """
    if max_pixels < 0 or max_side < 0:
        raise ValueError(f"max_pixels and max_side must be >= 0, got {max_pixels} and {max_side}")
    mode, root, files = discover(src)
    log.info("import %s: %s with %d files -> %s", src, mode, len(files), out_uri)
    limits = {"max_pixels": max_pixels, "max_side": max_side}
    extra = {"input": src, "input_mode": mode, **limits}
    with ShardWriter(out_uri, max_samples_per_shard, max_bytes,
                     created_by=f"dinoctl data import ({mode})", name=name,
                     extra_stats=extra) as writer:
        if mode == "shards":
            _import_shards(writer, root, files, **limits)
        else:
            _import_files(writer, root, files, labelled=mode == "imagefolder", workers=workers, **limits)
    return writer.stats


def _import_files(writer: ShardWriter, root: str, files: list[str], labelled: bool,
                  workers: int, **limits) -> None:
    images = []
    for rel in files:
        if _is_image(rel):
            images.append(rel)
        else:
            writer.skip(rel, f"not an image file (extension '{os.path.splitext(rel)[1]}')")
    classes = sorted({rel.split(os.sep, 1)[0] for rel in images if os.sep in rel})
    if not labelled:
        classes = []
    label_of = {c: i for i, c in enumerate(classes)}
    keys = KeyMaker()
    paths = [os.path.join(root, rel) for rel in images]
    for rel, result in zip(images, _prepared(paths, workers, **limits)):
        if isinstance(result, str):
            writer.skip(rel, result)
            continue
        stored, info = result
        cls = rel.split(os.sep, 1)[0] if os.sep in rel and labelled else None
        meta = {"label": label_of.get(cls) if cls else None, "label_name": cls,
                "source": rel.replace(os.sep, "/")}
        _write_prepared(writer, keys(rel.replace(os.sep, "/")), stored, info, meta)


def _import_shards(writer: ShardWriter, root: str, files: list[str], **limits) -> None:
    keys = KeyMaker()
    for rel in files:
        if not rel.lower().endswith(".tar"):
            writer.skip(rel, "not a tar shard")
            continue
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                for sample in iter_tar_samples(f, source=rel):
                    source = f"{rel}:{sample.key}"
                    if not sample.image_bytes:
                        writer.skip(source, "no image member in the tar sample")
                        continue
                    meta = {k: v for k, v in sample.meta.items()
                            if k not in ("key", "width", "height", "orig_format", "orig_width",
                                         "orig_height", "source")}
                    meta["source"] = source
                    label = meta.get("label")
                    if label is not None and not isinstance(label, int):
                        writer.skip(source, f"label {label!r} is not an integer")
                        continue
                    store_image(writer, keys(f"{sample.key}"), sample.image_bytes, meta, **limits)
        except storage.StorageError as exc:
            writer.skip(rel, str(exc).split(": ", 1)[-1])
