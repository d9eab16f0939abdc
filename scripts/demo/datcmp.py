#!/usr/bin/env python3
"""Compare a CalculiX .dat file with its reference, as CalculiX's own test suite does.

CalculiX's `compare` script and `datcheck.pl` (shipped in calculix-ccx-test) accept a
result under three conditions. Both files have the same number of lines, and the
result contains no NaN. Every real number (a token with a decimal point) differs from
the reference by at most 0.1 % of the largest absolute real number in its block, where
blank lines separate the blocks. This comparer applies the same rules, and it also requires every other token
(words, node and element numbers) to match exactly. A small absolute tolerance is
added, for values that are zero up to rounding. Numbers in "participation factors"
blocks are not compared, because they depend on the cyclic sector (as in
`datcheck.pl`), but their text is.

Usage: datcmp.py [--rel-tol R] [--abs-tol A] RESULT.dat REFERENCE.dat[.gz]

Prints one line per deviation (at most 10) and a summary line; exits 0 when the files
match, 1 when they differ, 2 when a file cannot be read.
"""

import argparse
import gzip
import math
import re
import sys

REL_TOL = 1e-3
ABS_TOL = 1e-10
MAX_REPORTED = 10
FORTRAN_EXPONENT = re.compile(r"^([+-]?\d*\.\d*)([+-]\d{3})$")

PARTICIPATION_START = "P A R T I C I P A T I O N   F A C T O R S"
PARTICIPATION_FOR_FREQUENCY = "P A R T I C I P A T I O N   F A C T O R S   F O R   F R E Q U E N C Y"
PARTICIPATION_END = "T O T A L   E F F E C T I V E   M A S S"


def read_lines(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="latin-1") as handle:
        return handle.read().splitlines()


def parse_number(token):
    """Returns the value of a real number token, or None for any other token.

    Like datcheck.pl, only tokens with a decimal point are real numbers. Integers are
    node, element and step numbers, which are compared as exact text.
    """
    if "." not in token and token.lower() not in ("nan", "-nan"):
        return None
    try:
        return float(token)
    except ValueError:
        pass
    # Fortran drops the "E" of three-digit exponents (1.234567-100).
    match = FORTRAN_EXPONENT.match(token)
    if match is None:
        return None
    return float(f"{match.group(1)}e{match.group(2)}")


def block_maxima(lines):
    """Returns, per line, the largest absolute number in that line's block."""
    maxima = []
    block_lines = []
    block_max = 0.0
    for line in lines + [""]:
        if line.strip() == "":
            maxima.extend([block_max] * len(block_lines))
            block_lines = []
            block_max = 0.0
            maxima.append(0.0)
            continue
        block_lines.append(line)
        for token in line.split():
            value = parse_number(token)
            if value is not None and math.isfinite(value):
                block_max = max(block_max, abs(value))
    return maxima[: len(lines)]


def compare(result_lines, reference_lines, rel_tol, abs_tol):
    """Returns (deviations, numbers compared); a deviation is (line number, text)."""
    deviations = []
    if len(result_lines) != len(reference_lines):
        deviations.append((0, f"the result has {len(result_lines)} lines, the reference {len(reference_lines)}"))
        return deviations, 0

    maxima = block_maxima(reference_lines)
    compared = 0
    in_participation = False
    for index, (line, reference) in enumerate(zip(result_lines, reference_lines)):
        number = index + 1
        if PARTICIPATION_START in reference and PARTICIPATION_FOR_FREQUENCY not in reference:
            in_participation = True
        elif PARTICIPATION_END in reference:
            in_participation = False

        tokens, reference_tokens = line.split(), reference.split()
        if len(tokens) != len(reference_tokens):
            deviations.append((number, f"{len(tokens)} tokens, reference has {len(reference_tokens)}: {line.strip()!r}"))
            continue

        for token, reference_token in zip(tokens, reference_tokens):
            value, reference_value = parse_number(token), parse_number(reference_token)
            if reference_value is None or value is None:
                if token != reference_token:
                    deviations.append((number, f"text {token!r} differs from reference {reference_token!r}"))
                continue
            if math.isnan(value):
                deviations.append((number, f"NaN where the reference has {reference_token}"))
                continue
            if in_participation:
                continue
            compared += 1
            allowed = rel_tol * max(abs(reference_value), maxima[index]) + abs_tol
            if abs(value - reference_value) > allowed:
                deviations.append(
                    (number, f"{token} differs from reference {reference_token} by {abs(value - reference_value):.3e} (allowed {allowed:.3e})")
                )
    return deviations, compared


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rel-tol", type=float, default=REL_TOL,
                        help=f"allowed difference as a fraction of the block's largest value (default {REL_TOL})")
    parser.add_argument("--abs-tol", type=float, default=ABS_TOL,
                        help=f"allowed absolute difference added to the relative one (default {ABS_TOL})")
    parser.add_argument("result")
    parser.add_argument("reference", help="reference .dat.ref file, optionally gzipped")
    args = parser.parse_args()

    try:
        result_lines = read_lines(args.result)
        reference_lines = read_lines(args.reference)
    except OSError as err:
        print(f"datcmp: cannot read {err.filename}: {err.strerror}", file=sys.stderr)
        return 2

    deviations, compared = compare(result_lines, reference_lines, args.rel_tol, args.abs_tol)
    for number, text in deviations[:MAX_REPORTED]:
        print(f"{args.result}:{number}: {text}")
    if len(deviations) > MAX_REPORTED:
        print(f"... and {len(deviations) - MAX_REPORTED} more deviations")
    verdict = "differs from" if deviations else "matches"
    print(f"{args.result} {verdict} {args.reference}: {len(result_lines)} lines, {compared} numbers compared, "
          f"{len(deviations)} deviations (relative tolerance {args.rel_tol:g}, absolute {args.abs_tol:g})")
    return 1 if deviations else 0


if __name__ == "__main__":
    sys.exit(main())
