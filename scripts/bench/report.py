"""Renders the results (JSON) as docs/BENCHMARKS.md: targets first, then one table per section.

Every figure is the median of the section's runs, with the range and the run count.
A section measures every tool once per round, one after another, so a target's ratio
is the median of the ratios of each round: a slow phase of the shared machine then
slows both sides of a ratio instead of only one median. A target whose inputs are
missing is reported as "not measured" with the reason, never as met.
"""

from pathlib import Path
import statistics

TOOL_NAMES = {
    "datanet": "datanet",
    "rclone-full": "rclone mount (`--vfs-cache-mode full`)",
    "rclone-off": "rclone mount (`--vfs-cache-mode off`)",
    "s3fs": "s3fs",
    "direct": "direct single-stream GET (curl)",
    "direct_keepalive": "direct ranged GETs on one kept-alive connection (curl)",
    "local": "local file, page cache",
    "list": "store LIST (`rclone lsl`)",
}


COUNT_UNITS = ("leases", "GETs", "LISTs", "HEADs")


class Metric:
    """One metric of the results, or the reason it is missing."""

    def __init__(self, results, section, key):
        sec = results.get("sections", {}).get(section)
        entry = sec["metrics"].get(key) if sec else None
        if sec is None:
            self.values, self.unit, self.error = [], None, "section not run"
        elif entry is None:
            whole = sec["metrics"].get(f"{section}.all")
            reason = whole["error"] if whole and whole.get("error") else "no figure recorded"
            self.values, self.unit, self.error = [], None, reason
        else:
            self.values, self.unit, self.error = entry["values"], entry["unit"], entry["error"]
        if self.error is None and not self.values:
            self.error = "no figure recorded"

    @property
    def ok(self):
        return self.error is None and bool(self.values)

    @property
    def median(self):
        return statistics.median(self.values) if self.ok else None

    def missing(self):
        return f"not measured: {one_line(self.error)}"


def one_line(text):
    text = " ".join(str(text).split())
    return text if len(text) <= 220 else text[:217] + "..."


def num(value, digits=3):
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.{digits}f}"


def count(value):
    """Formats a count (requests, leases) without decimals."""
    return "-" if value is None else f"{value:,.0f}"


def seconds_cell(metric):
    if not metric.ok:
        return metric.missing()
    values = metric.values
    spread = f" ({num(min(values))}-{num(max(values))}, n={len(values)})" if len(values) > 1 else " (n=1)"
    return f"{num(metric.median)} s{spread}"


def rate_cell(metric, size_mib):
    """Throughput in MiB/s from a seconds metric."""
    if not metric.ok:
        return metric.missing()
    return f"**{num(size_mib / metric.median)} MiB/s** ({seconds_cell(metric)})"


def value_cell(metric):
    if not metric.ok:
        return metric.missing()
    values = metric.values
    fmt = count if metric.unit in COUNT_UNITS or str(metric.unit).startswith("of ") else num
    spread = f" ({fmt(min(values))}-{fmt(max(values))}, n={len(values)})" if len(values) > 1 else ""
    return f"{fmt(metric.median)} {metric.unit}{spread}"


def ratio(numerator, denominator):
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def ratio_cell(value):
    return "-" if value is None else f"{value:.2f}x"


class Paired:
    """Speed ratio of a measured tool against references, from the times of each round:
    the fastest reference's time divided by the measured time, so 2.0 reads "twice as fast"."""

    def __init__(self, references, measured):
        self.per_round = None
        rounds = len(measured.values)
        if rounds and all(len(metric.values) == rounds for metric in references):
            self.per_round = [min(metric.values[i] for metric in references) / measured.values[i]
                              for i in range(rounds) if measured.values[i] > 0]
        if self.per_round:
            self.value = statistics.median(self.per_round)
        else:
            # A tool that failed in some round leaves rounds unpaired, so compare medians.
            self.value = min(metric.median for metric in references) / measured.median

    def figure(self, detail=""):
        """Formats the ratio, then `detail` and the per-round ratios in brackets."""
        rounds = ""
        if self.per_round and len(self.per_round) > 1:
            rounds = "; rounds " + ", ".join(f"{value:.2f}" for value in self.per_round)
        bracketed = f"{detail}{rounds}".lstrip("; ")
        return f"{self.value:.2f}x" + (f" ({bracketed})" if bracketed else "")


