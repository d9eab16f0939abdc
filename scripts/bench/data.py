"""Test data: one large random object, a tree of small files and the stage-in prefix.

Each item is made once on local disk and uploaded once. Later runs find it in the bucket
(same key and size, or same object count) and reuse it, so a run spends its time on
measurements. The stage-in prefix is a server-side copy of the two.
"""

import os
import random

from harness import MIB, BenchError, timed


def prepare(ctx, log):
    sizes = ctx.sizes
    store = ctx.store

    if not ctx.local_object.exists() or ctx.local_object.stat().st_size != sizes.object_bytes:
        log(f"writing {sizes.object_mib} MiB of random data to {ctx.local_object}")
        write_random_file(ctx.local_object, sizes.object_bytes)
    if store.head_size(ctx.object_key) != sizes.object_bytes:
        log(f"uploading {ctx.object_key}")
        store.rclone("copyto", str(ctx.local_object), store.remote(ctx.object_key))
        if store.head_size(ctx.object_key) != sizes.object_bytes:
            raise BenchError(f"uploaded {ctx.object_key} but the store does not report {sizes.object_bytes} bytes")

    if count_files(ctx.local_tree) != sizes.tree_files:
        log(f"writing a tree of {sizes.tree_files} small files to {ctx.local_tree}")
        write_tree(ctx.local_tree, sizes)
    if store.count_objects(ctx.tree_prefix) != sizes.tree_files:
        log(f"uploading {ctx.tree_prefix} ({sizes.tree_files} objects)")
        store.rclone("copy", "--transfers", "16", str(ctx.local_tree), store.remote(ctx.tree_prefix))
        if store.count_objects(ctx.tree_prefix) != sizes.tree_files:
            raise BenchError(f"uploaded {ctx.tree_prefix} but the store does not list {sizes.tree_files} objects")

    stage_big = ctx.stage_prefix + "big.bin"
    if store.head_size(stage_big) != sizes.object_bytes:
        log(f"copying {ctx.object_key} to {stage_big} in the store")
        store.rclone("copyto", store.remote(ctx.object_key), store.remote(stage_big))
    stage_small = ctx.stage_prefix + "small/"
    if store.count_objects(stage_small) != sizes.tree_files:
        log(f"copying {ctx.tree_prefix} to {stage_small} in the store")
        store.rclone("copy", "--transfers", "16", store.remote(ctx.tree_prefix), store.remote(stage_small))


def write_random_file(path, size_bytes):
    tmp = path.with_suffix(".tmp")
    with open("/dev/urandom", "rb") as source, open(tmp, "wb") as target:
        remaining = size_bytes
        while remaining:
            chunk = source.read(min(remaining, 4 * MIB))
            target.write(chunk)
            remaining -= len(chunk)
    os.replace(tmp, path)


def write_tree(root, sizes):
    rng = random.Random(5000)
    for d in range(sizes.tree_dirs):
        directory = root / f"d{d:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        for f in range(sizes.tree_files_per_dir):
            (directory / f"f{f:04d}.dat").write_bytes(rng.randbytes(sizes.small_file_bytes))


def count_files(root):
    if not root.is_dir():
        return 0
    return sum(len(files) for _root, _dirs, files in os.walk(root))


def warm_local(path):
    """Reads a local file once so that the next read comes from the page cache."""
    timed(["cat", str(path)], capture=False)
