"""Building blocks of the benchmark: timing, medians, the S3 store, FUSE mounts and samplers.

Every tool talks to the same Garage instance of the benchmark's own run directory. No
secret appears in a process argument list. curl reads its credentials from a 0600 config
file (`-K`) and s3fs from a 0600 passwd file. rclone gets them in its own environment,
and datanet reads the secret file named in its configuration.
"""

import os
import random
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024

# rclone and s3fs fail against a plain-HTTP endpoint while these variables force a CA
# bundle on them. Some machines set them globally, so every child process runs without them.
CA_BUNDLE_VARIABLES = (
    "AWS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "NIX_SSL_CERT_FILE",
    "HTTPLIB2_CA_CERTS",
)


class BenchError(Exception):
    """A measurement that could not be taken; its message goes into the results page."""


def median(values):
    return statistics.median(values) if values else None


def run(cmd, *, env=None, timeout=600, check=True, capture=True, cwd=None):
    """Runs `cmd` and returns the CompletedProcess; raises BenchError on failure."""
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            timeout=timeout,
            cwd=cwd,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
            text=True,
        )
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"`{cmd[0]}` timed out after {timeout}s") from err
    except FileNotFoundError as err:
        raise BenchError(f"`{cmd[0]}` is not installed") from err
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()
        tail = " | ".join(detail[-3:]) if detail else "no output"
        raise BenchError(f"`{' '.join(map(str, cmd[:3]))}` exited with {proc.returncode}: {tail}")
    return proc


def timed(cmd, **kwargs):
    """Runs `cmd` and returns its wall time in seconds."""
    start = time.monotonic()
    run(cmd, **kwargs)
    return time.monotonic() - start


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in CA_BUNDLE_VARIABLES}
    if extra:
        env.update(extra)
    return env


def dir_usage_bytes(path):
    """Bytes of the files below `path`: (allocated on disk from st_blocks, apparent from st_size)."""
    allocated = 0
    apparent = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            allocated += stat.st_blocks * 512
            apparent += stat.st_size
    return allocated, apparent


