"""The machine and software a run measured on: CPU, memory, kernel, disk, tool versions, commit."""

import os
import platform
import subprocess


DEBIAN_PACKAGES = ("rclone", "s3fs", "curl", "fuse3", "slurm-wlm", "samba", "smbclient")


def debian_version(package):
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    return f"{proc.stdout.strip()} (Debian package)" if proc.returncode == 0 else "not installed"


def first_line(cmd, env=None):
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30, env=env)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return "not installed"
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[0] if lines else "unknown"


def cpu_model():
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def assigned_value(path, name):
    """Returns the value of the first `NAME=VALUE` line in `path` (spaces and quotes trimmed)."""
    try:
        with open(path) as handle:
            for line in handle:
                key, sep, value = line.partition("=")
                if sep and key.strip() == name:
                    return value.strip().strip('"')
    except FileNotFoundError:
        pass
    return "unknown"


def os_release():
    return assigned_value("/etc/os-release", "PRETTY_NAME")


def garage_db_engine(run_dir):
    """Returns the metadata engine in the Garage configuration that scripts/garage.sh wrote."""
    return assigned_value(os.path.join(run_dir, "garage", "garage.toml"), "db_engine")


def describe(repo, run_dir, garage_binary):
    commit = first_line(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           stdout=subprocess.PIPE, text=True).stdout.strip()
    disk = first_line(["sh", "-c", f"df -hT {run_dir} | tail -n 1"])
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib(), 1),
        "kernel": platform.release(),
        "os": os_release(),
        "disk": " ".join(disk.split()[:3]) if disk else "unknown",
        "garage_db_engine": garage_db_engine(run_dir),
        "commit": commit + (" plus uncommitted changes of work in progress" if dirty else ""),
        "versions": {
            "garage": first_line([garage_binary, "--version"]),
            **{package: debian_version(package) for package in DEBIAN_PACKAGES},
            "rustc": first_line(["rustc", "--version"]),
            "python": platform.python_version(),
        },
    }
