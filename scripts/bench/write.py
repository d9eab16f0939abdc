"""Write section: a large sequential write until durable, and creating many small files.

Each figure runs from the first `open` to the moment the store has the data. Tools that
upload on `close` (datanet with its default `write_back_delay = 0`, s3fs, rclone with
`--vfs-cache-mode off`) have the data in the store when `close` returns. For write-back
modes (rclone `--vfs-cache-mode full`) the store is polled with HEAD or LIST, and the
figure ends at the first poll that finds everything. Both times are recorded.
"""

import errno
import os
import time

from harness import MIB, BenchError

WRITE_TOOLS = ("datanet", "s3fs", "rclone-off", "rclone-full")
POLL_TIMEOUT_S = 300


def wait_visible(probe, timeout_s=POLL_TIMEOUT_S):
    """Polls `probe()` until true; returns the monotonic start time of the first successful poll."""
    deadline = time.monotonic() + timeout_s
    while True:
        started = time.monotonic()
        if probe():
            return started
        if started > deadline:
            raise BenchError(f"data not visible in the store {timeout_s}s after close")
        time.sleep(0.05)


def write_file(path, payload, chunk_bytes=MIB):
    """Writes `payload`, then fsyncs and closes; returns the time when the last `write` returned."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(payload)
        for offset in range(0, len(payload), chunk_bytes):
            os.write(fd, view[offset:offset + chunk_bytes])
        written = time.monotonic()
        try:
            os.fsync(fd)
        except OSError as err:
            if err.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    finally:
        os.close(fd)
    return written


def section_write(ctx, rec):
    sizes = ctx.sizes
    payload_bytes = sizes.write_mib * MIB
    with open(ctx.local_object, "rb") as source:
        payload = source.read(payload_bytes)
    small = os.urandom(sizes.small_file_bytes)
    rec.note(f"Large write: {sizes.write_mib} MiB in 1 MiB `write` calls, then `fsync` and `close`. "
             f"Small files: {sizes.create_files} new files of {sizes.small_file_bytes} bytes each in a new "
             "directory (`open`, `write`, `close`), one after another.")

    def direct():
        local = ctx.data / f"write-{sizes.write_mib}MiB.bin"
        local.write_bytes(payload)
        for run_index in range(sizes.runs):
            key = f"write/direct/run{run_index}.bin"
            rec.add("write.large.direct", ctx.store.put_file(key, local), "s")
            if ctx.store.head_size(key) != payload_bytes:
                raise BenchError(f"PUT of {key} did not store {payload_bytes} bytes")

    rec.command("direct PUT", "curl -K AUTH --aws-sigv4 aws:amz:garage:s3 "
                "-H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' -T FILE ENDPOINT/BUCKET/KEY   (one stream)")
    rec.attempt("write.large.direct", direct)

    for tool in WRITE_TOOLS:
        keys = [f"write.large.{tool}", f"write.large_writes.{tool}", f"write.large_close.{tool}",
                f"write.small.{tool}", f"write.small_close.{tool}"]
        rec.attempt(keys, lambda tool=tool: write_through_mount(ctx, rec, tool, payload, small))
    rec.command("rclone-off", "rclone mount bench:BUCKET MNT --vfs-cache-mode off")
    rec.command("rclone-full", "rclone mount bench:BUCKET MNT --vfs-cache-mode full --cache-dir DIR")
    ctx.store.purge("write")


def write_through_mount(ctx, rec, tool, payload, small):
    sizes = ctx.sizes
    store = ctx.store
    stamp = time.strftime("%H%M%S")
    with ctx.mount(tool, "write") as mount:
        for run_index in range(sizes.runs):
            prefix = f"write/{tool}-{stamp}/run{run_index}"
            directory = mount.root() / prefix
            directory.mkdir(parents=True)

            key = f"{prefix}/large.bin"
            start = time.monotonic()
            written = write_file(directory / "large.bin", payload)
            closed = time.monotonic()
            visible = wait_visible(lambda: store.head_size(key) == len(payload))
            rec.add(f"write.large_writes.{tool}", written - start, "s")
            rec.add(f"write.large_close.{tool}", closed - start, "s")
            rec.add(f"write.large.{tool}", max(visible, closed) - start, "s")

            small_dir = directory / "small"
            small_dir.mkdir()
            start = time.monotonic()
            for i in range(sizes.create_files):
                with open(small_dir / f"file{i:04d}.dat", "wb") as handle:
                    handle.write(small)
            closed = time.monotonic()
            visible = wait_visible(lambda: store.count_objects(f"{prefix}/small/") >= sizes.create_files)
            rec.add(f"write.small_close.{tool}", closed - start, "s")
            rec.add(f"write.small.{tool}", max(visible, closed) - start, "s")
