"""The figures of one section: named metrics, each a list of runs or the reason it is missing.

A metric that could not be taken keeps the first error as "not measured: REASON", and
the rest of the section goes on, so one broken tool never hides the others' figures.
"""

import time
import traceback

from harness import BenchError


class SectionRecord:
    def __init__(self, name, log):
        self.name = name
        self.log = log
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.metrics = {}
        self.notes = []
        self.commands = []
        self.load_before = read_loadavg()

    def add(self, key, value, unit):
        metric = self.metrics.setdefault(key, {"values": [], "unit": unit, "error": None})
        metric["values"].append(value)
        self.log(f"  {key}: {value:.4g} {unit}")

    def fail(self, key, reason):
        metric = self.metrics.setdefault(key, {"values": [], "unit": None, "error": None})
        if metric["error"] is None:
            metric["error"] = reason
        self.log(f"  {key}: not measured: {reason}")

    def attempt(self, keys, action):
        """Runs `action()`; on failure marks every metric in `keys` as not measured."""
        try:
            action()
            return True
        except BenchError as err:
            reason = str(err)
        except Exception as err:  # noqa: BLE001 - any failure of one tool must not stop the run
            reason = f"{type(err).__name__}: {err}"
            self.log(traceback.format_exc())
        for key in [keys] if isinstance(keys, str) else keys:
            self.fail(key, reason)
        return False

    def rounds(self, runs, measurements):
        """Runs each `(keys, action)` once per round, `runs` rounds, so that a drift in the
        machine's load hits every tool alike. `action(run_index)` takes one measurement; a
        tool whose action fails once is skipped in the later rounds."""
        failed = set()
        for run_index in range(runs):
            for position, (keys, action) in enumerate(measurements):
                if position in failed:
                    continue
                if not self.attempt(keys, lambda: action(run_index)):
                    failed.add(position)

    def note(self, text):
        self.notes.append(text)

    def command(self, label, text):
        self.commands.append({"label": label, "command": text})

    def to_json(self):
        return {
            "name": self.name,
            "started": self.started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_before": self.load_before,
            "load_after": read_loadavg(),
            "metrics": self.metrics,
            "notes": self.notes,
            "commands": self.commands,
        }


def read_loadavg():
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])
