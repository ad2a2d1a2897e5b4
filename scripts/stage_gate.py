"""Check a curriculum stage's gate on an evaluation record (docs/CURRICULUM.md).

    python3 scripts/stage_gate.py EVAL.json LIST:METRIC>=RATE [LIST:METRIC>=RATE ...]

EVAL.json is `sdxl eval shapes --json` (rates under "results", by "kind") or `sdxl eval vae-ceiling --json`
(under "ceiling", by list). Prints each rate with its Wilson 95% interval and whether it meets its
threshold; exit status 0 when every condition is met, 1 when one is not, 2 on a bad argument or record. The
gate is on the measured rate (the interval says how sure that is: at n = 100 about +-9 points).
"""

from __future__ import annotations

import json
import re
import sys


def rates(record: dict) -> dict[str, dict]:
    if "results" in record:
        return {r["kind"]: r for r in record["results"]}
    if "ceiling" in record:
        return record["ceiling"]
    raise ValueError("neither 'results' (sdxl eval shapes) nor 'ceiling' (sdxl eval vae-ceiling)")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            table = rates(json.load(f))
    except (OSError, ValueError) as e:
        print(f"stage_gate: {argv[0]}: {e}", file=sys.stderr)
        return 2
    ok = True
    for cond in argv[1:]:
        m = re.fullmatch(r"(\w+):(\w+)>=([0-9.]+)", cond)
        if not m or m.group(1) not in table or m.group(2) not in table[m.group(1)]:
            print(f"stage_gate: cannot read condition {cond!r} in {argv[0]}", file=sys.stderr)
            return 2
        row, metric, need = table[m.group(1)], m.group(2), float(m.group(3))
        lo, hi = row.get(f"{metric}_ci95", [float("nan")] * 2)
        met = row[metric] >= need
        ok = ok and met
        print(f"{m.group(1)} {metric}: {row[metric]:.0%} ({lo:.0%}-{hi:.0%}, n = {row['n']}) "
              f"{'>=' if met else '<'} {need:.0%}: {'met' if met else 'not met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
