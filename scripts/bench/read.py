"""Read sections: sequential read cold and warm, random 4 KiB reads, and the cache limit.

"Cold" means a fresh mount with an empty cache directory, so neither the tool's disk
cache nor the kernel's page cache of the FUSE file contains any byte. Garage's own data
files may sit in the server's page cache for every tool alike; the direct GET shows
what that server delivers. Each mount, and the direct GET, starts after a `sync`, so
that data an earlier tool left dirty is not written out during the next measurement. "Warm" is a second read through the same mount.
"""

import os
import random
import re
import time

from harness import MIB, BenchError, RequestLog, Sampler, read_status_kib, run
from data import warm_local

MOUNT_TOOLS = ("datanet", "rclone-full", "s3fs")


def dd_read(path, expected_bytes):
    """Reads `path` with dd in 1 MiB blocks; returns seconds and checks the byte count."""
    start = time.monotonic()
    proc = run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], timeout=900)
    seconds = time.monotonic() - start
    match = re.search(r"^(\d+) bytes", proc.stderr, re.MULTILINE)
    got = int(match.group(1)) if match else -1
    if got != expected_bytes:
        raise BenchError(f"read {got} bytes of {path}, expected {expected_bytes}")
    return seconds


def resident_mib(path):
    """MiB of `path` in the page cache, from `fincore`, or None where it cannot tell."""
    proc = run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], check=False)
    fields = proc.stdout.split()
    if proc.returncode != 0 or not fields or not fields[0].isdigit():
        return None
    return int(fields[0]) / MIB