# ---------------------------------------------------------------------------
# Targets


def verdict(condition):
    return "**met**" if condition else "**missed**"


def targets(results):
    """Rows of (target, figure, verdict) for every published target."""
    rows = []
    m = lambda section, key: Metric(results, section, key)  # noqa: E731

    def need(*metrics):
        for metric in metrics:
            if not metric.ok:
                return metric.missing()
        return None

    # Sequential read (times: lower is better, so speed ratios are inverted time ratios).
    cold = m("read", "read.cold.datanet")
    direct = m("read", "read.cold.direct")
    rclone = m("read", "read.cold.rclone-full")
    s3fs = m("read", "read.cold.s3fs")
    missing = need(cold, direct)
    if missing:
        rows.append(("Cold sequential read >= 0.9x direct GET", missing, "not measured"))
    else:
        paired = Paired([direct], cold)
        rows.append(("Cold sequential read >= 0.9x direct GET", paired.figure(), verdict(paired.value >= 0.9)))
    missing = need(cold, rclone, s3fs)
    if missing:
        rows.append(("Cold sequential read ahead of rclone mount and s3fs", missing, "not measured"))
    else:
        vs_rclone, vs_s3fs = Paired([rclone], cold), Paired([s3fs], cold)
        rows.append(("Cold sequential read ahead of rclone mount and s3fs",
                     f"rclone {vs_rclone.figure()}, s3fs {vs_s3fs.figure()}",
                     verdict(vs_rclone.value > 1 and vs_s3fs.value > 1)))

    warm = m("read", "read.warm.datanet")
    local = m("read", "read.warm.local")
    missing = need(warm, local)
    if missing:
        rows.append(("Warm re-read >= 0.5x local page-cache read", missing, "not measured"))
    else:
        paired = Paired([local], warm)
        rows.append(("Warm re-read >= 0.5x local page-cache read", paired.figure(), verdict(paired.value >= 0.5)))

    find_dn = m("find", "find.cold.datanet")
    find_peers = [m("find", "find.cold.rclone-full"), m("find", "find.cold.s3fs")]
    missing = need(find_dn, *find_peers)
    if missing:
        rows.append(("`find` over the tree, cold: >= 2x faster than the faster peer", missing, "not measured"))
    else:
        faster = min(p.median for p in find_peers)
        paired = Paired(find_peers, find_dn)
        rows.append(("`find` over the tree, cold: >= 2x faster than the faster peer",
                     paired.figure(f"{num(find_dn.median)} s vs {num(faster)} s"), verdict(paired.value >= 2)))

    large = m("write", "write.large.datanet")
    durable_peers = [m("write", "write.large.s3fs"), m("write", "write.large.rclone-off")]
    missing = need(large, *durable_peers)
    if missing:
        rows.append(("Durable large write at least as fast as the faster durable peer", missing, "not measured"))
    else:
        faster = min(p.median for p in durable_peers)
        paired = Paired(durable_peers, large)
        rows.append(("Durable large write at least as fast as the faster durable peer",
                     paired.figure(f"{num(large.median)} s vs {num(faster)} s"), verdict(paired.value >= 1)))

    small = m("write", "write.small.datanet")
    small_rclone = m("write", "write.small.rclone-full")
    missing = need(small, small_rclone)
    if missing:
        rows.append(("Small files created at least as fast as rclone mount (until in the store)", missing,
                     "not measured"))
    else:
        paired = Paired([small_rclone], small)
        rows.append(("Small files created at least as fast as rclone mount (until in the store)",
                     paired.figure(f"{num(small.median)} s vs {num(small_rclone.median)} s"), verdict(paired.value >= 1)))

    stage = m("stagein", "stagein.jobwrap")
    stage_rclone = m("stagein", "stagein.rclone")
    missing = need(stage, stage_rclone)
    if missing:
        rows.append(("Stage-in at least as fast as `rclone copy --transfers 16`", missing, "not measured"))
    else:
        paired = Paired([stage_rclone], stage)
        rows.append(("Stage-in at least as fast as `rclone copy --transfers 16`",
                     paired.figure(f"{num(stage.median)} s vs {num(stage_rclone.median)} s"), verdict(paired.value >= 1)))

    jw = m("jobwrap", "jobwrap.empty")
    sb = m("jobwrap", "jobwrap.sbatch_wait")
    missing = need(jw, sb)
    if missing:
        rows.append(("jobwrap adds < 1 s to an empty job over `sbatch --wait`", missing, "not measured"))
    else:
        added = jw.median - sb.median
        rows.append(("jobwrap adds < 1 s to an empty job over `sbatch --wait`", f"{added:+.2f} s",
                     verdict(added < 1)))
    poll = m("jobwrap", "jobwrap.sbatch_poll")
    missing = need(jw, poll)
    label = "jobwrap adds < 1 s over `sbatch` with a 0.25 s state poll (stricter than the target)"
    if missing:
        rows.append((label, missing, "not measured"))
    else:
        added = jw.median - poll.median
        rows.append((label, f"{added:+.2f} s", verdict(added < 1)))

    for key, label in (("samba.grant", "grant"), ("samba.revoke", "revoke")):
        metric = m("samba", key)
        if not metric.ok:
            rows.append((f"samba-provisioner {label} < 0.5 s", metric.missing(), "not measured"))
        else:
            rows.append((f"samba-provisioner {label} < 0.5 s", f"{num(metric.median)} s",
                         verdict(metric.median < 0.5)))
    live = m("samba", "samba.live_leases")
    expected_leases = results.get("sizes", {}).get("leases", 200)
    if not live.ok:
        rows.append((f"{expected_leases} live leases at once", live.missing(), "not measured"))
    else:
        rows.append((f"{expected_leases} live leases at once", f"{int(min(live.values))} live",
                     verdict(min(live.values) >= expected_leases)))

    rss = m("read", "read.rss.datanet")
    if not rss.ok:
        rows.append(("datanet daemon < 128 MiB RSS during the sequential read", rss.missing(), "not measured"))
    else:
        peak = max(rss.values)
        rows.append(("datanet daemon < 128 MiB RSS during the sequential read", f"{num(peak)} MiB peak",
                     verdict(peak < 128)))

    peak = m("cache", "cache.peak")
    limit = m("cache", "cache.limit")
    missing = need(peak, limit)
    if missing:
        rows.append(("Cache directory never above its limit", missing, "not measured"))
    else:
        rows.append(("Cache directory never above its limit",
                     f"{num(max(peak.values))} MiB peak, limit {num(limit.median)} MiB",
                     verdict(max(peak.values) <= limit.median)))
    return rows


