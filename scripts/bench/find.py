"""Metadata section: `find` with a `stat` of every entry over the small-file tree, cold and warm.

`-printf '%s %m %u'` makes find call `lstat` on every entry (size, mode, owner), as
`ls -lR`, `du` or a backup tool would. Cold is a fresh mount, and warm is the second run
right after it. Each tool keeps its own metadata cache settings, so datanet's default
`metadata_ttl` of 5 s can expire during a long cold run, while rclone's
`--dir-cache-time` is 5 min. A recursive LIST of the prefix with `rclone lsl` shows what
the store itself takes to list the tree.
"""

import time

from harness import BenchError, RequestLog, run

FIND_TOOLS = ("datanet", "rclone-full", "s3fs")


def timed_find(root, expected_files):
    start = time.monotonic()
    proc = run(["find", str(root), "-printf", "%y %s %m %u\n"], timeout=900)
    seconds = time.monotonic() - start
    files = sum(1 for line in proc.stdout.splitlines() if line.startswith("f "))
    if files != expected_files:
        raise BenchError(f"find listed {files} files under {root}, expected {expected_files}")
    return seconds


def section_find(ctx, rec):
    sizes = ctx.sizes
    expected = sizes.tree_files
    rec.note(f"Tree: {sizes.tree_dirs} directories of {sizes.tree_files_per_dir} files "
             f"({expected} files of {sizes.small_file_bytes} bytes).")
    rec.command("all mounts", "find MNT/TREE -printf '%y %s %m %u\\n'")

    def listing(_run_index):
        start = time.monotonic()
        proc = ctx.store.rclone("lsl", ctx.store.remote(ctx.tree_prefix))
        seconds = time.monotonic() - start
        if len(proc.stdout.splitlines()) != expected:
            raise BenchError(f"rclone lsl listed {len(proc.stdout.splitlines())} objects, expected {expected}")
        rec.add("find.cold.list", seconds, "s")

    def through_mount(tool, _run_index):
        requests = RequestLog(ctx.run_dir / "logs" / "garage.log")
        with ctx.mount(tool, "find") as mount:
            root = mount.root() / ctx.tree_prefix
            requests.mark()
            rec.add(f"find.cold.{tool}", timed_find(root, expected), "s")
            rec.add(f"find.lists.{tool}", float(requests.count_prefix("GET", ctx.store.bucket, None)), "LISTs")
            rec.add(f"find.heads.{tool}", float(requests.count_prefix("HEAD", ctx.store.bucket, ctx.tree_prefix)),
                    "HEADs")
            rec.add(f"find.warm.{tool}", timed_find(root, expected), "s")

    rec.command("store LIST", "rclone lsl bench:BUCKET/TREE")
    measurements = [("find.cold.list", listing)]
    for tool in FIND_TOOLS:
        keys = [f"find.cold.{tool}", f"find.warm.{tool}", f"find.lists.{tool}", f"find.heads.{tool}"]
        measurements.append((keys, lambda run_index, tool=tool: through_mount(tool, run_index)))
    rec.rounds(sizes.runs, measurements)
