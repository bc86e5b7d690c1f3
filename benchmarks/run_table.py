"""One markdown row per CLI run from its report.json: the device script's table.

    python benchmarks/run_table.py "llama7b admm-grad=OUT/report.json=WALL" ... > table.md

Each argument is ``LABEL=REPORT=WALL`` (WALL: the process's wall seconds measured from outside,
or ``-``); a missing report makes a row that says so. Phase columns are sums over the pruned
blocks (report.json ``block_phases``); "before the loop" is the process start to the block
loop: imports and flags (``wall_seconds - total_seconds``) plus the run's steps before ``prune``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PHASES = ("load", "forward", "gram", "solve", "errors", "write", "write_wait")
HEAD = ("| run | prune s | report total s | process wall s | before the loop s | " + " | ".join(PHASES) +
        " | assemble s | mean layer error | peak device GiB | precision |")


def row(label: str, report_path: str, wall: str) -> str:
    path = Path(report_path)
    if not path.is_file():
        return f"| {label} | (no report: failed, timed out or skipped) |"
    r = json.loads(path.read_text())
    steps = r.get("run_phases", {})
    before = r["wall_seconds"] - r["total_seconds"] + sum(
        v for k, v in steps.items() if k not in ("prune", "assemble", "pruned_perplexity"))
    sums = [sum(b.get(k, 0.0) for b in r["block_phases"]) for k in PHASES]
    errors = [x["error_pruned"] for x in r["linears"] if x["error_pruned"] is not None]
    cells = [label, f"{r['prune_seconds']:.1f}", f"{r['total_seconds']:.1f}", wall, f"{before:.1f}",
             *[f"{s:.1f}" for s in sums], f"{steps.get('assemble', 0.0):.1f}",
             f"{sum(errors) / len(errors):.4f}" if errors else "-",
             f"{r['peak_memory'].get('device_max_allocated_gib', 0.0):.1f}", r.get("matmul_precision", "-")]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> None:
    print(HEAD)
    print("|" + "---|" * (HEAD.count("|") - 1))
    for arg in argv:
        label, report, wall = arg.rsplit("=", 2)
        print(row(label, report, wall))


if __name__ == "__main__":
    main(sys.argv[1:])
