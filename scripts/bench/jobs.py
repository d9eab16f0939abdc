"""jobwrap sections: stage-in against `rclone copy`, and the wall time jobwrap adds to an empty job.

Stage-in is timed with `jobwrap sbatch --detach`, which returns once the inputs are
validated and staged into the job's working directory and the job is submitted. The
figure therefore includes validation and the sbatch call on top of the transfer, which
only makes it stricter against `rclone copy`. `jobwrap resume` then finishes the job
(stage-out of Slurm's logs and removal of the working directory), untimed.
"""

import json
import os
import re
import shutil
import time

from harness import BenchError, clean_env, run, timed


def jobwrap_cmd(ctx, config, *args):
    return [str(ctx.binary("jobwrap")), "--config", str(config), *args]


def write_script(ctx, name, body):
    path = ctx.work / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def slurm_env(ctx):
    return clean_env({"SLURM_CONF": ctx.env["DATANET_SLURM_CONF"]})


def section_stagein(ctx, rec):
    sizes = ctx.sizes
    store = ctx.store
    expected_files = sizes.tree_files + 1
    expected_bytes = sizes.object_bytes + sizes.tree_files * sizes.small_file_bytes
    scratch = ctx.work / "stage-dest"
    rec.note(f"Inputs: the prefix `{ctx.stage_prefix}` with one {sizes.object_mib} MiB object and "
             f"{sizes.tree_files} objects of {sizes.small_file_bytes} bytes, copied to local disk.")
    rec.command("rclone", f"rclone copy --transfers 16 bench:BUCKET/{ctx.stage_prefix} DIR")
    rec.command("jobwrap", f"jobwrap sbatch --detach --stage-in bench:{ctx.stage_prefix}=inputs "
                "--output bench:jobwrap-out/ job.sh")

    config = ctx.datanet_config("jobwrap", ctx.work / "cache" / "jobwrap")
    script = write_script(ctx, "stagein-job.sh", "ls inputs >/dev/null\n")

    def rclone(run_index):
        target = scratch / f"rclone-{run_index}"
        shutil.rmtree(target, ignore_errors=True)
        seconds = timed(["rclone", "--log-level", "ERROR", "copy", "--transfers", "16",
                         store.remote(ctx.stage_prefix), str(target)], env=store.rclone_env(), timeout=1800)
        check_tree(target, expected_files, expected_bytes)
        shutil.rmtree(target, ignore_errors=True)
        rec.add("stagein.rclone", seconds, "s")

    def jobwrap(run_index):
        start = time.monotonic()
        proc = run(jobwrap_cmd(ctx, config, "sbatch", "--detach",
                               "--stage-in", f"bench:{ctx.stage_prefix}=inputs",
                               "--output", f"bench:jobwrap-out/stagein-{run_index}/", str(script)),
                   env=slurm_env(ctx), timeout=1800)
        seconds = time.monotonic() - start
        job_id = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if not job_id:
            raise BenchError("jobwrap sbatch --detach printed no job id")
        record = json.loads(run(jobwrap_cmd(ctx, config, "status", job_id, "--json"), env=slurm_env(ctx)).stdout)
        check_tree(os.path.join(record["workdir"], "inputs"), expected_files, expected_bytes)
        run(jobwrap_cmd(ctx, config, "resume", job_id), env=slurm_env(ctx), timeout=600)
        rec.add("stagein.jobwrap", seconds, "s")

    # The two tools alternate, because both create and delete thousands of files and a
    # filesystem's inode allocation slows down right after many deletes.
    rclone_ok = jobwrap_ok = True
    for run_index in range(sizes.runs):
        if rclone_ok:
            rclone_ok = rec.attempt("stagein.rclone", lambda: rclone(run_index))
        if jobwrap_ok:
            jobwrap_ok = rec.attempt("stagein.jobwrap", lambda: jobwrap(run_index))
    shutil.rmtree(scratch, ignore_errors=True)
    store.purge("jobwrap-out")


def check_tree(root, expected_files, expected_bytes):
    files = 0
    total = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            files += 1
            total += os.lstat(os.path.join(directory, name)).st_size
    if (files, total) != (expected_files, expected_bytes):
        raise BenchError(f"{root} contains {files} files of {total} bytes, expected {expected_files} files "
                         f"of {expected_bytes} bytes")


# Slurm job states in which a job has not finished yet.
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")
POLL_INTERVAL_S = 0.25


def section_overhead(ctx, rec):
    runs = max(ctx.sizes.latency_runs, 3)
    script = write_script(ctx, "empty-job.sh", "true\n")
    rec.note(f"An empty batch script (`true`), {runs} runs each, alternating, on the otherwise idle "
             "single-node cluster of the benchmark stack. `sbatch --wait` polls the job state with an "
             "interval that grows with every poll up to 10 s (Slurm's `_job_wait` in `src/sbatch/sbatch.c`), "
             f"so a second baseline submits with `sbatch --parsable` and polls `scontrol` every "
             f"{POLL_INTERVAL_S} s: the least any wrapper that waits for the job can take.")
    rec.command("sbatch", "SLURM_CONF=... sbatch --wait --output=/dev/null empty-job.sh")
    rec.command("sbatch, polled", f"sbatch --parsable --output=/dev/null empty-job.sh, then "
                f"scontrol -o show job ID every {POLL_INTERVAL_S} s until the job is no longer active")
    rec.command("jobwrap", "jobwrap sbatch --output bench:jobwrap-out/empty-N/ empty-job.sh")

    config = None

    def sbatch():
        rec.add("jobwrap.sbatch_wait", timed(["sbatch", "--wait", "--output=/dev/null", str(script)],
                                             env=slurm_env(ctx), cwd=ctx.work, timeout=300), "s")

    def sbatch_poll():
        start = time.monotonic()
        proc = run(["sbatch", "--parsable", "--output=/dev/null", str(script)], env=slurm_env(ctx), cwd=ctx.work)
        job_id = proc.stdout.strip().split(";")[0]
        while True:
            shown = run(["scontrol", "-o", "show", "job", job_id], env=slurm_env(ctx), check=False)
            state = re.search(r"JobState=(\S+)", shown.stdout)
            if shown.returncode != 0 or (state and state.group(1) not in ACTIVE_STATES):
                break
            if time.monotonic() - start > 300:
                raise BenchError(f"Slurm job {job_id} did not finish within 300 s")
            time.sleep(POLL_INTERVAL_S)
        rec.add("jobwrap.sbatch_poll", time.monotonic() - start, "s")

    def jobwrap(run_index):
        nonlocal config
        config = config or ctx.datanet_config("jobwrap", ctx.work / "cache" / "jobwrap")
        seconds = timed(jobwrap_cmd(ctx, config, "sbatch", "--output", f"bench:jobwrap-out/empty-{run_index}/",
                                    str(script)), env=slurm_env(ctx), cwd=ctx.work, timeout=300)
        rec.add("jobwrap.empty", seconds, "s")

    # The two commands alternate, so that a drift in the machine's load hits both alike;
    # a tool that fails once is not run again.
    sbatch_ok = poll_ok = jobwrap_ok = True
    for run_index in range(runs):
        if sbatch_ok:
            sbatch_ok = rec.attempt("jobwrap.sbatch_wait", sbatch)
        if poll_ok:
            poll_ok = rec.attempt("jobwrap.sbatch_poll", sbatch_poll)
        if jobwrap_ok:
            jobwrap_ok = rec.attempt("jobwrap.empty", lambda: jobwrap(run_index))
    ctx.store.purge("jobwrap-out")
