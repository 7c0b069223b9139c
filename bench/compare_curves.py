"""Print two runs' per-step curves from bench/async_grpo.py --json side by side (a correctness
check: rollout.max_staleness=0 must track the synchronous run).

    python bench/compare_curves.py results.json sync async:0
"""

from __future__ import annotations

import json
import sys


def main(path: str, a: str, b: str) -> None:
    runs = {r["mode"]: r for r in json.loads(open(path).read())}
    for key in runs[a]["curves"]:
        xs, ys = runs[a]["curves"][key], runs[b]["curves"][key]
        pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
        worst = max((abs(x - y) for x, y in pairs), default=float("nan"))
        cells = "  ".join(f"{x:.4g}/{y:.4g}" for x, y in pairs)
        print(f"{key:<24} max|diff| {worst:.3g}   {cells}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