# ---------------------------------------------------------------------------
# Page


def render(results):
    out = []
    add = out.append
    machine = results["machine"]
    sizes = results["sizes"]
    quick = results.get("mode") == "quick"

    add("# Benchmarks")
    add("")
    add("Generated by `scripts/bench.sh`; do not edit by hand. The numbers below come from one run on the")
    add("machine described under [Machine and software](#machine-and-software), with datanet and its peers")
    add("measured side by side against the same Garage server on 127.0.0.1. Each figure is the median of")
    add("the runs shown as n (range in brackets). A section measures every tool once per round, so each")
    add("target's ratio is the median of its per-round ratios, listed after it.")
    add(f"Mode: **{results.get('mode')}**"
        + (" (reduced sizes for iterating on the script; not comparable with a full run)." if quick else "."))
    add("")
    add("## Targets")
    add("")
    add("| Target | Figure | Result |")
    add("|---|---|---|")
    for target, figure, status in targets(results):
        add(f"| {target} | {figure} | {status} |")
    add("")

    render_machine(add, results)
    render_read(add, results, sizes)
    render_random(add, results)
    render_write(add, results, sizes)
    render_find(add, results, sizes)
    render_cache(add, results)
    render_stagein(add, results, sizes)
    render_jobwrap(add, results)
    render_samba(add, results, sizes)
    render_overlap(add)
    render_profiles(add)
    render_commands(add, results)
    return "\n".join(out) + "\n"