def check_content(path, reference, size_bytes):
    """Compares the first and last MiB and one in the middle with the local reference file."""
    with open(path, "rb") as mounted, open(reference, "rb") as local:
        for offset in (0, (size_bytes // 2) & ~(MIB - 1), size_bytes - MIB):
            mounted.seek(offset)
            local.seek(offset)
            if mounted.read(MIB) != local.read(MIB):
                raise BenchError(f"content of {path} at offset {offset} differs from the uploaded data")


def section_read(ctx, rec):
    sizes = ctx.sizes
    size = sizes.object_bytes
    rec.note(f"Object: {sizes.object_mib} MiB of random data, read with `dd bs=1M` to /dev/null.")

    def local(_run_index):
        rec.add("read.warm.local", dd_read(ctx.local_object, size), "s")

    def direct(_run_index):
        os.sync()
        seconds, got = ctx.store.get_to_null(ctx.object_key)
        if got != size:
            raise BenchError(f"GET returned {got} bytes, expected {size}")
        rec.add("read.cold.direct", seconds, "s")

    rec.command("local page cache", f"dd if={ctx.local_object} of=/dev/null bs=1M   (after one read to warm it)")
    rec.command("direct GET", "curl -K AUTH --aws-sigv4 aws:amz:garage:s3 "
                "-H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' -o /dev/null ENDPOINT/BUCKET/KEY")
    measurements = [("read.warm.local", local), ("read.cold.direct", direct)]
    for tool in MOUNT_TOOLS:
        keys = [f"read.cold.{tool}", f"read.warm.{tool}", f"read.rss.{tool}", f"read.cache_peak.{tool}",
                f"read.gets.{tool}", f"read.resident.{tool}"]
        measurements.append((keys, lambda run_index, tool=tool: read_through_mount(ctx, rec, tool, run_index)))
    if rec.attempt("read.warm.local", lambda: warm_local(ctx.local_object)):
        rec.rounds(sizes.runs, measurements)
    rec.command("datanet", "datanet mount --config BENCH.toml --foreground MNT   (cache.max_size default)")
    rec.command("rclone-full", "rclone mount bench:BUCKET MNT --vfs-cache-mode full --cache-dir DIR")
    rec.command("s3fs", "s3fs BUCKET MNT -f -o passwd_file=FILE,url=ENDPOINT,use_path_request_style,"
                "endpoint=garage,sigv4")


def read_through_mount(ctx, rec, tool, run_index):
    size = ctx.sizes.object_bytes
    mount = ctx.mount(tool, "read")
    with mount:
        path = mount.root() / ctx.object_key
        sampler = Sampler(pid=mount.pid, directory=mount.cache_dir)
        requests = RequestLog(ctx.run_dir / "logs" / "garage.log")
        sampler.start()
        try:
            requests.mark()
            cold = dd_read(path, size)
            cold_gets = requests.count("GET", ctx.store.bucket, ctx.object_key)
            resident = resident_mib(path)
            warm = dd_read(path, size)
        finally:
            sampler.stop()
        peak_kib = max(sampler.peak_rss_kib, read_status_kib(mount.pid, "VmHWM") or 0)
        if run_index == 0:
            check_content(path, ctx.local_object, size)
    rec.add(f"read.cold.{tool}", cold, "s")
    rec.add(f"read.warm.{tool}", warm, "s")
    rec.add(f"read.rss.{tool}", peak_kib / 1024, "MiB")
    rec.add(f"read.gets.{tool}", float(cold_gets), "GETs")
    if resident is not None:
        rec.add(f"read.resident.{tool}", resident, "MiB")
    if mount.cache_dir is not None:
        rec.add(f"read.cache_peak.{tool}", sampler.peak_dir_bytes / MIB, "MiB")


# ---------------------------------------------------------------------------


def random_reads(path, size_bytes, seconds, max_reads, seed, block=4096):
    """Random aligned `block`-byte preads until `seconds` pass or `max_reads` are done."""
    rng = random.Random(seed)
    blocks = size_bytes // block
    fd = os.open(path, os.O_RDONLY)
    try:
        count = 0
        start = time.monotonic()
        deadline = start + seconds
        while count < max_reads and time.monotonic() < deadline:
            data = os.pread(fd, block, rng.randrange(blocks) * block)
            if len(data) != block:
                raise BenchError(f"short read of {len(data)} bytes from {path}")
            count += 1
        return count / (time.monotonic() - start)
    finally:
        os.close(fd)


def section_random(ctx, rec):
    sizes = ctx.sizes
    rec.note(f"Random aligned 4 KiB `pread` calls on the {sizes.object_mib} MiB object through a fresh mount, "
             f"one thread, for {sizes.random_seconds:g} s or {sizes.random_max_reads} reads, whichever comes first.")

    def through_mount(tool, run_index):
        with ctx.mount(tool, "random") as mount:
            rate = random_reads(mount.root() / ctx.object_key, sizes.object_bytes,
                                sizes.random_seconds, sizes.random_max_reads, seed=run_index)
        rec.add(f"random.{tool}", rate, "reads/s")

    def direct(run_index):
        count = min(sizes.random_max_reads, 300)
        seconds = ctx.store.random_range_gets_new_connections(ctx.object_key, sizes.object_bytes, count, 4096,
                                                              seed=run_index)
        rec.add("random.direct", count / seconds, "reads/s")

    def direct_keepalive(run_index):
        count = min(sizes.random_max_reads, 200)
        seconds = ctx.store.random_range_gets(ctx.object_key, sizes.object_bytes, count, 4096, seed=run_index)
        rec.add("random.direct_keepalive", count / seconds, "reads/s")

    rec.command("direct", "curl -K AUTH --aws-sigv4 aws:amz:garage:s3 -r START-END -o /dev/null URL   "
                "(one process and connection per read)")
    rec.command("direct, kept-alive", "curl -K RANGES.conf   (one process, one kept-alive connection, "
                "the ranges separated by next)")
    measurements = [(f"random.{tool}", lambda run_index, tool=tool: through_mount(tool, run_index))
                    for tool in MOUNT_TOOLS]
    measurements += [("random.direct", direct), ("random.direct_keepalive", direct_keepalive)]
    rec.rounds(sizes.runs, measurements)


# ---------------------------------------------------------------------------


def section_cache(ctx, rec):
    sizes = ctx.sizes
    limit = f"{sizes.cache_limit_mib}MiB"
    ranges = min(2 * sizes.cache_limit_mib, sizes.object_mib)
    rec.note(f"datanet with `[cache] max_size = \"{limit}\"` reads the {sizes.object_mib} MiB object twice "
             "and drops the file from the page cache (`posix_fadvise` `DONTNEED`). "
             f"It then reads {ranges} distinct random 1 MiB ranges, twice the limit, so every range is a "
             "demand read that enters the cache and evicts older blocks. "
             "The cache directory's disk usage (allocated blocks) is sampled every 0.1 s.")
    rec.command("datanet", f"datanet mount --config BENCH.toml --foreground MNT   ([cache] max_size = \"{limit}\")")

    def measure():
        mount = ctx.mount("datanet", "cache", cache_max_size=limit)
        with mount:
            path = mount.root() / ctx.object_key
            sampler = Sampler(pid=mount.pid, directory=mount.cache_dir, interval_s=0.1)
            sampler.start()
            try:
                dd_read(path, sizes.object_bytes)
                dd_read(path, sizes.object_bytes)
                rng = random.Random(7)
                with open(path, "rb") as handle:
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    for index in rng.sample(range(sizes.object_mib), ranges):
                        os.pread(handle.fileno(), MIB, index * MIB)
            finally:
                sampler.stop()
        rec.add("cache.peak", sampler.peak_dir_bytes / MIB, "MiB")
        rec.add("cache.peak_apparent", sampler.peak_dir_apparent_bytes / MIB, "MiB")
        rec.add("cache.limit", float(sizes.cache_limit_mib), "MiB")
        rec.add("cache.rss", sampler.peak_rss_kib / 1024, "MiB")

    rec.attempt(["cache.peak", "cache.peak_apparent", "cache.limit", "cache.rss"], measure)