def read_status_kib(pid, key):
    """Reads one `/proc/PID/status` value in KiB (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class Sampler(threading.Thread):
    """Samples a process's RSS and a directory's disk usage every `interval_s` until stopped."""

    def __init__(self, pid=None, directory=None, interval_s=0.2):
        super().__init__(daemon=True)
        self.pid = pid
        self.directory = directory
        self.interval_s = interval_s
        self.peak_rss_kib = 0
        self.peak_dir_bytes = 0
        self.peak_dir_apparent_bytes = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)
        self.sample()

    def sample(self):
        if self.pid is not None:
            rss = read_status_kib(self.pid, "VmRSS") or 0
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
        if self.directory is not None and os.path.isdir(self.directory):
            allocated, apparent = dir_usage_bytes(self.directory)
            self.peak_dir_bytes = max(self.peak_dir_bytes, allocated)
            self.peak_dir_apparent_bytes = max(self.peak_dir_apparent_bytes, apparent)

    def stop(self):
        self._stop_event.set()
        self.join()


# ---------------------------------------------------------------------------
# The object store, reached directly.


@dataclass
class Store:
    """The benchmark's Garage bucket, reached with curl (direct GET/PUT) and rclone (bulk work)."""

    endpoint: str
    region: str
    bucket: str
    access_key_id: str
    secret_file: Path
    work_dir: Path
    curl_config: Path = field(init=False)

    def __post_init__(self):
        secret = self.secret_file.read_text().strip()
        self.curl_config = self.work_dir / "curl-auth.conf"
        write_private(self.curl_config, f'user = "{self.access_key_id}:{secret}"\n')
        self.s3fs_passwd = self.work_dir / "s3fs.passwd"
        write_private(self.s3fs_passwd, f"{self.access_key_id}:{secret}\n")
        self._secret = secret

    def url(self, key):
        return f"{self.endpoint}/{self.bucket}/{key}"

    def curl_base(self):
        # Garage requires x-amz-content-sha256; curl 7.88 only sends it for signed bodies.
        return [
            "curl", "-sS", "--fail", "-K", str(self.curl_config),
            "--aws-sigv4", f"aws:amz:{self.region}:s3",
            "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
        ]

    def get_to_null(self, key):
        """Single-stream GET of `key`; returns (seconds, bytes)."""
        start = time.monotonic()
        proc = run(self.curl_base() + ["-o", "/dev/null", "-w", "%{size_download}", self.url(key)],
                   env=clean_env())
        return time.monotonic() - start, int(proc.stdout.strip() or 0)

    def put_file(self, key, path):
        """Single-stream PUT of a local file; returns seconds."""
        return timed(self.curl_base() + ["-o", "/dev/null", "-T", str(path), self.url(key)], env=clean_env())

    def head_size(self, key):
        """Size of `key` in the store, or None if it does not exist."""
        proc = run(self.curl_base() + ["-I", "-o", "/dev/null", "-w", "%{http_code} %header{content-length}",
                                       self.url(key)], env=clean_env(), check=False)
        parts = proc.stdout.split()
        if len(parts) == 2 and parts[0] == "200":
            return int(parts[1])
        return None

    def random_range_gets_new_connections(self, key, size_bytes, count, block_bytes, seed):
        """`count` ranged GETs at random aligned offsets, one curl process (and connection) each."""
        rng = random.Random(seed)
        blocks = size_bytes // block_bytes
        start = time.monotonic()
        for _ in range(count):
            offset = rng.randrange(blocks) * block_bytes
            run(self.curl_base() + ["-o", "/dev/null", "-r", f"{offset}-{offset + block_bytes - 1}", self.url(key)],
                env=clean_env())
        return time.monotonic() - start

    def random_range_gets(self, key, size_bytes, count, block_bytes, seed):
        """`count` ranged GETs of `block_bytes` at random aligned offsets over one kept-alive connection."""
        rng = random.Random(seed)
        blocks = size_bytes // block_bytes
        lines = []
        for i in range(count):
            offset = rng.randrange(blocks) * block_bytes
            if i:
                lines.append("next")
            lines.append(f'url = "{self.url(key)}"')
            lines.append(f'range = "{offset}-{offset + block_bytes - 1}"')
            lines.append('output = "/dev/null"')
            lines.append(f'user = "{self.access_key_id}:{self._secret}"')
            lines.append(f'aws-sigv4 = "aws:amz:{self.region}:s3"')
            lines.append('header = "x-amz-content-sha256: UNSIGNED-PAYLOAD"')
            lines.append("fail")
        config = self.work_dir / "curl-ranges.conf"
        write_private(config, "\n".join(lines) + "\n")
        try:
            return timed(["curl", "-sS", "-K", str(config)], env=clean_env())
        finally:
            config.unlink(missing_ok=True)

    # rclone: listing, bulk copies and deletes.

    def rclone_env(self):
        return clean_env({
            "RCLONE_CONFIG": "/dev/null",
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": self.endpoint,
            "RCLONE_CONFIG_BENCH_REGION": self.region,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": self.access_key_id,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": self._secret,
            "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
        })

    def remote(self, key=""):
        return f"bench:{self.bucket}/{key}"

    def rclone(self, *args, timeout=1800):
        return run(["rclone", "--log-level", "ERROR", *args], env=self.rclone_env(), timeout=timeout)

    def count_objects(self, prefix):
        proc = self.rclone("lsf", "-R", "--files-only", self.remote(prefix))
        return len([line for line in proc.stdout.splitlines() if line])

    def purge(self, prefix):
        run(["rclone", "--log-level", "ERROR", "purge", self.remote(prefix)], env=self.rclone_env(),
            check=False, timeout=600)