def section_header(add, results, name, title):
    add(f"## {title}")
    add("")
    sec = results["sections"].get(name)
    if sec is None:
        add("Not measured: section not run.")
        add("")
        return None
    add(f"Measured {sec['started']} to {sec['finished']}; load average before {sec['load_before']}, "
        f"after {sec['load_after']}.")
    add("")
    for note in sec.get("notes", []):
        add(note)
        add("")
    whole = sec["metrics"].get(f"{name}.all")
    if whole and whole.get("error"):
        add(f"Section aborted, remaining figures not measured: {one_line(whole['error'])}")
        add("")
    return sec


def render_machine(add, results):
    machine = results["machine"]
    add("## Machine and software")
    add("")
    add(f"- Command: `{results.get('command', 'scripts/bench.sh')}`, finished {results.get('finished', '-')}")
    add(f"- CPU: {machine['cpu']}, {machine['cores']} cores; memory {machine['memory_gib']} GiB")
    add(f"- OS: {machine['os']}, kernel {machine['kernel']}; disk of the run directory: {machine['disk']}")
    add(f"- Work tree: commit {machine['commit']}")
    for name, entry in results.get("binaries", {}).items():
        if not entry.get("ok"):
            state = f"not available: {one_line(entry.get('reason', '?'))}"
        elif entry.get("prebuilt"):
            state = "release binary found in target/release (`--no-build`), possibly older than the commit"
        else:
            state = "built (release) from the work tree at the start of the run"
        add(f"- `{name}`: {state}")
    for name, version in machine["versions"].items():
        add(f"- {name}: {version}")
    add("- The machine is shared with builds and tests of other work in progress; the load average of each")
    engine = {"lmdb": "LMDB", "sqlite": "SQLite"}.get(machine.get("garage_db_engine"), "unrecorded")
    add(f"  section is printed with it. Garage runs one node with {engine} metadata on the same disk.")
    add("")


