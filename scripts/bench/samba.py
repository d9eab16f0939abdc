"""samba-provisioner section: grant and revoke latency, and many live leases at once.

Each lease shares its own directory under the benchmark's work directory on the
benchmark stack's smbd. Latency is the wall time of one `samba-provisioner grant` or
`revoke` command, process start included, as the interactive compute service would
see it. The bulk part grants all leases with 8 commands in parallel, checks with
`list` that all are live, logs in with smbclient through a sample of them (password
from `decode`, passed in a 0600 authentication file), then revokes them all.
"""

import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import BenchError, clean_env, run, write_private

PARALLEL_COMMANDS = 8
LOGIN_SAMPLE = 5


class Provisioner:
    def __init__(self, ctx):
        self.binary = ctx.binary("samba-provisioner")
        self.config = ctx.datanet_config("samba", ctx.work / "cache" / "samba")
        self.shares = ctx.work / "shares"
        self.work = ctx.work
        self.smb_port = ctx.env["DATANET_SMB_PORT"]

    def cmd(self, *args):
        return [str(self.binary), "--config", str(self.config), *args]

    def grant(self, directory):
        """Grants a lease on `directory`; returns (seconds, lease id, token)."""
        start = time.monotonic()
        proc = run(self.cmd("grant", "--path", str(directory), "--ttl", "30m", "--label", "bench", "--json"),
                   env=clean_env(), timeout=120)
        seconds = time.monotonic() - start
        try:
            grant = json.loads(proc.stdout)
            return seconds, grant["lease"]["id"], grant["token"]
        except (ValueError, KeyError) as err:
            raise BenchError(f"grant printed no lease JSON: {err}") from err

    def revoke(self, lease_id):
        start = time.monotonic()
        run(self.cmd("revoke", lease_id), env=clean_env(), timeout=120)
        return time.monotonic() - start

    def active_leases(self):
        proc = run(self.cmd("list", "--json"), env=clean_env(), timeout=120)
        leases = json.loads(proc.stdout)
        return [lease for lease in leases if str(lease.get("state", "")).lower() == "active"]

    def login(self, token, index):
        """Logs in through the lease of `token` with smbclient and lists its share."""
        proc = subprocess.run(self.cmd("decode", "--format", "json"), input=token, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), timeout=60)
        if proc.returncode != 0:
            raise BenchError(f"decode failed: {proc.stderr.strip()}")
        info = json.loads(proc.stdout)
        auth = self.work / f"smb-auth-{index}"
        write_private(auth, f"username = {info['account']}\npassword = {info['password']}\n")
        try:
            result = subprocess.run(
                ["smbclient", f"//127.0.0.1/{info['share']}", "-p", str(self.smb_port), "-A", str(auth),
                 "-m", "SMB3", "--client-protection=encrypt", "-c", "ls"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60, env=clean_env())
        finally:
            auth.unlink(missing_ok=True)
        return result.returncode == 0

    def share_dir(self, name):
        directory = self.shares / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hello.txt").write_text("benchmark share\n")
        return directory


def section_samba(ctx, rec):
    sizes = ctx.sizes
    rec.note(f"Latency: {sizes.latency_runs} grant and revoke pairs, one after another. Bulk: {sizes.leases} "
             f"leases granted with {PARALLEL_COMMANDS} commands in parallel, all live at once, then revoked.")
    rec.command("grant", "samba-provisioner --config BENCH.toml grant --path DIR --ttl 30m --label bench --json")
    rec.command("revoke", "samba-provisioner --config BENCH.toml revoke ID")
    prov = Provisioner(ctx)
    shutil.rmtree(prov.shares, ignore_errors=True)
    leftover = prov.active_leases()
    for lease in leftover:
        prov.revoke(lease["id"])

    def latency():
        for i in range(sizes.latency_runs):
            seconds, lease_id, _token = prov.grant(prov.share_dir(f"latency{i}"))
            rec.add("samba.grant", seconds, "s")
            rec.add("samba.revoke", prov.revoke(lease_id), "s")

    rec.attempt(["samba.grant", "samba.revoke"], latency)

    def bulk():
        directories = [prov.share_dir(f"bulk{i:03d}") for i in range(sizes.leases)]
        granted = []
        failures = []
        start = time.monotonic()
        with ThreadPoolExecutor(PARALLEL_COMMANDS) as pool:
            for future in [pool.submit(prov.grant, directory) for directory in directories]:
                try:
                    _seconds, lease_id, token = future.result()
                    granted.append((lease_id, token))
                except BenchError as err:
                    failures.append(str(err))
        elapsed = time.monotonic() - start
        try:
            if failures:
                raise BenchError(f"{len(failures)} of {len(directories)} grants failed, first: {failures[0]}")
            rec.add("samba.bulk_grant", elapsed, "s")
            rec.add("samba.live_leases", float(len(prov.active_leases())), "leases")
            sample = granted[:: max(1, len(granted) // LOGIN_SAMPLE)][:LOGIN_SAMPLE]
            logins = sum(prov.login(token, i) for i, (_id, token) in enumerate(sample))
            rec.add("samba.bulk_login", float(logins), f"of {len(sample)}")
        finally:
            start = time.monotonic()
            with ThreadPoolExecutor(PARALLEL_COMMANDS) as pool:
                list(pool.map(prov.revoke, [lease_id for lease_id, _token in granted]))
            rec.add("samba.bulk_revoke", time.monotonic() - start, "s")
        remaining = len(prov.active_leases())
        if remaining:
            rec.note(f"{remaining} leases were still active after the bulk revoke.")

    rec.attempt(["samba.bulk_grant", "samba.live_leases", "samba.bulk_login", "samba.bulk_revoke"], bulk)
    shutil.rmtree(prov.shares, ignore_errors=True)
