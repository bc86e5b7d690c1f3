"""Routed vs all-token expert Grams on a mixture-of-experts checkpoint (issue #27, item 4): one
``admm-prune prune`` per (sparsity, --moe-calibration, calibration seed), each with WikiText-2
validation perplexity, collected in one JSON; ``--table`` renders it with the routed/all ratio
taken per seed (same calibration windows), then averaged.

    python benchmarks/upcycle_moe.py --out runs/smollm2-moe-8x2
    python benchmarks/moe_routed_vs_all.py --model runs/smollm2-moe-8x2 --sparsity 0.7 --seeds 0 \\
        --results paper_notes/moe_upcycled.json                      # one queue job per seed
    python benchmarks/moe_routed_vs_all.py --table paper_notes/moe_upcycled.json

Runs append to --results (a run already there is skipped), so a protocol can be split into jobs.
The pruned checkpoints go to a temporary folder and are deleted; each run's report.json is kept
whole in the results (per-expert token counts included).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prune_command(args, sparsity: float, mode: str, seed: int, out: Path) -> list[str]:
    command = [str(Path(sys.executable).with_name("admm-prune")), "prune", "--model", args.model,
               "--method", args.method, "--sparsity", str(sparsity), "--moe-calibration", mode, "--seed", str(seed),
               "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--eval", args.eval, "--eval-windows", str(args.eval_windows), "--eval-seqlen", str(args.eval_seqlen),
               "--device", args.device, "--no-progress", "--out", str(out), "--reconstruct-steps", "0"]
    return command + (["--num-blocks", str(args.num_blocks)] if args.num_blocks else [])


def run(args) -> None:
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    done = {(r["sparsity"], r["mode"], r["seed"], r["num_blocks"]) for r in results["runs"]}
    for sparsity in args.sparsity:
        for seed in args.seeds:
            for mode in args.modes:
                if (sparsity, mode, seed, args.num_blocks) in done:
                    continue
                with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
                    out = Path(tmp) / "pruned"
                    command = prune_command(args, sparsity, mode, seed, out)
                    start = time.perf_counter()
                    subprocess.run(command, check=True)
                    seconds = time.perf_counter() - start
                    report = json.loads((out / "report.json").read_text())
                    shutil.rmtree(out)
                results["runs"].append({"sparsity": sparsity, "mode": mode, "seed": seed, "num_blocks": args.num_blocks,
                                        "perplexity": report["perplexity"].get("pruned"),
                                        "dense_perplexity": report["perplexity"].get("dense"),
                                        "seconds": seconds, "command": shlex.join(command), "report": report})
                results_path.write_text(json.dumps(results, indent=1))
                print(f"sparsity {sparsity} {mode:>6} seed {seed}: perplexity "
                      f"{results['runs'][-1]['perplexity']:.3f} ({seconds:.0f} s)", flush=True)


def _mean_std(xs) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(results: dict) -> str:
    """Markdown: per sparsity, mean ± std perplexity of each mode, and routed/all per seed."""
    runs = [r for r in results["runs"] if not r["num_blocks"]]
    lines = ["| sparsity | routed ppl | all ppl | routed / all (paired by seed) | seeds |", "|---|---:|---:|---:|---|"]
    each = ["| sparsity | seed | mode | perplexity | prune+eval time (s) |", "|---|---:|---|---:|---:|"]
    for sparsity in sorted({r["sparsity"] for r in runs}):
        by = {(r["mode"], r["seed"]): r for r in runs if r["sparsity"] == sparsity}
        seeds = sorted(s for (m, s) in by if m == "routed" and ("all", s) in by)
        if not seeds:
            continue
        routed = [by["routed", s]["perplexity"] for s in seeds]
        all_ = [by["all", s]["perplexity"] for s in seeds]
        ratios = [a / b for a, b in zip(routed, all_)]
        lines.append(f"| {sparsity} | {_mean_std(routed)} | {_mean_std(all_)} | {_mean_std(ratios)} | "
                     f"{', '.join(map(str, seeds))} |")
        for s in seeds:
            for mode in ("routed", "all"):
                r = by[mode, s]
                each.append(f"| {sparsity} | {s} | {mode} | {r['perplexity']:.3f} | {r['seconds']:.0f} |")
    dense = sorted({round(r["dense_perplexity"], 4) for r in runs if r["dense_perplexity"]})
    return "\n".join(lines + ["", f"Dense (upcycled, unpruned) perplexity: {dense}", ""] + each) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", metavar="RESULTS", help="print the markdown table of a results file and exit")
    p.add_argument("--model", help="the MoE checkpoint folder (benchmarks/upcycle_moe.py --out)")
    p.add_argument("--results", help="JSON file the runs are appended to")
    p.add_argument("--sparsity", type=lambda s: [float(x) for x in s.split(",")], default=[0.7])
    p.add_argument("--modes", type=lambda s: s.split(","), default=["routed", "all"])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--method", default="admm-grad")
    p.add_argument("--calib", default="../shared/data/c4/c4_train_first1000_reserialized.jsonl")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval", default="../shared/data/wikitext-2-raw/wiki.valid.raw")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--num-blocks", type=int, default=0, help="prune only the first K blocks (a timing probe)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scratch", default=None, help="where the pruned checkpoints are written, then deleted")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())), end="")
    elif not (args.model and args.results):
        p.error("--model and --results are needed to run (or --table RESULTS)")
    else:
        run(args)


if __name__ == "__main__":
    main()
