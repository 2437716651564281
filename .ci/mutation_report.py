"""Summarise a mutmut run per module and apply the mutation gate (issue 16).

Reads ``mutmut results --all true`` on stdin. Prints, per mutated module, how many mutants were
killed (a test failed, or the mutant timed out or crashed the tests) out of those checked, lists
the survivors, and exits 1 when the killed share of all checked mutants is below
``--min-killed``, 2 when it is not but some mutants are still unchecked. Survivors named in
``--accepted`` (``name: reason`` lines) are listed with their reason; they still count as survivors.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

KILLED = {"killed", "timeout", "segfault", "suspicious"}
SURVIVED = {"survived", "no tests"}


def module_of(name: str) -> str:
    match = re.match(r"^(.*?)\.x(?:ǁ|_)", name)
    return match.group(1) if match else name


def print_table(rows: list[tuple[str, int, int, int]], markdown: bool) -> None:
    """One row per module (module, killed, checked, not checked), the last one the total."""
    if markdown:
        print("| module | killed | checked | % | not checked yet |\n|---|---:|---:|---:|---:|")
    else:
        print(f"{'module':40s} {'killed':>7s} {'checked':>7s} {'%':>6s}  unchecked")
    for module, killed, checked, unchecked in rows:
        share = 100 * killed / checked if checked else 0.0
        if markdown:
            name = module if module == "all" else f"`{module.replace('.', '/')}.py`"
            print(f"| {name} | {killed} | {checked} | {share:.1f} | {unchecked} |")
        else:
            print(f"{module:40s} {killed:7d} {checked:7d} {share:6.1f}  {unchecked}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--min-killed", type=float, default=90.0)
    parser.add_argument("--accepted", type=Path, help="file of 'mutant: reason' lines for known survivors")
    parser.add_argument("--markdown", action="store_true", help="print the per-module table as Markdown (file paths)")
    args = parser.parse_args()
    reasons: dict[str, str] = {}
    if args.accepted and args.accepted.is_file():
        for line in args.accepted.read_text().splitlines():
            line = line.strip().lstrip("-* ").strip("`")
            if ":" in line and "__mutmut_" in line.split(":", 1)[0]:
                name, reason = line.split(":", 1)
                reasons[name.strip().strip("`")] = reason.strip()
    per_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors: list[str] = []
    for raw in sys.stdin:
        line = raw.strip()
        if "__mutmut_" not in line or ":" not in line:
            continue
        name, status = (part.strip() for part in line.rsplit(":", 1))
        counts = per_module[module_of(name)]
        counts[status] += 1
        if status in SURVIVED:
            survivors.append(name)
    rows = []
    for module, counts in sorted(per_module.items()):
        killed = sum(counts[s] for s in KILLED)
        rows.append((module, killed, killed + sum(counts[s] for s in SURVIVED), counts["not checked"]))
    total_killed, total_checked, total_unchecked = (sum(row[i] for row in rows) for i in (1, 2, 3))
    rows.append(("all", total_killed, total_checked, total_unchecked))
    print_table(rows, markdown=args.markdown)
    share = 100 * total_killed / total_checked if total_checked else 0.0
    if survivors:
        print(f"\nsurvivors ({len(survivors)}):")
        for name in survivors:
            print(f"  {name}: {reasons.get(name, 'NOT REVIEWED')}")
    if total_checked == 0:
        print("no mutant was checked")
        return 1
    if share < args.min_killed:
        print(f"\nmutation gate FAILED: {share:.1f} % killed < {args.min_killed:.0f} %")
        return 1
    if total_unchecked:
        print(
            f"\nmutation gate INCOMPLETE: {share:.1f} % of the checked mutants killed, "
            f"{total_unchecked} not checked yet (run again: results are kept in mutants/)"
        )
        return 2
    print(f"\nmutation gate passed: {share:.1f} % killed >= {args.min_killed:.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
