"""Runs the benchmark sections and writes the results (JSON) and the results page (Markdown).

Called by scripts/bench.sh after it has installed the peers, built the binaries and
started the benchmark's own service stack. A section that fails is recorded as "not
measured" with its reason; the run goes on with the next one. With `--only`, the new
sections replace those of the same name in the previous results file of the same mode,
and the page shows when each section was measured.
"""

import argparse
import json
import sys
import time
from pathlib import Path

# No __pycache__ directories in the work tree.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402
import find  # noqa: E402
import jobs  # noqa: E402
import machine  # noqa: E402
import read  # noqa: E402
import report  # noqa: E402
import samba  # noqa: E402
import write  # noqa: E402
from context import Context  # noqa: E402
from record import SectionRecord  # noqa: E402

# name: (function, needs the test data in the bucket)
SECTIONS = {
    "read": (read.section_read, True),
    "random": (read.section_random, True),
    "cache": (read.section_cache, True),
    "write": (write.section_write, True),
    "find": (find.section_find, True),
    "stagein": (jobs.section_stagein, True),
    "jobwrap": (jobs.section_overhead, False),
    "samba": (samba.section_samba, False),
}


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--binaries", type=Path, help="JSON file with the build result per binary")
    parser.add_argument("--garage")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated section names")
    parser.add_argument("--output", type=Path, required=True, help="Markdown page to write")
    parser.add_argument("--results", type=Path, required=True, help="JSON results file to write")
    parser.add_argument("--command-line", default="scripts/bench.sh")
    parser.add_argument("--render-only", action="store_true",
                        help="write the page from the results file again, without measuring")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.render_only:
        args.output.write_text(report.render(json.loads(args.results.read_text())))
        log(f"wrote {args.output} from {args.results}")
        return 0
    if None in (args.repo, args.run_dir, args.binaries, args.garage):
        log("--repo, --run-dir, --binaries and --garage are required unless --render-only is given")
        return 2

    selected = [name.strip() for name in args.only.split(",") if name.strip()] or list(SECTIONS)
    unknown = [name for name in selected if name not in SECTIONS]
    if unknown:
        log(f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2

    binaries = json.loads(args.binaries.read_text())
    ctx = Context(args.repo, args.run_dir, args.quick, binaries)

    results = {"sections": {}}
    if args.only and args.results.exists():
        results = json.loads(args.results.read_text())
    results.update({
        "mode": "quick" if args.quick else "full",
        "command": args.command_line,
        "machine": machine.describe(args.repo, args.run_dir, args.garage),
        "sizes": ctx.sizes.__dict__,
        "binaries": {name: {k: v for k, v in entry.items() if k != "path"} for name, entry in binaries.items()},
    })

    prepare_error = None
    if any(SECTIONS[name][1] for name in selected):
        log("preparing test data")
        try:
            data.prepare(ctx, log)
        except Exception as err:  # noqa: BLE001 - recorded in every section that needs the data
            prepare_error = f"test data could not be prepared: {err}"
            log(prepare_error)

    run_started = time.monotonic()
    for name in selected:
        function, needs_data = SECTIONS[name]
        log(f"section {name}")
        rec = SectionRecord(name, log)
        if needs_data and prepare_error:
            rec.fail(f"{name}.all", prepare_error)
        else:
            rec.attempt(f"{name}.all", lambda: function(ctx, rec))
        section = rec.to_json()
        section["seconds"] = round(time.monotonic() - run_started, 1)
        results["sections"][name] = section
        run_started = time.monotonic()
        args.results.write_text(json.dumps(results, indent=1))

    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.results.write_text(json.dumps(results, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report.render(results))
    log(f"wrote {args.output} and {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