def render_read(add, results, sizes):
    if section_header(add, results, "read", f"Sequential read of a {sizes['object_mib']} MiB object") is None:
        return
    size = sizes["object_mib"]
    direct = Metric(results, "read", "read.cold.direct")
    local = Metric(results, "read", "read.warm.local")
    add("| Tool | Cold | Warm (second read) | Cold vs direct GET | Warm vs local page cache | In page cache before "
        "the warm read | Peak RSS | Peak cache dir | GETs during the cold read |")
    add("|---|---|---|---|---|---|---|---|---|")
    add(f"| {TOOL_NAMES['direct']} | {rate_cell(direct, size)} | - | 1.00x | - | - | - | - | - |")
    for tool in ("datanet", "rclone-full", "s3fs"):
        cold = Metric(results, "read", f"read.cold.{tool}")
        warm = Metric(results, "read", f"read.warm.{tool}")
        rss = Metric(results, "read", f"read.rss.{tool}")
        cache = Metric(results, "read", f"read.cache_peak.{tool}")
        vs_direct = ratio(direct.median, cold.median)
        vs_local = ratio(local.median, warm.median)
        gets = Metric(results, "read", f"read.gets.{tool}")
        rss_cell = f"{num(max(rss.values))} MiB" if rss.ok else "-"
        cache_cell = f"{num(max(cache.values))} MiB" if cache.ok else "-"
        gets_cell = count(gets.median) if gets.ok else "-"
        resident = Metric(results, "read", f"read.resident.{tool}")
        resident_cell = (f"{num(min(resident.values))} to {num(max(resident.values))} MiB"
                         if resident.ok else "-")
        add(f"| {TOOL_NAMES[tool]} | {rate_cell(cold, size)} | {rate_cell(warm, size)} | "
            f"{ratio_cell(vs_direct)} | {ratio_cell(vs_local)} | {resident_cell} | {rss_cell} | {cache_cell} "
            f"| {gets_cell} |")
    add(f"| {TOOL_NAMES['local']} | - | {rate_cell(local, size)} | - | 1.00x | - | - | - | - |")
    add("")
    add("\"In page cache\" is the part of the object that `fincore` found in the page cache through the")
    add("mount between the cold and the warm read, lowest to highest over the runs. A warm read after less")
    add("than the whole object is partly served by the tool itself: on a machine whose kernel reclaims")
    add("idle page cache on its own (DAMON's `pageout`, for one), such a round measures the tool's cache.")
    add("")
    add("Peak RSS is the larger of the daemon's `VmHWM` and the `VmRSS` sampled every 0.2 s, over a cold")
    add("and a warm read, maximum over the runs. GETs are the GET requests for the object that Garage")
    add("logged during the cold read (median over the runs); datanet's sequential read-ahead sends")
    add(f"range GETs of up to 24 MiB, so fetching every byte once takes at least {max(1, -(-size // 24))} GETs.")
    add("")


def render_random(add, results):
    if section_header(add, results, "random", "Random 4 KiB reads") is None:
        return
    base = Metric(results, "random", "random.datanet")
    add("| Tool | Reads per second | vs datanet |")
    add("|---|---|---|")
    names = dict(TOOL_NAMES, direct="direct ranged GETs, new connection each (curl)")
    for tool in ("datanet", "rclone-full", "s3fs", "direct", "direct_keepalive"):
        metric = Metric(results, "random", f"random.{tool}")
        add(f"| {names[tool]} | {value_cell(metric)} | {ratio_cell(ratio(metric.median, base.median))} |")
    add("")
    add("The direct figures are ranged GETs of 4 KiB with curl: one process and connection per read")
    add("(process start included), and one process sending up to 200 ranges over one kept-alive")
    add("connection. On a kept-alive connection every response after the first arrives about 40 ms late:")
    add("`strace` of Garage shows it writes the headers and the body of a response in two `writev` calls")
    add("on a socket without `TCP_NODELAY`, so Nagle's algorithm holds the body until the client's")
    add("delayed ACK of the headers (40 ms on Linux). Any client that reuses connections for small")
    add("ranged GETs against this Garage version pays it.")
    add("")


def render_write(add, results, sizes):
    if section_header(add, results, "write", "Writes until durable in the store") is None:
        return
    size = sizes["write_mib"]
    add(f"| Tool | {size} MiB until in the store | last `write` returned | `close` returned | "
        f"{sizes['create_files']} small files until in the store | last `close` returned |")
    add("|---|---|---|---|---|---|")
    direct = Metric(results, "write", "write.large.direct")
    add(f"| direct single-stream PUT (curl) | {rate_cell(direct, size)} | - | - | - | - |")
    for tool in ("datanet", "s3fs", "rclone-off", "rclone-full"):
        large = Metric(results, "write", f"write.large.{tool}")
        large_writes = Metric(results, "write", f"write.large_writes.{tool}")
        large_close = Metric(results, "write", f"write.large_close.{tool}")
        small = Metric(results, "write", f"write.small.{tool}")
        small_close = Metric(results, "write", f"write.small_close.{tool}")
        add(f"| {TOOL_NAMES[tool]} | {rate_cell(large, size)} | {seconds_cell(large_writes)} | "
            f"{seconds_cell(large_close)} | {seconds_cell(small)} | {seconds_cell(small_close)} |")
    add("")
    add("rclone with `--vfs-cache-mode full` is a write-back mode: `close` returns before the upload (by")
    add("default 5 s later), so its \"until in the store\" figure is the one to compare. datanet (default")
    add("`write_back_delay = 0`), s3fs and rclone with `--vfs-cache-mode off` upload before `close` returns.")
    add("")


