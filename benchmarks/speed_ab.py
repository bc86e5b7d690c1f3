"""Same-call A/B of the whole CLI run: the engine at a base commit (A) and this checkout (B), alternately.

    python benchmarks/speed_ab.py --base 9c1cd67 --rounds 2 --out paper_notes/speed_ab_cpu -- \
        --calib ../shared/data/c4/c4_train_first1000_reserialized.jsonl --nsamples 32 --seqlen 512 \
        --eval none --device cpu

A is ``git archive <base> gpu reference`` unpacked in a temporary folder and put first on
PYTHONPATH (as ``admm_prune.gpu``/``admm_prune.reference`` through symlinks); B is this
checkout. Runs go A B A B ... (`--rounds` pairs), each ``python -m admm_prune.gpu prune <args>
--out <tmp> --overwrite --no-progress`` in a fresh process, timed from outside (process wall
seconds) and read back from its report.json (absent fields: the base does not record them).
The pruned weights of every run are hashed: A and B must agree bit for bit on the CPU.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMS = ("load", "forward", "gram", "solve", "errors", "write", "write_wait")


def base_package(base: str, into: Path) -> Path:
    """The engine at `base` as an importable ``admm_prune`` under `into` (returned: the PYTHONPATH entry)."""
    src, pkg = into / "src", into / "pkg" / "admm_prune"
    src.mkdir(parents=True)
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", base, "gpu", "reference"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for name in ("gpu", "reference"):
        (pkg / name).symlink_to(src / name)
    return into / "pkg"


def weights_sha256(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("*.safetensors")):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def run_once(label: str, pythonpath: str | None, args: list[str], out: Path, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "admm_prune.gpu", "prune", *args, "--out", str(out), "--overwrite", "--no-progress"]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    sums = {k: sum(b.get(k, 0.0) for b in report["block_phases"]) for k in SUMS}
    return {"label": label, "process_wall_seconds": wall, "load_avg_before": load,
            "total_seconds": report.get("total_seconds"), "wall_seconds": report.get("wall_seconds"),
            "prune_seconds": report.get("prune_seconds"), "run_phases": report.get("run_phases", {}),
            "phase_sums": sums, "weights_sha256": weights_sha256(out)}


def markdown(rows: list[dict], args: list[str], base: str, threads: int) -> str:
    head = ("| run | code | process wall s | report total s | prune s | before the block loop s | assemble s | "
            "load | forward | gram | solve | errors | write | write_wait | load avg |")
    lines = [f"Command: `admm-prune prune {' '.join(args)}`, {threads} torch thread(s); A = {base}, B = this "
             f"checkout. Phase columns: seconds summed over the pruned blocks.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for k, r in enumerate(rows):
        phases = r["run_phases"]  # before the loop: imports and flags (process start to run_prune), the steps
        before = (r["wall_seconds"] - r["total_seconds"] + sum(
            v for n, v in phases.items() if n not in ("prune", "assemble", "pruned_perplexity"))) if phases else None
        s = r["phase_sums"]
        cells = [str(k + 1), r["label"], f"{r['process_wall_seconds']:.1f}", _f(r["total_seconds"]),
                 _f(r["prune_seconds"]), _f(before), _f(phases.get("assemble")),
                 *[_f(s[n], 2) for n in SUMS], f"{r['load_avg_before']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    same = len({r["weights_sha256"] for r in rows}) == 1
    lines += ["", f"Weights identical across all runs: {same}."]
    return "\n".join(lines) + "\n"


def _f(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="commit for A")
    p.add_argument("--rounds", type=int, default=2, help="A B pairs")
    p.add_argument("--out", required=True, help="path prefix: OUT.json, OUT.md")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS): one "
                                                          "thread is steadier on a CPU shared with other jobs")
    p.add_argument("prune_args", nargs=argparse.REMAINDER, help="after --: the prune flags")
    a = p.parse_args(argv)
    args = [x for x in a.prune_args if x != "--"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="speed-ab-") as tmp:
        tmp = Path(tmp)
        base = str(base_package(a.base, tmp / "base"))
        for _ in range(a.rounds):
            for label, path in (("A", base), ("B", None)):
                rows.append(run_once(label, path, args, tmp / "out", a.threads))
                print(json.dumps(rows[-1]), flush=True)
    info = {"base": a.base, "args": args, "threads": a.threads, "machine": platform.platform(),
            "cpus": os.cpu_count(), "rows": rows}
    Path(a.out + ".json").write_text(json.dumps(info, indent=1) + "\n")
    Path(a.out + ".md").write_text(markdown(rows, args, a.base, a.threads))
    print(markdown(rows, args, a.base, a.threads))


if __name__ == "__main__":
    main()
