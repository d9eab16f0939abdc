"""The settings of one benchmark run: sizes, paths, binaries, the store and datanet's configuration.

A full run uses the sizes that the published targets name (a 1 GiB object, a 5,000-file
tree, a 256 MiB write, 500 small files, 200 leases). `--quick` shrinks every size and
takes one run per figure, for iterating on the script itself; its figures are not
comparable with a full run.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from harness import MIB, Store


@dataclass(frozen=True)
class Sizes:
    object_mib: int
    tree_dirs: int
    tree_files_per_dir: int
    small_file_bytes: int
    write_mib: int
    create_files: int
    runs: int
    random_seconds: float
    random_max_reads: int
    cache_limit_mib: int
    leases: int
    latency_runs: int

    @property
    def object_bytes(self):
        return self.object_mib * MIB

    @property
    def tree_files(self):
        return self.tree_dirs * self.tree_files_per_dir


FULL = Sizes(object_mib=1024, tree_dirs=50, tree_files_per_dir=100, small_file_bytes=4096,
             write_mib=256, create_files=500, runs=5, random_seconds=10.0, random_max_reads=3000,
             cache_limit_mib=256, leases=200, latency_runs=5)

QUICK = Sizes(object_mib=128, tree_dirs=10, tree_files_per_dir=50, small_file_bytes=4096,
              write_mib=32, create_files=50, runs=1, random_seconds=3.0, random_max_reads=500,
              cache_limit_mib=32, leases=10, latency_runs=2)

BUCKET = "datanet-bench"
SPACE = "bench"

# Samba account and share names of the benchmark's leases start with this, so that the
# provisioner's reconcile never touches accounts that other provisioner instances on
# this machine created with the default prefix.
LEASE_ACCOUNT_PREFIX = "dnbench"


class Context:
    """Everything a section needs: sizes, the store, binaries, directories and configs."""

    def __init__(self, repo, run_dir, quick, binaries):
        self.repo = Path(repo)
        self.run_dir = Path(run_dir)
        self.quick = quick
        self.sizes = QUICK if quick else FULL
        self.work = self.run_dir / "bench"
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.mounts = self.work / "mnt"
        self.mounts.mkdir(exist_ok=True)
        self.data = self.work / "data"
        self.data.mkdir(exist_ok=True)
        self.binaries = binaries

        env = read_env_file(self.run_dir / "env.sh")
        self.env = env
        self.store = Store(
            endpoint=env["DATANET_S3_ENDPOINT"],
            region=env["DATANET_S3_REGION"],
            bucket=BUCKET,
            access_key_id=env["DATANET_S3_ACCESS_KEY_ID"],
            secret_file=Path(env["DATANET_S3_SECRET_FILE"]),
            work_dir=self.work,
        )

    # Names of the test data in the bucket and on local disk.

    @property
    def object_key(self):
        return f"seq/object-{self.sizes.object_mib}MiB.bin"

    @property
    def local_object(self):
        return self.data / f"object-{self.sizes.object_mib}MiB.bin"

    @property
    def tree_prefix(self):
        return f"tree-{self.sizes.tree_files}/"

    @property
    def local_tree(self):
        return self.data / f"tree-{self.sizes.tree_files}"

    @property
    def stage_prefix(self):
        return f"stage-{self.sizes.object_mib}MiB-{self.sizes.tree_files}/"

    def binary(self, name):
        """Path of a freshly built binary, or raises BenchError with the build failure."""
        from harness import BenchError

        entry = self.binaries.get(name)
        if entry is None:
            raise BenchError(f"`{name}` was not built by this run")
        if not entry.get("ok"):
            raise BenchError(entry.get("reason", f"`{name}` failed to build"))
        return Path(entry["path"])

    def datanet_config(self, name, cache_dir, cache_max_size=None):
        """Writes a datanet configuration with the bench space and the stack's cluster and Samba."""
        env = self.env
        lines = [
            "# Written by scripts/bench.sh for one benchmark mount; regenerated on every run.",
            f"[spaces.{SPACE}]",
            f'url = "s3://{BUCKET}"',
            f'endpoint = "{env["DATANET_S3_ENDPOINT"]}"',
            f'region = "{env["DATANET_S3_REGION"]}"',
            f'access_key_id = "{env["DATANET_S3_ACCESS_KEY_ID"]}"',
            f'secret_access_key_file = "{env["DATANET_S3_SECRET_FILE"]}"',
            "",
            "[cache]",
            f'dir = "{cache_dir}"',
        ]
        if cache_max_size is not None:
            lines.append(f'max_size = "{cache_max_size}"')
        lines += [
            "",
            "[clusters.a]",
            f'slurm_conf = "{env["DATANET_SLURM_CONF"]}"',
            f'scratch_root = "{env["DATANET_SCRATCH_ROOT"]}"',
            f'near_spaces = ["{SPACE}"]',
            "",
            "[jobwrap]",
            f'state_dir = "{self.work / "jobwrap-state"}"',
            "",
            "[samba]",
            'server = "127.0.0.1"',
            f'port = {env["DATANET_SMB_PORT"]}',
            f'smb_conf = "{env["DATANET_SMB_CONF"]}"',
            f'allowed_roots = ["{self.work / "shares"}"]',
            f'state_dir = "{self.work / "samba-provisioner"}"',
            f'token_key_file = "{env["DATANET_SAMBA_TOKEN_KEY_FILE"]}"',
            f'account_prefix = "{LEASE_ACCOUNT_PREFIX}"',
            "",
        ]
        path = self.work / f"{name}.toml"
        path.write_text("\n".join(lines))
        return path

    def mount(self, tool, tag="", cache_max_size=None):
        """Creates a mount of `tool` (not started yet) whose cache directory is emptied on start."""
        from harness import DatanetMount, RcloneMount, S3fsMount

        label = f"{tool}{'-' + tag if tag else ''}"
        mountpoint = self.mounts / label
        log_path = self.logs / f"{label}.log"
        cache_dir = self.work / "cache" / label
        if tool == "datanet":
            config = self.datanet_config(f"datanet-{label}", cache_dir, cache_max_size)
            return DatanetMount(self.binary("datanet"), config, SPACE, mountpoint, log_path, cache_dir)
        if tool == "rclone-full":
            return RcloneMount(self.store, mountpoint, log_path, cache_dir, "full")
        if tool == "rclone-off":
            return RcloneMount(self.store, mountpoint, log_path, cache_dir, "off")
        if tool == "s3fs":
            return S3fsMount(self.store, mountpoint, log_path)
        raise ValueError(f"unknown tool {tool}")


def read_env_file(path):
    """Reads the `export NAME=VALUE` lines that scripts/stack.sh writes to env.sh."""
    values = {}
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line.startswith("export ") and "=" in line:
                name, value = line[len("export "):].split("=", 1)
                values[name] = value
    for name in ("DATANET_S3_ENDPOINT", "DATANET_S3_REGION", "DATANET_S3_ACCESS_KEY_ID", "DATANET_S3_SECRET_FILE"):
        if name not in values:
            raise KeyError(f"{path} has no {name}; run scripts/stack.sh up again")
    os.environ.setdefault("DATANET_RUN_DIR", values.get("DATANET_RUN_DIR", ""))
    return values