def render_find(add, results, sizes):
    if section_header(add, results, "find", f"`find` with stat over {sizes['tree_dirs'] * sizes['tree_files_per_dir']:,} files") is None:
        return
    base = Metric(results, "find", "find.cold.datanet")
    add("| Tool | Cold | Warm | Cold time vs datanet | LIST requests (cold) | HEAD requests (cold) |")
    add("|---|---|---|---|---|---|")
    for tool in ("datanet", "rclone-full", "s3fs"):
        cold = Metric(results, "find", f"find.cold.{tool}")
        warm = Metric(results, "find", f"find.warm.{tool}")
        lists = Metric(results, "find", f"find.lists.{tool}")
        heads = Metric(results, "find", f"find.heads.{tool}")
        add(f"| {TOOL_NAMES[tool]} | {seconds_cell(cold)} | {seconds_cell(warm)} | "
            f"{ratio_cell(ratio(cold.median, base.median))} | {count(lists.median)} | {count(heads.median)} |")
    listing = Metric(results, "find", "find.cold.list")
    add(f"| {TOOL_NAMES['list']} | {seconds_cell(listing)} | - | {ratio_cell(ratio(listing.median, base.median))} "
        "| - | - |")
    add("")
    add("Requests are the ones Garage logged during the cold `find` (median over the runs): LIST is any")
    add("`GET /BUCKET?...` or `GET /BUCKET/?...` of the bucket, HEAD any HEAD of a key below the tree.")
    add("")


def render_cache(add, results):
    if section_header(add, results, "cache", "datanet cache directory against its limit") is None:
        return
    add("| Figure | Value |")
    add("|---|---|")
    for key, label in (("cache.limit", "`max_size`"),
                       ("cache.peak", "Peak disk usage of the files in the cache directory (allocated blocks)"),
                       ("cache.peak_apparent", "Peak apparent size of the files in the cache directory (`st_size`)"),
                       ("cache.rss", "Peak daemon RSS (sampled)")):
        add(f"| {label} | {value_cell(Metric(results, 'cache', key))} |")
    add("")
    add("datanet keeps each cached object in one sparse file, with its blocks at their own offsets and")
    add("evicted blocks punched out, so the apparent size can exceed the limit; the limit applies to the")
    add("allocated blocks.")
    add("")


def render_stagein(add, results, sizes):
    title = f"Stage-in of {sizes['object_mib']} MiB plus {sizes['tree_dirs'] * sizes['tree_files_per_dir']:,} small files"
    if section_header(add, results, "stagein", title) is None:
        return
    rclone = Metric(results, "stagein", "stagein.rclone")
    add("| Tool | Wall time | vs `rclone copy` |")
    add("|---|---|---|")
    add(f"| `rclone copy --transfers 16` | {seconds_cell(rclone)} | 1.00x |")
    jobwrap = Metric(results, "stagein", "stagein.jobwrap")
    add(f"| jobwrap | {seconds_cell(jobwrap)} | {ratio_cell(ratio(rclone.median, jobwrap.median))} |")
    add("")