class RequestLog:
    """Counts the S3 requests Garage logged (one INFO line per request) since `mark()`."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0

    def mark(self):
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def lines(self):
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace").splitlines()

    def count(self, method, bucket, key):
        """Requests for exactly `key` (with or without a query string)."""
        needle = f" {method} /{bucket}/{key}"
        return sum(1 for line in self.lines() if line.endswith(needle) or needle + "?" in line)

    def count_prefix(self, method, bucket, prefix):
        """Requests for any key below `prefix`, or with `prefix=None` LIST requests of the bucket."""
        if prefix is None:
            needles = (f" {method} /{bucket}?", f" {method} /{bucket}/?")
        else:
            needles = (f" {method} /{bucket}/{prefix}",)
        return sum(1 for line in self.lines() if any(needle in line for needle in needles))


def write_private(path, text):
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


# ---------------------------------------------------------------------------
# FUSE mounts. Each daemon runs in the foreground as our child, so its PID is known and
# it is stopped by that PID only.


def is_mounted(path):
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                return True
    return False


class Mount:
    """A FUSE daemon of one tool, mounted at `mountpoint` until `stop()`."""

    name = "mount"

    def __init__(self, mountpoint, log_path, cache_dir=None):
        self.mountpoint = Path(mountpoint)
        self.log_path = Path(log_path)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.proc = None

    def command(self):
        raise NotImplementedError

    def env(self):
        return clean_env()

    def root(self):
        """Returns the directory in the mount that corresponds to the bucket root."""
        return self.mountpoint

    def start(self, timeout_s=30):
        if is_mounted(self.mountpoint):
            raise BenchError(f"{self.mountpoint} is still mounted from an earlier run; unmount it first")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir.mkdir(parents=True)
        # Data an earlier tool left dirty (rclone's cache, a removed cache directory)
        # is written out now, not in the middle of this tool's measurement.
        os.sync()
        log = open(self.log_path, "a")
        log.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(self.command())}\n")
        log.flush()
        self.proc = subprocess.Popen(self.command(), env=self.env(), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} before mounting; "
                                 f"see {self.log_path}: {tail(self.log_path)}")
            if is_mounted(self.mountpoint) and self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"{self.name} did not mount {self.mountpoint} within {timeout_s}s; see {self.log_path}")

    def ready(self):
        try:
            os.listdir(self.root())
            return True
        except OSError:
            return False

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self, timeout_s=120):
        """Unmounts (waiting for pending uploads where the tool does that) and reaps the daemon."""
        if self.proc is None:
            return
        if is_mounted(self.mountpoint):
            run(["umount", str(self.mountpoint)], check=False, timeout=timeout_s)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.mountpoint):
            run(["umount", "-l", str(self.mountpoint)], check=False)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def tail(path, lines=3):
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no log"
    return " | ".join(text[-lines:]) or "empty log"


class DatanetMount(Mount):
    name = "datanet"

    def __init__(self, binary, config, space, mountpoint, log_path, cache_dir):
        super().__init__(mountpoint, log_path, cache_dir)
        self.binary = binary
        self.config = config
        self.space = space

    def command(self):
        return [str(self.binary), "mount", "--config", str(self.config), "--foreground",
                "--log-file", str(self.log_path), str(self.mountpoint)]

    def root(self):
        return self.mountpoint / self.space


class RcloneMount(Mount):
    def __init__(self, store, mountpoint, log_path, cache_dir, cache_mode):
        super().__init__(mountpoint, log_path, cache_dir)
        self.store = store
        self.cache_mode = cache_mode
        self.name = f"rclone-{cache_mode}"

    def command(self):
        return ["rclone", "mount", self.store.remote(), str(self.mountpoint),
                "--vfs-cache-mode", self.cache_mode, "--cache-dir", str(self.cache_dir),
                "--log-level", "NOTICE", "--log-file", str(self.log_path)]

    def env(self):
        return self.store.rclone_env()


class S3fsMount(Mount):
    name = "s3fs"

    def __init__(self, store, mountpoint, log_path):
        super().__init__(mountpoint, log_path)
        self.store = store

    def command(self):
        options = ",".join([
            f"passwd_file={self.store.s3fs_passwd}",
            f"url={self.store.endpoint}",
            "use_path_request_style",
            f"endpoint={self.store.region}",
            "sigv4",
        ])
        return ["s3fs", self.store.bucket, str(self.mountpoint), "-f", "-o", options]