def render_jobwrap(add, results):
    if section_header(add, results, "jobwrap", "jobwrap's added wall time for an empty job") is None:
        return
    add("| Command | Wall time |")
    add("|---|---|")
    sbatch = Metric(results, "jobwrap", "jobwrap.sbatch_wait")
    jobwrap = Metric(results, "jobwrap", "jobwrap.empty")
    poll = Metric(results, "jobwrap", "jobwrap.sbatch_poll")
    add(f"| `sbatch --wait empty.sh` | {seconds_cell(sbatch)} |")
    add(f"| `sbatch --parsable empty.sh`, then `scontrol` every 0.25 s | {seconds_cell(poll)} |")
    add(f"| `jobwrap sbatch empty.sh` (foreground, waits for the job) | {seconds_cell(jobwrap)} |")
    if sbatch.ok and jobwrap.ok:
        add(f"| added by jobwrap over `sbatch --wait` (difference of the medians) | "
            f"{jobwrap.median - sbatch.median:+.2f} s |")
    if poll.ok and jobwrap.ok:
        add(f"| added by jobwrap over the polled `sbatch` (difference of the medians) | "
            f"{jobwrap.median - poll.median:+.2f} s |")
    add("")


def render_samba(add, results, sizes):
    if section_header(add, results, "samba", "samba-provisioner leases") is None:
        return
    add("| Figure | Value |")
    add("|---|---|")
    for key, label in (
        ("samba.grant", "`grant` latency"),
        ("samba.revoke", "`revoke` latency"),
        ("samba.bulk_grant", f"{sizes['leases']} grants, wall time"),
        ("samba.live_leases", "Leases live at once (listed by `list`)"),
        ("samba.bulk_login", "Logins that succeeded with a sample of the live leases"),
        ("samba.bulk_revoke", f"{sizes['leases']} revokes, wall time"),
    ):
        add(f"| {label} | {value_cell(Metric(results, 'samba', key))} |")
    add("")


def render_overlap(add):
    """Records the overlapped-staging measurement of jobwrap/bench/overlap.sh.

    That script needs a cluster kept busy by filler jobs for minutes, so it runs on its
    own and is not a section of this benchmark; its last recorded figures are kept here
    so that every benchmark result stays on this page.
    """
    add("## Overlapped staging (jobwrap/bench/overlap.sh)")
    add("")
    add("A filler job takes every CPU of cluster a for 20 s. jobwrap then runs a job with a")
    add("512 MiB input from Garage, and one second later a competing job that needs every CPU")
    add("for 15 s is submitted. The figure is the wall time of the jobwrap command; one run")
    add("each on 2026-12-05 with other builds sharing the machine (load average 7 to 11).")
    add("")
    add("| Mode | Wall time |")
    add("|---|---|")
    add("| `--stage-first` (stage in, then submit) | 35.0 s |")
    add("| overlapped (submit first, stage in while queued) | 21.0 s |")
    add("")
    add("With `--stage-first` the competitor was queued before the job and ran first; with")
    add("overlapped staging the job kept its place and ran right after the filler, which saved")
    add("about the competitor's 15 s.")
    add("")


PROFILES = Path(__file__).with_name("profiles.md")


def render_profiles(add):
    """Copies the hand-written profiling notes (missed targets, causes found, figures before
    and after each fix) into the page, so that the page stays the one record of results."""
    if not PROFILES.exists():
        return
    for line in PROFILES.read_text(encoding="utf-8").rstrip("\n").split("\n"):
        add(line)
    add("")


def render_commands(add, results):
    add("## Commands")
    add("")
    add("Credentials are read from 0600 files (curl `-K`, s3fs `passwd_file`, datanet's")
    add("`secret_access_key_file`) or from rclone's environment, never from the argument list.")
    add("")
    for name, sec in results["sections"].items():
        for entry in sec.get("commands", []):
            command, _, remark = entry["command"].partition("   (")
            remark = f" ({remark}" if remark else ""
            add(f"- {name}, {entry['label']}: `{command.strip()}`{remark}")
    add("")
